"""The run folder (``--output-dir``): what a train.py run writes where, one run per folder,
and whether a run starts fresh or resumes the unfinished run it finds there.

    runs/NAME/
        config.json     the settings (written first)        log.jsonl    loss, lr, validation
        adapter/        the best checkpoint (model/ for --method head/full)
        snapshot/       the latest resumable snapshot (deleted when the run finishes)
        metrics.json    before/after test metrics (written last)  report.md + plots
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import datasets
import peft
import torch
import transformers

from machinery.checkpoints import ADAPTER_DIR, MODEL_DIR, check_checkpoint_files, checkpoint_folder
from machinery.cli import UsageError, check_can_write
from machinery.data_sources import class_counts
from machinery.files import folder_size, format_size, write_json
from machinery.hub import absolute_if_local, check_encoder
from machinery.options import fill_device_defaults
from machinery.report import (
    COMPARISON_PNG,
    CONFIG_FILE,
    CONFIG_SHOWN_ELSEWHERE,
    CURVES_PNG,
    METRICS_FILE,
    REPORT_MD,
)
from machinery.runtime import (
    from_main_process,
    init_distributed,
    is_main_process,
    pick_precision,
    print_main,
    wait_for_all_ranks,
)
from machinery.snapshots import (
    ALL_SNAPSHOT_DIRS,
    SNAPSHOT_DIRS,
    discard_newer_snapshots,
    find_snapshot,
)
from machinery.tracking import LOG_FILE, TENSORBOARD_DIR, require_tensorboard

# In the run folder: locked by the run using it, and naming that run (lock_run_folder).
LOCK_FILE = ".train.lock"
# Everything a run writes into its folder (what --overwrite clears first).
RUN_FILES = (ADAPTER_DIR, MODEL_DIR, CONFIG_FILE, LOG_FILE, METRICS_FILE, REPORT_MD, CURVES_PNG,
             COMPARISON_PNG, TENSORBOARD_DIR, *ALL_SNAPSHOT_DIRS,
             *(f".{name}.{kind}" for name in (ADAPTER_DIR, MODEL_DIR)  # files.write_folder's
               for kind in ("partial", "old")))
# What a snapshot and config.json record beside the flags: named as recorded, not as --flags.
RECORDED_BESIDE_FLAGS = ("resolved_precision", "world_size", "resolved_device",
                         *CONFIG_SHOWN_ELSEWHERE)
# The open lock files of this process: a lock lasts as long as its file stays open.
_held_locks: dict[Path, TextIO] = {}


def default_output_dir(model: str, method: str) -> Path:
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


def run_settings(precision: str, world_size: int, *options: object) -> dict:
    """The run's flags (the fields of each of `options`, dataclasses) as JSON values, with the
    resolved precision and the process count."""
    def as_json(value: object) -> object:  # as JSON writes and reads it back: comparable
        return str(value) if isinstance(value, Path) else \
            list(value) if isinstance(value, tuple) else value

    return {**{k: as_json(v) for each in options for k, v in vars(each).items()},
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


def plan_resume(options, settings: dict, adjustable: set[str]) -> Path | None:
    """Decide between a fresh run and resuming the one in --output-dir.

    Returns the snapshot folder to resume from, or None to start from the beginning (a new
    folder, --overwrite, or an unfinished run killed before its first snapshot). Refuses a
    finished run, another run's settings and a folder that is not a run folder.
    """
    folder = options.output_dir
    if options.resume and options.overwrite:
        raise UsageError("--resume continues a run and --overwrite deletes it: pass one of them")
    is_empty = not folder.is_dir() or all(p.name == LOCK_FILE for p in folder.iterdir())
    if options.overwrite or is_empty:
        if options.resume:
            raise UsageError(f"--resume: --output-dir {folder} holds no run to resume")
        # An empty folder (or one holding only the lock file) has nothing to protect.
        check_can_write(folder, "--output-dir", options.overwrite or is_empty)
        return None
    if (folder / METRICS_FILE).exists():
        raise UsageError(f"--output-dir {folder} holds a finished run ({METRICS_FILE}); pass "
                         "--overwrite to train again from scratch, or choose a new folder")
    if not (folder / CONFIG_FILE).is_file():
        if options.resume:
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
    for name in (ADAPTER_DIR, MODEL_DIR):  # the best checkpoint so far, scored at the end
        if (folder / name).is_dir():
            check_checkpoint_files(folder / name)
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


@dataclass
class Job:
    """Where this process runs and what it continues: its rank (0 of 1 without torchrun), its
    device and precision, the snapshot it resumes from (None: a fresh run), and the settings
    config.json records."""

    rank: int
    world_size: int
    device: torch.device
    precision: str
    snapshot: Path | None
    settings: dict

    @classmethod
    def one_process(cls, device: torch.device, precision: str) -> Job:
        """A fresh run in one process on `device` (a Trainer built outside train.py's run)."""
        return cls(rank=0, world_size=1, device=device, precision=precision, snapshot=None,
                   settings={})


def start_job(recipe, data_options, run_options, runtime_options, adjustable: set[str]) -> Job:
    """Join torchrun's process group (if torchrun started us), fill in the defaults that depend
    on the device or on other flags, and decide, before anything is written, between a fresh
    run and the snapshot to resume from: every check that can refuse the run is made here.

    The options are train.py's (its Recipe, DataOptions, RunOptions and RuntimeOptions); the
    defaults are filled in them, in place (the model folder as an absolute path, the output
    folder, the device's evaluation batch and workers), so that whoever holds them, such as
    ``disk_full_advice``, sees the values the run uses. `adjustable` names the flags a resumed
    run may change.
    """
    rank, world_size, device = init_distributed(runtime_options.device)
    fill_device_defaults(data_options, device)
    fill_device_defaults(runtime_options, device)
    precision = pick_precision(runtime_options.precision, device)
    if run_options.report_to == "tensorboard":
        require_tensorboard()
    # A --model folder as an absolute path, which adapter_config.json records, so that the
    # checkpoint loads from any working directory.
    recipe.model = absolute_if_local(recipe.model)
    run_options.output_dir = settle_output_dir(run_options, recipe.model, recipe.method)
    settings = run_settings(precision, world_size, recipe, data_options, run_options,
                            runtime_options)
    snapshot = plan_run_folder(run_options, settings, adjustable)
    check_encoder(recipe.model)
    return Job(rank, world_size, device, precision, snapshot, settings)


def settle_output_dir(options, model: str, method: str) -> Path:
    """--output-dir, or the default name, which holds the time: rank 0's, on every rank.

    `options` holds the run folder's flags (output_dir, resume, overwrite).
    """
    if options.resume and options.output_dir is None:
        raise UsageError("--resume needs the --output-dir of the run to continue")
    return from_main_process(options.output_dir or default_output_dir(model, method))


def plan_run_folder(options, settings: dict, adjustable: set[str]) -> Path | None:
    """Decide, without writing anything, between a fresh run (None) and the snapshot in
    --output-dir to resume from (``plan_resume``)."""
    folder = options.output_dir
    if (folder / LOCK_FILE).is_file():  # a folder some run has used: is it in use?
        claim_output_dir(folder)
    snapshot = plan_resume(options, settings, adjustable)
    if snapshot is None and not options.overwrite and (folder / CONFIG_FILE).is_file():
        print_main(f"{folder} holds an unfinished run that was stopped before its "
                   "first snapshot: starting it again from the beginning")
    return snapshot


def start_run_folder(folder: Path, job: Job, *splits) -> None:
    """Create and lock the run folder once every rank has passed its checks; a fresh run
    clears an earlier run's files and writes config.json (the settings, the device, the
    review counts of the training, validation and test `splits`), a resumed one drops the
    damaged snapshots newer than the one it resumes from. Then say what the run holds."""
    counts = dict(zip(("train", "validation", "test"), map(class_counts, splits), strict=True))
    train, validation, test = (len(split) for split in splits)
    wait_for_all_ranks()  # every rank has passed its checks before rank 0 writes a file
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
    claim_output_dir(folder)  # held already, or a run started at the same moment
    if is_main_process():
        if job.snapshot is None:
            remove_run_files(folder)  # start over: no stale adapter, log or plots
            write_json(folder / CONFIG_FILE, {
                **job.settings, "resolved_device": str(job.device), "train_examples": train,
                "validation_examples": validation, "test_examples": test,
                "class_counts": counts, "versions": library_versions()})
        else:
            discard_newer_snapshots(job.snapshot)
    wait_for_all_ranks()
    if not (folder / CONFIG_FILE).is_file():
        raise UsageError(f"--output-dir {folder} is not the folder rank 0 writes: every "
                         "process loads the best checkpoint back from it, so with several "
                         "machines put it on a filesystem they all share")
    processes = f" x {job.world_size} processes" if job.world_size > 1 else ""
    print_main(f"Data: {train} training, {validation} validation, {test} test reviews; "
               f"{job.device}, {job.precision}{processes}; output in {folder}")
    print_main("Classes (training / validation / test reviews): " + ", ".join(
        f"{name} {' / '.join(str(counts[split][name]) for split in counts)}"
        for name in counts["train"]))


def remove_run_files(folder: Path) -> None:
    """Delete what an earlier train.py run wrote into `folder` (other files stay)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def disk_full_advice(recipe, data_options, run_options, runtime_options) -> str:
    """What a run stopped by a full disk says after "run the same command again": that it
    resumes, and roughly how much space it needs: three snapshots (the latest, the previous
    and the next while it is written) and the best checkpoint. The options are train.py's."""
    folder, method = run_options.output_dir or Path("."), recipe.method
    snapshot = next((folder / name for name in SNAPSHOT_DIRS if (folder / name).is_dir()), None)
    if snapshot is None:
        return ": the run starts again (it had written no snapshot yet)"
    checkpoint = checkpoint_folder(folder, method)
    needed = 3 * folder_size(snapshot) + (folder_size(checkpoint) if checkpoint.is_dir() else 0)
    return (": it resumes from the last snapshot, which is intact (the run needs about "
            f"{format_size(needed)} for its snapshots and checkpoint)")


def finish_run_folder(folder: Path) -> None:
    """A finished run is not resumed: delete its snapshots (which can be large); the best
    checkpoint holds the result."""
    for name in ALL_SNAPSHOT_DIRS:
        shutil.rmtree(folder / name, ignore_errors=True)
