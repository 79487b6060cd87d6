"""The GPU benchmark (issue 16): train.py's loop against the bare model and the lab recipe, for
one call on an H100/H200 (about 2-3 minutes there with the default flags).

    python -m benchmarks.benchmark gpu --markdown BENCHMARKS.md --json gpu.json
    python -m benchmarks.benchmark gpu --device cpu --tiny --quick    # smoke test, any machine

The model: random-weight bert-base (``BertConfig()``: 12 layers, width 768, bert-base-uncased's
shape; no download), LoRA through ``lora_model.wrap_with_lora`` (r=8, alpha=32, dropout 0.1 on
query and value), the precision ``--precision auto`` picks (bf16 on Ampere and newer). The data:
random token ids, no tokenizer and no data files, so it runs offline. Review lengths are drawn
to look like IMDB's: a seeded log-normal with median 233 tokens and sigma 0.65 (the median and
the spread of the log of the token counts of the real IMDB training reviews with bert-base's
vocabulary, [CLS] and [SEP] included; their mean is 314), clipped to [32, max length]. At max
length 128, 82% of the drawn rows fill all 128 tokens (89% of the real reviews); at 512, 11%
reach 512 (15% of the real ones), and a batch is padded to its longest row (rounded up to a
multiple of 8, as ``PaddingCollator`` does), which in most batches of 16 or more is 512.

Measured for each ``--configs`` entry BATCHxLENGTH (default: batch 16, the recipe's, and 64 and
128 at length 128; 16 and 64 at length 512), in this order, ``--repeats`` times (the tables show
medians, and the largest peak memory):

* the bare model: forward+backward (training, gradients dropped, no optimizer) and forward alone
  under ``torch.inference_mode`` (evaluation, at the same batch) on batches prepared on the
  device before the clock starts; ``--warmup-batches`` untimed batches first, then
  ``--bare-batches`` timed ones, timed with CUDA events on a GPU (``perf_counter`` on a CPU);
* train.py's loop: ``train.Trainer(...).train()`` for one epoch of ``--loop-batches`` batches
  (optimizer, clipping, schedule, logging, the end-of-epoch validation and checkpoint), then
  ``evaluate.evaluate_model`` twice over ``--eval-samples`` rows, with the loaders train.py
  builds (``make_loader``, ``PaddingCollator``) at train.py's defaults for the device
  (evaluation batch, DataLoader workers). Training time is the Trainer's own clock
  (``state.train_seconds``: training steps only, no validation or checkpoint writing); it
  includes the epoch's first batches (the loader's workers starting, the first optimizer
  step), which is why the epoch has 100 batches, and the table also shows the rate the Trainer
  logged after its first log window. Evaluation is the second pass (the first starts the
  loader's workers, as the "before" scoring of a real run does).

Once, after the first configuration: the lab recipe (``lab_recipe.py``'s HF ``Trainer``, its
batch, learning rate and max length, ``padding="max_length"``, bf16/fp16 as the project picks)
on ``--recipe-batches`` batches and the same ``--eval-samples``; skipped, with a note, where
``accelerate`` is missing. From the recipe and train.py's loop at the recipe's batch and length
(train.py evaluating at its default batch) comes an estimate of the full-size job: 25,000
training reviews for one epoch plus 25,000 test reviews scored before and 25,000 after training,
from the measured rates alone (no tokenization, no model loading).

Model FLOPs per sequence of length s (the formula behind MFU): forward
``2 * P * s + 4 * L * s^2 * d`` with P the encoder's and pooler's matrix-multiply weights,
L layers and width d (the second term is QK^T and the attention-weighted sum of V), s the
padded width the model really computes. LoRA training with frozen weights computes no weight
gradients, only activation gradients, which cost about one forward more: training = 2 x forward
(full fine-tuning would be 3 x). LoRA's own products (rank 8) are left out. MFU = model FLOP/s /
the GPU's dense peak for the precision (``PEAK_FLOPS``, from NVIDIA's datasheets; no MFU is
shown for a GPU or precision not in the table, fp32 and CPUs included).

Progress lines are printed as each measurement ends, and ``--json``/``--markdown`` are rewritten
after each one, so a run stopped part-way keeps what it measured.

Here: the command line and the order of the measurements. The model, its FLOPs and the
synthetic data are in ``gpu_workload.py``, the three measurements in ``gpu_measure.py``, the
peaks, MFU, tables and targets in ``gpu_report.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import BertConfig

from benchmarks.common import loop_arguments, write_section
from benchmarks.gpu_measure import (
    measure_bare,
    measure_loop,
    measure_recipe,
    peak_gb,
    recipe_settings,
    start_peak,
)
from benchmarks.gpu_report import peak_flops, progress_line, report_markdown, summarize
from benchmarks.gpu_workload import ConfigData, Shape, config_data, model_config
from machinery.cli import at_least, quiet_library_logs
from machinery.run_folder import library_versions
from machinery.runtime import pick_device, pick_precision, use_device

DEFAULTS = {"configs": "16x128,64x128,128x128,16x512,64x512", "warmup_batches": 5,
            "bare_batches": 30, "loop_batches": 100, "eval_samples": 4096,
            "recipe_batches": 100, "repeats": 2}
# --quick: a smoke test of the benchmark itself (with --tiny, seconds on a CPU).
QUICK = {"configs": "16x128,64x128", "warmup_batches": 1, "bare_batches": 2,
         "loop_batches": 3, "eval_samples": 8, "recipe_batches": 2, "repeats": 1}
KINDS = ("bare", "loop")  # measured per configuration and repeat, in this order
MAX_CONFIG_LENGTH = 512


# ---------------------------------------------------------------------------------------------
# The command line


def parse_configs(text: str) -> list[Shape]:
    """``--configs``: comma-separated BATCHxLENGTH entries, e.g. ``16x128,64x512``."""
    shapes = []
    for entry in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", entry)
        if not match or int(match[1]) < 1 or not 8 <= int(match[2]) <= MAX_CONFIG_LENGTH:
            raise argparse.ArgumentTypeError(
                f"{entry!r} is not BATCHxLENGTH (batch >= 1, length 8 to {MAX_CONFIG_LENGTH}), "
                "e.g. 16x128")
        shapes.append(Shape(int(match[1]), int(match[2])))
    return shapes


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the gpu subcommand."""

    def count(flag: str, what: str) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, type=at_least(0 if key == "warmup_batches" else 1),
                            default=None, metavar="N",
                            help=f"{what} (default: {DEFAULTS[key]}; --quick: {QUICK[key]})")

    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N, cpu, or auto (default: %(default)s)")
    parser.add_argument("--configs", type=parse_configs, default=None, metavar="BxL,...",
                        help="training batch x max length of each configuration "
                             f"(default: {DEFAULTS['configs']}; --quick: {QUICK['configs']})")
    count("--warmup-batches", "untimed batches the bare model runs first, for training and "
                              "for evaluation")
    count("--bare-batches", "timed batches of the bare model, for training and for evaluation")
    count("--loop-batches", "training batches of train.py's loop (one epoch)")
    count("--eval-samples", "rows that train.py's loop and the recipe score")
    count("--recipe-batches", "training batches of the lab recipe")
    count("--repeats", "measurements of each configuration (the tables show medians); 2 fit "
                       "an H200 in about 3 minutes")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer, 32-wide model instead of bert-base, for a smoke test "
                             "(default: off)")
    parser.add_argument("--quick", action="store_true",
                        help="the small counts shown after each count flag, for a smoke test; "
                             "a count flag given explicitly wins (default: off)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the tables into this file between its benchmark:gpu "
                             "markers, e.g. BENCHMARKS.md (default: only print them)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every measurement and the tables as JSON, rewritten after "
                             "each measurement (default: none)")


