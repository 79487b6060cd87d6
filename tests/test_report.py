"""machinery/report.py: the training-curve and comparison plots, and report.md, for a run folder."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_script
from matplotlib.image import imread

from machinery import report, tracking
from machinery.cli import UsageError

BEFORE = {"accuracy": 0.515, "precision": 0.515748031496063, "recall": 0.2657200811359026,
          "f1": 0.3507362784471218, "loss": 0.6929436326026917, "n": 1000,
          "confusion_matrix": [[384, 123], [362, 131]]}
AFTER = {"accuracy": 0.811, "precision": 0.7900763358778626, "recall": 0.8397565922920892,
         "f1": 0.8141592920353983, "loss": 0.43107324838638306, "n": 1000,
         "confusion_matrix": [[397, 110], [79, 414]]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, with_validation: bool = True, with_counts: bool = True):
    """A finished run folder as train.py leaves it (the files machinery/report.py reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": "bert-base-uncased", "data": "imdb", "lr": 0.0005, "lora_r": 8,
              "eval_every": None, "resolved_device": "cuda", "resolved_precision": "bf16",
              "train_examples": 22500, "validation_examples": 2500, "test_examples": 25000,
              "versions": {"torch": "2.13.0"}}
    metrics = {"before": BEFORE, "after": AFTER, "train_seconds": 218.04234745099984,
               "train_samples_per_s": 9.172530122615083, "wall_seconds": 300.4}
    if with_counts:
        metrics["parameters"] = {"trainable": 74498, "total": 22788484}
    records = [{"step": step, "epoch": 1, "loss": 0.7 - step / 500, "lr": 5e-4 * (1 - step / 130),
                "samples_per_s": 9.0} for step in range(10, 130, 10)]
    if with_validation:
        records += [{"step": 40, "epoch": 1, "best": True,
                     "validation": {**AFTER, "accuracy": 0.70, "f1": 0.68, "loss": 0.6}},
                    {"step": 80, "epoch": 1, "best": True,
                     "validation": {**AFTER, "accuracy": 0.78, "f1": 0.77, "loss": 0.5}},
                    {"step": 125, "epoch": 1, "best": False,
                     "validation": {**AFTER, "accuracy": 0.76, "f1": 0.79, "loss": 0.48}}]
    (folder / report.CONFIG_FILE).write_text(json.dumps(config))
    (folder / report.METRICS_FILE).write_text(json.dumps(metrics))
    (folder / tracking.LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def assert_sensible_png(path, min_width: int = 800, min_height: int = 600) -> None:
    """A real PNG that decodes, of at least the given size in pixels, with varied content."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert min_width <= width <= 4000 and min_height <= height <= 4000, (width, height)
    assert pixels.std() > 0.05  # not a blank canvas
    assert path.stat().st_size > 20_000


def markdown_rows(text: str) -> dict[str, list[str]]:
    """The cells of every Markdown table row, keyed by the first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_report_numbers_match_metrics_json(tmp_path):
    run = write_run(tmp_path / "run")
    text = report.write_report(run).read_text()
    rows = markdown_rows(text)
    for metric in ("accuracy", "precision", "recall", "f1", "loss"):
        before, after, change = (float(cell) for cell in rows[metric])
        assert before == pytest.approx(BEFORE[metric], abs=5e-5)
        assert after == pytest.approx(AFTER[metric], abs=5e-5)
        assert change == pytest.approx(AFTER[metric] - BEFORE[metric], abs=5e-5)
    assert rows["accuracy"] == ["0.5150", "0.8110", "+0.2960"]
    assert rows["loss"][2] == "-0.2619"
    assert rows["n"][:2] == ["1000", "1000"]
    assert rows["trainable (LoRA adapters on the frozen encoder, plus the classifier head)"] == [
        "74,498", "0.33%"]
    assert rows["total"] == ["22,788,484", "100%"]
    assert rows["training"] == ["22,500"] and rows["test"] == ["25,000"]
    assert rows["training time"] == ["3 min 38 s (218.0 s)"]
    assert rows["training throughput"] == ["9.2 samples/s"]
    assert rows["wall time (data, scoring before and after, training)"] == ["5 min 0 s (300.4 s)"]
    assert rows["optimizer steps"] == ["120"]
    assert rows["lr"] == ["`0.0005`"] and rows["eval_every"] == ["`null`"]
    # The adapter that was scored is the last one marked best, not the last validated.
    assert "saved at step 80, the best validation accuracy (0.7800) of 3 validations" in text
    for image in (report.CURVES_PNG, report.COMPARISON_PNG):
        assert f"]({image})" in text
        assert_sensible_png(run / image)


def test_a_resumed_runs_wall_time_says_it_is_the_last_process(tmp_path):
    """Resumed late, the last process ran 120 s of the 218 s of training: its wall time (150 s)
    must not read as the whole run's, shorter than the training in it."""
    run = write_run(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(wall_seconds=150.0, test_seconds={"before": None, "after": 12.0})
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = markdown_rows(report.write_report(run).read_text())
    label = ("wall time of the last process, which resumed the run (data, scoring after, the "
             "rest of training)")
    assert rows[label] == ["2 min 30 s (150.0 s)"]
    assert "wall time (data, scoring before and after, training)" not in rows


def test_a_run_without_validations_or_counts_still_gets_a_report(tmp_path):
    run = write_run(tmp_path / "run", with_validation=False, with_counts=False)
    text = report.write_report(run).read_text()
    assert "Parameter counts were not recorded" in text
    assert_sensible_png(run / report.CURVES_PNG)


def test_comparison_of_several_checkpoints_grows_with_their_number(tmp_path):
    results = [("base", BEFORE), ("runs/a/adapter", AFTER), ("runs/b/adapter", AFTER),
               ("runs/c/adapter", BEFORE)]
    two = report.plot_comparison(results[:2], tmp_path / "two.png")
    four = report.plot_comparison(results, tmp_path / "four.png")
    assert_sensible_png(two)
    assert_sensible_png(four)
    assert imread(four).shape[1] > imread(two).shape[1]
    assert [report.display_name(name) for name, _ in results] == ["base", "a", "b", "c"]


def test_results_with_reliability_bins_get_a_reliability_diagram(tmp_path):
    bins = [{"low": 0.5, "high": 0.6, "n": 40, "accuracy": 0.55, "confidence": 0.57},
            {"low": 0.9, "high": 1.0, "n": 60, "accuracy": 0.9, "confidence": 0.96}]
    evaluated = [("base", {**BEFORE, "ece": 0.1, "reliability": bins}),
                 ("runs/a/adapter", {**AFTER, "ece": 0.04, "reliability": bins[1:],
                                     "temperature": 1.3})]
    plain = report.plot_comparison([("base", BEFORE), ("after", AFTER)], tmp_path / "p.png")
    diagrams = report.plot_comparison(evaluated, tmp_path / "r.png")
    assert_sensible_png(diagrams)
    assert imread(diagrams).shape[0] > 1.3 * imread(plain).shape[0]  # a third row of panels
    axes = report.new_figure().add_subplot()
    report.plot_reliability(axes, "a", evaluated[1][1])
    [bar] = axes.containers[0]  # one bar per non-empty bin: its range and its accuracy
    assert (bar.get_x(), bar.get_width(), bar.get_height()) == pytest.approx((0.9, 0.1, 0.9))
    assert [text.get_text() for text in axes.texts] == ["60"]  # the bin's review count
    assert axes.get_title() == "a\nreliability (ECE 0.040, T=1.3)"
    assert axes.get_xlim() == (0.5, 1.0)  # two classes: the top one has at least 0.5


def test_a_run_with_a_fitted_temperature_reports_it(tmp_path):
    run = write_run(tmp_path / "run")
    metrics = json.loads((run / report.METRICS_FILE).read_text())
    effect = {"ece": {"raw": 0.0712, "calibrated": 0.0231},
              "loss": {"raw": 0.4311, "calibrated": 0.4102}}
    metrics["calibration"] = {"temperature": 1.4567, "validation": {"examples": 500, **effect},
                              "test": effect}
    (run / report.METRICS_FILE).write_text(json.dumps(metrics))
    rows = markdown_rows(report.write_report(run).read_text())
    assert rows["ECE on validation"] == ["0.0712", "0.0231"]
    assert rows["loss on test"] == ["0.4311", "0.4102"]
    assert ("Temperature 1.46, fitted on 500 validation reviews: ECE 0.0712 -> 0.0231 there, "
            "0.0712 -> 0.0231 on the test reviews") in (run / report.REPORT_MD).read_text()


def test_smoothing_is_a_debiased_moving_average():
    assert report.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    # weight 0.5: averages 0.5 and 1.25, divided by 1 - 0.5 and 1 - 0.25.
    assert report.smooth([1.0, 2.0], weight=0.5) == pytest.approx([1.0, 1.25 / 0.75])


def test_a_folder_that_is_no_run_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=re.escape("config.json is missing")):
        report.write_report(tmp_path)


def test_report_command_regenerates_an_existing_run(tmp_path, capsys):
    """`python -m machinery.report RUN_DIR`, as the README gives it, in a new interpreter."""
    run = write_run(tmp_path / "run")
    result = run_script("-m", "machinery.report", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Wrote {run / report.REPORT_MD}" in result.stdout
    for name in (report.REPORT_MD, report.CURVES_PNG, report.COMPARISON_PNG):
        assert (run / name).is_file(), name
    assert f"`python -m machinery.report {run}`" in (run / report.REPORT_MD).read_text()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err.splitlines()[-1]
