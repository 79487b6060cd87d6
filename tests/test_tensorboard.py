"""--report-to tensorboard: the event files hold log.jsonl's curves at log.jsonl's steps (a
resumed run without a step twice), the test metrics and the settings; under torchrun rank 0
alone writes them; without the package it is one sentence and nothing written."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import interrupt_train
import pytest
from conftest import run_forked, run_main, run_ranks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from machinery import tracking
from machinery.tracking import TENSORBOARD_DIR


def flags(model: str, data: Path, folder: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data", str(data), "--output-dir", str(folder),
            "--batch-size", "4", "--validation-size", "4", "--epochs", "2", "--log-every", "2",
            "--save-every", "3", "--eval-every", "4", "--precision", "fp32", "--lr", "5e-3",
            "--report-to", "tensorboard", *extra]


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs, in step order."""
    accumulator = events(run)
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def log_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's numbers by the tags TensorBoard gets them under."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "validation" in record:
            values = {f"validation/{key}": value for key, value in record["validation"].items()}
        else:
            values = {f"train/{key}": record[key] for key in
                      ("loss", "lr", "grad_norm", "samples_per_s")}
        for tag, value in values.items():
            if isinstance(value, float):
                found.setdefault(tag, []).append((record["step"], value))
    return found


def assert_mirrors_the_log(run: Path) -> dict:
    tensorboard, log = curves(run), log_curves(run)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "validation/accuracy", "validation/f1", "validation/loss"} <= set(log)
    for tag, points in log.items():
        assert [step for step, _ in tensorboard[tag]] == [step for step, _ in points], tag
        assert [value for _, value in tensorboard[tag]] == pytest.approx(
            [value for _, value in points], rel=1e-6), tag  # stored as float32
    return tensorboard


def test_the_event_files_mirror_the_log_and_hold_the_results(tiny_model_dir, shared_data_dir,
                                                              tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(tiny_model_dir, shared_data_dir, run)) == 0
    tensorboard = assert_mirrors_the_log(run)
    metrics = json.loads((run / "metrics.json").read_text())
    last = max(step for points in tensorboard.values() for step, _ in points)
    for row in ("before", "after"):
        assert tensorboard[f"test/{row}/accuracy"] == [
            (last, pytest.approx(metrics[row]["accuracy"]))]
    # The settings as hparams: the session's start (its values) and its end are written.
    assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        events(run).PluginTagToContent("hparams"))


def test_a_resumed_run_writes_no_step_twice(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    """Stopped by SIGINT at step 7 (its last snapshot at step 7, its log and event files of
    steps 2..7 and beyond up to the stop), then resumed: each step once, as in log.jsonl."""
    run = tmp_path / "run"
    stopped = run_forked(lambda: interrupt_train.run(
        "signal-at-step:7:INT", flags(tiny_model_dir, shared_data_dir, run)))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    result = run_main(train.main, capsys, *flags(tiny_model_dir, shared_data_dir, run))
    assert result.returncode == 0, result.stderr[-2000:]
    tensorboard = assert_mirrors_the_log(run)
    steps = [step for step, _ in tensorboard["train/loss"]]
    assert steps == sorted(set(steps)) and 8 in steps  # once each, and past the stop


def test_a_writer_opened_within_the_last_ones_second_still_sorts_after_it(tmp_path):
    """TensorBoard reads event files in name order (the second opened, host, PID): a resumed
    run's writer, opened in its killed run's second by a process of lower PID, must come after
    the killed run's file, or the purge of its steps would not apply to it."""
    folder = tmp_path / TENSORBOARD_DIR
    folder.mkdir()
    killed = (folder / f"events.out.tfevents.{int(time.time()):010d}."
                       f"{socket.gethostname()}.99999999.0")  # a PID that sorts after ours
    killed.touch()
    tracking.TensorBoardLog(tmp_path, resumed_at=7).close()
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0] == killed


def test_under_torchrun_rank_0_alone_writes(tiny_model_dir, shared_data_dir, tmp_path):
    """Two ranks (conftest.run_ranks: torchrun's variables, a gloo process group): every event
    file comes from one process (its PID ends the file name: events.out.tfevents.TIME.HOST.PID
    and a count), and the curves are log.jsonl's, which rank 0 alone writes too."""
    run = tmp_path / "run"
    for outcome in run_ranks(lambda: train.main(flags(tiny_model_dir, shared_data_dir, run))):
        assert outcome.returncode == 0, outcome.stderr[-3000:]
    files = list((run / TENSORBOARD_DIR).rglob("events.out.tfevents.*"))
    assert files and len({file.name.split(".")[-2] for file in files}) == 1
    assert_mirrors_the_log(run)


def test_without_the_package_it_is_one_sentence_and_nothing_written(
        tiny_model_dir, shared_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    run = tmp_path / "run"
    result = run_main(train.main, capsys, *flags(tiny_model_dir, shared_data_dir, run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--report-to tensorboard needs the tensorboard package, which is not installed: pip "
        "install tensorboard (or leave out --report-to)")
    assert not run.exists()