def resolve_counts(args: argparse.Namespace) -> dict:
    """The counts and configurations of this run: the flags given, else --quick's or defaults."""
    chosen = {key: getattr(args, key) for key in DEFAULTS}
    for key, value in chosen.items():
        if value is None:
            chosen[key] = (QUICK if args.quick else DEFAULTS)[key]
    if isinstance(chosen["configs"], str):
        chosen["configs"] = parse_configs(chosen["configs"])
    return chosen


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class GpuRun:
    """One invocation: what it measures with, and what it has measured so far (``result``,
    which --json and --markdown are rewritten from after every measurement)."""

    args: argparse.Namespace
    began: float  # perf_counter at the start, for the minutes the report shows
    counts: dict
    device: torch.device
    precision: str
    config: BertConfig
    settings: argparse.Namespace  # train.py's flags at this device's defaults
    result: dict


def gpu_command(args: argparse.Namespace) -> dict:
    """Measure the bare model and train.py's loop per configuration, and the lab recipe once;
    print the tables and write them (and every measurement) where asked."""
    run, recipe = start_run(args)
    data: dict[Shape, ConfigData] = {}
    for repeat in range(run.counts["repeats"]):
        for shape in run.counts["configs"]:
            if shape not in data:
                data[shape] = config_data(run.config, shape, run.counts,
                                          run.settings.eval_batch_size)
            for kind in KINDS:
                record_measurement(run, repeat, shape, kind, data[shape])
            if recipe and run.result["recipe"] is None:
                record_recipe(run, recipe)
    save(run)
    print(report_markdown(run.result), flush=True)
    return run.result


