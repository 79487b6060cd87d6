"""Temperature scaling (machinery/stats.py), the reliability diagram's bins, and the seed summary
(machinery/summarize.py): checked against numbers computed here with numpy, on known inputs and on
tiny train.py runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import NEGATIVE, POSITIVE, run_main, run_script

import evaluate
import predict
import train
from data import PaddingCollator, make_loader, split_train_validation, tokenize
from evaluate import compute_metrics, predict_in_order
from lora_model import load_checkpoint, merge_adapter
from machinery import summarize
from machinery.checkpoints import ADAPTER_DIR
from machinery.data_sources import load_split
from machinery.files import MANIFEST_FILE
from machinery.options import DataOptions
from machinery.stats import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    TEMPERATURE_FILE,
    fit_calibration,
    fit_temperature,
    format_calibration,
    reliability_bins,
    scale_logits,
    temperature_to_apply,
)

SEEDS = (0, 1)
CPU = torch.device("cpu")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, written out here (not the code's helper)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over `bins` equal-width bins, (low, high], by a plain loop."""
    confidence, right = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = (confidence > low) & (confidence <= high)
        if members.any():
            total += members.sum() / len(labels) * abs(right[members].mean()
                                                       - confidence[members].mean())
    return total


def overconfident_logits(n: int, true_temperature: float, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_temperature): a model that is
    over-confident by that factor, whose best temperature is true_temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, 3))
    probabilities = np.exp(log_softmax(logits / true_temperature))
    labels = np.array([rng.choice(3, p=p) for p in probabilities])
    return logits.astype(np.float32), labels


def test_the_fit_is_the_minimum_of_the_nll_and_recovers_a_known_temperature():
    logits, labels = overconfident_logits(4000, true_temperature=2.5)
    fitted = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE), 4001))
    losses = [nll(logits / t, labels) for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)  # the grid's step
    assert fitted == pytest.approx(2.5, rel=0.1)  # the sample's estimate of the true factor
    assert nll(logits / fitted, labels) < nll(logits, labels) - 0.05
    # Probabilities that are already honest keep a temperature near 1.
    honest, honest_labels = overconfident_logits(4000, true_temperature=1.0, seed=1)
    assert fit_temperature(honest, honest_labels) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("temperature", [0.1, 0.7, 3.0, 19.0])
@pytest.mark.parametrize("names", [("neg", "pos"), ("a", "b", "c")])
def test_a_temperature_changes_the_loss_but_no_prediction(temperature, names):
    logits, labels = overconfident_logits(300, 2.0)
    if len(names) == 2:
        logits, labels = logits[:, :2], (labels > 0).astype(int)
    raw = compute_metrics(labels, logits, names)
    scaled = compute_metrics(labels, logits, names, temperature)
    assert (scale_logits(logits, temperature).argmax(1) == logits.argmax(1)).all()
    assert {k: v for k, v in scaled.items() if k != "loss"} == {
        k: v for k, v in raw.items() if k != "loss"}  # per class and K x K too, for K = 3
    assert scaled["loss"] == pytest.approx(nll(logits.astype(np.float64) / temperature, labels),
                                           rel=1e-9)
    assert raw["loss"] == pytest.approx(nll(logits, labels), rel=1e-9)
    assert abs(scaled["loss"] - raw["loss"]) > 1e-3


def test_a_fit_at_the_edge_of_its_range_keeps_the_raw_probabilities():
    # Every validation review right: the loss keeps falling as T -> 0 (logits x 20 and more).
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    logits = np.eye(2, dtype=np.float32)[labels] * 2.0
    calibration = fit_calibration(logits, labels)
    assert calibration["temperature"] == 1.0
    assert calibration["unused_fit"] < 0.1  # towards the lower end
    assert "No temperature" in format_calibration(calibration)
    # With one mistake among them there is something to fit, inside the range.
    logits[0] = logits[0][::-1]
    assert "unused_fit" not in fit_calibration(logits, labels)


