"""The one command behind every published number (benchmarks/results.py): its quick mode runs
every experiment of docs/results.md end to end and writes each table from the runs' files; a
second call runs nothing again; and the tables committed in README.md and docs/results.md are
exactly what the committed docs/results.json gives, from the full mode: none typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import IMDB_DIR, REPO, run_main, run_script
from sklearn.metrics import f1_score

from benchmarks import results, results_tables
from benchmarks.results_tables import DOCS_JSON, README, RESULTS_DOC, TABLES, region

pytestmark = pytest.mark.real_data  # the three-class set is built from the IMDB Parquet files


def copy_docs(root: Path) -> Path:
    """README.md and docs/results.md of the project, copied into `root`."""
    for path in (README, RESULTS_DOC):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, root / path)
    return root


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_model_dir) -> dict:
    """One quick mode with the tiny model, publishing into copies of the documents."""
    folder = tmp_path_factory.mktemp("results")
    root, out = copy_docs(folder / "docs-copy"), folder / "out"
    argv = ["quick", "--model", tiny_model_dir, "--data", str(IMDB_DIR), "--out", str(out),
            "--docs", str(root)]
    done = run_script("-m", "benchmarks.results", *argv, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"argv": argv, "root": root, "out": out, "stderr": done.stderr,
            "texts": {path: (root / path).read_text() for path in (README, RESULTS_DOC)}}


def metrics(out: Path, experiment: str) -> dict:
    """metrics.json of an experiment's train.py run."""
    return json.loads((out / experiment / results.TRAIN_RUN / "metrics.json").read_text())


def table_rows(text: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows[2:]}


def test_quick_mode_writes_every_table_from_the_runs(quick):
    texts, out = quick["texts"], quick["out"]
    for name, (path, _) in TABLES.items():
        assert region(texts[path], name) != region((REPO / path).read_text(), name), name
    smoke = metrics(out, "smoke")
    readme = table_rows(region(texts[README], "readme-smoke"))
    assert readme["after LoRA"][0] == f"{smoke['after']['accuracy']:.4f}"
    assert readme["before: pre-trained, random head"][4] == f"{smoke['before']['loss']:.4f}"
    lora = metrics(out, "lora-128-head")
    methods = table_rows(region(texts[RESULTS_DOC], "methods"))
    assert methods["`lora`"][1].startswith(f"{lora['parameters']['trainable']:,} ")
    p, n = lora["after"]["accuracy"], lora["after"]["n"]
    assert methods["`lora`"][5] == f"{p:.4f} ± {math.sqrt(p * (1 - p) / n):.4f}"
    timing = table_rows(region(texts[RESULTS_DOC], "timing"))
    assert [f"`{e.name}`" for e in results.experiments(results.SCALES["quick"])] == \
        [name for name in timing if name != "**all**"]
    published = json.loads((quick["root"] / DOCS_JSON).read_text())
    assert published == json.loads((out / results.RESULTS_FILE).read_text())


def test_paired_rows_count_the_reviews_where_one_model_is_right(quick):
    out = quick["out"]
    lines = [json.loads(line) for line in (out / "paired" / "predictions.jsonl").open()]
    names = {row["name"]: row["checkpoint"] for row in
             json.loads((out / "paired" / "evaluation.json").read_text())["results"]}
    lora, full = (next(name for name, checkpoint in names.items()
                       if checkpoint and f"/{e}/" in checkpoint)
                  for e in ("lora-128-head", "full-128-head"))
    labels = np.array([line["label"] for line in lines])
    right = {name: np.array([line["probabilities"][name] for line in lines]).argmax(1) == labels
             for name in (lora, full)}
    rows = table_rows(region(quick["texts"][RESULTS_DOC], "paired"))
    assert rows["`full` vs `lora`"][0] == str(len(labels))
    assert rows["`full` vs `lora`"][3] == (f"{int((right[lora] & ~right[full]).sum())} / "
                                           f"{int((~right[lora] & right[full]).sum())}")


