"""The flags that change what a run computes, each in a successful train.py run with its effect
checked; and `python train.py` with no flags at all (the Hub's imdb and bert-base-uncased).

Every run is train.main in this process on the tiny BERT (a few seconds each).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from conftest import reviews
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import train
from lora_model import load_adapted_model, load_base_model, merge_adapter
from machinery import data_sources
from machinery.checkpoints import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS

HIDDEN, LAYERS = 32, 2  # the tiny BERT of conftest
QUERY = "bert.encoder.layer.0.attention.self.query"


def train_run(model: str, data_folder: Path, folder: Path, *flags: str) -> Path:
    """A finished train.py run into `folder` (one epoch of 5 steps, lr 1e-2, every step logged)."""
    assert train.main(["--model", model, "--data", str(data_folder), "--output-dir", str(folder),
                       "--batch-size", "4", "--validation-size", "4", "--lr", "1e-2",
                       "--log-every", "1", *flags]) == 0
    return folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()
            if '"loss"' in line and '"validation"' not in line]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / ADAPTER_DIR / ADAPTER_WEIGHTS)


def test_lora_alpha_sets_the_scale_of_the_update(tiny_model_dir, shared_data_dir, tmp_path):
    run = train_run(tiny_model_dir, shared_data_dir, tmp_path / "run", "--lora-r", "4",
                    "--lora-alpha", "12")
    config = read_json(run / ADAPTER_DIR / ADAPTER_CONFIG)
    assert (config["r"], config["lora_alpha"]) == (4, 12)
    model = load_adapted_model(run)
    query = model.get_submodule(f"base_model.model.{QUERY}")
    assert query.scaling["default"] == 3.0  # alpha / r
    # The update the merged model carries is (alpha / r) B A, not B A.
    a, b = query.lora_A["default"].weight, query.lora_B["default"].weight
    merged = load_file(merge_adapter(run, tmp_path / "merged") / "model.safetensors")
    base = load_base_model(tiny_model_dir).state_dict()
    update = merged[f"{QUERY}.weight"] - base[f"{QUERY}.weight"]
    assert update.abs().max() > 1e-3  # training moved B away from zero
    assert torch.allclose(update, 3.0 * (b @ a), atol=1e-6)


def test_lora_targets_put_adapters_on_the_layers_named(tiny_model_dir, shared_data_dir, tmp_path):
    run = train_run(tiny_model_dir, shared_data_dir, tmp_path / "run", "--lora-r", "4",
                    "--lora-targets", "key,dense")
    assert set(read_json(run / ADAPTER_DIR / ADAPTER_CONFIG)["target_modules"]) == {"key",
                                                                                   "dense"}
    weights = adapter(run)
    lora = [name for name in weights if "lora_" in name]
    assert not any(".query." in name or ".value." in name for name in lora)
    # Per layer: key (32 -> 32), and the three dense layers: attention output (32 -> 32),
    # intermediate (32 -> 64) and output (64 -> 32); and the pooler's dense (32 -> 32) once.
    # A is r x in, B is out x r.
    per_layer = 4 * (HIDDEN + HIDDEN) + 4 * (HIDDEN + HIDDEN) + 4 * (HIDDEN + 64) \
        + 4 * (64 + HIDDEN)
    expected = LAYERS * per_layer + 4 * (HIDDEN + HIDDEN)
    assert sum(weights[name].numel() for name in lora) == expected
    head = HIDDEN * 2 + 2
    assert read_json(run / "metrics.json")["parameters"]["trainable"] == expected + head


def test_text_and_label_columns_are_read_by_name(tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 8)):
        table = reviews(n).to_pandas()
        table = table.rename(columns={"text": "review", "label": "sentiment"})
        table["sentiment"] = table["sentiment"].map({0: "neg", 1: "pos"})
        table["id"] = range(len(table))  # a column that must be ignored
        table.to_csv(folder / f"{split}.csv", index=False)
    run = train_run(tiny_model_dir, folder, tmp_path / "run", "--text-column", "review",
                    "--label-column", "sentiment")
    config = read_json(run / "config.json")
    assert (config["text_column"], config["label_column"]) == ("review", "sentiment")
    assert (config["train_examples"], config["validation_examples"]) == (20, 4)
    after = read_json(run / "metrics.json")["after"]
    # The 16 test reviews, 8 "neg" and 8 "pos": the confusion matrix's rows are the true labels.
    assert [sum(row) for row in after["confusion_matrix"]] == [8, 8]


def test_seed_and_data_seed_are_repeatable_and_each_changes_the_run(tiny_model_dir, shared_data_dir,
                                                                    tmp_path):
    def run(name: str, seed: str, data_seed: str) -> Path:
        return train_run(tiny_model_dir, shared_data_dir, tmp_path / name, "--seed", seed,
                         "--data-seed", data_seed, "--eval-samples", "10")

    first, again = run("first", "7", "3"), run("again", "7", "3")
    other_seed, other_data = run("other-seed", "8", "3"), run("other-data", "7", "4")
    assert losses(first) == losses(again)
    assert all(torch.equal(adapter(first)[k], adapter(again)[k]) for k in adapter(first))
    before = {r.name: read_json(r / "metrics.json")["before"]
              for r in (first, other_seed, other_data)}
    # --seed: another LoRA init, dropout and batch order, on the same reviews.
    assert losses(other_seed) != losses(first)
    assert not any(torch.equal(adapter(other_seed)[k], adapter(first)[k]) for k in adapter(first))
    assert before["other-seed"] == before["first"]  # the same 10 test reviews, the same head
    # --data-seed: another validation split and another 10 of the 16 test reviews.
    assert losses(other_data) != losses(first)
    assert before["other-data"]["loss"] != before["first"]["loss"]


def test_train_py_with_no_flags_trains_bert_base_on_imdb(tiny_model_dir, shared_data_dir, tmp_path,
                                                        monkeypatch, capsys):
    """`python train.py`: the Hub's imdb and bert-base-uncased, every default, a run folder
    named runs/<model>-lora-<date-time>/ in the working folder. The Hub is out of reach here,
    so the two loading functions map those two names to local copies (the tiny BERT and the
    fixture reviews); everything else is the code a user runs."""
    load_by_name = {"imdb": lambda split, **kwargs: load_dataset(
        "csv", data_files={split: str(shared_data_dir / f"{split}.csv")}, split=split)}
    real_load_dataset = data_sources.load_dataset

    def fake_load_dataset(name, *args, split=None, **kwargs):
        if name in load_by_name:
            return load_by_name[name](split, **kwargs)
        return real_load_dataset(name, *args, split=split, **kwargs)

    monkeypatch.setattr(data_sources, "load_dataset", fake_load_dataset)
    for auto_class in (AutoConfig, AutoTokenizer, AutoModelForSequenceClassification):
        real = auto_class.from_pretrained

        def from_pretrained(name, *args, real=real, **kwargs):
            return real(tiny_model_dir if name == "bert-base-uncased" else name, *args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)

    assert train.main([]) == 0
    [run] = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"bert-base-uncased-lora-\d{8}-\d{6}", run.name)
    config = read_json(run / "config.json")
    assert (config["model"], config["data"], config["method"]) == ("bert-base-uncased", "imdb",
                                                                 "lora")
    assert (config["lr"], config["batch_size"], config["epochs"]) == (5e-4, 16, 1)
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (8, 32, 0.1)
    assert config["train_examples"] + config["validation_examples"] == 24
    assert config["test_examples"] == 16
    for name in ("log.jsonl", "metrics.json", "report.md", "training_curves.png",
                 "comparison.png", f"{ADAPTER_DIR}/{ADAPTER_CONFIG}",
                 f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"):
        assert (run / name).is_file(), name
    metrics = read_json(run / "metrics.json")
    assert metrics["before"]["n"] == metrics["after"]["n"] == 16
    assert f"output in {Path('runs') / run.name}" in capsys.readouterr().out
