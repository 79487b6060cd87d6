"""Plots and a Markdown report of a run: training curves, before/after comparison, report.md.

    python -m machinery.report runs/NAME      # (re)draw the plots and write runs/NAME/report.md

train.py calls ``write_report`` at the end of every run; ``evaluate.py --plot`` calls
``plot_comparison`` for any set of checkpoints. Figures are drawn on matplotlib's
non-interactive Agg canvas directly (no pyplot), so no display is needed and no global
backend state is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from machinery.checkpoints import (
    ADAPTER_DIR,
    METHODS,
    MODEL_DIR,
    checkpoint_folder,
    checkpoint_label_names,
)
from machinery.cli import UsageError, run_command
from machinery.data_sources import BINARY_LABEL_NAMES
from machinery.files import read_json, write_file
from machinery.stats import UNCALIBRATED, format_calibration
from machinery.tracking import LOG_FILE, read_log

# The files of a run folder: written by train.py, read here.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CURVES_PNG = "training_curves.png"
COMPARISON_PNG = "comparison.png"
REPORT_MD = "report.md"

# The metrics every comparison table shows, in this order (evaluate.compute_metrics makes them):
# for two classes, the positive class's precision/recall/F1; for more, their macro means.
BINARY_METRICS = ("accuracy", "precision", "recall", "f1", "loss")
MULTICLASS_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1",
                      "loss")
# Weight of the exponential moving average drawn over the raw training loss (TensorBoard's
# "smoothing"): loss is logged as a mean over --log-every steps, which is still noisy.
SMOOTHING = 0.6
DPI = 120
# Config entries that the report shows in their own sections rather than the settings table.
CONFIG_SHOWN_ELSEWHERE = ("versions", "train_examples", "validation_examples", "test_examples",
                          "class_counts")


# ---------------------------------------------------------------------------------------------
# Reading a run folder


def read_run_file(path: Path) -> dict:
    """config.json or metrics.json of a finished run folder; missing or damaged, it is refused
    in one sentence naming it."""
    return read_json(path, f"is {path.parent} a finished train.py run folder? Train again if "
                           "it was")


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards 0."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** i))
    return smoothed


# ---------------------------------------------------------------------------------------------
# Figures


def new_figure(**kwargs) -> Figure:
    """An empty matplotlib Figure (no pyplot).

    matplotlib is imported here, when a figure is drawn, not when this module is: train.py
    imports it at start-up but draws only at the end, when the trained model has been freed.
    """
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Render `figure` with the Agg canvas into `path` (format from its ending)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(figure)
    write_file(path, lambda partial: figure.savefig(partial, dpi=DPI, format=path.suffix[1:]))
    return path


def plot_training_curves(log_path: str | Path, out: str | Path) -> Path:
    """Training loss (raw and smoothed), learning rate, and validation accuracy/F1 per step."""
    training, validation = read_log(Path(log_path))
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(figsize=(9, 9), layout="constrained")
    loss_axes, lr_axes, score_axes = figure.subplots(3, 1, sharex=True)
    figure.suptitle(f"Training curves: {Path(log_path).parent.name}", fontsize=14)

    steps = [r["step"] for r in training]
    losses = [r["loss"] for r in training]
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.35, marker=".",
                   label="training loss (logged mean)")
    loss_axes.plot(steps, smooth(losses), color="tab:blue", linewidth=2,
                   label=f"smoothed (EMA {SMOOTHING})")
    if validation:
        loss_axes.plot([r["step"] for r in validation],
                       [r["validation"]["loss"] for r in validation], color="tab:orange",
                       marker="o", label="validation loss")
    loss_axes.set_ylabel("cross-entropy loss")
    loss_axes.set_title("Loss")
    loss_axes.legend(loc="upper right")

    lr_axes.plot(steps, [r["lr"] for r in training], color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_title("Learning rate (linear warm-up, then linear decay)")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axes.set_ylim(bottom=0)

    plot_validation_scores(score_axes, validation)
    score_axes.set_xlabel("optimizer step")
    score_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (loss_axes, lr_axes, score_axes):
        axes.grid(alpha=0.3)
    return save_figure(figure, out)


def plot_validation_scores(axes, validation: list[dict]) -> None:
    """Validation accuracy and F1 against steps, the saved (best) checkpoint marked."""
    axes.set_title("Validation scores")
    axes.set_ylabel("score")
    if not validation:
        axes.text(0.5, 0.5, "no validation records in the log", ha="center", va="center",
                  transform=axes.transAxes)
        return
    steps = [r["step"] for r in validation]
    for score, label, color in ((lambda m: m["accuracy"], "accuracy", "tab:purple"),
                                (headline_f1, "F1", "tab:red")):
        axes.plot(steps, [score(r["validation"]) for r in validation], marker="o",
                  color=color, label=f"validation {label}")
    best = best_validation(validation)
    if best is not None:
        # A ring around the point, so the accuracy marker under it stays visible.
        axes.plot(best["step"], best["validation"]["accuracy"], marker="o", markersize=16,
                  markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.5,
                  linestyle="none", label=f"saved checkpoint (step {best['step']})")
    values = [value for r in validation
              for value in (r["validation"]["accuracy"], headline_f1(r["validation"]))]
    # Zoom to the scores with some margin, but not far beyond the 0..1 range of a score
    # (a little room above 1.0 keeps markers of a perfect score from being clipped).
    low, high = min(values), max(values)
    margin = max(0.05, (high - low) * 0.2)
    axes.set_ylim(max(0.0, low - margin), min(1.02, high + margin))
    axes.legend(loc="lower right")


def best_validation(validation: list[dict]) -> dict | None:
    """The validation record whose checkpoint was saved last (train.py marks it "best")."""
    best = [r for r in validation if r.get("best")]
    return best[-1] if best else None


def display_name(name: str) -> str:
    """A short label for a result: a run's name for its adapter folder, else the name."""
    path = Path(name)
    if path.name in (ADAPTER_DIR, MODEL_DIR) and path.parent.name:
        return path.parent.name
    return path.name or name


