"""The GPU benchmark's report (see ``gpu_benchmark.py``): the GPUs' peaks and MFU, the medians
over the repeats, the tables, the full-size job's estimate and the targets of issue 16.
"""

from __future__ import annotations

import re
import statistics

from benchmarks.common import target, targets_table
from benchmarks.gpu_workload import IMDB_MEDIAN_TOKENS, MIN_REVIEW_TOKENS
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


def measured_mfu(m: dict, kind: str, peak: float | None) -> float | None:
    """The MFU of measurement `m`'s training or evaluation (`kind`: train or eval)."""
    return mfu(m[f"{kind}_samples_per_s"], m[f"{kind}_flops_per_sample"], peak)


def progress_line(m: dict, peak: float | None) -> str:
    """One measurement as a line of progress."""
    rates = []
    for kind in ("train", "eval"):
        share = measured_mfu(m, kind, peak)
        rates.append(f"{kind} {m[f'{kind}_samples_per_s']:.1f} samples/s"
                     + ("" if share is None else f" ({share:.1%} MFU)"))
    memory = "" if m.get("peak_gb") is None else f", peak {m['peak_gb']:.2f} GB"
    return f"repeat {m['repeat']} {m['config']} {m['kind']}: {', '.join(rates)}{memory}"


# ---------------------------------------------------------------------------------------------
# Medians and tables


def summarize(result: dict) -> dict:
    """Medians per configuration and kind, the tables, the estimate and the targets, from the
    measurements made so far (a partial run gives partial tables)."""
    ctx = result["context"]
    peak = ctx["peak_flops"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in result["measurements"]:
        groups.setdefault((m["config"], m["kind"]), []).append(m)
    med = {key: median_of(runs) for key, runs in groups.items()}
    training, evaluation = configuration_tables(med, ctx["configs"], peak)
    recipe = result.get("recipe")
    recipe_shape = (f"{recipe['batch']}x{recipe['length']}"
                    if recipe and "train_samples_per_s" in recipe else None)
    loop = med.get((recipe_shape, "loop"))
    estimate = full_job_estimate(loop, recipe if recipe_shape else None)
    comparison = comparison_rows(loop, recipe if recipe_shape else None, estimate, peak)
    targets = issue_targets(med.get((TARGET_MFU_SHAPE, "loop")),
                            med.get((TARGET_MFU_SHAPE, "bare")), ctx, estimate)
    return {"medians": {f"{c} {k}": m for (c, k), m in med.items()}, "training": training,
            "evaluation": evaluation, "comparison": comparison, "estimate": estimate,
            "targets": targets}


def median_of(runs: list[dict]) -> dict:
    """The median of every numeric measurement over the repeats (of those that have it); the
    largest peak memory; what is the same in every repeat (counts, batch sizes) as it is."""
    out = {}
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        known = [v for v in values if isinstance(v, (int, float))]
        if key == "peak_gb":
            out[key] = max(known) if known else None
        elif all(v == value for v in values) or not known:
            out[key] = value
        else:
            out[key] = statistics.median(known)
    return out


def cell(value: float | None, fmt: str) -> str:
    """`value` formatted with `fmt`, or ``MISSING``."""
    return MISSING if value is None else fmt.format(value)


def mfu_cell(m: dict | None, kind: str, peak: float | None) -> str:
    """The MFU of `m`'s `kind` as a percentage, or ``MISSING``."""
    return MISSING if m is None else cell(measured_mfu(m, kind, peak), "{:.1%}")


def configuration_tables(med: dict[tuple[str, str], dict], configs: list[str],
                         peak: float | None) -> tuple[list[list[str]], list[list[str]]]:
    """The training and the evaluation table (header first): a row per configuration measured,
    the bare model beside train.py's loop."""
    training = [["batch x length", "mean padded width", "bare fwd+bwd samples/s", "bare MFU",
                 "train.py samples/s", "train.py MFU", "train.py after 1st log window",
                 "train.py / bare", "peak memory bare / train.py (GB)"]]
    evaluation = [["batch x length", "bare forward: batch", "samples/s", "MFU",
                   "evaluate_model: batch", "samples/s", "MFU"]]
    for name in configs:
        bare, loop = med.get((name, "bare")), med.get((name, "loop"))
        if bare is None and loop is None:
            continue
        some = bare or loop
        training.append([
            name, f"{some['train_mean_width']:.0f}",
            cell(bare and bare["train_samples_per_s"], "{:.0f}"), mfu_cell(bare, "train", peak),
            cell(loop and loop["train_samples_per_s"], "{:.0f}"), mfu_cell(loop, "train", peak),
            cell(loop and loop.get("train_samples_per_s_after_first_log"), "{:.0f}"),
            cell(bare and loop and loop["train_samples_per_s"] / bare["train_samples_per_s"],
                 "{:.2f}"),
            f"{cell(bare and bare['peak_gb'], '{:.2f}')} / "
            f"{cell(loop and loop['peak_gb'], '{:.2f}')}"])
        evaluation.append([
            name, cell(bare and bare["eval_batch_size"], "{}"),
            cell(bare and bare["eval_samples_per_s"], "{:.0f}"), mfu_cell(bare, "eval", peak),
            cell(loop and loop["eval_batch_size"], "{}"),
            cell(loop and loop["eval_samples_per_s"], "{:.0f}"), mfu_cell(loop, "eval", peak)])
    return training, evaluation


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
                    peak: float | None) -> list[list[str]]:
    """train.py's loop against the lab recipe, at the recipe's batch and length."""
    header = ["", "lab recipe (HF Trainer)", "train.py loop", "train.py vs recipe"]
    if loop is None or recipe is None:
        return [header]

    def rate_row(label: str, kind: str) -> list[str]:
        ours, theirs = loop[f"{kind}_samples_per_s"], recipe[f"{kind}_samples_per_s"]
        return [label, f"{theirs:.0f}", f"{ours:.0f}", f"{ours / theirs:.2f} x"]

    def mfu_row(label: str, kind: str) -> list[str]:
        return [label, mfu_cell(recipe, kind, peak), mfu_cell(loop, kind, peak), MISSING]

    return [header,
            rate_row(f"training samples/s (batch {recipe['batch']})", "train"),
            rate_row(f"evaluation samples/s (batch {recipe['eval_batch_size']} / "
                     f"{loop['eval_batch_size']})", "eval"),
            mfu_row("training MFU", "train"), mfu_row("evaluation MFU", "eval"),
            ["peak GPU memory (GB)", cell(recipe.get("peak_gb"), "{:.2f}"),
             cell(loop.get("peak_gb"), "{:.2f}"), MISSING],
            [f"estimate: full-size job (s), {FULL_TRAIN_REVIEWS:,} trained + "
             f"2 x {FULL_TEST_REVIEWS:,} scored", f"{estimate['recipe_seconds']:.0f}",
             f"{estimate['project_seconds']:.0f}", f"{estimate['speedup']:.1f} x as fast"]]


