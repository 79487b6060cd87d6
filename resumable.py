"""Resumable checkpoints: what a killed run needs to continue exactly where it stopped.

A checkpoint is a folder of files (the trained weights, the optimizer/scheduler/scaler and
random-number states, the position in the data) with a manifest of their sizes and SHA-256
hashes written last. It is written whole into a new folder and renamed into place, so a kill at
any instant leaves at least one complete checkpoint; a damaged one is found by its manifest and
the previous one is used instead. train.py's Trainer decides what goes in and when.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from safetensors.torch import save as tensors_to_bytes

from cli import UsageError, check_can_write
from report import CONFIG_FILE, METRICS_FILE, write_json
from runtime import print_main

# A resumable checkpoint: CHECKPOINT_DIR is the latest, PREVIOUS_CHECKPOINT_DIR the one before
# it; a new one is written into PARTIAL_CHECKPOINT_DIR and renamed into place when complete.
CHECKPOINT_DIR = "checkpoint"
PREVIOUS_CHECKPOINT_DIR = "checkpoint-previous"
PARTIAL_CHECKPOINT_DIR = "checkpoint-partial"
TRAINABLE_FILE = "trainable.safetensors"  # the weights being trained (LoRA A/B + head, ...)
TRAINING_STATE_FILE = "training_state.pt"  # optimizer, scheduler, scaler, RNG, data order
PROGRESS_FILE = "progress.json"  # position, best score, log length, "before" metrics, config
MANIFEST_FILE = "manifest.json"  # size and SHA-256 of the files above; written last
# In the run folder: locked by the run using it, and naming that run (lock_run_folder).
LOCK_FILE = ".train.lock"
# The open lock files of this process: a lock lasts as long as its file stays open.
_held_locks: dict[Path, TextIO] = {}


@dataclass
class LoopState:
    """Where the training loop is and what it has seen so far: everything a checkpoint's
    progress.json holds besides the settings, written and read back as one object."""

    step: int = 0  # optimizer steps (skipped ones, with a non-finite gradient, count too)
    epoch: int = 0  # where in the data the next batch comes from: the epoch ...
    batches_done: int = 0  # ... and the batches of it already trained
    best_score: float | None = None  # the best validation score so far; None: no validation yet
    before: dict | None = None  # the pre-trained model's test metrics
    train_seconds: float = 0.0  # time spent training, not validating or checkpointing
    window_loss: float = 0.0  # the loss summed since the last log line ...
    window_batches: int = 0  # ... over this many batches
    nonfinite_steps: int = 0  # consecutive optimizer steps with an inf/NaN loss
    log_bytes: int = 0  # the length of log.jsonl that belongs to the steps done so far


def lock_run_folder(folder: Path) -> None:
    """Hold `folder` for this run (until ``release_run_folders`` or the process ends), or
    refuse it in one sentence naming the run that holds it: one run per folder.

    An OS-level lock (a POSIX record lock, ``fcntl.lockf``): the kernel releases it when its
    process ends, however it ends, so a killed run never leaves a stale lock behind; and unlike
    ``flock`` it belongs to this process alone, not to the DataLoader workers forked from it,
    which can outlive a killed run by seconds. The lock file stays in the folder.
    """
    if folder in _held_locks:
        return
    handle = (folder / LOCK_FILE).open("a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:  # EACCES or EAGAIN: another process holds it
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--output-dir {folder} is in use by another train.py run ({holder}); "
                         "wait for it to end, or choose another folder") from error
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} on {socket.gethostname()}, started "
                 f"{datetime.now():%Y-%m-%d %H:%M:%S}\n")
    handle.flush()
    _held_locks[folder] = handle


def release_run_folders() -> None:
    """Let go of every run folder this process holds (a finished or failed run)."""
    for handle in _held_locks.values():
        handle.close()  # closing the file releases its lock
    _held_locks.clear()


def run_settings(args: argparse.Namespace, precision: str, world_size: int) -> dict:
    """The run's flags as JSON values, with the resolved precision and the process count."""
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "resolved_precision": precision, "world_size": world_size}


def differing_settings(saved: dict, current: dict, adjustable: set[str]) -> list[str]:
    """'--lr 0.002 (now 0.0005)' for every setting that differs, but the `adjustable` ones."""
    differences = []
    for key in sorted(current.keys() - adjustable):
        if saved.get(key, "(not recorded)") != current[key]:
            name = key if key in ("resolved_precision", "world_size") else \
                "--" + key.replace("_", "-")
            differences.append(f"{name} {saved.get(key, '(not recorded)')} "
                               f"(now {current[key]})")
    return differences


