"""The model: a BERT classifier, its LoRA adapters, and saving/loading them the standard peft way.

Besides LoRA (the default) train.py can train the classifier head alone (a linear probe on the
frozen encoder) or every weight (full fine-tuning), to show what LoRA buys; ``prepare_model``
readies the model for each ``--method``, ``save_checkpoint`` and ``load_checkpoint`` save and
load what each trained.

    python lora_model.py merge --checkpoint runs/NAME --out merged/NAME

writes the fine-tuned classifier as a plain transformers model (LoRA folded into the weights),
which loads with ``AutoModelForSequenceClassification.from_pretrained`` and no peft.

LoRA freezes every pre-trained weight W and learns a low-rank update on the chosen projections:
``W x + (alpha / r) * B A x`` with A (r x d) and B (d x r), B starting at zero so training
starts from the pre-trained model exactly. With ``task_type=SEQ_CLS`` peft also marks the new
classifier head as trainable and saves it next to A and B; without it the head would stay
random and be lost on save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from cli import (
    FIXED,
    UsageError,
    add_flag,
    at_least,
    check_can_write,
    positive_float,
    run_command,
    unit_fraction,
)
from data import PREPROCESSING_FILE
from data_sources import BINARY_LABEL_NAMES, looks_like_path
from files import write_folder
from temperature import TEMPERATURE_FILE

DEFAULT_MODEL = "bert-base-uncased"
# The classifier head of the pre-trained ("before") model is random; drawing it from a fixed
# seed makes train.py's "before" row and evaluate.py --base give the same numbers every time.
HEAD_SEED = 0
# A tokenizer with fewer tokens than this share of the model's embedding table is refused (see
# check_tokenizer_fits).
MIN_TOKENIZER_SHARE = 0.5
# Every model is loaded in fp32, whatever dtype its files hold (see load_base_model).
MODEL_DTYPE = torch.float32
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 32
DEFAULT_LORA_DROPOUT = 0.1
DEFAULT_LORA_TARGETS = "query,value"
ADAPTER_DIR = "adapter"  # where train.py keeps the best adapter inside a run folder
MODEL_DIR = "model"  # where it keeps the best head or fully fine-tuned model (--method head/full)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The classifier head is trained in full (peft's modules_to_save), never given an adapter.
HEAD_MODULES = frozenset({"classifier", "score"})
# Encoders whose self-attention has BERT's "query"/"value" projections and a
# sequence-classification head in transformers.
BERT_STYLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra",
                                    "ernie", "megatron-bert"})
MODEL_CONFIG = "config.json"  # a transformers model folder's config (merged models)
CLASSIFIER_SUFFIX = "ForSequenceClassification"  # architectures that carry a trained head
TOKENIZER_CONFIG = "tokenizer_config.json"
# A --method head checkpoint: the head's weights alone, and the base model they sit on.
HEAD_CONFIG = "head_config.json"
# Written into every checkpoint folder: the class names in id order, so that evaluate.py and
# predict.py build a head with as many outputs and print the names (a checkpoint without one
# predates it and knows IMDB's two classes).
LABELS_FILE = "labels.json"
HEAD_WEIGHTS = "head.safetensors"
# The small files beside a checkpoint's weights that say how to use them.
CHECKPOINT_NOTES = (PREPROCESSING_FILE, LABELS_FILE, TEMPERATURE_FILE)
# What train.py trains (--method): each is a row of the comparison in docs/results.md.
METHODS = {
    "lora": "LoRA adapters on the frozen encoder, plus the classifier head",
    "head": "the classifier head alone, on the frozen encoder (a linear probe)",
    "full": "every weight (full fine-tuning)",
}
DEFAULT_METHOD = "lora"


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                       help_text: str | None = None) -> None:
    """Add ``--model`` (a Hub model name or a local folder)."""
    add_flag(
        parser, FIXED, "--model", default=default,
        help=help_text or f"Hub model name or local model folder (default: {DEFAULT_MODEL})")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA hyper-parameter flags."""
    group = parser.add_argument_group("LoRA", "used by --method lora only")
    add_flag(group, FIXED, "--lora-r", type=at_least(1), default=DEFAULT_LORA_R,
             help=f"rank r of the update B A (default: {DEFAULT_LORA_R})")
    add_flag(group, FIXED, "--lora-alpha", type=positive_float, default=DEFAULT_LORA_ALPHA,
             help="scaling alpha; the update is multiplied by alpha / r "
                  f"(default: {DEFAULT_LORA_ALPHA})")
    add_flag(group, FIXED, "--lora-dropout", type=unit_fraction, default=DEFAULT_LORA_DROPOUT,
             help="dropout on the LoRA branch's input during training "
                  f"(default: {DEFAULT_LORA_DROPOUT})")
    add_flag(group, FIXED, "--lora-targets", default=DEFAULT_LORA_TARGETS,
             help="comma-separated names of the linear layers that get adapters "
                  f"(default: {DEFAULT_LORA_TARGETS}, BERT's attention projections)")


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Call a ``from_pretrained`` and turn "cannot reach the Hub" into one clear sentence."""
    if not Path(name).expanduser().exists() and looks_like_path(name):
        raise UsageError(f"--model folder {name} does not exist")
    try:
        return loader(name, **kwargs)
    except SafetensorError as error:  # a weights file cut short by a crash or a full disk
        raise UsageError(f"--model {name}: its weights file is damaged ({error}); download or "
                         "copy the model again") from error
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        if Path(name).expanduser().exists():
            raise UsageError(f"--model {name} is not a {what} folder ({reason})") from error
        raise UsageError(
            f"could not load {what} {name!r} from the Hugging Face Hub ({reason}); offline, "
            "pass a local model folder with --model PATH") from error


def check_encoder(name: str) -> PretrainedConfig:
    """The model's config, refused unless it is a BERT-style encoder (query/value attention)."""
    config = _from_pretrained(AutoConfig.from_pretrained, name, "model")
    if config.model_type not in BERT_STYLE_MODEL_TYPES:
        found = ", ".join(config.architectures or []) or "no architecture listed"
        raise UsageError(
            f"--model {name} is a {config.model_type!r} model ({found}); this project "
            f"fine-tunes BERT-style encoders ({', '.join(sorted(BERT_STYLE_MODEL_TYPES))})")
    return config


