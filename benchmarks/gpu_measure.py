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
    TRAIN_FORWARDS,
    ConfigData,
    Shape,
    Workload,
    batch_workload,
    batches_workload,
    loader_workload,
    new_model,
    synthetic_rows,
)
from benchmarks.lab_recipe import RECIPE_BATCH_SIZE, RECIPE_LR
from benchmarks.lab_recipe import build_parser as recipe_parser
from data import PaddingCollator, make_loader
from evaluate import evaluate_model
from machinery.data_sources import LABEL
from machinery.tracking import LOG_FILE

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


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory since ``start_peak``, in GB: allocated by tensors, and reserved by the
    caching allocator (what the GPU must have free; None on a CPU)."""
    cuda = device.type == "cuda"
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / GB if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB if cuda else None}


def rates(kind: str, work: Workload, seconds: float, forwards: int) -> dict:
    """The figures of a training or evaluation pass (`kind`: train or eval) over `work` that
    took `seconds`: samples/s; tokens/s, real (non-padding) and padded (the width the model
    computes); model FLOPs per sample, `forwards` forward passes' worth; the mean widths."""
    return {f"{kind}_samples_per_s": work.rows / seconds,
            f"{kind}_tokens_per_s": work.real_tokens / seconds,
            f"{kind}_padded_tokens_per_s": work.padded_tokens / seconds,
            f"{kind}_flops_per_sample": forwards * work.flops / work.rows,
            f"{kind}_mean_tokens": work.real_tokens / work.rows,
            f"{kind}_mean_width": work.padded_tokens / work.rows,
            f"{kind}_samples": work.rows}


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
    work = batches_workload(config, timed)
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
    return {**rates("train", work, train_seconds, TRAIN_FORWARDS),
            **rates("eval", work, eval_seconds, 1), "eval_batch_size": shape.batch}


# ---------------------------------------------------------------------------------------------
# train.py's loop


def measure_loop(config: BertConfig, device: torch.device, precision: str, shape: Shape,
                 data: ConfigData, settings: argparse.Namespace, compiled: bool = False) -> dict:
    """train.py's Trainer.train and evaluate_model on loaders built as train.py builds them;
    with `compiled`, train.py's --compile."""
    workers = settings.num_workers
    collator = PaddingCollator(pad_token_id=0, device=device)
    train_loader = make_loader(data.train, shape.batch, collator, shuffle=True,
                               seed=default_seed(), num_workers=workers)
    validation_loader = make_loader(data.validation, settings.eval_batch_size, collator,
                                    shuffle=False, num_workers=workers)
    test_loader = make_loader(data.test, settings.eval_batch_size, collator, shuffle=False,
                              num_workers=workers)
    train_work = loader_workload(config, train_loader, data.train)
    eval_work = loader_workload(config, test_loader, data.test)
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        args = loop_arguments(device, folder, "--batch-size", str(shape.batch), "--max-length",
                              str(shape.length), "--lr", str(LOOP_LR),
                              *(["--compile"] if compiled else []))
        trainer = make_trainer(args, model, train_loader, validation_loader, device, precision)
        started = time.perf_counter()
        trainer.train()  # one epoch (--epochs 1)
        synchronize(device)
        train_wall = time.perf_counter() - started
        # train.py's own clock: training only, not its validation or checkpoint writing.
        train_seconds = trainer.state.train_seconds
        after_first_log = logged_rate_after_first_window(Path(folder))
        del trainer
    eval_seconds = evaluation_seconds(model, test_loader, device, precision)
    del train_loader, validation_loader, test_loader  # their worker processes end
    return {**rates("train", train_work, train_seconds, TRAIN_FORWARDS),
            **rates("eval", eval_work, eval_seconds[1], 1),
            "eval_batch_size": settings.eval_batch_size, "train_seconds": train_seconds,
            "train_samples_per_s_after_first_log": after_first_log,
            "train_wall_seconds": train_wall, "eval_seconds_first_pass": eval_seconds[0],
            "eval_seconds": eval_seconds[1]}


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
    train_rows = synthetic_rows(config, counts["recipe_batches"] * batch, length, seed=10)
    test_rows = synthetic_rows(config, counts["eval_samples"], length, seed=11)
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            output_dir=folder, learning_rate=recipe["lr"], per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch, num_train_epochs=1, weight_decay=0.01,
            bf16=precision == "bf16", fp16=precision == "fp16", report_to="none",
            save_strategy="no", eval_strategy="no", use_cpu=device.type == "cpu",
            disable_tqdm=True)
        trainer = HFTrainer(model=model, args=training_args,
                            train_dataset=padded_to(length, train_rows),
                            eval_dataset=padded_to(length, test_rows))
        trained = trainer.train()
        evaluated = trainer.evaluate()

    def work(rows: list[dict]) -> Workload:  # every row padded to the max length
        return batch_workload(config, [len(row["input_ids"]) for row in rows], length)

    return {**rates("train", work(train_rows), trained.metrics["train_runtime"],
                    TRAIN_FORWARDS),
            **rates("eval", work(test_rows), evaluated["eval_runtime"], 1),
            "eval_batch_size": batch, "batch": batch, "length": length}
