"""Every input mistake ends in one sentence on stderr, exit code 2, no traceback, nothing written.

The many refusals of train.py's and evaluate.py's flags, data and checkpoints call the
scripts' main() in this process (the same code a command line runs, without ~10 s of imports
per case); one evaluate.py case at the end runs the real command line in a new interpreter,
as a user would (test_train.py runs `python train.py` itself, test_predict.py `python
predict.py`).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import reviews, run_main
from datasets import Dataset
from matplotlib.figure import Figure
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
)

import evaluate as evaluate_script
import train as train_script
from lora_model import load_base_model, save_adapter, wrap_with_lora
from machinery.data_sources import load_split
from machinery.hub import load_tokenizer
from machinery.run_folder import lock_run_folder


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove nothing was written or changed."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_refused(result, *phrases: str) -> str:
    """Exit code 2, no traceback, and the last stderr line is one error naming the problem."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert ": error: " in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.fixture
def train(tiny_model_dir, csv_data_dir, tmp_path, capsys):
    """Run train.py on the tiny model and CSV data with extra flags; check run/ stays absent."""
    run = tmp_path / "run"

    def go(*flags: str, data: Path | str = csv_data_dir, model: str = tiny_model_dir):
        result = run_main(train_script.main, capsys, "--model", model, "--data", str(data),
                          "--output-dir", str(run), "--epochs", "1", *flags)
        assert not run.exists(), "a refused run must not create its output folder"
        return result

    return go


# --- data ---------------------------------------------------------------------------------


def test_missing_data_folder(train, tmp_path):
    assert_refused(train(data=tmp_path / "nowhere" / "imdb"), "--data folder",
                   "does not exist")


def test_folder_without_train_and_test_files(train, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("no reviews here")
    assert_refused(train(data=folder), "has no train data", "train.parquet")


def write_aclimdb(root: Path, counts: dict[str, int]) -> Path:
    for key, n in counts.items():
        folder = root / key
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}_5.txt").write_text(f"review {key} {i}", encoding="utf-8")
    return root


def test_aclimdb_with_an_empty_class_folder(train, tmp_path):
    root = write_aclimdb(tmp_path / "aclImdb", {"train/neg": 6, "train/pos": 0,
                                                 "test/neg": 2, "test/pos": 2})
    assert_refused(train(data=root), str(root / "train" / "pos"), "holds no *.txt")


def test_aclimdb_with_a_missing_class_folder(train, tmp_path):
    root = write_aclimdb(tmp_path / "aclImdb", {"train/neg": 6, "train/pos": 6,
                                                 "test/neg": 2})
    assert_refused(train(data=root), str(root / "test" / "pos"), "is missing")


def test_aclimdb_file_that_is_not_utf8(train, tmp_path):
    root = write_aclimdb(tmp_path / "aclImdb", {"train/neg": 6, "train/pos": 6,
                                                 "test/neg": 2, "test/pos": 2})
    bad = root / "train" / "pos" / "3_5.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert_refused(train(data=root), str(bad), "not valid UTF-8")


def test_csv_that_is_not_utf8(train, csv_data_dir):
    (csv_data_dir / "train.csv").write_bytes("text,label\nd\xe9j\xe0 vu,1\n".encode("latin-1"))
    assert_refused(train(), str(csv_data_dir / "train.csv"), "not valid UTF-8")


def test_empty_file(train, csv_data_dir):
    (csv_data_dir / "test.csv").write_text("")
    assert_refused(train(), str(csv_data_dir / "test.csv"), "the file is empty")


def test_csv_with_a_broken_row(train, csv_data_dir):
    (csv_data_dir / "train.csv").write_text('text,label\n"fine",1\n"bad",0,extra,fields\n')
    assert_refused(train(), str(csv_data_dir / "train.csv"), "Expected 2 fields in line 3")


def test_missing_text_column_lists_the_columns(train, csv_data_dir):
    assert_refused(train("--text-column", "review"), "'review' not found",
                   "columns: text, label", "--text-column")


