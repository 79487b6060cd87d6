"""The data path: carve a validation split, tokenize once, batch.

The reviews come from ``machinery.data_sources.load_split`` (the Hub's ``imdb``, an
``aclImdb`` folder or a folder of Parquet/CSV/JSON Lines files), each split with exactly two
columns, ``text`` and ``label`` (a class id: for IMDB 0 = negative, 1 = positive). Here they
are cut into subsets, tokenized (cached by ``datasets``) and batched by a ``DataLoader`` whose
collate pads each batch to its longest review, rounded up to a multiple of 8.

Subset rule (applied identically by ``train.py`` and ``evaluate.py``, so both score the same
test reviews): ``split.shuffle(seed=data_seed).select(range(n))``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import typing
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from pyarrow.lib import ArrowException
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from machinery.checkpoints import PREPROCESSING_FILE
from machinery.cli import DISK_FULL_ERRORS, UsageError
from machinery.data_sources import LABEL, TEXT, class_counts, rereading
from machinery.files import read_json, writing
from machinery.options import Truncation
from machinery.runtime import (
    LengthGroupedSampler,
    ResumableSampler,
    evaluation_shard,
    example_lengths,
    longest_first,
    round_up,
)

# The tokenizers library's switch for its threads, read when a process forks.
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"
# Tensor Cores and vectorised CPU kernels prefer sequence lengths that are multiples of 8.
PAD_TO_MULTIPLE_OF = 8
# Tokenizers without a known limit report a huge sentinel as model_max_length.
MAX_SANE_LENGTH = 100_000
# Bump when tokenize() changes what it writes, so stale caches are not reused.
TOKENIZE_CACHE_VERSION = "3"
# Which tokens of a review longer than --max-length are kept. "head" (the first ones) is the
# usual default; IMDB reviewers often give their verdict at the end, and Sun et al. (2019,
# "How to Fine-Tune BERT for Text Classification?") found the head and the tail together best.
TRUNCATION_MODES = typing.get_args(Truncation)  # head, tail, head+tail
# How reviews are tokenized unless a flag or a checkpoint says otherwise: train.py's recipe
# starts from these, evaluate.py --base alone scores with them, and every checkpoint saved
# before preprocessing.json was written was trained with them.
DEFAULT_TRUNCATION = "head"
DEFAULT_MAX_LENGTH = 128
# Sun et al. kept the first 128 and the last 382 of 510 tokens; head+tail keeps this share of
# the review tokens from the head at every --max-length (at 128: 32 head + 94 tail).
HEAD_SHARE = 128 / 510
# tokenize() reads at most this many characters per token of --max-length of each review
# (see clip_review). IMDB averages 4.3 characters per WordPiece token; with 6, none of 3,000
# training reviews came out short (a short one is tokenized again in full) and tokenizing at
# length 128 took half the time.
CHARS_PER_TOKEN = 6
# Pre-tokenizers that split only at whitespace and punctuation, so that the tokens of a text
# cut at a space are exactly the first tokens of the whole text.
CLIPPABLE_PRE_TOKENIZERS = frozenset({"BertPreTokenizer"})


# ---------------------------------------------------------------------------------------------
# Loading


def hash_reviews(*splits: Dataset) -> str:
    """A hash of the splits' reviews and labels, row by row, and their class names: the same
    only for the same texts, labels and order, wherever and whenever they were read. A resumed
    run compares it with its snapshot's (``check_same_reviews``).

    It hashes the Arrow data of the two columns (~0.2 s for 25,000 reviews), not Python lists
    (~1 s to build), without the schema's metadata: that holds the `datasets` cache key, which
    changes with the files' modification times.
    """
    return Hasher.hash([(split.features[LABEL].names, split.with_format("arrow")[:]
                         .select([TEXT, LABEL]).combine_chunks().replace_schema_metadata(None))
                        for split in splits])


# ---------------------------------------------------------------------------------------------
# Subsets and the validation split


def take_subset(split: Dataset, n: int | None, seed: int, flag: str = "--eval-samples"
                ) -> Dataset:
    """The documented subset rule: ``split.shuffle(seed=seed).select(range(n))``; None = all."""
    if n is None:
        return split
    if not 0 < n <= len(split):
        raise UsageError(f"{flag} {n} asks for more reviews than the {len(split)} available; "
                         f"choose a number from 1 to {len(split)}")
    # The indices in memory (8 bytes a review): no cache file on disk that a crash can damage.
    return split.shuffle(seed=seed, keep_in_memory=True).select(range(n), keep_in_memory=True)


def validation_count(validation_size: float, n_train: int, n_classes: int = 2) -> int:
    """Validation examples for `n_train` training examples: a fraction (<1) or a count (>=1).

    At least `n_classes`, one of each class, which the stratified split needs.
    """
    if validation_size >= 1:
        if not float(validation_size).is_integer():
            raise UsageError(f"--validation-size {validation_size:g} is neither a fraction "
                             "below 1 nor a whole count")
        if validation_size < n_classes:
            raise UsageError(f"--validation-size {validation_size:g}: the stratified split needs "
                             f"at least {n_classes} validation reviews, one of each class")
        return int(validation_size)
    return max(n_classes, round(validation_size * n_train))


def check_class_sizes(train: Dataset, min_examples: int) -> None:
    """Refuse a class with fewer than `min_examples` training reviews, naming every class's
    count: a typo in a label ("postive") makes a class of its own, which would train silently."""
    counts = class_counts(train)
    rare = {name: n for name, n in counts.items() if 0 < n < min_examples}  # 0: refused later
    if rare:
        held = ", ".join(f"{name} {n:,}" for name, n in counts.items())
        has = "has" if len(rare) == 1 else "have"
        raise UsageError(
            f"the training data holds {held} reviews: {', '.join(rare)} {has} fewer than "
            f"{min_examples}, which is most often a typo in a label; fix the labels, or pass "
            f"--min-class-examples {min(rare.values())} to train on it")


def split_train_validation(train: Dataset, n_train: int | None, validation_size: float,
                           seed: int) -> tuple[Dataset, Dataset]:
    """Carve a stratified, seeded validation split out of the training split.

    The validation examples are removed first; the training subset (``n_train`` examples, or
    all that remain) is then drawn from the rest with the subset rule. Training therefore sees
    exactly ``n_train`` reviews and never a validation review; the test split is not touched.
    """
    names = train.features[LABEL].names
    counts = Counter(train[LABEL])
    if min(counts[k] for k in range(len(names))) < 2:
        held = ", ".join(f"{counts[k]} {name}" for k, name in enumerate(names))
        raise UsageError(
            f"the training data holds {held} reviews; the stratified validation split and "
            "training need at least 2 of each class")
    n_val = validation_count(validation_size, len(train) if n_train is None else n_train,
                             len(names))
    if n_train is not None and n_train + n_val > len(train):
        room = f"choose at most {len(train) - n_val}" if n_val < len(train) else \
            "lower --validation-size"
        raise UsageError(f"--train-samples {n_train} plus {n_val} validation reviews exceed "
                         f"the {len(train)} training reviews; {room}")
    if n_val > len(train) - len(names):
        raise UsageError(f"the validation split ({n_val}) would leave fewer than {len(names)} "
                         f"of the {len(train)} training reviews for training (one of each "
                         "class); lower --validation-size")
    # Its indices cache (datasets cannot keep them in memory here) is read again if damaged.
    parts = rereading(f"the split of {len(train)} training reviews", lambda fresh: (
        train.train_test_split(test_size=n_val, stratify_by_column=LABEL, seed=seed,
                               load_from_cache_file=not fresh)))
    rest, validation = parts["train"], parts["test"]
    subset = take_subset(rest, n_train, seed, flag="--train-samples")
    missing = [name for k, name in enumerate(names) if k not in set(subset[LABEL])]
    if missing:
        raise UsageError(f"the {len(subset)} training reviews drawn hold no "
                         f"{', '.join(missing)} review; raise --train-samples or change "
                         "--data-seed")
    return subset, validation


# ---------------------------------------------------------------------------------------------
# Tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokens: vocabulary, normalizer, special tokens.

    The truncation/padding state of a fast tokenizer changes as it is used, so it is cleared
    (in a copy); otherwise the cache key would differ between two identical runs. Hashing the
    copy's JSON text takes ~0.07 s for a BERT vocabulary, about half of re-serialising the
    parsed JSON in Python.
    """
    state = copy.deepcopy(tokenizer.backend_tokenizer)
    state.no_truncation()
    state.no_padding()
    return Hasher.hash(state.to_str())