def test_pooling_rows_give_each_class_its_f1(quick):
    after = metrics(quick["out"], "kclass-mean")["after"]
    matrix = np.array(after["confusion_matrix"])
    truth = np.repeat(np.arange(len(matrix)), matrix.sum(1))
    predicted = np.concatenate([np.repeat(np.arange(len(matrix)), row) for row in matrix])
    rows = [row for row in region(quick["texts"][RESULTS_DOC], "pooling").splitlines()
            if row.startswith("| 3 classes | mean")]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[3] == f"{f1_score(truth, predicted, average='macro'):.4f}"
    per_class = f1_score(truth, predicted, average=None)
    assert cells[4] == ", ".join(f"{name} {score:.4f}" for name, score in
                                 zip(("negative", "positive", "technical"), per_class,
                                     strict=True))


def test_a_second_call_runs_nothing_again(quick):
    out, root = quick["out"], quick["root"]
    records = {path: path.read_bytes() for path in out.glob(f"*/{results.EXPERIMENT_FILE}")}
    assert len(records) == len(results.experiments(results.SCALES["quick"]))
    published = (root / DOCS_JSON).read_bytes()
    done = run_script("-m", "benchmarks.results", *quick["argv"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("skipped") == len(records)
    assert {path: path.read_bytes() for path in records} == records
    # The same numbers, so the same tables and JSON, to the byte.
    assert {path: (root / path).read_text() for path in (README, RESULTS_DOC)} == quick["texts"]
    assert (root / DOCS_JSON).read_bytes() == published


def test_an_experiment_whose_command_changed_runs_again(quick):
    experiment = results.experiments(results.SCALES["quick"])[0]
    model, data = quick["argv"][2], quick["argv"][4]
    command = results.command_line(experiment, model, data, quick["out"])
    assert results.finished(quick["out"] / experiment.name, command) is not None
    changed = [*command[:-2], "--seed", "7", *command[-2:]]
    assert results.finished(quick["out"] / experiment.name, changed) is None


def test_an_experiment_whose_input_was_made_again_runs_again(quick):
    model, data, out = quick["argv"][2], quick["argv"][4], quick["out"]
    pooling = next(e for e in results.experiments(results.SCALES["quick"])
                   if e.name == "smoke-pooling")
    assert results.requirements(pooling) == ["smoke-cls", "smoke"]
    assert results.up_to_date(pooling, model, data, out) is not None
    record = out / "smoke" / results.EXPERIMENT_FILE
    times = record.stat()
    later = (out / "smoke-pooling" / results.EXPERIMENT_FILE).stat().st_mtime + 1
    os.utime(record, (later, later))  # as if the smoke run had been made again
    try:
        assert results.up_to_date(pooling, model, data, out) is None
    finally:
        os.utime(record, (times.st_atime, times.st_mtime))


def test_an_experiment_whose_input_is_missing_is_refused(capsys, tiny_model_dir, tmp_path):
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(tmp_path), "--only", "smoke-pooling")
    assert outcome.returncode == 2
    assert "experiment smoke-pooling reads smoke-cls, which has not run" in outcome.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_input_is_refused_before_any_experiment_runs(capsys, tiny_model_dir, tmp_path):
    # smoke would run first (minutes in full mode), then smoke-pooling would find no smoke-cls.
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(tmp_path), "--only", "smoke", "smoke-pooling")
    assert outcome.returncode == 2
    assert "experiment smoke-pooling reads smoke-cls, which has not run" in outcome.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_partial_set_is_refused_before_any_work(capsys, tiny_model_dir, tmp_path):
    root, out = copy_docs(tmp_path / "docs-copy"), tmp_path / "out"
    before = {path: (root / path).read_bytes() for path in (README, RESULTS_DOC)}
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(out), "--docs", str(root), "--only", "smoke")
    assert outcome.returncode == 2
    total = len(results.experiments(results.SCALES["quick"]))
    assert "--docs publishes a complete set, and smoke-cls, " in outcome.stderr
    assert f"({total - 1} of {total}) would not have finished" in outcome.stderr
    assert {path: (root / path).read_bytes() for path in before} == before
    assert not (root / DOCS_JSON).exists() and not out.exists()


