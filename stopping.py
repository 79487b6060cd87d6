"""Stopping a run before its end, cleanly: on SIGINT (Ctrl-C) or SIGTERM (pre-emption, ``kill``)
the loop finishes its optimizer step, writes a snapshot and exits; a loss that stays inf/NaN
ends it too.

Both are watched without a host sync in the step: the device counts inf/NaN steps, and under
torchrun the ranks agree on a signal (one collective) only at the steps where the loop already
waits for the device (log, validation and save steps).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from runtime import all_ranks_true, is_distributed, is_main_process

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A loss that is inf/NaN this many optimizer steps in a row stops the run (one such step is
# skipped and forgotten: fp16 overflow, one bad batch).
MAX_NONFINITE_STEPS = 5


class TrainingStopped(Exception):
    """The run stopped before the end on purpose (a signal, a diverged loss); exits with
    `exit_code` after saying why and what to do."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While entered, SIGINT and SIGTERM ask the loop to stop after the current optimizer step
    (``requested``); a second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signum = 0  # the signal that asked to stop; 0 while none did
        self.previous_handlers: dict = {}

    def __enter__(self) -> StopSignals:
        self.previous_handlers = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        """The signal handler: remember the request (the loop looks at it after each step)."""
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main_process():
            tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a "
                       "snapshot (Ctrl-C again to stop at once, without one)")

    def requested(self, agree: bool) -> int:
        """The signal that asked to stop (0 if none).

        Under DDP the ranks agree on it (a collective and a host sync) only where `agree` is
        True: at log, validation and save steps and at the end of an epoch. One process reads
        its own flag at every step, for free.
        """
        if not is_distributed():
            return self.signum
        if not agree:
            return 0
        flag = torch.tensor(self.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stopped_by(signum: int, step: int, snapshot: str) -> TrainingStopped:
    """The exception that ends a run stopped by `signum`: exit code 128 + signal, as shells do."""
    return TrainingStopped(
        f"stopped by {signal.Signals(signum).name} at step {step}; the snapshot is in "
        f"{snapshot}. Resume by running the same command again (or add --resume)",
        exit_code=128 + signum)


class NonfiniteSteps:
    """Counted on the device, where adding costs no host sync: the optimizer steps the
    GradScaler skipped (inf/NaN gradients) and the optimizer steps in a row whose loss was
    inf/NaN. The host reads them (``read``) at log, validation and save steps."""

    def __init__(self, device: torch.device):
        self.group_loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # since the last read
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)  # since the last read

    def add_loss(self, loss: torch.Tensor) -> None:
        """Note one batch's loss of the accumulation group in progress."""
        self.group_loss_finite &= torch.isfinite(loss.detach())

    def count_step(self, grad_norm: torch.Tensor) -> None:
        """Count the optimizer step just queued: skipped when its gradient norm is not finite
        (what the scaler found), and whether its loss was finite on every rank."""
        self.skipped += ~torch.isfinite(grad_norm)
        loss_finite = all_ranks_true(self.group_loss_finite)
        self.in_a_row = torch.where(loss_finite, 0, self.in_a_row + 1)
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        self.group_loss_finite.fill_(True)

    def read(self) -> tuple[int, int, int]:
        """(skipped steps, inf/NaN-loss steps in a row now, the longest such run) since the
        last read: one host sync."""
        skipped, in_a_row, longest = torch.stack(
            [self.skipped, self.in_a_row, self.longest]).tolist()
        self.skipped.zero_()
        self.longest.fill_(in_a_row)
        return skipped, in_a_row, longest

    def restore(self, in_a_row: int) -> None:
        """Continue a resumed run's count of inf/NaN-loss steps in a row."""
        self.in_a_row.fill_(in_a_row)
        self.longest.fill_(in_a_row)


def diverged(longest: int, step: int, snapshot: str | None) -> TrainingStopped:
    """The exception that ends a run whose loss stayed inf/NaN for `longest` steps in a row;
    `snapshot` names the last snapshot, which is kept (None: none was written)."""
    where = f"{snapshot} is kept" if snapshot else "no snapshot was written yet"
    return TrainingStopped(
        f"the training loss was inf/NaN for {longest} steps in a row (up to step {step}); "
        f"stopped: {where}. Lower --lr or --max-grad-norm, or use --precision fp32",
        exit_code=1)
