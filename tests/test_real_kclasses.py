"""K classes learn (issue 33), with the pre-trained MiniLM and real text: IMDB's negative and
positive reviews and technical paragraphs (benchmarks/kclass_set.py). With a head over MiniLM's
[CLS] pooler, which it never trained, one epoch puts every negative and positive review into
one class (docs/results.md); --pooling auto reads the token mean MiniLM was trained for, and
every class must be learned. A return of the collapse fails here. evaluate.py reproduces the
run's after row of three classes to the last digit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import IMDB_DIR, minilm_path, run_main

import evaluate
import train
from benchmarks import kclass_set

pytestmark = pytest.mark.real_data

# Small enough for the suite (about 1.5 minutes of training on 2 cores), large enough that the
# collapse shows with [CLS] (0.667 accuracy, one class never predicted) and mean pooling
# learns all three (0.80 accuracy, macro-F1 0.79, every class predicted 25 times or more).
TRAIN_PER_CLASS, TEST_PER_CLASS = 300, 50


@pytest.fixture(autouse=True)
def machine_threads():
    """Train with the machine's own thread count (the suite's workers run one torch thread
    each: conftest); the suite's setting comes back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(previous)


def test_three_classes_are_all_learned_with_the_pooling_minilm_was_trained_for(tmp_path,
                                                                               capsys):
    data = tmp_path / "kclass"
    kclass_set.build(IMDB_DIR, data, TRAIN_PER_CLASS, TEST_PER_CLASS)
    run = tmp_path / "run"
    flags = ["--data", str(data), "--precision", "fp32"]  # fp32: no emulated bf16 on AVX2
    result = run_main(train.main, capsys, "--model", minilm_path(), *flags, "--lr", "2e-3",
                      "--output-dir", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a head over the token mean" in result.stdout
    assert "collapsed" not in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    after = metrics["after"]
    assert list(after["per_class"]) == list(kclass_set.CLASSES)
    predicted = [sum(column) for column in zip(*after["confusion_matrix"], strict=True)]
    assert min(predicted) >= TEST_PER_CLASS // 5  # every class, not a stray review of it
    assert after["macro_f1"] >= 0.7 > metrics["before"]["macro_f1"]
    assert after["per_class"]["technical"]["f1"] >= 0.95  # another kind of text entirely
    out = tmp_path / "out.json"
    result = run_main(evaluate.main, capsys, "--checkpoint", str(run), *flags, "--json",
                      str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(out.read_text())["results"]
    assert {key: row[key] for key in after} == after
