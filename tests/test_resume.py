"""Exact resume: a run killed anywhere and started again ends bit for bit where an
uninterrupted run ends; damaged snapshots fall back or fail clearly; other settings are
refused.

Every interrupted run is a real process, forked from the test (tests/interrupt_train.py
kills or signals it at a chosen point); the uninterrupted and resumed runs are train.main in
the test's own process. All run a tiny BERT *with* dropout, so that the random streams really
matter, at `--precision auto`, which the suite resolves to bf16 (conftest): resuming must be
exact in mixed precision too.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import interrupt_train
import pandas as pd
import pytest
import torch
from conftest import (
    Outcome,
    damaged_copies,
    folder_bytes,
    minilm_path,
    reviews,
    run_forked,
    run_main,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import train
from machinery import snapshots, summarize
from machinery.cli import FIXED, UsageError, resume_rules

# 72 training reviews in batches of 4, 2 batches per optimizer step: 9 steps per epoch, 18 in
# all; snapshots after steps 3, 6, 9 (epoch end), 12, 15, 18; validation after 4, 8, 9, ...
STEPS_PER_EPOCH = 9


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny BERT with dropout, a data folder, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "model"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = root / "data"
    data_dir.mkdir()
    reviews(40).to_csv(data_dir / "train.csv", index=False)
    reviews(8).to_csv(data_dir / "test.csv", index=False)
    flags = ["--model", str(model_dir), "--data", str(data_dir), "--epochs", "2",
             "--batch-size", "4", "--grad-accum-steps", "2", "--save-every", "3",
             "--eval-every", "4", "--log-every", "2", "--lr", "5e-3",
             "--eval-batch-size", "8"]
    reference = root / "reference"
    assert train.main([*flags, "--output-dir", str(reference)]) == 0
    return {"root": root, "flags": flags, "reference": reference}


def interrupted_run(setup: dict, point: str, folder: Path, *extra: str) -> Outcome:
    """train.py interrupted at `point`, into `folder`, in a process of its own."""
    flags = [*setup["flags"], *extra, "--output-dir", str(folder)]
    return run_forked(lambda: interrupt_train.run(point, flags))


def resumed_run(setup: dict, folder: Path, capsys, *extra: str) -> Outcome:
    """The same train.py command again on `folder`, in this process; it must finish."""
    result = run_main(train.main, capsys, *setup["flags"], *extra, "--output-dir", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def training_records(folder: Path) -> list[dict]:
    """log.jsonl without the speed field (the only one that depends on the machine's load)."""
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "samples_per_s"} for record in records]