def load_tokenizer(name: str):
    """The model's fast tokenizer (in transformers 5 every BERT tokenizer is the fast one),
    refused when it does not fit the model (see ``check_tokenizer_fits``)."""
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / MODEL_CONFIG).is_file():
        return tokenizer  # a checkpoint's copy, saved beside an adapter or head
    check_tokenizer_fits(tokenizer, check_encoder(name).vocab_size, name)
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int, name: str) -> None:
    """Refuse a tokenizer whose ids do not match the model's embedding table.

    transformers 5 builds a tokenizer of the 5 special tokens, without a word of warning, for
    a model folder that holds no tokenizer files: every review would become [UNK] and the run
    would "learn" from nothing. A tokenizer far smaller than the table (below half) is that
    case or the wrong tokenizer; one larger than the table makes ids the model cannot look up.
    (A table somewhat larger than the vocabulary is normal: it is often padded to a multiple
    of 8 or 64.)
    """
    size = len(tokenizer)
    if size > vocab_size or size < vocab_size * MIN_TOKENIZER_SHARE:
        missing = (" (its folder has no tokenizer files: tokenizer.json or vocab.txt with "
                   "tokenizer_config.json)" if size < vocab_size * MIN_TOKENIZER_SHARE else "")
        raise UsageError(f"--model {name}: its tokenizer knows {size:,} tokens but the model's "
                         f"embedding table has {vocab_size:,}{missing}; put the tokenizer the "
                         "model was trained with beside its weights")


def load_base_model(name: str,
                    label_names: tuple[str, ...] = BINARY_LABEL_NAMES) -> PreTrainedModel:
    """The pre-trained encoder in fp32 with a new classifier head drawn from ``HEAD_SEED``,
    one output per class of `label_names` (which the config records as id2label).

    transformers 5 loads weights in the dtype they were stored in (``dtype="auto"``): a model
    saved in fp16 would train an fp16 head and LoRA weights, which AdamW updates in steps
    smaller than fp16 can hold and which the fp16 GradScaler refuses to unscale. Weights stay
    fp32; autocast computes in bf16/fp16 where asked.
    """
    check_encoder(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return _from_pretrained(
            AutoModelForSequenceClassification.from_pretrained, name, "model",
            dtype=MODEL_DTYPE, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)})


def label_names_of(model: torch.nn.Module) -> tuple[str, ...]:
    """The class names of a classifier (a PeftModel's are its base model's), in id order."""
    config = model.config
    return tuple(config.id2label[i] for i in range(config.num_labels))


