"""Loading a pre-trained model's config and tokenizer, from the Hugging Face Hub or a folder,
with what would fail later (or silently) refused at once in one sentence: no Hub, a damaged
weights file, a model that is no BERT-style encoder, a tokenizer that does not fit the model.
And what the model says of the pooling it was trained for (``declared_pooling``).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from machinery.checkpoints import MODEL_CONFIG
from machinery.cli import UsageError
from machinery.data_sources import looks_like_path

# A tokenizer with fewer tokens than this share of the model's embedding table is refused (see
# check_tokenizer_fits).
MIN_TOKENIZER_SHARE = 0.5
# Encoders whose self-attention has BERT's "query"/"value" projections and a
# sequence-classification head in transformers.
BERT_STYLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra",
                                    "ernie", "megatron-bert"})
# A sentence-transformers model lists its modules (the transformer, then its pooling) in this
# file, and keeps the pooling's settings in the folder that entry names.
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
SENTENCE_TRANSFORMERS_POOLING = "sentence_transformers.models.Pooling"
POOLING_CONFIG = "config.json"


def from_pretrained(loader, name: str, what: str, **kwargs):
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
    config = from_pretrained(AutoConfig.from_pretrained, name, "model")
    if config.model_type not in BERT_STYLE_MODEL_TYPES:
        found = ", ".join(config.architectures or []) or "no architecture listed"
        raise UsageError(
            f"--model {name} is a {config.model_type!r} model ({found}); this project "
            f"fine-tunes BERT-style encoders ({', '.join(sorted(BERT_STYLE_MODEL_TYPES))})")
    return config


def load_tokenizer(name: str):
    """The model's fast tokenizer (in transformers 5 every BERT tokenizer is the fast one),
    refused when it does not fit the model (see ``check_tokenizer_fits``)."""
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
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


def declared_pooling(name: str) -> str | None:
    """The pooling a model says it was trained for: "mean" or "cls" for a sentence-transformers
    model (its modules.json and pooling config: a local folder, or the Hub repo's files), None
    for any other model, or where the files cannot be read (offline, say)."""
    try:
        modules = json.loads(read_model_file(name, SENTENCE_TRANSFORMERS_MODULES))
        pooling = next(module for module in modules
                       if module.get("type") == SENTENCE_TRANSFORMERS_POOLING)
        settings = json.loads(read_model_file(
            name, f"{pooling['path']}/{POOLING_CONFIG}".lstrip("/")))
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
        return None  # no sentence-transformers files: the model's own head
    if settings.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if settings.get("pooling_mode_cls_token") else None


def read_model_file(name: str, file: str) -> str:
    """A file of a model: from its folder, else from its Hub repo (cached, or downloaded)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return (folder / file).read_text()
    return Path(hf_hub_download(name, file)).read_text()


def absolute_if_local(model: str) -> str:
    """A --model that names a local folder, as an absolute path (a Hub name as it is)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
