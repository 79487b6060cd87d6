"""predict.py: labels and probabilities for the user's own reviews, from any kind of checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import NEGATIVE, POSITIVE, reviews, run_main, run_script

import predict
from lora_model import (
    load_adapted_model,
    load_base_model,
    merge_adapter,
    save_adapter,
    wrap_with_lora,
)
from machinery.checkpoints import ADAPTER_DIR
from machinery.hub import load_tokenizer
from machinery.runtime import pick_precision

SHORT = [POSITIVE[0], NEGATIVE[1], POSITIVE[2]]
LONG = " ".join([NEGATIVE[0]] * 6)  # 44 tokens, more than MAX_LENGTH
MAX_LENGTH = 16
TRAINING_STEPS = 30


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run folder with a tiny adapter trained on the fixture reviews, and its merged model.

    Trained (full batch, a few seconds) rather than random, so that it labels the positive
    and negative sentences differently and the label checks below mean something.
    """
    folder = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = wrap_with_lora(load_base_model(tiny_model_dir), r=4, alpha=8, dropout=0.0,
                           targets="query,value")
    tokenizer = load_tokenizer(tiny_model_dir)
    data = reviews(12)
    batch = tokenizer(list(data["text"]), padding=True, return_tensors="pt")
    labels = torch.tensor(list(data["label"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(TRAINING_STEPS):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, tokenizer, folder / "run" / ADAPTER_DIR)
    merge_adapter(folder / "run", folder / "merged")
    return folder / "run"


def expected_positive_probability(run_dir, texts: list[str], max_length: int) -> np.ndarray:
    """P(positive) computed the plain way: tokenizer + peft model + softmax, one text at a time."""
    model = load_adapted_model(run_dir).eval()
    tokenizer = load_tokenizer(str(run_dir / ADAPTER_DIR))
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(text, truncation=True, max_length=max_length,
                                              return_tensors="pt")).logits for text in texts])
    return torch.softmax(logits, dim=-1)[:, 1].numpy()


def table_rows(stdout: str) -> list[list[str]]:
    """The data rows of predict.py's table, split into #, label, probability, tokens, text."""
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["#", "label", "probability", "tokens", "text"]
    return [line.split(maxsplit=4) for line in lines[1:] if line[:1] != predict.TRUNCATED_MARK]


def test_labels_and_probabilities_for_texts_on_the_command_line(run_dir, capsys):
    texts = [*SHORT, LONG]
    # fp32, to compare with the plain fp32 computation to 1e-4 (bf16 rounds logits to ~1e-2).
    result = run_main(predict.main, capsys, "--checkpoint", str(run_dir), "--max-length",
                      str(MAX_LENGTH), "--precision", "fp32", *texts)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    p_positive = expected_positive_probability(run_dir, texts, MAX_LENGTH)
    # The tiny adapter learned the training sentences (the truncated one it need not know).
    assert [row[1] for row in rows[:3]] == ["positive", "negative", "positive"]
    for row, p, text in zip(rows, p_positive, texts, strict=True):
        label = "positive" if p > 0.5 else "negative"
        assert row[1] == label
        assert float(row[2]) == pytest.approx(max(p, 1 - p), abs=1e-4)
        assert row[4] == predict.preview(text)
    assert [row[3].endswith(predict.TRUNCATED_MARK) for row in rows] == [False] * 3 + [True]
    assert "1 review is longer than --max-length 16 tokens" in result.stdout


