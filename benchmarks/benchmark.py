"""Measure train.py against the lab recipe and the bare model, side by side, on one machine.

    python -m benchmarks.benchmark cpu --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark cpu --quick --model TINY --data FOLDER   # under 2 minutes
    python -m benchmarks.benchmark lengths --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark levers --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark gpu                                       # an H100/H200

``cpu`` runs, in one invocation and interleaved (the order rotates every repeat, so a slow
spell of a shared machine hits each variant alike): the lab recipe (``lab_recipe.py``), this
project's ``train.py`` with its defaults, and the bare model (the same batches through forward
+ backward, and forward alone for evaluation, with nothing else: the compute ceiling). Each
runs as its own process with an empty ``datasets`` cache, so every run tokenizes from scratch
and its peak memory is its own. It reports medians and writes a Markdown table into
``--markdown`` (between markers, so the text around it stays).

``bare`` and ``tokenize`` are the pieces ``cpu`` starts as processes; ``lengths`` measures
``--group-by-length`` at long sequence lengths; ``levers`` times each speed lever against the
default (``levers.py``); ``gpu`` is prepared for a GPU (random-weight bert-base, bf16): see
``gpu_benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "imdb")
DEFAULT_MARKDOWN = REPO / "BENCHMARKS.md"
VARIANTS = ("recipe", "project", "bare")
DEFAULT_REPEATS = 3
DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES = 2000, 1000
# The bare ceiling runs a fixed number of batches (not the whole epoch) to save time; at
# length 128 almost every IMDB batch is full width, so the first batches stand for all.
DEFAULT_BARE_TRAIN_BATCHES, DEFAULT_BARE_EVAL_BATCHES = 30, 8
# --quick: a run that exercises everything in well under two minutes (with a tiny model).
QUICK = {"train_samples": 32, "eval_samples": 16, "repeats": 1, "bare_train_batches": 2,
         "bare_eval_batches": 1}
# The project's flags in the benchmark: its defaults, with the learning rate both runs use.
PROJECT_LR = "2e-3"
LENGTHS_MAX_LENGTH = 512
# Targets of issue 5 (on the 2-core CPU).
TARGET_WALL_RATIO = 0.6
TARGET_CEILING_SHARE = 0.95
TARGET_TOKENIZE_SPEEDUP = 5.0
TARGET_CACHED_TOKENIZE_SECONDS = 1.0
MB = 1e6


# ---------------------------------------------------------------------------------------------
# Running one variant as a process


def measure_process(command: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run `command`; return its wall time, peak resident memory (RSS) and exit code.

    ``os.wait4`` gives the resource usage of exactly this child (``getrusage`` of all children
    would report the largest of every run so far).
    """
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, **env})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{tail}")
    return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss * 1024 / MB}


def fresh_cache_env(folder: Path) -> dict[str, str]:
    """Environment of a run that starts from an empty `datasets` cache, offline."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder)}


def data_flags(args: argparse.Namespace) -> list[str]:
    """The flags that pick the model, the reviews and the sequence length, for every variant."""
    return ["--model", args.model, "--data", args.data,
            "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
            "--max-length", str(args.max_length)]


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


def project_command(args: argparse.Namespace, output_dir: Path, *extra: str) -> list[str]:
    """train.py with its defaults, the benchmark's data flags and learning rate."""
    return [sys.executable, "train.py", *data_flags(args), "--lr", PROJECT_LR,
            "--output-dir", str(output_dir), *extra]


def run_project(args: argparse.Namespace, folder: Path, *extra: str) -> dict:
    """This project's train.py in its own process; its numbers come from metrics.json."""
    usage = measure_process(project_command(args, folder / "run", *extra), folder / "train.log",
                            fresh_cache_env(folder / "cache"))
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    return {**usage, "tokenize_seconds": metrics["tokenize_seconds"],
            "train_samples_per_s": metrics["train_samples_per_s"],
            "eval_samples_per_s": metrics["after"]["n"] / metrics["test_seconds"]["after"],
            "accuracy": metrics["after"]["accuracy"],
            "before_accuracy": metrics["before"]["accuracy"]}


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


# ---------------------------------------------------------------------------------------------
# The pieces run as processes: bare model, tokenization


