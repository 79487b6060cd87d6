"""The published tables, written from the numbers ``benchmarks.results`` collects.

Each table of README.md and docs/results.md stands between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``; ``TABLES`` says which function writes it from results.json. A table
whose experiments have not run is left as it is (and said so). tests/test_results.py checks that
the committed tables are exactly what docs/results.json gives: none is edited by hand.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from data import head_tail_split
from machinery.cli import UsageError
from machinery.report import format_duration, markdown_table
from machinery.stats import SIGNIFICANCE_LEVEL
from machinery.summarize import spread

DOCS_JSON = Path("docs") / "results.json"
README, RESULTS_DOC = Path("README.md"), Path("docs") / "results.md"
GIB = 2 ** 30
MB = 1e6


def marker(name: str) -> tuple[str, str]:
    """The start and end markers of table `name`."""
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


# ---------------------------------------------------------------------------------------------
# Formats


def four(value: float) -> str:
    """A metric with four decimals."""
    return f"{value:.4f}"


def with_error(metrics: dict) -> str:
    """Accuracy ± its standard error sqrt(p (1 - p) / n) over the scored reviews."""
    p, n = metrics["accuracy"], metrics["n"]
    return f"{p:.4f} ± {math.sqrt(p * (1 - p) / n):.4f}"


def size(n_bytes: float) -> str:
    """Bytes in decimal units: 301.5 kB, 91.6 MB."""
    return f"{n_bytes / MB:.1f} MB" if n_bytes >= MB else f"{n_bytes / 1e3:.1f} kB"


def memory(peak_rss_mb: float) -> str:
    """A peak resident set size (measured in MB) in GiB: 1.67 GiB."""
    return f"{peak_rss_mb * MB / GIB:.2f} GiB"


def count(n: int) -> str:
    """An integer with thousands separators."""
    return f"{n:,}"


def raw_to_calibrated(part: dict, key: str) -> str:
    """'raw → calibrated' of ECE or loss in a metrics.json calibration part."""
    return f"{part[key]['raw']:.4f} → {part[key]['calibrated']:.4f}"


def class_f1(metrics: dict) -> list[float]:
    """Each class's F1 from the confusion matrix (rows: true class, columns: predicted)."""
    matrix = metrics["confusion_matrix"]
    scores = []
    for k, row in enumerate(matrix):
        predicted = sum(r[k] for r in matrix)
        scores.append(2 * row[k] / (sum(row) + predicted) if sum(row) + predicted else 0.0)
    return scores