def plot_comparison(results: list[tuple[str, dict]], out: str | Path,
                    label_names: tuple[str, ...] | None = None) -> Path:
    """Bars of accuracy, precision, recall and F1 per result, each confusion matrix (its
    classes named by `label_names`, see ``class_names``) and, for results that hold their
    reliability bins (evaluate.py's), each reliability diagram."""
    if not results:
        raise ValueError("nothing to plot")
    n = len(results)
    with_reliability = all("reliability" in metrics for _, metrics in results)
    rows = 3 if with_reliability else 2
    figure = new_figure(figsize=(max(8.0, 3.6 * n), 4.5 * rows), layout="constrained")
    grid = figure.add_gridspec(rows, n, height_ratios=(1.1, 1, 1)[:rows])
    plot_metric_bars(figure.add_subplot(grid[0, :]), results)
    for column, (name, metrics) in enumerate(results):
        plot_confusion_matrix(figure.add_subplot(grid[1, column]), display_name(name), metrics,
                              class_names(metrics, label_names))
        if with_reliability:
            plot_reliability(figure.add_subplot(grid[2, column]), display_name(name), metrics)
    figure.suptitle(" vs ".join(display_name(name) for name, _ in results), fontsize=14)
    return save_figure(figure, out)


def plot_reliability(axes, title: str, metrics: dict) -> None:
    """A reliability diagram: the accuracy of the reviews in each bin of top-class probability,
    as a bar over the bin, against the diagonal a calibrated model would follow; each bar
    labelled with its review count, the mean confidence marked in it."""
    bins = metrics["reliability"]
    lows = [b["low"] for b in bins]
    widths = [b["high"] - b["low"] for b in bins]
    bars = axes.bar(lows, [b["accuracy"] for b in bins], widths, align="edge",
                    edgecolor="black", linewidth=0.5, label="accuracy in the bin")
    axes.bar_label(bars, labels=[str(b["n"]) for b in bins], padding=2, fontsize=8)
    axes.plot([b["confidence"] for b in bins], [b["confidence"] for b in bins], "o",
              color="tab:red", markersize=3, label="mean confidence")
    # The top class of K has a probability of at least 1/K: the axis starts there.
    lowest = 1 / len(metrics["confusion_matrix"])
    axes.plot([lowest, 1], [lowest, 1], color="gray", linestyle=":", linewidth=1,
              label="calibrated")
    axes.set_xlim(lowest, 1)
    axes.set_ylim(0, 1.12)  # room above 1.0 for the counts
    axes.set_xlabel("confidence (top-class probability)")
    axes.set_ylabel("accuracy")
    temperature = metrics.get("temperature", UNCALIBRATED)
    scaled = f", T={temperature:.3g}" if temperature != UNCALIBRATED else ""
    axes.set_title(f"{title}\nreliability (ECE {metrics['ece']:.3f}{scaled})")
    axes.legend(loc="upper left", fontsize=8)


