"""The ``cpu`` benchmark: train.py against the lab recipe and the bare model, side by side.

It runs, in one invocation and interleaved (the order rotates every repeat, so a slow spell of
a shared machine hits each variant alike): the lab recipe (``lab_recipe.py``), this project's
``train.py`` with its defaults, and the bare model (the same batches through forward +
backward, and forward alone for evaluation, with nothing else: the compute ceiling). Each runs
as its own process with an empty ``datasets`` cache, so every run tokenizes from scratch and
its peak memory is its own. It reports medians and writes a Markdown table into
``--markdown`` (between markers, so the text around it stays).

``bare`` and ``tokenize`` are the pieces ``cpu`` starts as processes (``python -m
benchmarks.benchmark bare|tokenize``); they are here too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from benchmarks.common import (
    CPU_ROWS,
    DEFAULT_EVAL_SAMPLES,
    DEFAULT_TRAIN_SAMPLES,
    PROJECT_LR,
    Step,
    add_model_flags,
    add_output_flags,
    add_size_flags,
    bare_steps,
    context,
    context_lines,
    data_flags,
    default_batch_size,
    default_seed,
    first_batches,
    fresh_cache_env,
    interleaved,
    measure_process,
    medians,
    prepare_work_dir,
    run_project,
    synchronize,
    target,
    targets_table,
    timed_per_sample,
    with_lora,
    write_section,
)
from benchmarks.lab_recipe import RECIPE_CHANGES
from data import PaddingCollator, make_loader, split_train_validation, tokenize
from data import take_subset as take_reviews
from lora_model import load_base_model
from machinery.cli import at_least
from machinery.data_sources import load_split
from machinery.hub import load_tokenizer
from machinery.report import markdown_table
from machinery.runtime import pick_device, pick_precision

VARIANTS = ("recipe", "project", "bare")
# The bare ceiling runs a fixed number of batches (not the whole epoch) to save time; at
# length 128 almost every IMDB batch is full width, so the first batches stand for all.
DEFAULT_BARE_TRAIN_BATCHES, DEFAULT_BARE_EVAL_BATCHES = 30, 8
# --quick: a run that exercises everything in well under two minutes (with a tiny model).
QUICK = {"train_samples": 32, "eval_samples": 16, "repeats": 1, "bare_train_batches": 2,
         "bare_eval_batches": 1}
# Targets of issue 5 (on the 2-core CPU).
TARGET_WALL_RATIO = 0.6
TARGET_CEILING_SHARE = 0.95
TARGET_TOKENIZE_SPEEDUP = 5.0
TARGET_CACHED_TOKENIZE_SECONDS = 1.0
# The bare model has no tokenization of its own to compare, no end-to-end run and no accuracy.
BARE_ROWS = ("train_samples_per_s", "eval_samples_per_s")


# ---------------------------------------------------------------------------------------------
# The command lines of cpu and of its pieces


def add_cpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the cpu subcommand."""
    add_model_flags(parser)
    add_size_flags(parser, DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES)
    add_output_flags(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test of the benchmark itself: {QUICK} (pass a tiny model)")
    parser.add_argument("--bare-train-batches", type=at_least(1),
                        default=DEFAULT_BARE_TRAIN_BATCHES,
                        help="training batches the bare model runs (default: %(default)s)")
    parser.add_argument("--bare-eval-batches", type=at_least(1),
                        default=DEFAULT_BARE_EVAL_BATCHES,
                        help="evaluation batches the bare model runs (default: %(default)s)")
    parser.add_argument("--cache-samples", type=at_least(2), default=None, metavar="N",
                        help="reviews of the tokenization-cache check (default: every train "
                             "and test review)")


def add_bare_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the bare subcommand (a piece of cpu)."""
    add_model_flags(parser)
    add_size_flags(parser, DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES)
    parser.add_argument("--train-batches", type=at_least(1), default=DEFAULT_BARE_TRAIN_BATCHES,
                        help="timed training batches (default: %(default)s)")
    parser.add_argument("--eval-batches", type=at_least(1), default=DEFAULT_BARE_EVAL_BATCHES,
                        help="timed evaluation batches (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=at_least(1), default=64,
                        help="evaluation batch, as train.py's (default: %(default)s)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the tokenize subcommand (a piece of cpu)."""
    add_model_flags(parser)
    parser.add_argument("--samples", type=at_least(2), default=None,
                        help="tokenize only this many reviews, half of each split "
                             "(default: all)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")


# ---------------------------------------------------------------------------------------------
# Running one variant as a process


def run_recipe(args: argparse.Namespace, folder: Path) -> dict:
    """The lab recipe in its own process."""
    out = folder / "recipe.json"
    command = [sys.executable, "-m", "benchmarks.lab_recipe", *data_flags(args),
               "--lr", PROJECT_LR, "--json", str(out)]
    usage = measure_process(command, folder / "recipe.log", fresh_cache_env(folder / "cache"))
    result = json.loads(out.read_text())
    return {**usage, "tokenize_seconds": result["tokenize_seconds"],
            "train_samples_per_s": result["train_samples_per_s"],
            "eval_samples_per_s": result["eval_samples_per_s"],
            "accuracy": result["accuracy"], "before_accuracy": result["before_accuracy"]}


def run_bare(args: argparse.Namespace, folder: Path) -> dict:
    """The bare model (``bare`` subcommand) in its own process."""
    out = folder / "bare.json"
    command = [sys.executable, "-m", "benchmarks.benchmark", "bare", *data_flags(args),
               "--train-batches", str(args.bare_train_batches),
               "--eval-batches", str(args.bare_eval_batches), "--json", str(out)]
    usage = measure_process(command, folder / "bare.log", fresh_cache_env(folder / "cache"))
    return {**usage, **json.loads(out.read_text())}


def run_tokenize_cache(args: argparse.Namespace, folder: Path) -> dict:
    """Tokenize every review twice in one process with an empty cache: cold, then cached."""
    out = folder / "tokenize.json"
    command = [sys.executable, "-m", "benchmarks.benchmark", "tokenize", "--model", args.model,
               "--data", args.data, "--max-length", str(args.max_length), "--json", str(out)]
    if args.cache_samples:
        command += ["--samples", str(args.cache_samples)]
    folder.mkdir(parents=True)
    measure_process(command, folder / "tokenize.log", fresh_cache_env(folder / "cache"))
    return json.loads(out.read_text())


RUNNERS = {"recipe": run_recipe, "project": run_project, "bare": run_bare}


# ---------------------------------------------------------------------------------------------
# The pieces run as processes: bare model, tokenization


def bare_command(args: argparse.Namespace) -> None:
    """Forward+backward over the project's first training batches, forward over its test batches.

    Nothing else: the batches are built before the clock starts, there is no optimizer, no
    clipping, no logging; one untimed warm-up batch each. Same model, LoRA, precision and
    batches as train.py with the same flags.
    """
    device = pick_device("auto")
    precision = pick_precision("auto", device)
    train_batches, test_batches = bare_batches(args, device)
    transformers.set_seed(default_seed())
    model = with_lora(load_base_model(args.model).to(device))
    train_step, eval_step = bare_steps(model, device, precision)
    model.train()
    train_rate = samples_per_second(train_step, train_batches, device)
    model.eval()
    with torch.inference_mode():
        eval_rate = samples_per_second(eval_step, test_batches, device)
    result = {"train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate,
              "precision": precision, "train_batches": len(train_batches),
              "eval_batches": len(test_batches)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")


def bare_batches(args: argparse.Namespace, device: torch.device
                 ) -> tuple[list[dict], list[dict]]:
    """train.py's first training batches and first test batches, built on `device`."""
    tokenizer = load_tokenizer(args.model)
    train, _ = split_train_validation(load_split(args.data, "train"), args.train_samples,
                                      validation_size=0.1, seed=0)
    test = take_reviews(load_split(args.data, "test"), args.eval_samples, seed=0)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length), default_batch_size(),
                               collator, shuffle=True, seed=default_seed())
    train_loader.sampler.set_epoch(0)
    test_loader = make_loader(tokenize(test, tokenizer, args.max_length), args.eval_batch_size,
                              collator, shuffle=False)
    return (first_batches(train_loader, args.train_batches),
            first_batches(test_loader, args.eval_batches))


