"""The GPU benchmark's three measurements (see ``gpu_benchmark.py``): the bare model,
train.py's loop, and the lab recipe's HF Trainer; and how each is timed on the device.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import BertConfig, TrainingArguments
from transformers import Trainer as HFTrainer

from benchmarks.common import (
    Step,
    bare_steps,
    default_seed,
    loop_arguments,
    make_trainer,
    synchronize,
)
from benchmarks.gpu_workload import (
    ConfigData,
    Shape,
    batch_flops,
    forward_flops_per_sequence,
    loader_flops,
    new_model,
    synthetic_rows,
)
from benchmarks.lab_recipe import RECIPE_BATCH_SIZE, RECIPE_LR
from benchmarks.lab_recipe import build_parser as recipe_parser
from data import PaddingCollator, make_loader
from evaluate import evaluate_model
from machinery.data_sources import LABEL
from machinery.report import LOG_FILE

LOOP_LR = 5e-4  # train.py's default for LoRA
GB = 1e9


# ---------------------------------------------------------------------------------------------
# The device


def start_peak(device: torch.device) -> None:
    """Free what the last measurement left and start a new peak-memory measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since ``start_peak``, in GB (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def timed_seconds(step: Step, batches: list[dict], device: torch.device) -> float:
    """Seconds `step` takes over `batches`: CUDA events on a GPU, perf_counter on a CPU."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for batch in batches:
            step(batch)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The bare model


def measure_bare(config: BertConfig, device: torch.device, precision: str, shape: Shape,
                 rows: list[dict], warmup: int) -> dict:
    """Forward+backward and forward alone on batches prepared on the device."""
    collate = PaddingCollator(pad_token_id=0, device=device)
    batches = [collate(rows[i:i + shape.batch]) for i in range(0, len(rows), shape.batch)]
    warm, timed = batches[:warmup], batches[warmup:]
    flops = sum(batch_flops(config, *batch["input_ids"].shape) for batch in timed)
    samples = sum(len(batch["labels"]) for batch in timed)
    width = sum(batch["input_ids"].numel() for batch in timed) / samples
    model = new_model(config, device)
    train_step, eval_step = bare_steps(model, device, precision)
    model.train()
    for batch in warm:
        train_step(batch)
    train_seconds = timed_seconds(train_step, timed, device)
    model.eval()
    with torch.inference_mode():
        for batch in warm:
            eval_step(batch)
        eval_seconds = timed_seconds(eval_step, timed, device)
    return {"train_samples_per_s": samples / train_seconds,
            "eval_samples_per_s": samples / eval_seconds,
            "train_flops_per_sample": 2 * flops / samples, "eval_flops_per_sample": flops / samples,
            "train_mean_width": width, "eval_mean_width": width, "train_samples": samples,
            "eval_samples": samples, "eval_batch_size": shape.batch}


# ---------------------------------------------------------------------------------------------
# train.py's loop


def measure_loop(config: BertConfig, device: torch.device, precision: str, shape: Shape,
                 data: ConfigData, settings: argparse.Namespace) -> dict:
    """train.py's Trainer.train and evaluate_model on loaders built as train.py builds them."""
    workers = settings.num_workers
    collator = PaddingCollator(pad_token_id=0, device=device)
    train_loader = make_loader(data.train, shape.batch, collator, shuffle=True,
                               seed=default_seed(), num_workers=workers)
    validation_loader = make_loader(data.validation, settings.eval_batch_size, collator,
                                    shuffle=False, num_workers=workers)
    test_loader = make_loader(data.test, settings.eval_batch_size, collator, shuffle=False,
                              num_workers=workers)
    train_flops, n_train, train_width = loader_flops(config, train_loader, data.train)
    eval_flops, n_eval, eval_width = loader_flops(config, test_loader, data.test)
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        args = loop_arguments(device, folder, "--batch-size", str(shape.batch), "--max-length",
                              str(shape.length), "--lr", str(LOOP_LR))
        trainer = make_trainer(args, model, train_loader, validation_loader, device, precision)
        trainer.train()  # one epoch (--epochs 1)
        # train.py's own clock: training only, not its validation or checkpoint writing.
        train_seconds = trainer.state.train_seconds
        after_first_log = logged_rate_after_first_window(Path(folder))
        del trainer
    eval_seconds = evaluation_seconds(model, test_loader, device, precision)
    del train_loader, validation_loader, test_loader  # their worker processes end
    return {"train_samples_per_s": n_train / train_seconds,
            "eval_samples_per_s": n_eval / eval_seconds[1],
            "train_flops_per_sample": 2 * train_flops / n_train,
            "eval_flops_per_sample": eval_flops / n_eval,
            "train_mean_width": train_width, "eval_mean_width": eval_width,
            "train_samples": n_train, "eval_samples": n_eval,
            "eval_batch_size": settings.eval_batch_size, "train_seconds": train_seconds,
            "train_samples_per_s_after_first_log": after_first_log,
            "eval_seconds_first_pass": eval_seconds[0], "eval_seconds": eval_seconds[1]}


def evaluation_seconds(model: torch.nn.Module, loader, device: torch.device,
                       precision: str) -> list[float]:
    """Seconds of two ``evaluate_model`` passes over `loader`: the first starts the loader's
    workers, as a real run's "before" scoring does; the second is the one reported."""
    seconds = []
    for _ in range(2):
        synchronize(device)
        started = time.perf_counter()
        evaluate_model(model, loader, device, precision)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def logged_rate_after_first_window(folder: Path) -> float | None:
    """Training samples/s from the Trainer's log.jsonl, leaving out its first log window (the
    epoch's first batches); None when the log holds fewer than two windows or other keys."""
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    windows = [r for r in records if "samples_per_s" in r and "step" in r]
    if len(windows) < 2:
        return None
    # A window of k steps holds k x batch samples (every batch is full here) and took
    # k x batch / rate seconds; the later windows together: their samples over their seconds,
    # in which the batch size cancels.
    steps = [b["step"] - a["step"] for a, b in itertools.pairwise(windows)]
    step_seconds = [k / w["samples_per_s"] for k, w in zip(steps, windows[1:], strict=True)]
    return sum(steps) / sum(step_seconds)


# ---------------------------------------------------------------------------------------------
# The lab recipe


def recipe_settings() -> tuple[dict | None, str]:
    """The lab recipe's batch, learning rate and max length, or None and why it cannot run."""
    if importlib.util.find_spec("accelerate") is None:
        return None, "accelerate is not installed (HF Trainer needs it)"
    max_length = recipe_parser().get_default("max_length")
    return {"batch": RECIPE_BATCH_SIZE, "lr": RECIPE_LR, "max_length": max_length}, ""


def padded_to(length: int, rows: list[dict]) -> Dataset:
    """`rows` padded to `length` tokens, as the recipe's tokenizer call
    (``padding="max_length"``) pads them."""
    return Dataset.from_dict({
        "input_ids": [r["input_ids"] + [0] * (length - len(r["input_ids"])) for r in rows],
        "token_type_ids": [[0] * length for _ in rows],
        "attention_mask": [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"]))
                           for r in rows],
        "label": [r[LABEL] for r in rows]})


def measure_recipe(config: BertConfig, device: torch.device, precision: str, recipe: dict,
                   counts: dict) -> dict:
    """The lab recipe's HF Trainer on rows padded to its max length; bf16/fp16 where the
    project uses them."""
    batch, length = recipe["batch"], recipe["max_length"]
    train = padded_to(length, synthetic_rows(config, counts["recipe_batches"] * batch, length,
                                             seed=10))
    test = padded_to(length, synthetic_rows(config, counts["eval_samples"], length, seed=11))
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            output_dir=folder, learning_rate=recipe["lr"], per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch, num_train_epochs=1, weight_decay=0.01,
            bf16=precision == "bf16", fp16=precision == "fp16", report_to="none",
            save_strategy="no", eval_strategy="no", use_cpu=device.type == "cpu",
            disable_tqdm=True)
        trainer = HFTrainer(model=model, args=training_args, train_dataset=train,
                            eval_dataset=test)
        trained = trainer.train()
        evaluated = trainer.evaluate()
    flops = forward_flops_per_sequence(config, length)
    return {"train_samples_per_s": len(train) / trained.metrics["train_runtime"],
            "eval_samples_per_s": len(test) / evaluated["eval_runtime"],
            "train_flops_per_sample": 2 * flops, "eval_flops_per_sample": flops,
            "train_mean_width": length, "eval_mean_width": length, "train_samples": len(train),
            "eval_samples": len(test), "eval_batch_size": batch, "batch": batch,
            "length": length}