def can_clip(tokenizer) -> bool:
    """True where cutting a review at a space leaves the tokens before the cut unchanged."""
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre_tokenizer.get("type") in CLIPPABLE_PRE_TOKENIZERS


def clip_review(text: str, max_length: int) -> str:
    """The start of `text` that can hold `max_length` tokens, cut at a space (else `text`).

    For a tokenizer that ``can_clip``, a clip that still yields `max_length` tokens yields
    exactly the first `max_length` tokens of the whole review.
    """
    limit = CHARS_PER_TOKEN * max_length
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut] if cut > 0 else text


def head_tail_split(max_length: int, truncation: str) -> tuple[int, int]:
    """(tokens kept from the head, tokens kept from the tail) of a review longer than allowed.

    Both count review tokens only: together they are `max_length` - 2, the room left beside
    [CLS] and [SEP]. head+tail at 128: (32, 94); at 256: (64, 190); at 512: (128, 382).
    """
    room = max_length - 2
    head = {"head": room, "tail": 0, "head+tail": round(room * HEAD_SHARE)}[truncation]
    return head, room - head


def truncate_ids(ids: list[int], max_length: int, truncation: str) -> list[int]:
    """Cut one review's token ids ([CLS] review [SEP]) to `max_length` the `truncation` way.

    A review that fits is returned unchanged in every mode. Every BERT-style tokenizer wraps a
    single text as one special token, the text, one special token ([CLS] ... [SEP] for BERT,
    <s> ... </s> for RoBERTa), and those two are always kept.
    """
    if len(ids) <= max_length:
        return ids
    head, tail = head_tail_split(max_length, truncation)
    body = ids[1:-1]
    return [ids[0], *body[:head], *body[len(body) - tail:], ids[-1]]


