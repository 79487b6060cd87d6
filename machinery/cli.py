"""Command-line plumbing that every script shares: flags built from typed dataclasses, the
user-mistake exception and argparse types, the check that an output path may be written, and
the runner that turns a mistake into one line on stderr with exit code 2.

Flags come from dataclasses (``add_options``), as litgpt's ``args.py`` does: a field is a flag
(``lora_r`` is ``--lora-r``), its type checks the value (``PositiveInt`` refuses 0), its default
is the flag's default and its docstring the flag's ``--help``. Every default lives in one place,
and ``options_from`` turns the parsed flags back into the typed object.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import itertools
import math
import os
import shutil
import sys
import tempfile
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import transformers

# Every train.py option says whether a resumed run may give it another value: FIXED ones decide
# what the run computes and must match the run being resumed; ADJUSTABLE ones only say where and
# how fast it runs or how often it reports. A dataclass of options sets the rule of its fields
# (its ``resume_rule``, FIXED unless set); a field may set its own (``option(resume_rule=...)``).
FIXED, ADJUSTABLE = "fixed", "adjustable"
RESUME_RULE = "resume_rule"  # the attribute add_options sets on each flag's argparse action
DEFAULT_TEXT = "default_text"  # an option's default in words, where its value is None
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


def class_names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated class names, at least two, none empty or repeated."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or "" in names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two or more distinct class names, comma-separated (a,b,c)")
    return names


# Option types: the value's check travels with the type (typing.Annotated), so that a field's
# annotation is all the flag needs (argparse reports a refused value in one line, exit 2).
PositiveInt = Annotated[int, at_least(1)]
NonNegativeInt = Annotated[int, at_least(0)]
PositiveFloat = Annotated[float, positive_float]
NonNegativeFloat = Annotated[float, non_negative_float]
Fraction = Annotated[float, unit_fraction]
ClassNames = Annotated[tuple, class_names]


def option(default: Any = None, *, default_text: str | None = None,
           resume_rule: str | None = None) -> Any:
    """A dataclass field with what its flag needs beyond a default: the default in words
    (`default_text`, for a None that is filled in later) and a resume rule of its own."""
    metadata = {DEFAULT_TEXT: default_text, RESUME_RULE: resume_rule}
    return dataclasses.field(default=default, metadata=metadata)


def field_docs(options: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), joined to one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(options)))
    body = tree.body[0].body
    docs = {}
    for field, doc in itertools.pairwise(body):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) \
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def argparse_settings(annotation: Any) -> dict:
    """add_argument's keywords for a field's type: its check, its choices, or a switch."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = arguments[0]
    if annotation is bool:
        return {"action": "store_true"}
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if typing.get_origin(annotation) is Annotated:
        return {"type": typing.get_args(annotation)[1]}
    return {"type": annotation}


def flag_help(field: dataclasses.Field, doc: str) -> str:
    """A field's --help: its docstring and, unless it says so itself, its default."""
    shown = field.metadata.get(DEFAULT_TEXT) or (
        None if field.default is None or field.default is False else field.default)
    if shown is not None and "(default:" not in doc:
        end = "." if doc.endswith(".") else ""
        doc = f"{doc.removesuffix('.')} (default: {shown}){end}"
    return doc.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    """Add a flag for each field of the dataclass `options_class`: ``--field-name``, checked by
    the field's type, with the field's default and its docstring as the help (see the module's
    docstring), in a group titled by the first line of the class's docstring ("data: which
    reviews" is the group "data", described "which reviews")."""
    title, _, description = options_class.__doc__.splitlines()[0].partition(": ")
    group = parser.add_argument_group(title, description or None)
    hints = typing.get_type_hints(options_class, include_extras=True)
    docs = field_docs(options_class)
    for field in dataclasses.fields(options_class):
        action = group.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, default=field.default,
            help=flag_help(field, docs.get(field.name, "")), **argparse_settings(hints[field.name]))
        rule = field.metadata.get(RESUME_RULE) or getattr(options_class, RESUME_RULE, FIXED)
        setattr(action, RESUME_RULE, rule)


def options_from(args: argparse.Namespace, options_class: type):
    """An `options_class` (a dataclass) filled with the parsed flags of its fields."""
    return options_class(**{field.name: getattr(args, field.name)
                            for field in dataclasses.fields(options_class)})


def parse_options(parser: argparse.ArgumentParser, argv: list[str] | None,
                  options_classes: tuple[type, ...]) -> list:
    """Parse `argv` (None: the command line) into one filled object of each of
    `options_classes`, in their order."""
    args = parser.parse_args(argv)
    return [options_from(args, each) for each in options_classes]


def adjustable_options(*options_classes: type) -> set[str]:
    """The names of the fields of `options_classes` that a resumed run may change
    (ADJUSTABLE)."""
    parser = argparse.ArgumentParser()
    for each in options_classes:
        add_options(parser, each)
    return {dest for dest, rule in resume_rules(parser).items() if rule == ADJUSTABLE}


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


def run_command(parser: argparse.ArgumentParser, run, argv: list[str] | None = None,
                after_disk_full=lambda *args: "", options_classes: tuple[type, ...] = ()) -> int:
    """What every script's main() does: parse the flags, quiet the libraries, run them.

    `run` gets the parsed flags: one filled object of each of `options_classes`, in their order
    (``parse_options``), or the argparse namespace where none are given. A mistake in the
    user's input (UsageError) becomes argparse's one-line error with exit code 2 instead of a
    traceback; a full disk one line and exit code 1 (``disk_full_message``, ending with
    ``after_disk_full`` of the same flags: what the same command does when run again).
    """
    flags = (parse_options(parser, argv, options_classes) if options_classes
             else [parser.parse_args(argv)])
    quiet_library_logs()
    try:
        run(*flags)
    except UsageError as error:
        parser.error(str(error))
    except OSError as error:
        if error.errno not in DISK_FULL_ERRORS:
            raise
        print(f"{parser.prog}: error: {disk_full_message(error)}{after_disk_full(*flags)}",
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
