"""The user's data, as the user sees it: the class counts of every split, printed and recorded;
a label typo refused with the counts; a test split of one class named; predictions that join
back to the user's rows; and a base model that is not the checkpoint's, refused or named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import NEGATIVE, POSITIVE, reviews, run_main, save_random_adapter
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import evaluate
import predict
import train
from machinery.checkpoints import ADAPTER_DIR


def train_flags(model: str, data: Path, folder: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data", str(data), "--output-dir", str(folder),
            "--batch-size", "4", "--validation-size", "4", "--precision", "fp32", *extra]


def test_every_run_prints_and_records_its_class_counts(tiny_model_dir, shared_data_dir,
                                                       tmp_path, capsys):
    run = tmp_path / "run"
    result = run_main(train.main, capsys, *train_flags(tiny_model_dir, shared_data_dir, run))
    assert result.returncode == 0, result.stderr
    # 24 training reviews (12 of each), 4 carved out for validation, 16 test reviews.
    assert ("Classes (training / validation / test reviews): negative 10 / 2 / 8, "
            "positive 10 / 2 / 8") in result.stdout
    counts = json.loads((run / "config.json").read_text())["class_counts"]
    assert counts == {"train": {"negative": 10, "positive": 10},
                      "validation": {"negative": 2, "positive": 2},
                      "test": {"negative": 8, "positive": 8}}
    assert "| training | 20 | 10 | 10 |" in (run / "report.md").read_text()


def test_a_typo_in_a_label_is_refused_with_the_counts(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    train_rows = reviews(12).to_pandas()
    train_rows["label"] = train_rows["label"].map({0: "negative", 1: "positive"})
    train_rows.loc[[1, 3], "label"] = "postive"  # a typo, on two rows
    train_rows.to_csv(data / "train.csv", index=False)
    reviews(8).to_csv(data / "test.csv", index=False)
    run = tmp_path / "run"
    result = run_main(train.main, capsys, *train_flags(tiny_model_dir, data, run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "the training data holds negative 10, positive 12, postive 2 reviews: postive has "
        "fewer than 5, which is most often a typo in a label; fix the labels, or pass "
        "--min-class-examples 2 to train on it")
    assert not run.exists()
    # Allowed by the flag, it trains three classes.
    result = run_main(train.main, capsys, *train_flags(tiny_model_dir, data, run,
                                                       "--min-class-examples", "2"))
    assert result.returncode == 0, result.stderr
    counts = json.loads((run / "config.json").read_text())["class_counts"]["train"]
    assert set(counts) == {"negative", "positive", "postive"}


def test_a_test_split_of_one_class_is_named(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    reviews(12).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"text": POSITIVE, "label": [1] * len(POSITIVE)}).to_csv(
        data / "test.csv", index=False)
    result = run_main(train.main, capsys, *train_flags(tiny_model_dir, data, tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    warning = (f"warning: every review of {data / 'test.csv'} is positive: accuracy is the share "
               "predicted positive; precision, recall and F1, which weigh classes against each "
               "other, mean nothing there")
    assert warning in result.stderr.splitlines()
    result = run_main(evaluate.main, capsys, "--checkpoint", str(tmp_path / "run"), "--data",
                      str(data), "--precision", "fp32")
    assert result.returncode == 0 and warning in result.stderr.splitlines()


def test_predictions_join_back_to_the_users_rows(tiny_model_dir, tmp_path, capsys):
    """Each --predictions line carries the review's row in the test file and the file's id
    column, so that it joins back whatever subset --eval-samples drew."""
    data = tmp_path / "data"
    data.mkdir()
    reviews(12).to_csv(data / "train.csv", index=False)
    test = reviews(8).to_pandas()
    test.insert(0, "id", [f"review-{i}" for i in range(len(test))])
    test.to_csv(data / "test.csv", index=False)
    adapter = tmp_path / "adapter"
    save_random_adapter(tiny_model_dir, adapter)
    out = tmp_path / "predictions.jsonl"
    result = run_main(evaluate.main, capsys, "--checkpoint", str(adapter), "--data", str(data),
                      "--eval-samples", "6", "--predictions", str(out), "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(6))
    assert len({line["row"] for line in lines}) == 6
    for line in lines:
        assert line["id"] == f"review-{line['row']}"
        assert line["label"] == test["label"][line["row"]]


def model_of_depth(tiny_model_dir: str, folder: Path, layers: int) -> str:
    """A random BERT as wide as the tiny one, with its vocabulary, and `layers` layers."""
    config = BertConfig.from_pretrained(tiny_model_dir, num_hidden_layers=layers)
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("layers", [1, 3])
def test_an_adapter_on_a_model_of_another_depth_is_refused(tiny_model_dir, shared_data_dir,
                                                           tmp_path, capsys, layers):
    """peft would load a 2-layer adapter into a 1- or 3-layer BERT of the same width and
    vocabulary without a word (skipping or zeroing the weights that do not fit)."""
    adapter = tmp_path / "adapter"
    save_random_adapter(tiny_model_dir, adapter)
    other = model_of_depth(tiny_model_dir, tmp_path / "other", layers)
    for script, extra in ((evaluate.main, ["--data", str(shared_data_dir)]),
                          (predict.main, ["Fine."])):
        result = run_main(script, capsys, "--checkpoint", str(adapter), "--model", other,
                          *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert f"the adapter in {adapter} does not fit --model {other}" in line
        assert "another architecture or depth than" in line and tiny_model_dir in line


def test_another_base_model_of_the_same_shape_is_named_and_used(tiny_model_dir, tmp_path,
                                                                capsys):
    adapter = tmp_path / "adapter"
    expected = save_random_adapter(tiny_model_dir, adapter)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")  # moved, say
    result = run_main(predict.main, capsys, "--checkpoint", str(adapter), "--model", str(copy),
                      "--precision", "fp32", "--json", NEGATIVE[0])
    assert result.returncode == 0, result.stderr
    assert (f"warning: --model {copy} is not the model the checkpoint in {adapter} was trained "
            f"on ({tiny_model_dir})") in result.stderr
    # ... and it is used: the same probabilities as the adapter on its own base model.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.inference_mode():
        logits = expected(**tokenizer([NEGATIVE[0]], return_tensors="pt")).logits
    probability = torch.softmax(logits, dim=-1).max().item()
    assert json.loads(result.stdout)["probability"] == pytest.approx(probability, abs=1e-5)
    assert (adapter / ADAPTER_DIR).exists() is False  # an adapter folder, not a run folder
