"""Speed levers, each measured against the default on the same batches, interleaved.

    python -m benchmarks.benchmark levers --model "$MODEL" --markdown BENCHMARKS.md

One process, the pre-trained model with LoRA as train.py builds it, the first training batches
(16 reviews, length 128) and a fixed set of test reviews. Training levers time
forward+backward, evaluation levers time forward, both in seconds per review (medians of
``--repeats`` rounds, the variants' order rotating each round). bf16 and ``torch.compile`` are
measured once each, because each costs minutes on a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader

from benchmarks.common import (
    DEFAULT_TRAIN_SAMPLES,
    Step,
    add_model_flags,
    cpu_model,
    default_batch_size,
    default_seed,
    first_batches,
    interleaved,
    model_label,
    timed_per_sample,
    with_lora,
    write_section,
)
from data import PaddingCollator, make_loader, split_train_validation, take_subset, tokenize
from lora_model import load_base_model
from machinery.data_sources import load_split
from machinery.hub import load_tokenizer
from machinery.options import DEFAULT_EVAL_BATCH_SIZES
from machinery.report import markdown_table
from machinery.run_folder import library_versions

LEVERS_TRAIN_BATCHES = 4
LEVERS_EVAL_REVIEWS = 256
LEVERS_REPEATS = 3
BF16_BATCH = 2
DEFAULT_LABEL = "default"  # the variant every other one of its kind is compared with

# A training variant: (attention implementation, dropout on, torch threads).
TrainVariant = tuple[str, bool, int]
# An evaluation variant: (batches, gradient mode).
EvalVariant = tuple[str, Callable[[], object]]


def add_levers_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the levers subcommand."""
    add_model_flags(parser)
    parser.add_argument("--repeats", type=int, default=LEVERS_REPEATS,
                        help="rounds of every variant; the table shows medians "
                             "(default: %(default)s)")
    parser.add_argument("--train-batches", type=int, default=LEVERS_TRAIN_BATCHES,
                        help="training batches of 16 per measurement (default: %(default)s)")
    parser.add_argument("--eval-reviews", type=int, default=LEVERS_EVAL_REVIEWS,
                        help="test reviews per evaluation measurement (default: %(default)s)")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out torch.compile (it compiles for minutes on a CPU)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the table into this file between its markers")


@dataclass
class LeverBatches:
    """What every lever runs on, built once: train.py's first training batches, and the test
    reviews batched three ways (train.py's evaluation batches, batches of 16, dataset order)."""

    train: list[dict]
    eval_sets: dict[str, list[dict]]


def levers_command(args: argparse.Namespace) -> dict:
    """Measure every lever; print (and write) the table."""
    began, load_before = time.perf_counter(), os.getloadavg()
    batches = lever_batches(args)
    models = {attention: lora_model(args.model, attention) for attention in ("sdpa", "eager")}
    train_variants, eval_variants = training_levers(), evaluation_levers()
    results = time_levers(args.repeats, models, batches, train_variants, eval_variants)
    rows = [["lever", "ms per review", "vs default", "kept?"]]
    rows += lever_rows("training", train_variants, results)
    rows += lever_rows("evaluation", eval_variants, results)
    rows.append(bf16_row(models["sdpa"], batches.eval_sets["order64"][0]))
    if not args.skip_compile:
        train_default = statistics.median(results[next(iter(train_variants))])
        rows.append(compile_row(models["sdpa"], batches.train, args.repeats, train_default))
    text = levers_markdown(args, rows, began, load_before)
    print(text)
    if args.markdown:
        write_section(args.markdown, "levers", text)
    return {"results": results, "rows": rows}


def lever_batches(args: argparse.Namespace) -> LeverBatches:
    """train.py's first batches at the cpu benchmark's size (or of all reviews, if fewer), and
    `eval_reviews` test reviews batched three ways, on the CPU."""
    tokenizer = load_tokenizer(args.model)
    collator = PaddingCollator(tokenizer.pad_token_id, torch.device("cpu"))
    pool = load_split(args.data, "train")
    size = DEFAULT_TRAIN_SAMPLES if len(pool) > 2 * DEFAULT_TRAIN_SAMPLES else None
    train, _ = split_train_validation(pool, size, 0.1, seed=0)
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length), default_batch_size(),
                               collator, shuffle=True, seed=default_seed())
    train_loader.sampler.set_epoch(0)
    train_batches = first_batches(train_loader, args.train_batches)
    test = tokenize(take_subset(load_split(args.data, "test"), args.eval_reviews, seed=0),
                    tokenizer, args.max_length)
    eval_batch_size = DEFAULT_EVAL_BATCH_SIZES["cpu"]
    return LeverBatches(train_batches, {
        "sorted64": list(make_loader(test, eval_batch_size, collator, shuffle=False)),
        "sorted16": list(make_loader(test, 16, collator, shuffle=False)),
        "order64": list(DataLoader(test.with_format(columns=["input_ids", "label"]),
                                   batch_size=eval_batch_size, collate_fn=collator))})


def lora_model(model: str, attention: str) -> torch.nn.Module:
    """The pre-trained model with LoRA as train.py builds it, with this attention."""
    transformers.set_seed(default_seed())
    base = load_base_model(model)
    base.set_attn_implementation(attention)
    return with_lora(base)


