"""The GPU benchmark's report (see ``gpu_benchmark.py``): the GPUs' peaks and MFU, the medians
over the repeats, the tables per variant, the compile variant against native, the full-size
job's estimate and the targets of issue 16.
"""

from __future__ import annotations

import re
import statistics

from benchmarks.common import target, targets_table
from benchmarks.gpu_workload import (
    IMDB_MEDIAN_TOKENS,
    MIN_REVIEW_TOKENS,
    T4_MEMORY_BYTES,
    VARIANTS,
)
from machinery.report import markdown_table

# Dense (no sparsity) tensor-core peak FLOP/s per GPU and autocast precision, from NVIDIA's
# datasheets; where a datasheet gives only the figure "with sparsity", half of it. Matched
# against torch.cuda.get_device_name() in this order (most specific first): every word must
# appear as a whole word ("A10" is not "A100" or "A10G"), case-insensitively. A GPU that is
# not here (A10G: NVIDIA publishes no datasheet figure; L40, GH200, H800, ...) and fp32 get no
# MFU rather than a guess.
PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H200", "NVL"), {"bf16": 835.5e12, "fp16": 835.5e12}),  # H200 datasheet: 1,671 sparse
    (("H200",), {"bf16": 989.4e12, "fp16": 989.4e12}),  # H200 SXM: as the H100 SXM
    (("H100", "PCIe"), {"bf16": 756.5e12, "fp16": 756.5e12}),  # H100 datasheet: 1,513 sparse
    (("H100", "NVL"), {"bf16": 835.5e12, "fp16": 835.5e12}),  # H100 datasheet: 1,671 sparse
    # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse in the datasheet; 989.4 dense in the
    # H100 whitepaper.
    (("H100",), {"bf16": 989.4e12, "fp16": 989.4e12}),
    (("A100",), {"bf16": 312e12, "fp16": 312e12}),  # A100 datasheet, SXM and PCIe alike
    (("A10",), {"bf16": 125e12, "fp16": 125e12}),  # A10 datasheet
    (("L40S",), {"bf16": 362.05e12, "fp16": 362.05e12}),  # L40S datasheet
    (("L4",), {"bf16": 121e12, "fp16": 121e12}),  # L4 datasheet: 242 sparse
    (("T4",), {"fp16": 65e12}),  # T4 datasheet (Turing: no bf16 tensor cores)
    (("V100S",), {"fp16": 130e12}),  # V100 datasheet, V100S PCIe (Volta: no bf16)
    (("V100", "PCIe"), {"fp16": 112e12}),  # V100 datasheet, PCIe
    (("V100",), {"fp16": 125e12}),  # V100 datasheet, SXM2
)
# The full-size job of the estimate: one epoch over every training review, and every test
# review scored before and after training.
FULL_TRAIN_REVIEWS = FULL_TEST_REVIEWS = 25_000
# Targets of issue 16.
TARGET_MFU = 0.40
TARGET_MFU_SHAPE = "64x128"
TARGET_JOB_SPEEDUP = 10.0
MISSING = "—"  # a cell with nothing measured
# Over the repeats the largest of these is kept, not the median: the memory a run needs.
PEAK_KEYS = ("peak_gb", "peak_reserved_gb")
T4_NAME = "Tesla T4"  # as torch names the GPU the t4 variant emulates


# ---------------------------------------------------------------------------------------------
# Peaks and MFU




def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU named `device_name` at `precision` (``PEAK_FLOPS``).

    None for a GPU not in the table, a CPU, or a precision the table has no figure for (fp32).
    """
    for words, peaks in PEAK_FLOPS:
        if all(re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", device_name,
                         re.IGNORECASE) for word in words):
            return peaks.get(precision)
    return None


def mfu(samples_per_s: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (None without a peak)."""
    return None if peak is None else samples_per_s * flops_per_sample / peak


def measured_mfu(m: dict, kind: str, peaks: dict) -> float | None:
    """The MFU of measurement `m`'s training or evaluation (`kind`: train or eval), against
    the peak of its precision (`peaks`: precision -> peak FLOP/s, the run context's)."""
    return mfu(m[f"{kind}_samples_per_s"], m[f"{kind}_flops_per_sample"],
               peaks.get(m["precision"]))