def assert_same_result(folder: Path, reference: Path) -> None:
    """Same adapter tensors bit for bit, same test metrics, same log of losses."""
    ours = load_file(folder / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    metrics = json.loads((folder / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert metrics["before"] == expected["before"]
    assert metrics["after"] == expected["after"]
    assert training_records(folder) == training_records(reference)


def resumed_step(stdout: str) -> int:
    """The step number in train.py's 'Resuming from ... at step N of ...' line."""
    line = next(line for line in stdout.splitlines() if line.startswith("Resuming from"))
    return int(line.split(" at step ")[1].split()[0])


def test_reference_run_learns_and_cleans_up(setup):
    """The reference really trains (else equality would prove little) and, finished, keeps
    no snapshots."""
    reference = setup["reference"]
    records = training_records(reference)
    assert max(r["step"] for r in records) == 2 * STEPS_PER_EPOCH
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(set(losses)) == len(losses)  # the weights change every step
    assert not any((reference / name).exists() for name in
                   ("snapshot", "snapshot-previous", "snapshot-partial"))


@pytest.mark.parametrize(("point", "extra", "resumes_at"), [
    ("kill-at-step:7", (), 6),  # between snapshots (saved after steps 3 and 6)
    ("kill-at-fsync:10", (), 3),  # writing the step-6 snapshot: its files half on disk
    ("kill-at-replace:3", (), 3),  # between the renames: step 3 is snapshot-previous/
    ("kill-at-step:14", ("--num-workers", "2"), 12),  # epoch 2, worker processes
    ("kill-in-scoring", (), 18),  # training over, scoring the test reviews
])
def test_killed_run_resumes_to_the_identical_result(setup, tmp_path, capsys, point, extra,
                                                    resumes_at):
    """SIGKILL at any point, run the same command again: same weights, metrics and losses."""
    folder = tmp_path / "run"
    killed = interrupted_run(setup, point, folder, *extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "metrics.json").exists()
    resumed = resumed_run(setup, folder, capsys, *extra)
    assert resumed_step(resumed.stdout) == resumes_at
    assert_same_result(folder, setup["reference"])


def test_length_grouped_run_resumes_to_the_identical_result(setup, tmp_path, capsys):
    """--group-by-length batches come from their own sampler: a run killed in epoch 2 and
    started again still ends identical to the uninterrupted grouped run."""
    reference = tmp_path / "reference"
    resumed_run(setup, reference, capsys, "--group-by-length")
    # Another batch order than the plain reference, else this would test nothing new.
    assert training_records(reference) != training_records(setup["reference"])
    folder = tmp_path / "run"
    killed = interrupted_run(setup, "kill-at-step:14", folder, "--group-by-length")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = resumed_run(setup, folder, capsys, "--group-by-length")
    assert resumed_step(resumed.stdout) == 12
    assert_same_result(folder, reference)


@pytest.mark.parametrize(("sig", "exit_code", "step"), [
    ("TERM", 143, 5),
    ("INT", 130, 5),
    ("TERM", 143, STEPS_PER_EPOCH),  # the epoch's last step: its validation comes first
])
def test_signal_finishes_the_step_saves_and_exits(setup, tmp_path, capsys, sig, exit_code,
                                                   step):
    """SIGTERM/SIGINT: the step finishes, a snapshot of it is written, exit 143/130 with a
    resume hint; resuming (with --resume) gives the uninterrupted result."""
    folder = tmp_path / "run"
    stopped = interrupted_run(setup, f"signal-at-step:{step}:{sig}", folder)
    assert stopped.returncode == exit_code, stopped.stderr
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by SIG{sig} at step {step}" in last_line and "--resume" in last_line
    assert json.loads((folder / "snapshot" / "progress.json").read_text())["step"] == step
    resumed = resumed_run(setup, folder, capsys, "--resume")
    assert resumed_step(resumed.stdout) == step
    assert_same_result(folder, setup["reference"])


def test_loss_that_stays_nan_stops_and_keeps_the_last_good_snapshot(setup, tmp_path):
    """NaN losses from step 5 on: the steps are skipped (weights stay finite) and after
    MAX_NONFINITE_STEPS of them the run stops with exit 1 and the step-6 snapshot."""
    folder = tmp_path / "run"
    result = interrupted_run(setup, "nan-from-step:4", folder)
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"inf/NaN for {snapshots.MAX_NONFINITE_STEPS} steps in a row" in last_line
    assert "the snapshot of step 6" in last_line
    assert snapshots.snapshot_problem(folder / "snapshot") is None
    weights = load_file(folder / "snapshot" / "trainable.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_full_disk_stops_the_run_in_one_sentence_and_the_same_command_resumes(setup,
                                                                                tmp_path, capsys):
    """The disk fills up while the second snapshot (step 6) is written: exit 1, one line
    naming the file, the step-3 snapshot intact; with space back, the same command resumes
    from it and ends with the uninterrupted run's result."""
    folder = tmp_path / "run"
    full = interrupted_run(setup, "disk-full-at-save:2", folder)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    last_line = full.stderr.strip().splitlines()[-1]
    partial = folder / snapshots.PARTIAL_SNAPSHOT_DIR / snapshots.TRAINING_STATE_FILE
    assert f": error: could not write {partial}: no space left on device (" in last_line
    assert "run the same command again" in last_line
    assert snapshots.snapshot_problem(folder / "snapshot") is None
    assert json.loads((folder / "snapshot" / "progress.json").read_text())["step"] == 3
    resumed = resumed_run(setup, folder, capsys)
    assert resumed_step(resumed.stdout) == 3
    assert_same_result(folder, setup["reference"])


@pytest.mark.parametrize(("kind", "written", "resumes_at"), [
    ("log", "log.jsonl", None),  # at step 2, before the first snapshot: starts again
    ("checkpoint", "adapter", 3),  # the first validation (step 4): the step-3 snapshot
    ("plots", "training_curves.png", 18),  # after training: the last snapshot
    ("metrics", "metrics.json", 18),
])
def test_a_full_disk_at_any_write_is_one_sentence_and_the_same_command_finishes(
        setup, tmp_path, capsys, kind, written, resumes_at):
    """The disk is full when the run writes the log, the best checkpoint, the plots or
    metrics.json, reported as the libraries report it (no file name in Python's and
    matplotlib's OSError, safetensors' own error type): exit 1 and one line naming the file;
    nothing half-written is left where a reader would take it for whole (metrics.json last,
    the checkpoint swapped in whole); the same command then ends with the uninterrupted
    run's result."""
    folder = tmp_path / "run"
    full = interrupted_run(setup, f"disk-full-at:{kind}", folder)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    last_line = full.stderr.strip().splitlines()[-1]
    assert f": error: could not write {folder / written}: no space left on device (" in last_line
    assert "free some space and run the same command again: " in last_line
    if resumes_at is None:
        assert last_line.endswith(": the run starts again (it had written no snapshot yet)")
    else:  # with how much space the run needs, which its snapshot shows
        assert ": it resumes from the last snapshot, which is intact (the run needs about " \
            in last_line
    assert not (folder / "metrics.json").exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]
    resumed = resumed_run(setup, folder, capsys)
    if resumes_at is None:
        assert "starting it again from the beginning" in resumed.stdout
    else:
        assert resumed_step(resumed.stdout) == resumes_at
    assert_same_result(folder, setup["reference"])


# ---------------------------------------------------------------------------------------------
# Damaged snapshots and other settings


@pytest.fixture(scope="module")
def killed_run(setup) -> Path:
    """A run killed after step 7: snapshot/ holds step 6, snapshot-previous/ step 3."""
    folder = setup["root"] / "killed"
    result = interrupted_run(setup, "kill-at-step:7", folder)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return folder


@pytest.fixture
def killed_copy(killed_run, tmp_path) -> Path:
    """A fresh copy of the killed run folder, free to damage."""
    return Path(shutil.copytree(killed_run, tmp_path / "run"))


def truncate(path: Path) -> None:
    """Cut a file in half, as a full disk or a kill during a write does."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage_snapshot", [
    lambda folder: truncate(folder / "trainable.safetensors"),
    lambda folder: flip_a_byte(folder / "training_state.pt"),
    lambda folder: (folder / "manifest.json").unlink(),
    lambda folder: (folder / "progress.json").unlink(),
], ids=["truncated-weights", "flipped-byte", "no-manifest", "missing-file"])
def test_damaged_latest_snapshot_falls_back_to_the_previous(killed_copy, capsys,
                                                            damage_snapshot):
    damage_snapshot(killed_copy / "snapshot")
    assert snapshots.find_snapshot(killed_copy) == killed_copy / "snapshot-previous"
    assert "warning: the snapshot in" in capsys.readouterr().out


def test_every_snapshot_damaged_is_one_clear_error(killed_copy):
    truncate(killed_copy / "snapshot" / "trainable.safetensors")
    flip_a_byte(killed_copy / "snapshot-previous" / "training_state.pt")
    with pytest.raises(UsageError) as error:
        snapshots.find_snapshot(killed_copy)
    message = str(error.value)
    assert "holds no valid snapshot" in message and "--overwrite" in message
    assert f"{killed_copy / 'snapshot' / 'trainable.safetensors'} has" in message
    assert (f"{killed_copy / 'snapshot-previous' / 'training_state.pt'} does not match its "
            "SHA-256") in message


def test_resume_from_the_previous_snapshot_gives_the_identical_result(setup, killed_copy,
                                                                        capsys):
    """End to end: the latest snapshot is cut short; the run resumes from the one before
    (with a warning) and still ends exactly as the uninterrupted run."""
    truncate(killed_copy / "snapshot" / "trainable.safetensors")
    resumed = resumed_run(setup, killed_copy, capsys)
    assert "is damaged" in resumed.stdout
    assert resumed_step(resumed.stdout) == 3
    assert_same_result(killed_copy, setup["reference"])


def test_a_run_folder_from_before_the_rename_to_snapshot_resumes(setup, killed_copy, capsys):
    """Runs written before the resumable state was called a snapshot keep it in checkpoint/
    and checkpoint-previous/ (the same files), and their config.json lacks the flags added
    since: they resume from the newer, end exactly as the uninterrupted run, and the finished
    run deletes the old folders too."""
    for new, old in zip(("snapshot", "snapshot-previous"), snapshots.OLD_SNAPSHOT_DIRS,
                        strict=True):
        (killed_copy / new).rename(killed_copy / old)
    # Its config.json does not know the flags added since (--labels), nor its snapshots.
    config = json.loads((killed_copy / "config.json").read_text())
    del config["labels"]
    (killed_copy / "config.json").write_text(json.dumps(config))
    resumed = resumed_run(setup, killed_copy, capsys)
    assert resumed_step(resumed.stdout) == 6
    assert_same_result(killed_copy, setup["reference"])
    assert not [name for name in snapshots.ALL_SNAPSHOT_DIRS if (killed_copy / name).exists()]


def run_in_process(setup: dict, folder: Path, *extra: str) -> None:
    """train.main in this process, expected to refuse with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*setup["flags"], *extra, "--output-dir", str(folder)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("changed", "named"), [
    (("--lr", "0.001"), "--lr 0.005 (now 0.001)"),
    (("--seed", "7"), "--seed 42 (now 7)"),
    (("--max-length", "64"), "--max-length 128 (now 64)"),
    (("--lora-r", "4"), "--lora-r 8 (now 4)"),
])
def test_other_settings_are_refused_naming_them(setup, killed_copy, capsys, changed, named):
    before = sorted(p.name for p in killed_copy.rglob("*"))
    run_in_process(setup, killed_copy, *changed)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds an unfinished run with other settings" in message and named in message
    assert sorted(p.name for p in killed_copy.rglob("*")) == before  # nothing touched


def relabel_first_training_review(data: Path) -> None:
    train_csv = pd.read_csv(data / "train.csv")
    train_csv.loc[0, "label"] = 1 - train_csv.loc[0, "label"]
    train_csv.to_csv(data / "train.csv", index=False)


def edit_last_test_review(data: Path) -> None:
    test_csv = pd.read_csv(data / "test.csv")
    test_csv.loc[len(test_csv) - 1, "text"] += " Edited."
    test_csv.to_csv(data / "test.csv", index=False)


@pytest.mark.parametrize("edit", [relabel_first_training_review, edit_last_test_review])
def test_resume_on_edited_reviews_is_refused(setup, tmp_path, capsys, edit):
    """Same --data path, same number of reviews, one label or text changed: the sampler's
    order is the same, but the run would go on with other data than it began with."""
    data = Path(shutil.copytree(setup["root"] / "data", tmp_path / "data"))
    folder = tmp_path / "run"
    killed = interrupted_run(setup, "kill-at-step:7", folder, "--data", str(data))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    edit(data)
    before = sorted(p.name for p in folder.rglob("*"))
    run_in_process(setup, folder, "--data", str(data))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the data is not the snapshot's" in message and "--overwrite" in message
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing touched
    assert json.loads((folder / "snapshot" / "progress.json").read_text())["step"] == 6


def test_every_flag_declares_whether_a_resumed_run_may_change_it():
    rules = resume_rules(train.build_parser())
    assert [flag for flag, rule in rules.items() if rule is None] == []  # from its dataclass
    # Where and how fast the run goes, and how often it reports, as the README lists them.
    assert train.ADJUSTABLE_ON_RESUME == {
        "output_dir", "overwrite", "resume", "device", "num_workers", "eval_batch_size",
        "log_every", "save_every", "compile", "report_to"}
    assert {"lr", "seed", "max_length", "lora_r", "precision", "data"} <= {
        flag for flag, rule in rules.items() if rule == FIXED}
    # A seed sweep's runs may differ in every such flag (summarize.py knows them without
    # importing train.py).
    assert train.ADJUSTABLE_ON_RESUME <= summarize.MAY_DIFFER


def test_finished_run_is_never_overwritten_silently(setup, capsys):
    before = (setup["reference"] / "metrics.json").read_bytes()
    run_in_process(setup, setup["reference"])
    assert "holds a finished run" in capsys.readouterr().err
    assert (setup["reference"] / "metrics.json").read_bytes() == before


def test_resume_needs_a_run_to_resume(setup, tmp_path, capsys):
    run_in_process(setup, tmp_path / "nothing-here", "--resume")
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here").exists()


def test_every_file_of_an_unfinished_run_survives_damage(setup, tmp_path, capsys):
    """test_damage.py's test for a run stopped part-way (SIGINT at step 7: its snapshots of
    steps 6 and 7, the best checkpoint of its validation at step 4, config.json, the log):
    each file cut short, emptied and overwritten in turn, the same command either resumes to
    the uninterrupted run's numbers (a damaged latest snapshot: from the one before it, a
    damaged log: started anew, each with a warning) or refuses in one sentence naming the file
    and leaves the folder as it was (but for its lock file, which names the run that read it)."""
    stopped = tmp_path / "stopped"
    assert interrupted_run(setup, "signal-at-step:7:INT", stopped).returncode == 130
    files = sorted(folder_bytes(stopped))
    assert {"config.json", "log.jsonl", "snapshot/trainable.safetensors",
            "snapshot-previous/training_state.pt",
            "adapter/adapter_model.safetensors"} <= set(files)
    expected = json.loads((setup["reference"] / "metrics.json").read_text())
    problems, outcomes = [], set()
    run = tmp_path / "run"
    for file, kind in damaged_copies(stopped, files, run):
        before = folder_bytes(run)
        result = run_main(train.main, capsys, *setup["flags"], "--output-dir", str(run))
        where = f"{file} {kind}"
        if result.returncode == 0:
            metrics = json.loads((run / "metrics.json").read_text())
            if (metrics["before"], metrics["after"]) != (expected["before"],
                                                         expected["after"]):
                problems.append(f"{where}: other numbers than the uninterrupted run's")
            warned = "is damaged" in result.stdout + result.stderr  # not other warnings
            outcomes.add("resumed with a warning" if warned else "resumed")
            continue
        outcomes.add("refused")
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        after = folder_bytes(run)
        if result.returncode != 2 or "Traceback" in result.stderr:
            problems.append(f"{where}: exit {result.returncode}: {last}")
        elif Path(file).name not in last and Path(file).parent.name not in last:
            problems.append(f"{where}: the refusal does not name the file: {last}")
        elif {k: v for k, v in after.items() if k != ".train.lock"} != \
                {k: v for k, v in before.items() if k != ".train.lock"}:
            problems.append(f"{where}: refused, but the run folder changed")
    assert problems == []
    assert outcomes == {"resumed", "resumed with a warning", "refused"}  # each path was taken