def bare_command(args: argparse.Namespace) -> None:
    """Forward+backward over the project's first training batches, forward over its test batches.

    Nothing else: the batches are built before the clock starts, there is no optimizer, no
    clipping, no logging; one untimed warm-up batch each. Same model, LoRA, precision and
    batches as train.py with the same flags.
    """
    import torch
    import transformers

    from data import PaddingCollator, make_loader, split_train_validation, tokenize
    from data import take_subset as take_reviews
    from data_sources import load_split
    from lora_model import load_base_model, load_tokenizer, wrap_with_lora
    from runtime import autocast, pick_device, pick_precision
    from train_flags import DEFAULT_BATCH_SIZE, DEFAULT_SEED

    device = pick_device("auto")
    precision = pick_precision("auto", device)
    tokenizer = load_tokenizer(args.model)
    train, _ = split_train_validation(load_split(args.data, "train"), args.train_samples,
                                      validation_size=0.1, seed=0)
    test = take_reviews(load_split(args.data, "test"), args.eval_samples, seed=0)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length), DEFAULT_BATCH_SIZE,
                               collator, shuffle=True, seed=DEFAULT_SEED)
    train_loader.sampler.set_epoch(0)
    test_loader = make_loader(tokenize(test, tokenizer, args.max_length), args.eval_batch_size,
                              collator, shuffle=False)
    train_batches = first_batches(train_loader, args.train_batches)
    test_batches = first_batches(test_loader, args.eval_batches)
    transformers.set_seed(DEFAULT_SEED)
    model = wrap_with_lora(load_base_model(args.model).to(device))
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step(batch: dict) -> None:
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        for param in params:
            param.grad = None

    def eval_step(batch: dict) -> None:
        with autocast(device, precision):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    model.train()
    train_rate = samples_per_second(train_step, train_batches, device)
    model.eval()
    with torch.inference_mode():
        eval_rate = samples_per_second(eval_step, test_batches, device)
    result = {"train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate,
              "precision": precision, "train_batches": len(train_batches),
              "eval_batches": len(test_batches)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")


def first_batches(loader, n: int) -> list[dict]:
    """The loader's first `n` batches (fewer if it has fewer), built now."""
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(batch)
    return batches


def samples_per_second(step, batches: list[dict], device) -> float:
    """Samples per second of `step` over `batches`, after an untimed warm-up on the first."""
    step(batches[0])
    synchronize(device)
    return 1 / timed_per_sample(step, batches, device)


def timed_per_sample(step, batches: list[dict], device=None) -> float:
    """Seconds per sample of `step` over `batches` (waiting for a GPU to finish)."""
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    return (time.perf_counter() - started) / sum(len(batch["labels"]) for batch in batches)


def synchronize(device) -> None:
    """Wait until a GPU has finished its queued work (no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def tokenize_command(args: argparse.Namespace) -> None:
    """Tokenize the train and test reviews twice with the project's ``tokenize``; time both.

    The first pass (with an empty ``datasets`` cache) tokenizes; the second finds the cached
    token ids exactly as a second train.py run does (same fingerprint, same cache file).
    """
    from data import take_subset as take_reviews
    from data import tokenize
    from data_sources import load_split
    from lora_model import load_tokenizer

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
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.cache_samples = args.cache_samples or 2 * args.eval_samples
    work = prepare_work_dir(args)
    started = time.perf_counter()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]
        for name in order:
            folder = work / f"{repeat + 1}-{name}"
            folder.mkdir()
            runner = {"recipe": run_recipe, "project": run_project, "bare": run_bare}[name]
            runs[name].append(runner(args, folder))
            # Kept after every run: a stopped invocation leaves what it measured.
            (work / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
            print(f"repeat {repeat + 1}/{args.repeats} {name}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()
                              if isinstance(v, float)), flush=True)
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


def prepare_work_dir(args: argparse.Namespace) -> Path:
    """The folder for this invocation's runs (--work-dir, default runs/benchmark-<time>)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.work_dir or REPO / "runs" / f"benchmark-{args.command}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--work-dir {work} already holds files; give a new folder")
    return work


def medians(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per variant, the median of every numeric measurement over the repeats."""
    return {name: {key: statistics.median(run[key] for run in results)
                   for key, value in results[0].items() if isinstance(value, (int, float))}
            for name, results in runs.items() if results}


# (label, key, how to format, whether larger is better)
CPU_ROWS = (
    ("tokenization (s)", "tokenize_seconds", "{:.2f}"),
    ("train samples/s", "train_samples_per_s", "{:.2f}"),
    ("eval samples/s", "eval_samples_per_s", "{:.2f}"),
    ("end-to-end wall time (s)", "wall_seconds", "{:.1f}"),
    ("peak memory, RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("test accuracy after training", "accuracy", "{:.4f}"),
)
# The bare model has no tokenization of its own to compare, no end-to-end run and no accuracy.
BARE_ROWS = ("train_samples_per_s", "eval_samples_per_s")


def cpu_table(result: dict) -> list[list[str]]:
    """Rows of the results table: medians per variant and the two ratios."""
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


def target(goal: str, measured: str, met: bool) -> dict:
    """One row of the targets table."""
    return {"target": goal, "measured": measured, "met": met}


def context(args: argparse.Namespace, started: float, load_before: tuple) -> dict:
    """Machine, versions, command and how busy the machine was."""
    from run_folder import library_versions

    return {"machine": cpu_model(), "cores": os.cpu_count(), "system": platform.platform(),
            "versions": library_versions(),
            "command": args.command_line,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": (time.perf_counter() - started) / 60,
            "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
            "repeats": args.repeats, "train_samples": args.train_samples,
            "eval_samples": args.eval_samples, "max_length": args.max_length,
            "bare_batches": {"train": getattr(args, "bare_train_batches", None),
                             "eval": getattr(args, "bare_eval_batches", None)}}


def model_label(model: str) -> str:
    """A readable name for a model folder: the name its config records, else the folder's."""
    config = Path(model) / "config.json"
    recorded = json.loads(config.read_text()).get("_name_or_path") if config.is_file() else None
    return Path(recorded or model).name


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table; the first row is the header."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def context_lines(ctx: dict) -> list[str]:
    """The machine/versions/command lines under a table."""
    versions = ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    return [f"Machine: {ctx['machine']}, {ctx['cores']} cores ({ctx['system']}); {versions}.",
            f"Measured {ctx['date']} in {ctx['minutes']:.0f} min; load average "
            f"{ctx['load_average']['start']:.1f} at the start, {ctx['load_average']['end']:.1f} "
            "at the end (the machine is shared).",
            "", "```bash", ctx["command"], "```"]


def cpu_markdown(result: dict) -> str:
    """The generated part of BENCHMARKS.md for the cpu benchmark."""
    ctx = result["context"]
    from benchmarks.lab_recipe import RECIPE_CHANGES

    lines = [f"Medians of {ctx['repeats']} interleaved runs; {ctx['train_samples']:,} training "
             f"and {ctx['eval_samples']:,} test reviews, max length {ctx['max_length']}. The "
             f"bare model ran {ctx['bare_batches']['train']} training and "
             f"{ctx['bare_batches']['eval']} evaluation batches after one warm-up batch each.",
             "", markdown_table(result["table"]), "",
             markdown_table([["target", "measured", "met"]]
                            + [[t["target"], t["measured"], "yes" if t["met"] else "**no**"]
                               for t in result["targets"]]),
             "", *context_lines(ctx), "",
             "Changes to the lab recipe, each needed to run it offline or on current versions:",
             "", *[f"- {change}" for change in RECIPE_CHANGES]]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the ``benchmark:NAME`` markers of `path` (appended if missing)."""
    start, end = f"<!-- benchmark:{name} start -->", f"<!-- benchmark:{name} end -->"
    block = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)


# ---------------------------------------------------------------------------------------------
# lengths: --group-by-length at long sequences


def lengths_command(args: argparse.Namespace) -> dict:
    """Padding and training speed with and without --group-by-length, at long sequences.

    The padding fractions are computed from the token counts of every training review with
    the samplers train.py uses, no model needed. Training speed: forward+backward over one
    whole epoch of ``--timed-samples`` training reviews (default: ``--train-samples``), batched
    both ways, interleaved (a whole epoch, because grouped batches come in random order, long
    and short). With ``--train-py`` also ``--repeats`` train.py runs each way on
    ``--train-samples`` reviews, for the effect on accuracy; repeat k uses ``--seed 42+k`` for
    both ways.
    """
    from train_flags import DEFAULT_SEED

    args.timed_samples = args.timed_samples or args.train_samples
    work = prepare_work_dir(args)
    started, load_before = time.perf_counter(), os.getloadavg()
    padding = padding_fractions(args)
    speed = grouped_training_speed(args)
    rows = [["", "random batches", "--group-by-length", "grouped / random"],
            [f"padded tokens, all {padding['reviews']:,} training reviews",
             f"{padding['random']:.1%}", f"{padding['grouped']:.1%}", "—"],
            [f"padded tokens, the {args.timed_samples:,} reviews timed",
             f"{padding['subset_random']:.1%}", f"{padding['subset_grouped']:.1%}", "—"],
            ["forward+backward samples/s (one epoch of them)",
             f"{speed['random']:.2f}", f"{speed['grouped']:.2f}",
             f"{speed['grouped'] / speed['random']:.2f}"]]
    runs: dict[str, list[dict]] = {"random": [], "grouped": []}
    for repeat in range(args.repeats if args.train_py else 0):
        for name in (("random", "grouped") if repeat % 2 == 0 else ("grouped", "random")):
            folder = work / f"{repeat + 1}-{name}"
            folder.mkdir()
            # Each repeat is another draw (seed 42, 43, ...), the same for both variants, so
            # that the medians say something about the spread of accuracy, not one seed's luck.
            extra = ["--seed", str(DEFAULT_SEED + repeat)]
            extra += ["--group-by-length"] if name == "grouped" else []
            runs[name].append(run_project(args, folder, *extra))
            print(f"repeat {repeat + 1} {name}: {runs[name][-1]}", flush=True)
    med = medians(runs)
    for label, key, fmt in CPU_ROWS[1:] if args.train_py else ():
        if key != "tokenize_seconds":
            rows.append([f"train.py: {label}", fmt.format(med["random"][key]),
                         fmt.format(med["grouped"][key]),
                         f"{med['grouped'][key] / med['random'][key]:.2f}"])
    ctx = context(args, started, load_before)
    result = {"padding": padding, "speed": speed, "runs": runs, "medians": med, "table": rows,
              "context": ctx}
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    one = args.repeats == 1
    last_seed = DEFAULT_SEED + args.repeats - 1
    seeds = f"seed {DEFAULT_SEED}" if one else f"seeds {DEFAULT_SEED}-{last_seed}"
    runs_note = (f" train.py rows: {'one run' if one else f'medians of {args.repeats} runs'} "
                 f"each way ({seeds}, the same for both ways) on {args.train_samples:,} training "
                 f"and {args.eval_samples:,} test reviews."
                 if args.train_py else " Accuracy: not measured in this invocation (--train-py).")
    epochs = "one epoch" if one else f"medians of {args.repeats} interleaved epochs"
    text = "\n".join([
        f"--max-length {args.max_length}, batch 16, {model_label(args.model)}; forward+backward "
        f"over {epochs} of {args.timed_samples:,} reviews." + runs_note, "",
        markdown_table(rows), "", *context_lines(ctx)])
    print(text)
    if args.markdown:
        write_section(args.markdown, "lengths", text)
    return result


def grouped_training_speed(args: argparse.Namespace) -> dict[str, float]:
    """Samples/s of forward+backward over one epoch, random vs length-grouped batches."""
    import transformers

    from data import PaddingCollator, make_loader, split_train_validation, tokenize
    from data_sources import load_split
    from lora_model import load_base_model, load_tokenizer, wrap_with_lora
    from runtime import autocast, pick_device, pick_precision
    from train_flags import DEFAULT_BATCH_SIZE, DEFAULT_SEED

    device = pick_device("auto")
    precision = pick_precision("auto", device)
    tokenizer = load_tokenizer(args.model)
    train, _ = split_train_validation(load_split(args.data, "train"), args.timed_samples,
                                      validation_size=0.1, seed=0)
    tokens = tokenize(train, tokenizer, args.max_length)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    epochs = {}
    for name, grouped in (("random", False), ("grouped", True)):
        loader = make_loader(tokens, DEFAULT_BATCH_SIZE, collator, shuffle=True,
                             seed=DEFAULT_SEED, group_by_length=grouped)
        loader.sampler.set_epoch(0)
        epochs[name] = list(loader)
    transformers.set_seed(DEFAULT_SEED)
    model = wrap_with_lora(load_base_model(args.model).to(device)).train()

    def step(batch: dict) -> None:
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(epochs["random"][0])  # warm-up
    rates: dict[str, list[float]] = {"random": [], "grouped": []}
    for repeat in range(args.repeats):
        for name in (("random", "grouped") if repeat % 2 == 0 else ("grouped", "random")):
            rates[name].append(1 / timed_per_sample(step, epochs[name]))
            print(f"round {repeat + 1} {name}: {rates[name][-1]:.3f} samples/s", flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def padding_fractions(args: argparse.Namespace) -> dict:
    """Share of padded tokens in one epoch's training batches, random vs length-grouped."""
    from torch.utils.data import DistributedSampler

    from data import PAD_TO_MULTIPLE_OF, split_train_validation, tokenize
    from data_sources import load_split
    from lora_model import load_tokenizer
    from samplers import LengthGroupedSampler, example_lengths, round_up
    from train_flags import DEFAULT_BATCH_SIZE, DEFAULT_SEED

    tokenizer = load_tokenizer(args.model)
    train_split = load_split(args.data, "train")
    result = {}
    for name, n in (("", None), ("subset_", args.timed_samples)):
        train, _ = split_train_validation(train_split, n, validation_size=0.1, seed=0)
        lengths = example_lengths(tokenize(train, tokenizer, args.max_length))
        samplers = {"random": DistributedSampler(range(len(lengths)), num_replicas=1, rank=0,
                                                 seed=DEFAULT_SEED),
                    "grouped": LengthGroupedSampler(lengths, DEFAULT_BATCH_SIZE, DEFAULT_SEED)}
        for kind, sampler in samplers.items():
            order = list(sampler)
            batches = [lengths[order[i:i + DEFAULT_BATCH_SIZE]]
                       for i in range(0, len(order), DEFAULT_BATCH_SIZE)]
            padded = sum(len(b) * round_up(int(b.max()), PAD_TO_MULTIPLE_OF) for b in batches)
            result[name + kind] = 1 - sum(int(b.sum()) for b in batches) / padded
        if n is None:
            result["reviews"] = len(lengths)
    return result


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line: cpu, lengths, gpu, and the pieces bare and tokenize."""
    parser = argparse.ArgumentParser(
        description="Benchmark train.py against the lab recipe (HF Trainer) and the bare "
                    "model. See BENCHMARKS.md.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(command_line=command_line(None))  # main() records its own argv

    def common(sub: argparse.ArgumentParser, max_length: int) -> None:
        from cli import at_least
        from data import DEFAULT_MAX_LENGTH

        sub.add_argument("--model", default=os.environ.get("BENCHMARK_MODEL"),
                         required="BENCHMARK_MODEL" not in os.environ,
                         help="local BERT model folder (default: $BENCHMARK_MODEL)")
        sub.add_argument("--data", default=DEFAULT_DATA,
                         help=f"local IMDB folder (default: {DEFAULT_DATA})")
        sub.add_argument("--max-length", type=at_least(8), default=max_length or
                         DEFAULT_MAX_LENGTH, help="tokens per review (default: %(default)s)")

    def sizes(sub: argparse.ArgumentParser, train: int, test: int) -> None:
        from cli import at_least

        sub.add_argument("--train-samples", type=at_least(1), default=train, metavar="N",
                         help="training reviews (default: %(default)s)")
        sub.add_argument("--eval-samples", type=at_least(1), default=test, metavar="M",
                         help="test reviews (default: %(default)s)")

    def outputs(sub: argparse.ArgumentParser) -> None:
        from cli import at_least

        sub.add_argument("--repeats", type=at_least(1), default=DEFAULT_REPEATS,
                         help="runs of each variant; the table shows medians "
                              "(default: %(default)s)")
        sub.add_argument("--work-dir", type=Path, default=None,
                         help="folder for the runs' logs and results.json "
                              "(default: runs/benchmark-COMMAND-<time>)")
        sub.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                         help="write the table into this file between its markers, e.g. "
                              "BENCHMARKS.md (default: only print it)")

    from cli import at_least

    cpu = commands.add_parser("cpu", help="recipe vs train.py vs bare model on this CPU",
                              description=cpu_command.__doc__)
    common(cpu, 0)
    sizes(cpu, DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES)
    outputs(cpu)
    cpu.add_argument("--quick", action="store_true",
                     help=f"a smoke test of the benchmark itself: {QUICK} (pass a tiny model)")
    cpu.add_argument("--bare-train-batches", type=at_least(1),
                     default=DEFAULT_BARE_TRAIN_BATCHES,
                     help="training batches the bare model runs (default: %(default)s)")
    cpu.add_argument("--bare-eval-batches", type=at_least(1), default=DEFAULT_BARE_EVAL_BATCHES,
                     help="evaluation batches the bare model runs (default: %(default)s)")
    cpu.add_argument("--cache-samples", type=at_least(2), default=None, metavar="N",
                     help="reviews of the tokenization-cache check (default: every train and "
                          "test review)")

    lengths = commands.add_parser("lengths", help="--group-by-length at long sequences",
                                  description=lengths_command.__doc__)
    common(lengths, LENGTHS_MAX_LENGTH)
    sizes(lengths, 400, 400)
    outputs(lengths)
    lengths.add_argument("--train-py", action="store_true",
                         help="also run train.py with and without --group-by-length, "
                              "--repeats times each, for the effect on accuracy (default: off)")
    lengths.add_argument("--timed-samples", type=at_least(1), default=None, metavar="N",
                         help="training reviews of the forward+backward timing (default: "
                              "--train-samples); at length 512 on 2 CPU cores an epoch of 2,000 "
                              "in random batches takes about 25 minutes, grouped about 10")

    bare = commands.add_parser("bare", help="(a piece of cpu) the bare model's throughput",
                               description=bare_command.__doc__)
    common(bare, 0)
    sizes(bare, DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES)
    bare.add_argument("--train-batches", type=at_least(1), default=DEFAULT_BARE_TRAIN_BATCHES,
                      help="timed training batches (default: %(default)s)")
    bare.add_argument("--eval-batches", type=at_least(1), default=DEFAULT_BARE_EVAL_BATCHES,
                      help="timed evaluation batches (default: %(default)s)")
    bare.add_argument("--eval-batch-size", type=at_least(1), default=64,
                      help="evaluation batch, as train.py's (default: %(default)s)")
    bare.add_argument("--json", type=Path, required=True, help="where to write the result")

    tokenize = commands.add_parser("tokenize", help="(a piece of cpu) one tokenization pass",
                                   description=tokenize_command.__doc__)
    common(tokenize, 0)
    tokenize.add_argument("--samples", type=at_least(2), default=None,
                          help="tokenize only this many reviews, half of each split "
                               "(default: all)")
    tokenize.add_argument("--json", type=Path, required=True, help="where to write the result")

    from benchmarks.levers import add_levers_arguments

    levers = commands.add_parser("levers", help="each speed lever against the default",
                                 description="See benchmarks/levers.py.")
    common(levers, 0)
    add_levers_arguments(levers)

    from benchmarks.gpu_benchmark import add_gpu_arguments

    gpu = commands.add_parser("gpu", help="random-weight bert-base, bf16, on a GPU",
                              description="See benchmarks/gpu_benchmark.py.")
    add_gpu_arguments(gpu)
    return parser


def command_line(argv: list[str] | None) -> str:
    """The command that ran the benchmark with `argv` (None: this process's arguments)."""
    return "python -m benchmarks.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.benchmark``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = command_line(argv)
    if args.command == "gpu":
        from benchmarks.gpu_benchmark import gpu_command

        gpu_command(args)
        return 0
    from cli import quiet_library_logs

    quiet_library_logs()
    from benchmarks.levers import levers_command

    {"cpu": cpu_command, "lengths": lengths_command, "bare": bare_command,
     "tokenize": tokenize_command, "levers": levers_command}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