def epoch_seconds(m: dict) -> float:
    """Estimated seconds of one training epoch over ``FULL_TRAIN_REVIEWS`` at `m`'s batch and
    length: train.py's measured epoch continued at its rate after the first log window (the
    first batches, and compiling, counted once); 25,000 / samples/s for the bare model and the
    recipe, which have no such epoch."""
    if "train_seconds" not in m:
        return FULL_TRAIN_REVIEWS / m["train_samples_per_s"]
    steady = m.get("train_samples_per_s_after_first_log") or m["train_samples_per_s"]
    return m["train_seconds"] + (FULL_TRAIN_REVIEWS - m["train_samples"]) / steady


def progress_line(m: dict, peaks: dict) -> str:
    """One measurement as a line of progress."""
    head = f"repeat {m['repeat']} {m['variant']} {m['config']} {m['kind']}"
    memory = ("" if m.get("peak_gb") is None else
              f", peak {m['peak_gb']:.2f} GB allocated, {m['peak_reserved_gb']:.2f} reserved")
    if "failed" in m:
        return f"{head}: failed: {m['failed']}{memory}"
    rates = []
    for kind in ("train", "eval"):
        share = measured_mfu(m, kind, peaks)
        rates.append(f"{kind} {m[f'{kind}_samples_per_s']:.1f} samples/s, "
                     f"{m[f'{kind}_tokens_per_s']:.0f} tokens/s"
                     + ("" if share is None else f" ({share:.1%} MFU)"))
    return f"{head}: {'; '.join(rates)}{memory}"


# ---------------------------------------------------------------------------------------------
# Medians and tables


