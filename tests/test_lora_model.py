"""LoRA wrapping, the seeded head, and the adapter save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_random_adapter
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import lora_model
from lora_model import (
    HEAD_SEED,
    load_adapted_model,
    load_base_model,
    parameter_counts,
    prepare_model,
    save_checkpoint,
    wrap_with_lora,
)
from machinery.checkpoints import ADAPTER_DIR, adapter_base_model, find_checkpoint
from machinery.cli import UsageError
from machinery.hub import load_tokenizer

HIDDEN, LAYERS, R = 32, 2, 4


def batch_of_ids(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_base_model_head_is_the_same_whatever_the_global_rng(tiny_model_dir, monkeypatch):
    torch.manual_seed(1)
    first = load_base_model(tiny_model_dir)
    torch.manual_seed(2)
    second = load_base_model(tiny_model_dir)
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    assert first.config.id2label == {0: "negative", 1: "positive"}
    # The global stream is untouched, so seeding for training is not disturbed by loading.
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    load_base_model(tiny_model_dir)
    assert torch.equal(torch.rand(1), expected)
    # HEAD_SEED alone decides the head: another seed draws another one.
    monkeypatch.setattr(lora_model, "HEAD_SEED", HEAD_SEED + 1)
    assert not torch.equal(load_base_model(tiny_model_dir).classifier.weight,
                           first.classifier.weight)


def test_lora_trains_only_adapters_and_the_classifier_head(tiny_model_dir):
    model = wrap_with_lora(load_base_model(tiny_model_dir), r=R, alpha=8, dropout=0.0,
                           targets="query,value")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing would be trained"
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert sum("classifier" in n for n in trainable) == 2  # weight and bias
    # A and B on query and value in each layer, plus the 2-label head.
    expected = LAYERS * 2 * (R * HIDDEN + HIDDEN * R) + (HIDDEN * 2 + 2)
    assert parameter_counts(model)[0] == expected


def test_a_training_step_changes_only_adapters_and_head(tiny_model_dir):
    model = wrap_with_lora(load_base_model(tiny_model_dir), r=R, alpha=8, dropout=0.0,
                           targets="query,value")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch_of_ids(), labels=torch.tensor([0, 1, 1])).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    assert all("lora_" in n or "classifier" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)


def test_fresh_lora_model_equals_the_pre_trained_model(tiny_model_dir):
    base = load_base_model(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(**batch_of_ids()).logits
        wrapped = wrap_with_lora(base, r=R, alpha=8, dropout=0.0, targets="query,value").eval()
        assert torch.allclose(wrapped(**batch_of_ids()).logits, expected, atol=1e-6)


def trained_adapter(tiny_model_dir, folder):
    return save_random_adapter(tiny_model_dir, folder, r=R)


def test_save_then_load_gives_identical_logits(tiny_model_dir, tmp_path):
    model = trained_adapter(tiny_model_dir, tmp_path / ADAPTER_DIR)
    files = {p.name for p in (tmp_path / ADAPTER_DIR).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    saved = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    assert any("classifier" in key for key in saved), "the head must be saved with the adapter"
    assert json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())[
        "task_type"] == "SEQ_CLS"

    loaded = load_adapted_model(tmp_path)  # a run folder: finds adapter/ inside
    with torch.no_grad():
        assert torch.equal(loaded(**batch_of_ids()).logits, model(**batch_of_ids()).logits)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_stock_peft_code_loads_the_adapter(tiny_model_dir, tmp_path):
    model = trained_adapter(tiny_model_dir, tmp_path)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    stock = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(stock(**batch_of_ids()).logits, model(**batch_of_ids()).logits,
                              atol=1e-6)


def test_loading_for_more_training_keeps_adapters_trainable(tiny_model_dir, tmp_path):
    saved = trained_adapter(tiny_model_dir, tmp_path)
    resumed = load_adapted_model(tmp_path, trainable=True)
    # Exactly what was trained is trainable again: A and B on query and value, and the head.
    expected = LAYERS * 2 * (R * HIDDEN + HIDDEN * R) + (HIDDEN * 2 + 2)
    assert parameter_counts(resumed)[0] == parameter_counts(saved)[0] == expected
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in saved.named_parameters() if p.requires_grad}
    frozen = load_adapted_model(tmp_path)  # for scoring: nothing trainable
    assert parameter_counts(frozen)[0] == 0


def test_adapter_records_its_base_model(tiny_model_dir, tmp_path):
    trained_adapter(tiny_model_dir, tmp_path / ADAPTER_DIR)
    assert adapter_base_model(find_checkpoint(tmp_path)) == tiny_model_dir


def test_a_folder_without_adapter_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="is not a run folder, an adapter folder"):
        load_adapted_model(tmp_path)
    head = prepare_model(load_base_model(tiny_model_dir), "head", 8, 32, 0.1, "query,value")
    save_checkpoint(head, load_tokenizer(tiny_model_dir), tmp_path / "head", "head")
    with pytest.raises(UsageError, match="holds a head checkpoint, not a LoRA adapter"):
        load_adapted_model(tmp_path / "head")


def test_a_model_stored_in_fp16_trains_fp32_weights(tiny_model_dir, tmp_path):
    """transformers 5 keeps a stored dtype by default; the trainable weights (and the frozen
    ones, which autocast casts as it needs) must come out fp32 all the same."""
    half = tmp_path / "fp16-model"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, dtype=torch.float16) \
        .save_pretrained(half)
    load_tokenizer(tiny_model_dir).save_pretrained(half)
    stored = load_file(half / "model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    model = prepare_model(load_base_model(str(half)), "lora", 8, 32, 0.1, "query,value")
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert len(trainable) == 2 * LAYERS * 2 + 2  # lora_A/B on query and value, head W and b
