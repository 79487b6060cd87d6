"""The scripts' options besides train.py's recipe: where the reviews come from, where and how
fast the math runs, and where a run keeps its files. Each dataclass is a group of flags
(``cli.add_options``): a field is a flag, its docstring the flag's help, its default the only
one there is.

train.py takes its own ``Recipe`` (the hyper-parameters) with ``DataOptions``, ``RunOptions``
and ``RuntimeOptions``; evaluate.py takes ``DataOptions`` and ``RuntimeOptions`` with its own
``ScoringPreprocessing``; predict.py the last two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch

from machinery.cli import (
    ADJUSTABLE,
    FIXED,
    NonNegativeInt,
    PositiveInt,
    at_least,
    option,
)
from machinery.data_sources import LABEL, TEXT

# [CLS] + [SEP] + a few tokens; anything shorter cannot carry a review.
MIN_MAX_LENGTH = 8
MaxLength = Annotated[int, at_least(MIN_MAX_LENGTH)]
# Which tokens of a review longer than --max-length are kept (data.truncate_ids).
Truncation = Literal["head", "tail", "head+tail"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# What the classifier head reads: BERT's pooler over [CLS], or the mean of the token vectors
# (lora_model.resolve_pooling).
Pooling = Literal["auto", "cls", "mean"]
# Where the training curves go besides log.jsonl (transformers' report_to; none by default).
ReportTo = Literal["none", "tensorboard"]
# Evaluation keeps no activations for backward, so a GPU takes far larger batches than
# training (and needs them to be kept busy); on a CPU 64 is the measured choice (BENCHMARKS.md,
# levers).
DEFAULT_EVAL_BATCH_SIZES = {"cpu": 64, "cuda": 256}
# DataLoader worker processes by default: on a GPU they build the next batches while the GPU
# computes; on a CPU they would take cores from the math.
DEFAULT_NUM_WORKERS = {"cpu": 0, "cuda": 4}


def by_device(defaults: dict[str, int]) -> str:
    """'64 on cpu, 256 on cuda': a default that depends on the device, in words."""
    return ", ".join(f"{value} on {kind}" for kind, value in defaults.items())


@dataclass
class DataOptions:
    """data: which reviews, read how"""

    data: str = "imdb"
    """Hub dataset name, or a local folder: the aclImdb layout (train/{neg,pos}/*.txt, test/...)
    or train.* and test.* files in Parquet, CSV or JSON Lines."""
    text_column: str = TEXT
    """Column holding the review text."""
    label_column: str = LABEL
    """Column holding the label: a class name or an integer id (see train.py --labels)."""
    eval_samples: PositiveInt | None = None
    """Score only EVAL_SAMPLES test reviews: split.shuffle(seed=DATA_SEED)
    .select(range(EVAL_SAMPLES)) (default: the whole test split)."""
    data_seed: NonNegativeInt = 0
    """Seed of the subset and validation-split shuffles."""
    num_workers: NonNegativeInt | None = option(
        default_text=by_device(DEFAULT_NUM_WORKERS) + ", at most the CPU count",
        resume_rule=ADJUSTABLE)
    """DataLoader worker processes that build the batches (0: the main process does)."""


@dataclass
class RuntimeOptions:
    """runtime: where the math runs, in which precision"""

    resume_rule: ClassVar[str] = ADJUSTABLE

    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    precision: Precision = option("auto", resume_rule=FIXED)
    """Autocast precision. auto: on CUDA bf16 where the GPU computes it natively (compute
    capability 8.0 and up: A100, H100, L4, ...), else fp16 with a GradScaler (T4, V100); on CPU
    bf16 only where the CPU computes it natively (AMX or AVX512-BF16), else fp32, because
    emulated bf16 is slower than fp32."""
    eval_batch_size: PositiveInt | None = option(default_text=by_device(DEFAULT_EVAL_BATCH_SIZES))
    """Batch size for evaluation; no gradients are kept, so it can be larger than the training
    batch."""


@dataclass
class RunOptions:
    """run folder: where train.py keeps its files, how often it reports and saves"""

    resume_rule: ClassVar[str] = ADJUSTABLE

    output_dir: Path | None = None
    """Run folder for the best checkpoint, snapshots, metrics and logs (default:
    runs/<model>-<method>-<date-time>)."""
    overwrite: bool = False
    """Start over in an --output-dir that already holds files (a finished or unfinished run's
    files are deleted first)."""
    resume: bool = False
    """Continue the unfinished run in --output-dir from its latest snapshot (running the same
    command again does this too; the flag makes it an error when there is nothing to resume)."""
    log_every: PositiveInt = 10
    """Log loss, learning rate and speed every LOG_EVERY optimizer steps."""
    save_every: PositiveInt = 200
    """Write a resumable snapshot every SAVE_EVERY optimizer steps, as well as at the end of
    each epoch."""
    report_to: ReportTo = "none"
    """Also log to TensorBoard (event files in the run folder's tensorboard/; needs the
    tensorboard package), or nowhere but log.jsonl."""
    compile: bool = False
    """torch.compile the model for training and validation; compiling takes minutes, so it pays
    only on long runs (see BENCHMARKS.md)."""


def fill_device_defaults(options, device: torch.device) -> None:
    """Give the options whose default depends on the device (left None) theirs:
    --eval-batch-size and --num-workers, where `options` has them."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if getattr(options, "eval_batch_size", 0) is None:
        options.eval_batch_size = DEFAULT_EVAL_BATCH_SIZES[kind]
    if getattr(options, "num_workers", 0) is None:
        options.num_workers = min(DEFAULT_NUM_WORKERS[kind], os.cpu_count() or 1)
