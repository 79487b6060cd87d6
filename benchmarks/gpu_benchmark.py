"""The GPU benchmark (issues 16 and 32): train.py's loop against the bare model and the lab
recipe, natively, in fp16, under a Colab T4's limits and compiled, for one call on an H100/H200
(about 4 minutes there with the default flags; see "Time" below).

    python -m benchmarks.benchmark gpu --markdown BENCHMARKS.md --json gpu.json
    python -m benchmarks.benchmark gpu --variants t4 --configs 16x128,16x512   # one variant
    python -m benchmarks.benchmark gpu --device cpu --tiny --quick    # smoke test, any machine

The model: random-weight bert-base (``BertConfig()``: 12 layers, width 768, bert-base-uncased's
shape; no download), LoRA through ``lora_model.wrap_with_lora`` (r=8, alpha=32, dropout 0.1 on
query and value). The data: random token ids, no tokenizer and no data files, so it runs
offline. Review lengths are drawn to look like IMDB's: a seeded log-normal with median 233
tokens and sigma 0.65 (the median and the spread of the log of the token counts of the real
IMDB training reviews with bert-base's vocabulary, [CLS] and [SEP] included; their mean is
314), clipped to [32, max length]. At max length 128, 82% of the drawn rows fill all 128
tokens (89% of the real reviews); at 512, 11% reach 512 (15% of the real ones), and a batch is
padded to its longest row (rounded up to a multiple of 8, as ``PaddingCollator`` does), which
in most batches of 16 or more is 512.

The variants (``--variants``, default all four, in this order):

* native: the precision ``--precision`` picks (auto: what train.py's ``--precision auto``
  picks, bf16 on Ampere and newer);
* fp16: fp16 autocast with train.py's dynamic-scale GradScaler (what a T4 runs);
* t4: fp16 under a Colab T4's limits, emulated on the big GPU (``gpu_workload.t4_limits``,
  restored after each measurement): flash and cuDNN attention off (a T4 has neither; SDPA
  falls back to its memory-efficient kernel, a T4's), TF32 off (``fp32_precision = "ieee"``,
  or ``allow_tf32`` on an older torch), and memory capped at 15 GiB
  (``set_per_process_memory_fraction``). It shows which kernels run and what fits in a T4's
  memory, at the big GPU's speed: not a T4's speed (a T4's fp16 peak is 65 TFLOP/s, an H200's
  989). A measurement that runs out of memory under the cap is kept as failed and reported;
* compile: train.py's loop with ``--compile`` (``model.compile(dynamic=True)``), once, at
  ``--compile-config`` (default train.py's own batch and max length, 16x128), at native's
  precision. Its first epoch includes compiling; the report compares it with native at the
  same configuration (the steady rate after the first log window, the time compiling added,
  the training reviews after which it pays).

On a CPU, fp16 and t4 need CUDA: left out with a one-line note, or refused (exit code 2) when
named in ``--variants``; native and compile run. fp16 is left out where native is fp16 too.

Measured for each ``--configs`` entry BATCHxLENGTH (default: batch 16, the recipe's, and 64 at
lengths 128 and 512), per variant (the tables show medians over the
``--repeats`` rounds, and the largest peak memory):

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

Each gives samples/s; tokens/s of two kinds, the real (non-padding) tokens, the rate at which
reviews' text goes through, and the padded tokens, the width the model computes (samples/s x
mean padded width, what MFU counts); MFU; peak GPU memory, both allocated (by tensors) and
reserved (by the caching allocator: what the GPU must have free); and for training the
estimated time of one epoch over IMDB's 25,000 training reviews at this batch and max length:
for train.py's loop the measured epoch continued at the rate after its first log window
(``train_seconds + (25,000 - rows) / that rate``: the first batches, and compiling, once), for
the bare model and the recipe 25,000 / samples/s.

Once, after native's first configuration: the lab recipe (``lab_recipe.py``'s HF ``Trainer``,
its batch, learning rate and max length, ``padding="max_length"``, native's precision) on
``--recipe-batches`` batches and the same ``--eval-samples``; skipped, with a note, where
``accelerate`` is missing or native does not run. From the recipe and native's loop at the
recipe's batch and length (train.py evaluating at its default batch) comes an estimate of the
full-size job: 25,000 training reviews for one epoch plus 25,000 test reviews scored before and
25,000 after training, from the measured rates alone (no tokenization, no model loading).

Model FLOPs per sequence of length s (the formula behind MFU): forward
``2 * P * s + 4 * L * s^2 * d`` with P the encoder's and pooler's matrix-multiply weights,
L layers and width d (the second term is QK^T and the attention-weighted sum of V), s the
padded width the model really computes. LoRA training with frozen weights computes no weight
gradients, only activation gradients, which cost about one forward more: training = 2 x forward
(full fine-tuning would be 3 x). LoRA's own products (rank 8) are left out. MFU = model FLOP/s /
the GPU's dense peak for the measurement's precision (``PEAK_FLOPS``, from NVIDIA's datasheets;
t4's MFU is against the big GPU's fp16 peak, which is what it ran on; no MFU is shown for a GPU
or precision not in the table, fp32 and CPUs included).

Time, estimated for an H200 (not yet measured there), and its basis. A training step computes
2 x forward x batch: 0.72 TFLOP at 16x128, 2.9 at 64x128, 5.8 at 128x128, 3.1 at 16x512 and
12.4 at 64x512 (``forward_flops_per_sequence``), 2-31 ms at 40% of 989 TFLOP/s; eager
PyTorch spends about 10-15 ms of host time per step launching bert-base's and LoRA's
kernels, so steps under that are host-bound. train.py's loop: 100 steps (about 1.2-3 s), two
passes over 4,096 rows (0.5 s at 128, 2 s at 512) and about 2-3 s of setting up (bert-base
built on the GPU, loader workers started four times, validation, checkpoint and snapshot):
5-8 s per configuration; the bare model 1.5-3 s. A round of the four default configurations:
about 25-30 s per variant, t4 a little more (memory-efficient attention, the allocator at its
cap). Starting (imports, CUDA, the synthetic rows): about 30 s; the recipe about 15 s; compile
1-2 minutes (inductor compiles the training graph with dynamic shapes and, in the validation,
the inference graph; tens of seconds each on 16 cores). One round (every variant once, the
recipe, compile), the default: about 3.5-4 minutes, which leaves the GPU kit (install, import
check, tests/test_gpu.py, this) within about 6 minutes; each ``--repeats`` round more repeats
native, fp16 and t4, about 1.5 minutes.

Progress lines are printed as each measurement ends, and ``--json``/``--markdown`` are rewritten
after each one, so a run stopped part-way keeps what it measured (a run cut short in round 2
has every variant).

Here: the command line and the order of the measurements. The variants, the T4-like preset,
the model, its FLOPs and tokens and the synthetic data are in ``gpu_workload.py``, the three
measurements in ``gpu_measure.py``, the peaks, MFU, tables and targets in ``gpu_report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import BertConfig

from benchmarks.common import default_batch_size, loop_arguments, write_section
from benchmarks.gpu_measure import (
    measure_bare,
    measure_loop,
    measure_recipe,
    peak_memory,
    recipe_settings,
    start_peak,
)
from benchmarks.gpu_report import (
    epoch_seconds,
    peak_flops,
    progress_line,
    report_markdown,
    summarize,
)
from benchmarks.gpu_workload import (
    VARIANTS,
    ConfigData,
    Shape,
    Variant,
    config_data,
    model_config,
    t4_limits,
)
from data import DEFAULT_MAX_LENGTH
from machinery.cli import UsageError, at_least, quiet_library_logs
from machinery.options import Precision
from machinery.run_folder import library_versions
from machinery.runtime import pick_device, pick_precision, use_device

# The compile variant's one configuration: train.py's defaults (batch 16, max length 128).
TRAIN_DEFAULTS = f"{default_batch_size()}x{DEFAULT_MAX_LENGTH}"
DEFAULTS = {"configs": "16x128,64x128,16x512,64x512", "compile_config": TRAIN_DEFAULTS,
            "warmup_batches": 5, "bare_batches": 30, "loop_batches": 100, "eval_samples": 4096,
            "recipe_batches": 100, "repeats": 1}
# --quick: a smoke test of the benchmark itself (with --tiny, seconds on a CPU; the compile
# variant adds a minute or two there, the time torch.compile takes on a CPU).
QUICK = {"configs": "16x128,64x128", "compile_config": TRAIN_DEFAULTS, "warmup_batches": 1,
         "bare_batches": 2, "loop_batches": 3, "eval_samples": 8, "recipe_batches": 2,
         "repeats": 1}
MAX_CONFIG_LENGTH = 512
PROGRAM = "python -m benchmarks.benchmark gpu"
FAILURE_CHARS = 200  # of a failed measurement's message, in the report


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


def parse_config(text: str) -> Shape:
    """``--compile-config``: one BATCHxLENGTH entry."""
    shapes = parse_configs(text)
    if len(shapes) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one BATCHxLENGTH, e.g. 16x128")
    return shapes[0]


def parse_variants(text: str) -> list[str]:
    """``--variants``: comma-separated names from ``VARIANTS``, each once, run in that order."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of distinct variants from {','.join(VARIANTS)}")
    return names


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the gpu subcommand."""
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N, cpu, or auto (default: %(default)s)")
    add_variant_arguments(parser)

    def count(flag: str, what: str) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, type=at_least(0 if key == "warmup_batches" else 1),
                            default=None, metavar="N",
                            help=f"{what} (default: {DEFAULTS[key]}; --quick: {QUICK[key]})")

    count("--warmup-batches", "untimed batches the bare model runs first, for training and "
                              "for evaluation")
    count("--bare-batches", "timed batches of the bare model, for training and for evaluation")
    count("--loop-batches", "training batches of train.py's loop (one epoch)")
    count("--eval-samples", "rows that train.py's loop and the recipe score")
    count("--recipe-batches", "training batches of the lab recipe")
    count("--repeats", "rounds of measurements: each measures every configuration of native, "
                       "fp16 and t4 once (compile runs in the first round only); the tables "
                       "show medians")
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


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """--variants, --precision, --configs and --compile-config."""
    parser.add_argument(
        "--variants", type=parse_variants, default=None, metavar="LIST",
        help="what to run, in this order: native (--precision's choice), fp16 (fp16 autocast "
             "with train.py's GradScaler), t4 (fp16 under T4-like limits: no flash or cuDNN "
             "attention, no TF32, 15 GiB of memory; the GPU's speed, not a T4's), compile "
             "(train.py --compile, at --compile-config, once). fp16 and t4 need CUDA: on a "
             f"CPU they are left out with a note, or refused when named (default: "
             f"{','.join(VARIANTS)})")
    parser.add_argument("--precision", choices=typing.get_args(Precision), default="auto",
                        help="precision of native and compile; auto is what train.py "
                             "--precision auto picks: bf16 on an H100/H200 (default: "
                             "%(default)s)")
    parser.add_argument("--configs", type=parse_configs, default=None, metavar="BxL,...",
                        help="training batch x max length of each configuration of native, "
                             f"fp16 and t4 (default: {DEFAULTS['configs']}; --quick: "
                             f"{QUICK['configs']})")
    parser.add_argument("--compile-config", type=parse_config, default=None, metavar="BxL",
                        help="the compile variant's one configuration (default: "
                             f"{DEFAULTS['compile_config']}, train.py's batch and max length)")


def resolve_counts(args: argparse.Namespace) -> dict:
    """The counts and configurations of this run: the flags given, else --quick's or defaults."""
    chosen = {key: getattr(args, key) for key in DEFAULTS}
    for key, value in chosen.items():
        if value is None:
            chosen[key] = (QUICK if args.quick else DEFAULTS)[key]
    if isinstance(chosen["configs"], str):
        chosen["configs"] = parse_configs(chosen["configs"])
    if isinstance(chosen["compile_config"], str):
        chosen["compile_config"] = parse_config(chosen["compile_config"])
    return chosen


