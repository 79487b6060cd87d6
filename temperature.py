"""Temperature scaling: one number that makes a classifier's probabilities honest.

Fine-tuned classifiers are often over-confident: of the reviews given 0.95, fewer than 95% are
right. Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks")
divides every logit by one number T > 0, fitted on held-out reviews (the validation split,
never the test set) by minimising their cross-entropy: T > 1 softens every probability, T < 1
sharpens it. Dividing a row of logits by the same positive number keeps its largest logit the
largest, so the predicted class, and with it accuracy, precision, recall and F1, cannot change;
the loss, the expected calibration error (ECE) and the Brier score do.

train.py fits T after choosing the best checkpoint and stores it in the checkpoint folder
(``TEMPERATURE_FILE``); evaluate.py and predict.py apply it unless ``--no-calibration``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from cli import UsageError
from comparison import expected_calibration_error, softmax
from files import write_json

TEMPERATURE_FILE = "temperature.json"
# The search range: far outside it a model is either useless or the fit is fooled by a tiny
# validation split on which every review is right (the NLL then keeps falling as T -> 0).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
UNCALIBRATED = 1.0  # dividing by 1 changes no logit: the model's own probabilities


def scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The logits divided by `temperature` (the same float32 either script computes)."""
    return logits / np.float32(temperature)


def mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = UNCALIBRATED) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against `labels`, in float64."""
    log_probabilities = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the mean NLL of
    softmax(logits / T): a one-dimensional search over log T (Brent's bounded method)."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one scored example")
    result = minimize_scalar(lambda log_t: mean_nll(logits, labels, math.exp(log_t)),
                             bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
                             method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def calibration_effect(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and NLL of `logits` before and after dividing them by `temperature`."""
    raw, scaled = softmax(logits), softmax(scale_logits(logits, temperature))
    return {"ece": {"raw": expected_calibration_error(labels, raw),
                    "calibrated": expected_calibration_error(labels, scaled)},
            "nll": {"raw": mean_nll(logits, labels),
                    "calibrated": mean_nll(logits, labels, temperature)}}


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Fit the temperature on a checkpoint's validation logits: {"temperature": T,
    "validation": {"examples": n, "ece": {"raw", "calibrated"}, "nll": {...}}}."""
    temperature = fit_temperature(logits, labels)
    return {"temperature": temperature, "validation": {
        "examples": len(labels), **calibration_effect(logits, labels, temperature)}}


def save_temperature(folder: Path, calibration: dict) -> None:
    """Write ``TEMPERATURE_FILE`` into a checkpoint folder: T and what its fit did on the
    validation split (`calibration` as ``fit_calibration`` returns it)."""
    write_json(Path(folder) / TEMPERATURE_FILE, {
        "temperature": calibration["temperature"], "validation": calibration["validation"]})


def format_calibration(calibration: dict) -> str:
    """One sentence on the fitted temperature and the ECE before and after it."""
    validation, test = calibration["validation"], calibration.get("test")
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
