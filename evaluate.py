"""Score the pre-trained model and any number of checkpoints on the IMDB test reviews.

    python evaluate.py --base --checkpoint runs/NAME [--checkpoint runs/OTHER ...]

Each checkpoint is scored on the reviews tokenized as it was trained (its recorded
--truncation and --max-length), unless the flags say otherwise.

This file also holds what train.py shares with it: the one evaluation function
(``score_model``; ``evaluate_model`` is its metrics alone) that produced every number either
script prints. evaluate.py runs in one
process; under torchrun train.py has each rank score a share of the reviews, and
``evaluate_model`` gathers the shares back into one set of metrics. (Not to be confused with
Hugging Face's ``evaluate`` package, which this project does not use.)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from tqdm.auto import tqdm

from data import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TRUNCATION,
    PaddingCollator,
    Preprocessing,
    make_loader,
    move_to_device,
    resolve_preprocessing,
    take_subset,
    tokenize,
    tokenizer_fingerprint,
)
from lora_model import label_names_of, load_base_model, load_checkpoint
from machinery.checkpoints import (
    checkpoint_base_model,
    checkpoint_label_names,
    checkpoint_pooling,
    find_checkpoint,
)
from machinery.cli import (
    UsageError,
    add_options,
    check_can_write,
    check_distinct_files,
    option,
    run_command,
)
from machinery.data_sources import BINARY_LABEL_NAMES, ID, LABEL, ROW, load_split
from machinery.files import write_file, write_json
from machinery.hub import load_tokenizer
from machinery.options import (
    DataOptions,
    MaxLength,
    RuntimeOptions,
    Truncation,
    fill_device_defaults,
)
from machinery.report import metric_names, plot_comparison
from machinery.runtime import (
    autocast,
    is_distributed,
    is_main_process,
    pick_device,
    pick_precision,
    print_main,
    use_device,
)
from machinery.stats import (
    UNCALIBRATED,
    add_calibration_argument,
    format_comparisons,
    interval_and_calibration,
    mean_cross_entropy,
    paired_comparison,
    scale_logits,
    softmax,
    temperature_to_apply,
)

PLOT_FORMATS = (".png", ".svg", ".pdf")  # the image types --plot can write


@dataclass
class ScoringPreprocessing:
    """preprocessing: how the reviews are cut, as each checkpoint was trained unless given"""

    max_length: MaxLength | None = option(
        default_text=f"the checkpoint's, recorded by train.py, else {DEFAULT_MAX_LENGTH}")
    """Tokens read per review, [CLS] and [SEP] included; longer reviews are truncated."""
    truncation: Truncation | None = option(
        default_text=f"the checkpoint's, recorded by train.py, else {DEFAULT_TRUNCATION}")
    """Which tokens of a longer review are kept: head, tail or head+tail (data.py; Sun et al.
    2019 kept the first 128 and the last 382 of 512)."""


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, loader, device: torch.device, precision: str,
                   desc: str = "Evaluating") -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over `loader`: (logits as float32 [n, K], labels [n]) in the order scored."""
    model.eval()
    logits = [torch.empty((0, model.config.num_labels), device=device)]  # a rank may get none
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for batch in tqdm(loader, desc=desc, leave=False, disable=not is_main_process()):
        # Worker processes deliver CPU batches (they must not touch CUDA); the main process's
        # collator has already moved its own, and then this costs nothing.
        batch = move_to_device(batch, device)
        with autocast(device, precision):
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # Kept on the device until the end: no host synchronisation per batch.
        logits.append(output.logits.float())
        labels.append(batch["labels"])
    return torch.cat(logits).cpu().numpy(), torch.cat(labels).cpu().numpy()


def gather_in_order(logits: np.ndarray, labels: np.ndarray,
                    positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (logits, labels) joined and put back in dataset order.

    `positions` are the dataset positions of this rank's rows, in the order they were scored
    (evaluation loaders score the longest reviews first). Each position must come from exactly
    one rank (``evaluation_shard`` guarantees it), so nothing is counted twice.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if is_distributed():
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (logits, labels, positions))
        logits = np.concatenate([shard[0] for shard in shards])
        labels = np.concatenate([shard[1] for shard in shards])
        positions = np.concatenate([shard[2] for shard in shards])
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(positions[order], np.arange(len(positions))):
        raise RuntimeError("the ranks' evaluation shards overlap or leave gaps; build the "
                           "evaluation loader with make_loader(shuffle=False, rank, world_size)")
    return logits[order], labels[order]


