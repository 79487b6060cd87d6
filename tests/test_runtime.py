"""The decisions about the device that a CPU can check with the GPU mocked: precision by
compute capability, the GPU a process uses, torchrun's variables, the random streams saved
per GPU and the defaults that depend on the device. tests/test_gpu.py runs them for real."""

from __future__ import annotations

import argparse
import copy
import os
import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lora_model import prepare_model
from machinery import runtime, snapshots
from machinery.cli import UsageError
from machinery.options import fill_device_defaults
from machinery.runtime import init_distributed, pick_device, pick_precision

CPU = torch.device("cpu")


@pytest.fixture
def pretend_gpus(monkeypatch):
    """A function that makes torch report `count` CUDA GPUs of `capability` and returns the
    list in which the devices set current are recorded. TF32 settings are put back afterwards
    (use_device turns TF32 on)."""
    tf32 = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)

    def pretend(count: int, capability: tuple[int, int] = (9, 0)) -> list:
        current: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return current

    yield pretend
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32


def test_auto_precision_on_cpu_follows_native_bf16_support(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert pick_precision("auto", CPU) == "fp32"
    with pytest.raises(UsageError, match="bf16 is not supported natively on this CPU"):
        pick_precision("bf16", CPU)
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16", CPU)
    assert pick_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert pick_precision("auto", CPU) == "bf16"
    assert pick_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize(("capability", "auto"), [
    ((7, 0), "fp16"),  # V100
    ((7, 5), "fp16"),  # T4: torch.cuda.is_bf16_supported() says True, by emulation
    ((8, 0), "bf16"),  # A100
    ((8, 9), "bf16"),  # L4
    ((9, 0), "bf16"),  # H100, H200
])
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, pretend_gpus,
                                                                 capability, auto):
    pretend_gpus(1, capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda")
    assert pick_precision("auto", cuda) == auto
    assert pick_precision("fp16", cuda) == "fp16"
    assert pick_precision("fp32", cuda) == "fp32"
    if auto == "bf16":
        assert pick_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(UsageError, match=f"compute capability {capability[0]}.{capability[1]}"
                                             r"; bf16 needs 8.0 or newer"):
            pick_precision("bf16", cuda)


def test_asking_for_cuda_without_a_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def test_one_process_on_cuda_n_makes_gpu_n_current(monkeypatch, pretend_gpus):
    current = pretend_gpus(4)
    monkeypatch.delenv("RANK", raising=False)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch >= 2.9 deprecates the old allow_tf32 flags
        rank, world, device = init_distributed("cuda:3")
    assert (rank, world, device) == (0, 1, torch.device("cuda", 3))
    assert current == [torch.device("cuda", 3)]
    # TF32 through torch's own setting (fp32_precision), which the old flags only mirror.
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    with pytest.raises(UsageError, match="this machine has 4 GPU"):
        init_distributed("cuda:4")


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_a_gpu_without_a_number_is_the_current_one(monkeypatch, pretend_gpus, name):
    """torch.cuda.set_device refuses a device without a number: "cuda" and "auto" resolve to
    the current GPU's (here 0), which is also what config.json records."""
    current = pretend_gpus(2)
    monkeypatch.delenv("RANK", raising=False)
    assert init_distributed(name) == (0, 1, torch.device("cuda", 0))
    assert current == [torch.device("cuda", 0)]
    assert current[0].index == 0


@pytest.mark.parametrize(("env", "gpus", "message"), [
    ({"RANK": "0"}, 2, "RANK is set but LOCAL_RANK is not"),
    ({"RANK": "0", "LOCAL_RANK": "first"}, 2, "RANK is set but LOCAL_RANK is not"),
    ({"RANK": "2", "LOCAL_RANK": "2"}, 2, r"LOCAL_RANK is 2 but this machine has 2 GPU\(s\): "
                                          r"start at most 2 processes per machine "
                                          r"\(torchrun --nproc_per_node=2\)"),
])
def test_torchrun_variables_that_do_not_fit_the_machine_are_one_sentence(monkeypatch, pretend_gpus,
                                                                          env, gpus, message):
    pretend_gpus(gpus)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    joined = []
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda *a, **k: joined.append(a))
    with pytest.raises(UsageError, match=message):
        init_distributed("cuda")
    assert joined == []  # refused before joining any process group


