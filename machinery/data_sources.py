"""Reading reviews from where they are: a Hugging Face Hub dataset, a folder in the original
``aclImdb`` layout, or a folder of ``train.*``/``test.*`` files (Parquet, CSV, JSON Lines).

``load_split`` gives every split the same two columns, ``text`` (str) and ``label`` (a class
id, a ``ClassLabel`` that holds the class names), whatever the source looked like, and refuses
in one sentence what it cannot read: a file that does not parse, missing columns, texts that
are not text or are empty, labels outside the classes. Nothing is dropped silently.

The classes (``label_names_for``), in id order:
* 0/1, neg/pos or negative/positive (any case): ``negative`` = 0 and ``positive`` = 1, IMDB's;
* other integers: ids 0..K-1, named "0".."K-1" (or by ``--labels``);
* strings: the names sorted (or in the order ``--labels`` gives).
The training split decides them; every other split must hold only those.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from datasets import ClassLabel, Dataset, DownloadMode, Features, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from datasets.io.generator import GeneratorDatasetInputStream
from pyarrow import parquet as pq
from pyarrow.lib import ArrowException

from machinery.cli import DISK_FULL_ERRORS, UsageError
from machinery.runtime import print_main

TEXT, LABEL = "text", "label"
# Beside them, each review keeps its row in the split it came from (0: the first data row; in
# an aclImdb folder, its place among the class folders' sorted files), and the data's own id
# where it has a column of that name (an aclImdb review: its file name): what joins a
# prediction back to the user's data.
ROW, ID = "row", "id"
# IMDB's two classes, and the labels some datasets use for them (compared lower-cased,
# stripped): data labelled only with these keeps this meaning and order.
BINARY_LABEL_NAMES = ("negative", "positive")
LABEL_ALIASES = {"0": 0, "1": 1, "neg": 0, "pos": 1, "negative": 0, "positive": 1}
# File endings accepted in a local data folder, and the `datasets` builder that reads each.
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
# What `datasets` says when a data file holds no rows (a CSV with only its header, say).
NO_ROWS_MESSAGE = "corresponds to no data"
# Column types that hold review texts (a column of numbers, bytes or lists is refused).
TEXT_DTYPES = ("string", "large_string")
# Characters of a refused value shown in an error message.
SHOWN_VALUE_CHARS = 60
# What reading a damaged `datasets` cache file raises (a truncated Arrow file: "Expected to be
# able to read ... bytes"; an empty one: "... is not an Arrow file" or EOF), and what rebuilding
# it takes: reading the data again (load_dataset's and from_generator's download_mode).
CACHE_ERRORS = (ArrowException, OSError, EOFError, ValueError)
FORCE = DownloadMode.FORCE_REDOWNLOAD
# aclImdb's class folders. Their names are its labels, read like any other data's labels
# (normalize_columns), so --labels and a checkpoint's classes are checked against them too.
ACLIMDB_CLASSES = ("neg", "pos")

FEATURES = Features({TEXT: Value("string"), LABEL: ClassLabel(names=list(BINARY_LABEL_NAMES))})
ACLIMDB_FEATURES = Features({TEXT: Value("string"), LABEL: Value("string"), ID: Value("string")})


def load_split(data: str, split: str, text_column: str = TEXT, label_column: str = LABEL,
               label_names: tuple[str, ...] | None = None) -> Dataset:
    """Load one split ("train" or "test") as a Dataset with columns ``text`` and ``label``.

    `label_names` are the classes in id order (None: this split's labels decide them,
    ``label_names_for``). The training split must hold an example of each (they are --labels
    there); another split may hold fewer.
    """
    folder = Path(data).expanduser()
    if folder.is_dir() and is_aclimdb(folder):
        raw, source = load_aclimdb_split(folder / split), str(folder / split)
    elif folder.is_dir():
        raw, source = load_file_split(folder, split)
    elif folder.exists():
        raise UsageError(f"--data {data} is a file; give the folder that holds train.* and "
                         "test.* (or the aclImdb folder)")
    elif looks_like_path(data):
        raise UsageError(f"--data folder {data} does not exist")
    else:
        raw, source = load_hub_split(data, split), f"{data} ({split})"
    reviews = check_reviews(normalize_columns(raw, text_column, label_column, source,
                                              label_names, decide_classes=split == "train"),
                            source)
    if split != "train":
        warn_if_one_class(reviews, source)
    return reviews


def class_counts(split: Dataset) -> dict[str, int]:
    """How many reviews of each class `split` holds, by class name, in id order."""
    counts = Counter(split.with_format("arrow")[LABEL].to_pylist())
    return {name: counts.get(k, 0) for k, name in enumerate(split.features[LABEL].names)}


def warn_if_one_class(split: Dataset, source: str) -> None:
    """Say so, in one line, when every review of a test split is of one class: accuracy is then
    the share predicted as that class, and the measures that weigh classes against each other
    (precision, recall, F1 and their means) mean nothing there."""
    present = [name for name, n in class_counts(split).items() if n]
    if len(present) == 1:
        print_main(f"warning: every review of {source} is {present[0]}: accuracy is the share "
                   f"predicted {present[0]}; precision, recall and F1, which weigh classes "
                   "against each other, mean nothing there", file=sys.stderr)


def looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (a Hub id is "name" or "owner/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def is_aclimdb(folder: Path) -> bool:
    return any((folder / "train" / name).is_dir() for name in ACLIMDB_CLASSES)


def load_aclimdb_split(split_folder: Path) -> Dataset:
    """Read aclImdb's ``{neg,pos}/*.txt`` files, labelled "neg"/"pos" (``unsup`` is ignored)."""
    files = {name: sorted((split_folder / name).glob("*.txt")) for name in ACLIMDB_CLASSES}
    for name, paths in files.items():
        if not paths:
            raise UsageError(f"aclImdb folder {split_folder / name} is missing or holds no "
                             "*.txt reviews")
    empty = [path for paths in files.values() for path in paths if path.stat().st_size == 0]
    if empty:  # named by file: a row number means nothing in a folder of files
        shown = ", ".join(str(path) for path in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise UsageError(f"{len(empty)} review files in {split_folder} are empty ({shown}); "
                         "nothing was dropped: remove or fill those files")
    # The stamp makes the `datasets` cache notice added, removed or edited files.
    stamp = Hasher.hash([(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                         for paths in files.values() for p in paths])
    gen_kwargs = {"files": {k: [str(p) for p in v] for k, v in files.items()}, "stamp": stamp}

    def generate(fresh: bool) -> Dataset:  # Dataset.from_generator, which cannot force a build
        builder = GeneratorDatasetInputStream(aclimdb_examples, features=ACLIMDB_FEATURES,
                                              gen_kwargs=gen_kwargs).builder
        builder.download_and_prepare(download_mode=FORCE if fresh else None)
        return builder.as_dataset(split=builder.config.split)

    return reading(split_folder, lambda: rereading(split_folder, generate))


def rereading(source: str | Path, read: Callable[[bool], object]):
    """`read(False)`, which may take what `datasets` cached of `source` on disk; should a cache
    file be unreadable (cut short by a crash or a full disk, say), `read(True)`, which builds
    it anew (and writes it again), with a one-line warning. The same data, the same numbers.

    An error the second read raises too is the data's own, and passes on.
    """
    try:
        return read(False)
    except CACHE_ERRORS as error:
        if getattr(error, "errno", None) in DISK_FULL_ERRORS:
            raise  # no space to read into: not a damaged file
        data = read(True)
        print_main(f"warning: the cache of {source} could not be read "
                   f"({' '.join(str(error).split())[:SHOWN_VALUE_CHARS * 2]}); it was built "
                   "again", file=sys.stderr)
        return data


def reading(source: Path, read):
    """Call `read()`; turn a file that cannot be parsed into one sentence naming the file."""
    try:
        return read()
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        if isinstance(cause, UsageError):
            raise cause from None
        raise UsageError(f"could not read {source}: {describe_read_error(cause)}") from error
    except (ArrowException, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"could not read {source}: {describe_read_error(error)}") from error


def describe_read_error(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return (f"it is not valid UTF-8 text ({error.reason} at byte {error.start}); "
                "save it as UTF-8")
    if type(error).__name__ == "EmptyDataError":
        return "the file is empty"
    if NO_ROWS_MESSAGE in str(error):
        return "it holds no reviews, at most a header; add the reviews, one a row"
    return " ".join(f"{type(error).__name__}: {error}".split())


def aclimdb_examples(files: dict[str, list[str]], stamp: str):
    for name, paths in files.items():
        for path in paths:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"{path} is not valid UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save it as UTF-8") from error
            yield {TEXT: text, LABEL: name, ID: Path(path).stem}


def load_file_split(folder: Path, split: str) -> tuple[Dataset, str]:
    """Read ``folder/{split}.{parquet,csv,jsonl,json}``; return it and the file's name."""
    candidates = [folder / f"{split}{ending}" for ending in FILE_BUILDERS]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise UsageError(
            f"--data folder {folder} has no {split} data: expected {split}/{{neg,pos}}/*.txt "
            f"(aclImdb) or one of {', '.join(p.name for p in candidates)}")
    if len(found) > 1:
        raise UsageError(
            f"--data folder {folder} holds {len(found)} {split} files "
            f"({', '.join(p.name for p in found)}); keep one, so that it is clear which is read")
    path = found[0]
    if path.suffix == ".parquet" and parquet_rows(path) == 0:
        # `datasets` would fail with "BatchSize must be greater than 0".
        raise UsageError(f"could not read {path}: it holds no reviews; add the reviews")
    raw = reading(path, lambda: rereading(path, lambda fresh: load_dataset(
        FILE_BUILDERS[path.suffix], data_files={split: str(path)}, split=split,
        download_mode=FORCE if fresh else None)))
    return raw, str(path)


def parquet_rows(path: Path) -> int:
    """The number of rows `path` says it holds (read from its footer, not its data)."""
    return reading(path, lambda: pq.ParquetFile(path).metadata.num_rows)


def load_hub_split(name: str, split: str) -> Dataset:
    try:
        return load_dataset(name, split=split)
    except (ConnectionError, OSError) as error:
        raise UsageError(
            f"could not load dataset {name!r} from the Hugging Face Hub "
            f"({' '.join(str(error).split())}); offline, pass a local folder with --data PATH"
        ) from error


def normalize_columns(raw: Dataset, text_column: str = TEXT, label_column: str = LABEL,
                      source: str = "the data", label_names: tuple[str, ...] | None = None,
                      decide_classes: bool = True) -> Dataset:
    """Keep the text and label columns, renamed to ``text``/``label``, labels mapped to ids.

    `source` names the data in error messages; `label_names` as in ``load_split``, checked
    against the labels (``label_names_for``) where `decide_classes` or when None.
    """
    if text_column == label_column:
        raise UsageError(
            f"--text-column and --label-column both name {text_column!r}; the texts and the "
            f"labels must come from two columns (columns of {source}: "
            f"{', '.join(raw.column_names)})")
    missing = [c for c in (text_column, label_column) if c not in raw.column_names]
    if missing:
        raise UsageError(
            f"column {missing[0]!r} not found (columns: {', '.join(raw.column_names)}); "
            "choose them with --text-column / --label-column")
    has_id = ID in raw.column_names and ID not in (text_column, label_column)
    raw = raw.select_columns([text_column, label_column, *([ID] if has_id else [])])
    check_text_column(raw, text_column, source)
    feature, values = raw.features[label_column], raw[label_column]
    if isinstance(feature, ClassLabel):  # ids with names (the Hub's imdb: 0/1 named neg/pos)
        if all(label_to_int(name) is not None for name in feature.names):
            values = [feature.int2str(v) if v >= 0 else v for v in values]  # IMDB's meaning
        elif label_names is None:
            label_names = tuple(feature.names)  # the data's own classes, in its own order
    if label_names is None or decide_classes:
        label_names = label_names_for(values, source, label_names)
    ids = [label_id(value, label_names) for value in values]
    unknown = [(row, value) for row, value in enumerate(values) if ids[row] is None]
    if unknown:
        shown = ", ".join(f"row {row}: {value!r}" for row, value in unknown[:3])
        raise UsageError(f"{len(unknown)} labels of {source} are not among the classes "
                         f"{', '.join(label_names)} ({shown}); every label must be one the "
                         "training data has (or --labels names)")
    features = Features({TEXT: Value("string"), LABEL: ClassLabel(names=list(label_names)),
                         ROW: Value("int64"), **({ID: raw.features[ID]} if has_id else {})})
    return rereading(source, lambda fresh: raw.map(
        lambda batch, indices: {TEXT: batch[text_column], LABEL: [ids[i] for i in indices],
                                ROW: indices, **({ID: batch[ID]} if has_id else {})},
        batched=True, with_indices=True, remove_columns=raw.column_names, features=features,
        load_from_cache_file=not fresh, desc="Checking labels"))


def as_integer(value: object) -> int | None:
    """`value` as an int when it is one (2, 2.0; not True, not "2"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def label_names_for(values: list, source: str,
                    given: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The class names, in id order, of a training split's raw label `values`.

    Labels that are all 0/1 or neg/pos/negative/positive keep IMDB's two classes; integer ids
    0..K-1 are named by `given` (--labels) or "0".."K-1"; strings are `given`, or their sorted
    set. A class with no example, or a single class, is refused.
    """
    if not given and all(label_to_int(value) is not None for value in values):
        return BINARY_LABEL_NAMES
    integers = [as_integer(value) for value in values]
    if all(i is not None for i in integers):
        if min(integers) < 0:
            raise UsageError(f"the labels of {source} include {min(integers)}: integer labels "
                             "are class ids 0..K-1")
        count = max(max(integers) + 1, len(given or ()))
        names = given or tuple(str(i) for i in range(count))
        if len(names) < count:
            raise UsageError(f"--labels names {len(names)} classes, but the labels of {source} "
                             f"go up to id {count - 1}; name every class 0..{count - 1}")
        present = set(integers)
    else:
        strings = [str(value).strip() for value in values if value is not None]
        ids = sorted({v for v in strings if v.lstrip("-").isdigit()}, key=int)
        if ids and len(ids) < len(set(strings)):  # "1" beside "positive": which is meant?
            others = sorted(set(strings) - set(ids))
            raise UsageError(f"the labels of {source} mix class ids ({', '.join(ids[:5])}) "
                             f"and class names ({', '.join(others[:5])}); label every row "
                             "the same way")
        if ids:  # integer ids written as text (a JSON "2")
            return label_names_for([int(v) for v in strings], source, given)
        names = given or tuple(sorted(set(strings)))
        present = {label_id(v, names) for v in strings} - {None}
    absent = [name for i, name in enumerate(names) if i not in present]
    if absent:
        raise UsageError(f"the classes {', '.join(map(repr, absent))} have no example in "
                         f"{source}; every class needs training examples")
    if len(names) < 2:
        raise UsageError(f"the labels of {source} hold one class ({names[0]!r}); a classifier "
                         "needs at least two")
    return tuple(names)


def label_id(value: object, label_names: tuple[str, ...]) -> int | None:
    """The class id of a raw label among `label_names`, else None."""
    if tuple(label_names) == BINARY_LABEL_NAMES:
        return label_to_int(value)
    integer = as_integer(value)
    if integer is not None:
        return integer if 0 <= integer < len(label_names) else None
    if value is None:
        return None
    name = str(value).strip()
    if name in label_names:
        return label_names.index(name)
    if name.isdigit() and int(name) < len(label_names):  # an id, written as text ("2")
        return int(name)
    return None


def check_text_column(raw: Dataset, column: str, source: str) -> None:
    """Refuse a text column of numbers, bytes or lists, which would be read as texts silently.

    A column with no values at all (a CSV whose texts are all empty reads as numbers) is left
    to check_reviews, which counts the empty texts.
    """
    feature = raw.features[column]
    dtype = getattr(feature, "dtype", None)  # a list column has none
    if dtype in TEXT_DTYPES:
        return
    values = [(row, value) for row, value in enumerate(raw[column]) if value is not None]
    if not values:
        return
    row, value = values[0]
    kind = f"{dtype} values" if dtype else f"{type(feature).__name__.lower()}s"
    raise UsageError(
        f"--text-column {column!r} of {source} holds {kind}, not text (row {row}: "
        f"{shorten(repr(value))}); name the column of review texts with "
        "--text-column, or store the reviews as strings")


def shorten(text: str) -> str:
    """`text` cut to SHOWN_VALUE_CHARS characters, "..." marking a cut."""
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS] + "..."


def check_reviews(split: Dataset, source: str) -> Dataset:
    """Refuse a split with no reviews or with missing/empty texts, naming how many and where."""
    if len(split) == 0:
        raise UsageError(f"{source} holds no reviews")
    empty = [row for row, text in enumerate(split[TEXT]) if text is None or not text.strip()]
    if empty:
        shown = ", ".join(str(row) for row in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise UsageError(f"{len(empty)} of {len(split)} reviews in {source} have no text "
                         f"(rows {shown}); nothing was dropped: remove or fill those rows")
    return split


def label_to_int(value: object) -> int | None:
    """Map a raw label (0/1, "neg"/"pos", "negative"/"positive", any case) to 0/1, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in (0, 1) else None
    if isinstance(value, float) and value.is_integer():
        return label_to_int(int(value))
    if isinstance(value, str):
        return LABEL_ALIASES.get(value.strip().lower())
    return None
