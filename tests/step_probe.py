"""Watch train.py's Trainer step by step: a test harness for the optimizer step.

``run_with_inf_gradient`` trains a tiny model for a few optimizer steps, makes one step's
gradients inf, and records after every step what the weights, the learning rate, the schedule
and the loss scale did. ``count_host_syncs`` counts the CUDA host synchronisations of each
step. Both drive the real ``Trainer`` (its loop, optimizer step and device counters), on any
device and precision.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import train
from data import PaddingCollator, make_loader
from lora_model import load_base_model, prepare_model
from machinery.cli import parse_options
from machinery.hub import load_tokenizer
from machinery.run_folder import Job

BATCH_SIZE = 4
# What torch.cuda.set_sync_debug_mode("warn") says at each synchronising operation.
SYNC_WARNING = "called a synchronizing CUDA operation"
REVIEW_IDS = [101, 2023, 3185, 2001, 2307, 102]  # "[CLS] this movie was great [SEP]"


def tiny_trainer(model_dir: str, folder: Path, device: torch.device, precision: str,
                 steps: int, *flags: str) -> train.Trainer:
    """A Trainer over `steps` batches of token ids, LoRA on the model in `model_dir`."""
    recipe, _, run_options, _ = parse_options(train.build_parser(), [
        "--model", model_dir, "--output-dir", str(folder), "--batch-size", str(BATCH_SIZE),
        "--lr", "1e-2", "--warmup-ratio", "0", *flags], train.OPTIONS)
    folder.mkdir(parents=True, exist_ok=True)
    n = steps * BATCH_SIZE
    tokens = Dataset.from_dict({"input_ids": [REVIEW_IDS[: 3 + i % 4] for i in range(n)],
                                "label": [i % 2 for i in range(n)]})
    tokenizer = load_tokenizer(model_dir)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    train_loader = make_loader(tokens, BATCH_SIZE, collator, shuffle=True)
    validation_loader = make_loader(tokens.select(range(BATCH_SIZE)), BATCH_SIZE, collator,
                                    shuffle=False)
    torch.manual_seed(0)
    model = prepare_model(load_base_model(model_dir), "lora", recipe.lora_r, recipe.lora_alpha,
                          recipe.lora_dropout, recipe.lora_targets).to(device)
    job = Job.one_process(device, precision)
    return train.Trainer(recipe, run_options, job, model, tokenizer, train_loader,
                         validation_loader)


def trainable_weights(trainer: train.Trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights."""
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()
            if param.requires_grad}


def run_with_inf_gradient(model_dir: str, folder: Path, device: torch.device, precision: str,
                          bad_step: int, steps: int = 4) -> tuple[train.Trainer, list[dict]]:
    """Train `steps` steps with inf gradients in step `bad_step` (1-based); per step: did the
    weights change, the learning rate, the scheduler's count and the loss scale after it."""
    trainer = tiny_trainer(model_dir, folder, device, precision, steps, "--log-every", "100")
    lora_weight = next(param for name, param in trainer.model.named_parameters()
                       if "lora_B" in name)
    # state.step counts the steps done: during step k it is k - 1.
    lora_weight.register_hook(
        lambda grad: grad * float("inf") if trainer.state.step == bad_step - 1 else grad)
    records = []
    optimizer_step = trainer.optimizer_step

    def recorded_step() -> None:
        before = trainable_weights(trainer)
        optimizer_step()
        trainer.read_device_counters()  # what a log step does: the host catches up
        after = trainable_weights(trainer)
        records.append({
            "changed": any(not torch.equal(before[name], after[name]) for name in before),
            "finite": all(bool(torch.isfinite(value).all()) for value in after.values()),
            "lr": trainer.scheduler.get_last_lr()[0],
            "scheduled_steps": trainer.scheduler.last_epoch,
            "scale": trainer.scaler.get_scale()})

    trainer.optimizer_step = recorded_step
    trainer.train()
    return trainer, records


def assert_only_step_2_was_skipped(steps: list[dict]) -> None:
    """What ``run_with_inf_gradient(bad_step=2, steps=4)`` must record on any device and in any
    precision: step 2 left the weights (finite) as they were and the schedule did not count it,
    so the learning rate decays linearly from 1e-2 over the 3 steps taken."""
    assert [step["changed"] for step in steps] == [True, False, True, True]
    assert all(step["finite"] for step in steps)
    assert [step["scheduled_steps"] for step in steps] == [1, 1, 2, 3]
    assert [step["lr"] for step in steps] == pytest.approx([7.5e-3, 7.5e-3, 5e-3, 2.5e-3])


def count_host_syncs(model_dir: str, folder: Path, device: torch.device, precision: str,
                     steps: int = 8) -> tuple[list[int], list[str]]:
    """Host synchronisations of each optimizer step 2..`steps`, in steps that neither log, save
    nor validate, and where they came from ("file:line" of the Python code that asked).

    Only the steps are judged: from the end of step 1 (which also sets up the optimizer's
    state) to the end of the last step. The run's deliberate syncs come after that (the last
    step's log, the epoch's validation and snapshot) and are not counted. On CUDA the syncs are
    torch's own warnings (``set_sync_debug_mode("warn")``); elsewhere only warnings that a test
    raises with SYNC_WARNING in them are seen.
    """
    trainer = tiny_trainer(model_dir, folder, device, precision, steps,
                           "--log-every", str(10 * steps), "--save-every", str(10 * steps))
    step_ends: list[int] = []  # how many warnings had been caught when each step ended
    optimizer_step = trainer.optimizer_step

    def counted_step() -> None:
        optimizer_step()
        step_ends.append(len(caught))  # `caught` is bound by the with below

    trainer.optimizer_step = counted_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return syncs_between_steps([sync_source(warning) for warning in caught], step_ends)


def sync_source(warning: warnings.WarningMessage) -> str | None:
    """Where a caught warning came from ("file:line"), if it reports a host sync; else None."""
    return f"{warning.filename}:{warning.lineno}" if SYNC_WARNING in str(warning.message) \
        else None


def syncs_between_steps(sources: list[str | None],
                        step_ends: list[int]) -> tuple[list[int], list[str]]:
    """The syncs of each step after the first, and their sources, from every caught warning's
    sync source (None: no sync) and the number of warnings caught when each step ended."""
    counts = [sum(source is not None for source in sources[start:end])
              for start, end in itertools.pairwise(step_ends)]
    judged = [source for source in sources[step_ends[0]:step_ends[-1]] if source is not None]
    return counts, judged
