"""Any labelled text: the classes come from the training data (or --labels), any number of them,
and every script that touches labels follows: training, metrics, checkpoints, evaluate.py,
predict.py, merge, report, resume and torchrun. IMDB's two classes keep their meaning.

Tiny random BERTs here (the names and numbers are what is checked, not how well they learn);
test_real_data.py trains the pre-trained MiniLM on three kinds of real text.
"""

from __future__ import annotations

import json
from pathlib import Path

import interrupt_train
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_forked, run_main
from datasets import ClassLabel, Dataset, Features, Value
from safetensors.torch import load_file
from sklearn.metrics import classification_report
from test_distributed import read_log, train_in_ranks
from transformers import AutoConfig, BertConfig, BertForSequenceClassification

import evaluate as evaluate_script
import lora_model
import predict as predict_script
import train as train_script
from data import PaddingCollator, make_loader, tokenize
from evaluate import compute_metrics, predict_in_order
from machinery.cli import UsageError
from machinery.data_sources import (
    BINARY_LABEL_NAMES,
    label_names_for,
    load_split,
    normalize_columns,
)
from machinery.stats import checkpoint_temperature

CPU = torch.device("cpu")
# Support tickets in three queues, with their own column names: string labels, sorted to ids.
QUEUES = {
    "billing": ["I was charged twice for my invoice", "Please refund the extra payment",
                "My card was billed after I cancelled", "The invoice shows the wrong amount"],
    "bug": ["The app crashes when I press save", "Login fails with an error message",
            "The page stays blank after the update", "Export breaks on large files"],
    "praise": ["Thank you, the new design is wonderful", "Great support, you solved it fast",
               "I love the dark mode, well done", "Your team is brilliant and kind"],
}
NAMES = tuple(sorted(QUEUES))  # ("billing", "bug", "praise")
FLAGS = ["--text-column", "message", "--label-column", "queue", "--epochs", "2",
         "--batch-size", "4", "--lr", "5e-3", "--lora-dropout", "0", "--precision", "fp32",
         "--validation-size", "6", "--log-every", "1", "--eval-batch-size", "8"]


def tickets(n_per_class: int, labels: dict[str, object] | None = None) -> pd.DataFrame:
    """`n_per_class` tickets of each queue, interleaved; `labels` maps a queue to its label."""
    rows = [{"message": f"{QUEUES[queue][i % 4]} (ticket {i})",
             "queue": (labels or {}).get(queue, queue)}
            for i in range(n_per_class) for queue in QUEUES]
    return pd.DataFrame(rows)


