"""Checkpoint folders: what each one holds, where a run keeps it, and how to tell the kinds apart.

A checkpoint is the model a run keeps (its best by validation accuracy): what ``--checkpoint``
of evaluate.py and predict.py takes. train.py keeps it in its run folder, in ``adapter/`` for
``--method lora`` and ``model/`` for ``head`` and ``full``; ``lora_model.py merge`` writes one
of its own. Four kinds, told apart by the files they hold:

    adapter   adapter_config.json + adapter_model.safetensors   LoRA A/B and the head (peft)
    head      head_config.json + head.safetensors               the head alone, on a base model
    full      config.json naming a *ForSequenceClassification  every weight (also: merged)

Beside the weights, small notes say how to use them (``CHECKPOINT_NOTES``): the class names,
how the reviews were tokenized, and the fitted temperature. lora_model.py saves and loads the
weights; this module only finds and reads the folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from machinery.cli import UsageError
from machinery.data_sources import BINARY_LABEL_NAMES
from machinery.files import MANIFEST_FILE, manifest_problem, read_json
from machinery.stats import TEMPERATURE_FILE

# What train.py trains (--method): each is a row of the comparison in docs/results.md.
Method = Literal["lora", "head", "full"]
METHODS: dict[Method, str] = {
    "lora": "LoRA adapters on the frozen encoder, plus the classifier head",
    "head": "the classifier head alone, on the frozen encoder (a linear probe)",
    "full": "every weight (full fine-tuning)",
}
ADAPTER_DIR = "adapter"  # where train.py keeps the best adapter inside a run folder
MODEL_DIR = "model"  # where it keeps the best head or fully fine-tuned model (--method head/full)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"  # a transformers model folder's config (merged models)
CLASSIFIER_SUFFIX = "ForSequenceClassification"  # architectures that carry a trained head
TOKENIZER_CONFIG = "tokenizer_config.json"
# A --method head checkpoint: the head's weights alone, and the base model they sit on.
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"
# Written into every checkpoint folder: the class names in id order, so that evaluate.py and
# predict.py build a head with as many outputs and print the names (a checkpoint without one
# predates it and knows IMDB's two classes).
LABELS_FILE = "labels.json"
# Written into every checkpoint folder: how its reviews were tokenized (data.Preprocessing), so
# that evaluate.py and predict.py can tokenize the same way.
PREPROCESSING_FILE = "preprocessing.json"
# How a classifier head reads the encoder's output: the model's own [CLS] head, or the mean of
# the token vectors (lora_model.MeanPoolingBertForSequenceClassification).
POOLINGS = ("cls", "mean")
# Written into every checkpoint folder: how the classifier head reads the encoder's output
# ({"pooling": "mean"} or "cls"; a checkpoint without one predates it and pools [CLS]).
POOLING_FILE = "pooling.json"
# The small files beside a checkpoint's weights that say how to use them.
CHECKPOINT_NOTES = (PREPROCESSING_FILE, LABELS_FILE, TEMPERATURE_FILE, POOLING_FILE)


def checkpoint_folder(run_folder: Path, method: str) -> Path:
    """Where train.py keeps a run's best checkpoint of `method`: adapter/ or model/."""
    return Path(run_folder) / (ADAPTER_DIR if method == "lora" else MODEL_DIR)


def checkpoint_label_names(folder: Path) -> tuple[str, ...]:
    """The class names a checkpoint was trained on (``LABELS_FILE``; a merged model's config;
    IMDB's two for a checkpoint older than the labels file)."""
    if (folder / LABELS_FILE).is_file():
        try:
            return tuple(json.loads((folder / LABELS_FILE).read_text()))
        except ValueError as error:
            raise UsageError(f"{folder / LABELS_FILE} is damaged ({error}); it holds the class "
                             "names as a JSON list: restore it or train again") from error
    if is_merged_model(folder):
        id2label = json.loads((folder / MODEL_CONFIG).read_text()).get("id2label") or {}
        names = tuple(id2label[str(i)] for i in range(len(id2label)))
        # transformers names classes it was not told about LABEL_0, LABEL_1, ... (and saves no
        # names for two such): a two-class model of another project is taken for IMDB's, as
        # before labels were recorded.
        if len(names) < 3:
            return BINARY_LABEL_NAMES if names in ((), ("LABEL_0", "LABEL_1")) else names
        if names == tuple(f"LABEL_{i}" for i in range(len(names))):
            return tuple(map(str, range(len(names))))
        return names
    return BINARY_LABEL_NAMES


