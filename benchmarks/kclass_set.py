"""A three-class set for the pooling comparison (docs/results.md): IMDB's negative and positive
reviews, and a third, easily told class of technical paragraphs that are no reviews at all
(the docstrings of Python's standard library), with string labels.

    python -m benchmarks.kclass_set --out kclass/                   # 600 + 100 texts per class
    python -m benchmarks.kclass_set --out small/ --train 200 --test 50

Writes train.csv and test.csv (columns text, label; labels negative, positive, technical)
that train.py and evaluate.py read with ``--data DIR``. The reviews are drawn, seeded, from
the IMDB Parquet files' train and test splits; the paragraphs are every docstring paragraph of
30 to 250 words of the standard library's modules, classes and functions (about a thousand
with Python 3.11), shuffled, seeded, and split between train and test.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pandas as pd

from benchmarks.common import DEFAULT_DATA
from machinery.cli import at_least, run_command

CLASSES = ("negative", "positive", "technical")
SEED = 0
MIN_WORDS, MAX_WORDS = 30, 250  # a paragraph, not a one-liner nor a whole manual page
# Modules that open windows, print on import, or are tests and tooling, not documentation.
SKIPPED_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
                             "test", "lib2to3", "ensurepip", "venv", "pydoc_data"})
# Paragraphs that are code, lists or tables rather than prose.
NOT_PROSE = (">>>", "..", "-", "*", "|", "+")


def standard_library_modules() -> list[str]:
    """The standard library's public top-level modules, by name, sorted."""
    return sorted(module.name for module in pkgutil.iter_modules()
                  if module.module_finder.path.startswith(sys.base_prefix)
                  and not module.name.startswith("_") and module.name not in SKIPPED_MODULES)


def documented_objects(module) -> list:
    """A module, its own functions and classes, and the classes' own methods."""
    found = [module]
    for _, member in inspect.getmembers(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(member) or inspect.isclass(member):
            found.append(member)
        if inspect.isclass(member):
            found += [method for _, method in inspect.getmembers(member, inspect.isfunction)
                      if method.__qualname__.startswith(f"{member.__name__}.")]
    return found


def technical_paragraphs() -> list[str]:
    """Every prose paragraph of MIN_WORDS to MAX_WORDS words in the standard library's
    docstrings, on one line each, without repeats, sorted."""
    paragraphs = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn as they are imported
        for name in standard_library_modules():
            try:
                module = importlib.import_module(name)
            except Exception:  # a module this platform lacks (a Windows one, say)
                continue
            for documented in documented_objects(module):
                for paragraph in re.split(r"\n\s*\n", inspect.getdoc(documented) or ""):
                    words = paragraph.split()
                    if MIN_WORDS <= len(words) <= MAX_WORDS and \
                            not paragraph.lstrip().startswith(NOT_PROSE):
                        paragraphs.add(" ".join(words))
    return sorted(paragraphs)


def imdb_reviews(data: Path, split: str, per_class: int) -> pd.DataFrame:
    """`per_class` negative and `per_class` positive reviews of an IMDB split, seeded."""
    frame = pd.read_parquet(data / f"{split}.parquet")
    drawn = [frame[frame["label"] == label].sample(per_class, random_state=SEED)
             for label in (0, 1)]
    return pd.DataFrame({"text": pd.concat(drawn)["text"],
                         "label": [CLASSES[0]] * per_class + [CLASSES[1]] * per_class})


def build(data: Path, out: Path, train: int, test: int) -> dict[str, int]:
    """Write out/train.csv and out/test.csv, `train` and `test` texts per class, shuffled;
    return the number of rows of each."""
    paragraphs = pd.Series(technical_paragraphs()).sample(frac=1, random_state=SEED).tolist()
    if len(paragraphs) < train + test:
        raise ValueError(f"only {len(paragraphs)} technical paragraphs for {train} + {test}")
    technical = {"train": paragraphs[:train], "test": paragraphs[train:train + test]}
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, per_class in (("train", train), ("test", test)):
        reviews = imdb_reviews(data, split, per_class)
        texts = pd.DataFrame({"text": technical[split], "label": CLASSES[2]})
        frame = pd.concat([reviews, texts]).sample(frac=1, random_state=SEED)
        frame.to_csv(out / f"{split}.csv", index=False)
        rows[split] = len(frame)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The kclass_set command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kclass_set",
        description="Write a three-class set (IMDB negative, positive, and technical "
                    "paragraphs from the standard library's docstrings) as train.csv and "
                    "test.csv.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA),
                        help=f"the IMDB Parquet folder (default: {DEFAULT_DATA})")
    parser.add_argument("--train", type=at_least(1), default=600,
                        help="training texts per class (default: %(default)s)")
    parser.add_argument("--test", type=at_least(1), default=100,
                        help="test texts per class (default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Build the set and say what was written."""
    rows = build(args.data, args.out, args.train, args.test)
    print(f"Wrote {args.out / 'train.csv'} ({rows['train']} texts) and "
          f"{args.out / 'test.csv'} ({rows['test']} texts), classes {', '.join(CLASSES)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.kclass_set``."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
