"""The model: a pre-trained BERT classifier, its LoRA adapters, and saving and loading them
the standard peft way.

LoRA freezes every pre-trained weight W and learns a low-rank update on the chosen projections:
``W x + (alpha / r) * B A x`` with A (r x d) and B (d x r), B starting at zero so training
starts from the pre-trained model exactly (``wrap_with_lora``, first below). With
``task_type=SEQ_CLS`` peft also marks the new classifier head as trainable and saves it next to
A and B; without it the head would stay random and be lost on save. To show what LoRA buys,
train.py can also train the head alone (a linear probe) or every weight (``prepare_model``).

    python lora_model.py merge --checkpoint runs/NAME --out merged/NAME

folds LoRA into the weights and writes a plain transformers model, which loads with
``AutoModelForSequenceClassification.from_pretrained`` and no peft.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from machinery import hub
from machinery.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CHECKPOINT_NOTES,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    LABELS_FILE,
    MODEL_DIR,
    POOLING_FILE,
    TOKENIZER_CONFIG,
    checkpoint_base_model,
    checkpoint_label_names,
    checkpoint_method,
    checkpoint_pooling,
    find_checkpoint,
)
from machinery.cli import UsageError, check_can_write, run_command
from machinery.data_sources import BINARY_LABEL_NAMES
from machinery.files import folder_size, format_size, write_folder, write_manifest
from machinery.hub import absolute_if_local, check_encoder, from_pretrained, load_tokenizer

# The classifier head is trained in full (peft's modules_to_save), never given an adapter.
HEAD_MODULES = frozenset({"classifier", "score"})


def wrap_with_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float,
                   targets: str) -> PeftModel:
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
    """Refuse --lora-targets that name no linear layer of the encoder (before any work)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)} - HEAD_MODULES)
    missing = [t for t in parse_targets(targets) if t not in linear]
    if missing or not parse_targets(targets):
        raise UsageError(f"--lora-targets {targets!r}: no encoder linear layer named "
                         f"{', '.join(missing) or '(empty)'}; this model's are "
                         f"{', '.join(linear)}")


def prepare_model(model: PreTrainedModel, method: str, r: int, alpha: float, dropout: float,
                  targets: str) -> torch.nn.Module:
    """The model to train for `method` (checkpoints.METHODS): the LoRA settings apply to lora
    alone; head and full unfreeze the head or every weight."""
    if method == "lora":
        return wrap_with_lora(model, r, alpha, dropout, targets)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "full" or is_head_parameter(name))
    return model


def is_head_parameter(name: str) -> bool:
    """True for the classifier head's parameters ("classifier.weight", ...), not the encoder's."""
    return name.split(".", 1)[0] in HEAD_MODULES


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


# ---------------------------------------------------------------------------------------------
# The pre-trained model, and what its head reads


class MeanPoolingBertForSequenceClassification(BertForSequenceClassification):
    """BERT's sequence classifier, its head reading the mean of the token vectors instead of
    BERT's pooler over [CLS] (``--pooling mean``).

    A sentence-transformers checkpoint (all-MiniLM-L6-v2 and its kin) was trained to mean its
    token vectors: its [CLS] pooler was never trained for classification, and a head over it
    can fail to separate classes at all. Everything else is BERT's own: the same encoder, the
    dropout and the linear head, the same cross-entropy.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert.pooler = None  # unused here: no weight that never gets a gradient

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        """Logits (and the loss, given `labels`) from the mean of the unpadded token vectors."""
        kwargs.pop("return_dict", None)
        hidden = self.bert(input_ids, attention_mask=attention_mask, return_dict=True,
                           **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # 1 for a token, 0 for padding
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.view(-1, self.num_labels),
                                                           labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def resolve_pooling(pooling: str, name: str) -> str:
    """--pooling for the model `name`: "cls" or "mean" as given; "auto" is mean where the model
    declares it was trained for mean pooling (a sentence-transformers model), else the model's
    own [CLS] head, as for bert-base-uncased. Mean pooling is refused for other than BERT."""
    config = check_encoder(name)
    if pooling == "auto":
        mean = hub.declared_pooling(name) == "mean" and config.model_type == "bert"
        return "mean" if mean else "cls"
    if pooling == "mean" and config.model_type != "bert":
        raise UsageError(f"--pooling mean: --model {name} is a {config.model_type!r} model; mean "
                         "pooling is built for BERT (model_type 'bert'): use --pooling cls")
    return pooling


def pooling_of(model: torch.nn.Module) -> str:
    """How `model`'s head reads the encoder: "mean" or "cls" (a PeftModel: its base model's)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "mean" if isinstance(base, MeanPoolingBertForSequenceClassification) else "cls"


# The classifier head of the pre-trained ("before") model is random; drawing it from a fixed
# seed makes train.py's "before" row and evaluate.py --base give the same numbers every time.
HEAD_SEED = 0
# Every model is loaded in fp32, whatever dtype its files hold (see load_base_model).
MODEL_DTYPE = torch.float32
CLASSIFIERS = {"cls": AutoModelForSequenceClassification,
               "mean": MeanPoolingBertForSequenceClassification}