def test_json_lines_from_standard_input(run_dir):
    """In a new interpreter, reading a real pipe, as `... | python predict.py` does."""
    texts = [SHORT[0], LONG, SHORT[1]]
    result = run_script("predict.py", "--checkpoint", str(run_dir), "--json", "--max-length",
                        str(MAX_LENGTH), "--eval-batch-size", "2", "--precision", "fp32",
                        stdin="\n".join(texts[:2]) + "\n\n" + texts[2] + "\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == texts  # the blank line is skipped, order is kept
    tokenizer = load_tokenizer(str(run_dir / ADAPTER_DIR))
    assert [r["tokens"] for r in records] == [len(tokenizer(t)["input_ids"]) for t in texts]
    assert [r["truncated"] for r in records] == [False, True, False]
    p_positive = expected_positive_probability(run_dir, texts, MAX_LENGTH)
    for record, p in zip(records, p_positive, strict=True):
        assert record["probabilities"]["positive"] == pytest.approx(p, abs=1e-5)
        assert sum(record["probabilities"].values()) == pytest.approx(1.0)
        assert record["probability"] == record["probabilities"][record["label"]]
        assert record["probability"] >= 0.5
    assert "1 review is longer than --max-length 16 tokens" in result.stderr


def test_run_adapter_and_merged_folders_give_the_same_predictions(run_dir, tmp_path,
                                                                  capsys):
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("\n".join([*SHORT, LONG]) + "\n", encoding="utf-8")
    results = {}
    for name, folder in (("run", run_dir), ("adapter", run_dir / ADAPTER_DIR),
                         ("merged", run_dir.parent / "merged")):
        # fp32: merged and unmerged weights agree to float32's rounding, not to bf16's.
        args = predict.build_parser().parse_args(
            ["--checkpoint", str(folder), "--file", str(reviews), "--json", "--precision",
             "fp32"])
        results[name] = predict.run(args)
    capsys.readouterr()
    expected = [p.probabilities["positive"] for p in results["run"]]
    assert len(expected) == 4
    for name in ("adapter", "merged"):
        assert [p.label for p in results[name]] == [p.label for p in results["run"]]
        actual = [p.probabilities["positive"] for p in results[name]]
        assert actual == pytest.approx(expected, abs=1e-5), name


def test_auto_precision_predictions_stay_within_its_rounding_of_fp32(run_dir, capsys):
    """--precision auto, which the suite resolves to bf16 (conftest), against fp32: the same
    labels, and probabilities within 0.01. bf16 keeps 8 significant bits (relative rounding
    2^-9, 0.2%) in every matrix product; through the tiny model's two layers the logits move
    by a few 1e-3, and a probability by at most a quarter of the logit change. (Where auto
    resolves to fp32, the two runs are the same computation.)"""
    texts = [*SHORT, LONG]
    results = {}
    for precision in ("auto", "fp32"):
        args = predict.build_parser().parse_args(
            ["--checkpoint", str(run_dir), "--precision", precision, *texts])
        results[precision] = predict.run(args)
    capsys.readouterr()
    bf16, fp32 = results["auto"], results["fp32"]
    assert [p.label for p in bf16] == [p.label for p in fp32]
    differences = [abs(a.probabilities["positive"] - b.probabilities["positive"])
                   for a, b in zip(bf16, fp32, strict=True)]
    if pick_precision("auto", torch.device("cpu")) == "fp32":
        assert max(differences) == 0
    else:
        assert 0 < max(differences) < 0.01  # bf16 really ran: it rounds otherwise than fp32


def test_standard_input_is_read_when_no_text_or_file_is_given(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Great acting.\n"))
    args = predict.build_parser().parse_args(["--checkpoint", str(run_dir)])
    [prediction] = predict.run(args)
    assert prediction.text == "Great acting."
    assert capsys.readouterr().out.splitlines()[1].endswith("Great acting.")


def test_a_file_holds_one_review_per_line_whatever_else_its_lines_hold(tmp_path):
    """Only a newline ends a review: IMDB's \x85 (and \u2028, form feeds) must not cut one in
    two, which would label the halves and shift every later row."""
    path = tmp_path / "reviews.txt"
    path.write_bytes("Great film\x85 really loved it.\r\nAwful\u2028 truly.\n\nFine\x0c.\n"
                     .encode("utf-8"))
    assert predict.read_lines(path) == [
        "Great film\x85 really loved it.", "Awful\u2028 truly.", "Fine\x0c."]


@pytest.mark.parametrize("flags, stdin, message", [
    ([], "", "no reviews to label"),
    (["--file", "missing.txt"], "", "--file missing.txt does not exist"),
    (["--max-length", "1", "text"], "", "--max-length: must be at least 8"),
    (["--max-length", "4096", "text"], "", "--max-length 4096 is above the model's limit of 512"),
])
def test_mistakes_are_reported_in_one_line(run_dir, monkeypatch, capsys, flags, stdin, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(run_dir), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["empty folder", "pre-trained encoder"])
def test_a_folder_that_is_no_checkpoint_names_all_three_kinds(tmp_path, tiny_model_dir,
                                                              capsys, kind):
    # A bare encoder (BertModel) would get a random head: refused, not silently guessed with.
    folder = tmp_path if kind == "empty folder" else tiny_model_dir
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(folder), "some text"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "not a run folder, an adapter folder" in error and "merged model folder" in error