def learning_rate(lr: float) -> str:
    """A learning rate as the commands give it: 2e-3, 1e-4."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def share(part: int, whole: int) -> str:
    """`part` as a percentage of `whole`, two significant digits: 0.33%, 0.0034%, 100%."""
    percent = 100 * part / whole
    return "100%" if percent >= 99.5 else f"{float(f'{percent:.2g}'):g}%"


def p_value(p: float) -> str:
    """A p-value in two significant digits (scientific below 0.001)."""
    return f"{p:.1e}" if p < 1e-3 else f"{p:.2g}"


# ---------------------------------------------------------------------------------------------
# The tables. Each takes results.json's dict and returns Markdown, or None when an experiment
# it needs has not run.


def runs(results: dict, *names: str) -> list[dict] | None:
    """The collected train.py runs `names`, or None if one has not finished."""
    found = [results["runs"].get(name) for name in names]
    return None if None in found else found


def readme_smoke(results: dict) -> str | None:
    """README: before, after, and after with the head over [CLS]."""
    found = runs(results, "smoke", "smoke-cls")
    if found is None:
        return None
    mean, cls = (run["metrics"] for run in found)
    metric_rows = [("before: pre-trained, random head", mean["before"]),
                   ("after LoRA", mean["after"]),
                   ("after LoRA, head over `[CLS]` (`--pooling cls`)", cls["after"])]
    rows = [[label, *(four(m[key]) for key in ("accuracy", "precision", "recall", "f1", "loss"))]
            for label, m in metric_rows]
    parameters, wall = mean["parameters"], results["experiments"]["smoke"]["wall_seconds"]
    device = found[0]["config"]["resolved_device"]
    where = f"{results['cores']} CPU cores" if device == "cpu" else device
    return (markdown_table(["model", "accuracy", "precision", "recall", "F1", "loss"], rows,
                           "lrrrrr")
            + f"\n\nLoRA trains {count(parameters['trainable'])} of "
            f"{count(parameters['total'])} weights "
            f"({share(parameters['trainable'], parameters['total'])}); the whole run took "
            f"{format_duration(wall)} on {where}.")


def change_table(metrics: dict) -> str:
    """metric, before, after, change."""
    rows = [[name, four(metrics["before"][key]), four(metrics["after"][key]),
             f"{metrics['after'][key] - metrics['before'][key]:+.4f}"]
            for name, key in (("accuracy", "accuracy"), ("precision", "precision"),
                              ("recall", "recall"), ("F1", "f1"), ("loss", "loss"))]
    return markdown_table(["metric", "before (random head)", "after LoRA", "change"], rows,
                          "lrrr")


def run_facts(run: dict, experiment: dict) -> str:
    """The sentence under a before/after table: temperature, parameters, time, memory."""
    metrics, config = run["metrics"], run["config"]
    calibration = metrics["calibration"]
    parameters = metrics["parameters"]
    return (f"Temperature fitted on the {config['validation_examples']:,} validation reviews: "
            f"{calibration['temperature']:.2f} (test loss "
            f"{raw_to_calibrated(calibration['test'], 'loss')}, test ECE "
            f"{raw_to_calibrated(calibration['test'], 'ece')}). Trainable parameters: "
            f"{count(parameters['trainable'])} of {count(parameters['total'])} "
            f"({share(parameters['trainable'], parameters['total'])}). Training "
            f"{format_duration(metrics['train_seconds'])} at {metrics['train_samples_per_s']:.1f} "
            f"samples/s, the whole run {format_duration(experiment['wall_seconds'])}, peak "
            f"memory {memory(experiment['peak_rss_mb'])} (RSS).")


def smoke(results: dict) -> str | None:
    """The smoke run: before/after/change, and its facts."""
    found = runs(results, "smoke")
    if found is None:
        return None
    return (change_table(found[0]["metrics"]) + "\n\n"
            + run_facts(found[0], results["experiments"]["smoke"]))


def smoke_cls(results: dict) -> str | None:
    """The smoke run with --pooling cls: before/after/change."""
    found = runs(results, "smoke-cls")
    return None if found is None else change_table(found[0]["metrics"])


def process_label(config: dict) -> str:
    """'one process, batch 16' or 'torchrun, 2 processes x batch 8'."""
    world = config.get("world_size", 1)
    return (f"one process, batch {config['batch_size']}" if world == 1
            else f"torchrun, {world} processes x batch {config['batch_size']}")


def torchrun(results: dict) -> str | None:
    """One process against torchrun's two with the same global batch."""
    found = runs(results, "smoke", "smoke-torchrun")
    if found is None:
        return None
    rows = [[process_label(run["config"]), four(run["metrics"]["before"]["accuracy"]),
             four(run["metrics"]["after"]["accuracy"]), four(run["metrics"]["after"]["f1"]),
             four(run["metrics"]["after"]["loss"])] for run in found]
    return markdown_table(["run", "before: accuracy", "after: accuracy", "after: F1",
                           "after: loss"], rows, "lrrrr")


METHODS = ("head-128-head", "lora-128-head", "full-128-head")


