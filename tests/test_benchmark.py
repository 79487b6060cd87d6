"""The benchmark scripts cannot rot: the quick CPU benchmark and the GPU benchmark on the CPU."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
from types import SimpleNamespace

import pytest
import torch
from conftest import minilm_path, reviews, run_main

from benchmarks import gpu_benchmark
from benchmarks.benchmark import build_parser, main
from benchmarks.common import CPU_ROWS, write_section
from benchmarks.cpu_comparison import TARGET_CACHED_TOKENIZE_SECONDS
from benchmarks.gpu_benchmark import gpu_command, parse_configs, parse_variants, resolve_variants
from benchmarks.gpu_measure import rates
from benchmarks.gpu_report import (
    FULL_TEST_REVIEWS,
    FULL_TRAIN_REVIEWS,
    epoch_seconds,
    median_of,
    peak_flops,
)
from benchmarks.gpu_workload import (
    VARIANTS,
    Shape,
    Workload,
    forward_flops_per_sequence,
    model_config,
    review_lengths,
    t4_limits,
)
from benchmarks.lab_recipe import RECIPE_CHANGES
from benchmarks.lengths import lengths_command
from benchmarks.levers import levers_command
from machinery.report import markdown_table
from machinery.runtime import pick_precision


@pytest.fixture
def tiny_model_with_vocab(tiny_model_dir, tmp_path):
    """The tiny BERT plus vocab.txt, which the slow tokenizer of the lab recipe reads."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(f"{minilm_path()}/vocab.txt", folder)
    return folder


