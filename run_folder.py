"""The run folder (``--output-dir``): what a train.py run writes where, one run per folder,
and whether a run starts fresh or resumes the unfinished run it finds there.

    runs/NAME/
        config.json     the settings (written first)        log.jsonl    loss, lr, validation
        adapter/        the best checkpoint (model/ for --method head/full)
        snapshot/       the latest resumable snapshot (deleted when the run finishes)
        metrics.json    before/after test metrics (written last)  report.md + plots
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import TextIO

import datasets
import peft
import torch
import transformers

from cli import UsageError, check_can_write
from data import Preprocessing
from files import write_folder, write_json
from lora_model import (
    ADAPTER_DIR,
    DEFAULT_METHOD,
    MODEL_DIR,
    checkpoint_folder,
    folder_size,
    format_size,
    save_checkpoint,
)
from report import (
    COMPARISON_PNG,
    CONFIG_FILE,
    CONFIG_SHOWN_ELSEWHERE,
    CURVES_PNG,
    LOG_FILE,
    METRICS_FILE,
    REPORT_MD,
)
from resumable import ALL_SNAPSHOT_DIRS, SNAPSHOT_DIRS, discard_newer_snapshots, find_snapshot
from runtime import from_main_process, is_main_process, print_main, wait_for_all_ranks

# In the run folder: locked by the run using it, and naming that run (lock_run_folder).
LOCK_FILE = ".train.lock"
# Everything a run writes into its folder (what --overwrite clears first).
RUN_FILES = (ADAPTER_DIR, MODEL_DIR, CONFIG_FILE, LOG_FILE, METRICS_FILE, REPORT_MD, CURVES_PNG,
             COMPARISON_PNG, *ALL_SNAPSHOT_DIRS,
             *(f".{name}.{kind}" for name in (ADAPTER_DIR, MODEL_DIR)  # files.write_folder's
               for kind in ("partial", "old")))
# What a snapshot and config.json record beside the flags: named as recorded, not as --flags.
RECORDED_BESIDE_FLAGS = ("resolved_precision", "world_size", "resolved_device",
                         *CONFIG_SHOWN_ELSEWHERE)
# The open lock files of this process: a lock lasts as long as its file stays open.
_held_locks: dict[Path, TextIO] = {}


def default_output_dir(model: str, method: str = DEFAULT_METHOD) -> Path:
    """runs/<model name>-<method>-<YYYYmmdd-HHMMSS>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(model.rstrip('/')).name}-{method}-{stamp}"


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "datasets": datasets.__version__}


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
    def as_json(value: object) -> object:  # as JSON writes and reads it back: comparable
        return str(value) if isinstance(value, Path) else \
            list(value) if isinstance(value, tuple) else value

    return {**{k: as_json(v) for k, v in vars(args).items()},
            "resolved_precision": precision, "world_size": world_size}


def differing_settings(saved: dict, current: dict,
                       adjustable: set[str]) -> list[tuple[str, object, object]]:
    """(name, saved value, current value) of every setting that differs, but the `adjustable`
    ones; the name as the user knows it ('--lr', or 'resolved_precision' for what no flag sets).

    A flag newer than the saved run (not in `saved`) matches when it is off now (None or
    False): the older train.py behaved as the flag's default does.
    """
    differences = []
    for key in sorted(current.keys() - adjustable):
        if key not in saved and current[key] in (None, False):
            continue
        if saved.get(key, "(not recorded)") != current[key]:
            name = key if key in RECORDED_BESIDE_FLAGS else "--" + key.replace("_", "-")
            differences.append((name, saved.get(key, "(not recorded)"), current[key]))
    return differences