def test_only_over_a_complete_set_publishes_it_with_the_command_that_gives_it(capsys, quick,
                                                                             tmp_path):
    out, root = quick["out"], copy_docs(tmp_path)
    collected = (out / results.RESULTS_FILE).read_bytes()
    try:
        outcome = run_main(results.main, capsys, *quick["argv"][:7], "--docs", str(root),
                           "--only", "smoke", "paired")
    finally:
        (out / results.RESULTS_FILE).write_bytes(collected)  # the other tests read it
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert outcome.stderr.count("skipped") == 2
    published = json.loads((root / DOCS_JSON).read_text())
    assert list(published["experiments"]) == [
        e.name for e in results.experiments(results.SCALES["quick"])]
    assert "--only" not in published["command"] and " --docs " in published["command"]
    assert results.without_only(["quick", "--only=smoke", "--out", "x"]) == ["quick", "--out", "x"]


def test_quick_mode_never_replaces_the_full_modes_numbers(capsys, tiny_model_dir, tmp_path):
    root = copy_docs(tmp_path / "docs-copy")
    shutil.copy(REPO / DOCS_JSON, root / DOCS_JSON)  # the project's own: full mode
    before = {path: (root / path).read_bytes() for path in (README, RESULTS_DOC, DOCS_JSON)}
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(tmp_path / "out"), "--docs", str(root))
    assert outcome.returncode == 2
    assert "holds full-mode numbers, which quick mode would replace" in outcome.stderr
    assert {path: (root / path).read_bytes() for path in before} == before
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_damaged_published_file_is_one_sentence(capsys, tiny_model_dir, tmp_path):
    root = copy_docs(tmp_path / "docs-copy")
    (root / DOCS_JSON).write_text('{"mode": "fu')  # cut short
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(tmp_path / "out"), "--docs", str(root))
    assert outcome.returncode == 2 and "Traceback" not in outcome.stderr
    assert f"{root / DOCS_JSON} is damaged" in outcome.stderr


def test_every_compared_pair_has_its_row_label():
    pairs = {pair for e in results.experiments(results.SCALES["full"]) for pair in e.compare}
    assert pairs == set(results_tables.PAIR_LABELS)


def test_the_published_tables_are_what_docs_results_json_gives():
    published = json.loads((REPO / DOCS_JSON).read_text())
    assert published["mode"] == "full"
    assert published["scale"] == asdict(results.SCALES["full"])
    assert list(published["experiments"]) == [
        e.name for e in results.experiments(results.SCALES["full"])]
    texts = results_tables.rendered(REPO, published)
    for name, (path, _) in TABLES.items():
        assert region(texts[path], name) == region((REPO / path).read_text(), name), (
            f"the {name} table of {path} is not what docs/results.json gives: run "
            "python -m benchmarks.results render --docs .")


def test_a_folder_it_did_not_make_is_never_removed(capsys, tiny_model_dir, tmp_path):
    own = tmp_path / "smoke"  # say, a run of the user's own in the --out folder
    own.mkdir()
    (own / "metrics.json").write_text("{}")
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--out", str(tmp_path), "--only", "smoke")
    assert outcome.returncode == 2
    assert "was not made by this command" in outcome.stderr
    assert [path.name for path in own.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("argv, message", [
    (["quick", "--only", "nosuch"], "no experiment named nosuch"),
    (["render"], "render needs --docs"),
    (["quick", "--data", "/nonexistent"], "no train.parquet there"),
])
def test_bad_input_is_one_line(capsys, tiny_model_dir, argv, message):
    outcome = run_main(results.main, capsys, *argv, "--model", tiny_model_dir)
    assert outcome.returncode == 2
    assert message in outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_documents_without_the_markers_are_refused(capsys, tiny_model_dir, tmp_path):
    root = copy_docs(tmp_path)
    (root / README).write_text("# no tables here\n")
    outcome = run_main(results.main, capsys, "quick", "--model", tiny_model_dir,
                       "--docs", str(root))
    assert outcome.returncode == 2
    assert "<!-- results:readme-smoke -->" in outcome.stderr
    assert not (root / DOCS_JSON).exists()
