"""--method lora|head|full and --truncation, end to end on a tiny BERT: train, evaluate, predict.

One short train.py run per method, all with --truncation head+tail at --max-length 8, where
every fixture review (11 to 14 tokens) is cut, so the cut decides the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reviews

import evaluate
import predict
import train
from data import PREPROCESSING_FILE
from lora_model import load_base_model, load_checkpoint, load_merged_model, merge_adapter
from machinery.checkpoints import ADAPTER_DIR, HEAD_WEIGHTS, METHODS, MODEL_DIR
from machinery.stats import TEMPERATURE_FILE
from train import DEFAULT_LRS

MAX_LENGTH, TRUNCATION = "8", "head+tail"
LORA_LR = "2e-2"
QUERY = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shared_data_dir, tmp_path_factory) -> dict[str, Path]:
    """A finished run folder per method, one epoch; head and full at their default --lr.

    LoRA gets a large --lr, so that its logits move well away from the random start and
    depend clearly on which tokens it reads.
    """
    folder = tmp_path_factory.mktemp("methods")
    for method in METHODS:
        lr = ["--lr", LORA_LR] if method == "lora" else []
        assert train.main(["--model", tiny_model_dir, "--data", str(shared_data_dir),
                           "--output-dir", str(folder / method), "--method", method,
                           "--batch-size", "4", "--validation-size", "4", *lr,
                           "--max-length", MAX_LENGTH, "--truncation", TRUNCATION]) == 0
    return {method: folder / method for method in METHODS}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_each_method_trains_what_it_names(runs, tiny_model_dir):
    base = load_base_model(tiny_model_dir)
    everything = sum(p.numel() for p in base.parameters())
    head = base.classifier.weight.numel() + base.classifier.bias.numel()  # 32 x 2 + 2
    lora = 2 * 2 * (8 * 32 + 32 * 8)  # r=8 on query and value in 2 layers of width 32
    expected = {"lora": {"trainable": lora + head, "total": everything + lora + head},
                "head": {"trainable": head, "total": everything},
                "full": {"trainable": everything, "total": everything}}
    for method, run in runs.items():
        assert read_json(run / "metrics.json")["parameters"] == expected[method], method
        # --lr when given, else the method's default.
        assert read_json(run / "config.json")["lr"] == (
            float(LORA_LR) if method == "lora" else DEFAULT_LRS[method])
    assert head == 66

    # What each saves: the adapter; the head's 66 weights alone; every weight.
    assert (runs["lora"] / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (runs["head"] / MODEL_DIR / HEAD_WEIGHTS).stat().st_size < 1000
    assert (runs["full"] / MODEL_DIR / "model.safetensors").stat().st_size > 4 * everything
    # head leaves the encoder as it was; full changes it.
    trained = {m: load_checkpoint(runs[m])[0].state_dict() for m in ("head", "full")}
    assert torch.equal(trained["head"][QUERY], base.state_dict()[QUERY])
    assert not torch.equal(trained["full"][QUERY], base.state_dict()[QUERY])
    assert not torch.equal(trained["head"]["classifier.weight"],
                           base.state_dict()["classifier.weight"])


def test_checkpoints_record_their_truncation_and_temperature(runs):
    for method, run in runs.items():
        folder = run / (ADAPTER_DIR if method == "lora" else MODEL_DIR)
        assert read_json(folder / PREPROCESSING_FILE) == {"truncation": TRUNCATION,
                                                          "max_length": int(MAX_LENGTH)}
        # The temperature fitted after training sits beside the weights of every method.
        assert read_json(folder / TEMPERATURE_FILE)["temperature"] == read_json(
            run / "metrics.json")["calibration"]["temperature"]


def test_evaluate_scores_each_checkpoint_with_its_recorded_truncation(runs, shared_data_dir,
                                                                     tmp_path, capsys):
    out = tmp_path / "out.json"
    assert evaluate.main(["--base", "--data", str(shared_data_dir), "--json", str(out),
                          *(flag for run in runs.values() for flag in ("--checkpoint",
                                                                       str(run)))]) == 0
    assert "warning" not in capsys.readouterr().err
    rows = read_json(out)["results"]
    assert [row["name"] for row in rows] == [
        "base", str(runs["lora"] / ADAPTER_DIR), str(runs["head"] / MODEL_DIR),
        str(runs["full"] / MODEL_DIR)]
    for row, run in zip(rows, [runs["lora"], *runs.values()], strict=True):
        metrics = read_json(run / "metrics.json")["before" if row["name"] == "base" else "after"]
        assert {key: row[key] for key in metrics} == metrics, row["name"]
        assert (row["truncation"], row["max_length"]) == (TRUNCATION, int(MAX_LENGTH))


def test_an_explicit_truncation_is_obeyed_with_a_warning(runs, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert evaluate.main(["--checkpoint", str(runs["lora"]), "--truncation", "head", "--data",
                          str(shared_data_dir), "--json", str(out)]) == 0
    assert (f"warning: {runs['lora'] / ADAPTER_DIR} was trained with --truncation head+tail; "
            "scoring it with --truncation head as asked") in capsys.readouterr().err
    [row] = read_json(out)["results"]
    after = read_json(runs["lora"] / "metrics.json")["after"]
    assert row["truncation"] == "head"
    # Scored as recorded, the loss equals train.py's to the last digit (test above); other
    # tokens give other logits. (The tiny random model stays near chance, so the change is
    # small, but far above float noise.)
    assert abs(row["loss"] - after["loss"]) > 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_predict_and_merge_work_for_every_method(runs, method, tmp_path, capsys):
    texts = [reviews(1)["text"][0], "Great."]
    # fp32: merged weights (W + BA) and the unmerged sum W x + B(A x) agree to float32's
    # rounding (1e-5 here), but bf16 rounds each to 8 bits (differences up to ~1e-3).
    args = predict.build_parser().parse_args(["--checkpoint", str(runs[method]),
                                              "--precision", "fp32", *texts])
    predictions = predict.run(args)
    table = capsys.readouterr().out
    assert [p.truncated for p in predictions] == [True, False]
    # --max-length 8 leaves 6 review tokens: round(6 x 128 / 510) = 2 from the head, 4 from
    # the tail.
    assert "only the first 2 and the last 4 tokens besides [CLS] and [SEP] were read" in table

    merged = merge_adapter(runs[method], tmp_path / "merged")
    assert read_json(merged / PREPROCESSING_FILE)["truncation"] == TRUNCATION
    model = load_checkpoint(runs[method])[0].eval()
    batch = {"input_ids": torch.tensor([[101, 2307, 1012, 102]])}
    with torch.no_grad():
        assert torch.allclose(load_merged_model(merged).eval()(**batch).logits,
                              model(**batch).logits, atol=1e-5)
    reread = predict.run(predict.build_parser().parse_args(["--checkpoint", str(merged),
                                                            "--precision", "fp32", *texts]))
    assert [p.probability for p in reread] == pytest.approx(
        [p.probability for p in predictions], abs=1e-5)


@pytest.mark.parametrize("script", [train, evaluate, predict])
def test_help_explains_the_new_flags(script):
    text = " ".join(script.build_parser().format_help().split())
    assert "--truncation {head,tail,head+tail}" in text
    if script is train:
        assert "head+tail (a quarter head, rest tail)" in text
        assert "head = the head alone, full = every weight" in text
        assert "default: by --method, lora 0.0005, head 0.001, full 3e-05" in text
    else:
        assert "the first 128 and the last 382" in text
        assert "default: the checkpoint's, recorded by train.py, else head" in text
