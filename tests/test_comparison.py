"""Comparisons that decide: intervals, calibration, paired significance, per-review predictions
(machinery/stats.py, and evaluate.py's --json and --predictions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_main, save_random_adapter
from scipy.stats import binomtest

import evaluate as evaluate_script
from machinery.stats import (
    BOOTSTRAP_RESAMPLES,
    bootstrap_difference_interval,
    brier_score,
    expected_calibration_error,
    mcnemar_p,
    paired_comparison,
    wilson_interval,
)


@pytest.mark.parametrize(("correct", "n", "expected"), [
    (8, 10, [0.4902, 0.9433]),  # the textbook example (Wilson 1927; Newcombe 1998)
    (0, 10, [0.0, 0.2775]),  # stays inside [0, 1] where the normal approximation does not
    (500, 1000, [0.4691, 0.5309]),
])
def test_wilson_interval(correct, n, expected):
    assert wilson_interval(correct, n) == pytest.approx(expected, abs=1e-4)


def test_expected_calibration_error_and_brier_score_by_hand():
    # Two reviews at confidence 0.95 (bin 15), one right; two at 0.6 (bin 9), both right.
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # |0.5 - 0.95| * 2/4 + |1.0 - 0.6| * 2/4
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.425)
    # (0.05^2 * 2) + (0.95^2 * 2) + (0.4^2 * 2) + (0.4^2 * 2), over 4 reviews
    assert brier_score(labels, probabilities) == pytest.approx(
        (2 * 0.0025 + 2 * 0.9025 + 4 * 0.16) / 4)
    perfect = np.eye(3)[[0, 2, 1]]
    assert expected_calibration_error(np.array([0, 2, 1]), perfect) == 0.0
    assert brier_score(np.array([0, 2, 1]), perfect) == 0.0


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    assert mcnemar_p(2, 8) == pytest.approx(0.109375)  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 12) < 0.001


def test_paired_comparison_counts_discordant_reviews_and_repeats_its_interval():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    a_right = rng.random(400) < 0.70
    b_right = a_right | (rng.random(400) < 0.15)  # b is right wherever a is, and more
    a = np.eye(2)[np.where(a_right, labels, 1 - labels)]
    b = np.eye(2)[np.where(b_right, labels, 1 - labels)]
    result = paired_comparison("a", "b", labels, a, b)
    gained = int((b_right & ~a_right).sum())
    assert result["discordant"] == [0, gained]
    assert result["accuracy_difference"] == pytest.approx(gained / 400)
    low, high = result["difference_ci"]
    assert 0 < low < result["accuracy_difference"] < high
    assert result["mcnemar_p"] < 1e-4  # 2 x 2^-gained: every discordant review favours b
    assert paired_comparison("a", "b", labels, a, b) == result  # seeded: the same interval
    # The paired interval is far narrower than an unpaired one would be (+- 2 * 0.032 here),
    # and as wide as the normal approximation of the per-review differences' mean (within 10%).
    assert high - low < 0.06
    differences = b_right.astype(float) - a_right.astype(float)
    assert high - low == pytest.approx(2 * 1.959964 * differences.std() / np.sqrt(400), rel=0.1)
    same = bootstrap_difference_interval(a_right, a_right, resamples=BOOTSTRAP_RESAMPLES)
    assert same == [0.0, 0.0]


def test_evaluate_writes_intervals_comparisons_and_per_review_predictions(
        tiny_model_dir, shared_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    save_random_adapter(tiny_model_dir, run / "adapter")
    # In a folder that does not exist yet: evaluate.py makes it.
    out, predictions = tmp_path / "new" / "out.json", tmp_path / "new" / "predictions.jsonl"
    result = run_main(evaluate_script.main, capsys, "--base", "--checkpoint", str(run),
                      "--model", tiny_model_dir, "--data", str(shared_data_dir),
                      "--precision", "fp32", "--json", str(out),
                      "--predictions", str(predictions))
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    base, tuned = written["results"]
    for row in (base, tuned):
        low, high = row["accuracy_ci"]
        assert low <= row["accuracy"] <= high
        assert 0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 2
    [comparison] = written["comparisons"]
    assert (comparison["a"], comparison["b"]) == ("base", tuned["name"])
    assert comparison["accuracy_difference"] == pytest.approx(tuned["accuracy"] - base["accuracy"])
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(base["n"]))
    labels = np.array([line["label"] for line in lines])
    right = {}
    for name in ("base", tuned["name"]):
        probabilities = np.array([line["probabilities"][name] for line in lines])
        assert probabilities.sum(axis=1) == pytest.approx(np.ones(len(lines)))
        right[name] = probabilities.argmax(axis=1) == labels
    assert all(set(line["probabilities"]) == set(right) for line in lines)
    # The per-review file and the rows agree: the accuracy is the share of argmax hits, and
    # McNemar's p is scipy's exact binomial test of the reviews only one model gets right.
    assert [right[row["name"]].mean() for row in (base, tuned)] == \
        [base["accuracy"], tuned["accuracy"]]
    base_only = int((right["base"] & ~right[tuned["name"]]).sum())
    tuned_only = int((~right["base"] & right[tuned["name"]]).sum())
    assert comparison["discordant"] == [base_only, tuned_only]
    assert base_only + tuned_only > 0  # else the test below proves nothing
    assert comparison["mcnemar_p"] == binomtest(base_only, base_only + tuned_only).pvalue
    printed = result.stdout.splitlines()[-1]
    assert printed.startswith(f"{tuned['name']} vs base: accuracy ")
    assert printed.endswith(("significant at 0.05", "not significant at 0.05"))
    assert ("not significant" in printed) == (comparison["mcnemar_p"] >= 0.05)