def resolve_variants(asked: list[str] | None, device: torch.device,
                     precision: str) -> tuple[list[Variant], list[str]]:
    """The variants this run measures, and a note for each one left out. On a CPU the
    CUDA-only ones are left out when not named, refused when named (UsageError); fp16 is left
    out where native already runs fp16."""
    chosen, notes = [VARIANTS[name] for name in asked or VARIANTS], []
    if device.type != "cuda":
        cuda_only = [variant.name for variant in chosen if variant.cuda_only]
        if cuda_only and asked:
            raise UsageError(f"--variants {','.join(cuda_only)} needs a CUDA GPU (fp16 "
                             "autocast, the T4-like preset); on a CPU ask for native or compile")
        if cuda_only:
            notes.append(f"{' and '.join(cuda_only)} left out: they need a CUDA GPU")
        chosen = [variant for variant in chosen if not variant.cuda_only]
    if precision == "fp16" and VARIANTS["fp16"] in chosen and VARIANTS["native"] in chosen:
        notes.append("fp16 left out: native already runs fp16 here")
        chosen.remove(VARIANTS["fp16"])
    return chosen, notes


def refuse(message: str) -> typing.NoReturn:
    """A mistake in the flags: one sentence on standard error and exit code 2, as argparse
    reports its own."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class Planned:
    """One measurement of the plan."""

    repeat: int
    variant: Variant
    shape: Shape
    kind: str


def measurement_plan(counts: dict, variants: list[Variant]) -> list[Planned]:
    """Every measurement of the run, in order: round after round (``--repeats``), each round
    every variant in turn, each variant every configuration (bare model, then train.py's
    loop). The compile variant, whose first epoch is mostly compiling, is in the first round
    only, at its one configuration; a run cut short has every variant once."""
    return [Planned(repeat, variant, shape, kind)
            for repeat in range(counts["repeats"])
            for variant in variants if not (variant.compile and repeat)
            for shape in ([counts["compile_config"]] if variant.compile else counts["configs"])
            for kind in variant.kinds]


@dataclass
class GpuRun:
    """One invocation: what it measures with, and what it has measured so far (``result``,
    which --json and --markdown are rewritten from after every measurement)."""

    args: argparse.Namespace
    began: float  # perf_counter at the start, for the minutes the report shows
    counts: dict
    device: torch.device
    precisions: dict[str, str]  # per variant
    plan: list[Planned]
    config: BertConfig
    settings: argparse.Namespace  # train.py's flags at this device's defaults
    result: dict
    data: dict[Shape, ConfigData] = field(default_factory=dict)  # made once, kept

    def data_for(self, shape: Shape) -> ConfigData:
        """The synthetic rows of `shape`, made at its first measurement."""
        if shape not in self.data:
            self.data[shape] = config_data(self.config, shape, self.counts,
                                           self.settings.eval_batch_size)
        return self.data[shape]


def gpu_command(args: argparse.Namespace) -> dict:
    """Measure the bare model and train.py's loop per variant and configuration, and the lab
    recipe once; print the tables and write them (and every measurement) where asked."""
    run, recipe = start_run(args)
    for item in run.plan:
        record_measurement(run, item)
        if (recipe and run.result["recipe"] is None and item.variant.name == "native"
                and item.kind == "loop"):
            record_recipe(run, recipe)
    save(run)
    print(report_markdown(run.result), flush=True)
    return run.result


def start_run(args: argparse.Namespace) -> tuple[GpuRun, dict | None]:
    """The run's device, variants, precisions, model shape and train.py's settings, announced;
    and the lab recipe's settings (None where it does not run, which the result records). A
    flag this machine cannot follow is refused before anything is measured."""
    began = time.perf_counter()
    quiet_library_logs()
    counts = resolve_counts(args)
    try:
        device = pick_device(args.device)
        precision = pick_precision(args.precision, device)
        variants, notes = resolve_variants(args.variants, device, precision)
    except UsageError as error:
        refuse(str(error))
    use_device(device)  # as train.py: the current GPU, TF32 for fp32 products
    precisions = {v.name: v.precision or precision for v in variants}
    settings = loop_arguments(device)
    recipe, why_not = recipe_settings()
    if recipe and VARIANTS["native"] not in variants:
        recipe, why_not = None, "it is compared with the native variant, which did not run"
    plan = measurement_plan(counts, variants)
    ctx = run_context(args, counts, device, precision, precisions, settings)
    ctx.update(notes=notes, planned=len(plan))
    result = {"context": ctx, "measurements": [],
              "recipe": None if recipe else {"skipped": why_not}}
    print(f"gpu benchmark: {ctx['device_name']}, variants "
          f"{', '.join(f'{n} ({p})' for n, p in precisions.items())}, configs "
          f"{', '.join(ctx['configs'])}, {ctx['counts']}, eval batch "
          f"{settings.eval_batch_size}, {settings.num_workers} loader worker(s), "
          f"{len(plan)} measurements", flush=True)
    for note in [*notes, *([f"lab recipe skipped: {why_not}"] if not recipe else [])]:
        print(note, flush=True)
    return GpuRun(args, began, counts, device, precisions, plan, model_config(args.tiny),
                  settings, result), recipe


def run_context(args: argparse.Namespace, counts: dict, device: torch.device, precision: str,
                precisions: dict[str, str], settings: argparse.Namespace) -> dict:
    """What the report says about the run: device, --precision's choice, the variants and
    their precisions, the peaks, counts, versions."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device_name": device_name, "precision": precision,
        "precisions": precisions, "variants": list(precisions),
        "peak_flops": {p: peak_flops(device_name, p) for p in sorted(set(precisions.values()))},
        "tiny": args.tiny, "configs": [shape.name for shape in counts["configs"]],
        "compile_config": counts["compile_config"].name,
        "counts": {k: v for k, v in counts.items() if k not in ("configs", "compile_config")},
        "eval_batch_size": settings.eval_batch_size, "num_workers": settings.num_workers,
        "t4_limits": None, "versions": library_versions(), "command": args.command_line,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "minutes": 0.0}