def write_tickets(folder: Path, labels: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tickets(10, labels).to_csv(folder / "train.csv", index=False)
    tickets(4, labels).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def three_queues(tiny_model_dir, tmp_path_factory) -> dict:
    """One finished run on three string classes: its folder and its data."""
    root = tmp_path_factory.mktemp("queues")
    data = write_tickets(root / "data")
    run = root / "run"
    assert train_script.main(["--model", tiny_model_dir, "--data", str(data),
                              "--output-dir", str(run), *FLAGS]) == 0
    return {"root": root, "data": data, "run": run, "model": tiny_model_dir}


# --- which classes ----------------------------------------------------------------------


@pytest.mark.parametrize(("values", "given", "expected"), [
    ([0, 1, 1], None, BINARY_LABEL_NAMES),  # IMDB's meaning, exactly as before
    (["pos", "NEG", " negative "], None, BINARY_LABEL_NAMES),
    ([2, 0, 1, 2], None, ("0", "1", "2")),  # integer ids 0..K-1
    (["bug", "billing", "praise", "bug"], None, NAMES),  # strings, sorted
    (["bug", "billing", "praise"], ("praise", "bug", "billing"), ("praise", "bug", "billing")),
    ([1, 0, 2], ("low", "mid", "high"), ("low", "mid", "high")),  # ids named by --labels
    (["1", "0", "2"], ("low", "mid", "high"), ("low", "mid", "high")),  # ids written as text
    (["1", "0", "2"], None, ("0", "1", "2")),
    (["neg", "pos"], BINARY_LABEL_NAMES, BINARY_LABEL_NAMES),  # --labels negative,positive
])
def test_the_training_labels_decide_the_classes(values, given, expected):
    assert label_names_for(values, "train.csv", given) == expected


@pytest.mark.parametrize("names", [["unacceptable", "acceptable"], ["1", "2"],
                                   ["sports", "world", "business"]])
def test_a_class_label_column_keeps_its_own_names_and_ids(names):
    """Hub datasets store ids with names (yelp_polarity's are "1", "2"; CoLA's put
    unacceptable first): the names and their order are the data's, not sorted."""
    raw = Dataset.from_dict({"text": [f"text {i}" for i in range(2 * len(names))],
                             "label": [i % len(names) for i in range(2 * len(names))]},
                            features=Features({"text": Value("string"),
                                               "label": ClassLabel(names=names)}))
    split = normalize_columns(raw)
    assert split.features["label"].names == names
    assert split["label"] == raw["label"]


@pytest.mark.parametrize(("values", "given", "phrase"), [
    ([0, 2, 2], None, "the classes '1' have no example in train.csv"),
    (["bug", "bug"], None, "hold one class ('bug')"),
    (["bug", "praise"], ("billing", "bug", "praise"), "the classes 'billing' have no example"),
    ([0, 1, 3], ("a", "b"), "--labels names 2 classes, but the labels of train.csv go up to id 3"),
    ([0, -1], None, "include -1"),
])
def test_classes_without_examples_are_refused(values, given, phrase):
    with pytest.raises(UsageError) as error:
        label_names_for(values, "train.csv", given)
    assert phrase in str(error.value)


def test_a_test_label_the_training_data_does_not_know_is_refused_naming_it(
        tiny_model_dir, tmp_path, capsys):
    data = write_tickets(tmp_path / "data")
    test = tickets(4)
    test.loc[5, "queue"] = "sales"
    test.to_csv(data / "test.csv", index=False)
    result = run_main(train_script.main, capsys, "--model", tiny_model_dir, "--data", str(data),
                      "--output-dir", str(tmp_path / "run"), *FLAGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "1 labels of" in message and "row 5: 'sales'" in message
    assert "billing, bug, praise" in message
    assert not (tmp_path / "run").exists()


def test_the_split_encodes_names_as_ids_in_their_order(tmp_path):
    data = write_tickets(tmp_path)
    split = load_split(str(data), "test", "message", "queue")
    assert split.features["label"].names == list(NAMES)
    assert split.column_names == ["text", "label", "row"]  # no id column in the file
    assert split["label"][:3] == [NAMES.index(queue) for queue in QUEUES]
    assert split["row"] == list(range(len(split)))


# --- a run on three classes ---------------------------------------------------------------


def test_three_classes_train_with_k_outputs_and_keep_their_names(three_queues):
    run = three_queues["run"]
    assert json.loads((run / "adapter" / lora_model.LABELS_FILE).read_text()) == list(NAMES)
    model, _ = lora_model.load_checkpoint(run)
    assert lora_model.label_names_of(model) == NAMES
    assert model.config.num_labels == 3
    metrics = json.loads((run / "metrics.json").read_text())
    for row in (metrics["before"], metrics["after"]):
        assert row["n"] == 12
        assert np.array(row["confusion_matrix"]).shape == (3, 3)
        assert list(row["per_class"]) == list(NAMES)
        assert "f1" not in row and {"macro_f1", "weighted_f1"} <= row.keys()
    report = (run / "report.md").read_text()
    assert "After, per class:" in report and "| praise |" in report


def test_k_class_metrics_are_scikit_learns_on_the_same_predictions(three_queues):
    assert_metrics_are_scikit_learns(three_queues["run"], three_queues["data"], NAMES)


def test_evaluate_reproduces_the_run_and_refuses_checkpoints_of_other_classes(
        three_queues, tmp_path, capsys):
    run, data = three_queues["run"], three_queues["data"]
    out = tmp_path / "out.json"
    result = run_main(evaluate_script.main, capsys, "--base", "--checkpoint", str(run), "--data",
                      str(data), "--text-column", "message", "--label-column", "queue",
                      "--precision", "fp32", "--eval-batch-size", "8",
                      "--json", str(out), "--plot", str(tmp_path / "plot.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    metrics = json.loads((run / "metrics.json").read_text())
    for row, expected in zip(rows, (metrics["before"], metrics["after"]), strict=True):
        assert {key: row[key] for key in expected} == expected
    assert "per class:" in result.stdout and "praise" in result.stdout
    # A binary checkpoint beside it: different classes, one sentence.
    binary = tmp_path / "binary"
    base = lora_model.load_base_model(three_queues["model"])
    lora_model.save_checkpoint(lora_model.wrap_with_lora(base, r=4, alpha=8, dropout=0.0,
                                                          targets="query,value"),
                               lora_model.load_tokenizer(three_queues["model"]),
                               binary, "lora")
    result = run_main(evaluate_script.main, capsys, "--checkpoint", str(run), "--checkpoint",
                      str(binary), "--data", str(data), "--text-column", "message",
                      "--label-column", "queue")
    assert result.returncode == 2
    assert "trained on different classes (billing, bug, praise; negative, positive)" in \
        result.stderr


def test_predict_prints_the_class_names_and_all_k_probabilities(three_queues, capsys):
    result = run_main(predict_script.main, capsys, "--checkpoint", str(three_queues["run"]),
                      "--json", "My card was billed twice", "The app crashes")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert list(line["probabilities"]) == list(NAMES)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0)
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)


def test_a_merged_model_shows_the_names_in_plain_transformers(three_queues, tmp_path):
    merged = lora_model.merge_adapter(three_queues["run"], tmp_path / "merged")
    config = AutoConfig.from_pretrained(merged)
    assert [config.id2label[i] for i in range(3)] == list(NAMES)
    assert lora_model.checkpoint_label_names(merged) == NAMES
    model = lora_model.load_merged_model(merged)
    adapted, tokenizer = lora_model.load_checkpoint(three_queues["run"])
    tokens = tokenizer(["The invoice is wrong"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**tokens).logits, adapted(**tokens).logits, atol=1e-5)


# --- five classes, resume, torchrun -----------------------------------------------------------


def assert_metrics_are_scikit_learns(run: Path, data: Path, names: tuple[str, ...]) -> None:
    """metrics.json's after row against classification_report on the checkpoint's own
    predictions: accuracy, macro and weighted means, each class's precision/recall/F1/support."""
    model, tokenizer = lora_model.load_checkpoint(run)
    test = load_split(str(data), "test", "message", "queue", names)
    loader = make_loader(tokenize(test, tokenizer, 128), 8, PaddingCollator(0, CPU),
                         shuffle=False)
    logits, labels = predict_in_order(model, loader, CPU, "fp32")
    ids = list(range(len(names)))
    report = classification_report(labels, logits.argmax(-1), labels=ids,
                                   target_names=list(names), output_dict=True, zero_division=0)
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert after["accuracy"] == pytest.approx(report["accuracy"], abs=1e-12)
    for average in ("macro", "weighted"):
        for name in ("precision", "recall", "f1"):
            assert after[f"{average}_{name}"] == pytest.approx(
                report[f"{average} avg"][name if name != "f1" else "f1-score"], abs=1e-12)
    for name in names:
        expected = report[name]
        assert after["per_class"][name] == pytest.approx(
            {"precision": expected["precision"], "recall": expected["recall"],
             "f1": expected["f1-score"], "support": expected["support"]}, abs=1e-12)
    # The after row's loss is that of the logits divided by the fitted temperature.
    temperature = checkpoint_temperature(lora_model.find_checkpoint(run))
    assert compute_metrics(labels, logits, names, temperature) == after


def test_five_string_classes_in_the_order_the_labels_flag_gives(tiny_model_dir, tmp_path):
    """Five string labels in a custom column, ordered by --labels (not sorted): the names
    reach the checkpoint and the metrics in that order, the metrics are scikit-learn's, and
    --labels is a setting a resumed run must repeat."""
    names = ("red", "green", "blue", "black", "white")
    rows = [{"message": f"{text} ({i})", "queue": name}
            for i in range(6) for name, text in zip(
                names, ["red apple", "green leaf", "blue sky", "black night", "white snow"],
                strict=True)]
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    pd.DataFrame(rows[:15]).to_csv(data / "test.csv", index=False)
    run = tmp_path / "run"
    flags = [*FLAGS, "--validation-size", "10", "--labels", ",".join(names)]
    assert train_script.main(["--model", tiny_model_dir, "--data", str(data),
                              "--output-dir", str(run), *flags]) == 0
    assert json.loads((run / "adapter" / lora_model.LABELS_FILE).read_text()) == list(names)
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert list(after["per_class"]) == list(names)
    assert [after["per_class"][name]["support"] for name in names] == [3] * 5
    assert np.array(after["confusion_matrix"]).shape == (5, 5)
    assert json.loads((run / "config.json").read_text())["labels"] == list(names)
    assert_metrics_are_scikit_learns(run, data, names)


def test_an_interrupted_three_class_run_resumes_to_the_identical_result(three_queues, tmp_path,
                                                                         capsys):
    run = tmp_path / "run"
    flags = ["--model", three_queues["model"], "--data", str(three_queues["data"]),
             "--output-dir", str(run), *FLAGS, "--save-every", "2"]
    stopped = run_forked(lambda: interrupt_train.run("kill-at-step:5", flags))
    assert stopped.returncode < 0, stopped.stderr[-2000:]
    result = run_main(train_script.main, capsys, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming from" in result.stdout
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    reference = load_file(three_queues["run"] / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[name], reference[name]) for name in reference)
    assert json.loads((run / "metrics.json").read_text())["after"] == \
        json.loads((three_queues["run"] / "metrics.json").read_text())["after"]


def test_two_processes_train_three_classes_as_one(three_queues, tmp_path):
    """Two processes of batch 2 (forked ranks, as torchrun starts them) against one process of
    batch 4 (the fixture's run): the same adapter and head, the same losses."""
    run = tmp_path / "run"
    train_in_ranks(["--model", three_queues["model"], "--data", str(three_queues["data"]),
                    "--output-dir", str(run), *FLAGS, "--batch-size", "2"])
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    reference = load_file(three_queues["run"] / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for name in reference:  # the head (3 outputs) included
        assert torch.allclose(ours[name], reference[name], atol=1e-5), name
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    expected = [r["loss"] for r in read_log(three_queues["run"]) if "loss" in r]
    assert len(losses) == 12 and losses == pytest.approx(expected, abs=1e-5)


def test_fewer_validation_reviews_than_classes_is_one_sentence(tiny_model_dir, tmp_path, capsys):
    data = write_tickets(tmp_path / "data")
    result = run_main(train_script.main, capsys, "--model", tiny_model_dir, "--data", str(data),
                      "--output-dir", str(tmp_path / "run"), *FLAGS, "--validation-size", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the stratified split needs at least 3 validation reviews, one of each class" in \
        result.stderr.strip().splitlines()[-1]


def test_a_classifier_saved_with_transformers_default_names_counts_as_imdbs(tiny_model_dir,
                                                                           tmp_path):
    """A two-class model of another project (id2label LABEL_0, LABEL_1, transformers' default)
    is scored on IMDB as before labels were recorded; with more classes, by id."""
    for count, expected in ((2, BINARY_LABEL_NAMES), (3, ("0", "1", "2"))):
        folder = tmp_path / f"classifier-{count}"
        config = BertConfig.from_pretrained(tiny_model_dir, num_labels=count)
        BertForSequenceClassification(config).save_pretrained(folder)
        assert lora_model.checkpoint_label_names(folder) == expected


def test_merge_refuses_the_current_folder(three_queues, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="holds the current folder"):
        lora_model.merge_adapter(three_queues["run"], ".", overwrite=True)