def methods(results: dict) -> str | None:
    """LoRA against the head alone and every weight."""
    found = runs(results, *METHODS)
    if found is None:
        return None
    rows = []
    for name, run in zip(METHODS, found, strict=True):
        metrics, parameters = run["metrics"], run["metrics"]["parameters"]
        rows.append([f"`{run['config']['method']}`", learning_rate(run["config"]["lr"]),
                     f"{count(parameters['trainable'])} "
                     f"({share(parameters['trainable'], parameters['total'])})",
                     f"{size(run['checkpoint_bytes'])} ({size(run['weights_bytes'])})",
                     f"{metrics['train_samples_per_s']:.1f}",
                     memory(results["experiments"][name]["peak_rss_mb"]),
                     with_error(metrics["after"]), four(metrics["after"]["f1"])])
    return markdown_table(["method", "lr", "trainable parameters",
                           "checkpoint on disk (weights file)", "train samples/s",
                           "peak memory (RSS)", "test accuracy ± SE", "test F1"], rows,
                          "llrrrrrr")


TRUNCATIONS = ("lora-128-head", "lora-128-headtail", "lora-256-head", "lora-256-headtail")


def tokens_read(max_length: int, truncation: str) -> str:
    """Which review tokens a truncation keeps: 'first 126', 'first 32 + last 94'."""
    head, tail = head_tail_split(max_length, truncation)
    return " + ".join(part for part in (f"first {head}" if head else "",
                                        f"last {tail}" if tail else "") if part)


def truncation(results: dict) -> str | None:
    """Head against head+tail truncation at 128 and 256 tokens."""
    found = runs(results, *TRUNCATIONS)
    if found is None:
        return None
    rows = [[str(run["config"]["max_length"]), f"`{run['config']['truncation']}`",
             tokens_read(run["config"]["max_length"], run["config"]["truncation"]),
             with_error(run["metrics"]["after"]), four(run["metrics"]["after"]["f1"]),
             four(run["metrics"]["after"]["loss"])] for run in found]
    return markdown_table(["max length", "truncation", "review tokens read",
                           "test accuracy ± SE", "test F1", "test loss"], rows, "rllrrr")


PAIR_LABELS = {
    ("base", "lora-128-head"): "`lora` vs pre-trained (random head)",
    ("lora-128-head", "head-128-head"): "`head` (probe) vs `lora`",
    ("lora-128-head", "full-128-head"): "`full` vs `lora`",
    ("lora-128-head", "lora-128-headtail"): "128 tokens: `head+tail` vs `head`",
    ("lora-256-head", "lora-256-headtail"): "256 tokens: `head+tail` vs `head`",
    ("smoke-cls", "smoke"): "smoke run: mean pooling vs `[CLS]`",
}


def pair_table(evaluation: dict) -> str:
    """The paired comparisons of one evaluate.py call, a row each."""
    return markdown_table(["comparison (b vs a)", "test reviews", "accuracy a → b",
                           "b − a (paired 95% CI)", "only a right / only b right",
                           "McNemar p", f"at {SIGNIFICANCE_LEVEL:g}"], pair_rows(evaluation),
                          "lrrrrrl")


def pair_rows(evaluation: dict) -> list[list[str]]:
    """A row per paired comparison of one evaluate.py call."""
    accuracy = {row["name"]: row["accuracy"] for row in evaluation["rows"]}
    n = evaluation["rows"][0]["n"]
    rows = []
    for pair in evaluation["pairs"]:
        low, high = pair["difference_ci"]
        verdict = ("significant" if pair["mcnemar_p"] < SIGNIFICANCE_LEVEL
                   else "not significant")
        rows.append([PAIR_LABELS[(pair["a"], pair["b"])], count(n),
                     f"{accuracy[pair['a']]:.4f} → {accuracy[pair['b']]:.4f}",
                     f"{pair['accuracy_difference']:+.4f} ({low:+.4f} to {high:+.4f})",
                     f"{pair['discordant'][0]} / {pair['discordant'][1]}",
                     p_value(pair["mcnemar_p"]), verdict])
    return rows


def paired(results: dict) -> str | None:
    """Review-by-review comparisons of the method and truncation runs."""
    evaluation = results["evaluations"].get("paired")
    if evaluation is None:
        return None
    return pair_table(evaluation)


