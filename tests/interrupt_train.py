"""Run train.py in this process and interrupt it at a chosen point: a test harness.

    python tests/interrupt_train.py POINT -- TRAIN_FLAGS...     # under torchrun, say
    interrupt_train.run(POINT, TRAIN_FLAGS)                     # in a forked test process

POINT is one of
  kill-at-step:N       SIGKILL right after optimizer step N (between snapshots)
  kill-at-fsync:N      SIGKILL at the N-th fsync, i.e. in the middle of writing a snapshot
  kill-at-replace:N    SIGKILL before the N-th rename that publishes a snapshot
  kill-in-scoring      SIGKILL when training is over and the best adapter is being scored
  signal-at-step:N:SIG send this process signal SIG (TERM or INT) right after step N
  nan-from-step:N      every training loss after step N is NaN
  disk-full-at-save:N  the disk is full from the N-th snapshot's training state on
  disk-full-at:KIND    the disk is full when the run first writes KIND: log (log.jsonl),
                       checkpoint (the best adapter, as safetensors reports it), plots,
                       metrics (metrics.json)

A full disk is injected as the libraries report it: Python's write() and matplotlib raise an
OSError without a file name, safetensors a SafetensorError that says "os error 28".

SIGKILL cannot be caught, so the process dies exactly as a pre-empted or OOM-killed one does.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors import SafetensorError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora_model
import train
from machinery import snapshots, tracking

DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no name


def kill_self(sig: int = signal.SIGKILL) -> None:
    """Send `sig` to this process."""
    os.kill(os.getpid(), sig)


def after_step(n: int, action) -> None:
    """Call `action(trainer)` once optimizer step `n` is done."""
    original = train.Trainer.optimizer_step

    def optimizer_step(self) -> None:
        original(self)
        if self.state.step == n:
            action(self)

    train.Trainer.optimizer_step = optimizer_step


def at_call(module, name: str, n: int, counts=lambda *args: True) -> None:
    """SIGKILL this process when `module.name` is called for the n-th time (before it runs),
    counting only the calls for which `counts(*args)` is true."""
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += bool(counts(*args))
        if calls[0] == n:
            kill_self()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def nan_losses_after(n: int) -> None:
    """Make every training loss NaN once step `n` is done."""
    poisoned = [False]
    after_step(n, lambda trainer: poisoned.__setitem__(0, True))
    original = torch.nn.CrossEntropyLoss.forward

    def forward(self, logits, labels):
        loss = original(self, logits, labels)
        return loss * float("nan") if poisoned[0] else loss

    torch.nn.CrossEntropyLoss.forward = forward


def disk_full_at_save(n: int) -> None:
    """Make the disk full (ENOSPC) when the n-th snapshot writes its training state, and
    from then on for every file of a snapshot, as a disk that stays full would."""
    calls = [0]
    original = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name == snapshots.TRAINING_STATE_FILE:
            calls[0] += 1
        if calls[0] >= n and self.parent.name == snapshots.PARTIAL_SNAPSHOT_DIR:
            original(self, data[: len(data) // 2])
            raise DISK_FULL
        return original(self, data)

    Path.write_bytes = write_bytes


class FullFile:
    """A file object on a full disk: every write fails as write() fails there."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> int:
        raise DISK_FULL

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def disk_full_at(kind: str) -> None:
    """Make the disk full when the run first writes `kind` (see the module's docstring)."""
    if kind == "log":
        original_init = tracking.RunLog.__init__

        def __init__(self, *args, **kwargs) -> None:  # the log file, full from its first line
            original_init(self, *args, **kwargs)
            self.file = FullFile(self.file)

        tracking.RunLog.__init__ = __init__
    elif kind == "checkpoint":
        original_save = lora_model.save_checkpoint

        def save_checkpoint(*args, **kwargs) -> None:
            original_save(*args, **kwargs)  # its files are written, then the last one fails
            raise SafetensorError("Error while serializing: I/O error: No space left on "
                                  "device (os error 28)")

        lora_model.save_checkpoint = save_checkpoint
    elif kind == "plots":
        def savefig(self, *args, **kwargs) -> None:
            raise DISK_FULL

        Figure.savefig = savefig
    elif kind == "metrics":
        original_write_text = Path.write_text

        def write_text(self: Path, data: str, *args, **kwargs) -> int:
            if self.name == ".metrics.json.partial":
                original_write_text(self, data[: len(data) // 2])
                raise DISK_FULL
            return original_write_text(self, data, *args, **kwargs)

        Path.write_text = write_text
    else:
        raise SystemExit(f"unknown kind of write {kind!r}")


def install(point: str) -> None:
    """Set up the interruption that `point` names."""
    kind, _, value = point.partition(":")
    if kind == "kill-at-step":
        after_step(int(value), lambda trainer: kill_self())
    elif kind == "kill-at-fsync":
        at_call(snapshots, "sync_to_disk", int(value))
    elif kind == "kill-at-replace":
        # os.replace serves other libraries too: count the snapshot renames only.
        at_call(snapshots.os, "replace", int(value),
                counts=lambda source, target: Path(source).name.startswith("snapshot"))
    elif kind == "kill-in-scoring":
        at_call(lora_model, "load_checkpoint", 1)
    elif kind == "signal-at-step":
        step, sig = value.split(":")
        after_step(int(step), lambda trainer: kill_self(getattr(signal, f"SIG{sig}")))
    elif kind == "nan-from-step":
        nan_losses_after(int(value))
    elif kind == "disk-full-at-save":
        disk_full_at_save(int(value))
    elif kind == "disk-full-at":
        disk_full_at(value)
    else:
        raise SystemExit(f"unknown interruption point {point!r}")


def run(point: str, flags: list[str]) -> int:
    """train.main(flags), interrupted at `point`; its exit code, if it gets to return one.

    The interruption patches train.py's functions in this process for good: call it in a
    process of its own.
    """
    install(point)
    return train.main(flags)


if __name__ == "__main__":
    point, separator, *flags = sys.argv[1:]
    assert separator == "--", "usage: interrupt_train.py POINT -- TRAIN_FLAGS..."
    sys.exit(run(point, flags))