def test_reliability_bins_by_hand():
    # Two reviews at confidence 0.95, one right; two at 0.6 (bin (8/15, 9/15]), both right.
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.6, 0.4]])
    bins = reliability_bins(np.array([0, 1, 1, 0]), probabilities)
    assert bins == [
        {"low": pytest.approx(8 / 15), "high": pytest.approx(9 / 15), "n": 2, "accuracy": 1.0,
         "confidence": pytest.approx(0.6)},
        {"low": pytest.approx(14 / 15), "high": 1.0, "n": 2, "accuracy": 0.5,
         "confidence": pytest.approx(0.95)}]


# ---------------------------------------------------------------------------------------------
# On tiny train.py runs


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shared_data_dir, tmp_path_factory):
    """Two finished tiny runs of one configuration, seeds 0 and 1 (a few seconds each)."""
    folder = tmp_path_factory.mktemp("calibrated")
    for seed in SEEDS:
        code = train.main(["--model", tiny_model_dir, "--data", str(shared_data_dir),
                           "--output-dir", str(folder / f"seed{seed}"), "--seed", str(seed),
                           "--epochs", "4", "--batch-size", "4", "--validation-size", "8",
                           "--lr", "1e-1", "--precision", "fp32"])
        assert code == 0
    return [folder / f"seed{seed}" for seed in SEEDS]


def read_json(path):
    return json.loads(path.read_text())