def test_labels_that_mix_class_ids_and_names_are_refused(train, csv_data_dir):
    (csv_data_dir / "train.csv").write_text(
        "text,label\ngood,1\nmeh,3\nbad,0\nfine,positive\nhmm,neutral\n")
    assert_refused(train(), "mix class ids (0, 1, 3) and class names (neutral, positive)")


def test_a_test_label_outside_the_training_classes_is_shown(train, csv_data_dir):
    (csv_data_dir / "test.csv").write_text("text,label\ngood,1\nmeh,neutral\nbad,0\n")
    assert_refused(train(), "1 labels of", "are not among the classes negative, positive",
                   "row 1: 'neutral'")


def test_text_and_label_columns_that_are_the_same(train):
    assert_refused(train("--text-column", "label"),
                   "--text-column and --label-column both name 'label'", "two columns",
                   "columns of ", "train.csv: text, label")


def write_train_parquet(folder: Path, texts: list) -> None:
    """train.parquet holding `texts` (24 of them) and the labels of reviews(12); no train.csv."""
    Dataset.from_dict({"text": texts, "label": reviews(12)["label"]}).to_parquet(
        str(folder / "train.parquet"))
    (folder / "train.csv").unlink()


@pytest.mark.parametrize("texts, kind, shown", [
    ([t.encode() for t in reviews(12)["text"]], "binary values", "b'A wonderful film"),
    ([t.split() for t in reviews(12)["text"]], "lists", "['A', 'wonderful', 'film,'"),
    (list(range(24)), "int64 values", "row 0: 0)"),
], ids=["bytes", "lists", "numbers"])
def test_text_column_that_holds_no_text(train, csv_data_dir, texts, kind, shown):
    """Numbers or bytes would be read as texts without a word, lists end in a traceback."""
    write_train_parquet(csv_data_dir, texts)
    assert_refused(train(), f"--text-column 'text' of {csv_data_dir / 'train.parquet'} holds "
                   f"{kind}, not text", shown, "store the reviews as strings")


