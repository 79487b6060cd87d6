"""The fast paths: length-grouped training batches, longest-first evaluation in dataset order,
clipped tokenization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMDB_DIR, minilm_path
from datasets import Dataset
from torch.utils.data import DataLoader

from data import (
    PAD_TO_MULTIPLE_OF,
    PaddingCollator,
    Preprocessing,
    can_clip,
    clip_review,
    make_loader,
    take_subset,
    tokenize,
    truncate_ids,
)
from evaluate import compute_metrics, evaluate_model, predict_logits
from lora_model import load_base_model
from machinery.data_sources import load_split
from machinery.hub import load_tokenizer
from machinery.runtime import LENGTH_GROUP_BATCHES, LengthGroupedSampler, round_up
from predict import predict_reviews

CPU = torch.device("cpu")


def padded_share(lengths: np.ndarray, order: list[int], batch_size: int) -> float:
    """Share of padding tokens when `order` is cut into batches padded as PaddingCollator pads."""
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    padded = sum(len(b) * round_up(int(b.max()), PAD_TO_MULTIPLE_OF) for b in batches)
    return 1 - lengths.sum() / padded


def review_lengths(n: int, seed: int = 0) -> np.ndarray:
    """IMDB-like token counts: mostly 100..500, spread widely."""
    return np.random.default_rng(seed).integers(20, 512, size=n)


def test_grouped_batches_cover_every_review_once_and_cut_padding():
    lengths = review_lengths(2000)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=42)
    order = list(sampler)
    assert len(order) == len(sampler) == 2000
    assert sorted(order) == list(range(2000))
    assert all(isinstance(i, int) for i in order)
    random = torch.randperm(2000, generator=torch.Generator().manual_seed(42)).tolist()
    grouped_padding, random_padding = (padded_share(lengths, o, 16) for o in (order, random))
    # Random batches of 16 are padded to their longest review: about 40% of the tokens.
    assert random_padding > 0.3
    assert grouped_padding < 0.05


def test_grouped_order_is_a_function_of_seed_and_epoch():
    lengths = review_lengths(500)
    a, b = (LengthGroupedSampler(lengths, batch_size=8, seed=3) for _ in range(2))
    first = list(a)
    assert list(a) == first == list(b)  # the same order every time it is asked
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert second == list(b)
    assert second != first and sorted(second) == sorted(first)
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4)) != first


def test_grouped_batches_are_random_draws_not_sorted_runs():
    # Within one window the batches hold similar lengths, but the batch order is shuffled and
    # each window is a fresh random draw: a batch's lengths are not the next batch's.
    lengths = review_lengths(16 * LENGTH_GROUP_BATCHES * 2)
    order = list(LengthGroupedSampler(lengths, batch_size=16, seed=0))
    batch_means = [lengths[order[i:i + 16]].mean() for i in range(0, len(order), 16)]
    steps = np.abs(np.diff(batch_means))
    assert np.median(steps) > 50  # sorted batches would differ by ~5 tokens
    assert np.corrcoef(np.arange(len(batch_means)), batch_means)[0, 1] ** 2 < 0.1


@pytest.mark.parametrize("n", [40, 41, 43])
def test_grouped_ranks_together_give_the_one_process_batches(n):
    lengths = review_lengths(n, seed=n)
    one = LengthGroupedSampler(lengths, batch_size=8, seed=5)
    ranks = [LengthGroupedSampler(lengths, batch_size=4, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for epoch in range(2):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == -(-n // 2)
        together = [sorted(shares[0][i:i + 4] + shares[1][i:i + 4])
                    for i in range(0, len(shares[0]), 4)]
        whole = ranks[0].global_order()
        assert together == [sorted(whole[i:i + 8]) for i in range(0, len(whole), 8)]
        assert sorted(set(whole)) == list(range(n)) and len(whole) - n == n % 2
        if n % 2 == 0:  # nothing repeated: exactly the one-process order
            assert whole == one.global_order() == list(one)


def test_make_loader_groups_by_length_behind_the_flag(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = [" ".join(["word"] * (5 + 3 * i)) for i in range(64)]
    tokens = tokenize(Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(64)]}),
                      tokenizer, max_length=256)
    collate = PaddingCollator(tokenizer.pad_token_id, CPU)
    widths = {}
    for grouped in (False, True):
        loader = make_loader(tokens, 8, collate, shuffle=True, seed=1, group_by_length=grouped)
        loader.sampler.set_epoch(0)
        batches = list(loader)
        assert sum(len(b["labels"]) for b in batches) == 64
        widths[grouped] = sum(b["input_ids"].numel() for b in batches)
    assert widths[True] < 0.7 * widths[False]


@pytest.fixture(scope="module")
def mixed_lengths(tiny_model_dir):
    """40 reviews of 3 to 120 words, in no length order, tokenized."""
    rng = np.random.default_rng(0)
    n_words = rng.permutation(np.linspace(3, 120, 40).astype(int))
    texts = [" ".join(["great" if i % 2 else "awful"] * k) + "." for i, k in enumerate(n_words)]
    reviews = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]})
    return tokenize(reviews, load_tokenizer(tiny_model_dir), max_length=128), texts


def test_evaluation_scores_longest_first_and_gives_the_in_order_metrics(tiny_model_dir,
                                                                        mixed_lengths):
    tokens, _ = mixed_lengths
    tokenizer = load_tokenizer(tiny_model_dir)
    collate = PaddingCollator(tokenizer.pad_token_id, CPU)
    model = load_base_model(tiny_model_dir)
    loader = make_loader(tokens, 8, collate, shuffle=False)
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert widths == sorted(widths, reverse=True)
    in_order = DataLoader(tokens.with_format(columns=["input_ids", "label"]), batch_size=8,
                          collate_fn=collate)
    assert sum(b["input_ids"].numel() for b in loader) < 0.75 * sum(
        b["input_ids"].numel() for b in in_order)  # less padding
    plain_logits, plain_labels = predict_logits(model, in_order, CPU, "fp32")
    expected = compute_metrics(plain_labels, plain_logits)
    metrics = evaluate_model(model, loader, CPU, "fp32")
    assert {k: v for k, v in metrics.items() if k != "loss"} == \
        {k: v for k, v in expected.items() if k != "loss"}
    assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert plain_labels.tolist() == tokens["label"]


def test_predictions_come_back_in_input_order(tiny_model_dir, mixed_lengths):
    _, texts = mixed_lengths
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir)
    together = predict_reviews(model, tokenizer, texts, Preprocessing(), 8, CPU, "fp32")
    assert [p.text for p in together] == texts
    for text, prediction in list(zip(texts, together, strict=True))[:6]:
        alone = predict_reviews(model, tokenizer, [text], Preprocessing(), 8, CPU,
                                "fp32")[0]
        assert prediction.tokens == alone.tokens == len(tokenizer(text)["input_ids"])
        assert prediction.probability == pytest.approx(alone.probability, abs=1e-5)
        assert prediction.label == alone.label


@pytest.mark.real_data
def test_clipped_tokenization_gives_exactly_the_whole_reviews_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(minilm_path())
    assert can_clip(tokenizer)
    reviews = take_subset(load_split(str(IMDB_DIR), "test"), 600, seed=1)
    texts = list(reviews["text"])
    for max_length in (32, 128, 512):
        expected = tokenizer(texts, truncation=True, max_length=max_length)
        tokens = tokenize(reviews, tokenizer, max_length)
        assert list(tokens["input_ids"]) == expected["input_ids"], max_length
    # Only head truncation clips; the tail modes still see the whole review.
    whole = tokenizer(texts)["input_ids"]
    for truncation in ("tail", "head+tail"):
        tokens = tokenize(reviews, tokenizer, 128, truncation)
        assert list(tokens["input_ids"]) == [truncate_ids(ids, 128, truncation)
                                             for ids in whole], truncation
    clipped = [clip_review(text, 128) for text in texts]
    assert sum(len(c) < len(t) for c, t in zip(clipped, texts, strict=True)) > 300
    # A clip that comes out short is redone in full: words over 100 characters are one [UNK]
    # token each, so the clip holds 6 tokens and the whole review 42.
    long_words = " ".join(["x" * 120] * 40)
    tokens = tokenize(Dataset.from_dict({"text": [long_words], "label": [0]}), tokenizer, 128)
    assert clip_review(long_words, 128) != long_words
    assert list(tokens["input_ids"]) == tokenizer([long_words], truncation=True,
                                                  max_length=128)["input_ids"]
    assert len(tokens["input_ids"][0]) == 42