def training_levers() -> dict[str, TrainVariant]:
    """The training variants, the default first."""
    threads = torch.get_num_threads()
    return {
        f"{DEFAULT_LABEL}: SDPA attention, fp32, {threads} threads": ("sdpa", True, threads),
        "eager (unfused) attention": ("eager", True, threads),
        "1 thread": ("sdpa", True, 1),
        "no dropout at all (reference: the cost of dropout; changes the method)":
            ("sdpa", False, threads)}


def evaluation_levers() -> dict[str, EvalVariant]:
    """The evaluation variants, the default first."""
    return {
        f"{DEFAULT_LABEL}: batch 64, longest first, inference_mode":
            ("sorted64", torch.inference_mode),
        "batch 16": ("sorted16", torch.inference_mode),
        "dataset order (no sorting)": ("order64", torch.inference_mode),
        "torch.no_grad instead of inference_mode": ("sorted64", torch.no_grad)}


def train_step(model: torch.nn.Module) -> Step:
    """Forward+backward in fp32, gradients dropped."""
    def step(batch: dict) -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def eval_step(model: torch.nn.Module, grad_mode: Callable[[], object]) -> Step:
    """Forward in fp32 under `grad_mode`."""
    def step(batch: dict) -> None:
        with grad_mode():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return step


def with_threads(n: int, step: Step, batches: list[dict]) -> float:
    """Seconds per sample of `step` over `batches` with `n` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return timed_per_sample(step, batches)
    finally:
        torch.set_num_threads(before)


def time_levers(repeats: int, models: dict[str, torch.nn.Module], batches: LeverBatches,
                train_variants: dict[str, TrainVariant],
                eval_variants: dict[str, EvalVariant]) -> dict[str, list[float]]:
    """Seconds per review of every variant, `repeats` rounds in a rotating order."""
    results: dict[str, list[float]] = {}
    for model in models.values():  # warm-up: first-call allocations, oneDNN primitives
        model.train()
        train_step(model)(batches.train[0])
    for repeat in range(repeats):
        for name in interleaved(list(train_variants), repeat):
            attention, dropout, n_threads = train_variants[name]
            model = models[attention]
            model.train(dropout)
            results.setdefault(name, []).append(
                with_threads(n_threads, train_step(model), batches.train))
        for name in interleaved(list(eval_variants), repeat):
            eval_set, grad_mode = eval_variants[name]
            models["sdpa"].eval()
            results.setdefault(name, []).append(
                timed_per_sample(eval_step(models["sdpa"], grad_mode), batches.eval_sets[eval_set]))
        print(f"round {repeat + 1}: " + ", ".join(
            f"{k[:24]} {v[-1] * 1000:.0f} ms" for k, v in results.items()), flush=True)
    return results


def lever_rows(kind: str, variants: dict, results: dict[str, list[float]]) -> list[list[str]]:
    """One row per variant of `kind`: its median, and that over the default's (the first)."""
    default = statistics.median(results[next(iter(variants))])
    rows = []
    for name in variants:
        ms = statistics.median(results[name])
        rows.append([f"{kind}: {name}", f"{ms * 1000:.1f}", f"{ms / default:.2f} x",
                     DEFAULT_LABEL if name.startswith(DEFAULT_LABEL) else "no"])
    return rows


def bf16_row(model: torch.nn.Module, batch: dict) -> list[str]:
    """bf16 autocast against fp32, forward only, on a small batch: emulated bf16 is very slow
    on a CPU without native bf16."""
    model.eval()
    small = {k: v[:BF16_BATCH] for k, v in batch.items()}
    step = eval_step(model, torch.inference_mode)
    fp32 = timed_per_sample(step, [small])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = timed_per_sample(step, [small])
    return [f"evaluation: bf16 autocast (batch {BF16_BATCH}; fp32 {fp32 * 1000:.0f} ms)",
            f"{bf16 * 1000:.0f}", f"{bf16 / fp32:.1f} x", "no"]


def compile_row(model: torch.nn.Module, batches: list[dict], repeats: int,
                train_default: float) -> list[str]:
    """torch.compile'd training against the default's seconds per review, with the compile
    time and after how many batches it pays off."""
    model.train()
    started = time.perf_counter()
    model.compile()
    step = train_step(model)
    step(batches[0])  # compiles forward and backward
    compile_seconds = time.perf_counter() - started
    compiled = statistics.median(timed_per_sample(step, batches) for _ in range(repeats))
    saved = (train_default - compiled) * default_batch_size()
    break_even = (f"pays off after {compile_seconds / saved:.0f} batches"
                  if saved > 0 else "never pays off")
    return [f"training: torch.compile (compiling took {compile_seconds:.0f} s; {break_even})",
            f"{compiled * 1000:.1f}", f"{compiled / train_default:.2f} x", "behind --compile"]


def levers_markdown(args: argparse.Namespace, rows: list[list[str]], began: float,
                    load_before: tuple) -> str:
    """The generated part of BENCHMARKS.md for the levers benchmark."""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return "\n".join([
        f"Milliseconds per review, medians of {args.repeats} rounds: {args.train_batches} "
        f"training batches of {default_batch_size()}, {args.eval_reviews} test reviews, length "
        f"{args.max_length}, {model_label(args.model)}; {versions}.", "",
        markdown_table(rows[0], rows[1:]),
        "", f"Machine: {cpu_model()}, {os.cpu_count()} cores. Measured "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in "
        f"{(time.perf_counter() - began) / 60:.0f} min; load average {load_before[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (the machine is shared)."])