def predict_in_order(model: torch.nn.Module, loader, device: torch.device, precision: str,
                     desc: str = "Evaluating") -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of an evaluation loader, in dataset order.

    The loader scores the longest reviews first (and under torchrun only this rank's share);
    this puts all of them back in the order of the dataset.
    """
    logits, labels = predict_logits(model, loader, device, precision, desc)
    return gather_in_order(logits, labels, positions=list(loader.sampler))


def compute_metrics(labels: np.ndarray, logits: np.ndarray,
                    label_names: tuple[str, ...] = BINARY_LABEL_NAMES,
                    temperature: float = UNCALIBRATED) -> dict:
    """Accuracy, precision/recall/F1, the loss and the confusion matrix.

    The loss is the mean cross-entropy of softmax(logits / temperature) (machinery/stats.py); the
    predicted classes are the raw logits' argmax, which no temperature changes.

    Two classes: precision, recall and F1 of the positive class (id 1). K > 2 classes: their
    macro (every class weighs the same) and weighted (by support) means, named macro_f1 etc.,
    and ``per_class``: precision, recall, F1 and support of each class by name.
    """
    predictions = logits.argmax(axis=-1)
    ids = list(range(len(label_names)))
    loss = mean_cross_entropy(logits, labels, temperature)
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if len(label_names) == 2:
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predictions, average="binary", pos_label=1, zero_division=0)
        metrics.update(precision=float(precision), recall=float(recall), f1=float(f1))
    else:
        for average in ("macro", "weighted"):
            precision, recall, f1, _ = precision_recall_fscore_support(
                labels, predictions, labels=ids, average=average, zero_division=0)
            metrics.update({f"{average}_precision": float(precision),
                            f"{average}_recall": float(recall), f"{average}_f1": float(f1)})
        per_class = precision_recall_fscore_support(labels, predictions, labels=ids,
                                                    zero_division=0)
        metrics["per_class"] = {
            name: {"precision": float(p), "recall": float(r), "f1": float(f),
                   "support": int(n)}
            for name, p, r, f, n in zip(label_names, *per_class, strict=True)}
    metrics.update(loss=float(loss), n=len(labels),
                   confusion_matrix=confusion_matrix(labels, predictions, labels=ids).tolist())
    return metrics


@dataclass
class Scores:
    """A model scored on a split: its metrics, and each example's raw logits and true class
    (in dataset order), with the temperature the metrics were computed at."""

    metrics: dict
    logits: np.ndarray  # float32 [n, K], before any temperature
    labels: np.ndarray
    temperature: float

    def probabilities(self) -> np.ndarray:
        """Class probabilities as the metrics saw them: softmax(logits / temperature)."""
        return softmax(scale_logits(self.logits, self.temperature))


def score_model(model: torch.nn.Module, loader, device: torch.device, precision: str,
                temperature: float = UNCALIBRATED, desc: str = "Evaluating") -> Scores:
    """The one evaluation both scripts use: `model` on every example of `loader`, its logits
    divided by `temperature` (machinery/stats.py; 1 = the model's own probabilities).

    Under torchrun every rank scores its share (``make_loader`` hands out whole batches, so
    each logit is the one a single process computes) and gets the scores of the whole set.
    """
    logits, labels = predict_in_order(model, loader, device, precision, desc)
    metrics = compute_metrics(labels, logits, label_names_of(model), temperature)
    return Scores(metrics, logits, labels, temperature)


def never_predicted(scores: Scores, label_names: tuple[str, ...]) -> list[str]:
    """'no positive review (100 of the 200 are positive)' for each class that not one review
    was predicted as: a class the model never names has collapsed into the others."""
    predicted = set(scores.logits.argmax(axis=-1).tolist())
    counts = np.bincount(scores.labels, minlength=len(label_names))
    return [f"no {name} review ({counts[k]} of the {len(scores.labels)} are {name})"
            for k, name in enumerate(label_names) if k not in predicted]


def warn_if_a_class_collapsed(scores: Scores, label_names: tuple[str, ...]) -> None:
    """A warning line for each class that not one review was predicted as (``never_predicted``):
    after training, a class that collapsed into the others."""
    for collapsed in never_predicted(scores, label_names):
        print_main(f"warning: the fine-tuned model predicts {collapsed}: that class "
                   "collapsed into others (docs/reference.md: the pooling)")


def evaluate_model(model: torch.nn.Module, loader, device: torch.device, precision: str,
                   desc: str = "Evaluating") -> dict:
    """The metrics of ``score_model`` with the model's own probabilities (train.py's "before"
    row and its validations)."""
    return score_model(model, loader, device, precision, desc=desc).metrics


def format_comparison(results: list[tuple[str, dict]]) -> str:
    """A side-by-side metrics table; with exactly two results a change column is added."""
    names = [name for name, _ in results]
    show_change = len(results) == 2
    header = ["metric", *names] + (["change"] if show_change else [])
    rows = [header]
    for metric in metric_names(results[0][1]):
        values = [metrics[metric] for _, metrics in results]
        row = [metric, *(f"{v:.4f}" for v in values)]
        if show_change:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    rows.append(["n", *(str(metrics["n"]) for _, metrics in results)]
                + ([""] if show_change else []))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    # More than two classes: each result's per-class table below.
    return "\n\n".join(["\n".join(lines), *(format_per_class(name, metrics)
                                             for name, metrics in results
                                             if "per_class" in metrics)])


def format_per_class(name: str, metrics: dict) -> str:
    """The per-class table of a K > 2 result."""
    width = max(len(label) for label in metrics["per_class"])
    lines = [f"{name}, per class:", f"{'class'.ljust(width)}  precision  recall      f1  support"]
    lines += [f"{label.ljust(width)}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}"
              f"  {m['support']:7d}" for label, m in metrics["per_class"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The evaluate.py command


def build_parser() -> argparse.ArgumentParser:
    """The evaluate.py command line."""
    parser = argparse.ArgumentParser(
        description="Compare the pre-trained model and fine-tuned checkpoints on the test "
                    "reviews (accuracy, precision, recall, F1, loss).")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="a run folder (runs/NAME) or a checkpoint folder (adapter, head, "
                             "merged or full model); repeat to compare several")
    parser.add_argument("--base", action="store_true",
                        help="also score the pre-trained model with its seeded random head, "
                             "the 'before' row of train.py")
    parser.add_argument("--model", help=(
        "base model (Hub name or folder) for --base and for adapter and head checkpoints; "
        "default: the one recorded in the first adapter or head checkpoint (a full or merged "
        "checkpoint holds every weight and does not use it)"))
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the results to this JSON file: a row per model (with "
                             "its accuracy's 95%% Wilson interval, ECE and Brier score) and "
                             "a paired comparison of each row with the first")
    parser.add_argument("--predictions", type=Path, metavar="PATH",
                        help="also write each scored review's true class and every model's "
                             "class probabilities to this JSON Lines file, in data order")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --json, --predictions and --plot to replace existing files")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="also draw the results into this image (.png, .svg or .pdf): "
                             "accuracy, precision, recall and F1 side by side, and each "
                             "model's confusion matrix, and a reliability diagram of each "
                             "model's confidence against its accuracy")
    add_calibration_argument(parser)
    for options in (DataOptions, ScoringPreprocessing, RuntimeOptions):
        add_options(parser, options)
    return parser


def prediction_lines(test, labels: np.ndarray, probabilities: dict[str, np.ndarray]) -> str:
    """--predictions: a JSON line per scored review, in data order: its position among the
    scored reviews, its row in the test split it came from (and the data's id, where it has an
    id column: what joins a line back to the user's data), its true class id and each model's
    class probabilities (softmax of the logits)."""
    joins = {key: test[key] for key in (ROW, ID) if key in test.column_names}
    return "".join(json.dumps({"index": i, **{key: values[i] for key, values in joins.items()},
                               "label": int(label), "probabilities": {
        name: rows[i].tolist() for name, rows in probabilities.items()}}) + "\n"
        for i, label in enumerate(labels))


def calibration_note(rows: list[dict], calibrate: bool) -> str:
    """Which rows' probabilities were divided by a stored temperature and which are raw."""
    scaled = [f"{row['name']} (T = {row['temperature']:.3g})" for row in rows
              if row["temperature"] != UNCALIBRATED]
    raw = [row["name"] for row in rows
           if row["checkpoint"] is not None and row["temperature"] == UNCALIBRATED]
    if not calibrate:
        return "Raw probabilities (--no-calibration)"
    notes = []
    if scaled:
        notes.append("Probabilities divided by the temperature fitted on the validation split: "
                     f"{', '.join(scaled)} (--no-calibration shows the raw ones; accuracy and "
                     "F1 are the same either way)")
    if raw:
        notes.append(f"Raw probabilities (no fitted temperature stored): {', '.join(raw)}"
                     + ("; their loss, ECE and Brier compare with the others' only raw, under "
                        "--no-calibration" if scaled else ""))
    return "\n".join(notes) or "Raw probabilities: the base model has no temperature"


def evaluation_loader(tokenizer, split, preprocessing: Preprocessing, batch_size: int,
                      num_workers: int, device: torch.device, rank: int = 0,
                      world_size: int = 1):
    """The reviews of `split` (test or validation) tokenized for `tokenizer` as `preprocessing`
    says, in a fixed-order evaluation loader (longest first). Under torchrun it holds rank
    `rank`'s share of the reviews (see ``make_loader``)."""
    tokens = tokenize(split, tokenizer, preprocessing.max_length, preprocessing.truncation)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    return make_loader(tokens, batch_size, collator, shuffle=False, num_workers=num_workers,
                       rank=rank, world_size=world_size)


def run(args: argparse.Namespace) -> list[dict]:
    """Score every requested model; print the table; return the JSON rows."""
    check_outputs(args)
    checkpoints = [find_checkpoint(path) for path in args.checkpoint]
    # Each checkpoint's probabilities as train.py scored its "after" row: divided by the
    # temperature fitted on the validation split, unless --no-calibration.
    temperatures = {c: temperature_to_apply(c, args.calibrate) for c in checkpoints}
    base_name, label_names = base_model_and_classes(checkpoints, args.model, args.base)
    device = pick_device(args.device)
    use_device(device)
    fill_device_defaults(args, device)
    precision = pick_precision(args.precision, device)
    # The checkpoints' classes, which the test labels must be among; --base alone: the data's.
    test = take_subset(load_split(args.data, "test", args.text_column, args.label_column,
                                  label_names), args.eval_samples, args.data_seed)
    print(f"Scoring {len(test)} test reviews on {device} in {precision}", file=sys.stderr)
    models = ([("base", None)] if args.base else []) + [(str(p), p) for p in checkpoints]
    rows, labels, probabilities = score_rows(models, temperatures, base_name, test, args, device,
                                             precision)
    # Every row scored the same reviews in data order, so `labels` are every row's labels and
    # the rows compare review by review: each against the first (the base model with --base).
    first = rows[0]["name"]
    comparisons = [paired_comparison(first, row["name"], labels, probabilities[first],
                                     probabilities[row["name"]]) for row in rows[1:]]
    print(format_comparison([(row["name"], row) for row in rows]))
    print("\n" + format_comparisons(rows, comparisons))
    print(calibration_note(rows, args.calibrate), file=sys.stderr)
    write_outputs(args, rows, comparisons, test, labels, probabilities)
    return rows


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, nothing to score and output files that cannot be written."""
    if not args.base and not args.checkpoint:
        raise UsageError("nothing to evaluate: give --base and/or --checkpoint PATH")
    if args.plot and args.plot.suffix.lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot {args.plot} must end in {', '.join(PLOT_FORMATS)}")
    outputs = {"--json": args.json, "--predictions": args.predictions, "--plot": args.plot}
    for flag, path in outputs.items():
        if path:
            check_can_write(path, flag, args.overwrite, kind="file")
    check_distinct_files(outputs)


def base_model_and_classes(checkpoints: list[Path], model: str | None,
                           base: bool) -> tuple[str | None, tuple[str, ...] | None]:
    """The base model for --base and the adapter and head checkpoints (--model, else the one
    they record), and the classes they were trained on (None: no checkpoint says)."""
    bases = {checkpoint_base_model(c) for c in checkpoints} - {None}
    if len(bases) > 1 and not model:
        # --model replaces every checkpoint's base model; with two there is no one choice.
        raise UsageError(f"the checkpoints were trained on different base models "
                         f"({', '.join(sorted(bases))}); evaluate them in separate runs")
    label_sets = {checkpoint_label_names(c) for c in checkpoints}
    if len(label_sets) > 1:
        raise UsageError("the checkpoints were trained on different classes ("
                         + "; ".join(", ".join(names) for names in sorted(label_sets))
                         + "); evaluate them in separate runs")
    base_name = model or next(iter(bases), None)
    if base and base_name is None:
        raise UsageError("--base needs --model (or an adapter or head --checkpoint to read the "
                         "base model from)")
    return base_name, next(iter(label_sets), None)


def score_rows(models: list[tuple[str, Path | None]], temperatures: dict[Path, float],
               base_name: str | None, test, args: argparse.Namespace, device: torch.device,
               precision: str):
    """Score each (name, checkpoint) of `models` (None: the base model) on the `test` reviews,
    each tokenized as it was trained and its logits divided by its temperature. Returns the
    result rows, the reviews' labels and each row's class probabilities."""
    label_names = tuple(test.features[LABEL].names)
    # The base model is scored as the first checkpoint was trained, as train.py's "before".
    first_checkpoint = next((c for _, c in models if c is not None), None)
    first = None if first_checkpoint is None else Preprocessing.recorded_in(first_checkpoint)
    pooling = "auto" if first_checkpoint is None else checkpoint_pooling(first_checkpoint)
    loaders = {}  # one tokenization per tokenizer and preprocessing, shared by the rows
    rows, labels, probabilities = [], None, {}
    for name, checkpoint in models:
        if checkpoint is None:
            model = load_base_model(base_name, label_names, pooling)
            tokenizer = load_tokenizer(base_name)
            preprocessing = resolve_preprocessing(first, args.truncation, args.max_length, None)
            temperature = UNCALIBRATED
        else:
            model, tokenizer = load_checkpoint(checkpoint, args.model)
            preprocessing = resolve_preprocessing(Preprocessing.recorded_in(checkpoint),
                                                  args.truncation, args.max_length, name)
            temperature = temperatures[checkpoint]
        key = (tokenizer_fingerprint(tokenizer), preprocessing)
        if key not in loaders:
            loaders[key] = evaluation_loader(tokenizer, test, preprocessing,
                                             args.eval_batch_size, args.num_workers, device)
        scores = score_model(model.to(device), loaders[key], device, precision, temperature,
                             desc=f"Scoring {name}")
        labels, probabilities[name] = scores.labels, scores.probabilities()
        rows.append({"name": name, "checkpoint": None if checkpoint is None else str(checkpoint),
                     **scores.metrics, **interval_and_calibration(labels, probabilities[name]),
                     "temperature": temperature, "truncation": preprocessing.truncation,
                     "max_length": preprocessing.max_length})
        del model
    return rows, labels, probabilities


def write_outputs(args: argparse.Namespace, rows: list[dict], comparisons: list[dict], test,
                  labels, probabilities: dict) -> None:
    """--json, --predictions and --plot, each where asked; `test` is the scored split."""
    if args.json:
        write_json(args.json, {"results": rows, "comparisons": comparisons})
        print(f"Wrote {args.json}", file=sys.stderr)
    if args.predictions:
        text = prediction_lines(test, labels, probabilities)
        write_file(args.predictions, lambda partial: partial.write_text(text))
        print(f"Wrote {args.predictions}", file=sys.stderr)
    if args.plot:
        plot_comparison([(row["name"], row) for row in rows], args.plot,
                        tuple(test.features[LABEL].names))
        print(f"Wrote {args.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of evaluate.py."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