def test_quick_cpu_benchmark_writes_the_table_with_every_row_and_ratio(tiny_model_with_vocab,
                                                                      tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    reviews(20).to_csv(data / "train.csv", index=False)  # 40: 32 to train on, 4 to validate
    reviews(8).to_csv(data / "test.csv", index=False)
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nHand-written text stays.\n")
    work = tmp_path / "work"
    # The command here; it runs each variant as a process of its own, as it measures them.
    result = run_main(main, capsys, "cpu", "--quick", "--model", str(tiny_model_with_vocab),
                      "--data", str(data), "--work-dir", str(work), "--markdown", str(markdown))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert {name: len(runs) for name, runs in results["runs"].items()} == \
        {"recipe": 1, "project": 1, "bare": 1}
    table = results["table"]
    assert table[0] == ["", "lab recipe", "train.py", "bare model", "train.py / recipe",
                        "train.py / bare"]
    assert [row[0] for row in table[1:len(CPU_ROWS) + 1]] == [label for label, _, _ in CPU_ROWS]
    med = results["medians"]
    for name in ("recipe", "project", "bare"):
        assert med[name]["train_samples_per_s"] > 0
        assert med[name]["eval_samples_per_s"] > 0
        assert med[name]["peak_rss_mb"] > 100  # a Python process with torch loaded
    for name in ("recipe", "project"):
        assert med[name]["wall_seconds"] > med[name]["tokenize_seconds"] > 0
    # The project's numbers are its train.py run's own (one repeat: the median is that run).
    metrics = json.loads((work / "1-project" / "run" / "metrics.json").read_text())
    assert med["project"]["accuracy"] == metrics["after"]["accuracy"]
    assert med["project"]["train_samples_per_s"] == metrics["train_samples_per_s"]
    recipe = json.loads((work / "1-recipe" / "recipe.json").read_text())
    assert med["recipe"]["accuracy"] == recipe["accuracy"]
    rows = {row[0]: row for row in table}
    train = rows["train samples/s"]
    assert float(train[4]) == pytest.approx(
        med["project"]["train_samples_per_s"] / med["recipe"]["train_samples_per_s"], abs=0.006)
    assert float(train[5]) == pytest.approx(
        med["project"]["train_samples_per_s"] / med["bare"]["train_samples_per_s"], abs=0.006)
    assert rows["end-to-end wall time (s)"][3] == "—"  # the bare model has no end-to-end run
    cache = results["tokenize_cache"]
    assert cache["reviews"] == 32 and cache["cold_seconds"] > 0 and cache["cached_seconds"] > 0
    targets = results["targets"]
    assert len(targets) == 6
    # Each target is marked met exactly when its measured numbers meet it.
    assert targets[4]["met"] == (cache["cached_seconds"] < TARGET_CACHED_TOKENIZE_SECONDS)
    assert targets[4]["measured"] == f"{cache['cached_seconds']:.2f} s"
    assert targets[5]["met"] == (med["project"]["peak_rss_mb"] <= med["recipe"]["peak_rss_mb"])
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written text stays.\n")
    assert text.count("<!-- benchmark:cpu start -->") == text.count("<!-- benchmark:cpu end -->") \
        == 1
    assert markdown_table(table[0], table[1:]) in text
    assert all(change in text for change in RECIPE_CHANGES)
    assert "python -m benchmarks.benchmark cpu --quick" in text


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("intro\n")
    write_section(path, "cpu", "first")
    write_section(path, "gpu", "gpu text")
    write_section(path, "cpu", "second")
    assert path.read_text() == ("intro\n<!-- benchmark:cpu start -->\nsecond\n"
                                "<!-- benchmark:cpu end -->\n<!-- benchmark:gpu start -->\n"
                                "gpu text\n<!-- benchmark:gpu end -->\n")


def test_bert_base_forward_flops_follow_the_stated_formula():
    config = model_config(tiny=False)
    # 12 layers x (4 x 768^2 + 2 x 768 x 3072) + the 768^2 pooler = 85.56M weights.
    weights = 12 * (4 * 768**2 + 2 * 768 * 3072) + 768**2
    assert weights == 85_524_480
    flops = forward_flops_per_sequence(config, 128)
    assert flops == 2 * weights * 128 + 4 * 12 * 128**2 * 768
    assert flops / 1e9 == pytest.approx(22.5, abs=0.1)


def gpu_args(tmp_path, *extra: str) -> argparse.Namespace:
    """The gpu subcommand's flags for a smoke test on the CPU: tiny model, --quick counts."""
    return build_parser().parse_args(
        ["gpu", "--device", "cpu", "--tiny", "--quick", "--markdown", str(tmp_path / "B.md"),
         "--json", str(tmp_path / "gpu.json"), *extra])


def percent(cell: str) -> float:
    """A table cell such as "12.3%" as a fraction."""
    return float(cell.rstrip("%")) / 100


def eager_compile(patch: pytest.MonkeyPatch) -> list[dict]:
    """Make ``Module.compile`` trace with dynamo on its eager backend: train.py's --compile
    path, without the minutes inductor spends compiling C++ on a CPU. Returns the arguments
    of each call, as train.py made it."""
    calls: list[dict] = []
    original = torch.nn.Module.compile

    def compile_eagerly(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, backend="eager", **kwargs)

    patch.setattr(torch.nn.Module, "compile", compile_eagerly)
    return calls


FAKE_PEAK = 1e9  # no peak is known for a CPU: a fake one makes every MFU cell checkable


@pytest.fixture(scope="module")
def quick_gpu_run(tmp_path_factory):
    """One run of the gpu benchmark with its default variants on the CPU (native and compile;
    fp16 and t4 left out), shared by the tests that read it: (result, folder, the compile
    calls, what it printed)."""
    folder = tmp_path_factory.mktemp("gpu")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.setattr(gpu_benchmark, "peak_flops", lambda name, precision: FAKE_PEAK)
        calls = eager_compile(patch)
        result = gpu_command(gpu_args(folder))
    return result, folder, calls, out.getvalue()


def test_gpu_benchmark_runs_on_the_cpu_with_a_tiny_model(quick_gpu_run):
    result, folder, _, printed = quick_gpu_run
    assert json.loads((folder / "gpu.json").read_text()) == json.loads(json.dumps(result))
    ctx = result["context"]
    # --precision auto on this CPU: bf16 where the suite's switch is on (conftest).
    precision = pick_precision("auto", torch.device("cpu"))
    assert ctx["configs"] == ["16x128", "64x128"] and ctx["peak_flops"] == {precision: FAKE_PEAK}
    assert ctx["precision"] == precision
    # The CUDA-only variants are left out on a CPU, with one line saying so.
    assert ctx["variants"] == ["native", "compile"]
    assert ctx["precisions"] == {"native": precision, "compile": precision}
    assert ctx["notes"] == ["fp16 and t4 left out: they need a CUDA GPU"]
    assert "fp16 and t4 left out: they need a CUDA GPU" in printed.splitlines()
    measured = {(m["variant"], m["config"], m["kind"]): m for m in result["measurements"]}
    assert list(measured) == [("native", "16x128", "bare"), ("native", "16x128", "loop"),
                              ("native", "64x128", "bare"), ("native", "64x128", "loop"),
                              ("compile", "16x128", "loop")]
    config = model_config(tiny=True)
    full_width = forward_flops_per_sequence(config, 128)
    for (_, name, kind), m in measured.items():
        batch = int(name.split("x")[0])
        assert m["train_samples_per_s"] > 0 and m["eval_samples_per_s"] > 0
        assert m["precision"] == precision and m["peak_gb"] is m["peak_reserved_gb"] is None
        # --quick: 2 timed bare batches; 3 loop batches (one epoch) and 8 scored rows.
        assert m["train_samples"] == (2 if kind == "bare" else 3) * batch
        assert m["eval_samples"] == (2 * batch if kind == "bare" else 8)
        assert m["eval_batch_size"] == (batch if kind == "bare" else ctx["eval_batch_size"])
        # 82% of the drawn lengths fill 128 tokens, so every batch here is 128 wide: the model
        # FLOPs per sample are those of a full-width sequence, twice over for training.
        assert m["train_mean_width"] == m["eval_mean_width"] == 128
        assert m["train_flops_per_sample"] == pytest.approx(2 * full_width)
        assert m["eval_flops_per_sample"] == pytest.approx(full_width)
    loop = measured[("native", "16x128", "loop")]
    assert loop["train_samples_per_s"] == pytest.approx(48 / loop["train_seconds"])
    assert loop["eval_samples_per_s"] == pytest.approx(8 / loop["eval_seconds"])
    summary = result["summary"]
    training = {(row[0], row[1]): row for row in summary["training"][1:]}
    evaluation = {(row[0], row[1]): row for row in summary["evaluation"][1:]}
    assert list(training) == [(f"native ({precision})", "16x128"),
                              (f"native ({precision})", "64x128"),
                              (f"--compile ({precision})", "16x128")]
    for name in ("16x128", "64x128"):
        key = (f"native ({precision})", name)
        bare, loop = measured[("native", name, "bare")], measured[("native", name, "loop")]
        for cell, m, kind in ((training[key][4], bare, "train"),
                              (training[key][7], loop, "train"),
                              (evaluation[key][4], bare, "eval"),
                              (evaluation[key][8], loop, "eval")):
            expected = m[f"{kind}_samples_per_s"] * m[f"{kind}_flops_per_sample"] / FAKE_PEAK
            assert percent(cell) == pytest.approx(expected, abs=0.0005)
        assert float(training[key][9]) == pytest.approx(
            loop["train_samples_per_s"] / bare["train_samples_per_s"], abs=0.006)
    # The recipe ran once, at its own batch and length (lab_recipe.py's: 16 x 128).
    recipe = result["recipe"]
    assert (recipe["batch"], recipe["length"], recipe["train_samples"]) == (16, 128, 2 * 16)
    assert recipe["train_samples_per_s"] > 0 and recipe["eval_samples_per_s"] > 0
    loop = measured[("native", "16x128", "loop")]
    estimate = summary["estimate"]
    assert estimate["project_seconds"] == pytest.approx(
        FULL_TRAIN_REVIEWS / loop["train_samples_per_s"]
        + 2 * FULL_TEST_REVIEWS / loop["eval_samples_per_s"])
    assert estimate["recipe_seconds"] == pytest.approx(
        FULL_TRAIN_REVIEWS / recipe["train_samples_per_s"]
        + 2 * FULL_TEST_REVIEWS / recipe["eval_samples_per_s"])
    comparison = {row[0].split(" (")[0].split(":")[0].split(",")[0]: row
                  for row in summary["comparison"][1:]}
    assert float(comparison["training samples/s"][3].split()[0]) == pytest.approx(
        loop["train_samples_per_s"] / recipe["train_samples_per_s"], abs=0.006)
    assert float(comparison["evaluation samples/s"][3].split()[0]) == pytest.approx(
        loop["eval_samples_per_s"] / recipe["eval_samples_per_s"], abs=0.006)
    assert comparison["estimate"][3] == \
        f"{estimate['recipe_seconds'] / estimate['project_seconds']:.1f} x as fast"
    # Each target is met exactly when its measured numbers meet it.
    mfu_target, job_target = summary["targets"]
    target_loop = measured[("native", "64x128", "loop")]
    achieved = target_loop["train_samples_per_s"] * target_loop["train_flops_per_sample"] / 1e9
    assert mfu_target["measured"].startswith(f"{achieved:.1%} (train.py loop")
    assert mfu_target["met"] == (precision == "bf16" and achieved >= 0.40)
    assert job_target["met"] == (estimate["speedup"] >= 10)
    text = (folder / "B.md").read_text()
    assert text.count("<!-- benchmark:gpu start -->") == text.count("<!-- benchmark:gpu end -->")\
        == 1
    for name in ("training", "evaluation", "comparison"):
        assert markdown_table(summary[name][0], summary[name][1:]) in text
    assert "Partial" not in text and "CPU; tiny model" in text
    assert "fp16 and t4 left out: they need a CUDA GPU" in text and "T4-like" not in text


def test_gpu_benchmark_reports_tokens_per_second_and_the_imdb_epoch(quick_gpu_run):
    result = quick_gpu_run[0]
    measured = {(m["variant"], m["config"], m["kind"]): m for m in result["measurements"]}
    for m in [*measured.values(), result["recipe"]]:
        for kind in ("train", "eval"):
            rate = m[f"{kind}_samples_per_s"]
            # Real tokens: the reviews' own; padded: the width the model computes.
            assert m[f"{kind}_tokens_per_s"] == pytest.approx(rate * m[f"{kind}_mean_tokens"])
            assert m[f"{kind}_padded_tokens_per_s"] == pytest.approx(
                rate * m[f"{kind}_mean_width"])
            assert 32 <= m[f"{kind}_mean_tokens"] < m[f"{kind}_mean_width"]
    # The real tokens are those of the rows measured: the seeded synthetic lengths.
    for batch in (16, 64):
        bare, loop = (measured[("native", f"{batch}x128", kind)] for kind in ("bare", "loop"))
        # The bare model's first batch is its untimed warm-up (--quick: 1).
        timed = review_lengths(3 * batch, 128, seed=3)[batch:]
        assert bare["train_mean_tokens"] == bare["eval_mean_tokens"] == \
            pytest.approx(statistics.mean(timed))
        assert loop["train_mean_tokens"] == pytest.approx(
            statistics.mean(review_lengths(3 * batch, 128, seed=0)))
        assert loop["eval_mean_tokens"] == pytest.approx(
            statistics.mean(review_lengths(8, 128, seed=1)))
        # 3 batches log no second window: the epoch's own rate carries it to 25,000 reviews.
        assert loop["train_samples_per_s_after_first_log"] is None
        assert loop["imdb_epoch_seconds"] == pytest.approx(
            FULL_TRAIN_REVIEWS / loop["train_samples_per_s"])
        assert bare["imdb_epoch_seconds"] == pytest.approx(
            FULL_TRAIN_REVIEWS / bare["train_samples_per_s"])
    row = next(row for row in result["summary"]["training"] if row[1] == "64x128")
    loop = measured[("native", "64x128", "loop")]
    assert row[6] == (f"{loop['train_tokens_per_s']:,.0f} / "
                      f"{loop['train_padded_tokens_per_s']:,.0f}")
    assert row[10] == f"{loop['imdb_epoch_seconds']:.0f}" and row[12] == "— / —"


def test_the_imdb_epoch_continues_train_pys_epoch_at_its_steady_rate():
    loop = {"train_seconds": 30.0, "train_samples": 1600, "train_samples_per_s": 1600 / 30,
            "train_samples_per_s_after_first_log": 100.0}
    # The measured epoch (its first batches, and compiling, once) plus the rest at 100/s.
    assert epoch_seconds(loop) == 30.0 + (FULL_TRAIN_REVIEWS - 1600) / 100.0
    assert epoch_seconds({"train_samples_per_s": 50.0}) == FULL_TRAIN_REVIEWS / 50.0


def test_gpu_benchmark_compares_compile_with_native(quick_gpu_run):
    result, folder, calls, _ = quick_gpu_run
    assert calls == [{"dynamic": True}]  # train.py --compile, once
    measured = {(m["variant"], m["config"], m["kind"]): m for m in result["measurements"]}
    native, compiled = (measured[(name, "16x128", "loop")] for name in ("native", "compile"))
    assert compiled["train_samples"] == native["train_samples"] == 48
    summary = result["summary"]["compile"]
    first = [m["train_wall_seconds"] + m["eval_seconds_first_pass"] for m in (native, compiled)]
    assert summary["config"] == "16x128"
    assert summary["added_seconds"] == pytest.approx(first[1] - first[0])
    rows = {row[0]: row for row in summary["table"][1:]}
    assert rows["training samples/s after the 1st log window"][1:] == ["—", "—", "—"]
    assert rows["evaluation samples/s (second pass)"][3] == \
        f"{compiled['eval_samples_per_s'] / native['eval_samples_per_s']:.2f} x"
    # Faster at the steady rate: it pays after added seconds / seconds saved per review.
    rates = [m["train_samples_per_s"] for m in (native, compiled)]
    saved = 1 / rates[0] - 1 / rates[1]
    assert summary["pays_after_reviews"] == (
        pytest.approx(summary["added_seconds"] / saved)
        if saved > 0 and summary["added_seconds"] > 0 else None)
    text = (folder / "B.md").read_text()
    assert markdown_table(summary["table"][0], summary["table"][1:]) in text
    assert "train.py --compile (model.compile(dynamic=True)) against native" in text


def fake_figures(shape, loop: bool) -> dict:
    """What a measurement returns, for tests that fake the measuring: 10 batches at 2 per
    second, rows of 100 real tokens padded to the max length."""
    work = Workload(1e9 * shape.batch * 10, shape.batch * 10, shape.batch * 10 * shape.length,
                    shape.batch * 10 * 100)
    figures = {**rates("train", work, 5.0, 2), **rates("eval", work, 1.0, 1),
               "eval_batch_size": shape.batch}
    if loop:
        figures.update(train_seconds=5.0, train_samples_per_s_after_first_log=None,
                       train_wall_seconds=6.0, eval_seconds_first_pass=1.5, eval_seconds=1.0)
    return figures


def test_every_variant_runs_in_rounds_under_its_own_settings(tmp_path, monkeypatch):
    # This CPU stands in for a GPU: every variant is chosen, the measurements are faked, and
    # the T4-like preset is a recorder. What is checked is the order, each measurement's
    # precision and settings, and that a measurement out of memory is kept and passed over.
    monkeypatch.setattr(gpu_benchmark, "resolve_variants",
                        lambda asked, device, precision: (list(VARIANTS.values()), []))
    events: list = []

    @contextlib.contextmanager
    def limits(device):
        events.append("limits on")
        try:
            yield {"memory_fraction": 0.1}
        finally:
            events.append("limits off")

    def bare(config, device, precision, shape, rows, warmup):
        events.append(("bare", precision, shape.name))
        return fake_figures(shape, loop=False)

    def loop(config, device, precision, shape, data, settings, compiled=False):
        events.append(("loop", precision, shape.name, compiled))
        if events[-2] == "limits on" and shape.batch == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fake_figures(shape, loop=True)

    def recipe(config, device, precision, settings, counts):
        events.append(("recipe", precision))
        return {**fake_figures(Shape(16, 128), loop=False), "batch": 16, "length": 128}

    for name, fake in (("t4_limits", limits), ("measure_bare", bare), ("measure_loop", loop),
                       ("measure_recipe", recipe)):
        monkeypatch.setattr(gpu_benchmark, name, fake)
    result = gpu_command(gpu_args(tmp_path, "--repeats", "2"))
    native = pick_precision("auto", torch.device("cpu"))
    rounds = []
    for repeat, variants in ((1, ["native", "fp16", "t4", "compile"]),
                             (2, ["native", "fp16", "t4"])):  # compile in the first round only
        for variant in variants:
            configs = ["16x128"] if variant == "compile" else ["16x128", "64x128"]
            kinds = ["loop"] if variant == "compile" else ["bare", "loop"]
            rounds += [(repeat, variant, config, kind) for config in configs for kind in kinds]
    assert [(m["repeat"], m["variant"], m["config"], m["kind"])
            for m in result["measurements"]] == rounds
    assert result["context"]["planned"] == len(rounds) == 25
    # The preset wraps each t4 measurement, and nothing else; fp16 and t4 compute in fp16.
    t4 = [("bare", "fp16", "16x128"), ("loop", "fp16", "16x128", False),
          ("bare", "fp16", "64x128"), ("loop", "fp16", "64x128", False)]
    # The recipe once, after native's first configuration, at native's precision.
    assert events[:5] == [("bare", native, "16x128"), ("loop", native, "16x128", False),
                          ("recipe", native), ("bare", native, "64x128"),
                          ("loop", native, "64x128", False)]
    inside = [events[i + 1] for i, event in enumerate(events) if event == "limits on"]
    assert inside == t4 * 2
    assert all(events[i + 2] == "limits off" for i, e in enumerate(events) if e == "limits on")
    assert [e for e in events if e not in ("limits on", "limits off")].count(
        ("loop", native, "16x128", True)) == 1  # compile: once, at native's precision
    assert {m["precision"] for m in result["measurements"] if m["variant"] in ("fp16", "t4")} \
        == {"fp16"}
    failed = [m for m in result["measurements"] if "failed" in m]
    assert [(m["repeat"], m["variant"], m["config"], m["kind"]) for m in failed] == \
        [(1, "t4", "64x128", "loop"), (2, "t4", "64x128", "loop")]
    assert failed[0]["failed"].startswith("out of memory (CUDA out of memory. Tried to")
    summary = result["summary"]
    assert summary["failures"][0].startswith("t4 64x128 loop (repeat 1): out of memory")
    row = next(row for row in summary["training"] if row[:2] == ["T4-like (fp16)", "64x128"])
    assert row[3] != "—" and row[5] == "—"  # the bare model fitted, train.py did not
    text = (tmp_path / "B.md").read_text()
    assert "Failed: t4 64x128 loop (repeat 1): out of memory" in text
    assert "T4-like: this CPU under a Colab T4's limits, not a T4" in text
    assert "memory capped at 15 GiB, 10.0% of this GPU" in text
    assert result["context"]["t4_limits"] == {"memory_fraction": 0.1}


def test_a_failed_compile_is_kept_and_the_run_goes_on(tmp_path, monkeypatch):
    def loop(config, device, precision, shape, data, settings, compiled=False):
        if compiled:
            raise RuntimeError("backend raised:\nno C compiler found\nmore detail")
        return fake_figures(shape, loop=True)

    monkeypatch.setattr(gpu_benchmark, "measure_loop", loop)
    result = gpu_command(gpu_args(tmp_path, "--configs", "4x32", "--repeats", "2"))
    assert [(m["repeat"], m["variant"], m["kind"], m.get("failed"))
            for m in result["measurements"]] == [
        (1, "native", "bare", None), (1, "native", "loop", None),
        (1, "compile", "loop", "RuntimeError: backend raised: no C compiler found"),
        (2, "native", "bare", None), (2, "native", "loop", None)]
    assert "--compile: no comparison" in (tmp_path / "B.md").read_text()


def test_a_stopped_gpu_benchmark_keeps_what_it_measured(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(gpu_benchmark, "measure_loop", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        gpu_command(gpu_args(tmp_path, "--configs", "4x32"))
    saved = json.loads((tmp_path / "gpu.json").read_text())
    [bare] = saved["measurements"]
    assert (bare["config"], bare["kind"]) == ("4x32", "bare") and bare["train_samples_per_s"] > 0
    text = (tmp_path / "B.md").read_text()
    # Planned: native's bare model and loop, and compile's loop.
    assert "**Partial: 1 of 3 measurements.**" in text and "| 4x32 | 32 /" in text


@pytest.mark.parametrize(("flags", "says"), [
    (["--variants", "native,t4"], "--variants t4 needs a CUDA GPU"),
    (["--variants", "fp16"], "--variants fp16 needs a CUDA GPU"),
    (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU")])
def test_gpu_benchmark_refuses_cuda_only_settings_on_a_cpu(flags, says, tmp_path, capsys):
    outcome = run_main(main, capsys, "gpu", "--device", "cpu", "--tiny", "--quick", "--json",
                       str(tmp_path / "gpu.json"), *flags)
    assert outcome.returncode == 2
    [line] = outcome.stderr.strip().splitlines()  # one sentence, no traceback
    assert line.startswith(f"python -m benchmarks.benchmark gpu: error: {says}")
    assert not (tmp_path / "gpu.json").exists()  # refused before anything was measured


def test_gpu_variants_on_a_gpu_leave_out_only_a_duplicate():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_variants(None, cuda, "bf16") == (list(VARIANTS.values()), [])
    # Where native is fp16 already (--precision fp16, or a T4's auto), fp16 would repeat it.
    chosen, notes = resolve_variants(None, cuda, "fp16")
    assert [v.name for v in chosen] == ["native", "t4", "compile"]
    assert notes == ["fp16 left out: native already runs fp16 here"]
    chosen, notes = resolve_variants(["compile", "native"], cpu, "bf16")
    assert ([v.name for v in chosen], notes) == (["compile", "native"], [])
    assert parse_variants("t4, native") == ["t4", "native"]
    for bad in ("gpu", "native,native", "native,"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variants(bad)


@pytest.fixture
def cuda_memory_calls(monkeypatch) -> list:
    """torch.cuda's memory functions faked for a 141 GiB GPU that may use 90% of itself: the
    calls the T4-like preset makes, in order."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=141 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.9)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls.append((fraction, device)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    return calls


@pytest.fixture
def backend_flags():
    """The process's TF32 and attention flags, put back as they were after the test."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    saved = (cuda.matmul.allow_tf32, cudnn.allow_tf32, cuda.flash_sdp_enabled(),
             cuda.cudnn_sdp_enabled())
    yield cuda, cudnn
    cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
    cuda.enable_flash_sdp(saved[2])
    cuda.enable_cudnn_sdp(saved[3])


def test_the_t4_preset_sets_a_t4s_limits_and_restores_every_setting(cuda_memory_calls,
                                                                     backend_flags):
    cuda, cudnn = backend_flags
    device = torch.device("cuda", 0)
    # As in the benchmark's process: use_device turned TF32 on through the legacy flags.
    cuda.matmul.allow_tf32 = cudnn.allow_tf32 = True
    for stop in (None, RuntimeError("a measurement failed")):
        cuda_memory_calls.clear()
        with contextlib.suppress(RuntimeError), t4_limits(device) as limits:
            assert not cuda.flash_sdp_enabled() and not cuda.cudnn_sdp_enabled()
            # A T4's attention kernel stays, and the fallback.
            assert cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
            assert cuda.matmul.fp32_precision == cudnn.conv.fp32_precision == "ieee"
            assert cuda_memory_calls == ["empty_cache", (15 / 141, device)]
            assert limits == {"memory_fraction": 15 / 141, "memory_gib": 15.0,
                              "sdp_off": ["flash", "cudnn"],
                              "tf32_off": ["torch.backends.cuda.matmul.fp32_precision = 'ieee'",
                                           "torch.backends.cudnn.conv.fp32_precision = 'ieee'"]}
            if stop:
                raise stop
        # Restored, and readable through the legacy flags again (torch refuses to read one
        # that disagrees with the new setting).
        assert cuda_memory_calls[-1] == (0.9, device)
        assert cuda.flash_sdp_enabled() and cuda.cudnn_sdp_enabled()
        assert cuda.matmul.allow_tf32 and cudnn.allow_tf32
        assert cuda.matmul.fp32_precision == cudnn.conv.fp32_precision == "tf32"


def test_the_t4_preset_uses_the_legacy_tf32_flags_on_an_older_torch(cuda_memory_calls,
                                                                    backend_flags,
                                                                    monkeypatch):
    cuda, _ = backend_flags
    matmul, cudnn = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(cuda, "matmul", matmul)  # no fp32_precision: torch before 2.9
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    with t4_limits(torch.device("cuda", 0)) as limits:
        assert matmul.allow_tf32 is cudnn.allow_tf32 is False
    assert limits["tf32_off"] == ["torch.backends.cuda.matmul.allow_tf32 = False",
                                  "torch.backends.cudnn.allow_tf32 = False"]
    assert matmul.allow_tf32 is cudnn.allow_tf32 is True


def test_gpu_medians_over_repeats():
    runs = [{"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 10.0,
             "after_first_log": None, "peak_gb": 1.5, "peak_reserved_gb": 2.0},
            {"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 30.0,
             "after_first_log": 7.0, "peak_gb": 2.5, "peak_reserved_gb": 2.75},
            {"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 14.0,
             "after_first_log": 9.0, "peak_gb": 0.5, "peak_reserved_gb": 3.0}]
    # The largest peak memory, allocated and reserved: what a run needs.
    assert median_of(runs) == {"config": "16x128", "eval_batch_size": 64,
                               "train_samples_per_s": 14.0, "after_first_log": 8.0,
                               "peak_gb": 2.5, "peak_reserved_gb": 3.0}


def test_peak_flops_come_from_the_datasheet_table_and_never_a_guess():
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp16") == 989.4e12  # the SXM card
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A10", "bf16") == 125e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("NVIDIA L40S", "bf16") == 362.05e12
    assert peak_flops("Tesla T4", "fp16") == 65e12
    assert peak_flops("Tesla V100-SXM2-16GB", "fp16") == 125e12
    assert peak_flops("Tesla V100-PCIE-32GB", "fp16") == 112e12
    # No figure: bf16 on a T4, fp32 anywhere, a CPU, a GPU not in the table, and names that
    # only contain a known one (A10G is not an A10, GH200 not an H200, RTX A1000 not an A100).
    assert peak_flops("Tesla T4", "bf16") is None
    assert peak_flops("NVIDIA H200", "fp32") is None
    assert peak_flops("CPU", "bf16") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    for name in ("NVIDIA A10G", "NVIDIA GH200 480GB", "NVIDIA RTX A1000", "NVIDIA L40"):
        assert peak_flops(name, "bf16") is None, name


def test_synthetic_review_lengths_look_like_imdb():
    lengths = torch.tensor(review_lengths(20_000, 512, seed=0))
    assert lengths.min() == 32 and lengths.max() == 512
    assert lengths.median().item() == pytest.approx(233, abs=6)
    assert (lengths == 512).float().mean().item() == pytest.approx(0.11, abs=0.015)
    assert (lengths >= 128).float().mean().item() == pytest.approx(0.82, abs=0.015)
    assert review_lengths(50, 128, seed=1) == review_lengths(50, 128, seed=1)  # seeded
    assert max(review_lengths(1000, 128, seed=1)) == 128


def test_gpu_configs_parse_and_refuse_bad_entries():
    assert parse_configs("16x128, 64x512") == [Shape(16, 128), Shape(64, 512)]
    for bad in ("16", "16x1024", "0x128", "16x128,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_configs(bad)


@pytest.mark.parametrize("command", ["cpu", "lengths", "levers", "gpu", "bare", "tokenize"])
def test_every_benchmark_command_explains_its_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    flags = [word for word in out.split() if word.startswith("--")]
    assert "--markdown" in flags or command in ("bare", "tokenize")
    assert out.count("(default:") >= 2


def test_lengths_benchmark_reports_padding_and_speed_both_ways(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    reviews(20).to_csv(data / "train.csv", index=False)
    reviews(8).to_csv(data / "test.csv", index=False)
    args = build_parser().parse_args(
        ["lengths", "--model", tiny_model_dir, "--data", str(data), "--train-samples", "32",
         "--timed-samples", "16", "--repeats", "1", "--work-dir", str(tmp_path / "work"),
         "--markdown", str(tmp_path / "B.md")])
    result = lengths_command(args)
    padding = result["padding"]
    assert padding["reviews"] == 36
    assert 0 <= padding["grouped"] <= padding["random"] < 1
    assert result["speed"]["random"] > 0 and result["speed"]["grouped"] > 0
    rows = {row[0]: row for row in result["table"]}
    assert "padded tokens, the 16 reviews timed" in rows
    speed_row = rows["forward+backward samples/s (one epoch of them)"]
    assert float(speed_row[3]) == pytest.approx(
        result["speed"]["grouped"] / result["speed"]["random"], abs=0.006)
    assert "<!-- benchmark:lengths start -->" in (tmp_path / "B.md").read_text()


def test_levers_benchmark_writes_a_row_per_lever_against_its_default(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    reviews(20).to_csv(data / "train.csv", index=False)
    reviews(8).to_csv(data / "test.csv", index=False)
    markdown = tmp_path / "B.md"
    args = build_parser().parse_args(
        ["levers", "--model", tiny_model_dir, "--data", str(data), "--repeats", "1",
         "--train-batches", "1", "--eval-reviews", "8", "--skip-compile",
         "--markdown", str(markdown)])
    outcome = levers_command(args)
    rows = {row[0]: row for row in outcome["rows"][1:]}
    assert "training: 1 thread" in rows and "evaluation: batch 16" in rows
    assert any(name.startswith("evaluation: bf16 autocast") for name in rows)
    # Each lever's row shows the median of its timings, and that median over its kind's
    # default's: the table is the measurements, not something else.
    medians = {name: statistics.median(times) for name, times in outcome["results"].items()}
    for kind in ("training", "evaluation"):
        [default] = [name for name in medians
                     if f"{kind}: {name}" in rows and name.startswith("default")]
        levers = [name for name in medians if f"{kind}: {name}" in rows and name != default]
        assert len(levers) >= 2
        for name in levers:
            row = rows[f"{kind}: {name}"]
            assert row[1] == f"{medians[name] * 1000:.1f}"
            assert row[2] == f"{medians[name] / medians[default]:.2f} x"
    text = markdown.read_text()
    assert "<!-- benchmark:levers start -->" in text and "Milliseconds per review" in text
    assert "Machine: " in text
