"""The model: a BERT classifier, its LoRA adapters, and saving/loading them the standard peft way.

LoRA freezes every pre-trained weight W and learns a low-rank update on the chosen projections:
``W x + (alpha / r) * B A x`` with A (r x d) and B (d x r), B starting at zero so training
starts from the pre-trained model exactly. With ``task_type=SEQ_CLS`` peft also marks the new
classifier head as trainable and saves it next to A and B; without it the head would stay
random and be lost on save.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from data import (
    LABEL_NAMES,
    UsageError,
    at_least,
    looks_like_path,
    positive_float,
    unit_fraction,
)

DEFAULT_MODEL = "bert-base-uncased"
# The classifier head of the pre-trained ("before") model is random; drawing it from a fixed
# seed makes train.py's "before" row and evaluate.py --base give the same numbers every time.
HEAD_SEED = 0
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 32
DEFAULT_LORA_DROPOUT = 0.1
DEFAULT_LORA_TARGETS = "query,value"
ADAPTER_DIR = "adapter"  # where train.py keeps the best adapter inside a run folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Encoders whose self-attention has BERT's "query"/"value" projections and a
# sequence-classification head in transformers.
BERT_STYLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra",
                                    "ernie", "megatron-bert"})


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                       help_text: str | None = None) -> None:
    """Add ``--model`` (a Hub model name or a local folder)."""
    parser.add_argument(
        "--model", default=default,
        help=help_text or f"Hub model name or local model folder (default: {DEFAULT_MODEL})")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA hyper-parameter flags."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=at_least(1), default=DEFAULT_LORA_R,
                       help=f"rank r of the update B A (default: {DEFAULT_LORA_R})")
    group.add_argument("--lora-alpha", type=positive_float, default=DEFAULT_LORA_ALPHA,
                       help="scaling alpha; the update is multiplied by alpha / r "
                            f"(default: {DEFAULT_LORA_ALPHA})")
    group.add_argument("--lora-dropout", type=unit_fraction, default=DEFAULT_LORA_DROPOUT,
                       help="dropout on the LoRA branch's input during training "
                            f"(default: {DEFAULT_LORA_DROPOUT})")
    group.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS,
                       help="comma-separated names of the linear layers that get adapters "
                            f"(default: {DEFAULT_LORA_TARGETS}, BERT's attention projections)")


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Call a ``from_pretrained`` and turn "cannot reach the Hub" into one clear sentence."""
    if not Path(name).expanduser().exists() and looks_like_path(name):
        raise UsageError(f"--model folder {name} does not exist")
    try:
        return loader(name, **kwargs)
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
    """The model's fast tokenizer (in transformers 5 every BERT tokenizer is the fast one)."""
    return _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")


def load_base_model(name: str) -> PreTrainedModel:
    """The pre-trained encoder with a new 2-label classifier head drawn from ``HEAD_SEED``."""
    check_encoder(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return _from_pretrained(
            AutoModelForSequenceClassification.from_pretrained, name, "model",
            num_labels=len(LABEL_NAMES),
            id2label=dict(enumerate(LABEL_NAMES)),
            label2id={label: i for i, label in enumerate(LABEL_NAMES)})


def wrap_with_lora(model: PreTrainedModel, r: int = DEFAULT_LORA_R,
                   alpha: float = DEFAULT_LORA_ALPHA, dropout: float = DEFAULT_LORA_DROPOUT,
                   targets: str = DEFAULT_LORA_TARGETS) -> PeftModel:
    """Freeze `model` and add LoRA adapters; the classifier head stays trainable (SEQ_CLS)."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # also trains and saves the head ("modules_to_save")
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=parse_targets(targets))
    return get_peft_model(model, config)


def parse_targets(targets: str) -> list[str]:
    """"query, value" -> ["query", "value"]."""
    return [t.strip() for t in targets.split(",") if t.strip()]


def check_lora_targets(model: torch.nn.Module, targets: str) -> None:
    """Refuse --lora-targets that name no layer of `model` (before any work is done)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in parse_targets(targets) if t not in names]
    if missing or not parse_targets(targets):
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise UsageError(f"--lora-targets {targets!r}: no layer named "
                         f"{', '.join(missing) or '(empty)'}; this model's linear layers are "
                         f"{', '.join(linear)}")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's copy of the head is counted once."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_parameters(model: torch.nn.Module) -> str:
    """'trainable 74,498 of 22,788,484 parameters (0.33%)'."""
    trainable, total = parameter_counts(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


def save_adapter(model: PeftModel, tokenizer, folder: Path) -> None:
    """Save adapter + head in peft's format (adapter_config.json, adapter_model.safetensors).

    The tokenizer goes alongside so the folder alone is enough to run the model.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def find_adapter(path: str | Path) -> Path:
    """The adapter folder for `path`: the folder itself, or a run folder's ``adapter/``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--checkpoint {path} does not exist")
    for folder in (path, path / ADAPTER_DIR):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise UsageError(f"--checkpoint {path} is neither an adapter folder ({ADAPTER_CONFIG}) nor "
                     f"a run folder with {ADAPTER_DIR}/{ADAPTER_CONFIG}")


def adapter_base_model(adapter: Path) -> str:
    """The base model name or folder an adapter was trained on, from its config."""
    return json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_adapted_model(checkpoint: str | Path, base_model: str | None = None,
                       trainable: bool = False) -> PeftModel:
    """Base model + saved adapter and head, via stock ``PeftModel.from_pretrained``.

    peft loads adapters frozen (``is_trainable=False``), which is right for evaluation;
    pass ``trainable=True`` to continue training them.
    """
    adapter = find_adapter(checkpoint)
    recorded = adapter_base_model(adapter)
    base_name = base_model or recorded
    base = load_base_model(base_name)
    if base_model and base_model != recorded:
        check_same_vocabulary(adapter, base_name)
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


def check_same_vocabulary(adapter: Path, base_name: str) -> None:
    """Refuse a base model whose vocabulary differs from the one saved with the adapter."""
    if not (adapter / "tokenizer_config.json").is_file():
        return  # an adapter saved without its tokenizer: nothing to compare against
    saved = AutoTokenizer.from_pretrained(adapter).get_vocab()
    if load_tokenizer(base_name).get_vocab() != saved:
        raise UsageError(
            f"--model {base_name} has another vocabulary than the one the adapter in {adapter} "
            f"was trained with ({adapter_base_model(adapter)!r}); pass that model with --model")
