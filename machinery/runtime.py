"""Where the math runs and in what order: the device, the precision and its autocast, the
torchrun process group with the few collectives the scripts use, and the orders in which
examples are batched (training samplers that resume mid-epoch and group reviews of similar
length, the evaluation order with each rank's share of it).

``python train.py`` runs as rank 0 of 1 and every helper below then does the one-process
thing (a barrier returns at once, a mean over ranks is the value itself). Every batch order is
a function of the seed and the epoch alone, so a resumed run, and every rank of a torchrun
job, computes the same one.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from machinery.cli import UsageError

# Test-only switch: "1" makes the CPU count as computing bf16 natively, so that `--precision
# auto` picks bf16 even on an AVX2-only CPU (where bf16 is emulated, slowly). The test suite
# sets it for its tiny-model runs, so every machine proves the bf16 path.
ASSUME_NATIVE_BF16_ENV = "LORA_TEST_ASSUME_NATIVE_BF16"

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The GradScaler's scale for bf16 and fp32: the loss is not scaled (see loss_scaler).
UNSCALED = 1.0

# bf16 tensor cores arrived with Ampere (compute capability 8.0); older GPUs (V100 7.0,
# T4 7.5) emulate bf16 slowly, yet torch.cuda.is_bf16_supported() says True for them.
BF16_MIN_CAPABILITY = (8, 0)


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device, with TF32 for fp32 matrix products.

    Without set_device, ``cuda:1`` in one process would still put pinned memory, the
    capability check and any bare ``"cuda"`` tensor on GPU 0. TF32 keeps fp32's range with a
    10-bit mantissa on Ampere and newer tensor cores: several times faster fp32 matmuls, which
    PyTorch leaves off by default. Nothing to do on a CPU.
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    allow_tf32()


def allow_tf32() -> None:
    """TF32 for fp32 matrix products and convolutions, through torch's own setting: since torch
    2.9 ``fp32_precision``; the ``allow_tf32`` flags it replaces are deprecated there."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def pick_device(name: str = "auto") -> torch.device:
    """The device named, or CUDA when available for "auto"; a GPU always with its number
    ("cuda" is the current GPU, cuda:0 unless set otherwise)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r} is not a device name ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; "
                         "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         f"GPU(s), numbered from 0")
    if device.type == "cuda" and device.index is None:  # set_device needs the number
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16), or where
    the tests say to act as if it had (``ASSUME_NATIVE_BF16_ENV``)."""
    if os.environ.get(ASSUME_NATIVE_BF16_ENV) == "1":
        return True
    # Private torch helpers: a torch without them is treated as having neither.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve "auto" to bf16, fp16 or fp32 for `device` (``options.RuntimeOptions.precision``).

    An explicit bf16/fp16 that the device cannot compute natively is refused rather than
    emulated at a fraction of fp32's speed.
    """
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        bf16_ok, fp16_ok = tuple(capability) >= BF16_MIN_CAPABILITY, True
    else:
        bf16_ok, fp16_ok = cpu_has_native_bf16(), False
    if precision == "auto":
        return "bf16" if bf16_ok else ("fp16" if fp16_ok else "fp32")
    if precision == "bf16" and not bf16_ok:
        where = (f"this GPU (compute capability {capability[0]}.{capability[1]}; bf16 needs "
                 f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]} or newer)"
                 if device.type == "cuda" else "this CPU (it has neither AMX nor AVX512-BF16)")
        raise UsageError(f"--precision bf16 is not supported natively on {where}; use "
                         f"--precision {'fp16' if fp16_ok else 'fp32'} or auto")
    if precision == "fp16" and not fp16_ok:
        raise UsageError(f"--precision fp16 needs a CUDA GPU; on {device.type} use fp32 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16; a no-op context for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def cast_frozen_weights(model: torch.nn.Module, precision: str) -> int:
    """Store the frozen weights of `model`'s linear layers in the autocast dtype, once; return
    how many parameters were cast (none for fp32).

    Autocast runs every linear layer in bf16/fp16 and casts its fp32 weight for it in every
    forward; a frozen weight is never cached, so that is ~85M weights of bert-base cast again
    per step, and kept twice in memory. Cast once, the layer computes exactly the same numbers.
    Only linear layers whose weights are all frozen are cast: trainable weights (LoRA's A and
    B, the classifier head, every weight with --method full) stay fp32 for the optimizer, and
    the embeddings and LayerNorms, which autocast runs in fp32, keep their fp32 weights.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return 0
    cast = 0
    for module in model.modules():
        weights = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear) and not any(p.requires_grad for p in weights):
            module.to(dtype)
            cast += sum(p.numel() for p in weights)
    return cast


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The GradScaler: fp16's loss scaling, and for every precision the skip of a step whose
    gradients hold inf/NaN, decided on the device.

    fp16 gradients underflow without loss scaling, so fp16 gets the dynamic scale (halved after
    an overflow, doubled after 2000 clean steps). bf16 has fp32's range and needs no scaling:
    bf16 and fp32 start at a scale of exactly 1 (UNSCALED), kept there by the training step's
    ``update(UNSCALED)``, and use the scaler only for its inf/NaN check, which tells the fused
    AdamW to leave the weights alone without the host waiting for the answer.
    """
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=UNSCALED)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)


def is_distributed() -> bool:
    """True in a process that torchrun started and that joined a group of two or more."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the one process that prints, shows progress and writes files."""
    return not is_distributed() or dist.get_rank() == 0


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when torchrun started us; return (rank, world size, device).

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address for every process it
    starts; a plain ``python train.py`` sets none and runs as rank 0 of 1 on `device_name`.
    Under torchrun a CUDA device means this machine's GPU number LOCAL_RANK, one per process.
    """
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        use_device(device)
        return 0, 1, device
    local_rank = os.environ.get("LOCAL_RANK", "")
    if not local_rank.isdigit():
        raise UsageError("RANK is set but LOCAL_RANK is not a process number: start several "
                         "processes with torchrun, which sets both (see docs/distributed.md)")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if int(local_rank) >= gpus:
            raise UsageError(f"LOCAL_RANK is {local_rank} but this machine has {gpus} GPU(s): "
                             f"start at most {gpus} processes per machine "
                             f"(torchrun --nproc_per_node={gpus})")
        device = torch.device("cuda", int(local_rank))
    use_device(device)
    # NCCL moves CUDA tensors between GPUs directly; gloo is PyTorch's CPU backend.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    if dist.get_rank() != 0:
        datasets.disable_progress_bars()  # loading and tokenizing: rank 0 shows the bars
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all_ranks() -> None:
    """A barrier: return once every rank has got here (at once in one process)."""
    if dist.is_initialized():
        dist.barrier()


def from_main_process(value: object) -> object:
    """Rank 0's `value`, on every rank (`value` itself in one process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks; every rank must call this at the same point."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / dist.get_world_size()


def gradient_sync(ddp_model: DistributedDataParallel | None,
                  sync: bool) -> contextlib.AbstractContextManager:
    """Under DDP with `sync` False, a context in which backward skips the all-reduce.

    The micro-steps before the last of an accumulation group only add to the local gradients;
    averaging them across ranks once, in the last backward, gives the same sum for a fraction
    of the traffic. In one process (`ddp_model` None), or with `sync`, it does nothing.
    """
    if sync or ddp_model is None:
        return contextlib.nullcontext()
    return ddp_model.no_sync()


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor that is True when `flag` is True on every rank (`flag` in one process)."""
    if not is_distributed():
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def gather_to_main(value: object) -> list:
    """Every rank's `value`, in rank order ([value] in one process)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def print_main(*values: object, file=None) -> None:
    """print() on rank 0 only, so that a torchrun job prints each line once."""
    if is_main_process():
        print(*values, file=file)


# ---------------------------------------------------------------------------------------------
# Batch orders
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
