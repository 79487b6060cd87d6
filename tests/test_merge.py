"""Merging: the LoRA update folded into the base weights, saved as a plain transformers model."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, save_random_adapter
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

import lora_model
from lora_model import load_adapted_model, load_base_model, load_merged_model, merge_adapter
from machinery.checkpoints import ADAPTER_CONFIG, ADAPTER_DIR
from machinery.cli import UsageError
from machinery.files import folder_size, format_size
from machinery.hub import load_tokenizer

CPU = torch.device("cpu")
TEXTS = ["A wonderful film, I loved every minute.", "Dull, slow and badly acted."]

# Run in a fresh interpreter: loads the merged folder with transformers alone and checks that
# peft was never imported, then prints the logits for TEXTS.
LOAD_WITHOUT_PEFT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
tokens = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**tokens).logits
print(json.dumps({"peft_imported": "peft" in sys.modules, "class": type(model).__name__,
                  "id2label": model.config.id2label, "logits": logits.tolist()}))
"""


@pytest.fixture
def run_dir(tiny_model_dir, tmp_path):
    """A run folder holding a tiny adapter with random B matrices and head."""
    save_random_adapter(tiny_model_dir, tmp_path / "run" / ADAPTER_DIR)
    return tmp_path / "run"


def adapter_logits(checkpoint, texts: list[str]) -> np.ndarray:
    """Logits of base model + adapter (peft, unmerged) for `texts`."""
    model = load_adapted_model(checkpoint).eval()
    tokenizer = load_tokenizer(str(checkpoint / ADAPTER_DIR))
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


def test_merge_command_writes_a_plain_model_that_loads_without_peft(run_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "merged"
    # The command in-process (a subprocess would spend seconds importing torch); the merged
    # folder is then loaded in a fresh interpreter, where peft must stay unimported.
    assert lora_model.main(["merge", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Merged model saved to {out} ({format_size(folder_size(out))}" in printed
    assert f"the adapter {run_dir / ADAPTER_DIR} is " in printed
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert ADAPTER_CONFIG not in files
    with safe_open(out / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert not any("lora_" in key or "modules_to_save" in key for key in keys)
    assert "classifier.weight" in keys

    loaded = run_script("-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(TEXTS))
    assert loaded.returncode == 0, loaded.stderr
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["peft_imported"] is False
    assert answer["class"] == "BertForSequenceClassification"
    assert answer["id2label"] == {"0": "negative", "1": "positive"}
    expected = adapter_logits(run_dir, TEXTS)
    assert np.abs(np.array(answer["logits"]) - expected).max() < 1e-5


def test_merged_model_differs_from_the_base_model(run_dir, tiny_model_dir, tmp_path):
    # Guards the test above: the adapter must really change the logits, or "equal" is vacuous.
    merged = load_merged_model(merge_adapter(run_dir, tmp_path / "merged")).eval()
    base = load_base_model(tiny_model_dir).eval()
    tokens = load_tokenizer(tiny_model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (merged(**tokens).logits - base(**tokens).logits).abs().max() > 1e-2


def test_merge_refuses_a_folder_that_holds_files_unless_overwrite(run_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match=r"already holds files.*--overwrite"):
        merge_adapter(run_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    merge_adapter(run_dir, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_merge_that_finds_the_disk_full_leaves_the_previous_merged_model(run_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """--overwrite of a merged folder when the disk fills up halfway (the tokenizer's files):
    exit 1 with one sentence naming the file, and the folder still holds the previous merge,
    byte for byte, with nothing half-written beside it."""
    out = tmp_path / "merged"
    merge_adapter(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "vocab.txt"))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    code = lora_model.main(["merge", "--checkpoint", str(run_dir), "--out", str(out),
                            "--overwrite"])
    assert code == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert ": error: could not write " in line and "no space left on device" in line
    assert line.endswith("free some space and run the same command again")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_merge_never_writes_into_a_run_or_adapter_folder(run_dir):
    before = sorted(p.name for p in run_dir.rglob("*"))
    for target in (run_dir, run_dir / ADAPTER_DIR):
        with pytest.raises(UsageError, match="holds an adapter or a run"):
            merge_adapter(run_dir, target, overwrite=True)
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_merge_command_reports_usage_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_model.main(["merge", "--checkpoint", str(tmp_path), "--out",
                         str(tmp_path / "merged")])
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: --checkpoint" in error_line
    assert "is not a run folder, an adapter folder" in error_line
    assert not (tmp_path / "merged").exists()


def test_sizes_are_shown_in_decimal_units():
    assert [format_size(n) for n in (999, 301_520, 90_867_952, 4_400_000_000)] == [
        "999 B", "301.5 kB", "90.9 MB", "4.4 GB"]
