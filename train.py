"""Fine-tune BERT with LoRA on IMDB reviews, with a hand-written PyTorch training loop.

    python train.py                                  # bert-base-uncased + the Hub's imdb
    python train.py --model PATH --data PATH ...     # local folders, offline
    torchrun --nproc_per_node=4 train.py ...         # 4 GPUs, data parallel: docs/distributed.md

Read it top to bottom: the recipe (every hyper-parameter and its default), the run (data ->
model -> "before" -> the loop -> "after"), then the loop (``Trainer.train_epoch``, with one
optimizer step in ``Trainer.optimizer_step``), and last the run's other steps (loading the
data, scoring before and after, the report). What is marked ``[production]`` makes the run
resumable (snapshots), data parallel (torchrun) and stoppable (signals, a diverging loss): a
first reading can skip it. ``--method head`` trains the classifier head alone and ``--method
full`` every weight, with the same loop and data, for comparison with LoRA.
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import data
import evaluate
import lora_model
from machinery import checkpoints, cli, report, run_folder, runtime, snapshots, stats, tracking
from machinery.cli import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from machinery.data_sources import LABEL, load_split
from machinery.files import write_folder, write_json, write_manifest
from machinery.hub import load_tokenizer
from machinery.options import (
    DataOptions,
    MaxLength,
    Pooling,
    RunOptions,
    RuntimeOptions,
    Truncation,
)
from machinery.runtime import autocast, is_main_process, print_main

# ---------------------------------------------------------------------------------------------
# The recipe

# The default --lr of each --method. Full fine-tuning nudges pre-trained weights and wants
# 2e-5..5e-5 (BERT paper). LoRA trains few, freshly initialised weights and wants a far larger
# step: the LoRA paper used 4e-4..5e-4 for RoBERTa-base (r=8). A linear probe trains a new head
# alone on fixed features and takes larger steps still.
DEFAULT_LRS = {"lora": 5e-4, "head": 1e-3, "full": 3e-5}


@dataclass
class Recipe:
    """recipe: what a run trains and how

    Every field is a flag (lora_r is --lora-r), its docstring the flag's help.
    """

    model: str = "bert-base-uncased"
    """Hub model name or local model folder."""
    method: checkpoints.Method = "lora"
    """lora = LoRA adapters and the head, head = the head alone, full = every weight."""
    lora_r: PositiveInt = 8
    """Rank r of the LoRA update B A (this and the other lora flags: --method lora only)."""
    lora_alpha: PositiveFloat = 32
    """LoRA scaling alpha: the update is multiplied by alpha / r."""
    lora_dropout: Fraction = 0.1
    """Dropout on the LoRA branch's input during training."""
    lora_targets: str = "query,value"
    """Comma-separated names of the linear layers that get adapters."""
    pooling: Pooling = "auto"
    """The head reads [CLS] (cls) or the token mean (mean); auto: mean where the model says so."""
    lr: PositiveFloat | None = cli.option(default_text="by --method, " + ", ".join(
        f"{method} {lr:g}" for method, lr in DEFAULT_LRS.items()))
    """Peak AdamW learning rate; docs/reference.md says why it depends on --method."""
    epochs: PositiveInt = 1
    """Passes over the training reviews."""
    batch_size: PositiveInt = 16
    """Training batch size per process (per GPU under torchrun)."""
    grad_accum_steps: PositiveInt = 1
    """Batches averaged per optimizer step: the effective batch is batch-size x processes x this."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW weight decay, not applied to biases and LayerNorm."""
    warmup_ratio: Fraction = 0.06
    """Fraction of optimizer steps with linear warm-up, then linear decay to 0."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Clip the gradient norm to this; 0 disables."""
    max_length: MaxLength = data.DEFAULT_MAX_LENGTH
    """Tokens read per review, [CLS] and [SEP] included, up to the model's limit (512 for BERT)."""
    truncation: Truncation = data.DEFAULT_TRUNCATION
    """Tokens of a longer review kept: head, tail, or head+tail (a quarter head, rest tail)."""
    train_samples: PositiveInt | None = cli.option(
        default_text="all that the validation split leaves")
    """Train on TRAIN_SAMPLES reviews of the training split, drawn with the subset rule."""
    validation_size: PositiveFloat = 0.1
    """Validation reviews carved out of the training split: a fraction (<1) or a count (>=1)."""
    min_class_examples: PositiveInt = 5
    """Refuse a class with fewer training reviews: a typo in a label makes a class of its own."""
    labels: cli.ClassNames | None = cli.option(default_text=(
        "0/1 and neg/pos/negative/positive are negative, positive; other integers are 0..K-1; "
        "strings are sorted"))
    """The class names in id order, comma-separated: names the labels hold, or ids point to."""
    group_by_length: bool = False
    """Batch training reviews of similar length: less padding, faster above --max-length 128."""
    eval_every: PositiveInt | None = cli.option(default_text="at the end of each epoch only")
    """Also validate every EVAL_EVERY optimizer steps."""
    seed: NonNegativeInt = 42
    """Seed for LoRA init, dropout and batch order."""

    def __post_init__(self):
        if self.lr is None:  # the learning rate of the method
            self.lr = DEFAULT_LRS[self.method]


