"""What the GPU benchmark runs (see ``gpu_benchmark.py``): the model, its FLOPs, and synthetic
reviews of IMDB-like lengths, made without a tokenizer or data files.
"""

from __future__ import annotations

import math
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


def batch_flops(config: BertConfig, rows: int, width: int) -> float:
    """Forward FLOPs of a batch of `rows` sequences padded to `width` tokens."""
    return rows * forward_flops_per_sequence(config, width)


def loader_flops(config: BertConfig, loader: DataLoader, dataset: Dataset
                 ) -> tuple[float, int, float]:
    """Forward FLOPs of one pass over `loader` (its epoch 0 for a training loader), the rows
    and the mean padded width, from the batches' indices and the rows' lengths (no batch is
    built: a loader with worker processes builds its batches where this process cannot count
    them)."""
    lengths = example_lengths(dataset)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)  # the epoch Trainer.train() runs (it sets it again)
    flops, rows, tokens = 0.0, 0, 0
    for indices in loader.batch_sampler:
        width = round_up(int(max(lengths[i] for i in indices)), PAD_TO_MULTIPLE_OF)
        flops += batch_flops(config, len(indices), width)
        rows += len(indices)
        tokens += len(indices) * width
    return flops, rows, tokens / rows


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
