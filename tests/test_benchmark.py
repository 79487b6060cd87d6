"""The benchmark scripts cannot rot: the quick CPU benchmark and the GPU benchmark on the CPU."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

import pytest
import torch
from conftest import minilm_path, reviews, run_main

from benchmarks import gpu_benchmark
from benchmarks.benchmark import build_parser, main
from benchmarks.common import CPU_ROWS, write_section
from benchmarks.cpu_comparison import TARGET_CACHED_TOKENIZE_SECONDS
from benchmarks.gpu_benchmark import gpu_command, parse_configs
from benchmarks.gpu_report import FULL_TEST_REVIEWS, FULL_TRAIN_REVIEWS, median_of, peak_flops
from benchmarks.gpu_workload import Shape, forward_flops_per_sequence, model_config, review_lengths
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


def test_gpu_benchmark_runs_on_the_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    # No peak is known for a CPU; a fake one makes every MFU cell checkable against its
    # formula: samples/s x model FLOPs per sample / peak.
    fake_peak = 1e9
    monkeypatch.setattr(gpu_benchmark, "peak_flops", lambda name, precision: fake_peak)
    result = gpu_command(gpu_args(tmp_path))
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(result))
    ctx = result["context"]
    assert ctx["configs"] == ["16x128", "64x128"] and ctx["peak_flops"] == fake_peak
    # --precision auto on this CPU: bf16 where the suite's switch is on (conftest).
    assert ctx["precision"] == pick_precision("auto", torch.device("cpu"))
    measured = {(m["config"], m["kind"]): m for m in result["measurements"]}
    assert sorted(measured) == [("16x128", "bare"), ("16x128", "loop"), ("64x128", "bare"),
                                ("64x128", "loop")]
    config = model_config(tiny=True)
    full_width = forward_flops_per_sequence(config, 128)
    for (name, kind), m in measured.items():
        batch = int(name.split("x")[0])
        assert m["train_samples_per_s"] > 0 and m["eval_samples_per_s"] > 0
        # --quick: 2 timed bare batches; 3 loop batches (one epoch) and 8 scored rows.
        assert m["train_samples"] == (2 if kind == "bare" else 3) * batch
        assert m["eval_samples"] == (2 * batch if kind == "bare" else 8)
        assert m["eval_batch_size"] == (batch if kind == "bare" else ctx["eval_batch_size"])
        # 82% of the drawn lengths fill 128 tokens, so every batch here is 128 wide: the model
        # FLOPs per sample are those of a full-width sequence, twice over for training.
        assert m["train_mean_width"] == m["eval_mean_width"] == 128
        assert m["train_flops_per_sample"] == pytest.approx(2 * full_width)
        assert m["eval_flops_per_sample"] == pytest.approx(full_width)
    loop = measured[("16x128", "loop")]
    assert loop["train_samples_per_s"] == pytest.approx(48 / loop["train_seconds"])
    assert loop["eval_samples_per_s"] == pytest.approx(8 / loop["eval_seconds"])
    summary = result["summary"]
    training = {row[0]: row for row in summary["training"][1:]}
    evaluation = {row[0]: row for row in summary["evaluation"][1:]}
    for name in ("16x128", "64x128"):
        bare, loop = measured[(name, "bare")], measured[(name, "loop")]
        for cell, m, kind in ((training[name][3], bare, "train"),
                              (training[name][5], loop, "train"),
                              (evaluation[name][3], bare, "eval"),
                              (evaluation[name][6], loop, "eval")):
            expected = m[f"{kind}_samples_per_s"] * m[f"{kind}_flops_per_sample"] / fake_peak
            assert percent(cell) == pytest.approx(expected, abs=0.0005)
        assert float(training[name][7]) == pytest.approx(
            loop["train_samples_per_s"] / bare["train_samples_per_s"], abs=0.006)
    # The recipe ran once, at its own batch and length (lab_recipe.py's: 16 x 128).
    recipe = result["recipe"]
    assert (recipe["batch"], recipe["length"], recipe["train_samples"]) == (16, 128, 2 * 16)
    assert recipe["train_samples_per_s"] > 0 and recipe["eval_samples_per_s"] > 0
    loop = measured[("16x128", "loop")]
    estimate = summary["estimate"]
    assert estimate["project_seconds"] == pytest.approx(
        FULL_TRAIN_REVIEWS / loop["train_samples_per_s"]
        + 2 * FULL_TEST_REVIEWS / loop["eval_samples_per_s"])
    assert estimate["recipe_seconds"] == pytest.approx(
        FULL_TRAIN_REVIEWS / recipe["train_samples_per_s"]
        + 2 * FULL_TEST_REVIEWS / recipe["eval_samples_per_s"])
    comparison = {row[0].split(" (")[0].split(":")[0]: row for row in summary["comparison"][1:]}
    assert float(comparison["training samples/s"][3].split()[0]) == pytest.approx(
        loop["train_samples_per_s"] / recipe["train_samples_per_s"], abs=0.006)
    assert float(comparison["evaluation samples/s"][3].split()[0]) == pytest.approx(
        loop["eval_samples_per_s"] / recipe["eval_samples_per_s"], abs=0.006)
    assert comparison["estimate"][3] == \
        f"{estimate['recipe_seconds'] / estimate['project_seconds']:.1f} x as fast"
    # Each target is met exactly when its measured numbers meet it.
    mfu_target, job_target = summary["targets"]
    target_loop = measured[("64x128", "loop")]
    achieved = target_loop["train_samples_per_s"] * target_loop["train_flops_per_sample"] / 1e9
    assert mfu_target["measured"].startswith(f"{achieved:.1%} (train.py loop")
    assert mfu_target["met"] == (ctx["precision"] == "bf16" and achieved >= 0.40)
    assert job_target["met"] == (estimate["speedup"] >= 10)
    text = (tmp_path / "B.md").read_text()
    assert text.count("<!-- benchmark:gpu start -->") == text.count("<!-- benchmark:gpu end -->")\
        == 1
    for name in ("training", "comparison"):
        assert markdown_table(summary[name][0], summary[name][1:]) in text
    assert "Partial" not in text and "CPU, " + ctx["precision"] + "; tiny model" in text


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
    assert "**Partial: 1 of 2 measurements.**" in text and "| 4x32 | 32 |" in text


def test_gpu_medians_over_repeats():
    runs = [{"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 10.0,
             "after_first_log": None, "peak_gb": 1.5},
            {"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 30.0,
             "after_first_log": 7.0, "peak_gb": 2.5},
            {"config": "16x128", "eval_batch_size": 64, "train_samples_per_s": 14.0,
             "after_first_log": 9.0, "peak_gb": 0.5}]
    assert median_of(runs) == {"config": "16x128", "eval_batch_size": 64,
                               "train_samples_per_s": 14.0, "after_first_log": 8.0,
                               "peak_gb": 2.5}


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
