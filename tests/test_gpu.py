"""The CUDA paths, run for real: only where a CUDA GPU is (skipped elsewhere, saying why).

On a GPU box: ``python -m pytest tests/test_gpu.py -s`` (``-s`` shows the host syncs it
counts). tests/test_runtime.py checks the same decisions on any machine with the GPU mocked;
BENCHMARKS.md has what these tests printed on the GPU they last ran on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_main, run_script
from safetensors.torch import load_file
from step_probe import assert_only_step_2_was_skipped, count_host_syncs, run_with_inf_gradient

import evaluate
import predict
import train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU here: these tests run the CUDA paths on a GPU box (see BENCHMARKS.md)")

CUDA = torch.device("cuda", 0)
# Resumed vs uninterrupted on the GPU: the same computation, but not bit for bit (cuBLAS may
# pick another algorithm in a new process; bf16 attention backward adds with atomics, and one
# flipped rounding is carried on by Adam). A fifth of one step's size at --lr 5e-3.
RESUME_TOLERANCE = 1e-3


def train_flags(model_dir: str, data_dir: Path, folder: Path, *extra: str) -> list[str]:
    """A short train.py run on the GPU: 2 epochs of 24 reviews, snapshots every 3 steps."""
    return ["--model", model_dir, "--data", str(data_dir), "--output-dir", str(folder),
            "--device", "cuda", "--epochs", "2", "--batch-size", "4", "--lr", "5e-3",
            "--save-every", "3", "--log-every", "2", *extra]


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    """A finished train.py run on the GPU at --precision auto (bf16 on Ampere and newer),
    with worker processes."""
    folder = tmp_path_factory.mktemp("gpu") / "bf16"
    assert train.main(train_flags(tiny_model_dir, shared_data_dir, folder,
                                  "--num-workers", "2")) == 0
    return folder


def test_auto_precision_trains_in_bf16_on_the_gpu(bf16_run):
    config = json.loads((bf16_run / "config.json").read_text())
    assert config["resolved_device"] == "cuda:0"
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert config["resolved_precision"] == expected
    metrics = json.loads((bf16_run / "metrics.json").read_text())
    assert metrics["before"]["n"] == metrics["after"]["n"] == 16
    records = [json.loads(line) for line in (bf16_run / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) == 6  # 2 epochs of 6 steps, logged every 2
    assert all(math.isfinite(loss) for loss in losses)


def test_fp16_trains_with_the_gradscaler(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    folder = tmp_path / "fp16"
    outcome = run_main(train.main, capsys,
                       *train_flags(tiny_model_dir, shared_data_dir, folder, "--precision",
                                    "fp16"))
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads((folder / "config.json").read_text())["resolved_precision"] == "fp16"
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_an_inf_gradient_is_skipped_on_the_gpu(tiny_model_dir, tmp_path, precision):
    """fp16: the scaler skips the step and halves its scale; bf16: skipped at a scale of 1.
    Either way the weights and the schedule are as if the step had not happened."""
    _, steps = run_with_inf_gradient(tiny_model_dir, tmp_path / "run", CUDA, precision,
                                     bad_step=2, steps=4)
    assert_only_step_2_was_skipped(steps)
    scales = [step["scale"] for step in steps]
    assert scales == ([2.0**16, 2.0**15, 2.0**15, 2.0**15] if precision == "fp16" else [1.0] * 4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_no_host_sync_in_a_step_that_does_not_log(tiny_model_dir, tmp_path, precision):
    """None of this project's code waits for the GPU in a step that does not log. The one
    library sync allowed: transformers' SDPA mask check (``padding_mask.all()`` in
    masking_utils, which decides whether a batch without padding can skip the mask), at most
    once per forward."""
    counts, sources = count_host_syncs(tiny_model_dir, tmp_path / "run", CUDA, precision)
    print(f"\nhost syncs per optimizer step ({precision}), steps 2..8: {counts}; "
          f"from: {sorted(set(sources))}")
    ours = [source for source in sources if source.startswith(str(REPO))
            and "site-packages" not in source]
    assert ours == []
    library = {source for source in sources if source not in ours}
    assert all("masking_utils" in source for source in library), library
    assert max(counts) <= 1


def test_a_killed_gpu_run_resumes_to_the_same_adapter(bf16_run, tiny_model_dir, shared_data_dir,
                                                      tmp_path, capsys):
    folder = tmp_path / "killed"
    flags = train_flags(tiny_model_dir, shared_data_dir, folder, "--num-workers", "2")
    # A new interpreter: CUDA cannot be used in a child forked from this process.
    killed = run_script(str(REPO / "tests" / "interrupt_train.py"), "kill-at-step:7", "--",
                        *flags)
    assert killed.returncode == -9, killed.stderr
    resumed = run_main(train.main, capsys, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "at step 6 of 12" in resumed.stdout
    ours = load_file(folder / "adapter" / "adapter_model.safetensors")
    reference = load_file(bf16_run / "adapter" / "adapter_model.safetensors")
    for name in reference:
        difference = (ours[name] - reference[name]).abs().max().item()
        assert difference <= RESUME_TOLERANCE, (name, difference)


def test_evaluate_and_predict_score_on_the_gpu_with_workers(bf16_run, shared_data_dir, capsys):
    scored = run_main(evaluate.main, capsys, "--checkpoint", str(bf16_run), "--base",
                      "--data", str(shared_data_dir), "--device", "cuda", "--num-workers", "2")
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((bf16_run / "metrics.json").read_text())
    assert f"{metrics['after']['accuracy']:.4f}" in scored.stdout  # train.py's own score
    labelled = run_main(predict.main, capsys, "--checkpoint", str(bf16_run), "--device", "cuda",
                        "--json", "A wonderful film.", "Dull and badly acted.")
    assert labelled.returncode == 0, labelled.stderr
    rows = [json.loads(line) for line in labelled.stdout.splitlines()]
    assert len(rows) == 2 and all(0.5 <= row["probability"] <= 1 for row in rows)


def test_torchrun_one_process_joins_nccl_and_trains(tiny_model_dir, shared_data_dir, tmp_path):
    folder = tmp_path / "torchrun"
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node=1",
                        str(REPO / "train.py"),
                        *train_flags(tiny_model_dir, shared_data_dir, folder, "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "metrics.json").read_text())["after"]["n"] == 16
