"""The data path: loaders for every format, labels, the subset rule, validation, collate, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import HF_HOME, minilm_path, reviews
from datasets import Dataset, concatenate_datasets
from transformers import AutoTokenizer

from data import (
    TRUNCATION_MODES,
    PaddingCollator,
    Preprocessing,
    hash_reviews,
    head_tail_split,
    make_loader,
    resolve_preprocessing,
    split_train_validation,
    take_subset,
    tokenize,
    tokenizer_fingerprint,
)
from machinery.cli import UsageError
from machinery.data_sources import FEATURES, label_to_int, load_split
from machinery.hub import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_collate_pads_each_batch_to_a_multiple_of_8_with_matching_masks():
    collate = PaddingCollator(pad_token_id=0, device=torch.device("cpu"))
    examples = [{"input_ids": [101, 7, 102], "label": 0},
                {"input_ids": [101] + [5] * 9 + [102], "label": 1},
                {"input_ids": [101, 9, 9, 9, 102], "label": 1}]
    batch = collate(examples)
    assert batch["input_ids"].shape == (3, 16)  # longest is 11, rounded up to 16
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 11, 5]
    assert batch["input_ids"][0].tolist() == [101, 7, 102] + [0] * 13
    assert batch["labels"].tolist() == [0, 1, 1]
    assert all(t.device.type == "cpu" for t in batch.values())


def test_collate_keeps_a_width_that_is_already_a_multiple_of_8():
    collate = PaddingCollator(pad_token_id=0, device=torch.device("cpu"))
    batch = collate([{"input_ids": list(range(1, 17)), "label": 1}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 16


def test_loader_with_worker_processes_gives_the_same_batches(tokenizer, monkeypatch):
    """The same batches with worker processes, forked with the tokenizer's threads switched
    off (the tokenizers library's advice before a fork), unless the user chose otherwise."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    tokens = tokenize(reviews(12), tokenizer, max_length=32)
    collate = PaddingCollator(tokenizer.pad_token_id, torch.device("cpu"))
    in_process = list(make_loader(tokens, 5, collate, shuffle=True, seed=3))
    workers = list(make_loader(tokens, 5, collate, shuffle=True, seed=3, num_workers=2))
    assert len(in_process) == len(workers) == 5
    for a, b in zip(in_process, workers, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    make_loader(tokens, 5, collate, shuffle=True, num_workers=1)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the user's choice stays


def test_loader_order_depends_only_on_the_seed(tokenizer):
    tokens = tokenize(reviews(12), tokenizer, max_length=32)
    collate = PaddingCollator(tokenizer.pad_token_id, torch.device("cpu"))

    def first_labels(seed):
        return torch.cat([b["labels"] for b in make_loader(tokens, 8, collate, shuffle=True,
                                                            seed=seed)]).tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)


def test_subset_rule_is_shuffle_with_seed_then_select():
    split = reviews(50)
    subset = take_subset(split, 10, seed=7)
    assert subset["text"] == split.shuffle(seed=7).select(range(10))["text"]
    assert take_subset(split, 10, seed=7)["text"] == subset["text"]
    assert take_subset(split, 10, seed=8)["text"] != subset["text"]
    assert take_subset(split, None, seed=7) is split


@pytest.mark.parametrize("n", [0, -1, 101])
def test_subset_sizes_outside_the_split_are_refused(n):
    with pytest.raises(UsageError, match="from 1 to 100"):
        take_subset(reviews(50), n, seed=0)


@pytest.mark.parametrize("raw, expected", [
    (0, 0), (1, 1), ("0", 0), ("1", 1), ("neg", 0), ("pos", 1), (" Negative ", 0),
    ("POSITIVE", 1), (1.0, 1), (2, None), ("great", None), (None, None), (True, None)])
def test_label_mapping(raw, expected):
    assert label_to_int(raw) == expected


def write_aclimdb(root, split, texts_by_class):
    for name, texts in texts_by_class.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{7 if name == 'pos' else 2}.txt").write_text(text, encoding="utf-8")


def test_aclimdb_layout_is_read_and_unsup_is_ignored(tmp_path):
    for split in ("train", "test"):
        write_aclimdb(tmp_path, split, {"neg": ["bad one", "bad two"], "pos": ["good <br />"]})
    (tmp_path / "train" / "unsup").mkdir()
    (tmp_path / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    train = load_split(str(tmp_path), "train")
    assert train.column_names == ["text", "label", "row", "id"]
    assert sorted(zip(train["text"], train["label"], strict=True)) == [
        ("bad one", 0), ("bad two", 0), ("good <br />", 1)]
    # Each review's place among the sorted files, and its file name: what joins it back.
    assert list(zip(train["row"], train["id"], strict=True)) == [(0, "0_2"), (1, "1_2"), (2, "0_7")]


def test_aclimdb_labels_are_checked_against_the_classes_asked_for(tmp_path):
    # Its folders are its labels: a checkpoint's other classes or a --labels that does not
    # name neg/pos must be refused, not scored as if 0 and 1 meant them.
    for split in ("train", "test"):
        write_aclimdb(tmp_path, split, {"neg": ["bad one", "bad two"], "pos": ["good"]})
    with pytest.raises(UsageError, match=r"^3 labels of .*test are not among the classes "
                                         r"bad, ok, good \(row 0: 'neg'"):
        load_split(str(tmp_path), "test", label_names=("bad", "ok", "good"))
    with pytest.raises(UsageError, match=r"^the classes 'bad', 'good' have no example in "):
        load_split(str(tmp_path), "train", label_names=("bad", "good"))
    with pytest.raises(UsageError,
                       match=r"^column 'review' not found \(columns: text, label, id\)"):
        load_split(str(tmp_path), "train", text_column="review")
    named = load_split(str(tmp_path), "train", label_names=("negative", "positive"))
    assert named.features["label"].names == ["negative", "positive"]
    assert sorted(named["label"]) == [0, 0, 1]


def test_empty_aclimdb_review_files_are_refused_by_name(tmp_path):
    write_aclimdb(tmp_path, "train", {"neg": ["bad", ""], "pos": ["good", "", "fine"]})
    with pytest.raises(UsageError) as error:
        load_split(str(tmp_path), "train")
    message = str(error.value)
    assert message.startswith(f"2 review files in {tmp_path / 'train'} are empty (")
    assert str(tmp_path / "train" / "neg" / "1_2.txt") in message
    assert str(tmp_path / "train" / "pos" / "1_7.txt") in message


def test_aclimdb_cache_notices_edited_files(tmp_path):
    write_aclimdb(tmp_path, "train", {"neg": ["bad"], "pos": ["good"]})
    assert sorted(load_split(str(tmp_path), "train")["text"]) == ["bad", "good"]
    (tmp_path / "train" / "pos" / "0_7.txt").write_text("good, edited")
    assert sorted(load_split(str(tmp_path), "train")["text"]) == ["bad", "good, edited"]


def test_the_reviews_hash_follows_the_rows_not_the_files(tmp_path):
    """A resume compares it: the same reviews read again (a copied or touched file, another
    chunking of the same rows) must match; one changed label or text must not."""
    reviews(6).to_csv(tmp_path / "train.csv", index=False)
    train = load_split(str(tmp_path), "train")
    first = hash_reviews(train)
    os.utime(tmp_path / "train.csv", ns=(10**18, 10**18))  # same bytes, another time
    assert hash_reviews(load_split(str(tmp_path), "train")) == first
    n = len(train)
    assert hash_reviews(concatenate_datasets([train.select(range(2)),
                                              train.select(range(2, n))])) == first
    flipped = train.map(lambda row, i: {"label": 1 - row["label"] if i == 0 else row["label"]},
                        with_indices=True)
    edited = train.map(lambda row, i: {"text": row["text"] + ("!" if i == n - 1 else "")},
                       with_indices=True)
    swapped = train.select([1, 0, *range(2, n)])
    assert len({first, hash_reviews(flipped), hash_reviews(edited), hash_reviews(swapped)}) == 4


@pytest.mark.parametrize("ending", ["parquet", "csv", "jsonl"])
def test_file_formats_load_the_same_reviews(tmp_path, ending):
    data = reviews(3)
    path = tmp_path / f"train.{ending}"
    {"parquet": data.to_parquet, "csv": lambda p: data.to_csv(p, index=False),
     "jsonl": lambda p: data.to_json(p, lines=True)}[ending](str(path))
    loaded = load_split(str(tmp_path), "train")
    assert loaded["text"] == data["text"]
    assert loaded["label"] == data["label"]


def test_other_column_names_and_string_labels(tmp_path):
    rows = [{"review": "fine film", "sentiment": "positive"},
            {"review": "poor film", "sentiment": "NEG"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_split(str(tmp_path), "test", text_column="review", label_column="sentiment")
    assert loaded["text"] == ["fine film", "poor film"]
    assert loaded["label"] == [1, 0]


def test_missing_column_names_the_columns_that_exist(tmp_path):
    reviews(2).to_csv(str(tmp_path / "train.csv"), index=False)
    with pytest.raises(UsageError, match=r"'body' not found \(columns: text, label\).*--text-col"):
        load_split(str(tmp_path), "train", text_column="body")


def test_integer_labels_are_class_ids_and_a_missing_id_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nmeh,3\nbad,0\n")
    with pytest.raises(UsageError, match=r"the classes '2' have no example in .*train.csv"):
        load_split(str(tmp_path), "train")
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nmeh,2\nbad,0\n")
    split = load_split(str(tmp_path), "train")
    assert split.features["label"].names == ["0", "1", "2"] and split["label"] == [1, 2, 0]


def test_validation_split_is_stratified_disjoint_and_leaves_exactly_n_for_training():
    train_split = reviews(100)  # 200 reviews, balanced
    train, validation = split_train_validation(train_split, n_train=60, validation_size=0.25,
                                               seed=0)
    assert len(train) == 60
    assert len(validation) == 15
    assert abs(sum(validation["label"]) - 7.5) <= 0.5  # stratified: 7 or 8 positives of 15
    assert not set(train["text"]) & set(validation["text"])
    again = split_train_validation(train_split, 60, 0.25, seed=0)
    assert again[0]["text"] == train["text"] and again[1]["text"] == validation["text"]


def test_validation_size_as_a_count_and_all_remaining_for_training():
    train, validation = split_train_validation(reviews(100), n_train=None, validation_size=30,
                                               seed=0)
    assert (len(train), len(validation)) == (170, 30)
    assert sum(validation["label"]) == 15


def test_tokenize_truncates_without_padding(tokenizer):
    tokens = tokenize(reviews(4), tokenizer, max_length=8)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    assert max(lengths) == 8
    assert all(ids[0] == tokenizer.cls_token_id for ids in tokens["input_ids"])
    assert tokens.column_names == ["label", "input_ids"]


def test_tokenizer_fingerprint_ignores_truncation_state(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["some text"] * 2, truncation=True, max_length=5, padding="max_length")
    truncation = tokenizer.backend_tokenizer.truncation
    assert tokenizer_fingerprint(tokenizer) == before
    assert tokenizer.backend_tokenizer.truncation == truncation  # cleared in a copy only


def test_a_changed_tokenizer_gets_a_new_fingerprint(tiny_model_dir):
    """The fingerprint is the tokenizer's, not its folder's: a new word changes it."""
    tokenizer = load_tokenizer(tiny_model_dir)
    before = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(tiny_model_dir)) == before
    tokenizer.add_tokens(["zxqvwordnotinvocab"])
    assert tokenizer_fingerprint(tokenizer) != before


def test_second_tokenization_reads_the_disk_cache(tmp_path, tokenizer):
    reviews(20).to_parquet(str(tmp_path / "train.parquet"))
    first = tokenize(load_split(str(tmp_path), "train"), tokenizer, max_length=16)
    cache_file = first.cache_files[0]["filename"]
    written_at = os.stat(cache_file).st_mtime_ns
    second = tokenize(load_split(str(tmp_path), "train"), tokenizer, max_length=16)
    assert second.cache_files[0]["filename"] == cache_file
    assert os.stat(cache_file).st_mtime_ns == written_at  # read back, not written again
    assert second["input_ids"] == first["input_ids"]
    other = tokenize(load_split(str(tmp_path), "train"), tokenizer, max_length=12)
    assert other.cache_files[0]["filename"] != cache_file
    # The suite's own cache (conftest), never the user's: no stale file from an earlier
    # commit is scored here, and nothing is left in ~/.cache/huggingface.
    assert Path(cache_file).is_relative_to(HF_HOME)
    assert not Path(cache_file).is_relative_to(Path.home() / ".cache")


def test_a_damaged_tokenization_cache_is_rebuilt_not_scored(tmp_path, tokenizer, capsys):
    """A cache file cut short (a crash or a full disk while it was written) is tokenized
    again with one warning, giving the clean cache's ids, and the file is whole again."""
    reviews(20).to_parquet(str(tmp_path / "train.parquet"))
    first = tokenize(load_split(str(tmp_path), "train"), tokenizer, max_length=16)
    expected = first["input_ids"][:]  # read now: `first` maps the file that is cut below
    cache_file = Path(first.cache_files[0]["filename"])
    whole = cache_file.read_bytes()
    cache_file.write_bytes(whole[: len(whole) // 3])
    capsys.readouterr()
    second = tokenize(load_split(str(tmp_path), "train"), tokenizer, max_length=16)
    warning = capsys.readouterr().err
    assert warning.count("warning: the tokenization cache could not be read") == 1
    assert "tokenizing again" in warning
    assert second["input_ids"] == expected and len(second) == 40
    assert cache_file.read_bytes() == whole


# --- truncation: head, tail, head+tail ------------------------------------------------------

NUMBERS = " ".join(str(i) for i in range(100))  # 100 tokens: each number is one wordpiece


def test_head_tail_split_follows_sun_et_al():
    # Sun et al. (2019): the first 128 and the last 382 of 510 review tokens.
    assert head_tail_split(512, "head+tail") == (128, 382)
    assert head_tail_split(256, "head+tail") == (64, 190)
    assert head_tail_split(128, "head+tail") == (32, 94)
    assert head_tail_split(128, "head") == (126, 0)
    assert head_tail_split(128, "tail") == (0, 126)


@pytest.mark.parametrize("truncation, kept", [
    ("head", list(range(10))),
    ("tail", list(range(90, 100))),
    ("head+tail", [0, 1, 2, *range(93, 100)]),  # round(10 * 128 / 510) = 3 from the head
])
def test_truncation_modes_keep_the_expected_tokens(tokenizer, truncation, kept):
    data = Dataset.from_dict({"text": [NUMBERS, "1 2 3"], "label": [1, 0]}, features=FEATURES)
    long_ids, short_ids = tokenize(data, tokenizer, max_length=12,
                                   truncation=truncation)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert long_ids == [cls, *tokenizer.convert_tokens_to_ids([str(i) for i in kept]), sep]
    assert short_ids == tokenizer("1 2 3")["input_ids"]  # a review that fits is unchanged


def test_head_truncation_equals_the_tokenizers_own(tokenizer):
    texts = [NUMBERS, "short one", " ".join(["wonderful"] * 40)]
    data = Dataset.from_dict({"text": texts, "label": [0, 1, 0]}, features=FEATURES)
    ids = tokenize(data, tokenizer, max_length=20, truncation="head")["input_ids"]
    assert ids == tokenizer(texts, truncation=True, max_length=20)["input_ids"]


def test_each_truncation_mode_has_its_own_cache(tmp_path, tokenizer):
    Dataset.from_dict({"text": [NUMBERS] * 4, "label": [0, 1] * 2}, features=FEATURES
                      ).to_parquet(str(tmp_path / "train.parquet"))
    split = load_split(str(tmp_path), "train")
    files = {tokenize(split, tokenizer, 16, mode).cache_files[0]["filename"]
             for mode in TRUNCATION_MODES}
    assert len(files) == 3


def test_preprocessing_record_round_trips_and_defaults_for_older_checkpoints(tmp_path,
                                                                              capsys):
    assert Preprocessing.recorded_in(tmp_path) is None  # saved before records existed
    Preprocessing("head+tail", 256).save(tmp_path)
    recorded = Preprocessing.recorded_in(tmp_path)
    assert recorded == Preprocessing(truncation="head+tail", max_length=256)
    assert resolve_preprocessing(recorded, None, None, "ckpt") == recorded
    assert resolve_preprocessing(None, None, None, "ckpt") == Preprocessing("head", 128)
    assert capsys.readouterr().err == ""
    assert resolve_preprocessing(recorded, "head", None, "ckpt") == Preprocessing("head", 256)
    assert capsys.readouterr().err.strip() == (
        "warning: ckpt was trained with --truncation head+tail; scoring it with "
        "--truncation head as asked")
