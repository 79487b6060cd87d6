"""Where the math runs: the device, the precision and its autocast, and the torchrun process
group with the few collectives the scripts use.

``python train.py`` runs as rank 0 of 1 and every helper below then does the one-process
thing (a barrier returns at once, a mean over ranks is the value itself).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import datasets
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import ADJUSTABLE, FIXED, UsageError, add_flag, at_least

# Test-only switch: "1" makes the CPU count as computing bf16 natively, so that `--precision
# auto` picks bf16 even on an AVX2-only CPU (where bf16 is emulated, slowly). The test suite
# sets it for its tiny-model runs, so every machine proves the bf16 path.
ASSUME_NATIVE_BF16_ENV = "LORA_TEST_ASSUME_NATIVE_BF16"

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The GradScaler's scale for bf16 and fp32: the loss is not scaled (see loss_scaler).
UNSCALED = 1.0

# Evaluation keeps no activations for backward, so a GPU takes far larger batches than
# training (and needs them to be kept busy); on a CPU 64 is the measured choice (BENCHMARKS.md,
# levers).
DEFAULT_EVAL_BATCH_SIZES = {"cpu": 64, "cuda": 256}
# DataLoader worker processes by default: on a GPU they build the next batches while the GPU
# computes; on a CPU they would take cores from the math.
DEFAULT_NUM_WORKERS = {"cpu": 0, "cuda": 4}
# bf16 tensor cores arrived with Ampere (compute capability 8.0); older GPUs (V100 7.0,
# T4 7.5) emulate bf16 slowly, yet torch.cuda.is_bf16_supported() says True for them.
BF16_MIN_CAPABILITY = (8, 0)

PRECISION_HELP = (
    "autocast precision. auto: on CUDA bf16 where the GPU computes it natively (compute "
    "capability 8.0 and up: A100, H100, L4, ...), else fp16 with a GradScaler (T4, V100); on "
    "CPU bf16 only where the CPU computes it natively (AMX or AVX512-BF16), else fp32, because "
    "emulated bf16 is slower than fp32 (default: auto)")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the device/precision/evaluation-batch flags that both scripts share."""
    group = parser.add_argument_group("runtime")
    add_flag(group, ADJUSTABLE, "--device", default="auto",
             help="cpu, cuda, cuda:N, or auto (CUDA when available; default: auto)")
    add_flag(group, FIXED, "--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    add_flag(group, ADJUSTABLE, "--eval-batch-size", type=at_least(1), default=None,
             help="batch size for evaluation; no gradients are kept, so it can be larger "
                  "than the training batch (default: "
                  + ", ".join(f"{size} on {kind}" for kind, size in
                              DEFAULT_EVAL_BATCH_SIZES.items()) + ")")


def fill_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Give the flags whose default depends on the device (left None by the parser) theirs."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if getattr(args, "eval_batch_size", 0) is None:
        args.eval_batch_size = DEFAULT_EVAL_BATCH_SIZES[kind]
    if getattr(args, "num_workers", 0) is None:
        args.num_workers = min(DEFAULT_NUM_WORKERS[kind], os.cpu_count() or 1)


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
    """Resolve "auto" to bf16, fp16 or fp32 for `device` (see ``PRECISION_HELP``).

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
