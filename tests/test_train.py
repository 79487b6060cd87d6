"""The training loop (accumulation, clipping, schedule) and both command lines, on a tiny BERT."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO, reviews, run_main
from step_probe import (
    SYNC_WARNING,
    assert_only_step_2_was_skipped,
    count_host_syncs,
    run_with_inf_gradient,
)

import evaluate
import train
from data import PaddingCollator, make_loader, tokenize
from lora_model import load_base_model, prepare_model
from machinery.cli import parse_options
from machinery.hub import load_tokenizer
from machinery.run_folder import Job
from train import NO_DECAY, Trainer

CPU = torch.device("cpu")


def make_trainer(tiny_model_dir, tmp_path, n_examples: int, *flags: str) -> Trainer:
    recipe, _, run_options, _ = parse_options(train.build_parser(), [
        "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--lora-dropout", "0",
        "--warmup-ratio", "0", "--lr", "1e-2", *flags], train.OPTIONS)
    tmp_path.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(recipe.seed)
    tokenizer = load_tokenizer(tiny_model_dir)
    tokens = tokenize(reviews(n_examples // 2), tokenizer, 24, "head")
    collator = PaddingCollator(tokenizer.pad_token_id, CPU)
    train_loader = make_loader(tokens, recipe.batch_size, collator, shuffle=True,
                               seed=recipe.seed)
    validation_loader = make_loader(tokens, 8, collator, shuffle=False)
    model = prepare_model(load_base_model(tiny_model_dir), recipe.method, recipe.lora_r,
                          recipe.lora_alpha, recipe.lora_dropout, recipe.lora_targets)
    job = Job.one_process(CPU, "fp32")
    return Trainer(recipe, run_options, job, model, tokenizer, train_loader, validation_loader)


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()
            if p.requires_grad}


def test_accumulating_two_half_batches_equals_one_full_batch(tiny_model_dir, tmp_path):
    full = make_trainer(tiny_model_dir, tmp_path / "full", 16, "--batch-size", "8")
    half = make_trainer(tiny_model_dir, tmp_path / "half", 16, "--batch-size", "4",
                        "--grad-accum-steps", "2")
    assert trainable_state(full).keys() == trainable_state(half).keys()
    for trainer in (full, half):
        trainer.train()
    assert full.state.step == half.state.step == 2
    expected, actual = trainable_state(full), trainable_state(half)
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=1e-5), name


def test_scheduler_and_step_count_follow_optimizer_steps_including_a_short_last_group(
        tiny_model_dir, tmp_path):
    # 8 batches of 2 with accumulation 3: optimizer steps after batches 3, 6 and 8.
    trainer = make_trainer(tiny_model_dir, tmp_path, 16, "--batch-size", "2",
                           "--grad-accum-steps", "3", "--log-every", "1")
    assert trainer.total_steps == 3
    trainer.train()
    assert trainer.state.step == 3
    assert trainer.scheduler.last_epoch == 3
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # linear decay ends at zero
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert records[-1]["validation"]["n"] == 16


def gradient_norms_around_a_step(trainer: Trainer) -> tuple[float, list[float]]:
    """Backward a loss scaled up 10,000 times, then one optimizer step: the gradient norm
    after backward, and the norms the optimizer was handed (one per step)."""
    def norm() -> float:
        return torch.norm(torch.stack([p.grad.norm() for p in trainer.params])).item()

    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append(norm()))
    batch = next(iter(trainer.train_loader))
    # Through the scaler, as the loop does (at fp32 its scale is 1).
    trainer.scaler.scale(trainer.model(**batch).loss * 1e4).backward()
    unclipped = norm()
    trainer.optimizer_step()
    return unclipped, seen


def test_gradient_norm_is_clipped_before_the_optimizer_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, 8, "--batch-size", "8",
                           "--max-grad-norm", "0.5")
    unclipped, seen = gradient_norms_around_a_step(trainer)
    assert unclipped > 5  # far larger than 0.5
    assert seen == [pytest.approx(0.5, rel=1e-4)]


def test_max_grad_norm_zero_leaves_the_gradient_as_it_is(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, 8, "--batch-size", "8",
                           "--max-grad-norm", "0")
    unclipped, seen = gradient_norms_around_a_step(trainer)
    assert unclipped > 5
    assert seen == [pytest.approx(unclipped, rel=1e-6)]


def test_weight_decay_shrinks_weights_but_not_biases_or_layer_norm(tiny_model_dir, tmp_path):
    # --method full: every kind of parameter is trainable. With zero gradients AdamW's
    # update is its decoupled decay alone: w <- w x (1 - lr x weight_decay).
    trainer = make_trainer(tiny_model_dir, tmp_path, 8, "--method", "full", "--lr", "0.1",
                           "--weight-decay", "0.3")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for param in trainer.params:
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()
    exempt = {n for n in before if any(key in n for key in NO_DECAY)}
    assert any("LayerNorm.weight" in n for n in exempt) and any(".bias" in n for n in exempt)
    for name, param in trainer.model.named_parameters():
        expected = before[name] if name in exempt else before[name] * (1 - 0.1 * 0.3)
        assert torch.allclose(param, expected, rtol=1e-6, atol=0), name
    assert not torch.equal(trainer.model.classifier.weight, before["classifier.weight"])


def test_warmup_ratio_ramps_the_learning_rate_up_then_down(tiny_model_dir, tmp_path):
    # 16 reviews in batches of 4, 2 epochs: 8 optimizer steps; --warmup-ratio 0.5 warms up
    # over the first 4, then decays linearly to 0 at step 8.
    trainer = make_trainer(tiny_model_dir, tmp_path, 16, "--batch-size", "4", "--epochs", "2",
                           "--warmup-ratio", "0.5", "--log-every", "1")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    peak = 1e-2
    expected = [(s, peak * s / 4 if s <= 4 else peak * (8 - s) / 4) for s in range(1, 9)]
    assert [s for s, _ in lrs] == [s for s, _ in expected]
    assert [lr for _, lr in lrs] == pytest.approx([lr for _, lr in expected], rel=1e-9)


def test_train_then_evaluate_from_the_command_line(tiny_model_dir, csv_data_dir, tmp_path,
                                                  capsys):
    """train.py's command line, then evaluate.py's, in this process (a new interpreter costs
    ~10 s of imports: the real-data tests start both scripts as commands, and the CPU
    benchmark starts train.py)."""
    run = tmp_path / "run"
    result = run_main(train.main, capsys, "--model", tiny_model_dir, "--data", str(csv_data_dir),
                      "--output-dir", str(run), "--epochs", "2", "--batch-size", "4",
                      "--validation-size", "4", "--eval-every", "2", "--lr", "1e-3")
    assert result.returncode == 0, result.stderr
    assert "before" in result.stdout and "after" in result.stdout
    assert "trainable" in result.stdout
    for name in ("config.json", "log.jsonl", "metrics.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "training_curves.png", "comparison.png",
                 "report.md"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for row in ("before", "after"):
        assert set(metrics[row]) >= {"accuracy", "precision", "recall", "f1", "loss", "n"}
        assert metrics[row]["n"] == 16
    # LoRA r=8 on query and value in 2 layers of width 32, plus the 2-label head. As in peft's
    # own count, the total holds the encoder, the adapters and both copies of the head (the
    # frozen original and the trained copy that peft keeps beside it).
    lora, head = 2 * 2 * (8 * 32 + 32 * 8), 32 * 2 + 2
    encoder = sum(p.numel() for p in load_base_model(tiny_model_dir).bert.parameters())
    assert metrics["parameters"] == {"trainable": lora + head,
                                     "total": encoder + lora + 2 * head}
    assert 0 < metrics["train_seconds"] < metrics["wall_seconds"]
    assert f"| accuracy | {metrics['before']['accuracy']:.4f} | " in (
        run / "report.md").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["train_examples"] == 20 and config["validation_examples"] == 4
    assert config["versions"]["torch"] == torch.__version__
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    validations = [r for r in log if "validation" in r]
    assert [r["step"] for r in validations] == [2, 4, 5, 6, 8, 10]  # every 2 steps + epoch ends

    out = tmp_path / "eval.json"
    plot = tmp_path / "plots" / "compare.png"
    result = run_main(evaluate.main, capsys, "--base", "--checkpoint", str(run), "--data",
                      str(csv_data_dir), "--json", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["base", str(run / "adapter")]
    for row, key in zip(rows, ("before", "after"), strict=True):
        for metric in ("accuracy", "precision", "recall", "f1", "loss", "n"):
            assert row[metric] == metrics[key][metric], (key, metric)
        assert row["confusion_matrix"] == metrics[key]["confusion_matrix"]


def test_overwrite_starts_the_run_folder_over(tiny_model_dir, csv_data_dir, tmp_path, capsys,
                                              monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(REPO)
    relative_model = os.path.relpath(tiny_model_dir, REPO)  # as a user types it
    flags = ["--model", relative_model, "--data", str(csv_data_dir), "--output-dir", str(run),
             "--batch-size", "4", "--validation-size", "4", "--log-every", "1"]
    assert run_main(train.main, capsys, *flags).returncode == 0
    first_log = (run / "log.jsonl").read_text()
    (run / "adapter" / "stale.bin").write_bytes(b"from an older run")
    (run / "notes.txt").write_text("mine")
    result = run_main(train.main, capsys, *flags, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (run / "log.jsonl").read_text().count("\n") == first_log.count("\n")  # not appended
    assert not (run / "adapter" / "stale.bin").exists()
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())


def test_unreachable_hub_names_the_local_model_flag(tmp_path, capsys):
    result = run_main(train.main, capsys, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "bert-base-uncased" in result.stderr and "--model PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_dataset_names_the_local_data_flag(tiny_model_dir, capsys):
    result = run_main(evaluate.main, capsys, "--base", "--model", tiny_model_dir)
    assert result.returncode == 2
    assert "'imdb'" in result.stderr and "--data PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_refuses_a_plot_format_it_cannot_write_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--base", "--model", str(tmp_path), "--plot", str(tmp_path / "a.bmp")])
    assert exit_info.value.code == 2
    assert "--plot" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_with_inf_gradients_is_skipped_on_the_device(tiny_model_dir, tmp_path, precision):
    """Step 2's gradients are inf: its update is skipped (weights finite and unchanged), the
    schedule does not count it, the scale stays 1 (no loss scaling outside fp16), and the
    host learns of it only when it reads the device counters (a log step)."""
    trainer, steps = run_with_inf_gradient(tiny_model_dir, tmp_path / "run", CPU, precision,
                                           bad_step=2, steps=4)
    assert_only_step_2_was_skipped(steps)
    assert {step["scale"] for step in steps} == {1.0}
    assert trainer.state.step == 4 and trainer.state.nonfinite_steps == 0


def test_the_sync_probe_judges_the_steps_alone(tiny_model_dir, tmp_path, monkeypatch):
    """count_host_syncs (tests/test_gpu.py's probe) counts a sync made inside a step and
    ignores the run's deliberate ones after the last step: its log line, the epoch's validation
    and its snapshot. Here the syncs are warnings raised at those points, as torch raises them
    on CUDA."""
    def syncing(method, where: str):
        def wrapper(self, *args, **kwargs):
            warnings.warn(f"{SYNC_WARNING} ({where})", stacklevel=1)
            return method(self, *args, **kwargs)
        return wrapper

    for name in ("log_training", "validate", "take_snapshot", "optimizer_step"):
        monkeypatch.setattr(Trainer, name, syncing(getattr(Trainer, name), name))
    counts, sources = count_host_syncs(tiny_model_dir, tmp_path / "run", CPU, "fp32", steps=8)
    # Steps 2..8, each with the one sync of its optimizer step; none of the deliberate ones.
    assert counts == [1] * 7
    assert len(sources) == 7 and len(set(sources)) == 1