def test_train_stores_the_temperature_and_evaluate_and_predict_apply_it(
        runs, shared_data_dir, tmp_path, capsys):
    run = runs[0]
    metrics = read_json(run / "metrics.json")
    calibration, after = metrics["calibration"], metrics["after"]
    temperature = calibration["temperature"]
    stored = read_json(run / ADAPTER_DIR / TEMPERATURE_FILE)
    assert stored["temperature"] == temperature
    assert MIN_TEMPERATURE < temperature < MAX_TEMPERATURE and abs(temperature - 1) > 0.05
    validation = calibration["validation"]
    assert validation["examples"] == 8
    assert validation["loss"]["calibrated"] <= validation["loss"]["raw"]  # T = 1 a candidate
    assert f"Temperature {temperature:.3g}, fitted on 8 validation reviews" in (
        run / "report.md").read_text()

    # Fitted on the validation reviews (never the test's): the loss minimum over a grid of T
    # on the checkpoint's own logits of that split, recomputed here.
    model, tokenizer = load_checkpoint(run)
    _, held_out = split_train_validation(load_split(str(shared_data_dir), "train"), None, 8,
                                         DataOptions().data_seed)
    loader = make_loader(tokenize(held_out, tokenizer, 128), 8,
                         PaddingCollator(tokenizer.pad_token_id, CPU), shuffle=False)
    logits, labels = predict_in_order(model, loader, CPU, "fp32")
    grid = np.exp(np.linspace(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE), 4001))
    best = grid[int(np.argmin([nll(logits.astype(np.float64) / t, labels) for t in grid]))]
    assert temperature == pytest.approx(best, rel=2e-3)
    probabilities = np.exp(log_softmax(logits.astype(np.float64) / temperature))
    assert validation["ece"]["calibrated"] == pytest.approx(ece(probabilities, labels), abs=1e-6)

    # evaluate.py applies the stored temperature: train.py's "after" row to the last digit.
    out, raw_out, raw_lines = tmp_path / "out.json", tmp_path / "raw.json", tmp_path / "raw.jsonl"
    data = ["--data", str(shared_data_dir), "--precision", "fp32"]  # as the run was scored
    result = run_main(evaluate.main, capsys, "--checkpoint", str(run), *data, "--json", str(out))
    assert result.returncode == 0, result.stderr
    [row] = read_json(out)["results"]
    assert {key: row[key] for key in after} == after
    assert row["temperature"] == temperature
    assert f"T = {temperature:.3g}" in result.stderr
    # --no-calibration: the model's raw probabilities, the same predictions.
    result = run_main(evaluate.main, capsys, "--checkpoint", str(run), *data, "--no-calibration",
                      "--json", str(raw_out), "--predictions", str(raw_lines))
    assert result.returncode == 0, result.stderr
    [raw] = read_json(raw_out)["results"]
    assert raw["temperature"] == 1.0
    for name in ("accuracy", "precision", "recall", "f1", "confusion_matrix", "n"):
        assert raw[name] == after[name], name
    lines = [json.loads(line) for line in raw_lines.read_text().splitlines()]
    labels = np.array([line["label"] for line in lines])
    raw_probabilities = np.array([line["probabilities"][row["name"]] for line in lines])
    # log p is the logits up to a constant per row, which softmax ignores.
    log_p = np.log(raw_probabilities)
    assert raw["loss"] == pytest.approx(nll(log_p, labels), abs=1e-5)
    assert after["loss"] == pytest.approx(nll(log_p / temperature, labels), abs=1e-5)
    assert abs(after["loss"] - raw["loss"]) > 1e-4
    calibrated = np.exp(log_softmax(log_p / temperature))
    test_ece = calibration["test"]["ece"]
    assert test_ece["raw"] == pytest.approx(ece(raw_probabilities, labels), abs=1e-6)
    assert test_ece["calibrated"] == pytest.approx(ece(calibrated, labels), abs=1e-6)
    assert (row["ece"], raw["ece"]) == pytest.approx((test_ece["calibrated"], test_ece["raw"]))

    # predict.py: the same labels, probabilities = softmax(log p_raw / T).
    texts = [POSITIVE[0], NEGATIVE[0], POSITIVE[3]]
    outputs = {}
    for flags in ((), ("--no-calibration",)):
        result = run_main(predict.main, capsys, "--checkpoint", str(run), "--json",
                          "--precision", "fp32", *flags, *texts)
        assert result.returncode == 0, result.stderr
        outputs[flags] = [json.loads(line) for line in result.stdout.splitlines()]
    scaled, plain = outputs[()], outputs[("--no-calibration",)]
    assert [p["label"] for p in scaled] == [p["label"] for p in plain]
    plain_p = np.array([list(p["probabilities"].values()) for p in plain])
    scaled_p = np.array([list(p["probabilities"].values()) for p in scaled])
    assert scaled_p == pytest.approx(np.exp(log_softmax(np.log(plain_p) / temperature)),
                                     abs=1e-5)

    # A merged model carries the temperature with it; merging a checkpoint without one over
    # it (--overwrite) leaves none: a temperature belongs to the weights it was fitted on.
    merged = merge_adapter(run, tmp_path / "merged")
    assert (merged / TEMPERATURE_FILE).read_bytes() == (
        run / ADAPTER_DIR / TEMPERATURE_FILE).read_bytes()
    assert temperature_to_apply(merged, calibrate=True) == temperature
    older = tmp_path / "older"  # a checkpoint saved before temperature scaling existed
    shutil.copytree(run / ADAPTER_DIR, older)
    (older / TEMPERATURE_FILE).unlink()
    (older / MANIFEST_FILE).unlink()  # which came later still
    merge_adapter(older, merged, overwrite=True)
    assert not (merged / TEMPERATURE_FILE).exists()

    # Such a checkpoint is scored raw, and evaluate.py names it beside a calibrated one.
    result = run_main(evaluate.main, capsys, "--checkpoint", str(run), "--checkpoint",
                      str(older), *data, "--json", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    calibrated_row, older_row = read_json(out)["results"]
    assert (calibrated_row["temperature"], older_row["temperature"]) == (temperature, 1.0)
    assert {key: older_row[key] for key in after} == {key: raw[key] for key in after}
    assert f"Raw probabilities (no fitted temperature stored): {older}" in result.stderr


@pytest.mark.parametrize(("content", "manifest", "message"), [
    ("{", False, "is damaged"), ('{"temperature": -1}', False, "outside"),
    ("{}", False, "is damaged"), ('{"temperature": -1}', True, "the manifest says")])
def test_a_damaged_temperature_file_is_one_line_naming_it(runs, shared_data_dir, tmp_path,
                                                          capsys, content, manifest, message):
    """With the checkpoint's manifest the damage is caught by size and hash; without one (a
    checkpoint saved before manifests existed) by reading the file itself."""
    adapter = tmp_path / "adapter"
    shutil.copytree(runs[0] / ADAPTER_DIR, adapter)
    (adapter / TEMPERATURE_FILE).write_text(content)
    if not manifest:
        (adapter / MANIFEST_FILE).unlink()
    for argv in ((evaluate.main, "--data", str(shared_data_dir)), (predict.main, "Fine.")):
        result = run_main(argv[0], capsys, "--checkpoint", str(adapter), *argv[1:])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert ": error: " in line and str(adapter / TEMPERATURE_FILE) in line and message in line
        assert "Scoring" not in result.stderr  # refused before any work
    # --no-calibration does not read the file: it scores the raw probabilities (where no
    # manifest says that the checkpoint itself is damaged).
    result = run_main(predict.main, capsys, "--checkpoint", str(adapter), "--no-calibration",
                      "Fine.")
    assert result.returncode == (2 if manifest else 0), result.stderr


def test_a_seed_sweep_reads_as_mean_and_standard_deviation(runs, tmp_path):
    """`python -m machinery.summarize RUN_DIR ...`, as the README gives it."""
    out = tmp_path / "sweep.json"
    result = run_script("-m", "machinery.summarize", *map(str, runs), "--json", str(out))
    assert result.returncode == 0, result.stderr
    summary = read_json(out)
    metrics = [read_json(run / "metrics.json") for run in runs]
    assert summary["runs"] == 2 and summary["seeds"]["seed"] == list(SEEDS)
    for row in ("before", "after"):
        for name in ("accuracy", "precision", "recall", "f1", "loss"):
            values = [m[row][name] for m in metrics]
            # Two values: the sample standard deviation is |a - b| / sqrt(2).
            assert summary[row][name]["mean"] == pytest.approx(sum(values) / 2)
            assert summary[row][name]["std"] == pytest.approx(
                abs(values[0] - values[1]) / np.sqrt(2))
            assert summary[row][name]["values"] == values
    temperatures = [m["calibration"]["temperature"] for m in metrics]
    assert summary["calibration"]["temperature"]["mean"] == pytest.approx(np.mean(temperatures))
    accuracy = summary["after"]["accuracy"]
    assert f"{accuracy['mean']:.4f} ± {accuracy['std']:.4f}" in result.stdout


def test_a_sweep_of_different_configurations_is_refused_naming_the_flag(runs, tmp_path,
                                                                        capsys):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    config = read_json(other / "config.json")
    (other / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    result = run_main(summarize.main, capsys, str(runs[0]), str(other))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--lr 0.1 in {runs[0]}, 0.5 in {other}" in result.stderr.strip().splitlines()[-1]
    # Other data under the same flags: the review counts differ (not a flag: named as recorded).
    fewer = config["test_examples"] - 1
    (other / "config.json").write_text(json.dumps({**config, "test_examples": fewer}))
    result = run_main(summarize.main, capsys, str(runs[0]), str(other))
    assert result.returncode == 2
    assert (f"test_examples {config['test_examples']} in {runs[0]}, {fewer} in {other}"
            in result.stderr.strip().splitlines()[-1])
    # A flag that does not change the result may differ (here --log-every).
    (other / "config.json").write_text(json.dumps({**config, "log_every": 7}))
    assert run_main(summarize.main, capsys, str(runs[0]), str(other)).returncode == 0
    # A run from before temperature scaling: its "after" loss is raw, the others' calibrated.
    (other / "config.json").write_text(json.dumps(config))
    metrics = read_json(other / "metrics.json")
    del metrics["calibration"]
    (other / "metrics.json").write_text(json.dumps(metrics))
    result = run_main(summarize.main, capsys, str(runs[0]), str(other))
    assert result.returncode == 2 and "losses do not compare" in result.stderr
    for argv, message in (([str(runs[0])], "at least two"),
                          ([str(runs[0]), str(runs[0])], "given twice"),
                          ([str(runs[0]), str(tmp_path)], "config.json is missing")):
        result = run_main(summarize.main, capsys, *argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr
