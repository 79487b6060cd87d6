"""Nothing the program wrote can trip it: every file of a finished run folder, and every cache
file `datasets` keeps of the data, cut short, emptied or overwritten with garbage in turn,
and the commands that read them run again. Each command either gives the same numbers as
before (the file rebuilt, with a one-line warning, or not read at all), or refuses in one
sentence that names the file (exit 2, no traceback) and leaves the run folder as it was.

The files are listed from what a run really writes, not by hand: a file added later falls
under these tests without a word here. test_resume.py does the same for a run stopped part-way
(its snapshots).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DAMAGES, Outcome, damage, damaged_copies, folder_bytes, run_main

import evaluate
import predict
import train
from machinery import report

REVIEW = "A wonderful film, I loved every minute."


# ---------------------------------------------------------------------------------------------
# A finished run folder


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damage") / "run"
    assert train.main(["--model", tiny_model_dir, "--data", str(shared_data_dir),
                       "--output-dir", str(folder), "--batch-size", "4",
                       "--validation-size", "4", "--precision", "fp32"]) == 0
    return folder


def evaluated(run: Path, data: Path, capsys, out: Path) -> tuple[Outcome, object]:
    result = run_main(evaluate.main, capsys, "--checkpoint", str(run), "--data", str(data),
                      "--precision", "fp32", "--json", str(out), "--overwrite")
    if result.returncode != 0:
        return result, None
    return result, [{key: value for key, value in row.items() if key not in ("name", "checkpoint")}
                    for row in json.loads(out.read_text())["results"]]


def predicted(run: Path, data: Path, capsys, out: Path) -> tuple[Outcome, object]:
    result = run_main(predict.main, capsys, "--checkpoint", str(run), "--precision", "fp32",
                      "--json", REVIEW)
    return result, json.loads(result.stdout) if result.returncode == 0 else None


def reported(run: Path, data: Path, capsys, out: Path) -> tuple[Outcome, object]:
    result = run_main(report.main, capsys, str(run))
    if result.returncode != 0:
        return result, None
    # The report of the copy, but for where the copy is (the output_dir it records is the
    # original's).
    return result, [line.replace(str(run), "RUN") for line in
                    (run / report.REPORT_MD).read_text().splitlines()
                    if not line.startswith("| output_dir |")]


# The commands that read a finished run folder, and what each gives that must not change.
READERS = {"evaluate.py": evaluated, "predict.py": predicted, "report": reported}


def test_every_file_of_a_finished_run_survives_damage(finished_run, shared_data_dir, tmp_path,
                                                      capsys):
    files = sorted(folder_bytes(finished_run))
    assert {"config.json", "metrics.json", "log.jsonl", "adapter/adapter_model.safetensors",
            "adapter/labels.json", "adapter/temperature.json"} <= set(files)
    out = tmp_path / "out.json"
    expected = {name: reader(finished_run, shared_data_dir, capsys, out)[1]
                for name, reader in READERS.items()}
    assert all(value is not None for value in expected.values())
    problems = []
    run = tmp_path / "run"
    for file, kind in damaged_copies(finished_run, files, run):
        for name, reader in READERS.items():
            before = folder_bytes(run)
            result, value = reader(run, shared_data_dir, capsys, out)
            where = f"{file} {kind}, {name}"
            if result.returncode == 0:
                if value != expected[name]:
                    problems.append(f"{where}: other numbers than before")
                continue
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
            if result.returncode != 2 or "Traceback" in result.stderr:
                problems.append(f"{where}: exit {result.returncode}: {last}")
            elif Path(file).name not in last:
                problems.append(f"{where}: the refusal does not name the file: {last}")
            elif folder_bytes(run) != before:
                problems.append(f"{where}: refused, but the run folder changed")
    assert problems == []


# ---------------------------------------------------------------------------------------------
# The datasets caches


def test_every_datasets_cache_file_is_built_again_when_damaged(tiny_model_dir, shared_data_dir,
                                                               tmp_path, capsys):
    """train.py's own caches of the data (the files read, the labels checked, the validation
    split, the token ids): each one damaged, the same command trains to the same numbers, and
    says in one line that it built the cache again."""
    data = shutil.copytree(shared_data_dir, tmp_path / "data")  # caches of its own
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    known = set(cache.rglob("*"))

    def trained() -> tuple[Outcome, dict | None]:
        run = tmp_path / "run"
        result = run_main(train.main, capsys, "--model", tiny_model_dir, "--data", str(data),
                          "--output-dir", str(run), "--overwrite", "--batch-size", "4",
                          "--validation-size", "4", "--precision", "fp32")
        metrics = json.loads((run / "metrics.json").read_text()) if result.returncode == 0 \
            else None
        return result, metrics and {row: metrics[row] for row in ("before", "after")}

    _, expected = trained()
    files = sorted(path for path in set(cache.rglob("*")) - known
                   if path.is_file() and path.suffix == ".arrow")
    assert len(files) >= 5  # the two files read, their labels checked, the split, the tokens
    problems = []
    for file in files:
        for kind in DAMAGES:
            damage(file, kind)
            result, metrics = trained()
            warnings = [line for line in result.stderr.splitlines()
                        if line.startswith("warning:") and "cache" in line]
            where = f"{file.name} {kind}"
            if result.returncode != 0:
                problems.append(f"{where}: exit {result.returncode}: "
                                f"{result.stderr.strip().splitlines()[-1:]}")
            elif metrics != expected:
                problems.append(f"{where}: other numbers than before")
            elif len(warnings) != 1:
                problems.append(f"{where}: {len(warnings)} warnings about the cache")
    assert problems == []