CALIBRATED = (("`lora`, 128, `head`", "lora-128-head"),
              ("`lora`, 128, `head+tail`", "lora-128-headtail"),
              ("`lora`, 256, `head`", "lora-256-head"),
              ("`lora`, 256, `head+tail`", "lora-256-headtail"),
              ("`head` (probe)", "head-128-head"), ("`full`", "full-128-head"))


def calibration(results: dict) -> str | None:
    """Each run's temperature and what it did to the test ECE and loss."""
    found = runs(results, *(name for _, name in CALIBRATED))
    if found is None:
        return None
    rows = []
    for (label, _), run in zip(CALIBRATED, found, strict=True):
        part = run["metrics"]["calibration"]
        rows.append([label, f"{part['temperature']:.2f}", raw_to_calibrated(part["test"], "ece"),
                     raw_to_calibrated(part["test"], "loss")])
    return markdown_table(["run", "temperature", "test ECE raw → calibrated",
                           "test loss raw → calibrated"], rows, "lrrr")


SEED_RUNS = ("lora-128-head", "lora-128-head-seed1", "lora-128-head-seed2")


def seeds(results: dict) -> str | None:
    """The 128-token LoRA run over three seeds, and their mean ± standard deviation."""
    found = runs(results, *SEED_RUNS)
    if found is None:
        return None
    columns = {"accuracy": lambda m: m["after"]["accuracy"], "F1": lambda m: m["after"]["f1"],
               "temperature": lambda m: m["calibration"]["temperature"],
               "test ECE raw": lambda m: m["calibration"]["test"]["ece"]["raw"],
               "test ECE calibrated": lambda m: m["calibration"]["test"]["ece"]["calibrated"]}
    rows = [[str(run["config"]["seed"]), *(four(get(run["metrics"])) for get in columns.values())]
            for run in found]
    summary = [spread([get(run["metrics"]) for run in found]) for get in columns.values()]
    rows.append(["mean ± sd", *(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in summary)])
    return markdown_table(["seed", *columns], rows, "lrrrrr")


def full_data(results: dict) -> str | None:
    """All of IMDB: before and after with standard errors, and the run's facts."""
    found = runs(results, "full-data")
    if found is None:
        return None
    run, experiment = found[0], results["experiments"]["full-data"]
    metrics = run["metrics"]
    rows = [[label, with_error(metrics[key]),
             *(four(metrics[key][k]) for k in ("precision", "recall", "f1", "loss"))]
            for label, key in (("pre-trained, random head (before)", "before"),
                               ("after LoRA, 1 epoch", "after"))]
    validation = run["validation"]
    facts = (f"{count(run['config']['train_examples'])} training, "
             f"{count(run['config']['validation_examples'])} validation and "
             f"{count(run['config']['test_examples'])} test reviews. Validation after the epoch: "
             f"accuracy {validation['accuracy']:.4f}, F1 {validation['f1']:.4f}. "
             f"{count(run['steps'])} optimizer steps in "
             f"{format_duration(metrics['train_seconds'])} "
             f"at {metrics['train_samples_per_s']:.1f} samples/s; each test pass about "
             f"{format_duration(metrics['test_seconds']['after'])}; the whole run "
             f"{format_duration(experiment['wall_seconds'])}, peak memory "
             f"{memory(experiment['peak_rss_mb'])} (RSS).")
    return markdown_table(["model", "test accuracy ± SE", "precision", "recall", "F1", "loss"],
                          rows, "lrrrrr") + "\n\n" + facts


POOLING_RUNS = (("IMDB, 2 classes", "cls", "smoke-cls"),
                ("IMDB, 2 classes", "mean (auto)", "smoke"),
                ("3 classes", "cls", "kclass-cls"), ("3 classes", "mean (auto)", "kclass-mean"))