def plan_resume(args: argparse.Namespace, settings: dict, adjustable: set[str]) -> Path | None:
    """Decide between a fresh run and resuming the one in --output-dir.

    Returns the snapshot folder to resume from, or None to start from the beginning (a new
    folder, --overwrite, or an unfinished run killed before its first snapshot). Refuses a
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
    differences = [f"{name} {then} (now {now})"
                   for name, then, now in differing_settings(saved, settings, adjustable)]
    if differences:
        raise UsageError(f"--output-dir {folder} holds an unfinished run with other settings: "
                         f"{'; '.join(differences)}. Repeat its settings to resume it, or pass "
                         "--overwrite to start over")
    return find_snapshot(folder)


def claim_output_dir(folder: Path) -> None:
    """Rank 0 takes the run folder's lock (``lock_run_folder``); if another run holds it,
    every rank stops with the same sentence, before anything in the folder is read or written."""
    refusal = None
    if is_main_process():
        try:
            lock_run_folder(folder)
        except UsageError as error:
            refusal = str(error)
    refusal = from_main_process(refusal)
    if refusal:
        raise UsageError(refusal)


def plan_run_folder(args: argparse.Namespace, precision: str, world_size: int,
                    adjustable: set[str]) -> Path | None:
    """Settle --output-dir (the default name holds the time: rank 0's) and decide, without
    writing anything, between a fresh run (None) and the snapshot to resume from."""
    if args.resume and args.output_dir is None:
        raise UsageError("--resume needs the --output-dir of the run to continue")
    args.output_dir = from_main_process(args.output_dir
                                        or default_output_dir(args.model, args.method))
    if (args.output_dir / LOCK_FILE).is_file():  # a folder some run has used: is it in use?
        claim_output_dir(args.output_dir)
    snapshot = plan_resume(args, run_settings(args, precision, world_size), adjustable)
    if snapshot is None and not args.overwrite and (args.output_dir / CONFIG_FILE).is_file():
        print_main(f"{args.output_dir} holds an unfinished run that was stopped before its "
                   "first snapshot: starting it again from the beginning")
    return snapshot


def start_run_folder(folder: Path, snapshot: Path | None, config: dict) -> None:
    """Create and lock the run folder once every rank has passed its checks; a fresh run
    clears an earlier run's files and writes config.json, a resumed one drops the damaged
    snapshots newer than the one it resumes from."""
    wait_for_all_ranks()  # every rank has passed its checks before rank 0 writes a file
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
    claim_output_dir(folder)  # held already, or a run started at the same moment
    if is_main_process():
        if snapshot is None:
            remove_run_files(folder)  # start over: no stale adapter, log or plots
            write_json(folder / CONFIG_FILE, config)
        else:
            discard_newer_snapshots(snapshot)
    wait_for_all_ranks()
    if not (folder / CONFIG_FILE).is_file():
        raise UsageError(f"--output-dir {folder} is not the folder rank 0 writes: every "
                         "process loads the best checkpoint back from it, so with several "
                         "machines put it on a filesystem they all share")


def remove_run_files(folder: Path) -> None:
    """Delete what an earlier train.py run wrote into `folder` (other files stay)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def save_best_checkpoint(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> None:
    """Save the run's best checkpoint with the preprocessing evaluate.py must repeat, whole or
    not at all: written into a folder beside it, then swapped in (``write_folder``), so a
    full disk or a kill leaves the previous best in place."""
    def write(partial: Path) -> None:
        save_checkpoint(model, tokenizer, partial, args.method)
        Preprocessing(args.truncation, args.max_length).save(partial)

    write_folder(checkpoint_folder(args.output_dir, args.method), write)


def disk_full_advice(args: argparse.Namespace) -> str:
    """What a run stopped by a full disk says after "run the same command again": that it
    resumes, and roughly how much space it needs: three snapshots (the latest, the previous
    and the next while it is written) and the best checkpoint."""
    folder = args.output_dir if isinstance(args.output_dir, Path) else Path(".")
    snapshot = next((folder / name for name in SNAPSHOT_DIRS if (folder / name).is_dir()), None)
    if snapshot is None:
        return ": the run starts again (it had written no snapshot yet)"
    checkpoint = checkpoint_folder(folder, args.method)
    needed = 3 * folder_size(snapshot) + (folder_size(checkpoint) if checkpoint.is_dir() else 0)
    return (": it resumes from the last snapshot, which is intact (the run needs about "
            f"{format_size(needed)} for its snapshots and checkpoint)")


def finish_run_folder(folder: Path) -> None:
    """A finished run is not resumed: delete its snapshots (which can be large); the best
    checkpoint holds the result."""
    for name in ALL_SNAPSHOT_DIRS:
        shutil.rmtree(folder / name, ignore_errors=True)
