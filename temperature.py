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
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from cli import UsageError
from comparison import expected_calibration_error, softmax
from files import write_json

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
    validation split (`calibration` as ``fit_calibration`` returns it)."""
    write_json(Path(folder) / TEMPERATURE_FILE,
               {key: calibration[key] for key in ("temperature", "validation", "unused_fit")
                if key in calibration})


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
