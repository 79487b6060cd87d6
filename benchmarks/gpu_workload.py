"""What the GPU benchmark runs (see ``gpu_benchmark.py``): the variants and the T4-like preset,
the model, its FLOPs and tokens, and synthetic reviews of IMDB-like lengths, made without a
tokenizer or data files.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.common import with_lora
from data import PAD_TO_MULTIPLE_OF
from machinery.data_sources import LABEL
from machinery.runtime import example_lengths, round_up

# Synthetic review lengths (see gpu_benchmark.py's docstring).
IMDB_MEDIAN_TOKENS = 233
IMDB_LOG_SIGMA = 0.65
MIN_REVIEW_TOKENS = 32
# Token ids are drawn above the special tokens and the unused ids at the start of the vocabulary.
FIRST_TOKEN_ID = 1000
# What is measured per configuration, in this order: the bare model, then train.py's loop.
KINDS = ("bare", "loop")
# LoRA training with frozen weights: activation gradients only, about one forward more.
TRAIN_FORWARDS = 2
# The T4-like preset's memory: a Colab T4 (16 GB card) shows about 15 GiB to CUDA.
T4_MEMORY_BYTES = 15 * 2**30


@dataclass(frozen=True)
class Variant:
    """One way of running the measurements (``--variants``)."""

    name: str  # as --variants spells it
    label: str  # in the tables
    precision: str | None = None  # None: --precision's choice
    t4_limits: bool = False  # the T4-like preset (``t4_limits``)
    compile: bool = False  # train.py --compile: its loop only, one configuration, once

    @property
    def cuda_only(self) -> bool:
        """fp16 autocast and the preset's switches exist on CUDA only."""
        return self.t4_limits or self.precision == "fp16"

    @property
    def kinds(self) -> tuple[str, ...]:
        """What is measured per configuration: a compiled bare model is not train.py's loop."""
        return KINDS[1:] if self.compile else KINDS


VARIANTS = {variant.name: variant for variant in (
    Variant("native", "native"),
    Variant("fp16", "fp16 + GradScaler", precision="fp16"),
    Variant("t4", "T4-like", precision="fp16", t4_limits=True),
    Variant("compile", "--compile", compile=True),
)}


# ---------------------------------------------------------------------------------------------
# The T4-like preset


def tf32_switches() -> list[tuple[str, object, str, object]]:
    """Where TF32 is switched, and the value that turns it off: (a name for the report, the
    object, its attribute, the value). torch's ``fp32_precision`` settings where this torch has
    them (cuBLAS matmuls; cuDNN convolutions, which BERT never runs), else the older
    ``allow_tf32`` flags. The saved values go back through the same settings, which makes the
    flags agree again: torch refuses to read a legacy flag that disagrees with the new setting.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if not hasattr(matmul, "fp32_precision"):
        return [("torch.backends.cuda.matmul", matmul, "allow_tf32", False),
                ("torch.backends.cudnn", cudnn, "allow_tf32", False)]
    switches = [("torch.backends.cuda.matmul", matmul, "fp32_precision", "ieee")]
    if hasattr(cudnn, "conv"):
        switches.append(("torch.backends.cudnn.conv", cudnn.conv, "fp32_precision", "ieee"))
    return switches


def sdp_switches() -> list[tuple[str, object, object]]:
    """The attention kernels a T4 lacks (both need compute capability 8.0): (name, whether on,
    switch), for flash and cuDNN SDPA where this torch has them. Memory-efficient SDPA, a T4's,
    stays on."""
    cuda = torch.backends.cuda
    kernels = (("flash", "flash_sdp_enabled", "enable_flash_sdp"),
               ("cudnn", "cudnn_sdp_enabled", "enable_cudnn_sdp"))
    return [(name, getattr(cuda, enabled), getattr(cuda, enable))
            for name, enabled, enable in kernels if hasattr(cuda, enable)]


def memory_fraction(device: torch.device) -> float:
    """The share of `device`'s memory this process may take (1.0 where torch cannot say)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return 1.0 if getter is None else getter(device)


@contextlib.contextmanager
def t4_limits(device: torch.device) -> Iterator[dict]:
    """Run the body on `device` under a Colab T4's limits, and restore every setting after it
    (an exception included): no flash or cuDNN attention, no TF32, at most
    ``T4_MEMORY_BYTES`` of memory. Yields what was set, for the report. It emulates what fits
    and which kernels run, not a T4's speed."""
    tf32, sdp = tf32_switches(), sdp_switches()
    saved_tf32 = [getattr(where, name) for _, where, name, _ in tf32]
    saved_sdp = [enabled() for _, enabled, _ in sdp]
    saved_fraction = memory_fraction(device)
    cap = min(1.0, T4_MEMORY_BYTES / torch.cuda.get_device_properties(device).total_memory)
    torch.cuda.empty_cache()  # cached blocks count against the cap
    try:
        for _, where, name, off in tf32:
            setattr(where, name, off)
        for _, _, enable in sdp:
            enable(False)
        torch.cuda.set_per_process_memory_fraction(cap, device)
        yield {"memory_fraction": cap, "memory_gib": T4_MEMORY_BYTES / 2**30,
               "sdp_off": [name for name, _, _ in sdp],
               "tf32_off": [f"{label}.{name} = {off!r}" for label, _, name, off in tf32]}
    finally:
        for (_, where, name, _), value in zip(tf32, saved_tf32, strict=True):
            setattr(where, name, value)
        for (_, _, enable), value in zip(sdp, saved_sdp, strict=True):
            enable(value)
        torch.cuda.set_per_process_memory_fraction(saved_fraction, device)