def summarize(result: dict) -> dict:
    """Medians per variant, configuration and kind, the tables, the compile comparison, the
    estimate and the targets, from the measurements made so far (a partial run gives partial
    tables)."""
    ctx = result["context"]
    peaks = ctx["peak_flops"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for m in result["measurements"]:
        if "failed" not in m:
            groups.setdefault((m["variant"], m["config"], m["kind"]), []).append(m)
    med = {key: median_of(runs) for key, runs in groups.items()}
    training, evaluation = configuration_tables(med, ctx)
    recipe = result.get("recipe")
    recipe_shape = (f"{recipe['batch']}x{recipe['length']}"
                    if recipe and "train_samples_per_s" in recipe else None)
    loop = med.get(("native", recipe_shape, "loop"))
    estimate = full_job_estimate(loop, recipe if recipe_shape else None)
    comparison = comparison_rows(loop, recipe if recipe_shape else None, estimate, peaks)
    targets = issue_targets(med.get(("native", TARGET_MFU_SHAPE, "loop")),
                            med.get(("native", TARGET_MFU_SHAPE, "bare")), ctx, estimate)
    return {"medians": {" ".join(key): m for key, m in med.items()}, "training": training,
            "evaluation": evaluation, "compile": compile_summary(med, ctx),
            "failures": [failure_line(m) for m in result["measurements"] if "failed" in m],
            "comparison": comparison, "estimate": estimate, "targets": targets}


def median_of(runs: list[dict]) -> dict:
    """The median of every numeric measurement over the repeats (of those that have it); the
    largest peak memory; what is the same in every repeat (counts, batch sizes) as it is."""
    out = {}
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        known = [v for v in values if isinstance(v, (int, float))]
        if key in PEAK_KEYS:
            out[key] = max(known) if known else None
        elif all(v == value for v in values) or not known:
            out[key] = value
        else:
            out[key] = statistics.median(known)
    return out


def cell(value: float | None, fmt: str) -> str:
    """`value` formatted with `fmt`, or ``MISSING``."""
    return MISSING if value is None else fmt.format(value)


def pair(m: dict | None, first: str, second: str, fmt: str) -> str:
    """Two of `m`'s figures as "first / second", or ``MISSING``."""
    return MISSING if m is None else f"{cell(m[first], fmt)} / {cell(m[second], fmt)}"


def mfu_cell(m: dict | None, kind: str, peaks: dict) -> str:
    """The MFU of `m`'s `kind` as a percentage, or ``MISSING``."""
    return MISSING if m is None else cell(measured_mfu(m, kind, peaks), "{:.1%}")


def variant_label(name: str, ctx: dict) -> str:
    """A variant as the tables name it, with its precision."""
    label, precision = VARIANTS[name].label, ctx["precisions"][name]
    return label if precision in label else f"{label} ({precision})"


def configuration_tables(med: dict[tuple[str, str, str], dict], ctx: dict
                         ) -> tuple[list[list[str]], list[list[str]]]:
    """The training and the evaluation table (header first): a row per variant and
    configuration measured, the bare model beside train.py's loop."""
    peaks = ctx["peak_flops"]
    training = [["variant", "batch x length", "tokens per review: real / padded",
                 "bare fwd+bwd samples/s", "bare MFU", "train.py samples/s",
                 "train.py tokens/s: real / padded", "train.py MFU",
                 "train.py after 1st log window", "train.py / bare",
                 f"IMDB epoch, {FULL_TRAIN_REVIEWS:,} reviews (s, est.)",
                 "peak GB bare: allocated / reserved", "peak GB train.py: allocated / reserved"]]
    evaluation = [["variant", "batch x length", "bare forward: batch", "samples/s", "MFU",
                   "evaluate_model: batch", "samples/s", "tokens/s: real / padded", "MFU"]]
    for name in ctx["variants"]:
        configs = [ctx["compile_config"]] if VARIANTS[name].compile else ctx["configs"]
        for config in configs:
            bare, loop = med.get((name, config, "bare")), med.get((name, config, "loop"))
            if bare is None and loop is None:
                continue
            some, label = bare or loop, variant_label(name, ctx)
            training.append([
                label, config, pair(some, "train_mean_tokens", "train_mean_width", "{:.0f}"),
                cell(bare and bare["train_samples_per_s"], "{:.0f}"),
                mfu_cell(bare, "train", peaks),
                cell(loop and loop["train_samples_per_s"], "{:.0f}"),
                pair(loop, "train_tokens_per_s", "train_padded_tokens_per_s", "{:,.0f}"),
                mfu_cell(loop, "train", peaks),
                cell(loop and loop.get("train_samples_per_s_after_first_log"), "{:.0f}"),
                cell(bare and loop and loop["train_samples_per_s"] / bare["train_samples_per_s"],
                     "{:.2f}"),
                cell(loop and loop["imdb_epoch_seconds"], "{:.0f}"),
                pair(bare, "peak_gb", "peak_reserved_gb", "{:.2f}"),
                pair(loop, "peak_gb", "peak_reserved_gb", "{:.2f}")])
            evaluation.append([
                label, config, cell(bare and bare["eval_batch_size"], "{}"),
                cell(bare and bare["eval_samples_per_s"], "{:.0f}"),
                mfu_cell(bare, "eval", peaks), cell(loop and loop["eval_batch_size"], "{}"),
                cell(loop and loop["eval_samples_per_s"], "{:.0f}"),
                pair(loop, "eval_tokens_per_s", "eval_padded_tokens_per_s", "{:,.0f}"),
                mfu_cell(loop, "eval", peaks)])
    return training, evaluation


def failure_line(m: dict) -> str:
    """A failed measurement, in one line."""
    memory = "" if m.get("peak_gb") is None else f"; peak {m['peak_gb']:.2f} GB allocated"
    return f"{m['variant']} {m['config']} {m['kind']} (repeat {m['repeat']}): {m['failed']}{memory}"


# ---------------------------------------------------------------------------------------------
# --compile against native


def compile_summary(med: dict[tuple[str, str, str], dict], ctx: dict) -> dict | None:
    """train.py --compile against native at the compile configuration: the table, the time
    compiling added and the training reviews after which it pays (None where either is
    missing)."""
    config = ctx["compile_config"]
    eager, compiled = med.get(("native", config, "loop")), med.get(("compile", config, "loop"))
    if eager is None or compiled is None:
        return None
    both = (eager, compiled)
    # What compiling adds: the first epoch with its validation (the inference graph is compiled
    # there) and the first evaluation pass, against native's, which have all else alike.
    first = [m["train_wall_seconds"] + m["eval_seconds_first_pass"] for m in both]
    added = first[1] - first[0]
    logged = [m.get("train_samples_per_s_after_first_log") for m in both]
    # Without a second log window (a short epoch), the epoch's rate, compiling included.
    steady = [rate or m["train_samples_per_s"] for rate, m in zip(logged, both, strict=True)]
    saved_per_review = 1 / steady[0] - 1 / steady[1]
    pays_after = added / saved_per_review if saved_per_review > 0 and added > 0 else None

    def row(label: str, values: list[float | None], fmt: str, change: str) -> list[str]:
        return [label, *(cell(v, fmt) for v in values), change]

    def ratio(values: list[float | None]) -> str:
        return MISSING if None in values else f"{values[1] / values[0]:.2f} x"

    figures = [("training samples/s after the 1st log window", logged, "{:.0f}"),
               ("training samples/s over the epoch (its first batches and compiling "
                "included)", [m["train_samples_per_s"] for m in both], "{:.0f}"),
               ("evaluation samples/s (second pass)",
                [m["eval_samples_per_s"] for m in both], "{:.0f}"),
               (f"IMDB epoch, {FULL_TRAIN_REVIEWS:,} reviews (s, est.)",
                [m["imdb_epoch_seconds"] for m in both], "{:.0f}")]
    table = [[f"train.py at {config}", variant_label("native", ctx),
              variant_label("compile", ctx), "--compile vs native"],
             *(row(label, values, fmt, ratio(values)) for label, values, fmt in figures),
             row("first epoch with its validation, and first evaluation pass (s)", first,
                 "{:.1f}", f"{added:+.1f} s"),
             ["peak GB: allocated / reserved",
              *(pair(m, "peak_gb", "peak_reserved_gb", "{:.2f}") for m in both),
              MISSING]]
    return {"config": config, "added_seconds": added, "pays_after_reviews": pays_after,
            "table": table}


def compile_lines(summary: dict | None, ctx: dict) -> list[str]:
    """The compile variant's part of the report: its table and what compiling costs."""
    if summary is None:
        return ([] if "compile" not in ctx["variants"] else
                [f"--compile: no comparison (native or compile not measured at "
                 f"{ctx['compile_config']} in this run).", ""])
    pays = summary["pays_after_reviews"]
    verdict = (f"at the steady rates it pays for itself after about {pays:,.0f} training "
               f"reviews ({pays / FULL_TRAIN_REVIEWS:.2f} IMDB epochs)" if pays is not None
               else "it does not pay at this configuration (not faster at the steady rate, "
                    "or nothing to win back)")
    return [f"train.py --compile (model.compile(dynamic=True)) against native, once, at "
            f"{summary['config']}. Compiling added {summary['added_seconds']:.0f} s to the first "
            f"epoch and evaluation pass; {verdict}:", "", table(summary["table"]), ""]


# ---------------------------------------------------------------------------------------------
# train.py against the lab recipe


def full_job_estimate(loop: dict | None, recipe: dict | None) -> dict | None:
    """Seconds of the full-size job (``FULL_TRAIN_REVIEWS`` trained, ``FULL_TEST_REVIEWS``
    scored twice) from the measured rates alone, for train.py's loop and the recipe."""
    if loop is None or recipe is None:
        return None
    project, lab = full_job_seconds(loop), full_job_seconds(recipe)
    return {"project_seconds": project, "recipe_seconds": lab, "speedup": lab / project}


def full_job_seconds(m: dict) -> float:
    """Seconds the full-size job takes at measurement `m`'s rates."""
    return (FULL_TRAIN_REVIEWS / m["train_samples_per_s"]
            + 2 * FULL_TEST_REVIEWS / m["eval_samples_per_s"])


def comparison_rows(loop: dict | None, recipe: dict | None, estimate: dict | None,
                    peaks: dict) -> list[list[str]]:
    """train.py's loop (native) against the lab recipe, at the recipe's batch and length."""
    header = ["", "lab recipe (HF Trainer)", "train.py loop", "train.py vs recipe"]
    if loop is None or recipe is None:
        return [header]

    def rate_row(label: str, key: str) -> list[str]:
        ours, theirs = loop[key], recipe[key]
        return [label, f"{theirs:,.0f}", f"{ours:,.0f}", f"{ours / theirs:.2f} x"]

    def mfu_row(label: str, kind: str) -> list[str]:
        return [label, mfu_cell(recipe, kind, peaks), mfu_cell(loop, kind, peaks), MISSING]

    return [header,
            rate_row(f"training samples/s (batch {recipe['batch']})", "train_samples_per_s"),
            rate_row("training tokens/s, real (non-padding)", "train_tokens_per_s"),
            rate_row(f"evaluation samples/s (batch {recipe['eval_batch_size']} / "
                     f"{loop['eval_batch_size']})", "eval_samples_per_s"),
            mfu_row("training MFU", "train"), mfu_row("evaluation MFU", "eval"),
            ["peak GPU memory, allocated / reserved (GB)",
             pair(recipe, "peak_gb", "peak_reserved_gb", "{:.2f}"),
             pair(loop, "peak_gb", "peak_reserved_gb", "{:.2f}"), MISSING],
            [f"estimate: full-size job (s), {FULL_TRAIN_REVIEWS:,} trained + "
             f"2 x {FULL_TEST_REVIEWS:,} scored", f"{estimate['recipe_seconds']:.0f}",
             f"{estimate['project_seconds']:.0f}", f"{estimate['speedup']:.1f} x as fast"]]


# ---------------------------------------------------------------------------------------------
# Targets and the Markdown


def issue_targets(loop: dict | None, bare: dict | None, ctx: dict,
                  estimate: dict | None) -> list[dict]:
    """The targets of issue 16 (native's figures) with the measured value and whether each is
    met (None: could not be decided in this run)."""
    return [mfu_target(loop, bare, ctx), job_target(estimate)]


def mfu_target(loop: dict | None, bare: dict | None, ctx: dict) -> dict:
    """Training at ``TARGET_MFU`` or more (bf16, ``TARGET_MFU_SHAPE``)."""
    goal = (f"training step >= {TARGET_MFU:.0%} MFU (bf16, batch "
            f"{TARGET_MFU_SHAPE.replace('x', ' x ')})")
    peaks = ctx["peak_flops"]
    if loop is None:
        return target(goal, "not measured in this run", None)
    if peaks.get(loop["precision"]) is None:
        return target(goal, f"no peak FLOP/s known for {ctx['device_name']} at "
                            f"{loop['precision']}", None)
    ours = measured_mfu(loop, "train", peaks)
    measured = f"{ours:.1%} (train.py loop, {loop['precision']})"
    if bare is not None:
        measured += f"; bare model {measured_mfu(bare, 'train', peaks):.1%}"
    return target(goal, measured, loop["precision"] == "bf16" and ours >= TARGET_MFU)


def job_target(estimate: dict | None) -> dict:
    """The full-size job ``TARGET_JOB_SPEEDUP`` times as fast as the lab recipe's, or more."""
    goal = f"full-size job >= {TARGET_JOB_SPEEDUP:.0f} x faster than the lab recipe (estimate)"
    if estimate is None:
        return target(goal, "not measured in this run", None)
    return target(goal, f"{estimate['speedup']:.1f} x ({estimate['project_seconds']:.0f} "
                        f"s vs {estimate['recipe_seconds']:.0f} s)",
                  estimate["speedup"] >= TARGET_JOB_SPEEDUP)


def report_markdown(result: dict) -> str:
    """The generated part of BENCHMARKS.md for the gpu benchmark."""
    ctx, summary = result["context"], result["summary"]
    versions = ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    failures = ([f"Failed: {'; '.join(summary['failures'])}.", ""] if summary["failures"]
                else [])
    lines = [*setup_lines(ctx, done=len(result["measurements"])),
             "", "Training:", "", table(summary["training"]),
             "", "Evaluation:", "", table(summary["evaluation"]), "", *failures,
             *compile_lines(summary["compile"], ctx),
             *recipe_lines(result.get("recipe"), summary["comparison"]),
             "", targets_table(summary["targets"]),
             "", f"{versions}. Measured {ctx['date']} in {ctx['minutes']:.1f} min.",
             "", "```bash", ctx["command"], "```"]
    return "\n".join(lines)


def table(rows: list[list[str]]) -> str:
    """One of the summary's tables (its first row the header) in Markdown."""
    return markdown_table(rows[0], rows[1:])


def setup_lines(ctx: dict, done: int) -> list[str]:
    """What ran, on what, and how often; whether the run is partial (`done` measurements)."""
    counts = ctx["counts"]
    peaks = ", ".join(f"{precision} {cell(peak and peak / 1e12, '{:.1f}')}"
                      for precision, peak in ctx["peak_flops"].items())
    return [
        f"{ctx['device_name']}; {'tiny model' if ctx['tiny'] else 'random-weight bert-base'}, "
        f"LoRA r=8 on query and value; random token ids of IMDB-like lengths (log-normal, "
        f"median {IMDB_MEDIAN_TOKENS}, clipped to [{MIN_REVIEW_TOKENS}, max length]). "
        f"Variants: {', '.join(variant_label(name, ctx) for name in ctx['variants'])}"
        f"{''.join(f'; {note}' for note in ctx['notes'])}. Medians of {counts['repeats']} "
        f"round(s); peak TFLOP/s for MFU (dense, NVIDIA datasheet): {peaks}; model FLOPs = 2 x "
        "forward per trained sequence, forward per scored one (benchmarks/gpu_benchmark.py).",
        *t4_lines(ctx),
        f"Bare model: {counts['warmup_batches']} untimed then {counts['bare_batches']} timed "
        f"batches per kind. train.py: one epoch of {counts['loop_batches']} batches timed by its "
        f"Trainer (which includes the epoch's first batches), evaluate_model over "
        f"{counts['eval_samples']:,} rows at batch {ctx['eval_batch_size']} with "
        f"{ctx['num_workers']} loader worker(s) (train.py's defaults here). tokens/s: real = "
        f"the reviews' non-padding tokens, padded = the width the model computes (MFU's). IMDB "
        f"epoch: {FULL_TRAIN_REVIEWS:,} training reviews at the row's batch and max length, "
        "train.py's measured epoch continued at its rate after the first log window.",
        "" if done == ctx["planned"]
        else f"**Partial: {done} of {ctx['planned']} measurements.**"]


def t4_lines(ctx: dict) -> list[str]:
    """What the T4-like variant is, and is not, where it ran."""
    if "t4" not in ctx["variants"]:
        return []
    limits = ctx["t4_limits"] or {}
    share = (f", {limits['memory_fraction']:.1%} of this GPU" if "memory_fraction" in limits
             else "")
    t4_peak = peak_flops(T4_NAME, "fp16")
    return [f"T4-like: this {ctx['device_name']} under a Colab T4's limits, not a T4: fp16 "
            "with the GradScaler, flash and cuDNN attention off (memory-efficient SDPA, as on "
            f"a T4), TF32 off, memory capped at {T4_MEMORY_BYTES / 2**30:.0f} GiB{share}. It "
            "shows what fits in a T4's memory and which kernels run, at this GPU's speed: a "
            f"T4's fp16 peak is {t4_peak / 1e12:.0f} TFLOP/s, so expect it many times slower. "
            "Its MFU is against this GPU's fp16 peak."]


def recipe_lines(recipe: dict | None, comparison: list[list[str]]) -> list[str]:
    """The lab recipe's part: the comparison table, or why there is none."""
    if recipe is None:
        return ["The lab recipe was not measured."]
    if "skipped" in recipe:
        return [f"The lab recipe was skipped: {recipe['skipped']}."]
    if len(comparison) == 1:
        return [f"train.py was not measured at the recipe's {recipe['batch']}x"
                f"{recipe['length']}: no comparison."]
    return [f"Against the lab recipe (HF Trainer, padding to {recipe['length']}, "
            f"{recipe['train_samples']:,} training and {recipe['eval_samples']:,} "
            f"scored rows), native, at batch {recipe['batch']} x length {recipe['length']}. "
            "The full-size job is an estimate from the measured rates alone, without "
            "tokenization and model loading:", "", table(comparison)]
