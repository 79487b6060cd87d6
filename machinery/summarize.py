"""One table for a seed sweep: several train.py runs of one configuration as mean ± standard
deviation per metric.

    python -m machinery.summarize runs/seed0 runs/seed1 runs/seed2 [--json sweep.json]

A single run's accuracy moves with the seed (LoRA's initialisation, dropout, the data order)
and with --data-seed (which reviews are drawn); the spread across seeds says how much of a
difference between two configurations is the configuration and how much is chance. The runs
must differ only in --seed, --data-seed and flags that do not change the result (--output-dir,
--log-every, ...): anything else is refused, naming the flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from machinery.cli import UsageError, adjustable_options, check_can_write, run_command
from machinery.files import write_json
from machinery.options import DataOptions, RunOptions, RuntimeOptions
from machinery.report import CONFIG_FILE, METRICS_FILE, metric_names, read_run_file
from machinery.run_folder import differing_settings

# What a sweep varies; with the flags a resumed run may change (they do not change the result:
# train.py's recipe has none), the library versions and the device, these may differ between
# the summarised runs, and so may the class counts of the splits (another --data-seed draws
# other training reviews). The review counts config.json records may not: with the same flags
# only other data changes them.
SWEPT = ("seed", "data_seed")
MAY_DIFFER = {*SWEPT, *adjustable_options(DataOptions, RunOptions, RuntimeOptions), "versions",
              "resolved_device", "class_counts"}


def read_run(folder: Path) -> tuple[dict, dict]:
    """(config.json, metrics.json) of a finished run folder."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give finished train.py run folders")
    return read_run_file(folder / CONFIG_FILE), read_run_file(folder / METRICS_FILE)


def configuration_differences(folders: list[Path], configs: list[dict]) -> list[str]:
    """'--lr 0.002 in runs/a, 0.0005 in runs/b' for every setting outside MAY_DIFFER on which
    a run differs from the first (``differing_settings``, in both directions: either run may
    be the older, whose config.json lacks a newer flag)."""
    differences = {}
    for folder, config in zip(folders[1:], configs[1:], strict=True):
        for name, first, other in differing_settings(configs[0], config, MAY_DIFFER):
            differences.setdefault(name, f"{name} {first} in {folders[0]}, {other} in {folder}")
        for name, other, first in differing_settings(config, configs[0], MAY_DIFFER):
            differences.setdefault(name, f"{name} {first} in {folders[0]}, {other} in {folder}")
    return list(differences.values())


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1 in the denominator) and the values themselves."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
            "values": values}


def summarize(runs: list[tuple[dict, dict]]) -> dict:
    """Each before/after metric's spread over the runs, the fitted temperature's and the test
    ECE's (raw and calibrated) when every run has them, and the swept seeds."""
    metrics = [m for _, m in runs]
    summary = {"runs": len(runs),
               "seeds": {key: [config.get(key) for config, _ in runs] for key in SWEPT}}
    for row in ("before", "after"):
        summary[row] = {name: spread([m[row][name] for m in metrics])
                        for name in metric_names(metrics[0]["after"])}
    if all("calibration" in m for m in metrics):
        summary["calibration"] = {
            "temperature": spread([m["calibration"]["temperature"] for m in metrics]),
            **{f"test_ece_{kind}": spread([m["calibration"]["test"]["ece"][kind]
                                           for m in metrics])
               for kind in ("raw", "calibrated")}}
    summary["train_seconds"] = spread([m["train_seconds"] for m in metrics])
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a table: one metric per line, before and after as mean ± sd."""
    def cell(entry: dict) -> str:
        return f"{entry['mean']:.4f} ± {entry['std']:.4f}"

    rows = [["metric", "before", "after"]]
    rows += [[name, cell(summary["before"][name]), cell(summary["after"][name])]
             for name in summary["after"]]
    rows += [[name.replace("_", " "), "", cell(entry)]
             for name, entry in summary.get("calibration", {}).items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seeds = ", ".join(f"--{key.replace('_', '-')} {values}"
                      for key, values in summary["seeds"].items())
    return (f"{summary['runs']} runs ({seeds}): mean ± standard deviation (n - 1)\n"
            + "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    """The summarize.py command line."""
    parser = argparse.ArgumentParser(
        prog="python -m machinery.summarize",
        description="Summarise several finished train.py runs of one configuration (a seed "
                    "sweep) as mean ± standard deviation of every test metric.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="finished train.py run folders (at least two) that differ only in "
                             "--seed, --data-seed and flags that do not change the result")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the summary (each metric's mean, std and values) to "
                             "this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --json to replace an existing file")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Read the runs, check they share one configuration, print (and write) the summary."""
    if len(args.runs) < 2:
        raise UsageError("a spread needs at least two runs; give two or more RUN_DIRs")
    if len(set(map(Path.resolve, args.runs))) < len(args.runs):
        raise UsageError("a run folder is given twice; each run must count once")
    if args.json:
        check_can_write(args.json, "--json", args.overwrite, kind="file")
    runs = [read_run(folder) for folder in args.runs]
    differences = configuration_differences(args.runs, [config for config, _ in runs])
    if differences:
        raise UsageError("the runs are not of one configuration: " + "; ".join(differences))
    calibrated = [folder for folder, (_, metrics) in zip(args.runs, runs, strict=True)
                  if "calibration" in metrics]
    if calibrated and len(calibrated) < len(runs):
        # Their "after" loss is that of calibrated probabilities; the older runs' is raw.
        raise UsageError(f"only {', '.join(map(str, calibrated))} of the runs have a fitted "
                         "temperature; the others come from a train.py before temperature "
                         "scaling, and their losses do not compare: train them again")
    summary = summarize(runs)
    print(format_summary(summary))
    if args.json:
        write_json(args.json, {**summary, "run_folders": [str(p) for p in args.runs]})
        print(f"Wrote {args.json}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of summarize.py."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
