"""What the benchmarks share: train.py's defaults and its Trainer (reached only through the
functions here), the flags every command takes, timing, running train.py or a piece of a
benchmark as a process of its own, and the lines and sections of the reports.
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
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import PeftModel

import train
from data import DEFAULT_MAX_LENGTH
from lora_model import wrap_with_lora
from machinery.cli import at_least, options_from
from machinery.options import fill_device_defaults
from machinery.report import markdown_table
from machinery.run_folder import Job, library_versions
from machinery.runtime import autocast

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "imdb")
DEFAULT_REPEATS = 3
# The cpu benchmark's reviews; levers draws its training batches from as many.
DEFAULT_TRAIN_SAMPLES, DEFAULT_EVAL_SAMPLES = 2000, 1000
# The learning rate of every train.py run in the benchmarks (the lab recipe's too).
PROJECT_LR = "2e-3"
MB = 1e6

Step = Callable[[dict], None]


# ---------------------------------------------------------------------------------------------
# train.py's interface. Every benchmark reaches train.py's flags and its Trainer through these
# functions only, so that a change there is followed here, in one place.


def default_batch_size() -> int:
    """train.py's default training batch size (--batch-size)."""
    return train.Recipe().batch_size


def default_seed() -> int:
    """train.py's default --seed."""
    return train.Recipe().seed


def with_lora(model: torch.nn.Module) -> PeftModel:
    """`model` with train.py's default LoRA adapters (its recipe's r, alpha, dropout, targets)."""
    recipe = train.Recipe()
    return wrap_with_lora(model, recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout,
                          recipe.lora_targets)


def loop_arguments(device: torch.device, folder: str = "unused",
                   *extra: str) -> argparse.Namespace:
    """train.py's flags as its parser gives them, with the device's defaults filled in as
    train.py fills them (evaluation batch, DataLoader workers)."""
    args = train.build_parser().parse_args(["--output-dir", folder, *extra])
    fill_device_defaults(args, device)
    return args


class NoTokenizer:
    """Stands in for the tokenizer that train.py saves beside each adapter (none here)."""

    def save_pretrained(self, folder: Path) -> None:
        """Nothing to save."""


def make_trainer(args: argparse.Namespace, model: torch.nn.Module, train_loader,
                 validation_loader, device: torch.device, precision: str) -> train.Trainer:
    """train.py's Trainer for `model` with `args` (``loop_arguments``), as one process on
    `device`; no tokenizer is saved."""
    recipe, run_options = options_from(args, train.Recipe), options_from(args, train.RunOptions)
    return train.Trainer(recipe, run_options, Job.one_process(device, precision), model,
                         NoTokenizer(), train_loader, validation_loader)


# ---------------------------------------------------------------------------------------------
# The flags several commands take


def add_model_flags(parser: argparse.ArgumentParser,
                    max_length: int = DEFAULT_MAX_LENGTH) -> None:
    """--model, --data and --max-length (default: `max_length`)."""
    parser.add_argument("--model", default=os.environ.get("BENCHMARK_MODEL"),
                        required="BENCHMARK_MODEL" not in os.environ,
                        help="local BERT model folder (default: $BENCHMARK_MODEL)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"local IMDB folder (default: {DEFAULT_DATA})")
    parser.add_argument("--max-length", type=at_least(8), default=max_length,
                        help="tokens per review (default: %(default)s)")


def add_size_flags(parser: argparse.ArgumentParser, train: int, test: int) -> None:
    """--train-samples and --eval-samples, with these defaults."""
    parser.add_argument("--train-samples", type=at_least(1), default=train, metavar="N",
                        help="training reviews (default: %(default)s)")
    parser.add_argument("--eval-samples", type=at_least(1), default=test, metavar="M",
                        help="test reviews (default: %(default)s)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--repeats, --work-dir and --markdown."""
    parser.add_argument("--repeats", type=at_least(1), default=DEFAULT_REPEATS,
                        help="runs of each variant; the table shows medians "
                             "(default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the runs' logs and results.json "
                             "(default: runs/benchmark-COMMAND-<time>)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the table into this file between its markers, e.g. "
                             "BENCHMARKS.md (default: only print it)")


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device | None) -> None:
    """Wait until a GPU has finished its queued work (no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_per_sample(step: Step, batches: list[dict], device: torch.device | None = None
                     ) -> float:
    """Seconds per sample of `step` over `batches` (waiting for a GPU to finish)."""
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    return (time.perf_counter() - started) / sum(len(batch["labels"]) for batch in batches)


def first_batches(loader: Iterable[dict], n: int) -> list[dict]:
    """The loader's first `n` batches (fewer if it has fewer), built now."""
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(batch)
    return batches


def bare_steps(model: torch.nn.Module, device: torch.device, precision: str
               ) -> tuple[Step, Step]:
    """The bare model's two steps: forward+backward with the gradients dropped (no optimizer,
    no clipping), and forward alone; both in `precision`, as train.py computes them."""
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

    return train_step, eval_step


# ---------------------------------------------------------------------------------------------
# Running train.py, or a piece of a benchmark, as a process of its own


def measure_process(command: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run `command`; return its wall time and peak resident memory (RSS).

    ``os.wait4`` gives the resource usage of exactly this child and the processes it waited
    for (``getrusage`` of all children would report the largest of every run so far); its peak
    RSS is that of the largest one of them, not a sum: under torchrun, the largest rank's.
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


# The rows a run's measurements make in a table: (label, key, how to format).
CPU_ROWS = (
    ("tokenization (s)", "tokenize_seconds", "{:.2f}"),
    ("train samples/s", "train_samples_per_s", "{:.2f}"),
    ("eval samples/s", "eval_samples_per_s", "{:.2f}"),
    ("end-to-end wall time (s)", "wall_seconds", "{:.1f}"),
    ("peak memory, RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("test accuracy after training", "accuracy", "{:.4f}"),
)


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


def interleaved(names: Sequence[str], repeat: int) -> list[str]:
    """`names` rotated by `repeat`: each round starts with another variant, so that a slow
    spell of a shared machine hits each alike."""
    shift = repeat % len(names)
    return [*names[shift:], *names[:shift]]


# ---------------------------------------------------------------------------------------------
# Reports


def context(args: argparse.Namespace, started: float, load_before: tuple) -> dict:
    """Machine, versions, command and how busy the machine was."""
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


def context_lines(ctx: dict) -> list[str]:
    """The machine/versions/command lines under a table."""
    versions = ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    return [f"Machine: {ctx['machine']}, {ctx['cores']} cores ({ctx['system']}); {versions}.",
            f"Measured {ctx['date']} in {ctx['minutes']:.0f} min; load average "
            f"{ctx['load_average']['start']:.1f} at the start, {ctx['load_average']['end']:.1f} "
            "at the end (the machine is shared).",
            "", "```bash", ctx["command"], "```"]


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


def target(goal: str, measured: str, met: bool | None) -> dict:
    """One row of a targets table (`met` None: not decided in this run)."""
    return {"target": goal, "measured": measured, "met": met}


def targets_table(targets: list[dict]) -> str:
    """The targets as a Markdown table: met, **not** met, or "—" where a run could not decide."""
    rows = [[t["target"], t["measured"],
             "—" if t["met"] is None else "yes" if t["met"] else "**no**"] for t in targets]
    return markdown_table(["target", "measured", "met"], rows)


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