def pooling(results: dict) -> str | None:
    """cls against mean pooling on the binary and the three-class task."""
    found = runs(results, *(name for _, _, name in POOLING_RUNS))
    if found is None:
        return None
    rows = []
    for (task, head, _), run in zip(POOLING_RUNS, found, strict=True):
        after, names = run["metrics"]["after"], list(run["config"]["class_counts"]["test"])
        scores = class_f1(after)
        rows.append([task, head, four(after["accuracy"]), four(sum(scores) / len(scores)),
                     ", ".join(f"{name} {score:.4f}"
                               for name, score in zip(names, scores, strict=True))])
    table = markdown_table(["task", "pooling", "accuracy", "macro-F1", "F1 per class"], rows,
                           "llrrl")
    evaluation = results["evaluations"].get("smoke-pooling")
    if evaluation is None:
        return table
    return table + "\n\n" + pair_table(evaluation)


def timing(results: dict) -> str | None:
    """How long each experiment of this mode took, and where."""
    if not results["experiments"]:
        return None
    rows = [[f"`{name}`", format_duration(record["wall_seconds"]),
             memory(record["peak_rss_mb"]), record["finished"]]
            for name, record in results["experiments"].items()]
    total = sum(record["wall_seconds"] for record in results["experiments"].values())
    rows.append(["**all**", f"**{format_duration(total)}**", "", ""])
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    header = ["experiment", "wall time", "peak RSS (largest process)", "finished"]
    return (markdown_table(header, rows, "lrrl")
            + f"\n\nMode `{results['mode']}` on {results['machine']}, {results['cores']} cores; "
            f"{versions}; model `{results['model']}`:\n\n```bash\n{results['command']}\n```")


# Each table: the file it is in and the function that writes it.
TABLES: dict[str, tuple[Path, Callable[[dict], str | None]]] = {
    "readme-smoke": (README, readme_smoke),
    "smoke": (RESULTS_DOC, smoke),
    "smoke-cls": (RESULTS_DOC, smoke_cls),
    "torchrun": (RESULTS_DOC, torchrun),
    "methods": (RESULTS_DOC, methods),
    "truncation": (RESULTS_DOC, truncation),
    "paired": (RESULTS_DOC, paired),
    "calibration": (RESULTS_DOC, calibration),
    "seeds": (RESULTS_DOC, seeds),
    "full-data": (RESULTS_DOC, full_data),
    "pooling": (RESULTS_DOC, pooling),
    "timing": (RESULTS_DOC, timing),
}


# ---------------------------------------------------------------------------------------------
# Writing them


def region(text: str, name: str) -> str | None:
    """What stands between table `name`'s markers in `text` (None: no markers)."""
    start, end = marker(name)
    found = re.search(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), text, re.DOTALL)
    return None if found is None else found.group(1)


def replace_region(text: str, name: str, table: str) -> str:
    """`text` with table `name`'s region holding `table`."""
    start, end = marker(name)
    before, rest = text.split(start, 1)
    return before + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def check_docs(root: Path) -> None:
    """Refuse a --docs folder whose files lack a table's markers."""
    for name, (path, _) in TABLES.items():
        file = root / path
        if not file.is_file():
            raise UsageError(f"--docs {root}: no {path} there")
        if region(file.read_text(), name) is None:
            raise UsageError(f"{file} has no {' ... '.join(marker(name))} markers for table "
                             f"{name}")


def rendered(root: Path, results: dict) -> dict[Path, str]:
    """README.md and docs/results.md of `root` with every table written from `results`
    (a table whose experiments have not run keeps its text)."""
    texts = {path: (root / path).read_text() for path in (README, RESULTS_DOC)}
    for name, (path, write) in TABLES.items():
        table = write(results)
        if table is None:
            print(f"table {name}: its experiments have not run; left as it was", file=sys.stderr)
            continue
        texts[path] = replace_region(texts[path], name, table)
    return texts


def publish(root: Path, results: dict) -> None:
    """Write every table into `root`'s documents and the numbers into docs/results.json."""
    check_docs(root)
    for path, text in rendered(root, results).items():
        (root / path).write_text(text)
    (root / DOCS_JSON).write_text(json.dumps(results, indent=1) + "\n")
    print(f"Wrote the tables of {root / README} and {root / RESULTS_DOC} from "
          f"{root / DOCS_JSON}", file=sys.stderr)
