"""Statistics that decide a comparison: how sure an accuracy is, how honest the probabilities
are, and whether one model beats another on the same reviews.

* ``wilson_interval``: the 95% Wilson score interval of an accuracy (sound near 0 and 1 and for
  small n, where the normal approximation is not).
* ``expected_calibration_error``, ``brier_score`` and ``reliability_bins`` (the reliability
  diagram's data): does a 0.9 probability mean 90%? (temperature.py makes it closer to it.)
* ``paired_comparison``: two models scored on the same reviews, compared review by review: the
  accuracy difference with a paired bootstrap interval, and the exact McNemar test on the
  reviews where exactly one of them is right. Pairing removes the variation between reviews that
  both models share, so it separates differences an unpaired standard error cannot.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%
CALIBRATION_BINS = 15  # equal-width bins of the top-class probability (Guo et al., 2017)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the interval repeats exactly from run to run
BOOTSTRAP_CHUNK = 500  # resamples drawn at a time: bounded memory for large test sets
SIGNIFICANCE_LEVEL = 0.05


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits do not overflow."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def wilson_interval(correct: int, n: int, z: float = Z_95) -> list[float]:
    """[low, high] of the Wilson score interval for `correct` successes in `n` trials."""
    if n == 0:
        return [0.0, 1.0]
    share = correct / n
    center = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(center - half), float(center + half)]


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray,
                     bins: int = CALIBRATION_BINS) -> list[dict]:
    """The reliability diagram's data: for each non-empty equal-width bin of the top-class
    probability, its range, its review count, and the accuracy and mean confidence in it."""
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "n": int(members.sum()),
             "accuracy": float(correct[members].mean()),
             "confidence": float(confidence[members].mean())}
            for b in range(bins) if (members := which == b).any()]


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """Sum over equal-width bins of the top-class probability of
    |accuracy_b - confidence_b| * n_b / n."""
    return float(sum(abs(b["accuracy"] - b["confidence"]) * b["n"]
                     for b in reliability_bins(labels, probabilities, bins)) / len(labels))


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean over reviews of sum over classes of (p_c - [c = label])^2."""
    truth = np.eye(probabilities.shape[1])[labels]
    return float(((probabilities - truth) ** 2).sum(axis=1).mean())


def interval_and_calibration(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """The statistics of one result beside its metrics: accuracy_ci, ece, brier and the
    reliability bins."""
    correct = int((probabilities.argmax(axis=-1) == labels).sum())
    return {"accuracy_ci": wilson_interval(correct, len(labels)),
            "ece": expected_calibration_error(labels, probabilities),
            "brier": brier_score(labels, probabilities),
            "reliability": reliability_bins(labels, probabilities)}


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar test: a binomial test of the discordant pairs (1.0 with none)."""
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def bootstrap_difference_interval(a_correct: np.ndarray, b_correct: np.ndarray,
                                  resamples: int = BOOTSTRAP_RESAMPLES,
                                  seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95% percentile interval of accuracy(b) - accuracy(a) over reviews resampled with
    replacement, the same reviews for both models (a paired bootstrap)."""
    difference = b_correct.astype(np.float64) - a_correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        rows = min(BOOTSTRAP_CHUNK, resamples - start)
        picks = rng.integers(0, len(difference), size=(rows, len(difference)))
        means.append(difference[picks].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return [float(low), float(high)]


def paired_comparison(a: str, b: str, labels: np.ndarray, a_probabilities: np.ndarray,
                      b_probabilities: np.ndarray) -> dict:
    """Model `b` against model `a` on the same reviews (see the module's docstring)."""
    a_correct = a_probabilities.argmax(axis=-1) == labels
    b_correct = b_probabilities.argmax(axis=-1) == labels
    a_only, b_only = int((a_correct & ~b_correct).sum()), int((~a_correct & b_correct).sum())
    return {"a": a, "b": b,
            "accuracy_difference": float(b_correct.mean() - a_correct.mean()),
            "difference_ci": bootstrap_difference_interval(a_correct, b_correct),
            "mcnemar_p": mcnemar_p(a_only, b_only),
            "discordant": [a_only, b_only]}


def format_comparisons(rows: list[dict], comparisons: list[dict]) -> str:
    """Each result's accuracy interval and calibration, then each comparison in words."""
    lines = [f"{row['name']}: accuracy 95% CI [{row['accuracy_ci'][0]:.4f}, "
             f"{row['accuracy_ci'][1]:.4f}], ECE {row['ece']:.4f}, Brier {row['brier']:.4f}"
             for row in rows]
    for c in comparisons:
        verdict = ("significant" if c["mcnemar_p"] < SIGNIFICANCE_LEVEL else "not significant")
        low, high = c["difference_ci"]
        lines.append(
            f"{c['b']} vs {c['a']}: accuracy {c['accuracy_difference']:+.4f} (paired 95% CI "
            f"{low:+.4f} to {high:+.4f}); McNemar p = {c['mcnemar_p']:.3g} on "
            f"{sum(c['discordant'])} reviews where one is right: {verdict} at "
            f"{SIGNIFICANCE_LEVEL:g}")
    return "\n".join(lines)
