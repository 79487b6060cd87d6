"""Command-line plumbing that every script shares: the user-mistake exception, argparse types,
the check that an output path may be written, and the runner that turns a mistake into one
line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import transformers

# Every train.py flag declares where it is defined (``add_flag``) whether a resumed run may give
# it another value: FIXED flags decide what the run computes and must match the run being
# resumed; ADJUSTABLE ones only say where and how fast it runs or how often it reports.
FIXED, ADJUSTABLE = "fixed", "adjustable"
RESUME_RULE = "resume_rule"  # the attribute add_flag sets on the flag's argparse action
# OSError numbers of a write that found no space: disk full, quota used up.
DISK_FULL_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UsageError(Exception):
    """A mistake in the user's input; the scripts report it as one sentence and exit with 2."""


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (argparse reports a bad value with exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


def unit_fraction(text: str) -> float:
    """An argparse type: a float in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (got {text})")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a float >= 0."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"cannot be negative (got {text})")
    return value


def add_flag(container, rule: str, *names: str, **kwargs) -> argparse.Action:
    """``container.add_argument(*names, **kwargs)`` for a flag with resume `rule` (FIXED or
    ADJUSTABLE), recorded on the action it returns."""
    if rule not in (FIXED, ADJUSTABLE):
        raise ValueError(f"{names[0]}: the resume rule must be FIXED or ADJUSTABLE, not {rule!r}")
    action = container.add_argument(*names, **kwargs)
    setattr(action, RESUME_RULE, rule)
    return action


def resume_rules(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Each flag's destination and its resume rule (None: the flag declared none)."""
    # argparse keeps every flag's action in _actions; it has no public accessor.
    return {action.dest: getattr(action, RESUME_RULE, None) for action in parser._actions
            if not isinstance(action, argparse._HelpAction)}


def check_distinct_files(outputs: dict[str, Path | None]) -> None:
    """Refuse two output flags that name one file: the second write would replace the first.

    `outputs` maps each flag to its path (None: not given).
    """
    flags_by_file: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        other = flags_by_file.setdefault(path.resolve(), flag)
        if other != flag:
            raise UsageError(f"{other} and {flag} both name {path}; give each its own file")


def check_can_write(path: Path, flag: str, overwrite: bool, kind: str = "folder") -> None:
    """Refuse a `path` that holds earlier results (unless `overwrite`) or cannot be written.

    `kind` is "folder" or "file", what the caller will write at `path`. Only checks: nothing
    is created, so a refused run leaves no trace.
    """
    if kind == "folder" and path.is_file():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    if kind == "file" and path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if path.is_file() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; choose a new name or pass --overwrite")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {path} already holds files; choose a new folder or pass "
                         "--overwrite")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if ancestor.is_file():
        if ancestor != path:
            raise UsageError(f"{flag} {path} cannot be created: {ancestor} is a file")
        ancestor = path.parent
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written ({error.strerror} in "
                         f"{ancestor})") from error


def quiet_library_logs() -> None:
    """Keep transformers' per-load reports and progress bars out of the scripts' output."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft still calls a transformers method that transformers 5 renamed; harmless.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


def run_command(parser: argparse.ArgumentParser, run_args, argv: list[str] | None = None,
                after_disk_full=lambda args: "") -> int:
    """What every script's main() does: parse the flags, quiet the libraries, run_args(args).

    A mistake in the user's input (UsageError) becomes argparse's one-line error with exit
    code 2 instead of a traceback; a full disk one line and exit code 1 (``disk_full_message``,
    ending with ``after_disk_full(args)``: what the same command does when run again).
    """
    args = parser.parse_args(argv)
    quiet_library_logs()
    try:
        run_args(args)
    except UsageError as error:
        parser.error(str(error))
    except OSError as error:
        if error.errno not in DISK_FULL_ERRORS:
            raise
        print(f"{parser.prog}: error: {disk_full_message(error)}{after_disk_full(args)}",
              file=sys.stderr)
        return 1
    return 0


def disk_full_message(error: OSError) -> str:
    """One sentence for a write that found the disk full (or the user's quota used up)."""
    where = error.filename or "a file"
    # The free space where the file was going: its nearest folder that still exists (a
    # half-written folder is removed by the time this runs).
    folder = next(p for p in Path(error.filename or "x").parents if p.exists())
    space = shutil.disk_usage(folder).free
    return (f"could not write {where}: {os.strerror(error.errno).lower()} "
            f"({space / 2**20:,.0f} MB free there); free some space and run the same command "
            "again")
