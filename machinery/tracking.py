"""What a run logs as it goes: log.jsonl (``RunLog``, a record per logged step and per
validation, with the speed of ``LogWindow``), which report.md is drawn from; and, asked for with
``--report-to tensorboard``, the same curves and the results in TensorBoard.

    tensorboard --logdir runs/NAME/tensorboard

Each log.jsonl record is mirrored at the same step: the training loss, learning rate, gradient
norm and samples/s under ``train/``, each validation's metrics under ``validation/``; at the end
the test metrics before and after under ``test/``, and the run's settings as hparams. A resumed
run purges what the killed process wrote after its snapshot, so no step appears twice.
tensorboard is an optional dependency (``pip install tensorboard``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from machinery.cli import UsageError
from machinery.files import writing
from machinery.runtime import print_main

LOG_FILE = "log.jsonl"  # in the run folder, as the event files in:
TENSORBOARD_DIR = "tensorboard"
# The numbers of a log record that are its step's own, not where in the data it was.
NOT_SCALARS = frozenset({"step", "epoch", "best"})


def tensorboard_installed() -> bool:
    """True where the tensorboard package can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """Refuse --report-to tensorboard where the package is missing (before any work)."""
    if not tensorboard_installed():
        raise UsageError("--report-to tensorboard needs the tensorboard package, which is not "
                         "installed: pip install tensorboard (or leave out --report-to)")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a log record by TensorBoard tag: {"train/loss": ...} for a training
    record, {"validation/accuracy": ...} for a validation one (its confusion matrix and
    per-class table left out: they are no curves)."""
    found = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, dict):
            found |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float):
            found[f"{prefix}{key}"] = float(value)
    return found


def wait_for_a_later_second(folder: Path) -> None:
    """Wait, if need be, until the clock is a second past the newest event file's in `folder`.

    TensorBoard reads a folder's event files in name order, and a name starts with the second its
    writer opened, then the host and the process ID: a resumed run whose writer opened within the
    killed one's second could sort before it (by its PID), and its purge would not apply to it."""
    opened = [int(second) for path in folder.glob("events.out.tfevents.*")
              if (second := path.name.split(".")[3]).isdigit()]
    if opened:
        # At most a second: a file from a clock ahead of this one's cannot be waited past.
        time.sleep(min(1.0, max(0.0, max(opened) + 1 - time.time())))


class TensorBoardLog:
    """The TensorBoard side of log.jsonl: ``write`` mirrors a record at its step."""

    def __init__(self, run_folder: Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # optional: only when asked for

        folder = run_folder / TENSORBOARD_DIR
        wait_for_a_later_second(folder)
        # purge_step: a resumed run drops the events its killed process wrote after the
        # snapshot it resumes from, which it writes again.
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, record: dict) -> None:
        """The numbers of one log.jsonl record, at its step."""
        group = "validation/" if "validation" in record else "train/"
        for tag, value in scalars(record.get("validation", record)).items():
            self.writer.add_scalar(group + tag, value, record["step"])
        self.writer.flush()

    def write_results(self, settings: dict, metrics: dict, step: int) -> None:
        """The test metrics before and after training at the last step, and the run's settings
        as hparams (with the after row's accuracy and loss, by which runs are compared)."""
        for row in ("before", "after"):
            for tag, value in scalars(metrics[row]).items():
                self.writer.add_scalar(f"test/{row}/{tag}", value, step)
        hparams = {key: value if isinstance(value, int | float | str | bool) else json.dumps(value)
                   for key, value in settings.items()}
        self.writer.add_hparams(hparams, {"hparams/accuracy": metrics["after"]["accuracy"],
                                          "hparams/loss": metrics["after"]["loss"]},
                                run_name=".")
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class RunLog:
    """log.jsonl, one JSON record per line, written as the run goes (by rank 0).

    A resumed run keeps the first `keep_bytes` of the file, what the steps up to its snapshot
    had logged, and appends from there: the log reads as one uninterrupted run's. Should those
    bytes be damaged (cut short, overwritten), the log starts anew, with a one-line warning:
    the numbers of the run do not depend on it, only its earlier curves are lost.
    """

    def __init__(self, path: Path, keep_bytes: int = 0, tensorboard: bool = False,
                 resumed_at: int = 0):
        # Its TensorBoard side (--report-to tensorboard), in the same folder.
        self.mirror = TensorBoardLog(path.parent, resumed_at) if tensorboard else None
        if keep_bytes and not log_prefix_is_whole(path, keep_bytes):
            print_main(f"warning: {path} is damaged; the log starts again here, and the curves "
                       "of the steps before this one are lost", file=sys.stderr)
            keep_bytes = 0
        self.file = path.open("r+" if keep_bytes else "w")
        self.file.truncate(keep_bytes)
        self.file.seek(keep_bytes)

    def write(self, record: dict) -> None:
        """Append `record` as one line, flushed (a kill loses no finished line)."""
        with writing(Path(self.file.name)):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.mirror is not None:
            self.mirror.write(record)

    def size(self) -> int:
        """Bytes written so far: what a snapshot records as `log_bytes`."""
        return self.file.tell()

    def close(self) -> None:
        """Close the file (and its mirror)."""
        self.file.close()
        if self.mirror is not None:
            self.mirror.close()


class LogWindow:
    """The samples trained and the seconds spent training since the last log line: the speed
    that log.jsonl records."""

    def __init__(self, clock: float | None = None):
        self.samples, self.seconds = 0, 0.0
        self.clock = time.perf_counter() if clock is None else clock

    def lap(self) -> float:
        """The seconds since the clock last started, added to the window's."""
        elapsed = time.perf_counter() - self.clock
        self.seconds += elapsed
        return elapsed

    def restart(self) -> None:
        """Start the clock again: what came since the last lap was not training."""
        self.clock = time.perf_counter()

    def rate(self) -> float:
        """Samples per second over the window."""
        return self.samples / self.seconds


def log_prefix_is_whole(path: Path, size: int) -> bool:
    """True when the first `size` bytes of the log at `path` are whole JSON records, a line
    each (what a resumed run keeps)."""
    try:
        with path.open("rb") as file:
            prefix = file.read(size)
        return len(prefix) == size and prefix.endswith(b"\n") and all(
            isinstance(json.loads(line), dict) for line in prefix.decode().splitlines())
    except (OSError, ValueError):
        return False


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a log.jsonl, each in step order; a line that
    is not a record (the file damaged) is refused in one sentence naming the file and line."""
    records = []
    try:
        text = path.read_text()
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} cannot be read ({error}); train again") from error
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except ValueError as error:
            raise UsageError(f"{path} is damaged at line {number} ({error}); its training "
                             "curves cannot be drawn: train again") from error
    if not records or not all(isinstance(record, dict) and "step" in record
                              for record in records):
        # Every run logs its last step and a validation at least: an empty log is damaged.
        raise UsageError(f"{path} holds no train.py log records; its training curves cannot "
                         "be drawn: train again")
    return ([r for r in records if "loss" in r], [r for r in records if "validation" in r])


def write_tensorboard_results(run_dir: Path, settings: dict, metrics: dict, step: int) -> None:
    """TensorBoard's test metrics and hparams of a finished run, at its last step."""
    log = TensorBoardLog(run_dir)
    log.write_results(settings, metrics, step)
    log.close()
