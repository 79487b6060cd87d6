"""Writing files whole or not at all: what a reader (a user, another script, a resumed run)
finds is the old version or the new one, never half of one, whatever kills the writer.

Every write goes to a name beside the target first and is renamed over it, and a rename is
atomic on one filesystem. A full disk then fails the write (an ``OSError`` naming the file;
``cli.run_command`` turns it into one sentence) and leaves the old version in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from machinery.cli import DISK_FULL_ERRORS, UsageError

# Beside the files of a snapshot or a checkpoint: the size and SHA-256 hash of each, written
# last, so that a damaged or changed file is found before it is used.
MANIFEST_FILE = "manifest.json"
# How libraries that do not raise OSError (safetensors' Rust writer) word a full disk.
DISK_FULL_WORDS = tuple(os.strerror(code) for code in DISK_FULL_ERRORS)


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Around a write of `target`: a full disk becomes an ``OSError`` that names `target`.

    Python's own write() reports ENOSPC without a file name, `datasets` and matplotlib pass
    that on, and safetensors raises its own error type: without this, the one-line message
    (``cli.disk_full_message``) could not say what was being written, or where.
    """
    try:
        yield
    except OSError as error:
        if error.errno in DISK_FULL_ERRORS and error.filename is None:
            raise OSError(error.errno, os.strerror(error.errno), str(target)) from error
        raise
    except Exception as error:
        if any(words in str(error) for words in DISK_FULL_WORDS):
            code = next(c for c in DISK_FULL_ERRORS if os.strerror(c) in str(error))
            raise OSError(code, os.strerror(code), str(target)) from error
        raise


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write(partial)` write a file beside `path`, then rename it over `path`: whole or
    not at all (a failed write leaves the previous `path`, or none). Missing parent folders are
    made first, as a user who names an output file in a new folder expects."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_json(path: Path, value: object) -> None:
    """Write `value` as indented JSON, whole or not at all (``write_file``)."""
    write_file(path, lambda partial: partial.write_text(json.dumps(value, indent=2) + "\n"))


def sync_to_disk(path: Path) -> None:
    """fsync a file or folder: its bytes (or its list of names) are on disk when this returns."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Have `write(partial)` fill a new folder beside `folder`, then swap it in
    (``swap_in_folder``): a failed or killed write leaves the previous `folder` (or none)."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a write that a kill cut short
    partial.mkdir(parents=True)
    try:
        with writing(folder):
            write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in_folder(partial, folder)


def folder_size(folder: str | Path) -> int:
    """Bytes in all files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def format_size(n_bytes: int) -> str:
    """'90.9 MB': decimal units, as file managers show sizes."""
    if n_bytes < 1000:
        return f"{n_bytes} B"
    size = float(n_bytes)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def read_json(path: Path, advice: str) -> object:
    """A JSON file the program wrote; missing, unreadable or damaged (cut short, emptied,
    overwritten), it is refused in one sentence that names it and ends with `advice`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise UsageError(f"{path} is missing; {advice}") from error
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        reason = " ".join(str(error).split())[:80]
        raise UsageError(f"{path} is damaged ({reason}); {advice}") from error


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Write MANIFEST_FILE into `folder`: the size and SHA-256 hash of every other file in it,
    its subfolders' too (by path from `folder`)."""
    entries = {str(path.relative_to(folder)): {"size": path.stat().st_size,
                                                "sha256": file_sha256(path)}
               for path in sorted(folder.rglob("*"))
               if path.is_file() and path.name != MANIFEST_FILE}
    write_json(folder / MANIFEST_FILE, entries)


def missing_manifest(folder: Path) -> str:
    """What manifest_problem says of a folder without a manifest."""
    return f"{folder} has no {MANIFEST_FILE}"


def manifest_problem(folder: Path) -> str | None:
    """Why the files of `folder` are not those its MANIFEST_FILE lists, naming the file: the
    first whose size or hash differs or that is missing, or the manifest itself (missing or
    unreadable); None when they all match. A folder without a manifest is for the caller to
    judge."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        entries = [(name, expected["size"], expected["sha256"])
                   for name, expected in manifest.items()]
    except FileNotFoundError:
        return missing_manifest(folder)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return f"{folder / MANIFEST_FILE} is unreadable"
    for name, size, sha256 in entries:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
        if file_sha256(path) != sha256:
            return f"{path} does not match its SHA-256 hash in the manifest"
    return None
