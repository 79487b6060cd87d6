"""Metrics and the comparison table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from evaluate import compute_metrics, format_comparison


def test_metrics_on_known_predictions():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    # predicted:        0  1  0  1  1  0  1  0   -> TN=2 FP=1 FN=2 TP=3
    logits = np.array([[2, 0], [0, 1], [1, 0], [0, 3], [0, 1], [1, 0], [0, 2], [5, 0]],
                      dtype=np.float32)
    metrics = compute_metrics(labels, logits)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert metrics["confusion_matrix"] == [[2, 1], [2, 3]]
    assert metrics["n"] == 8
    predictions = logits.argmax(1)
    assert metrics["precision"] == pytest.approx(precision_score(labels, predictions))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predictions))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predictions))
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert metrics["loss"] == pytest.approx(-log_probs[np.arange(8), labels].mean(), rel=1e-6)


def test_metrics_when_nothing_is_predicted_positive():
    metrics = compute_metrics(np.array([0, 1]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert metrics["accuracy"] == 0.5
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0
    # Mean of -log p(true class): p = e/(e+1) for the negative, 1/(e+1) for the positive.
    expected = (-math.log(math.e / (math.e + 1)) - math.log(1 / (math.e + 1))) / 2
    assert metrics["loss"] == pytest.approx(expected)


def test_comparison_table_shows_both_columns_and_the_change():
    before = {"accuracy": 0.5, "precision": 0.4, "recall": 0.3, "f1": 0.35, "loss": 0.7, "n": 10}
    after = {"accuracy": 0.8, "precision": 0.9, "recall": 0.7, "f1": 0.78, "loss": 0.4, "n": 10}
    lines = format_comparison([("before", before), ("after", after)]).splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    assert lines[2].split() == ["accuracy", "0.5000", "0.8000", "+0.3000"]
    assert lines[6].split() == ["loss", "0.7000", "0.4000", "-0.3000"]
    assert lines[7].split() == ["n", "10", "10"]