def describe_truncation(max_length: int, truncation: str) -> str:
    """'the first 32 and the last 94 tokens': what is read of a review longer than allowed."""
    head, tail = head_tail_split(max_length, truncation)
    parts = ([f"the first {head}"] if head else []) + ([f"the last {tail}"] if tail else [])
    return " and ".join(parts) + " tokens"


def tokenize(split: Dataset, tokenizer, max_length: int,
             truncation: str = DEFAULT_TRUNCATION) -> Dataset:
    """Tokenize with the fast tokenizer, truncated to `max_length`, unpadded, cached on disk.

    Each review is tokenized and then cut with ``truncate_ids``. With ``head`` and a WordPiece
    tokenizer (``can_clip``) only the review's start is tokenized (``clip_review``), with
    identical ids; ``tail`` and ``head+tail`` tokenize the whole review (the fast tokenizer
    tokenizes the whole text before truncating anyway, so keeping the tail costs no more).
    The cache key is the data's fingerprint, the tokenizer's, `max_length` and `truncation`,
    so a second run over the same data with the same settings reads the token ids back.
    """
    limit = tokenizer.model_max_length
    if limit < MAX_SANE_LENGTH and max_length > limit:
        raise UsageError(f"--max-length {max_length} is above the model's limit of {limit} "
                         "tokens; choose at most that")
    fingerprint = Hasher.hash([split._fingerprint, tokenizer_fingerprint(tokenizer),
                               max_length, truncation, TOKENIZE_CACHE_VERSION])
    clip = truncation == "head" and can_clip(tokenizer)

    def encode_texts(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]

    def encode(batch: dict) -> dict:
        texts = batch[TEXT]
        if clip:
            # Tokenizing a whole 300-token review to keep its first 128 wastes most of the
            # work: tokenize only its start, and redo in full any clip that came out short.
            clipped = [clip_review(text, max_length) for text in texts]
            input_ids = encode_texts(clipped)
            redo = [i for i, ids in enumerate(input_ids)
                    if len(ids) < max_length and len(clipped[i]) < len(texts[i])]
            for i, ids in zip(redo, encode_texts([texts[i] for i in redo]) if redo else [],
                              strict=True):
                input_ids[i] = ids
        else:
            input_ids = encode_texts(texts)
        return {"input_ids": [truncate_ids(ids, max_length, truncation) for ids in input_ids]}

    def tokenize_all(load_from_cache_file: bool) -> Dataset:
        return split.map(encode, batched=True, remove_columns=[TEXT], new_fingerprint=fingerprint,
                         load_from_cache_file=load_from_cache_file,
                         desc=f"Tokenizing (max length {max_length}, {truncation})")

    cache = Path(split.cache_files[0]["filename"]).parent if split.cache_files else Path(".")
    with writing(cache):  # a full disk names the cache folder
        try:
            return tokenize_all(load_from_cache_file=True)
        except (OSError, ArrowException) as error:
            if getattr(error, "errno", None) in DISK_FULL_ERRORS:
                raise  # not a damaged cache: no space to write it
            # A cache file cut short (a crash or a full disk while it was written) is never
            # read: tokenize again, which writes the cache file anew.
            print(f"warning: the tokenization cache could not be read ({error}); tokenizing "
                  "again", file=sys.stderr)
            return tokenize_all(load_from_cache_file=False)


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's reviews were tokenized; saved beside its weights (PREPROCESSING_FILE)."""

    truncation: str = DEFAULT_TRUNCATION
    max_length: int = DEFAULT_MAX_LENGTH

    def save(self, folder: Path) -> None:
        """Write PREPROCESSING_FILE into `folder`."""
        (Path(folder) / PREPROCESSING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def recorded_in(cls, folder: Path) -> Preprocessing | None:
        """The settings saved in `folder`; None for a checkpoint saved before they were."""
        path = Path(folder) / PREPROCESSING_FILE
        if not path.is_file():
            return None
        recorded = read_json(path, "restore the checkpoint folder or train again")
        try:
            return cls(recorded["truncation"], int(recorded["max_length"]))
        except (TypeError, KeyError, ValueError) as error:
            raise UsageError(f"{path} is damaged ({error!r}); restore the checkpoint folder or "
                             "train again") from error


def resolve_preprocessing(recorded: Preprocessing | None, truncation: str | None,
                          max_length: int | None, checkpoint: str | None) -> Preprocessing:
    """The settings to score `checkpoint` with: the flags given, else the recorded ones.

    A checkpoint without a record (saved before records existed) was trained with the
    defaults. A flag that differs from the record is obeyed, since scoring at another length
    or cut is a fair experiment, but never silently: a warning on stderr names both values
    (unless `checkpoint` is None: the record then only supplies defaults, as for --base).
    """
    trained = recorded or Preprocessing()
    chosen = Preprocessing(truncation or trained.truncation, max_length or trained.max_length)
    for flag, used, was in (("--truncation", chosen.truncation, trained.truncation),
                            ("--max-length", chosen.max_length, trained.max_length)):
        if used != was and recorded is not None and checkpoint is not None:
            print(f"warning: {checkpoint} was trained with {flag} {was}; scoring it with "
                  f"{flag} {used} as asked", file=sys.stderr)
    return chosen


# ---------------------------------------------------------------------------------------------
# Batching


def move_to_device(batch: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to `device`; to CUDA through pinned memory so the copy can overlap compute.

    Tensors already on the GPU are returned as they are, so calling this twice costs nothing,
    and a batch that a DataLoader already pinned (``pin_memory=True``) is not copied twice.
    (Compare device types, not devices: a tensor on "cuda:0" is not equal to "cuda".)
    """
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v if v.device.type == "cuda"
            else (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
            for k, v in batch.items()}


@dataclass
class PaddingCollator:
    """Pad a list of tokenized examples to the batch's longest (rounded up to a multiple of 8).

    In the main process (``--num-workers 0``) the batch is delivered on `device`. Worker
    processes must not touch CUDA (a forked CUDA context breaks), so there the batch stays on
    the CPU and the training loop's own ``move_to_device`` finishes the copy.
    """

    pad_token_id: int
    device: torch.device

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Return ``input_ids``, ``attention_mask`` (int64, shape batch x width) and ``labels``."""
        lengths = [len(example["input_ids"]) for example in examples]
        width = round_up(max(lengths), PAD_TO_MULTIPLE_OF)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([example[LABEL] for example in examples])}
        if get_worker_info() is not None:
            return batch
        return move_to_device(batch, self.device)


def make_loader(dataset: Dataset, batch_size: int, collator: PaddingCollator, *,
                shuffle: bool, seed: int = 0, num_workers: int = 0, rank: int = 0,
                world_size: int = 1, group_by_length: bool = False) -> DataLoader:
    """A DataLoader over this rank's share of the tokenized examples (all of them in one process).

    shuffle=True (training): epoch e is the permutation drawn from ``seed + e`` (call
    ``loader.sampler.set_epoch(e)``), and rank r takes its positions r, r + world_size, ...
    (``DistributedSampler``). The ranks' i-th batches together are therefore the i-th batch of
    one process with batch_size x world_size. To even out the ranks it repeats up to
    world_size - 1 examples when their count is not a multiple of world_size.
    With group_by_length the batches hold reviews of similar length (``LengthGroupedSampler``),
    with the same guarantees. ``loader.sampler.start_at(n)`` makes the next pass resume after
    this rank's first n.
    shuffle=False (evaluation): the examples longest first, so that each batch is padded little,
    rank r scoring the whole batches that ``evaluation_shard`` gives it; ``loader.sampler``
    lists their dataset positions in the order scored (``gather_in_order`` restores dataset
    order from them).
    """
    if shuffle and group_by_length:
        sampler = ResumableSampler(LengthGroupedSampler(
            example_lengths(dataset), batch_size, seed, rank, world_size))
    elif shuffle:
        sampler = ResumableSampler(DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed))
    else:
        sampler = evaluation_shard(len(dataset), batch_size, rank, world_size,
                                   order=longest_first(example_lengths(dataset)))
    if num_workers > 0:
        # The fast tokenizer's threads have run (tokenize): without this, every worker forked
        # below prints the tokenizers library's warning about parallelism before a fork.
        os.environ.setdefault(TOKENIZERS_PARALLELISM, "false")
    # Each pass over a DataLoader draws a worker seed (0 workers too). From a generator of the
    # loader's own it leaves the global stream, the dropout masks', alone: they stay the same
    # with or without --eval-every, workers or persistent workers, and after a resume.
    generator = torch.Generator().manual_seed(seed)
    # Workers stay alive from one pass to the next (every epoch, every validation) instead of
    # starting again; their batches come pinned, ready for an asynchronous copy to the GPU.
    return DataLoader(
        dataset.with_format(columns=["input_ids", LABEL]), batch_size=batch_size,
        sampler=sampler, generator=generator, collate_fn=collator, num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=collator.device.type == "cuda" and num_workers > 0)