def test_text_column_naming_a_column_of_numbers(train, csv_data_dir):
    rows = [{"id": i, **row} for i, row in enumerate(reviews(12).to_list())]
    (csv_data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (csv_data_dir / "train.csv").unlink()
    assert_refused(train("--text-column", "id"), "--text-column 'id'", "holds int64 values",
                   "name the column of review texts with --text-column")


def test_two_files_for_one_split(train, csv_data_dir):
    """Which of the two would be read was never said: train.parquet silently won."""
    reviews(3).to_parquet(str(csv_data_dir / "train.parquet"))
    assert_refused(train(), "holds 2 train files (train.parquet, train.csv)", "keep one")


@pytest.mark.parametrize("ending", ["csv", "parquet"])
def test_split_file_without_rows(train, csv_data_dir, ending):
    """A header alone (CSV) or a 0-row table (Parquet) used to end in datasets' own words."""
    path = csv_data_dir / f"test.{ending}"
    if ending == "csv":
        path.write_text("text,label\n")
    else:
        reviews(1).select([]).to_parquet(str(path))
        (csv_data_dir / "test.csv").unlink()
    assert_refused(train(), f"could not read {path}: it holds no reviews")


def test_empty_texts_are_counted_and_refused(train, csv_data_dir):
    rows = reviews(12).to_list()
    rows[3]["text"] = ""
    rows[7]["text"] = "   "
    (csv_data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (csv_data_dir / "train.csv").unlink()
    assert_refused(train(), "2 of 24 reviews", "have no text (rows 3, 7)", "nothing was dropped")


def test_training_data_with_a_single_class(train, csv_data_dir):
    (csv_data_dir / "train.csv").write_text(
        "text,label\n" + "".join(f"great film {i},1\n" for i in range(20)))
    assert_refused(train(), "0 negative, 20 positive reviews", "at least 2 of each class")


@pytest.mark.parametrize("flag, value, phrase", [
    ("--train-samples", "0", "must be at least 1"),
    ("--train-samples", "-5", "must be at least 1"),
    ("--train-samples", "500", "--train-samples 500 plus"),
    ("--eval-samples", "0", "must be at least 1"),
    ("--eval-samples", "17", "--eval-samples 17 asks for more reviews than the 16 available"),
])
def test_subset_sizes(train, flag, value, phrase):
    assert_refused(train(flag, value), phrase)


# --- model and checkpoint -----------------------------------------------------------------


def test_model_path_that_does_not_exist(train, tmp_path):
    assert_refused(train(model=str(tmp_path / "no" / "model")), "--model folder",
                   "does not exist")


def test_model_folder_without_a_model(train, tmp_path):
    (tmp_path / "empty-model").mkdir()
    assert_refused(train(model=str(tmp_path / "empty-model")), "is not a model folder")


def test_model_that_is_not_a_bert_style_encoder(train, tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(
        folder)
    assert_refused(train(model=str(folder)), "is a 'gpt2' model (GPT2LMHeadModel)",
                   "BERT-style encoders")


def tiny_bert_folder(folder: Path, vocab_size: int, tokenizer_from: str | None) -> Path:
    """A 1-layer random BERT saved in `folder`, with the tokenizer of `tokenizer_from` (None:
    no tokenizer files at all)."""
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    if tokenizer_from:
        load_tokenizer(tokenizer_from).save_pretrained(folder)
    return folder


def test_model_folder_without_tokenizer_files(train, tmp_path):
    """transformers 5 would build a 5-token tokenizer and read every review as [UNK]."""
    folder = tiny_bert_folder(tmp_path / "no-tokenizer", 30522, tokenizer_from=None)
    assert_refused(train(model=str(folder)), "its tokenizer knows 5 tokens but the model's "
                   "embedding table has 30,522", "no tokenizer files")


def test_tokenizer_with_more_tokens_than_the_model_can_look_up(train, tiny_model_dir, tmp_path):
    folder = tiny_bert_folder(tmp_path / "small-table", 1000, tokenizer_from=tiny_model_dir)
    message = assert_refused(train(model=str(folder)),
                             "its tokenizer knows 30,522 tokens but the model's embedding "
                             "table has 1,000")
    assert "no tokenizer files" not in message


def test_model_weights_cut_short(train, tiny_model_dir, tmp_path):
    folder = tiny_bert_folder(tmp_path / "cut", 30522, tokenizer_from=tiny_model_dir)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_refused(train(model=str(folder)), "its weights file is damaged",
                   "download or copy the model again")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    model = wrap_with_lora(load_base_model(tiny_model_dir), r=4, alpha=8, dropout=0.0,
                           targets="query,value")
    save_adapter(model, load_tokenizer(tiny_model_dir), folder)
    return folder


@pytest.fixture
def evaluate(capsys):
    """evaluate.py with --json into tmp_path/out.json; check that file stays absent."""

    def go(tmp_path: Path, *flags: str, data: Path | None = None):
        out = tmp_path / "out.json"
        result = run_main(evaluate_script.main, capsys, "--json", str(out),
                          *(["--data", str(data)] if data else []), *flags)
        assert not out.exists()
        return result

    return go


def test_checkpoint_that_is_not_an_adapter(tmp_path, csv_data_dir, evaluate):
    assert_refused(evaluate(tmp_path, "--checkpoint", str(csv_data_dir), data=csv_data_dir),
                   "is not a run folder, an adapter folder", "adapter_config.json",
                   "head_config.json")


def test_adapter_trained_on_a_model_of_another_size(tmp_path, csv_data_dir, tiny_adapter,
                                                    tiny_model_dir, evaluate):
    wider = tmp_path / "wider"
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(wider)
    load_tokenizer(tiny_model_dir).save_pretrained(wider)
    assert_refused(evaluate(tmp_path, "--checkpoint", str(tiny_adapter), "--model", str(wider),
                            data=csv_data_dir), "does not fit", "of another shape")


def test_adapter_trained_with_another_vocabulary(tmp_path, csv_data_dir, tiny_adapter, evaluate):
    other = tmp_path / "other-vocab"
    other.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    (other / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(other / "vocab.txt")).save_pretrained(other)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(other)
    assert_refused(evaluate(tmp_path, "--checkpoint", str(tiny_adapter), "--model", str(other),
                            data=csv_data_dir), "another vocabulary")


def test_truncated_adapter_weights(tmp_path, csv_data_dir, tiny_adapter, evaluate):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in tiny_adapter.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_refused(evaluate(tmp_path, "--checkpoint", str(damaged), data=csv_data_dir),
                   "adapter_model.safetensors is damaged")


# --- flags --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, phrase", [
    (["--max-length", "4"], "--max-length: must be at least 8"),
    (["--max-length", "600"], "--max-length 600 is above the model's limit of 512"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--grad-accum-steps", "-1"], "--grad-accum-steps: must be at least 1"),
    (["--lr", "-0.001"], "--lr: must be positive"),
    (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    (["--num-workers", "-1"], "--num-workers: must be at least 0"),
    (["--lora-targets", "query,kernel"], "no encoder linear layer named kernel"),
    (["--lora-targets", "LayerNorm"], "no encoder linear layer named LayerNorm"),
    (["--lora-targets", "classifier"], "no encoder linear layer named classifier"),
    (["--validation-size", "1"], "at least 2"),
    (["--validation-size", "2.5"], "--validation-size 2.5 is neither a fraction"),
    (["--validation-size", "23"], "would leave fewer than 2"),
    (["--data-seed", "-1"], "--data-seed: must be at least 0"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--method", "adapter"], "--method: invalid choice: 'adapter'"),
    (["--truncation", "middle"], "--truncation: invalid choice: 'middle'"),
])
def test_flag_values_no_run_can_use(train, flags, phrase):
    assert_refused(train(*flags), phrase)


def test_output_dir_holding_another_run_is_left_alone(tiny_model_dir, csv_data_dir, tmp_path,
                                                     capsys):
    run = tmp_path / "old-run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text('{"after": {"accuracy": 0.9}}')
    before = folder_state(run)
    result = run_main(train_script.main, capsys, "--model", tiny_model_dir, "--data",
                      str(csv_data_dir), "--output-dir", str(run))
    assert_refused(result, "holds a finished run", "--overwrite")
    assert folder_state(run) == before


def test_output_dir_holding_other_files_is_left_alone(tiny_model_dir, csv_data_dir, tmp_path,
                                                      capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not a run")
    before = folder_state(folder)
    result = run_main(train_script.main, capsys, "--model", tiny_model_dir, "--data",
                      str(csv_data_dir), "--output-dir", str(folder))
    assert_refused(result, "already holds files", "--overwrite")
    assert folder_state(folder) == before


def test_a_folder_in_use_by_another_run_is_refused_until_that_run_ends(
        tiny_model_dir, csv_data_dir, tmp_path, capsys):
    """A second train.py on a folder another process holds (a re-submitted job) is refused,
    with or without --overwrite, naming the holder and touching nothing; once the holder dies
    (SIGKILL: no clean-up) the kernel has released the lock and the folder can be used."""
    run = tmp_path / "run"
    run.mkdir()
    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:  # the other run: holds the folder until it is killed
        lock_run_folder(run)
        os.write(ready_write, b"held")
        time.sleep(120)
        os._exit(0)
    try:
        assert os.read(ready_read, 4) == b"held"
        before = folder_state(run)
        flags = ["--model", tiny_model_dir, "--data", str(csv_data_dir), "--output-dir", str(run)]
        for extra in ([], ["--overwrite"]):
            result = run_main(train_script.main, capsys, *flags, *extra)
            assert_refused(result, f"--output-dir {run} is in use by another train.py run "
                                   f"(PID {holder} on {socket.gethostname()}, started ")
            assert folder_state(run) == before
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert run_main(train_script.main, capsys, *flags).returncode == 0
    assert (run / "metrics.json").is_file()


def test_output_dir_that_cannot_be_created(tiny_model_dir, csv_data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_main(train_script.main, capsys, "--model", tiny_model_dir, "--data",
                      str(csv_data_dir), "--output-dir", str(blocker / "run"))
    assert_refused(result, "cannot be created", "a-file is a file")
    assert blocker.read_text() == "not a folder"


def test_evaluate_refuses_a_folder_as_json_and_an_existing_plot(tmp_path, csv_data_dir,
                                                               tiny_model_dir, capsys):
    (tmp_path / "results").mkdir()
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--json", str(tmp_path / "results"))
    assert_refused(result, "--json", "is a folder; give a file name")
    plot = tmp_path / "old.png"
    plot.write_bytes(b"earlier plot")
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--plot", str(plot))
    assert_refused(result, "--plot", "already exists")
    assert plot.read_bytes() == b"earlier plot"


def test_evaluate_refuses_two_outputs_in_one_file(tmp_path, csv_data_dir, tiny_model_dir,
                                                  capsys):
    """--json and --predictions naming one new file: the predictions would replace the
    results (both flags pass the existing-file check, the file does not exist yet)."""
    out = tmp_path / "out.json"
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--json", str(out), "--predictions",
                      str(tmp_path / "." / "out.json"))
    assert_refused(result, "--json and --predictions both name", "give each its own file")
    assert not out.exists()


def test_checkpoints_of_different_base_models_are_not_mixed(tmp_path, csv_data_dir,
                                                            tiny_adapter, evaluate):
    wider = tmp_path / "wider"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(wider)
    load_tokenizer(str(tiny_adapter)).save_pretrained(wider)
    other = tmp_path / "other-adapter"
    model = wrap_with_lora(load_base_model(str(wider)), r=4, alpha=8, dropout=0.0,
                           targets="query,value")
    save_adapter(model, load_tokenizer(str(wider)), other)
    assert_refused(evaluate(tmp_path, "--checkpoint", str(tiny_adapter), "--checkpoint",
                            str(other), data=csv_data_dir),
                   "trained on different base models", "separate runs")


def test_evaluate_does_not_overwrite_earlier_results(tmp_path, csv_data_dir, tiny_model_dir,
                                                     capsys):
    out = tmp_path / "results.json"
    out.write_text('{"results": []}')
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--json", str(out))
    assert_refused(result, "already exists", "--overwrite")
    assert out.read_text() == '{"results": []}'


# --- a full disk outside train.py -----------------------------------------------------------

DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no name


def assert_disk_full(result, written: Path) -> None:
    """Exit code 1, no traceback, one line naming the file that could not be written."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f": error: could not write {written}: no space left on device (" in message, message
    assert message.endswith("free some space and run the same command again"), message


def test_evaluate_json_on_a_full_disk_leaves_no_half_file(tmp_path, csv_data_dir, tiny_model_dir,
                                                          monkeypatch, capsys):
    """--json is written whole or not at all: the half-written file beside it is removed."""
    out = tmp_path / "results.json"
    real_write_text = Path.write_text

    def write_text(self: Path, data: str, *args, **kwargs) -> int:
        if self.name == f".{out.name}.partial":
            real_write_text(self, data[: len(data) // 2])
            raise DISK_FULL
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--json", str(out))
    assert_disk_full(result, out)
    assert not [p.name for p in tmp_path.iterdir() if out.name in p.name]


def test_evaluate_plot_on_a_full_disk(tmp_path, csv_data_dir, tiny_model_dir, monkeypatch,
                                      capsys):
    def savefig(self, *args, **kwargs) -> None:
        raise DISK_FULL

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot = tmp_path / "comparison.png"
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir), "--plot", str(plot))
    assert_disk_full(result, plot)


def test_a_full_disk_while_tokenizing_is_not_taken_for_a_damaged_cache(
        tmp_path, csv_data_dir, tiny_model_dir, monkeypatch, capsys):
    """`datasets` reports a full disk while writing the tokenization cache as an OSError
    without a file name: one line naming the cache's folder, exit 1, and no warning about a
    damaged cache (tokenizing again would only fill the disk again)."""
    real_map = Dataset.map

    def map_(self, *args, desc: str | None = None, **kwargs):
        if desc and desc.startswith("Tokenizing"):
            raise DISK_FULL
        return real_map(self, *args, desc=desc, **kwargs)

    monkeypatch.setattr(Dataset, "map", map_)
    result = run_main(evaluate_script.main, capsys, "--base", "--model", tiny_model_dir,
                      "--data", str(csv_data_dir))
    assert "could not be read" not in result.stderr
    test_split = load_split(str(csv_data_dir), "test")
    assert_disk_full(result, Path(test_split.cache_files[0]["filename"]).parent)