# train.py's flags, group by group: the recipe, then the options it shares with the other
# scripts (machinery/options.py). A resumed run may change only where and how fast it runs.
OPTIONS = (Recipe, DataOptions, RunOptions, RuntimeOptions)
ADJUSTABLE_ON_RESUME = cli.adjustable_options(*OPTIONS)


# ---------------------------------------------------------------------------------------------
# The run: data -> model -> "before" -> the loop -> "after"


def run(recipe: Recipe, data_options: DataOptions, run_options: RunOptions,
        runtime_options: RuntimeOptions) -> dict:
    """Train, score before/after on the test reviews, write metrics.json and the report;
    return the metrics."""
    started = time.perf_counter()
    # [production] torchrun's ranks, the device, and a fresh run or the snapshot to resume.
    job = run_folder.start_job(recipe, data_options, run_options, runtime_options,
                               ADJUSTABLE_ON_RESUME)
    # Python, numpy and torch. Rank 0 gets `seed` itself, so its LoRA init (which DDP copies
    # to every rank) is the one-process init; other ranks draw their own dropout masks.
    transformers.set_seed(recipe.seed + job.rank)

    # Data: train/validation carved from the training split, whose labels decide the classes
    # (or --labels does); the test split, scored before and after, holds only those.
    tokenizer = load_tokenizer(recipe.model)
    train, validation, test = load_reviews(recipe, data_options)
    train_loader, validation_loader, test_loader, tokenize_seconds = make_loaders(
        tokenizer, (train, validation, test), recipe, data_options, runtime_options, job)

    # The pre-trained model with a new classifier head, one output per class.
    model = lora_model.load_base_model(recipe.model, tuple(train.features[LABEL].names),
                                       recipe.pooling).to(job.device)
    if recipe.method == "lora":
        lora_model.check_lora_targets(model, recipe.lora_targets)
    run_folder.start_run_folder(run_options.output_dir, job, train, validation, test)

    # Before: the pre-trained model (its head drawn from a fixed seed) on the test reviews.
    before, before_seconds = score_before(model, test_loader, job)

    # LoRA adapters on the frozen pre-trained model (or the head alone, or every weight).
    model = lora_model.prepare_model(model, recipe.method, recipe.lora_r, recipe.lora_alpha,
                                     recipe.lora_dropout, recipe.lora_targets)
    trainable, total = lora_model.parameter_counts(model)
    print_main(describe_method(recipe, lora_model.pooling_of(model), trainable, total))

    # The loop.
    trainer = Trainer(recipe, run_options, job, model, tokenizer, train_loader,
                      validation_loader)
    trainer.state.before = before
    trainer.state.reviews_hash = data.hash_reviews(train, validation, test)  # a resume: same?
    if job.snapshot is not None:  # [production] resume
        trainer.resume_from(job.snapshot)
    trainer.train()
    train_seconds, steps = trainer.state.train_seconds, trainer.state.step
    # Free the model and its optimizer: two copies of the model are never in memory together.
    del trainer, model
    gc.collect()

    # After: the best checkpoint, scored as evaluate.py scores it.
    after, calibration, after_seconds = score_after(recipe, run_options, job, validation_loader,
                                                    test_loader)
    metrics = {"before": before, "after": after, "calibration": calibration,
               "parameters": {"trainable": trainable, "total": total},
               "train_seconds": train_seconds,
               "train_samples_per_s": len(train) * recipe.epochs / train_seconds,
               "tokenize_seconds": tokenize_seconds,
               "test_seconds": {"before": before_seconds, "after": after_seconds},
               "wall_seconds": time.perf_counter() - started}
    finish_run(recipe, run_options, job, metrics, len(test), steps)
    return metrics