def checkpoint_method(folder: Path) -> str | None:
    """The --method that saved the checkpoint in `folder` (a merged model counts as "full")."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "lora"
    if (folder / HEAD_CONFIG).is_file():
        return "head"
    return "full" if is_merged_model(folder) else None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for `path`: the folder itself, or a run folder's adapter/ or model/."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--checkpoint {path} does not exist")
    for folder in (path, path / ADAPTER_DIR, path / MODEL_DIR):
        check_checkpoint_files(folder)
        if checkpoint_method(folder):
            return folder
    raise UsageError(
        f"--checkpoint {path} is not a run folder, an adapter folder ({ADAPTER_CONFIG}), a head "
        f"folder ({HEAD_CONFIG}) or a merged model folder (a {MODEL_CONFIG} naming a "
        f"*{CLASSIFIER_SUFFIX} architecture, as --method full saves too)")


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint whose files are not the ones train.py or merge wrote: each file its
    manifest lists must have the size and SHA-256 hash the manifest says (a damaged or edited
    file is named). A folder without a manifest (saved before they were written, or by other
    code) is taken as it is."""
    if not (folder / MANIFEST_FILE).exists():
        return
    problem = manifest_problem(folder)
    if problem:
        raise UsageError(f"the checkpoint in {folder} is damaged: {problem}; restore the folder "
                         "or train again")


def checkpoint_base_model(folder: Path) -> str | None:
    """The base model a checkpoint builds on; None for a model folder, which holds every weight."""
    if checkpoint_method(folder) == "lora":
        return adapter_base_model(folder)
    if checkpoint_method(folder) == "head":
        return checkpoint_note(folder / HEAD_CONFIG, "base_model_name_or_path")
    return None


def adapter_base_model(adapter: Path) -> str:
    """The base model name or folder an adapter was trained on, from its config."""
    return checkpoint_note(adapter / ADAPTER_CONFIG, "base_model_name_or_path")


def checkpoint_note(path: Path, key: str):
    """The value of `key` in a JSON file of a checkpoint; a file cut short, emptied or without
    the key is refused in one sentence naming it."""
    note = read_json(path, "restore the checkpoint folder or train again")
    if not isinstance(note, dict) or key not in note:
        raise UsageError(f"{path} is damaged (it holds no {key!r}); restore the checkpoint "
                         "folder or train again")
    return note[key]


def is_merged_model(folder: str | Path) -> bool:
    """True for a plain transformers sequence-classifier folder, such as a merged model.

    A run folder also holds a config.json (train.py's flags), but names no architecture; a
    pre-trained encoder (``BertModel``) is refused too, as its classifier head would be random.
    """
    config = Path(folder) / MODEL_CONFIG
    if not config.is_file() or (Path(folder) / ADAPTER_CONFIG).exists():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # not JSON, not UTF-8: no model config
        return False
    return any(name.endswith(CLASSIFIER_SUFFIX) for name in architectures)


def checkpoint_pooling(folder: Path) -> str:
    """How a checkpoint's head reads the encoder: "mean" or "cls" (``POOLING_FILE``; "cls" for a
    checkpoint saved before the file existed, when every head read [CLS])."""
    path = Path(folder) / POOLING_FILE
    if not path.is_file():
        return "cls"
    pooling = checkpoint_note(path, "pooling")
    if pooling not in POOLINGS:
        raise UsageError(f"{path} names pooling {pooling!r}; it must be one of "
                         f"{', '.join(POOLINGS)}: restore it or train again")
    return pooling
