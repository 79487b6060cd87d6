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
from datetime import datetime, timezone
from pathlib import Path

LEVERS_TRAIN_BATCHES = 4
LEVERS_EVAL_REVIEWS = 256
BF16_BATCH = 2


def add_levers_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the levers subcommand (besides --model, --data, --max-length)."""
    parser.add_argument("--repeats", type=int, default=3,
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


def levers_command(args: argparse.Namespace) -> dict:
    """Measure every lever; print (and write) the table."""
    import torch
    import transformers
    from torch.utils.data import DataLoader

    from benchmarks.benchmark import (
        DEFAULT_TRAIN_SAMPLES,
        cpu_model,
        first_batches,
        markdown_table,
        model_label,
        timed_per_sample,
        write_section,
    )
    from data import PaddingCollator, make_loader, split_train_validation, take_subset, tokenize
    from data_sources import load_split
    from lora_model import load_base_model, load_tokenizer, wrap_with_lora
    from run_folder import library_versions
    from runtime import DEFAULT_EVAL_BATCH_SIZES
    from train_flags import DEFAULT_BATCH_SIZE, DEFAULT_SEED

    began, load_before = time.perf_counter(), os.getloadavg()
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(args.model)
    collator = PaddingCollator(tokenizer.pad_token_id, cpu)
    # train.py's first batches at the cpu benchmark's size (or of all reviews, if fewer).
    pool = load_split(args.data, "train")
    size = DEFAULT_TRAIN_SAMPLES if len(pool) > 2 * DEFAULT_TRAIN_SAMPLES else None
    train, _ = split_train_validation(pool, size, 0.1, seed=0)
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length), DEFAULT_BATCH_SIZE,
                               collator, shuffle=True, seed=DEFAULT_SEED)
    train_loader.sampler.set_epoch(0)
    train_batches = first_batches(train_loader, args.train_batches)
    test = tokenize(take_subset(load_split(args.data, "test"), args.eval_reviews, seed=0),
                    tokenizer, args.max_length)
    eval_batch_size = DEFAULT_EVAL_BATCH_SIZES["cpu"]
    eval_sets = {
        "sorted64": list(make_loader(test, eval_batch_size, collator, shuffle=False)),
        "sorted16": list(make_loader(test, 16, collator, shuffle=False)),
        "order64": list(DataLoader(test.with_format(columns=["input_ids", "label"]),
                                   batch_size=eval_batch_size, collate_fn=collator))}

    def lora_model(attention: str):
        transformers.set_seed(DEFAULT_SEED)
        base = load_base_model(args.model)
        base.set_attn_implementation(attention)
        return wrap_with_lora(base)

    models = {"sdpa": lora_model("sdpa"), "eager": lora_model("eager")}

    def train_step(model):
        def step(batch: dict) -> None:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    def eval_step(model, grad_mode):
        def step(batch: dict) -> None:
            with grad_mode():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return step

    def with_threads(n, step):
        def run(batches):
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return timed_per_sample(step, batches)
            finally:
                torch.set_num_threads(before)
        return run

    threads = torch.get_num_threads()
    train_variants = {
        f"default: SDPA attention, fp32, {threads} threads": ("sdpa", True, threads),
        "eager (unfused) attention": ("eager", True, threads),
        "1 thread": ("sdpa", True, 1),
        "no dropout at all (reference: the cost of dropout; changes the method)":
            ("sdpa", False, threads)}
    eval_variants = {
        "default: batch 64, longest first, inference_mode": ("sorted64", torch.inference_mode),
        "batch 16": ("sorted16", torch.inference_mode),
        "dataset order (no sorting)": ("order64", torch.inference_mode),
        "torch.no_grad instead of inference_mode": ("sorted64", torch.no_grad)}
    results: dict[str, list[float]] = {}
    for model in models.values():  # warm-up: first-call allocations, oneDNN primitives
        model.train()
        train_step(model)(train_batches[0])
    for repeat in range(args.repeats):
        names = list(train_variants)
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            attention, dropout, n_threads = train_variants[name]
            model = models[attention]
            model.train(dropout)
            results.setdefault(name, []).append(
                with_threads(n_threads, train_step(model))(train_batches))
        names = list(eval_variants)
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            batches, grad_mode = eval_variants[name]
            models["sdpa"].eval()
            results.setdefault(name, []).append(
                timed_per_sample(eval_step(models["sdpa"], grad_mode), eval_sets[batches]))
        print(f"round {repeat + 1}: " + ", ".join(
            f"{k[:24]} {v[-1] * 1000:.0f} ms" for k, v in results.items()), flush=True)

    rows = [["lever", "ms per review", "vs default", "kept?"]]
    train_default, eval_default = (statistics.median(results[next(iter(v))])
                                   for v in (train_variants, eval_variants))
    for group, default in ((train_variants, train_default), (eval_variants, eval_default)):
        kind = "training" if group is train_variants else "evaluation"
        for name in group:
            ms = statistics.median(results[name])
            rows.append([f"{kind}: {name}", f"{ms * 1000:.1f}", f"{ms / default:.2f} x",
                         "default" if name.startswith("default") else "no"])

    # bf16 autocast, forward only, on a small batch: emulated bf16 is very slow here.
    model = models["sdpa"].eval()
    small = {k: v[:BF16_BATCH] for k, v in eval_sets["order64"][0].items()}
    step = eval_step(model, torch.inference_mode)
    fp32 = timed_per_sample(step, [small])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = timed_per_sample(step, [small])
    rows.append([f"evaluation: bf16 autocast (batch {BF16_BATCH}; fp32 {fp32 * 1000:.0f} ms)",
                 f"{bf16 * 1000:.0f}", f"{bf16 / fp32:.1f} x", "no"])

    if not args.skip_compile:
        model = models["sdpa"].train()
        started = time.perf_counter()
        model.compile()
        step = train_step(model)
        step(train_batches[0])  # compiles forward and backward
        compile_seconds = time.perf_counter() - started
        compiled = statistics.median(timed_per_sample(step, train_batches)
                                     for _ in range(args.repeats))
        saved = (train_default - compiled) * DEFAULT_BATCH_SIZE
        break_even = (f"pays off after {compile_seconds / saved:.0f} batches"
                      if saved > 0 else "never pays off")
        rows.append([f"training: torch.compile (compiling took {compile_seconds:.0f} s; "
                     f"{break_even})", f"{compiled * 1000:.1f}",
                     f"{compiled / train_default:.2f} x", "behind --compile"])
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    text = "\n".join([
        f"Milliseconds per review, medians of {args.repeats} rounds: {args.train_batches} "
        f"training batches of {DEFAULT_BATCH_SIZE}, {args.eval_reviews} test reviews, length "
        f"{args.max_length}, {model_label(args.model)}; {versions}.", "", markdown_table(rows),
        "", f"Machine: {cpu_model()}, {os.cpu_count()} cores. Measured "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in "
        f"{(time.perf_counter() - began) / 60:.0f} min; load average {load_before[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (the machine is shared)."])
    print(text)
    if args.markdown:
        write_section(args.markdown, "levers", text)
    return {"results": results, "rows": rows}