def load_base_model(name: str, label_names: tuple[str, ...] = BINARY_LABEL_NAMES,
                    pooling: str = "auto") -> PreTrainedModel:
    """The pre-trained encoder in fp32 with a new classifier head drawn from ``HEAD_SEED``,
    one output per class of `label_names` (which the config records as id2label), reading
    the encoder's output the `pooling` way (``resolve_pooling``).

    transformers 5 loads weights in the dtype they were stored in (``dtype="auto"``): a model
    saved in fp16 would train an fp16 head and LoRA weights, which AdamW updates in steps
    smaller than fp16 can hold and which the fp16 GradScaler refuses to unscale. Weights stay
    fp32; autocast computes in bf16/fp16 where asked.
    """
    classifier = CLASSIFIERS[resolve_pooling(pooling, name)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return from_pretrained(
            classifier.from_pretrained, name, "model",
            dtype=MODEL_DTYPE, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)})


def label_names_of(model: torch.nn.Module) -> tuple[str, ...]:
    """The class names of a classifier (a PeftModel's are its base model's), in id order."""
    config = model.config
    return tuple(config.id2label[i] for i in range(config.num_labels))


# ---------------------------------------------------------------------------------------------
# Checkpoints: saving and loading what each --method trained


def save_adapter(model: PeftModel, tokenizer, folder: Path) -> None:
    """Save adapter + head in peft's format (adapter_config.json, adapter_model.safetensors).

    The tokenizer goes alongside so the folder alone is enough to run the model.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: Path, method: str) -> None:
    """Save what `method` trained, in the smallest form that loads back exactly, with the tokenizer.

    lora: peft's adapter (A, B and the head). head: the head's weights and the base model's
    name (a few kB; the frozen encoder is the base model's). full: every weight, as a plain
    transformers model folder, the format of a merged model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LABELS_FILE).write_text(json.dumps(list(label_names_of(model))) + "\n")
    (folder / POOLING_FILE).write_text(json.dumps({"pooling": pooling_of(model)}) + "\n")
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
        model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
        check_adapter_fits(model, adapter, base_name, recorded)
        return model
    except SafetensorError as error:
        raise UsageError(f"{adapter / ADAPTER_WEIGHTS} is damaged ({error}); restore it or "
                         "train again") from error
    except RuntimeError as error:  # torch's "size mismatch for ..." when shapes differ
        if "size mismatch" not in str(error):
            raise
        raise UsageError(
            f"the adapter in {adapter} does not fit --model {base_name}: it was trained on "
            f"{recorded!r}, a model of another shape; pass that model with --model") from error


def check_adapter_fits(model: PeftModel, adapter: Path, base_name: str, recorded: str) -> None:
    """Refuse an adapter that loaded into a base model of another architecture or depth: peft
    fills the adapter weights the model has no file entry for with their start values (B = 0:
    no update at all), and skips the file's entries the model has no place for, silently."""
    with safe_open(adapter / ADAPTER_WEIGHTS, framework="pt") as weights:
        saved = len(list(weights.keys()))
    taken = sum(1 for name, _ in model.named_parameters()
                if ".lora_" in name or ".modules_to_save." in name)
    if saved != taken:
        raise UsageError(
            f"the adapter in {adapter} does not fit --model {base_name}: it holds {saved} "
            f"weights where the model takes {taken}, so the model is another architecture or "
            f"depth than {recorded!r}, the one it was trained on; pass that model with --model")


def load_checkpoint_base(folder: Path,
                         base_model: str | None) -> tuple[PreTrainedModel, str, str]:
    """The base model a LoRA or head checkpoint builds on: (model, its name, the recorded name).

    `base_model` replaces the recorded one (a local copy of the same model, say); its vocabulary
    must then match the tokenizer saved with the checkpoint.
    """
    recorded = checkpoint_base_model(folder)
    base_name = base_model or recorded
    model = load_base_model(base_name, checkpoint_label_names(folder), checkpoint_pooling(folder))
    if base_model and absolute_if_local(base_model) != absolute_if_local(recorded):
        check_same_vocabulary(folder, base_name)
        print(f"warning: --model {base_model} is not the model the checkpoint in {folder} was "
              f"trained on ({recorded}); its vocabulary matches, so it is used (a checkpoint on "
              "a model of another shape is refused)", file=sys.stderr)
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


def load_merged_model(folder: str | Path) -> PreTrainedModel:
    """A merged (or any fine-tuned) classifier folder, loaded as the plain transformers model
    (in fp32, as ``load_base_model``), its head reading the encoder as its ``POOLING_FILE``
    says: a mean-pooling model is a ``MeanPoolingBertForSequenceClassification``."""
    classifier = CLASSIFIERS[checkpoint_pooling(Path(folder))]
    return from_pretrained(classifier.from_pretrained, str(folder), "model", dtype=MODEL_DTYPE)


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
        write_manifest(partial)  # last: a damaged file is found before it is used

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
    merge.add_argument("--model", metavar="MODEL", help=(
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
