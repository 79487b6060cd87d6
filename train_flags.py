"""train.py's command line: every flag with its default, its help and its resume rule.

Each flag declares (``cli.add_flag``) whether a resumed run may give it another value:
``ADJUSTABLE_ON_RESUME`` collects the ones that may. The data, LoRA and runtime flags that
evaluate.py and predict.py share are defined beside their code (data.py, lora_model.py,
runtime.py) and added here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import (
    ADJUSTABLE,
    FIXED,
    add_flag,
    at_least,
    non_negative_float,
    positive_float,
    resume_rules,
    unit_fraction,
)
from data import add_data_arguments
from lora_model import DEFAULT_METHOD, METHODS, add_lora_arguments, add_model_argument
from runtime import add_runtime_arguments

# The default --lr of each --method. Full fine-tuning nudges pre-trained weights and wants
# 2e-5..5e-5 (BERT paper). LoRA trains few, freshly initialised weights and wants a far larger
# step: the LoRA paper used 4e-4..5e-4 for RoBERTa-base (r=8). A linear probe trains a new head
# alone on fixed features and takes larger steps still.
DEFAULT_LRS = {"lora": 5e-4, "head": 1e-3, "full": 3e-5}
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEED = 42
DEFAULT_VALIDATION_SIZE = 0.1
DEFAULT_SAVE_EVERY = 200


def build_parser() -> argparse.ArgumentParser:
    """The train.py command line."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a BERT classifier with LoRA on IMDB reviews (or, to compare, "
                    "its head alone or every weight) and compare it with the pre-trained "
                    "model.")
    add_model_argument(parser)
    add_flag(parser, FIXED, "--method", choices=METHODS, default=DEFAULT_METHOD,
             help="what to train: " + "; ".join(
                 f"{name} = {what}" for name, what in METHODS.items())
             + f" (default: {DEFAULT_METHOD})")
    add_flag(parser, ADJUSTABLE, "--output-dir", type=Path, default=None,
             help="run folder for the best checkpoint, snapshots, metrics and logs "
                  "(default: runs/<model>-<method>-<date-time>)")
    add_flag(parser, ADJUSTABLE, "--overwrite", action="store_true",
             help="start over in an --output-dir that already holds files "
                  "(a finished or unfinished run's files are deleted first)")
    add_flag(parser, ADJUSTABLE, "--resume", action="store_true",
             help="continue the unfinished run in --output-dir from its latest "
                  "snapshot (running the same command again does this too; the "
                  "flag makes it an error when there is nothing to resume)")
    add_flag(parser, FIXED, "--seed", type=at_least(0), default=DEFAULT_SEED,
             help="seed for LoRA init, dropout and batch order "
                  f"(default: {DEFAULT_SEED})")
    add_data_arguments(parser)
    group = parser.add_argument_group("training data")
    add_flag(group, FIXED, "--train-samples", type=at_least(1), default=None, metavar="N",
             help="train on N reviews drawn with the subset rule (default: all that "
                  "the validation split leaves)")
    add_flag(group, FIXED, "--validation-size", type=positive_float,
             default=DEFAULT_VALIDATION_SIZE,
             help="validation reviews carved (stratified, seeded) out of the training "
                  "split: a fraction of the training reviews (<1) or a count (>=1) "
                  f"(default: {DEFAULT_VALIDATION_SIZE})")
    add_flag(group, FIXED, "--labels", type=class_names, default=None, metavar="A,B,...",
             help="the class names in id order, comma-separated: string labels must be "
                  "among them, integer labels are ids into them (default: 0/1 and "
                  "neg/pos/negative/positive are negative, positive; other integers are "
                  "0..K-1; strings are sorted)")
    add_flag(group, FIXED, "--group-by-length", action="store_true",
             help="batch training reviews of similar length (shuffled groups, a new "
                  "random draw every epoch): less padding, faster with --max-length "
                  "above 128 (default: off, plain random batches)")
    group = parser.add_argument_group("optimisation")
    add_flag(group, FIXED, "--epochs", type=at_least(1), default=1,
             help="passes over the training reviews (default: 1)")
    add_flag(group, FIXED, "--batch-size", type=at_least(1), default=DEFAULT_BATCH_SIZE,
             help="training batch size per process (per GPU under torchrun) "
                  f"(default: {DEFAULT_BATCH_SIZE})")
    add_flag(group, FIXED, "--grad-accum-steps", type=at_least(1), default=1,
             help="batches whose gradients are averaged per optimizer step; the "
                  "effective batch is batch-size x processes x this (default: 1)")
    add_flag(group, FIXED, "--lr", type=positive_float, default=None,
             help="peak AdamW learning rate (default: by --method, " + ", ".join(
                 f"{method} {lr:g}" for method, lr in DEFAULT_LRS.items())
             + "; see docs/reference.md)")
    add_flag(group, FIXED, "--weight-decay", type=non_negative_float, default=0.01,
             help="AdamW weight decay, not applied to biases and LayerNorm "
                  "(default: 0.01)")
    add_flag(group, FIXED, "--warmup-ratio", type=unit_fraction, default=0.06,
             help="fraction of optimizer steps with linear warm-up, then linear "
                  "decay to 0 (default: 0.06)")
    add_flag(group, FIXED, "--max-grad-norm", type=non_negative_float, default=1.0,
             help="clip the gradient norm to this; 0 disables (default: 1.0)")
    add_flag(group, FIXED, "--eval-every", type=at_least(1), default=None, metavar="STEPS",
             help="also validate every STEPS optimizer steps (default: only at the "
                  "end of each epoch)")
    add_flag(group, ADJUSTABLE, "--log-every", type=at_least(1), default=10, metavar="STEPS",
             help="log loss, learning rate and speed every STEPS optimizer steps "
                  "(default: 10)")
    add_flag(group, ADJUSTABLE, "--save-every", type=at_least(1), default=DEFAULT_SAVE_EVERY,
             metavar="STEPS",
             help="write a resumable snapshot every STEPS optimizer steps, as well "
                  f"as at the end of each epoch (default: {DEFAULT_SAVE_EVERY})")
    add_lora_arguments(parser)
    add_runtime_arguments(parser)
    add_flag(parser, ADJUSTABLE, "--compile", action="store_true",
             help="torch.compile the model for training and validation; compiling "
                  "takes minutes, so it pays only on long runs (default: off; see "
                  "BENCHMARKS.md)")
    return parser


def class_names(text: str) -> tuple[str, ...]:
    """--labels: comma-separated class names, at least two, none empty or repeated."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or "" in names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two or more distinct class names, comma-separated (a,b,c)")
    return names


def fill_flag_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on other flags: --lr by --method; and a --model folder as an
    absolute path, which adapter_config.json records, so that the checkpoint loads from any
    working directory."""
    if args.lr is None:
        args.lr = DEFAULT_LRS[args.method]
    if Path(args.model).expanduser().exists():
        args.model = str(Path(args.model).expanduser().resolve())


def describe_method(args: argparse.Namespace) -> str:
    """What the run trains and how fast, in words: 'LoRA r=8, alpha=32 on query,value, lr
    0.002' (or the --method's own description)."""
    what = (f"LoRA r={args.lora_r}, alpha={args.lora_alpha:g} on {args.lora_targets}"
            if args.method == "lora" else METHODS[args.method])
    return f"{what}, lr {args.lr:g}"


# The flags a resumed run may change, as each declares where it is defined (add_flag).
ADJUSTABLE_ON_RESUME = {dest for dest, rule in resume_rules(build_parser()).items()
                        if rule == ADJUSTABLE}