def plan_resume(args: argparse.Namespace, settings: dict, adjustable: set[str]) -> Path | None:
    """Decide between a fresh run and resuming the one in --output-dir.

    Returns the checkpoint folder to resume from, or None to start from the beginning (a new
    folder, --overwrite, or an unfinished run killed before its first checkpoint). Refuses a
    finished run, another run's settings and a folder that is not a run folder.
    """
    folder = args.output_dir
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite deletes it: pass one of them")
    is_empty = not folder.is_dir() or all(p.name == LOCK_FILE for p in folder.iterdir())
    if args.overwrite or is_empty:
        if args.resume:
            raise UsageError(f"--resume: --output-dir {folder} holds no run to resume")
        # An empty folder (or one holding only the lock file) has nothing to protect.
        check_can_write(folder, "--output-dir", args.overwrite or is_empty)
        return None
    if (folder / METRICS_FILE).exists():
        raise UsageError(f"--output-dir {folder} holds a finished run ({METRICS_FILE}); pass "
                         "--overwrite to train again from scratch, or choose a new folder")
    if not (folder / CONFIG_FILE).is_file():
        if args.resume:
            raise UsageError(f"--resume: --output-dir {folder} holds no run to resume "
                             f"(no {CONFIG_FILE})")
        check_can_write(folder, "--output-dir", overwrite=False)  # refuses: it holds files
    check_can_write(folder, "--output-dir", overwrite=True)  # still writable?
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--output-dir {folder}: its {CONFIG_FILE} is unreadable ({error}); "
                         "pass --overwrite to start over") from error
    differences = differing_settings(saved, settings, adjustable)
    if differences:
        raise UsageError(f"--output-dir {folder} holds an unfinished run with other settings: "
                         f"{'; '.join(differences)}. Repeat its settings to resume it, or pass "
                         "--overwrite to start over")
    return find_checkpoint(folder)


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None when its files match the
    manifest (names, sizes and SHA-256 hashes)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE}, so its save did not finish"
    except (OSError, ValueError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 hash in the manifest"
    return None


def find_checkpoint(run_folder: Path) -> Path | None:
    """The newest valid checkpoint in `run_folder`; None if the run never wrote one.

    A damaged latest checkpoint falls back to the previous one with a warning; when every
    checkpoint is damaged the run is refused with the reason for each.
    """
    problems = []
    for folder in (run_folder / CHECKPOINT_DIR, run_folder / PREVIOUS_CHECKPOINT_DIR):
        if not folder.exists():
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            for damaged, reason in problems:
                print_main(f"warning: the checkpoint in {damaged} is damaged ({reason}); "
                           f"resuming from the previous one in {folder}")
            return folder
        problems.append((folder, problem))
    if problems:
        reasons = "; ".join(f"{folder.name}/: {reason}" for folder, reason in problems)
        raise UsageError(f"--output-dir {run_folder} holds no valid checkpoint ({reasons}); "
                         "pass --overwrite to start over")
    return None


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sync_to_disk(path: Path) -> None:
    """fsync a file or folder: its bytes (or its list of names) are on disk when this returns."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(folder: Path, files: dict[str, object]) -> None:
    """Write a complete checkpoint into the new folder `folder`, every byte flushed to disk.

    `files` maps file names to contents: tensors (a dict of them) go to safetensors, the rest
    to ``torch.save`` (.pt, loadable with ``weights_only=True``) or JSON. The manifest of
    sizes and hashes is written last: a folder without one is an unfinished save. Each file is
    serialised in memory and written with one ``write_bytes``, so that a full disk is an
    ``OSError`` naming the file (torch.save's own writer reports "unexpected pos").
    """
    folder.mkdir(parents=True)
    manifest = {}
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
        path.write_bytes(data)
        sync_to_disk(path)
        manifest[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_json(folder / MANIFEST_FILE, manifest)
    sync_to_disk(folder / MANIFEST_FILE)
    sync_to_disk(folder)


def swap_in_folder(new: Path, folder: Path) -> None:
    """Put the complete folder `new` in the place of `folder` (which may not exist yet).

    Two renames, each atomic: `folder` is always the old or the new one whole, except for the
    instant between them, when the old one is `.NAME.old` beside it.
    """
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def publish_checkpoint(partial: Path, run_folder: Path) -> None:
    """Make the complete checkpoint in `partial` the latest, keeping the one it replaces.

    Renames are atomic, so at every instant a kill leaves at least one complete checkpoint:
    the latest, or (between the two renames) the previous one.
    """
    latest, previous = run_folder / CHECKPOINT_DIR, run_folder / PREVIOUS_CHECKPOINT_DIR
    if latest.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(latest, previous)
    os.replace(partial, latest)
    sync_to_disk(run_folder)


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