def start_run(args: argparse.Namespace) -> tuple[GpuRun, dict | None]:
    """The run's device, precision, model shape and train.py's settings, announced; and the
    lab recipe's settings (None where it cannot run here, which the result records)."""
    began = time.perf_counter()
    quiet_library_logs()
    counts = resolve_counts(args)
    device = pick_device(args.device)
    use_device(device)  # as train.py: the current GPU, TF32 for fp32 products
    precision = pick_precision("auto", device)
    config = model_config(args.tiny)
    settings = loop_arguments(device)
    recipe, why_not = recipe_settings()
    ctx = run_context(args, counts, device, precision, settings)
    result = {"context": ctx, "measurements": [],
              "recipe": None if recipe else {"skipped": why_not}}
    print(f"gpu benchmark: {ctx['device_name']}, {precision}, peak FLOP/s "
          f"{ctx['peak_flops']}, configs {', '.join(ctx['configs'])}, {ctx['counts']}, eval "
          f"batch {settings.eval_batch_size}, {settings.num_workers} loader worker(s)",
          flush=True)
    if not recipe:
        print(f"lab recipe skipped: {why_not}", flush=True)
    return GpuRun(args, began, counts, device, precision, config, settings, result), recipe


def run_context(args: argparse.Namespace, counts: dict, device: torch.device, precision: str,
                settings: argparse.Namespace) -> dict:
    """What the report says about the run: device, precision, peak, counts, versions."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device_name": device_name, "precision": precision,
        "peak_flops": peak_flops(device_name, precision), "tiny": args.tiny,
        "configs": [shape.name for shape in counts["configs"]],
        "counts": {k: v for k, v in counts.items() if k != "configs"},
        "eval_batch_size": settings.eval_batch_size, "num_workers": settings.num_workers,
        "versions": library_versions(), "command": args.command_line,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "minutes": 0.0}


def record_measurement(run: GpuRun, repeat: int, shape: Shape, kind: str,
                       data: ConfigData) -> None:
    """Measure the bare model or train.py's loop (`kind`) at `shape`; keep it, save, print."""
    start_peak(run.device)
    started = time.perf_counter()
    if kind == "bare":
        measured = measure_bare(run.config, run.device, run.precision, shape, data.bare,
                                run.counts["warmup_batches"])
    else:
        measured = measure_loop(run.config, run.device, run.precision, shape, data,
                                run.settings)
    measured = {"repeat": repeat + 1, "config": shape.name, "batch": shape.batch,
                "length": shape.length, "kind": kind, **measured, "peak_gb": peak_gb(run.device),
                "wall_seconds": time.perf_counter() - started}
    run.result["measurements"].append(measured)
    save(run)
    print(progress_line(measured, run.result["context"]["peak_flops"]), flush=True)


def record_recipe(run: GpuRun, recipe: dict) -> None:
    """Measure the lab recipe (once); keep it, save, print."""
    start_peak(run.device)
    run.result["recipe"] = {**measure_recipe(run.config, run.device, run.precision, recipe,
                                             run.counts),
                            "peak_gb": peak_gb(run.device)}
    save(run)
    progress = {"kind": "recipe", "repeat": 1,
                "config": f"{recipe['batch']}x{recipe['max_length']}", **run.result["recipe"]}
    print(progress_line(progress, run.result["context"]["peak_flops"]), flush=True)


def save(run: GpuRun) -> None:
    """Rewrite --json and --markdown with everything measured so far."""
    run.result["context"]["minutes"] = (time.perf_counter() - run.began) / 60
    run.result["summary"] = summarize(run.result)
    if run.args.json:
        run.args.json.write_text(json.dumps(run.result, indent=2) + "\n")
    if run.args.markdown:
        write_section(run.args.markdown, "gpu", report_markdown(run.result))


if __name__ == "__main__":
    sys.exit("run it as: python -m benchmarks.benchmark gpu")