def variant_settings(run: GpuRun, variant: Variant) -> contextlib.AbstractContextManager:
    """The device settings `variant` runs under: the T4-like preset for t4 (restored after
    each measurement), none otherwise."""
    if not variant.t4_limits:
        return contextlib.nullcontext()
    return t4_limits(run.device)


def record_measurement(run: GpuRun, item: Planned) -> None:
    """Measure `item`; keep it, save, print. A measurement that runs out of GPU memory (t4's
    cap), or a compile that fails on this machine, is kept as failed and the run goes on."""
    data = run.data_for(item.shape)
    precision = run.precisions[item.variant.name]
    started = time.perf_counter()
    with variant_settings(run, item.variant) as limits:
        run.result["context"]["t4_limits"] = limits or run.result["context"]["t4_limits"]
        start_peak(run.device)
        try:
            measured = measure(run, item, precision, data)
        except torch.cuda.OutOfMemoryError as error:
            measured = {"failed": f"out of memory ({failure_text(error)})"}
        except Exception as error:  # the compiler's toolchain is the machine's, not ours
            if not item.variant.compile:
                raise
            traceback.print_exc()  # the whole story into the log; the report gets its start
            measured = {"failed": f"{type(error).__name__}: {failure_text(error)}"}
        memory = peak_memory(run.device)
    if item.variant.compile:
        torch.compiler.reset()  # the variants after it start without compiled code
    measured = {"repeat": item.repeat + 1, "variant": item.variant.name,
                "precision": precision, "config": item.shape.name, "batch": item.shape.batch,
                "length": item.shape.length, "kind": item.kind, **measured, **memory,
                "wall_seconds": time.perf_counter() - started}
    if "failed" not in measured:
        measured["imdb_epoch_seconds"] = epoch_seconds(measured)
    run.result["measurements"].append(measured)
    save(run)
    print(progress_line(measured, run.result["context"]["peak_flops"]), flush=True)


