"""End to end on real data: the pre-trained MiniLM fine-tuned on 2,000 IMDB reviews.

These tests fail (they do not skip) when ../shared/data/imdb is missing: CI must run them.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMDB_DIR, minilm_path, run_script
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from data import PaddingCollator, load_split, make_loader, take_subset, tokenize
from evaluate import predict_logits
from lora_model import load_adapted_model, load_tokenizer

pytestmark = pytest.mark.real_data

TRAIN_SAMPLES, EVAL_SAMPLES = 2000, 1000


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The README's smoke command: MiniLM, 2,000 train / 1,000 test reviews, lr 2e-3."""
    assert IMDB_DIR.is_dir(), f"the real-data tests need the IMDB Parquet files in {IMDB_DIR}"
    run = tmp_path_factory.mktemp("real") / "smoke"
    result = run_script("train.py", "--model", minilm_path(), "--data", str(IMDB_DIR),
                        "--train-samples", str(TRAIN_SAMPLES),
                        "--eval-samples", str(EVAL_SAMPLES), "--lr", "2e-3",
                        "--output-dir", str(run), timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_fine_tuning_lifts_accuracy_from_chance(smoke_run):
    run, result = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"]["n"] == metrics["after"]["n"] == EVAL_SAMPLES
    assert 0.40 <= metrics["before"]["accuracy"] <= 0.60  # a random head guesses
    assert metrics["after"]["accuracy"] >= 0.78
    assert metrics["after"]["f1"] >= 0.75
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert f"{metrics['after']['accuracy']:.4f}" in result.stdout


def test_evaluate_reproduces_both_rows_exactly(smoke_run, tmp_path):
    run, _ = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "out.json"
    result = run_script("evaluate.py", "--base", "--checkpoint", str(run), "--data",
                        str(IMDB_DIR), "--eval-samples", str(EVAL_SAMPLES), "--json", str(out),
                        timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    base, adapted = json.loads(out.read_text())["results"]
    for row, expected in ((base, metrics["before"]), (adapted, metrics["after"])):
        assert {k: row[k] for k in expected} == expected


def test_stock_peft_loading_gives_the_same_predictions(smoke_run):
    run, _ = smoke_run
    tokenizer = load_tokenizer(minilm_path())
    test = take_subset(load_split(str(IMDB_DIR), "test"), EVAL_SAMPLES, seed=0).select(range(64))
    cpu = torch.device("cpu")
    loader = make_loader(tokenize(test, tokenizer, 128), 32,
                         PaddingCollator(tokenizer.pad_token_id, cpu), shuffle=False)
    ours, labels = predict_logits(load_adapted_model(run), loader, cpu, "fp32")
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    stock = PeftModel.from_pretrained(base, run / "adapter")
    theirs, _ = predict_logits(stock, loader, cpu, "fp32")
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert abs(ours - theirs).max() < 1e-4
    assert (ours.argmax(1) == labels).mean() > 0.7