def plot_metric_bars(axes, results: list[tuple[str, dict]]) -> None:
    """Grouped bars, one group per metric, one bar per result, each labelled with its value."""
    plotted = plotted_metrics(results[0][1])
    positions = np.arange(len(plotted))
    width = 0.8 / len(results)
    for i, (name, metrics) in enumerate(results):
        offsets = positions - 0.4 + width * (i + 0.5)
        bars = axes.bar(offsets, [metrics[m] for m in plotted], width,
                        label=f"{display_name(name)} (n={metrics['n']})")
        axes.bar_label(bars, fmt="%.3f", padding=2, fontsize=9)
    axes.set_xticks(positions, [m.replace("f1", "F1").replace("_", " ") for m in plotted])
    axes.set_ylim(0, 1.12)  # room above 1.0 for the value labels
    axes.set_ylabel("score on the test reviews")
    chance = 1 / len(results[0][1]["confusion_matrix"])  # guessing one of K classes
    axes.axhline(chance, color="gray", linestyle=":", linewidth=1,
                 label=f"chance ({chance:.2g})")
    axes.legend(loc="upper left", ncols=min(len(results), 4))
    axes.grid(axis="y", alpha=0.3)


def plot_confusion_matrix(axes, title: str, metrics: dict, names: list[str]) -> None:
    """A K x K confusion matrix: counts and the share of each true class, rows = true label."""
    matrix = np.array(metrics["confusion_matrix"])
    axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    row_totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for (row, column), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        axes.text(column, row, f"{count}\n({count / row_totals[row, 0]:.0%})", ha="center",
                  va="center", fontsize=11, color="white" if dark else "black")
    axes.set_xticks(range(len(names)), names, rotation=30 if len(names) > 2 else 0)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title(f"{title}\nconfusion matrix")


# ---------------------------------------------------------------------------------------------
# The Markdown report


