"""One command for every published number: ``python -m benchmarks.results full|quick|render``.

Every table of README.md and docs/results.md comes from here, never from a hand:

1. **run**: each experiment of docs/results.md (a train.py run, an evaluate.py comparison, the
   two-process torchrun run, the three-class set) runs as a process of its own, timed, into
   ``--out``. A finished experiment leaves ``experiment.json`` and is skipped the next time, so
   an interrupted full mode (hours on a CPU) continues where it stopped.
2. **collect**: the runs' ``config.json``, ``metrics.json``, ``log.jsonl`` and checkpoint sizes,
   and evaluate.py's JSON and predictions, become one ``results.json`` (numbers only, small).
3. **render** (``benchmarks.results_tables``): with ``--docs ROOT``, the tables are written from
   that JSON between their ``results:NAME`` markers in ROOT's README.md and docs/results.md,
   and the JSON is kept as ROOT/docs/results.json, from which ``render`` rewrites them again.
   Only a complete set is published, and never over another mode's numbers.

``quick`` runs the same experiments on a few dozen reviews (the suite runs it); ``full`` on the
sizes docs/results.md describes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks import results_tables
from benchmarks.common import DEFAULT_DATA, REPO, cpu_model, measure_process, model_label
from machinery.checkpoints import find_checkpoint
from machinery.cli import UsageError, run_command
from machinery.files import read_json
from machinery.run_folder import library_versions
from machinery.stats import paired_comparison

EXPERIMENT_FILE = "experiment.json"  # written last: an experiment with it is finished
STARTED_FILE = "started"  # written first: a folder without it is not this command's to remove
RESULTS_FILE = "results.json"
TRAIN_RUN = "run"  # the train.py run folder inside an experiment's folder
KCLASS_DATA = "kclass-data"


@dataclass(frozen=True)
class Scale:
    """How many reviews the experiments of one mode read."""

    train: int
    """Training reviews of every subset run (the smoke run's 2,000)."""
    smoke_test: int
    """Test reviews of the smoke and pooling runs."""
    test: int
    """Test reviews of the method, truncation and seed runs, and of their paired comparison."""
    kclass_train: int
    """Training texts per class of the three-class set."""
    kclass_test: int
    """Test texts per class of the three-class set."""
    full_train: int | None
    """Training reviews of the full-data run (None: all that the validation split leaves)."""
    full_test: int | None
    """Test reviews of the full-data run (None: the whole test split)."""


SCALES = {
    "full": Scale(train=2000, smoke_test=1000, test=2000, kclass_train=600, kclass_test=100,
                  full_train=None, full_test=None),
    "quick": Scale(train=48, smoke_test=32, test=40, kclass_train=24, kclass_test=8,
                   full_train=64, full_test=48),
}


@dataclass(frozen=True)
class Experiment:
    """One process of the full mode: `kind` says which script, `args` its own flags."""

    name: str
    kind: str  # train, torchrun, evaluate or kclass-set
    args: tuple[str, ...]
    compare: tuple[tuple[str, str], ...] = ()
    """evaluate only: the pairs (a, b) of scored rows to compare review by review."""
    data_from: str | None = None
    """train only: the experiment whose written data set it trains on (None: --data)."""


def sized(train: int | None, test: int | None) -> tuple[str, ...]:
    """--train-samples and --eval-samples (None: the flag left out, so all reviews)."""
    return ((() if train is None else ("--train-samples", str(train)))
            + (() if test is None else ("--eval-samples", str(test))))


# The learning rates of docs/results.md: four times each method's default for a short run of a
# small model (full fine-tuning a little under).
LORA, HEAD, FULL = ("--method", "lora", "--lr", "2e-3"), ("--method", "head", "--lr", "4e-3"), \
    ("--method", "full", "--lr", "1e-4")
SEEDS = (1, 2)  # besides train.py's default 42: the spread of the 128-token lora run


def experiments(scale: Scale) -> list[Experiment]:
    """Every experiment, in the order they run (the full-data run last: the longest)."""
    smoke = (*sized(scale.train, scale.smoke_test), *LORA)
    subset = sized(scale.train, scale.test)
    truncations = [(f"lora-{length}-{name}", ("--max-length", str(length), "--truncation", cut))
                   for length in (128, 256) for name, cut in (("head", "head"),
                                                              ("headtail", "head+tail"))]
    runs = [
        Experiment("smoke", "train", smoke),
        Experiment("smoke-cls", "train", (*smoke, "--pooling", "cls")),
        Experiment("smoke-pooling", "evaluate", (*sized(None, scale.smoke_test), "--checkpoint",
                   "smoke-cls", "--checkpoint", "smoke"), compare=(("smoke-cls", "smoke"),)),
        Experiment("smoke-torchrun", "torchrun", (*smoke, "--batch-size", "8")),
        Experiment(KCLASS_DATA, "kclass-set", ("--train", str(scale.kclass_train),
                                               "--test", str(scale.kclass_test))),
        Experiment("kclass-cls", "train", (*LORA, "--pooling", "cls"), data_from=KCLASS_DATA),
        Experiment("kclass-mean", "train", LORA, data_from=KCLASS_DATA),
        Experiment("head-128-head", "train", (*subset, *HEAD)),
        Experiment("full-128-head", "train", (*subset, *FULL)),
        *[Experiment(name, "train", (*subset, *LORA, *cut)) for name, cut in truncations],
        *[Experiment(f"lora-128-head-seed{seed}", "train", (*subset, *LORA, "--seed", str(seed)))
          for seed in SEEDS],
    ]
    scored = ["lora-128-head", "head-128-head", "full-128-head", "lora-128-headtail",
              "lora-256-head", "lora-256-headtail"]
    runs.append(Experiment("paired", "evaluate", (
        *sized(None, scale.test), "--base",
        *[flag for name in scored for flag in ("--checkpoint", name)]),
        compare=(("base", "lora-128-head"), ("lora-128-head", "head-128-head"),
                 ("lora-128-head", "full-128-head"), ("lora-128-head", "lora-128-headtail"),
                 ("lora-256-head", "lora-256-headtail"))))
    runs.append(Experiment("full-data", "train", (*sized(scale.full_train, scale.full_test),
                                                  *LORA)))
    return runs


# ---------------------------------------------------------------------------------------------
# Running


def command_line(experiment: Experiment, model: str, data: str, out: Path) -> list[str]:
    """The process an experiment runs: train.py, torchrun, evaluate.py or the set builder."""
    folder = out / experiment.name
    if experiment.kind == "kclass-set":
        return [sys.executable, "-m", "benchmarks.kclass_set", "--data", data,
                "--out", str(folder / "data"), *experiment.args]
    if experiment.kind == "evaluate":
        # A --checkpoint names an experiment; its rows are named by their experiment too.
        scored = requirements(experiment)
        args = [str(out / a / TRAIN_RUN) if a in scored else a for a in experiment.args]
        return [sys.executable, "evaluate.py", "--data", data, *args,
                "--json", str(folder / "evaluation.json"),
                "--predictions", str(folder / "predictions.jsonl")]
    on_data = data if experiment.data_from is None else str(out / experiment.data_from / "data")
    script = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2"] if experiment.kind == "torchrun" else [sys.executable])
    return [*script, "train.py", "--model", model, "--data", on_data, *experiment.args,
            "--output-dir", str(folder / TRAIN_RUN)]


def requirements(experiment: Experiment) -> list[str]:
    """The experiments whose output `experiment` reads: the checkpoints it scores, the data
    set it trains on."""
    scored = [a for previous, a in zip(("", *experiment.args), experiment.args, strict=False)
              if previous == "--checkpoint"]
    return scored + ([experiment.data_from] if experiment.data_from else [])


def finished(folder: Path, command: list[str]) -> dict | None:
    """The record of the experiment that finished in `folder` with this `command` (None: not
    run, cut short, or run with another command: the experiment has changed since)."""
    path = folder / EXPERIMENT_FILE
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record is not None and record.get("argv") == command else None


def finished_as_now(experiment: Experiment, model: str, data: str, out: Path) -> dict | None:
    """The record of `experiment` if it finished in `out` with its present command (the same
    model, data and sizes)."""
    return finished(out / experiment.name, command_line(experiment, model, data, out))


def clear_folder(folder: Path) -> None:
    """Remove what an earlier attempt of this command left in `folder` (cut short, or run
    with another command); refuse a folder this command did not make (a run of your own)."""
    if not folder.exists():
        return
    if not (folder / STARTED_FILE).is_file():
        raise UsageError(f"{folder} exists and was not made by this command: choose another "
                         "--out, or move it away")
    print(f"  removing {folder}, left by an earlier attempt (cut short or another command)",
          file=sys.stderr)
    shutil.rmtree(folder)


def run_experiment(experiment: Experiment, model: str, data: str, out: Path) -> dict:
    """Run one experiment from scratch (a folder left by an interrupted attempt is removed
    first: it holds nothing but that attempt) and record its time and peak memory."""
    folder = out / experiment.name
    clear_folder(folder)
    folder.mkdir(parents=True)
    (folder / STARTED_FILE).touch()
    command = command_line(experiment, model, data, out)
    load = os.getloadavg()[0]
    # One datasets cache for every experiment: the same reviews are tokenized once.
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "cache"),
           **({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
              if experiment.kind == "torchrun" else {})}
    usage = measure_process(command, folder / "output.log", env)
    record = {"argv": command, **usage, "load_average": [load, os.getloadavg()[0]],
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    # Written whole, then renamed: a half-written record is never read as a finished one.
    partial = folder / f"{EXPERIMENT_FILE}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(folder / EXPERIMENT_FILE)
    return record


def up_to_date(experiment: Experiment, model: str, data: str, out: Path) -> dict | None:
    """The record of `experiment` if it finished with its present command after everything
    it reads (None: it must run)."""
    done = finished_as_now(experiment, model, data, out)
    for needed in requirements(experiment):
        record = out / needed / EXPERIMENT_FILE  # there: check_inputs refused a missing one
        if done and record.stat().st_mtime > (out / experiment.name / EXPERIMENT_FILE).stat(
                ).st_mtime:
            done = None  # its input was made again since
    return done


def check_inputs(todo: list[Experiment], by_name: dict[str, Experiment], model: str, data: str,
                 out: Path) -> None:
    """Refuse, before any experiment runs, one that reads an experiment which neither runs
    before it now nor has finished in `out` with its present command (the same model and data;
    `by_name` holds the mode's experiments: an input's command depends on the mode's sizes)."""
    runs_before: set[str] = set()
    for experiment in todo:
        for needed in requirements(experiment):
            if needed not in runs_before and finished_as_now(
                    by_name[needed], model, data, out) is None:
                raise UsageError(f"experiment {experiment.name} reads {needed}, which has not "
                                 f"run in {out} as it is now: run it first (give both to "
                                 "--only, or leave --only out)")
        runs_before.add(experiment.name)


def run_all(mode: str, model: str, data: str, out: Path, only: list[str] | None) -> None:
    """Run every experiment of `mode` not yet finished in `out` (those of `only`, if given)."""
    by_name = {e.name: e for e in experiments(SCALES[mode])}
    todo = [e for e in by_name.values() if not only or e.name in only]
    check_inputs(todo, by_name, model, data, out)
    for i, experiment in enumerate(todo, 1):
        done = up_to_date(experiment, model, data, out)
        if done:
            print(f"[{i}/{len(todo)}] {experiment.name}: finished before "
                  f"({done['wall_seconds']:.0f} s), skipped", file=sys.stderr)
            continue
        print(f"[{i}/{len(todo)}] {experiment.name} ...", file=sys.stderr, flush=True)
        record = run_experiment(experiment, model, data, out)
        print(f"[{i}/{len(todo)}] {experiment.name}: {record['wall_seconds']:.0f} s, peak RSS "
              f"{record['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Collecting the numbers


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def collect_run(folder: Path) -> dict:
    """A train.py run's numbers: its configuration, metrics, last validation and checkpoint."""
    train_run = folder / TRAIN_RUN
    config = json.loads((train_run / "config.json").read_text())
    log = [json.loads(line) for line in (train_run / "log.jsonl").read_text().splitlines() if line]
    checkpoint = find_checkpoint(train_run)
    weights = sorted(checkpoint.glob("*.safetensors"))
    return {"config": config, "metrics": json.loads((train_run / "metrics.json").read_text()),
            "validation": next((r["validation"] for r in reversed(log) if "validation" in r),
                               None),
            "steps": max((r["step"] for r in log if "step" in r), default=0),
            "checkpoint_bytes": folder_bytes(checkpoint),
            "weights_bytes": sum(path.stat().st_size for path in weights)}


def collect_evaluation(out: Path, experiment: Experiment) -> dict:
    """An evaluate.py comparison: its rows, and each pair of `experiment.compare` compared
    review by review from the predictions (evaluate.py itself compares each row with the
    first only)."""
    folder = out / experiment.name
    report = json.loads((folder / "evaluation.json").read_text())
    lines = [json.loads(line) for line in
             (folder / "predictions.jsonl").read_text().splitlines() if line]
    labels = np.array([line["label"] for line in lines])
    # A row's name: its experiment's (the first folder of its checkpoint under `out`).
    names = {row["name"]: ("base" if row["checkpoint"] is None
                           else Path(row["checkpoint"]).relative_to(out).parts[0])
             for row in report["results"]}

    def probabilities(experiment_name: str) -> np.ndarray:
        row = next(name for name, short in names.items() if short == experiment_name)
        return np.array([line["probabilities"][row] for line in lines])

    pairs = [paired_comparison(a, b, labels, probabilities(a), probabilities(b))
             for a, b in experiment.compare]
    rows = [{**{k: v for k, v in row.items() if k != "checkpoint"}, "name": names[row["name"]]}
            for row in report["results"]]
    return {"rows": rows, "pairs": pairs}


def collect(mode: str, model: str, data: str, out: Path, command: str) -> dict:
    """Every finished experiment's numbers, and where and how they were measured."""
    results = {"mode": mode, "scale": asdict(SCALES[mode]), "command": command,
               "model": model_label(model), "machine": cpu_model(), "cores": os.cpu_count(),
               "versions": library_versions(), "experiments": {}, "runs": {},
               "evaluations": {}}
    for experiment in experiments(SCALES[mode]):
        folder = out / experiment.name
        record = finished_as_now(experiment, model, data, out)
        if record is None:
            continue
        results["experiments"][experiment.name] = {
            key: record[key] for key in ("wall_seconds", "peak_rss_mb", "finished")}
        if experiment.kind in ("train", "torchrun"):
            results["runs"][experiment.name] = collect_run(folder)
        elif experiment.kind == "evaluate":
            results["evaluations"][experiment.name] = collect_evaluation(out, experiment)
    return results


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    """The results command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.results",
        description="Regenerate every published number: run the experiments of "
                    "docs/results.md (skipping those finished in --out), collect their numbers "
                    "into OUT/results.json and, with --docs, write the tables of README.md and "
                    "docs/results.md from it.",
        allow_abbrev=False)  # --only is left out of the recorded command by its full name
    parser.add_argument("mode", choices=(*SCALES, "render"),
                        help="full: the published sizes (hours on a CPU); quick: a few dozen "
                             "reviews each (minutes); render: only rewrite the tables of --docs "
                             "from its docs/results.json")
    parser.add_argument("--model", default=os.environ.get("BENCHMARK_MODEL"),
                        help="base model, a Hub name or a local folder (default: "
                             "$BENCHMARK_MODEL); the published numbers use the offline MiniLM")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="the IMDB Parquet folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the experiments; a finished one there is not run again "
                             "(default: runs/results-MODE)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these experiments (default: all); the names: "
                             + ", ".join(e.name for e in experiments(SCALES["full"])))
    parser.add_argument("--docs", type=Path, default=None, metavar="ROOT",
                        help="write the tables into ROOT/README.md and ROOT/docs/results.md, "
                             "and the numbers into ROOT/docs/results.json, once every "
                             "experiment of the mode has finished in --out; refused when that "
                             "file holds another mode's numbers (default: only OUT/results.json)")
    return parser


def check(args: argparse.Namespace) -> None:
    """Refuse, before any work, what cannot run."""
    names = {e.name for e in experiments(SCALES["full"])}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        raise UsageError(f"--only: no experiment named {', '.join(unknown)}")
    if args.mode == "render":
        if args.docs is None:
            raise UsageError("render needs --docs ROOT (the folder holding README.md)")
        if not (args.docs / results_tables.DOCS_JSON).is_file():
            raise UsageError(f"--docs {args.docs}: no {results_tables.DOCS_JSON} there to "
                             "render from (a full or quick mode with --docs writes it)")
        results_tables.check_docs(args.docs)
        return
    if not args.model:
        raise UsageError("--model is needed (or $BENCHMARK_MODEL)")
    if not (Path(args.data) / "train.parquet").is_file():
        raise UsageError(f"--data {args.data}: no train.parquet there (the three-class set is "
                         "built from the local IMDB Parquet files)")
    if args.docs is not None:
        results_tables.check_docs(args.docs)
        check_published_mode(args.docs, args.mode)


def check_published_mode(root: Path, mode: str) -> None:
    """Refuse to replace the numbers of one mode in `root`'s documents with another's (a quick
    mode publishing into the project itself would put toy numbers in place of the full ones)."""
    published = root / results_tables.DOCS_JSON
    if not published.is_file():
        return
    held = read_json(published, "remove it, or publish into a copy of the documents")
    held_mode = held.get("mode") if isinstance(held, dict) else None
    if held_mode != mode:
        what = f"{held_mode}-mode numbers" if held_mode else "numbers of no known mode"
        raise UsageError(f"--docs {root}: its {results_tables.DOCS_JSON} holds {what}, which "
                         f"{mode} mode would replace (publish into a copy of the documents, or "
                         "remove that file first)")


def check_complete(mode: str, model: str, data: str, out: Path, only: list[str] | None) -> None:
    """Refuse, before any experiment runs, to publish a set that will not be complete: an
    experiment left out of `only` that has not finished in `out` would drop its numbers from
    docs/results.json."""
    if not only:
        return  # every experiment runs
    every = experiments(SCALES[mode])
    missing = [e.name for e in every
               if e.name not in only and finished_as_now(e, model, data, out) is None]
    if missing:
        raise UsageError(f"--docs publishes a complete set, and {', '.join(missing)} "
                         f"({len(missing)} of {len(every)}) would not have finished in {out}: "
                         "leave --only out, or --docs")


def run(args: argparse.Namespace) -> None:
    """Run, collect and render, as the mode says."""
    check(args)
    if args.mode == "render":
        results = read_json(args.docs / results_tables.DOCS_JSON,
                            "run the full mode with --docs to write it again")
        results_tables.publish(args.docs, results)
        return
    out = (args.out or REPO / "runs" / f"results-{args.mode}").resolve()
    # Absolute paths: the experiments' commands, by which a finished one is known again, stay
    # the same from wherever the command is started.
    data = str(Path(args.data).resolve())
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    if args.docs is not None:
        check_complete(args.mode, model, data, out, args.only)
    out.mkdir(parents=True, exist_ok=True)
    run_all(args.mode, model, data, out, args.only)
    results = collect(args.mode, model, data, out, args.command_line)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    print(f"Wrote {out / RESULTS_FILE}", file=sys.stderr)
    if args.docs is not None:
        results_tables.publish(args.docs, results)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.results``."""
    parser = build_parser()
    # The command that gives these numbers, for results.json: paths inside the project
    # relative to it, and without --only (the set is every experiment finished in --out).
    given = without_only(sys.argv[1:] if argv is None else argv)
    parser.set_defaults(command_line=shlex.join(
        ["python", "-m", "benchmarks.results", *(portable(arg) for arg in given)]))
    return run_command(parser, run, argv)


def without_only(argv: list[str]) -> list[str]:
    """`argv` without ``--only`` and the names that follow it (or ``--only=NAME``)."""
    kept, skipping = [], False
    for arg in argv:
        skipping = arg == "--only" or (skipping and not arg.startswith("-"))
        if not skipping and not arg.startswith("--only="):
            kept.append(arg)
    return kept


def portable(arg: str) -> str:
    """`arg`, or the path it names relative to the project when it is inside its parent
    (where the shared data lives)."""
    path = Path(arg)
    if not path.is_absolute() or not path.resolve().is_relative_to(REPO.parent):
        return arg
    return os.path.relpath(path.resolve(), REPO)


if __name__ == "__main__":
    sys.exit(main())