def samples_per_second(step: Step, batches: list[dict], device: torch.device) -> float:
    """Samples per second of `step` over `batches`, after an untimed warm-up on the first."""
    step(batches[0])
    synchronize(device)
    return 1 / timed_per_sample(step, batches, device)


def tokenize_command(args: argparse.Namespace) -> None:
    """Tokenize the train and test reviews twice with the project's ``tokenize``; time both.

    The first pass (with an empty ``datasets`` cache) tokenizes; the second finds the cached
    token ids exactly as a second train.py run does (same fingerprint, same cache file).
    """
    tokenizer = load_tokenizer(args.model)
    splits = [load_split(args.data, name) for name in ("train", "test")]
    if args.samples:
        splits = [take_reviews(split, args.samples // 2, seed=0) for split in splits]
    seconds = []
    for _ in ("cold", "cached"):
        started = time.perf_counter()
        for split in splits:
            tokenize(split, tokenizer, args.max_length)
        seconds.append(time.perf_counter() - started)
    result = {"reviews": sum(len(split) for split in splits), "cold_seconds": seconds[0],
              "cached_seconds": seconds[1]}
    args.json.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# cpu: the side-by-side benchmark


def cpu_command(args: argparse.Namespace) -> dict:
    """Run every variant `repeats` times, interleaved; print and write the table."""
    if args.quick:
        apply_quick(args)
    work = prepare_work_dir(args)
    started = time.perf_counter()
    load_before = os.getloadavg()
    runs = run_variants(args, work)
    cache = run_tokenize_cache(args, work / "tokenize")
    result = {"runs": runs, "tokenize_cache": cache, "medians": medians(runs),
              "context": context(args, started, load_before)}
    result["table"] = cpu_table(result)
    result["targets"] = cpu_targets(result)
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = cpu_markdown(result)
    print(text)
    if args.markdown:
        write_section(args.markdown, "cpu", text)
    return result


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: the small counts of ``QUICK``, and a tokenization check of the same size."""
    for name, value in QUICK.items():
        setattr(args, name, value)
    args.cache_samples = args.cache_samples or 2 * args.eval_samples


def run_variants(args: argparse.Namespace, work: Path) -> dict[str, list[dict]]:
    """Every variant `repeats` times, in a rotating order; each run's numbers as it ends."""
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name in interleaved(VARIANTS, repeat):
            folder = work / f"{repeat + 1}-{name}"
            folder.mkdir()
            runs[name].append(RUNNERS[name](args, folder))
            # Kept after every run: a stopped invocation leaves what it measured.
            (work / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
            print(f"repeat {repeat + 1}/{args.repeats} {name}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()
                              if isinstance(v, float)), flush=True)
    return runs


def cpu_table(result: dict) -> list[list[str]]:
    """Rows of the results table (the first is the header): medians per variant and the two
    ratios."""
    med = result["medians"]
    rows = [["", "lab recipe", "train.py", "bare model", "train.py / recipe",
             "train.py / bare"]]
    for label, key, fmt in CPU_ROWS:
        recipe, project = med["recipe"][key], med["project"][key]
        bare = med["bare"].get(key) if key in BARE_ROWS else None
        rows.append([label, fmt.format(recipe), fmt.format(project),
                     "—" if bare is None else fmt.format(bare),
                     f"{project / recipe:.2f}", "—" if bare is None else f"{project / bare:.2f}"])
    cache = result["tokenize_cache"]
    rows.append([f"tokenization of all {cache['reviews']:,} reviews, cold / cached (s)", "—",
                 f"{cache['cold_seconds']:.2f} / {cache['cached_seconds']:.2f}", "—", "—", "—"])
    return rows


def cpu_targets(result: dict) -> list[dict]:
    """Each target of issue 5 with the measured value and whether it is met."""
    med = result["medians"]
    recipe, project, bare = med["recipe"], med["project"], med["bare"]
    cache = result["tokenize_cache"]
    return [
        target("end-to-end wall time <= 0.6 x the recipe's, at equal or better accuracy",
               f"{project['wall_seconds'] / recipe['wall_seconds']:.2f} x, accuracy "
               f"{project['accuracy']:.4f} vs {recipe['accuracy']:.4f}",
               project["wall_seconds"] <= TARGET_WALL_RATIO * recipe["wall_seconds"]
               and project["accuracy"] >= recipe["accuracy"]),
        target("training >= 95% of bare forward+backward",
               f"{project['train_samples_per_s'] / bare['train_samples_per_s']:.1%}",
               project["train_samples_per_s"]
               >= TARGET_CEILING_SHARE * bare["train_samples_per_s"]),
        target("evaluation >= 95% of bare forward",
               f"{project['eval_samples_per_s'] / bare['eval_samples_per_s']:.1%}",
               project["eval_samples_per_s"] >= TARGET_CEILING_SHARE * bare["eval_samples_per_s"]),
        target("tokenization >= 5 x the slow tokenizer",
               f"{recipe['tokenize_seconds'] / project['tokenize_seconds']:.1f} x",
               recipe["tokenize_seconds"]
               >= TARGET_TOKENIZE_SPEEDUP * project["tokenize_seconds"]),
        target(f"second run tokenizes all {cache['reviews']:,} reviews in < 1 s (cache)",
               f"{cache['cached_seconds']:.2f} s",
               cache["cached_seconds"] < TARGET_CACHED_TOKENIZE_SECONDS),
        target("peak memory not above the recipe's",
               f"{project['peak_rss_mb']:.0f} MB vs {recipe['peak_rss_mb']:.0f} MB",
               project["peak_rss_mb"] <= recipe["peak_rss_mb"]),
    ]


def cpu_markdown(result: dict) -> str:
    """The generated part of BENCHMARKS.md for the cpu benchmark."""
    ctx = result["context"]
    lines = [f"Medians of {ctx['repeats']} interleaved runs; {ctx['train_samples']:,} training "
             f"and {ctx['eval_samples']:,} test reviews, max length {ctx['max_length']}. The "
             f"bare model ran {ctx['bare_batches']['train']} training and "
             f"{ctx['bare_batches']['eval']} evaluation batches after one warm-up batch each.",
             "", markdown_table(result["table"][0], result["table"][1:]), "",
             targets_table(result["targets"]),
             "", *context_lines(ctx), "",
             "Changes to the lab recipe, each needed to run it offline or on current versions:",
             "", *[f"- {change}" for change in RECIPE_CHANGES]]
    return "\n".join(lines)
