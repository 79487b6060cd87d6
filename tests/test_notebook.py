"""notebooks/colab.ipynb, run top to bottom as a user runs it ("Run all"), on the offline MiniLM
and the real IMDB files: its parameters cell overridden the way papermill does it (assignments
after the defaults), its cells run by a real IPython kernel in the notebook's own folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from conftest import IMDB_DIR, REPO, minilm_path
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.real_data

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"


def notebook_with(**values: object) -> nbformat.NotebookNode:
    """The notebook, its cell tagged "parameters" ending with `values` assigned."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(cell for cell in notebook.cells
                if "parameters" in cell.metadata.get("tags", []))
    names = set(re.findall(r"^([A-Z_]+) = ", cell.source, flags=re.MULTILINE))
    assert set(values) <= names, f"no such parameter: {set(values) - names}"
    cell.source += "".join(f"\n{name} = {value!r}" for name, value in values.items())
    return notebook


def run_all(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Execute every cell in order, from the notebook's folder; a failing cell raises."""
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    return client.execute()


def text_of(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell printed."""
    return "".join(output.get("text", "") for output in cell.outputs)


def offline(run_dir: Path, **values: object) -> nbformat.NotebookNode:
    """The notebook's parameters for this machine: the local MiniLM and IMDB, a small fp32 run."""
    defaults = {"INSTALL": False, "MODEL": minilm_path(), "DATA": str(IMDB_DIR),
                "TRAIN_SAMPLES": 128, "EVAL_SAMPLES": 64, "PRECISION": "fp32",
                "RUN_DIR": str(run_dir)}
    return notebook_with(**{**defaults, **values})


def test_the_colab_notebook_runs_top_to_bottom(tmp_path):
    run_dir = tmp_path / "run"
    cells = [cell for cell in run_all(offline(run_dir)).cells if cell.cell_type == "code"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"before", "after"} <= set(metrics)
    train_cell, evaluate_cell, predict_cell, plots_cell = cells[2:]
    # train.py printed the pre-trained model's accuracy and the fine-tuned model's beside it.
    assert f"Pre-trained model: test accuracy {metrics['before']['accuracy']:.4f}" in \
        text_of(train_cell)
    assert "Test reviews (64), pre-trained vs fine-tuned (lora)" in text_of(train_cell)
    # evaluate.py scored the pre-trained model and the checkpoint on the same 64 reviews.
    assert f"{metrics['after']['accuracy']:.4f}" in text_of(evaluate_cell)
    # predict.py labelled both example reviews.
    table = text_of(predict_cell).splitlines()
    assert [line.split()[0] for line in table[-2:]] == ["1", "2"]
    assert all(line.split()[1] in ("negative", "positive") for line in table[-2:])
    # The two plots and the report's summary are shown inline.
    kinds = [kind for output in plots_cell.outputs for kind in output.get("data", {})]
    assert kinds.count("image/png") == 2 and "text/markdown" in kinds


def test_a_failing_script_stops_the_notebook_there(tmp_path):
    """A `!` command that fails does not stop a notebook by itself: stop_if_failed does, so
    that the evaluation cells never run on a checkpoint that was not written."""
    with pytest.raises(CellExecutionError, match=re.escape("train.py failed with exit code 2")):
        run_all(offline(tmp_path / "run", DATA=str(tmp_path / "no-such-folder")))
    assert not (tmp_path / "run" / "metrics.json").exists()