def failure_text(error: BaseException) -> str:
    """The start of `error`'s message for the report: its first two lines (a compiler error's
    first names only the backend), at most ``FAILURE_CHARS`` characters."""
    text = " ".join(line.strip() for line in str(error).splitlines()[:2])
    return text if len(text) <= FAILURE_CHARS else text[:FAILURE_CHARS - 3] + "..."


def measure(run: GpuRun, item: Planned, precision: str, data: ConfigData) -> dict:
    """The bare model's or train.py's loop's figures for `item`."""
    if item.kind == "bare":
        return measure_bare(run.config, run.device, precision, item.shape, data.bare,
                            run.counts["warmup_batches"])
    return measure_loop(run.config, run.device, precision, item.shape, data, run.settings,
                        compiled=item.variant.compile)


def record_recipe(run: GpuRun, recipe: dict) -> None:
    """Measure the lab recipe (once, at native's precision); keep it, save, print."""
    start_peak(run.device)
    precision = run.precisions["native"]
    measured = measure_recipe(run.config, run.device, precision, recipe, run.counts)
    run.result["recipe"] = {**measured, "precision": precision, **peak_memory(run.device)}
    run.result["recipe"]["imdb_epoch_seconds"] = epoch_seconds(run.result["recipe"])
    save(run)
    progress = {"kind": "recipe", "variant": "native", "repeat": 1,
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
