"""The benchmark scripts cannot rot: the quick CPU benchmark and the GPU benchmark on the CPU."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

import pytest
import torch
from conftest import minilm_path, reviews, run_main

from benchmarks.benchmark import (
    CPU_ROWS,
    TARGET_CACHED_TOKENIZE_SECONDS,
    build_parser,
    lengths_command,
    main,
    markdown_table,
    write_section,
)
from benchmarks.gpu_benchmark import forward_flops_per_sequence, gpu_command, model_config
from benchmarks.lab_recipe import RECIPE_CHANGES
from benchmarks.levers import levers_command
from runtime import pick_precision


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
    assert markdown_table(table) in text
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


def test_gpu_benchmark_runs_on_the_cpu_with_a_tiny_model(tmp_path, capsys):
    args = argparse.Namespace(device="cpu", steps=2, repeats=1, tiny=True,
                              markdown=tmp_path / "B.md", json=tmp_path / "gpu.json")
    runs = gpu_command(args)
    assert set(runs) == {"recipe", "project", "bare"}  # accelerate is installed here
    for results in runs.values():
        assert results[0]["train_samples_per_s"] > 0 and results[0]["eval_samples_per_s"] > 0
    text = (tmp_path / "B.md").read_text()
    assert "| train.py loop |" in text and "| lab recipe (HF Trainer) |" in text
    # --precision auto on this CPU: bf16 where the suite's switch is on (conftest).
    precision = pick_precision("auto", torch.device("cpu"))
    assert f"CPU, {precision}; tiny model" in text


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
