"""Statistics: how sure a result is, how honest its probabilities are, and whether one model
beats another on the same reviews.

* ``wilson_interval``: the 95% Wilson score interval of an accuracy (sound near 0 and 1 and for
  small n, where the normal approximation is not).
* ``expected_calibration_error``, ``brier_score`` and ``reliability_bins`` (the reliability
  diagram's data): does a 0.9 probability mean 90%? (Temperature scaling makes it closer.)
* ``paired_comparison``: two models scored on the same reviews, compared review by review: the
  accuracy difference with a paired bootstrap interval, and the exact McNemar test on the
  reviews where exactly one of them is right. Pairing removes the variation between reviews that
  both models share, so it separates differences an unpaired standard error cannot.
* ``fit_temperature``: temperature scaling. Fine-tuned classifiers are often over-confident: of
  the reviews given 0.95, fewer than 95% are right. Temperature scaling (Guo et al., 2017, "On
  Calibration of Modern Neural Networks") divides every logit by one number T > 0, fitted on
  held-out reviews (the validation split, never the test set) by minimising their
  cross-entropy: T > 1 softens every probability, T < 1 sharpens it. Dividing a row of logits by
  the same positive number keeps its largest logit the largest, so the predicted class, and with
  it accuracy, precision, recall and F1, cannot change; the loss, the expected calibration error
  (ECE) and the Brier score do. train.py fits T after choosing the best checkpoint and stores it
  in the checkpoint folder (``TEMPERATURE_FILE``); evaluate.py and predict.py apply it unless
  ``--no-calibration``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest

from machinery.cli import UsageError
from machinery.files import MANIFEST_FILE, write_json, write_manifest

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


# ---------------------------------------------------------------------------------------------
# Temperature scaling
TEMPERATURE_FILE = "temperature.json"
# The search range. A fit whose loss is no lower than at an end of it found nothing to
# calibrate: typically every validation review was right, and the loss keeps falling as T -> 0
# (each logit multiplied without limit, until the loss underflows to 0). Such a T would make
# every wrong test review a confident one: it is not used.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
UNCALIBRATED = 1.0  # dividing by 1 changes no logit: the model's own probabilities


def scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The logits divided by `temperature` (the same float32 either script computes)."""
    return logits / np.float32(temperature)


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                       temperature: float = UNCALIBRATED) -> float:
    """The loss: mean cross-entropy of softmax(logits / temperature) against `labels`, in
    float64. Every table's "loss" is this, and the temperature fit minimises it."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    return float(F.cross_entropy(scaled, torch.from_numpy(np.asarray(labels)).long()))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the loss of
    softmax(logits / T): a one-dimensional search over log T (Brent's bounded method)."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one scored example")
    result = minimize_scalar(
        lambda log_t: mean_cross_entropy(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)), method="bounded",
        options={"xatol": 1e-6})
    return float(math.exp(result.x))


def calibration_effect(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and loss of `logits` before and after dividing them by `temperature`."""
    raw, scaled = softmax(logits), softmax(scale_logits(logits, temperature))
    return {"ece": {"raw": expected_calibration_error(labels, raw),
                    "calibrated": expected_calibration_error(labels, scaled)},
            "loss": {"raw": mean_cross_entropy(logits, labels),
                     "calibrated": mean_cross_entropy(logits, labels, temperature)}}


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Fit the temperature on a checkpoint's validation logits: {"temperature": T,
    "validation": {"examples": n, "ece": {"raw", "calibrated"}, "loss": {...}}}, and
    "unused_fit" with T = 1 when the fit found no minimum inside its range."""
    fitted = fit_temperature(logits, labels)
    at_edge = min(mean_cross_entropy(logits, labels, end)
                  for end in (MIN_TEMPERATURE, MAX_TEMPERATURE)) <= mean_cross_entropy(
        logits, labels, fitted)
    temperature = UNCALIBRATED if at_edge else fitted
    calibration = {"temperature": temperature, "validation": {
        "examples": len(labels), **calibration_effect(logits, labels, temperature)}}
    if at_edge:
        calibration["unused_fit"] = fitted
    return calibration


def save_temperature(folder: Path, calibration: dict) -> None:
    """Write ``TEMPERATURE_FILE`` into a checkpoint folder: T and what its fit did on the
    validation split (`calibration` as ``fit_calibration`` returns it); the folder's manifest,
    where it has one, is written anew to count it."""
    write_json(Path(folder) / TEMPERATURE_FILE,
               {key: calibration[key] for key in ("temperature", "validation", "unused_fit")
                if key in calibration})
    if (Path(folder) / MANIFEST_FILE).exists():
        write_manifest(Path(folder))


def format_calibration(calibration: dict) -> str:
    """One sentence on the fitted temperature and the ECE before and after it."""
    validation, test = calibration["validation"], calibration.get("test")
    if "unused_fit" in calibration:
        return (f"No temperature: its fit on the {validation['examples']} validation reviews "
                f"found no minimum inside [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] "
                f"(T = {calibration['unused_fit']:.3g}; typically every one of them was right), "
                "so the raw probabilities are kept (T = 1)")
    text = (f"Temperature {calibration['temperature']:.3g}, fitted on "
            f"{validation['examples']} validation reviews: ECE {validation['ece']['raw']:.4f} "
            f"-> {validation['ece']['calibrated']:.4f} there")
    if test:
        text += f", {test['ece']['raw']:.4f} -> {test['ece']['calibrated']:.4f} on the test reviews"
    return text + " (accuracy unchanged: one positive divisor keeps every review's top class)"


def checkpoint_temperature(folder: Path) -> float | None:
    """The temperature stored with a checkpoint; None for one saved without (an older run, or
    a checkpoint copied without its ``TEMPERATURE_FILE``)."""
    path = Path(folder) / TEMPERATURE_FILE
    if not path.is_file():
        return None
    try:
        temperature = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path} is damaged ({error!r}); delete it to use the model's raw "
                         "probabilities, or run train.py again") from error
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise UsageError(f"{path} holds temperature {temperature}, outside "
                         f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]; delete it or train again")
    return temperature


def temperature_to_apply(folder: Path, calibrate: bool) -> float:
    """The temperature evaluate.py and predict.py divide a checkpoint's logits by: the stored
    one, or UNCALIBRATED under --no-calibration or when none is stored."""
    if not calibrate:
        return UNCALIBRATED
    stored = checkpoint_temperature(folder)
    return UNCALIBRATED if stored is None else stored


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    """--no-calibration, for evaluate.py and predict.py."""
    parser.add_argument("--no-calibration", dest="calibrate", action="store_false",
                        help=f"show the model's raw probabilities: do not divide the logits by "
                             f"the temperature train.py fitted on the validation split "
                             f"({TEMPERATURE_FILE} in the checkpoint). Predicted classes, "
                             f"accuracy and F1 are the same either way; loss, ECE, Brier and "
                             f"the probabilities change")
