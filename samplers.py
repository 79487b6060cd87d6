"""The orders in which examples are batched: training samplers that can resume mid-epoch and
group reviews of similar length, and the evaluation order (longest first) with each rank's
share of it under torchrun.

Every order is a function of the seed and the epoch alone, so a resumed run, and every rank
of a torchrun job, computes the same one.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch.utils.data import Sampler

# Length-grouped training batches are formed inside windows of this many global batches of
# the epoch's random permutation: wide enough that similar lengths meet (HF Trainer's
# group_by_length uses 50 too), narrow enough that every window is a random draw of reviews.
LENGTH_GROUP_BATCHES = 50


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def example_lengths(dataset: Dataset) -> np.ndarray:
    """Token count of every tokenized example, in dataset order (read from Arrow, no copy)."""
    column = dataset.with_format("arrow")["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def longest_first(lengths: np.ndarray) -> np.ndarray:
    """Positions ordered by length, longest first; equal lengths keep dataset order.

    Batches of similar lengths waste little padding. Longest first also means the largest
    batch (the peak memory) comes first, so a batch size that does not fit fails at once.
    """
    return np.argsort(-np.asarray(lengths), kind="stable")


def evaluation_shard(n_examples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     order: np.ndarray | None = None) -> list[int]:
    """Positions of the examples rank `rank` scores: whole batches rank, rank + world_size, ...

    The batches are consecutive runs of `order` (dataset positions; default: dataset order).
    Handing out whole batches (not every world_size-th example) keeps each batch, and so its
    padding width, exactly the one a single process builds: every logit comes out bit for bit
    the same, and no example is repeated to even out the ranks (a rank may get one batch less,
    or none).
    """
    n_batches = -(-n_examples // batch_size)
    shard = [position for batch in range(rank, n_batches, world_size)
             for position in range(batch * batch_size, min((batch + 1) * batch_size, n_examples))]
    return shard if order is None else [int(order[position]) for position in shard]


class LengthGroupedSampler(Sampler[int]):
    """Training order with batches of similar length, still a fresh random draw every epoch.

    Epoch e starts from the permutation drawn from ``seed + e`` (call ``set_epoch(e)``), cut
    into windows of ``LENGTH_GROUP_BATCHES`` global batches (batch_size x world_size reviews);
    each window is sorted by length and cut into global batches, and the order of the full
    global batches is shuffled (a short last one stays last, so every rank's batches line up).
    Rank r takes positions r, r + world_size, ... of each global batch, as
    ``DistributedSampler`` does, so the ranks' i-th batches together are the i-th batch of one
    process with batch_size x world_size; to even out the ranks it repeats up to
    world_size - 1 reviews. It yields single positions, so a wrapper can skip the first k.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.lengths = np.asarray(lengths)
        self.global_batch = batch_size * world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.total = round_up(len(self.lengths), world_size)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`'s order next (the same on every rank)."""
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """The epoch's positions for all ranks together, global batch after global batch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order += order[:self.total - len(order)]  # repeat a few so the ranks come out even
        window = self.global_batch * LENGTH_GROUP_BATCHES
        batches = []
        for start in range(0, len(order), window):
            group = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [group[i:i + self.global_batch]
                        for i in range(0, len(group), self.global_batch)]
        full = [batch for batch in batches if len(batch) == self.global_batch]
        short = [batch for batch in batches if len(batch) < self.global_batch]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [position for batch in shuffled + short for position in batch]

    def __iter__(self):
        """This rank's positions: its share of each global batch, in order."""
        order = self.global_order()
        for start in range(0, len(order), self.global_batch):
            yield from order[start:start + self.global_batch][self.rank::self.world_size]

    def __len__(self) -> int:
        """Positions this rank yields per epoch."""
        return self.total // self.world_size


class ResumableSampler(Sampler[int]):
    """A training sampler whose next pass can start part-way through the epoch's order.

    ``start_at(n)`` makes the next pass skip the first n indices, so a resumed run continues
    mid-epoch with exactly the batches an uninterrupted run would see next, without loading
    or computing the consumed ones. The wrapped sampler must give the same order for the same
    epoch (``DistributedSampler`` and ``LengthGroupedSampler`` do: their order comes from
    ``seed + epoch`` alone).
    ``len()`` stays the full epoch's count, so ``len(loader)`` is always the epoch's batches.
    """

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next pass follows."""
        self.sampler.set_epoch(epoch)

    def start_at(self, n: int) -> None:
        """Skip the first `n` indices of the next pass (this pass only)."""
        self.skip = n

    def epoch_order(self) -> list[int]:
        """This rank's whole order for the current epoch (what a pass from the start yields)."""
        return list(self.sampler)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)