# ---------------------------------------------------------------------------------------------
# Targets and the Markdown


def issue_targets(loop: dict | None, bare: dict | None, ctx: dict,
                  estimate: dict | None) -> list[dict]:
    """The targets of issue 16 with the measured value and whether each is met (None: could
    not be decided in this run)."""
    return [mfu_target(loop, bare, ctx), job_target(estimate)]


def mfu_target(loop: dict | None, bare: dict | None, ctx: dict) -> dict:
    """Training at ``TARGET_MFU`` or more (bf16, ``TARGET_MFU_SHAPE``)."""
    goal = (f"training step >= {TARGET_MFU:.0%} MFU (bf16, batch "
            f"{TARGET_MFU_SHAPE.replace('x', ' x ')})")
    peak = ctx["peak_flops"]
    if loop is None:
        return target(goal, "not measured in this run", None)
    if peak is None:
        return target(goal, f"no peak FLOP/s known for {ctx['device_name']} at "
                            f"{ctx['precision']}", None)
    ours = measured_mfu(loop, "train", peak)
    measured = f"{ours:.1%} (train.py loop, {ctx['precision']})"
    if bare is not None:
        measured += f"; bare model {measured_mfu(bare, 'train', peak):.1%}"
    return target(goal, measured, ctx["precision"] == "bf16" and ours >= TARGET_MFU)


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
    lines = [*setup_lines(ctx, done=len(result["measurements"])),
             "", "Training:", "", table(summary["training"]),
             "", "Evaluation:", "", table(summary["evaluation"]), "",
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
    planned = 2 * len(ctx["configs"]) * counts["repeats"]
    peak = ctx["peak_flops"]
    return [
        f"{ctx['device_name']}, {ctx['precision']}; "
        f"{'tiny model' if ctx['tiny'] else 'random-weight bert-base'}, LoRA r=8 on query and "
        f"value; random token ids of IMDB-like lengths (log-normal, median "
        f"{IMDB_MEDIAN_TOKENS}, clipped to [{MIN_REVIEW_TOKENS}, max length]). Medians of "
        f"{counts['repeats']} repeat(s); peak {MISSING if peak is None else f'{peak / 1e12:.1f}'} "
        f"TFLOP/s for MFU (dense, NVIDIA datasheet); model FLOPs = 2 x forward per trained "
        f"sequence, forward per scored one (benchmarks/gpu_benchmark.py).",
        f"Bare model: {counts['warmup_batches']} untimed then {counts['bare_batches']} timed "
        f"batches per kind. train.py: one epoch of {counts['loop_batches']} batches timed by its "
        f"Trainer (which includes the epoch's first batches), evaluate_model over "
        f"{counts['eval_samples']:,} rows at batch {ctx['eval_batch_size']} with "
        f"{ctx['num_workers']} loader worker(s) (train.py's defaults here).",
        "" if done == planned else f"**Partial: {done} of {planned} measurements.**"]


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
            f"scored rows), at batch {recipe['batch']} x length {recipe['length']}. The "
            "full-size job is an estimate from the measured rates alone, without "
            "tokenization and model loading:", "", table(comparison)]