def wrap_with_lora(model: PreTrainedModel, r: int = DEFAULT_LORA_R,
                   alpha: float = DEFAULT_LORA_ALPHA, dropout: float = DEFAULT_LORA_DROPOUT,
                   targets: str = DEFAULT_LORA_TARGETS) -> PeftModel:
    """Freeze `model` and add LoRA adapters; the classifier head stays trainable (SEQ_CLS)."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # also trains and saves the head ("modules_to_save")
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=parse_targets(targets))
    return get_peft_model(model, config)


def is_head_parameter(name: str) -> bool:
    """True for the classifier head's parameters ("classifier.weight", ...), not the encoder's."""
    return name.split(".", 1)[0] in HEAD_MODULES


def prepare_model(model: PreTrainedModel, method: str, r: int = DEFAULT_LORA_R,
                  alpha: float = DEFAULT_LORA_ALPHA, dropout: float = DEFAULT_LORA_DROPOUT,
                  targets: str = DEFAULT_LORA_TARGETS) -> torch.nn.Module:
    """The model to train for `method` (see METHODS); the LoRA settings apply to "lora" only."""
    if method == "lora":
        return wrap_with_lora(model, r, alpha, dropout, targets)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "full" or is_head_parameter(name))
    return model


def parse_targets(targets: str) -> list[str]:
    """"query, value" -> ["query", "value"]."""
    return [t.strip() for t in targets.split(",") if t.strip()]


def check_lora_targets(model: torch.nn.Module, targets: str) -> None:
    """Refuse --lora-targets that name no linear layer of the encoder (before any work)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)} - HEAD_MODULES)
    missing = [t for t in parse_targets(targets) if t not in linear]
    if missing or not parse_targets(targets):
        raise UsageError(f"--lora-targets {targets!r}: no encoder linear layer named "
                         f"{', '.join(missing) or '(empty)'}; this model's are "
                         f"{', '.join(linear)}")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft's ``print_trainable_parameters`` gives them.

    For a PeftModel the total holds the frozen original head and its trainable copy both.
    """
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_parameter_counts(trainable: int, total: int) -> str:
    """'trainable 74,498 of 22,788,484 parameters (0.33%)' from the two counts.

    Shares under 0.01% keep two significant digits (a linear probe's 770: 0.0034%), not 0.00%.
    """
    share = 100 * trainable / total
    digits = ".2f" if share >= 0.01 else ".2g"
    return f"trainable {trainable:,} of {total:,} parameters ({share:{digits}}%)"


def save_adapter(model: PeftModel, tokenizer, folder: Path) -> None:
    """Save adapter + head in peft's format (adapter_config.json, adapter_model.safetensors).

    The tokenizer goes alongside so the folder alone is enough to run the model.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def checkpoint_folder(run_folder: Path, method: str) -> Path:
    """Where train.py keeps a run's best checkpoint of `method`: adapter/ or model/."""
    return Path(run_folder) / (ADAPTER_DIR if method == "lora" else MODEL_DIR)


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: Path, method: str) -> None:
    """Save what `method` trained, in the smallest form that loads back exactly, with the tokenizer.

    lora: peft's adapter (A, B and the head). head: the head's weights and the base model's
    name (a few kB; the frozen encoder is the base model's). full: every weight, as a plain
    transformers model folder, the format of a merged model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LABELS_FILE).write_text(json.dumps(list(label_names_of(model))) + "\n")
    if method == "lora":
        save_adapter(model, tokenizer, folder)
        return
    if method == "head":
        save_file({name: tensor.detach().cpu().contiguous()
                   for name, tensor in model.state_dict().items() if is_head_parameter(name)},
                  folder / HEAD_WEIGHTS)
        (folder / HEAD_CONFIG).write_text(json.dumps(
            {"base_model_name_or_path": model.config.name_or_path}, indent=2) + "\n")
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


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
        if checkpoint_method(folder):
            return folder
    raise UsageError(
        f"--checkpoint {path} is not a run folder, an adapter folder ({ADAPTER_CONFIG}), a head "
        f"folder ({HEAD_CONFIG}) or a merged model folder (a {MODEL_CONFIG} naming a "
        f"*{CLASSIFIER_SUFFIX} architecture, as --method full saves too)")


def checkpoint_base_model(folder: Path) -> str | None:
    """The base model a checkpoint builds on; None for a model folder, which holds every weight."""
    if checkpoint_method(folder) == "lora":
        return adapter_base_model(folder)
    if checkpoint_method(folder) == "head":
        return json.loads((folder / HEAD_CONFIG).read_text())["base_model_name_or_path"]
    return None


def adapter_base_model(adapter: Path) -> str:
    """The base model name or folder an adapter was trained on, from its config."""
    return json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_adapted_model(checkpoint: str | Path, base_model: str | None = None,
                       trainable: bool = False) -> PeftModel:
    """Base model + saved adapter and head, via stock ``PeftModel.from_pretrained``.

    peft loads adapters frozen (``is_trainable=False``), which is right for evaluation;
    pass ``trainable=True`` to continue training them.
    """
    adapter = find_checkpoint(checkpoint)
    if checkpoint_method(adapter) != "lora":
        raise UsageError(f"--checkpoint {checkpoint} holds a {checkpoint_method(adapter)} "
                         f"checkpoint, not a LoRA adapter ({ADAPTER_CONFIG})")
    base, base_name, recorded = load_checkpoint_base(adapter, base_model)
    try:
        return PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    except SafetensorError as error:
        raise UsageError(f"{adapter / ADAPTER_WEIGHTS} is damaged ({error}); restore it or "
                         "train again") from error
    except RuntimeError as error:  # torch's "size mismatch for ..." when shapes differ
        if "size mismatch" not in str(error):
            raise
        raise UsageError(
            f"the adapter in {adapter} does not fit --model {base_name}: it was trained on "
            f"{recorded!r}, a model of another shape; pass that model with --model") from error


def load_checkpoint_base(folder: Path,
                         base_model: str | None) -> tuple[PreTrainedModel, str, str]:
    """The base model a LoRA or head checkpoint builds on: (model, its name, the recorded name).

    `base_model` replaces the recorded one (a local copy of the same model, say); its vocabulary
    must then match the tokenizer saved with the checkpoint.
    """
    recorded = checkpoint_base_model(folder)
    base_name = base_model or recorded
    model = load_base_model(base_name, checkpoint_label_names(folder))
    if base_model and base_model != recorded:
        check_same_vocabulary(folder, base_name)
    return model, base_name, recorded


def check_same_vocabulary(folder: Path, base_name: str) -> None:
    """Refuse a base model whose vocabulary differs from the one saved with the checkpoint."""
    if not (folder / "tokenizer_config.json").is_file():
        return  # a checkpoint saved without its tokenizer: nothing to compare against
    saved = AutoTokenizer.from_pretrained(folder).get_vocab()
    if load_tokenizer(base_name).get_vocab() != saved:
        raise UsageError(
            f"--model {base_name} has another vocabulary than the one the checkpoint in {folder} "
            f"was trained with ({checkpoint_base_model(folder)!r}); pass that model with "
            "--model")


# ---------------------------------------------------------------------------------------------
# Checkpoints for inference: run folder, adapter folder or merged model folder


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
    except (json.JSONDecodeError, AttributeError):
        return False
    return any(name.endswith(CLASSIFIER_SUFFIX) for name in architectures)


def load_merged_model(folder: str | Path) -> PreTrainedModel:
    """A merged (or any fine-tuned) classifier folder, loaded as the plain transformers model
    (in fp32, as ``load_base_model``)."""
    return _from_pretrained(AutoModelForSequenceClassification.from_pretrained, str(folder),
                            "model", dtype=MODEL_DTYPE)


def load_head_model(folder: Path, base_model: str | None = None) -> PreTrainedModel:
    """The base model with the trained head of a --method head checkpoint put in place."""
    model, base_name, recorded = load_checkpoint_base(folder, base_model)
    try:
        head = load_file(folder / HEAD_WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{folder / HEAD_WEIGHTS} is damaged or missing ({error}); restore it "
                         "or train again") from error
    expected = {name: p.shape for name, p in model.state_dict().items() if is_head_parameter(name)}
    if {name: t.shape for name, t in head.items()} != expected:
        raise UsageError(f"the head in {folder} does not fit --model {base_name}: it was trained "
                         f"on {recorded!r}, a model of another shape; pass that model with --model")
    model.load_state_dict(head, strict=False)
    return model


def load_checkpoint(checkpoint: str | Path,
                    base_model: str | None = None) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) for a run folder or any checkpoint folder that train.py or merge saves.

    `base_model` replaces the recorded base model of an adapter or head checkpoint.
    """
    folder = find_checkpoint(checkpoint)
    method = checkpoint_method(folder)
    if method == "full":
        return load_merged_model(folder), load_tokenizer(str(folder))
    model = (load_adapted_model(folder, base_model) if method == "lora"
             else load_head_model(folder, base_model))
    return model, load_checkpoint_tokenizer(folder, base_model)