def test_random_streams_are_saved_and_restored_for_the_gpu_in_use(monkeypatch):
    """A snapshot holds the stream of the GPU the process trained on (not every GPU's), and
    resuming puts it on the GPU the process now trains on, whatever its number."""
    read, written = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: read.append(device) or torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: written.append((state.tolist(), device)))
    states = snapshots.rng_states(torch.device("cuda", 3))
    assert read == [torch.device("cuda", 3)]
    snapshots.restore_rng_states(states, torch.device("cuda", 0))
    assert written == [([7], torch.device("cuda", 0))]
    snapshots.restore_rng_states(states, CPU)  # moved to a CPU: the other streams only
    assert len(written) == 1
    cpu_states = snapshots.rng_states(CPU)
    assert cpu_states["cuda"] is None and len(read) == 1
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    saved = snapshots.rng_states(CPU)
    torch.rand(3)
    snapshots.restore_rng_states(saved, CPU)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("device", "batch", "workers"), [("cpu", 64, 0), ("cuda", 256, 4)])
def test_device_dependent_defaults(monkeypatch, device, batch, workers):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    args = argparse.Namespace(eval_batch_size=None, num_workers=None)
    fill_device_defaults(args, torch.device(device))
    assert (args.eval_batch_size, args.num_workers) == (batch, workers)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    args = argparse.Namespace(eval_batch_size=None, num_workers=None)
    fill_device_defaults(args, torch.device(device))
    assert args.num_workers == min(workers, 2)  # never more workers than CPUs
    args = argparse.Namespace(eval_batch_size=8, num_workers=1)  # given: kept
    fill_device_defaults(args, torch.device(device))
    assert (args.eval_batch_size, args.num_workers) == (8, 1)


@pytest.mark.parametrize("method", ["lora", "head", "full"])
def test_frozen_weights_are_cast_once_and_compute_the_same(method):
    """cast_frozen_weights stores the frozen linear weights in bf16, once: under autocast the
    loss, the logits and every trainable weight's gradient stay identical, bit for bit, and
    every trainable weight stays fp32 (the optimizer's), as do the embeddings and LayerNorms."""
    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    ids = torch.randint(0, 1000, (4, 24))
    results = []
    for cast in (False, True):
        torch.manual_seed(1)  # the same LoRA weights in both
        model = prepare_model(copy.deepcopy(base), method, 4, 8, 0.0, "query,value")
        for name, param in model.named_parameters():
            if "lora_B" in name:  # not zero, so that the adapters' gradients flow back
                torch.nn.init.normal_(param, std=0.1)
        n_cast = runtime.cast_frozen_weights(model, "bf16") if cast else 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           labels=torch.tensor([0, 1, 0, 1]))
        output.loss.backward()
        results.append((output.logits, {name: param.grad for name, param
                                        in model.named_parameters() if param.requires_grad}))
        dtypes = {name: param.dtype for name, param in model.named_parameters()}
    (logits, grads), (cast_logits, cast_grads) = results
    assert torch.equal(logits, cast_logits)
    assert grads.keys() == cast_grads.keys() and all(
        torch.equal(grads[name], cast_grads[name]) for name in grads)
    trainable = set(grads)
    assert {dtypes[name] for name in trainable} == {torch.float32}
    assert all(dtypes[name] == torch.float32 for name in dtypes
               if "embeddings" in name or "LayerNorm" in name)
    frozen_linear = [name for name in dtypes if name not in trainable
                     and "embeddings" not in name and "LayerNorm" not in name]
    assert {dtypes[name] for name in frozen_linear} <= {torch.bfloat16}
    assert n_cast == (0 if method == "full" else sum(
        model.get_parameter(name).numel() for name in frozen_linear))
    # fp32: nothing to cast.
    assert runtime.cast_frozen_weights(copy.deepcopy(base), "fp32") == 0