# ---------------------------------------------------------------------------------------------
# The training loop

# Parameters that AdamW should not decay: biases and LayerNorm weights (BERT convention).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# Validation picks the best checkpoint by this metric (IMDB is balanced, so accuracy is fair).
SELECTION_METRIC = "accuracy"


class Trainer(snapshots.ResumableLoop):
    """State of one fine-tuning run, with the loop written out in ``train_epoch``.

    Under torchrun each rank runs this same loop on its shard of every batch, through a
    ``DistributedDataParallel`` wrapper that averages the gradients across ranks in backward;
    only rank 0 writes the log, the best checkpoint and the snapshots.
    """

    def __init__(self, recipe: Recipe, run_options: RunOptions, job: run_folder.Job,
                 model: torch.nn.Module, tokenizer, train_loader, validation_loader):
        self.recipe, self.run_options, self.job = recipe, run_options, job
        self.model, self.tokenizer = model, tokenizer
        self.train_loader, self.validation_loader = train_loader, validation_loader
        # The frozen linear weights in bf16/fp16 once, not cast by autocast in every forward.
        runtime.cast_frozen_weights(model, job.precision)
        if run_options.compile:
            # In place: parameter names, and so the saved weights, stay the same. Dynamic
            # shapes: each batch is padded to its longest review, so the width changes.
            model.compile(dynamic=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, recipe.lr, recipe.weight_decay)
        self.batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(self.batches_per_epoch / recipe.grad_accum_steps)
        self.total_steps = steps_per_epoch * recipe.epochs
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(recipe.warmup_ratio * self.total_steps), self.total_steps)
        self.scaler = runtime.loss_scaler(job.device, job.precision)
        self.state = snapshots.LoopState()  # where the loop is: saved and restored as a whole
        # Kept on the device, where adding costs no host sync; the host reads it at log steps.
        self.window_loss = torch.zeros((), device=job.device)  # loss summed since the last log
        self.grad_norm = torch.zeros((), device=job.device)  # the last step's, before clipping
        self.window = tracking.LogWindow()  # samples and seconds since the last log
        self.log_file: tracking.RunLog | None = None  # rank 0's log.jsonl
        # [production] torchrun: forward and backward go through the DDP wrapper (which starts
        # every rank from rank 0's weights); evaluation and saving use the model itself. BERT's
        # buffers (position and token type ids) never change: no broadcast of them per forward.
        self.ddp_model = (DistributedDataParallel(model, broadcast_buffers=False)
                          if runtime.is_distributed() else None)
        self.forward_model = model if self.ddp_model is None else self.ddp_model
        # [production] snapshots, signals and a diverging loss (snapshots.ResumableLoop).
        self.prepare_to_stop_and_resume(job.device, run_options.output_dir)

    def train(self) -> None:
        """Train from the current position (the start, or a snapshot's) to the end."""
        if is_main_process():
            self.log_file = tracking.RunLog(
                self.run_options.output_dir / tracking.LOG_FILE, self.state.log_bytes,
                tensorboard=self.run_options.report_to == "tensorboard", resumed_at=self.state.step)
        try:
            with self.stop:  # [production] SIGINT/SIGTERM end the run after a snapshot
                while self.state.epoch < self.recipe.epochs:
                    self.train_epoch(self.state.epoch, start=self.state.batches_done)
                    self.state.epoch, self.state.batches_done = self.state.epoch + 1, 0
        finally:
            if self.log_file is not None:
                self.log_file.close()

    def train_epoch(self, epoch: int, start: int = 0) -> None:
        """One pass over the training batches from batch `start`: an optimizer step every
        `grad_accum_steps` batches, then logging, validation and a snapshot at their steps."""
        model = self.forward_model  # under torchrun, the DDP wrapper
        accum, n_batches = self.recipe.grad_accum_steps, self.batches_per_epoch
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)  # a new order every epoch, the same on all ranks
        sampler.start_at(start * self.recipe.batch_size)  # [production] resume mid-epoch
        model.train()
        self.window = tracking.LogWindow()
        # One iterator, made here: tqdm.auto would otherwise call iter() on the loader twice,
        # starting the worker processes twice and losing the resume position to the first.
        bar = tqdm(iter(self.train_loader), desc=f"epoch {epoch + 1}/{self.recipe.epochs}",
                   initial=start, total=n_batches, dynamic_ncols=True,
                   disable=not is_main_process())
        for i, batch in enumerate(bar, start=start):
            # No-op when the collator already delivered the batch (num_workers=0).
            batch = data.move_to_device(batch, self.job.device)
            # The last group of an epoch can be short: average over the batches it really has.
            group_size = min(accum, n_batches - (i // accum) * accum)
            last_of_group = (i + 1) % accum == 0 or i + 1 == n_batches
            with runtime.gradient_sync(self.ddp_model, last_of_group):  # [production] DDP
                with autocast(self.job.device, self.job.precision):
                    loss = model(**batch).loss
                self.scaler.scale(loss / group_size).backward()
            self.window_loss += loss.detach()
            self.state.window_batches += 1
            self.window.samples += len(batch["labels"])
            self.nonfinite.add_loss(loss)  # [production] a diverging loss
            if not last_of_group:
                continue  # keep accumulating gradients
            self.optimizer_step()
            self.state.batches_done = i + 1
            self.after_step(epoch, bar, last=i + 1 == n_batches)
        self.validate(epoch)  # first, also when the last step asked to stop (a resume skips it)
        self.take_snapshot()  # [production] the end of an epoch is a snapshot's turn
        self.stop_if_asked(self.stop.requested(agree=True))  # [production]

    def optimizer_step(self) -> None:
        """Unscale, clip, step, schedule: queued on the device without waiting for it.

        A step whose gradients hold inf/NaN (fp16 overflow, a bad batch) is skipped on the
        device: the scaler's unscale_ finds them and its step has the fused AdamW leave the
        weights and its moments alone (with fp16 the scale is lowered too). The scheduler
        advances here as if the step was taken; ``read_device_counters`` takes the advance
        back for skipped steps at the next log. Under DDP the gradients are already averaged
        and equal on every rank, so each rank clips, steps and schedules as one process would.
        """
        # Clip the true gradients: with fp16 they are still multiplied by the loss scale.
        self.scaler.unscale_(self.optimizer)
        max_norm = self.recipe.max_grad_norm if self.recipe.max_grad_norm > 0 else math.inf
        norm = self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        # fp16: lower the scale after an overflow, raise it after many clean steps; bf16 and
        # fp32 keep it at 1 (no scaling: the scaler is there for its inf/NaN check alone).
        self.scaler.update(None if self.job.precision == "fp16" else runtime.UNSCALED)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.count_step(norm)  # an inf/NaN norm: this step is skipped on the device
        self.state.step += 1

    def after_step(self, epoch: int, bar: tqdm, last: bool) -> None:
        """Log, validate and take a snapshot where it is their turn. Only at these steps does
        the host look at the device's counters (each look waits for the GPU to catch up); the
        steps in between queue their work without waiting."""
        step, recipe, run_options = self.state.step, self.recipe, self.run_options
        log_now = step % run_options.log_every == 0 or last
        validate_now = bool(recipe.eval_every) and step % recipe.eval_every == 0 and not last
        save_now = step % run_options.save_every == 0 and not last
        if log_now or validate_now or save_now:
            self.read_device_counters()
        self.state.train_seconds += self.window.lap()
        if log_now:
            self.log_training(epoch, bar)
        if validate_now:
            self.validate(epoch)
            self.forward_model.train()
        # [production] a stop asked for by a signal; on the last step it waits for validation.
        asked = 0 if last else self.stop.requested(agree=log_now or validate_now or save_now)
        if asked or save_now:
            self.take_snapshot()
        self.stop_if_asked(asked)
        self.window.restart()  # validation and saving are not training time

    def read_device_counters(self) -> None:
        """Read what the device counted since the last look (one host sync): give the
        schedule back the advance of skipped steps, and stop a run whose loss stayed inf/NaN
        for snapshots.MAX_NONFINITE_STEPS steps in a row."""
        skipped, self.state.nonfinite_steps, longest = self.nonfinite.read()
        if skipped:
            # Rewind the schedule to the steps really taken; step() sets their learning rate.
            self.scheduler.last_epoch -= skipped + 1
            self.scheduler.step()
        if longest >= snapshots.MAX_NONFINITE_STEPS:
            kept = (f"the snapshot of step {self.saved_step} in {self.snapshot_dir}"
                    if self.saved_step >= 0 else None)
            raise snapshots.diverged(longest, self.state.step, kept)

    def validate(self, epoch: int) -> None:
        """Score the validation split; save the checkpoint when it is the best so far.

        Every rank scores its share and gets the same metrics; rank 0 alone saves and logs.
        """
        metrics = evaluate.evaluate_model(self.model, self.validation_loader, self.job.device,
                                          self.job.precision, desc="Validating")
        score = metrics[SELECTION_METRIC]
        improved = self.state.best_score is None or score > self.state.best_score
        if improved:
            self.state.best_score = score
            if is_main_process():
                self.save_best()
        self.log({"epoch": epoch + 1, "validation": metrics, "best": improved})
        if is_main_process():
            tqdm.write(f"step {self.state.step}: validation accuracy {metrics['accuracy']:.4f}, "
                       f"F1 {report.headline_f1(metrics):.4f}"
                       + ("  (best so far, saved)" if improved else ""))

    def save_best(self) -> None:
        """Save the checkpoint with the preprocessing evaluate.py must repeat, whole or not at
        all: written into a folder beside it, then swapped in (``write_folder``), so a full
        disk or a kill leaves the previous best in place."""
        recipe = self.recipe

        def write(partial: Path) -> None:
            lora_model.save_checkpoint(self.model, self.tokenizer, partial, recipe.method)
            data.Preprocessing(recipe.truncation, recipe.max_length).save(partial)
            write_manifest(partial)  # last: a damaged file is found before it is used

        folder = checkpoints.checkpoint_folder(self.run_options.output_dir, recipe.method)
        write_folder(folder, write)

    def log_training(self, epoch: int, bar: tqdm) -> None:
        """Log the mean loss since the last log line (a host sync), the lr and the speed."""
        loss = runtime.mean_over_ranks(self.window_loss / self.state.window_batches).item()
        lr = self.scheduler.get_last_lr()[0]
        # Every rank trains as many samples per step, so the job's rate is world x ours.
        samples_per_s = self.window.rate() * self.job.world_size
        grad_norm = self.grad_norm.item()  # equal on all ranks: the gradients are averaged
        self.log({"epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "samples_per_s": samples_per_s})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        self.window_loss.zero_()
        self.state.window_batches = 0
        self.window = tracking.LogWindow(clock=self.window.clock)

    def log(self, record: dict) -> None:
        """Append a record to log.jsonl (rank 0: the other ranks hold no log file)."""
        if self.log_file is not None:
            self.log_file.write({"step": self.state.step, **record})


def build_optimizer(model: torch.nn.Module, lr: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, without decay on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one launch (CUDA and CPU), and it can skip
    # its update on the device when the GradScaler found inf/NaN gradients: no host sync.
    return torch.optim.AdamW(groups, lr=lr, fused=True)


# ---------------------------------------------------------------------------------------------
# The run's steps: the data, the scores before and after, the report


def load_reviews(recipe: Recipe, data_options: DataOptions) -> tuple[Dataset, Dataset, Dataset]:
    """The training, validation and test reviews (data.py: validation split, subset rule)."""
    source, columns = data_options.data, (data_options.text_column, data_options.label_column)
    seed = data_options.data_seed
    train = load_split(source, "train", *columns, recipe.labels)
    data.check_class_sizes(train, recipe.min_class_examples)
    train, validation = data.split_train_validation(train, recipe.train_samples,
                                                    recipe.validation_size, seed)
    test = load_split(source, "test", *columns, tuple(train.features[LABEL].names))
    return train, validation, data.take_subset(test, data_options.eval_samples, seed)


def make_loaders(tokenizer, splits: tuple, recipe: Recipe, data_options: DataOptions,
                 runtime_options: RuntimeOptions, job: run_folder.Job) -> tuple:
    """Each split tokenized once (cached on disk) and batched: the training batches shuffled,
    the validation and test batches longest first; and the seconds this took.

    Every rank tokenizes (the `datasets` cache files are written atomically, so concurrent
    ranks are safe) and loads its own share of each split.
    """
    started, (train, validation, test) = time.perf_counter(), splits
    collator = data.PaddingCollator(tokenizer.pad_token_id, job.device)
    tokens = data.tokenize(train, tokenizer, recipe.max_length, recipe.truncation)
    train_loader = data.make_loader(
        tokens, recipe.batch_size, collator, shuffle=True, seed=recipe.seed,
        num_workers=data_options.num_workers, rank=job.rank, world_size=job.world_size,
        group_by_length=recipe.group_by_length)
    preprocessing = data.Preprocessing(recipe.truncation, recipe.max_length)
    validation_loader, test_loader = (
        evaluate.evaluation_loader(tokenizer, split, preprocessing,
                                   runtime_options.eval_batch_size, data_options.num_workers,
                                   job.device, job.rank, job.world_size)
        for split in (validation, test))
    return train_loader, validation_loader, test_loader, time.perf_counter() - started


def score_before(model: torch.nn.Module, test_loader,
                 job: run_folder.Job) -> tuple[dict, float | None]:
    """The pre-trained model's test metrics, and the seconds scoring them took."""
    started = time.perf_counter()
    if job.snapshot is None:
        before = evaluate.evaluate_model(model, test_loader, job.device, job.precision,
                                         desc="Scoring pre-trained")
        seconds = time.perf_counter() - started
    else:  # [production] resume: scored when the run started; the snapshot keeps the numbers
        before, seconds = snapshots.saved_before(job.snapshot), None
    print_main(f"Pre-trained model: test accuracy {before['accuracy']:.4f}")
    return before, seconds


def score_after(recipe: Recipe, run_options: RunOptions, job: run_folder.Job, validation_loader,
                test_loader) -> tuple[dict, dict, float]:
    """The best checkpoint, loaded back from disk (once rank 0 has written it) and scored
    exactly as evaluate.py scores it: its logits divided by one temperature fitted on the
    validation reviews (the same accuracy, more honest probabilities: machinery/stats.py).

    Returns its test metrics, the calibration, and the seconds scoring the test reviews took.
    """
    runtime.wait_for_all_ranks()
    best = lora_model.load_checkpoint(run_options.output_dir, recipe.model)[0].to(job.device)
    validated = evaluate.score_model(best, validation_loader, job.device, job.precision,
                                     desc="Calibrating")
    evaluate.warn_if_a_class_collapsed(validated, lora_model.label_names_of(best))
    calibration = stats.fit_calibration(validated.logits, validated.labels)
    if is_main_process():
        folder = checkpoints.checkpoint_folder(run_options.output_dir, recipe.method)
        stats.save_temperature(folder, calibration)
    started = time.perf_counter()
    scored = evaluate.score_model(best, test_loader, job.device, job.precision,
                                  calibration["temperature"], desc="Scoring fine-tuned")
    seconds = time.perf_counter() - started
    calibration["test"] = stats.calibration_effect(scored.logits, scored.labels,
                                                   scored.temperature)
    return scored.metrics, calibration, seconds


def finish_run(recipe: Recipe, run_options: RunOptions, job: run_folder.Job, metrics: dict,
               n_test: int, steps: int) -> None:
    """Write the report (and TensorBoard's results, at the last of the `steps` optimizer
    steps) and metrics.json (last: the run is finished); print before and after."""
    folder = run_options.output_dir
    if is_main_process():
        report.write_report(folder, metrics)
        if run_options.report_to == "tensorboard":
            tracking.write_tensorboard_results(folder, job.settings, metrics, steps)
        write_json(folder / report.METRICS_FILE, metrics)
        run_folder.finish_run_folder(folder)
    print_main(f"\nTest reviews ({n_test}), pre-trained vs fine-tuned ({recipe.method}):")
    print_main(evaluate.format_comparison([("before", metrics["before"]),
                                           ("after", metrics["after"])]))
    print_main(stats.format_calibration(metrics["calibration"]))
    print_main(f"\nTraining took {metrics['train_seconds']:.0f} s "
               f"({metrics['train_samples_per_s']:.1f} samples/s). Wrote "
               f"{folder / report.METRICS_FILE} and {folder / report.REPORT_MD} with its "
               f"plots; the checkpoint is in "
               f"{checkpoints.checkpoint_folder(folder, recipe.method)}")


def describe_method(recipe: Recipe, pooling: str, trainable: int, total: int) -> str:
    """What the run trains, how fast and how much, in words: 'LoRA r=8, alpha=32 on
    query,value, a head over the token mean, lr 0.0005: trainable 74,498 of 22,640,644
    parameters (0.33%)' (or the --method's own description)."""
    what = (f"LoRA r={recipe.lora_r}, alpha={recipe.lora_alpha:g} on {recipe.lora_targets}"
            if recipe.method == "lora" else checkpoints.METHODS[recipe.method])
    head = "a head over the token mean" if pooling == "mean" else "a head over [CLS]"
    return (f"{what}, {head}, lr {recipe.lr:g}: "
            f"{lora_model.format_parameter_counts(trainable, total)}")


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    """train.py's command line: a flag for every field of OPTIONS."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a BERT classifier with LoRA on IMDB reviews (or, to compare, "
                    "its head alone or every weight) and compare it with the pre-trained "
                    "model.")
    for options in OPTIONS:
        cli.add_options(parser, options)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of train.py (also under torchrun)."""
    try:
        return cli.run_command(build_parser(), run, argv, run_folder.disk_full_advice,
                               options_classes=OPTIONS)
    except snapshots.TrainingStopped as stop:
        print_main(f"train.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print_main("train.py: interrupted; run the same command again to resume from the "
                   "latest snapshot, if one was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        run_folder.release_run_folders()
        runtime.close_distributed()


if __name__ == "__main__":
    sys.exit(main())