def load_checkpoint_tokenizer(folder: Path, base_model: str | None = None):
    """The tokenizer saved beside a checkpoint (save_checkpoint puts it there), else the base's."""
    if (folder / TOKENIZER_CONFIG).is_file():
        return load_tokenizer(str(folder))
    return load_tokenizer(base_model or checkpoint_base_model(folder))


# ---------------------------------------------------------------------------------------------
# Merging: LoRA folded into the base weights


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


def merge_adapter(checkpoint: str | Path, out: str | Path, base_model: str | None = None,
                  overwrite: bool = False) -> Path:
    """Fold a checkpoint's LoRA update into the base weights; save model and tokenizer to `out`.

    The result is a plain transformers classifier: it loads with
    ``AutoModelForSequenceClassification.from_pretrained(out)`` without peft and computes the
    same logits as base model + adapter, with no extra LoRA matrix products at inference.
    A head or full checkpoint has nothing to fold: it is saved as the same plain classifier.
    """
    folder = find_checkpoint(checkpoint)
    out = Path(out)
    # A folder holding an adapter would be read as one (transformers and peft both look for
    # adapter_config.json first), and a run folder would lose its config.json: never write
    # into either, even with --overwrite.
    if (out / ADAPTER_CONFIG).exists() or (out / HEAD_CONFIG).exists() or any(
            checkpoint_method(out / name) for name in (ADAPTER_DIR, MODEL_DIR)):
        raise UsageError(f"--out {out} holds an adapter or a run; choose a new folder for the "
                         "merged model")
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # it is swapped in whole, below
        raise UsageError(f"--out {out} holds the current folder; choose a folder of its own "
                         "for the merged model")
    check_can_write(out, "--out", overwrite)
    model, tokenizer = load_checkpoint(folder, base_model)
    # merge_and_unload writes W + (alpha / r) B A into each adapted layer, puts the trained
    # head back in place of peft's wrapper, and returns the bare transformers model: that is
    # what gets saved (saving the PeftModel would write an adapter again). safe_merge checks
    # the merged weights for NaNs before replacing the originals.
    if isinstance(model, PeftModel):
        model = model.merge_and_unload(safe_merge=True)

    def write(partial: Path) -> None:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        # How to tokenize, the classes and the fitted temperature travel with the weights.
        for name in CHECKPOINT_NOTES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, partial / name)
        # --overwrite replaces the merged model's files; the folder's other files stay (but
        # not an earlier model's notes: a temperature belongs to the weights it was fitted on).
        for entry in out.iterdir() if out.is_dir() else ():
            if entry.name not in CHECKPOINT_NOTES and not (partial / entry.name).exists():
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, partial / entry.name)

    # Only now is anything written (a refused merge leaves no folder behind), and whole or not
    # at all: a full disk or a kill leaves the previous --out folder (or none).
    write_folder(out, write)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The lora_model.py command line (one subcommand: merge)."""
    parser = argparse.ArgumentParser(
        description="Model utilities for LoRA checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge = commands.add_parser(
        "merge", help="fold a checkpoint's LoRA weights into the base model and save it as a "
                      "plain transformers model",
        description="Fold a checkpoint's LoRA weights into the base model and save a plain "
                    "transformers model plus tokenizer, loadable with "
                    "AutoModelForSequenceClassification.from_pretrained(OUT) without peft.")
    merge.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="a run folder (runs/NAME) or an adapter folder; a --method head or "
                            "full checkpoint has no LoRA update and is saved as it is")
    merge.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder for the merged model; must be new or empty unless "
                            "--overwrite")
    merge.add_argument("--overwrite", action="store_true",
                       help="allow writing into an --out folder that already holds files")
    add_model_argument(merge, default=None, help_text=(
        "base model (Hub name or folder); default: the one recorded in the checkpoint's "
        f"{ADAPTER_CONFIG} or {HEAD_CONFIG}"))
    return parser


def merge_command(args: argparse.Namespace) -> None:
    """``lora_model.py merge``: merge, then report where the model went and both sizes."""
    folder = find_checkpoint(args.checkpoint)
    out = merge_adapter(folder, args.out, args.model, args.overwrite)
    what = "adapter" if checkpoint_method(folder) == "lora" else "checkpoint"
    print(f"Merged model saved to {out} ({format_size(folder_size(out))}; the {what} "
          f"{folder} is {format_size(folder_size(folder))}). Load it with "
          f"AutoModelForSequenceClassification.from_pretrained({str(out)!r}).")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python lora_model.py merge ...``."""
    return run_command(build_parser(), merge_command, argv)


if __name__ == "__main__":
    sys.exit(main())