def format_duration(seconds: float) -> str:
    """'3 min 38 s (218.0 s)', or '42.0 s' under a minute."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h " if hours else "") + f"{minutes} min {rest} s ({seconds:.1f} s)"


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; `align` has one 'l' or 'r' per column (default: all left)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, rule, *rows])


def metrics_table(before: dict, after: dict) -> str:
    """The before/after/change table, four decimals, as train.py prints it."""
    rows = [[metric, f"{before[metric]:.4f}", f"{after[metric]:.4f}",
             f"{after[metric] - before[metric]:+.4f}"] for metric in metric_names(after)]
    rows.append(["n", str(before["n"]), str(after["n"]), ""])
    return markdown_table(["metric", "before", "after", "change"], rows, "lrrr")


def parameters_section(metrics: dict, method: str = "lora") -> str:
    """Trainable vs total parameters (count and share), or why they are missing."""
    counts = metrics.get("parameters")
    if not counts:
        return "Parameter counts were not recorded in metrics.json (a run from an older train.py)."
    trainable, total = counts["trainable"], counts["total"]
    table = markdown_table(["parameters", "count", "share"], [
        [f"trainable ({METHODS[method]})", f"{trainable:,}",
         f"{100 * trainable / total:.2f}%"],
        ["total", f"{total:,}", "100%"]], "lrr")
    if method != "lora":
        return table
    return (f"{table}\n\nThe total, as peft counts it, includes the frozen original of the "
            "classifier head beside its trained copy.")


def calibration_section(metrics: dict) -> list[str]:
    """The fitted temperature and the ECE and loss it changed (none for runs before it)."""
    calibration = metrics.get("calibration")
    if not calibration:
        return []
    rows = [[f"{measure} on {split}", f"{effect[key]['raw']:.4f}",
             f"{effect[key]['calibrated']:.4f}"]
            for split, effect in (("validation", calibration["validation"]),
                                  ("test", calibration["test"]))
            for measure, key in (("ECE", "ece"), ("loss", "loss"))]
    return ["## Calibration", format_calibration(calibration) + ". The after row above is "
            "scored with it (its loss too), as evaluate.py and predict.py do; predicted "
            "classes, and so accuracy and F1, are the same with or without it.",
            markdown_table(["", "raw", "calibrated"], rows, "lrr")]


def timing_rows(metrics: dict, n_steps: int | None) -> list[list[str]]:
    """Wall time, training time, throughput and step count, as table rows."""
    wall = metrics.get("wall_seconds")
    # A resumed run read its "before" back from the snapshot (no time for it): its wall time
    # is the last process's alone, which can be shorter than the training of all processes.
    resumed = metrics.get("test_seconds", {}).get("before", 0) is None
    rows = [["wall time of the last process, which resumed the run (data, scoring after, the "
             "rest of training)" if resumed else
             "wall time (data, scoring before and after, training)",
             format_duration(wall) if wall is not None else "not recorded"],
            ["training time", format_duration(metrics["train_seconds"])],
            ["training throughput", f"{metrics['train_samples_per_s']:.1f} samples/s"]]
    if n_steps is not None:
        rows.append(["optimizer steps", f"{n_steps:,}"])
    return rows


def config_rows(config: dict) -> list[list[str]]:
    """Every recorded flag and resolved setting, as table rows."""
    return [[key, f"`{value if isinstance(value, str) else json.dumps(value)}`"]
            for key, value in config.items() if key not in CONFIG_SHOWN_ELSEWHERE]


def report_markdown(run_dir: Path, config: dict, metrics: dict, training: list[dict],
                    validation: list[dict]) -> str:
    """The text of report.md."""
    before, after = metrics["before"], metrics["after"]
    method = config.get("method", "lora")  # runs from before --method existed were LoRA runs
    best = best_validation(validation)
    validations = f"{len(validation)} validation" + ("s" if len(validation) != 1 else "")
    chosen = (f"the checkpoint saved at step {best['step']}, the best validation accuracy "
              f"({best['validation']['accuracy']:.4f}) of {validations}" if best
              else "the best checkpoint by validation accuracy")
    n_steps = training[-1]["step"] if training else None
    versions = ", ".join(f"{name} {version}" for name, version in
                         config.get("versions", {}).items())
    sections = [
        f"# Run report: {run_dir.name}",
        f"Fine-tuning ({METHODS[method]}) of `{config.get('model', '?')}` on "
        f"`{config.get('data', '?')}` "
        f"({config.get('resolved_device', '?')}, {config.get('resolved_precision', '?')}). "
        f"Regenerate with `python -m machinery.report {run_dir}`.",
        "## Test metrics",
        f"Before: the pre-trained model with its seeded random classifier head. After: {chosen}, "
        "loaded back from disk. Change = after - before.",
        metrics_table(before, after),
        *per_class_tables(after),
        f"![Before vs after: metrics and confusion matrices]({COMPARISON_PNG})",
        *calibration_section(metrics),
        "## Parameters",
        parameters_section(metrics, method),
        "## Data",
        data_table(config),
        "## Time and throughput",
        markdown_table(["", ""], timing_rows(metrics, n_steps), "lr"),
        f"![Training loss, learning rate and validation scores against steps]({CURVES_PNG})",
        "## Configuration",
        markdown_table(["setting", "value"], config_rows(config)),
    ]
    if versions:
        sections.append(f"Versions: {versions}.")
    return "\n\n".join(sections) + "\n"


def data_table(config: dict) -> str:
    """The reviews of each split, and of each class in it where config.json records them."""
    counts = config.get("class_counts", {})
    names = list(counts.get("train", {}))
    rows = [[split, f"{config[key]:,}" if key in config else "not recorded",
             *(f"{counts[short][name]:,}" for name in names)]
            for split, key, short in (("training", "train_examples", "train"),
                                      ("validation (carved out of the training split)",
                                       "validation_examples", "validation"),
                                      ("test", "test_examples", "test"))]
    return markdown_table(["split", "reviews", *names], rows, "l" + "r" * (1 + len(names)))


def per_class_tables(metrics: dict) -> list[str]:
    """A K > 2 result's per-class precision, recall, F1 and support (none for two classes)."""
    if "per_class" not in metrics:
        return []
    rows = [[name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
             str(m["support"])] for name, m in metrics["per_class"].items()]
    return ["After, per class:", markdown_table(["class", "precision", "recall", "F1", "support"],
                                                rows, "lrrrr")]


