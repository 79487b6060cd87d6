"""--pooling: the head over BERT's [CLS] pooler, or over the mean of the token vectors, chosen
by what the checkpoint was trained for (a sentence-transformers model declares mean pooling),
recorded in every checkpoint and used by evaluate.py, predict.py and merge without being told;
and the warning when training leaves a class that is never predicted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from transformers import AutoModelForSequenceClassification, RobertaConfig

import evaluate
import predict
import train
from lora_model import (
    MeanPoolingBertForSequenceClassification,
    load_base_model,
    load_checkpoint,
    merge_adapter,
    pooling_of,
    resolve_pooling,
)
from machinery.checkpoints import ADAPTER_DIR, POOLING_FILE, checkpoint_pooling
from machinery.cli import UsageError
from machinery.hub import declared_pooling

TEXTS = ["A wonderful film, I loved it.", "Dull and far too long.", "Fine."]


def sentence_transformers_folder(model_dir: str, folder: Path, mean: bool = True) -> str:
    """A copy of a BERT model folder that declares sentence-transformers pooling, as
    all-MiniLM-L6-v2's folder does (modules.json and 1_Pooling/config.json)."""
    shutil.copytree(model_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": not mean,
         "pooling_mode_mean_tokens": mean}))
    return str(folder)


@pytest.fixture(scope="module")
def mean_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT, declaring mean pooling."""
    return sentence_transformers_folder(tiny_model_dir, tmp_path_factory.mktemp("st") / "model")


def test_auto_reads_what_the_checkpoint_declares(tiny_model_dir, mean_model_dir, tmp_path):
    cls_folder = sentence_transformers_folder(tiny_model_dir, tmp_path / "cls", mean=False)
    assert declared_pooling(mean_model_dir) == "mean"
    assert declared_pooling(cls_folder) == "cls"
    assert declared_pooling(tiny_model_dir) is None  # no sentence-transformers files
    assert resolve_pooling("auto", mean_model_dir) == "mean"
    assert resolve_pooling("auto", cls_folder) == "cls"
    assert resolve_pooling("auto", tiny_model_dir) == "cls"  # bert-base-uncased's case
    assert resolve_pooling("mean", tiny_model_dir) == "mean"  # asked for: always obeyed
    assert resolve_pooling("cls", mean_model_dir) == "cls"


def test_mean_pooling_is_refused_for_other_than_bert(tmp_path):
    RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"--pooling mean: --model .* is a 'roberta' model"):
        resolve_pooling("mean", str(tmp_path))


def test_the_head_reads_the_mean_of_the_real_tokens(mean_model_dir):
    """Logits = classifier(mean of the unpadded token vectors): by hand, and the same however
    much padding the batch adds."""
    model = load_base_model(mean_model_dir).eval()
    assert isinstance(model, MeanPoolingBertForSequenceClassification)
    assert model.bert.pooler is None and pooling_of(model) == "mean"
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        hidden = model.bert(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        by_hand = model.classifier(hidden.mean(dim=1))
        padded = torch.cat([ids, torch.zeros((1, 10), dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros((1, 10), dtype=torch.long)], dim=1)
        padded_logits = model(input_ids=padded, attention_mask=mask).logits
    assert torch.allclose(logits, by_hand, atol=1e-6)
    assert torch.allclose(logits, padded_logits, atol=1e-5)


@pytest.fixture(scope="module")
def mean_run(mean_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    """A finished LoRA run of the tiny BERT that declares mean pooling (--pooling auto)."""
    folder = tmp_path_factory.mktemp("mean") / "run"
    assert train.main(["--model", mean_model_dir, "--data", str(shared_data_dir),
                       "--output-dir", str(folder), "--batch-size", "4",
                       "--validation-size", "4", "--lr", "1e-2", "--precision", "fp32"]) == 0
    return folder


def test_the_checkpoint_records_its_pooling_and_evaluate_uses_it(mean_run, shared_data_dir,
                                                                  tmp_path, capsys):
    adapter = mean_run / ADAPTER_DIR
    assert json.loads((adapter / POOLING_FILE).read_text()) == {"pooling": "mean"}
    assert checkpoint_pooling(adapter) == "mean"
    model, _ = load_checkpoint(mean_run)
    assert pooling_of(model) == "mean"
    # evaluate.py reproduces the run's after row without being told the pooling.
    out = tmp_path / "eval.json"
    assert run_main(evaluate.main, capsys, "--checkpoint", str(mean_run), "--data",
                    str(shared_data_dir), "--precision", "fp32", "--json",
                    str(out)).returncode == 0
    after = json.loads((mean_run / "metrics.json").read_text())["after"]
    row = json.loads(out.read_text())["results"][0]
    assert (row["accuracy"], row["loss"]) == (after["accuracy"], after["loss"])


def test_a_merged_mean_pooling_model_predicts_the_same(mean_run, tmp_path, capsys):
    """merge keeps the pooling (pooling.json beside the weights): predict.py gives the merged
    folder's labels and probabilities as the run's; a stock transformers load, which knows only
    BERT's [CLS] head, would not, which is why docs/reference.md says to load such a model with
    lora_model.load_merged_model (or predict.py)."""
    merged = merge_adapter(mean_run, tmp_path / "merged")
    assert checkpoint_pooling(merged) == "mean"
    results = []
    for folder in (mean_run, merged):
        args = predict.build_parser().parse_args(["--checkpoint", str(folder),
                                                  "--precision", "fp32", *TEXTS])
        results.append(predict.run(args))
    for a, b in zip(*results, strict=True):
        assert a.label == b.label
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    ours = load_checkpoint(merged)[0].eval()(input_ids=ids).logits
    stock = AutoModelForSequenceClassification.from_pretrained(merged).eval()(input_ids=ids).logits
    assert not torch.allclose(ours, stock, atol=1e-4)


def test_a_class_never_predicted_is_named_with_its_count():
    labels = np.array([0, 0, 1, 1, 2])
    logits = np.array([[5, 0, 0], [5, 0, 0], [0, 0, 5], [5, 0, 0], [0, 0, 5]], dtype=np.float32)
    scores = evaluate.Scores({}, logits, labels, 1.0)
    assert evaluate.never_predicted(scores, ("bad", "ok", "good")) == [
        "no ok review (2 of the 5 are ok)"]
    logits[3] = [0, 5, 0]
    assert evaluate.never_predicted(scores, ("bad", "ok", "good")) == []


def test_training_warns_when_a_class_is_never_predicted(tiny_model_dir, shared_data_dir,
                                                        tmp_path, capsys, monkeypatch):
    """A model that predicts one class for every validation review: train.py says so in one
    line per class, naming it and its count there."""
    def one_class(*args, **kwargs) -> evaluate.Scores:
        scores = real_score_model(*args, **kwargs)
        scores.logits[:] = [0.0, 1.0]  # every review: positive
        return scores

    real_score_model = evaluate.score_model
    monkeypatch.setattr(evaluate, "score_model", one_class)
    result = run_main(train.main, capsys, "--model", tiny_model_dir, "--data",
                      str(shared_data_dir), "--output-dir", str(tmp_path / "run"),
                      "--batch-size", "4", "--validation-size", "4")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the fine-tuned model predicts no negative review (2 of the 4 "
                        "are negative): that class collapsed into others (docs/reference.md: "
                        "the pooling)"]
