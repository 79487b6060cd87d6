"""Stopping a run before its end and continuing it exactly where it stopped.

Stopping, cleanly: on SIGINT (Ctrl-C) or SIGTERM (pre-emption, ``kill``) the loop finishes its
optimizer step, writes a snapshot and exits; a loss that stays inf/NaN ends it too. Both are
watched without a host sync in the step: the device counts inf/NaN steps, and under torchrun
the ranks agree on a signal (one collective) only at the steps where the loop already waits
for the device (log, validation and save steps).

Snapshots: a snapshot is a folder of files (the trained weights, the optimizer/scheduler/scaler
and random-number states, the position in the data) with a manifest of their sizes and SHA-256
hashes written last. It is written whole into a new folder and renamed into place, so a kill at
any instant leaves at least one complete snapshot; a damaged one is found by its manifest and
the previous one is used instead. train.py's Trainer decides when; ``save_snapshot`` and
``restore_snapshot`` say what goes in and comes back.

(A *checkpoint*, in this project, is the best model a run keeps, what ``--checkpoint`` takes;
a snapshot is only for resuming, and a finished run deletes it.)
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from tqdm.auto import tqdm

from machinery.cli import UsageError
from machinery.files import (
    MANIFEST_FILE,
    manifest_problem,
    missing_manifest,
    sync_to_disk,
    write_manifest,
    writing,
)
from machinery.runtime import (
    all_ranks_true,
    from_main_process,
    gather_to_main,
    is_distributed,
    is_main_process,
    print_main,
    wait_for_all_ranks,
)

# SNAPSHOT_DIR is the latest snapshot, PREVIOUS_SNAPSHOT_DIR the one before it; a new one is
# written into PARTIAL_SNAPSHOT_DIR and renamed into place when complete.
SNAPSHOT_DIR = "snapshot"
PREVIOUS_SNAPSHOT_DIR = "snapshot-previous"
PARTIAL_SNAPSHOT_DIR = "snapshot-partial"
# The same folders as runs written before the rename to "snapshot" called them: their files are
# the same, so such a run resumes from them (older than any snapshot/ beside them).
OLD_SNAPSHOT_DIRS = ("checkpoint", "checkpoint-previous")
OLD_PARTIAL_SNAPSHOT_DIR = "checkpoint-partial"
# Every folder a snapshot may occupy, newest first (what a finished run deletes).
SNAPSHOT_DIRS = (SNAPSHOT_DIR, PREVIOUS_SNAPSHOT_DIR, *OLD_SNAPSHOT_DIRS)
ALL_SNAPSHOT_DIRS = (*SNAPSHOT_DIRS, PARTIAL_SNAPSHOT_DIR, OLD_PARTIAL_SNAPSHOT_DIR)
TRAINABLE_FILE = "trainable.safetensors"  # the weights being trained (LoRA A/B + head, ...)
TRAINING_STATE_FILE = "training_state.pt"  # optimizer, scheduler, scaler, RNG, data order
PROGRESS_FILE = "progress.json"  # the LoopState (position, best score, ...) and the settings


@dataclass
class LoopState:
    """Where the training loop is and what it has seen so far: everything a snapshot's
    progress.json holds besides the settings, written and read back as one object."""

    step: int = 0  # optimizer steps (skipped ones, with a non-finite gradient, count too)
    epoch: int = 0  # where in the data the next batch comes from: the epoch ...
    batches_done: int = 0  # ... and the batches of it already trained
    best_score: float | None = None  # the best validation score so far; None: no validation yet
    before: dict | None = None  # the pre-trained model's test metrics
    # A hash of the training, validation and test reviews and labels (data.hash_reviews);
    # None in snapshots written before it was kept.
    reviews_hash: str | None = None
    train_seconds: float = 0.0  # time spent training, not validating or saving
    window_loss: float = 0.0  # the loss summed since the last log line ...
    window_batches: int = 0  # ... over this many batches
    nonfinite_steps: int = 0  # consecutive optimizer steps with an inf/NaN loss
    log_bytes: int = 0  # the length of log.jsonl that belongs to the steps done so far


def snapshot_problem(folder: Path) -> str | None:
    """Why the snapshot in `folder` cannot be trusted, or None when its files match the
    manifest (names, sizes and SHA-256 hashes)."""
    problem = manifest_problem(folder)
    if problem == missing_manifest(folder):
        return f"{problem}, so its save did not finish"
    return problem


def find_snapshot(run_folder: Path) -> Path | None:
    """The newest valid snapshot in `run_folder`; None if the run never wrote one.

    A damaged latest snapshot falls back to the previous one with a warning; when every
    snapshot is damaged the run is refused with the reason for each.
    """
    problems = []
    for folder in (run_folder / name for name in SNAPSHOT_DIRS):
        if not folder.exists():
            continue
        problem = snapshot_problem(folder)
        if problem is None:
            for damaged, reason in problems:
                print_main(f"warning: the snapshot in {damaged} is damaged ({reason}); "
                           f"resuming from the previous one in {folder}")
            return folder
        problems.append((folder, problem))
    if problems:
        reasons = "; ".join(reason for _, reason in problems)  # each names its file
        raise UsageError(f"--output-dir {run_folder} holds no valid snapshot to resume from "
                         f"({reasons}); pass --overwrite to start over")
    return None


def discard_newer_snapshots(chosen: Path) -> None:
    """Delete the damaged snapshots newer than `chosen`, the one a run resumes from, so that
    its next save keeps `chosen` as the previous one."""
    for name in SNAPSHOT_DIRS[:SNAPSHOT_DIRS.index(chosen.name)]:
        shutil.rmtree(chosen.parent / name, ignore_errors=True)


def write_snapshot(folder: Path, files: dict[str, object]) -> None:
    """Write a complete snapshot into the new folder `folder`, every byte flushed to disk.

    `files` maps file names to contents: tensors (a dict of them) go to safetensors, the rest
    to ``torch.save`` (.pt, loadable with ``weights_only=True``) or JSON. The manifest of
    sizes and hashes is written last: a folder without one is an unfinished save. Each file is
    serialised in memory and written with one ``write_bytes``, so that a full disk is an
    ``OSError`` naming the file (torch.save's own writer reports "unexpected pos").
    """
    folder.mkdir(parents=True)
    for name, content in files.items():
        path = folder / name
        if name.endswith(".safetensors"):
            data = tensors_to_bytes(content)
        elif name.endswith(".pt"):
            buffer = io.BytesIO()
            torch.save(content, buffer)
            data = buffer.getvalue()
        else:
            data = (json.dumps(content, indent=2) + "\n").encode()
        with writing(path):
            path.write_bytes(data)
            sync_to_disk(path)
    write_manifest(folder)
    sync_to_disk(folder / MANIFEST_FILE)
    sync_to_disk(folder)


def publish_snapshot(partial: Path, run_folder: Path) -> None:
    """Make the complete snapshot in `partial` the latest, keeping the one it replaces.

    Renames are atomic, so at every instant a kill leaves at least one complete snapshot:
    the latest, or (between the two renames) the previous one.
    """
    latest, previous = run_folder / SNAPSHOT_DIR, run_folder / PREVIOUS_SNAPSHOT_DIR
    if latest.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(latest, previous)
    os.replace(partial, latest)
    sync_to_disk(run_folder)


def save_snapshot(run_folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler, scaler: torch.amp.GradScaler, state: LoopState,
                  epoch_order: list[int], rng: list[dict], settings: dict) -> None:
    """Write the snapshot of this step into `run_folder` (rank 0 alone): the trainable
    weights, the optimizer, scheduler and scaler, every rank's random streams (`rng`), this
    epoch's data order, the loop's state and the run's settings."""
    partial = run_folder / PARTIAL_SNAPSHOT_DIR
    shutil.rmtree(partial, ignore_errors=True)  # a save that a kill cut short
    write_snapshot(partial, {
        TRAINABLE_FILE: {name: param.detach().contiguous()
                         for name, param in model.named_parameters() if param.requires_grad},
        TRAINING_STATE_FILE: {"optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(),
                              "scaler": scaler.state_dict(), "rng": rng,
                              "epoch_order": torch.tensor(epoch_order)},
        PROGRESS_FILE: {**asdict(state), "settings": settings}})
    publish_snapshot(partial, run_folder)


def restore_snapshot(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, scaler: torch.amp.GradScaler, device: torch.device,
                     reviews_hash: str) -> tuple[LoopState, dict]:
    """Load the snapshot in `folder` into the model, optimizer, scheduler and scaler, once the
    run's data (``data.hash_reviews``) is found to be the snapshot's (``check_same_reviews``).

    Returns the loop's state and the rest for the caller: ``epoch_order`` and ``rng`` (one
    entry per rank), which must be checked and restored where the data and the rank are known.
    """
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    check_same_reviews(progress.get("reviews_hash"), reviews_hash, device)
    del progress["settings"]  # checked against the flags before the run started
    # An older snapshot kept none: the run's later snapshots keep it from now on.
    progress["reviews_hash"] = reviews_hash
    tensors = load_file(folder / TRAINABLE_FILE, device=str(device))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(tensors) != trainable:
        raise UsageError(f"the snapshot in {folder} holds other trainable weights than this "
                         "model; pass --overwrite to start over")
    model.load_state_dict(tensors, strict=False)
    saved = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    for group in saved["optimizer"]["param_groups"]:  # saved groups replace the settings;
        group.update(fused=True, foreach=None)  # older runs' CPU AdamW was not fused
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:  # empty from a run whose scaler was disabled (older versions)
        scaler.load_state_dict(saved["scaler"])
    return LoopState(**progress), saved


def saved_before(folder: Path) -> dict:
    """The pre-trained model's test metrics, scored when the run started and kept in the
    snapshot in `folder` (``restore_snapshot`` refuses other data than they were scored on)."""
    return json.loads((folder / PROGRESS_FILE).read_text())["before"]


def check_same_reviews(saved: str | None, current: str, device: torch.device) -> None:
    """Refuse to resume on other reviews than the snapshot's: edited, added or removed rows or
    labels would train, validate and score "after" on other data than the run began with.

    Every rank compares its own data (machines of one run may each read a copy of their own).
    """
    if not all_ranks_true(torch.tensor(saved is None or saved == current, device=device)):
        raise UsageError("the data is not the snapshot's: the training, validation or test "
                         "reviews or their labels changed since the run started; pass "
                         "--overwrite to start over")


def check_data_order(sampler, saved_order: torch.Tensor, epoch: int) -> None:
    """Refuse to resume when the training data no longer comes in the snapshot's order."""
    sampler.set_epoch(epoch)
    same = is_main_process() and torch.equal(saved_order, torch.tensor(sampler.epoch_order()))
    if not from_main_process(same):  # rank 0 holds the saved order; all ranks must agree
        raise UsageError("the training data is not the snapshot's: the reviews or their order "
                         "changed since the run started; pass --overwrite to start over")


def rng_states(device: torch.device) -> dict:
    """Every random stream the run draws from: Python, numpy, torch's CPU stream and, on a
    GPU, the stream of the one GPU this process trains on (its dropout masks)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                      cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_states(states: dict, device: torch.device) -> None:
    """Put every random stream back where ``rng_states`` found it.

    The GPU stream goes to `device`, the GPU this process now trains on, which need not have
    the number it had (a run moved from cuda:3 to a machine with one GPU). A run that moves
    between CPU and GPU keeps the other streams; its dropout masks then differ.
    """
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if isinstance(states.get("cuda"), torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Stopping

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


# ---------------------------------------------------------------------------------------------
# The loop's side of it


class ResumableLoop:
    """The [production] part of train.py's Trainer: snapshots, signals and a diverging loss.

    The Trainer inherits these methods and calls them at the points its loop marks
    [production]: ``take_snapshot`` at save steps, ``stop_if_asked`` after a signal,
    ``resume_from`` before the loop. They read and set what the Trainer holds: its ``state``,
    ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``window_loss``, ``train_loader``,
    ``log_file``, ``job``, ``recipe``, ``run_options``, ``batches_per_epoch`` and
    ``total_steps``, and its ``read_device_counters``; ``prepare_to_stop_and_resume`` sets up
    what only they use.
    """

    def prepare_to_stop_and_resume(self, device: torch.device, run_folder: Path) -> None:
        """What only these methods use: the inf/NaN counts on `device`, the SIGINT/SIGTERM
        handler, and where the snapshots go (`run_folder`) and which step the newest holds."""
        self.saved_step = -1  # the step of the newest snapshot, in snapshot_dir
        self.snapshot_dir = run_folder / SNAPSHOT_DIR
        self.nonfinite = NonfiniteSteps(device)
        self.stop = StopSignals(device)  # SIGINT/SIGTERM: stop after this step

    def stop_if_asked(self, signum: int) -> None:
        """End the run, its snapshot taken, when signal `signum` asked to stop (0: none did)."""
        if signum:
            raise stopped_by(signum, self.state.step, self.snapshot_dir)

    def take_snapshot(self) -> None:
        """Save everything needed to continue from this step (``save_snapshot``: rank 0 writes,
        but every rank contributes its random-number states)."""
        if self.saved_step == self.state.step:
            return
        self.read_device_counters()  # the schedule and counters as of this step
        rng = gather_to_main(rng_states(self.job.device))
        if is_main_process():
            state = replace(self.state, window_loss=self.window_loss.item(),
                            log_bytes=self.log_file.size())
            save_snapshot(
                self.run_options.output_dir, self.model, self.optimizer, self.scheduler,
                self.scaler, state, self.train_loader.sampler.epoch_order(), rng,
                self.job.settings)
        wait_for_all_ranks()
        self.saved_step = self.state.step

    def resume_from(self, folder: Path) -> None:
        """Continue from the snapshot in `folder`: weights, optimizer, scheduler, scaler,
        position in the data, best score, log length and every random stream."""
        saved, rest = restore_snapshot(
            folder, self.model, self.optimizer, self.scheduler, self.scaler, self.job.device,
            self.state.reviews_hash)
        self.state, self.saved_step = saved, saved.step
        self.window_loss.fill_(saved.window_loss)
        self.nonfinite.restore(saved.nonfinite_steps)
        if saved.batches_done == self.batches_per_epoch:  # saved at the end of an epoch
            self.state = replace(saved, epoch=saved.epoch + 1, batches_done=0)
        else:  # mid-epoch: the rest of this epoch's order must be the snapshot's
            check_data_order(self.train_loader.sampler, rest["epoch_order"], saved.epoch)
        restore_rng_states(rest["rng"][self.job.rank], self.job.device)
        print_main(f"Resuming from {folder} at step {self.state.step} of {self.total_steps} "
                   f"(epoch {min(self.state.epoch + 1, self.recipe.epochs)}, batch "
                   f"{self.state.batches_done} of {self.batches_per_epoch})")