@dataclass(frozen=True)
class Shape:
    """One configuration: training batch size and max length."""

    batch: int
    length: int

    @property
    def name(self) -> str:
        """BATCHxLENGTH, as --configs spells it."""
        return f"{self.batch}x{self.length}"


# ---------------------------------------------------------------------------------------------
# The model and its FLOPs


def model_config(tiny: bool) -> BertConfig:
    """bert-base's shape (BertConfig's defaults), or a tiny one for smoke tests."""
    if tiny:
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, num_labels=2)
    return BertConfig(num_labels=2)


def new_model(config: BertConfig, device: torch.device) -> torch.nn.Module:
    """A random-weight classifier with LoRA (the project's defaults), made on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = with_lora(BertForSequenceClassification(config))
    return model.to(device)


def forward_flops_per_sequence(config: BertConfig, length: int) -> float:
    """Model FLOPs of one forward pass over one sequence (see gpu_benchmark.py's docstring)."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    matmul_weights = layers * (4 * d * d + 2 * d * ff) + d * d  # + the pooler
    return 2 * matmul_weights * length + 4 * layers * length * length * d


@dataclass(frozen=True)
class Workload:
    """What one pass over some batches computes: forward model FLOPs, rows, and tokens, both
    the padded width the model computes and the real (non-padding) ones."""

    flops: float
    rows: int
    padded_tokens: int
    real_tokens: int

    def __add__(self, other: Workload) -> Workload:
        """The two passes together."""
        return Workload(self.flops + other.flops, self.rows + other.rows,
                        self.padded_tokens + other.padded_tokens,
                        self.real_tokens + other.real_tokens)


def batch_workload(config: BertConfig, lengths: list[int], width: int) -> Workload:
    """A batch of rows with these real `lengths`, padded to `width` tokens."""
    return Workload(len(lengths) * forward_flops_per_sequence(config, width), len(lengths),
                    len(lengths) * width, sum(lengths))


def batches_workload(config: BertConfig, batches: list[dict]) -> Workload:
    """Collated batches (their attention masks tell the real tokens)."""
    return sum((batch_workload(config, batch["attention_mask"].sum(dim=1).tolist(),
                               batch["input_ids"].shape[1]) for batch in batches),
               Workload(0.0, 0, 0, 0))


def loader_workload(config: BertConfig, loader: DataLoader, dataset: Dataset) -> Workload:
    """One pass over `loader` (its epoch 0 for a training loader), from the batches' indices
    and the rows' lengths (no batch is built: a loader with worker processes builds its
    batches where this process cannot count them)."""
    lengths = example_lengths(dataset)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)  # the epoch Trainer.train() runs (it sets it again)
    total = Workload(0.0, 0, 0, 0)
    for indices in loader.batch_sampler:
        rows = [int(lengths[i]) for i in indices]
        total += batch_workload(config, rows, round_up(max(rows), PAD_TO_MULTIPLE_OF))
    return total


# ---------------------------------------------------------------------------------------------
# Synthetic data


def review_lengths(n: int, max_length: int, seed: int) -> list[int]:
    """`n` token counts drawn like IMDB reviews': log-normal, median ``IMDB_MEDIAN_TOKENS``,
    sigma ``IMDB_LOG_SIGMA``, clipped to [``MIN_REVIEW_TOKENS``, `max_length`]."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    drawn = torch.exp(math.log(IMDB_MEDIAN_TOKENS) + IMDB_LOG_SIGMA * normal).round()
    return drawn.clamp(min(MIN_REVIEW_TOKENS, max_length), max_length).long().tolist()


def synthetic_rows(config: BertConfig, n: int, max_length: int, seed: int) -> list[dict]:
    """`n` examples as train.py's tokenized data holds them: random token ids of IMDB-like
    lengths (``review_lengths``) and random 0/1 labels."""
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    ids = torch.randint(FIRST_TOKEN_ID, config.vocab_size, (n, max_length),
                        generator=generator).tolist()
    labels = torch.randint(0, 2, (n,), generator=generator).tolist()
    return [{"input_ids": row[:length], LABEL: label}
            for row, length, label in zip(ids, review_lengths(n, max_length, seed), labels,
                                          strict=True)]


@dataclass
class ConfigData:
    """The synthetic rows of one configuration, made once and kept over the repeats."""

    bare: list[dict]
    train: Dataset
    validation: Dataset
    test: Dataset


def config_data(config: BertConfig, shape: Shape, counts: dict,
                eval_batch_size: int) -> ConfigData:
    """Rows for the bare model, and train.py's training, validation and test sets (as
    `datasets.Dataset`s, the form ``make_loader`` takes)."""
    bare_rows = (counts["warmup_batches"] + counts["bare_batches"]) * shape.batch
    return ConfigData(
        bare=synthetic_rows(config, bare_rows, shape.length, seed=3),
        train=Dataset.from_list(synthetic_rows(config, counts["loop_batches"] * shape.batch,
                                               shape.length, seed=0)),
        # One evaluation batch: the end-of-epoch validation, which also warms up evaluation.
        validation=Dataset.from_list(synthetic_rows(config, eval_batch_size, shape.length,
                                                    seed=2)),
        test=Dataset.from_list(synthetic_rows(config, counts["eval_samples"], shape.length,
                                              seed=1)))