def metric_names(metrics: dict) -> tuple[str, ...]:
    """The metrics a table shows for a result with these `metrics` (two classes or more)."""
    return MULTICLASS_METRICS if "macro_f1" in metrics else BINARY_METRICS


def plotted_metrics(metrics: dict) -> list[str]:
    """The scores the comparison plot draws as bars (the table's, but loss and weighted F1)."""
    return [m for m in metric_names(metrics) if m not in ("loss", "weighted_f1")]


def headline_f1(metrics: dict) -> float:
    """The F1 a result is summed up by: the positive class's (two classes) or the macro mean."""
    return metrics["f1"] if "f1" in metrics else metrics["macro_f1"]


def class_names(metrics: dict, label_names: tuple[str, ...] | None = None) -> list[str]:
    """The class names of a result, in id order: its per-class table's, else `label_names`,
    else IMDB's two."""
    if "per_class" in metrics:
        return list(metrics["per_class"])
    return list(label_names or BINARY_LABEL_NAMES)


def write_report(run_dir: str | Path, metrics: dict | None = None) -> Path:
    """Draw training_curves.png and comparison.png into a run folder and write report.md.

    `metrics` as metrics.json holds them (default: read from it): train.py passes them before
    it writes metrics.json, the file that marks a run finished, so that a report that cannot
    be written (a full disk) leaves a run the same command resumes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder; give a train.py run folder (runs/NAME)")
    config = read_run_file(run_dir / CONFIG_FILE)
    metrics = metrics or read_run_file(run_dir / METRICS_FILE)
    log_path = run_dir / LOG_FILE
    if not log_path.is_file():
        raise UsageError(f"{log_path} is missing: is {run_dir} a finished train.py run folder?")
    training, validation = read_log(log_path)
    plot_training_curves(log_path, run_dir / CURVES_PNG)
    checkpoint = checkpoint_folder(run_dir, config.get("method", "lora"))
    plot_comparison([("before", metrics["before"]), ("after", metrics["after"])],
                    run_dir / COMPARISON_PNG, checkpoint_label_names(checkpoint))
    report = run_dir / REPORT_MD
    text = report_markdown(run_dir, config, metrics, training, validation)
    write_file(report, lambda partial: partial.write_text(text))
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: (re)write a run folder's plots and report."""
    parser = argparse.ArgumentParser(
        prog="python -m machinery.report",
        description="Draw training_curves.png and comparison.png and write report.md for a "
                    "finished train.py run folder (train.py does this itself at the end of a "
                    "run; use this for older runs or after editing the plots).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a train.py run folder holding config.json, metrics.json and "
                             "log.jsonl")
    return run_command(parser, report_command, argv)


def report_command(args: argparse.Namespace) -> None:
    """``python -m machinery.report RUN_DIR``: write the report and say where."""
    report = write_report(args.run_dir)
    print(f"Wrote {report}, {args.run_dir / CURVES_PNG} and {args.run_dir / COMPARISON_PNG}")


if __name__ == "__main__":
    sys.exit(main())
