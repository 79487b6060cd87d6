"""The ``lengths`` benchmark: ``--group-by-length`` at long sequences.

    python -m benchmarks.benchmark lengths --model "$MODEL" --data ../shared/data/imdb

The padding both ways from the token counts alone, the forward+backward speed both ways over
one epoch, and (``--train-py``) train.py's runs both ways for the effect on accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DistributedSampler

from benchmarks.common import (
    CPU_ROWS,
    add_model_flags,
    add_output_flags,
    add_size_flags,
    bare_steps,
    context,
    context_lines,
    default_batch_size,
    default_seed,
    interleaved,
    medians,
    model_label,
    prepare_work_dir,
    run_project,
    timed_per_sample,
    with_lora,
    write_section,
)
from data import PAD_TO_MULTIPLE_OF, PaddingCollator, make_loader, split_train_validation, tokenize
from lora_model import load_base_model
from machinery.cli import at_least
from machinery.data_sources import load_split
from machinery.hub import load_tokenizer
from machinery.report import markdown_table
from machinery.runtime import (
    LengthGroupedSampler,
    example_lengths,
    pick_device,
    pick_precision,
    round_up,
)

LENGTHS_MAX_LENGTH = 512
DEFAULT_LENGTHS_SAMPLES = 400
WAYS = ("random", "grouped")


def add_lengths_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the lengths subcommand."""
    add_model_flags(parser, LENGTHS_MAX_LENGTH)
    add_size_flags(parser, DEFAULT_LENGTHS_SAMPLES, DEFAULT_LENGTHS_SAMPLES)
    add_output_flags(parser)
    parser.add_argument("--train-py", action="store_true",
                        help="also run train.py with and without --group-by-length, "
                             "--repeats times each, for the effect on accuracy (default: off)")
    parser.add_argument("--timed-samples", type=at_least(1), default=None, metavar="N",
                        help="training reviews of the forward+backward timing (default: "
                             "--train-samples); at length 512 on 2 CPU cores an epoch of 2,000 "
                             "in random batches takes about 25 minutes, grouped about 10")


def lengths_command(args: argparse.Namespace) -> dict:
    """Padding and training speed with and without --group-by-length, at long sequences.

    The padding fractions are computed from the token counts of every training review with
    the samplers train.py uses, no model needed. Training speed: forward+backward over one
    whole epoch of ``--timed-samples`` training reviews (default: ``--train-samples``), batched
    both ways, interleaved (a whole epoch, because grouped batches come in random order, long
    and short). With ``--train-py`` also ``--repeats`` train.py runs each way on
    ``--train-samples`` reviews, for the effect on accuracy; repeat k uses ``--seed 42+k`` for
    both ways.
    """
    args.timed_samples = args.timed_samples or args.train_samples
    work = prepare_work_dir(args)
    started, load_before = time.perf_counter(), os.getloadavg()
    padding = padding_fractions(args)
    speed = grouped_training_speed(args)
    rows = padding_and_speed_rows(args, padding, speed)
    runs = train_py_runs(args, work)
    med = medians(runs)
    if args.train_py:
        rows += train_py_rows(med)
    ctx = context(args, started, load_before)
    result = {"padding": padding, "speed": speed, "runs": runs, "medians": med, "table": rows,
              "context": ctx}
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = lengths_markdown(args, rows, ctx)
    print(text)
    if args.markdown:
        write_section(args.markdown, "lengths", text)
    return result


def padding_and_speed_rows(args: argparse.Namespace, padding: dict,
                           speed: dict[str, float]) -> list[list[str]]:
    """The header and the rows of padding and forward+backward speed, both ways."""
    return [["", "random batches", "--group-by-length", "grouped / random"],
            [f"padded tokens, all {padding['reviews']:,} training reviews",
             f"{padding['random']:.1%}", f"{padding['grouped']:.1%}", "—"],
            [f"padded tokens, the {args.timed_samples:,} reviews timed",
             f"{padding['subset_random']:.1%}", f"{padding['subset_grouped']:.1%}", "—"],
            ["forward+backward samples/s (one epoch of them)",
             f"{speed['random']:.2f}", f"{speed['grouped']:.2f}",
             f"{speed['grouped'] / speed['random']:.2f}"]]


def train_py_runs(args: argparse.Namespace, work: Path) -> dict[str, list[dict]]:
    """With --train-py: `repeats` train.py runs each way, interleaved (else none)."""
    runs: dict[str, list[dict]] = {name: [] for name in WAYS}
    for repeat in range(args.repeats if args.train_py else 0):
        for name in interleaved(WAYS, repeat):
            folder = work / f"{repeat + 1}-{name}"
            folder.mkdir()
            # Each repeat is another draw (seed 42, 43, ...), the same for both variants, so
            # that the medians say something about the spread of accuracy, not one seed's luck.
            extra = ["--seed", str(default_seed() + repeat)]
            extra += ["--group-by-length"] if name == "grouped" else []
            runs[name].append(run_project(args, folder, *extra))
            print(f"repeat {repeat + 1} {name}: {runs[name][-1]}", flush=True)
    return runs


def train_py_rows(med: dict[str, dict[str, float]]) -> list[list[str]]:
    """train.py's medians both ways and their ratio (tokenization left out: it is the same)."""
    return [[f"train.py: {label}", fmt.format(med["random"][key]),
             fmt.format(med["grouped"][key]), f"{med['grouped'][key] / med['random'][key]:.2f}"]
            for label, key, fmt in CPU_ROWS if key != "tokenize_seconds"]


def lengths_markdown(args: argparse.Namespace, rows: list[list[str]], ctx: dict) -> str:
    """The generated part of BENCHMARKS.md for the lengths benchmark."""
    one = args.repeats == 1
    first_seed = default_seed()
    last_seed = first_seed + args.repeats - 1
    seeds = f"seed {first_seed}" if one else f"seeds {first_seed}-{last_seed}"
    runs_note = (f" train.py rows: {'one run' if one else f'medians of {args.repeats} runs'} "
                 f"each way ({seeds}, the same for both ways) on {args.train_samples:,} training "
                 f"and {args.eval_samples:,} test reviews."
                 if args.train_py else " Accuracy: not measured in this invocation (--train-py).")
    epochs = "one epoch" if one else f"medians of {args.repeats} interleaved epochs"
    return "\n".join([
        f"--max-length {args.max_length}, batch {default_batch_size()}, "
        f"{model_label(args.model)}; forward+backward over {epochs} of "
        f"{args.timed_samples:,} reviews." + runs_note, "",
        markdown_table(rows[0], rows[1:]), "", *context_lines(ctx)])


def grouped_training_speed(args: argparse.Namespace) -> dict[str, float]:
    """Samples/s of forward+backward over one epoch, random vs length-grouped batches."""
    device = pick_device("auto")
    precision = pick_precision("auto", device)
    epochs = epoch_batches_both_ways(args, device)
    transformers.set_seed(default_seed())
    model = with_lora(load_base_model(args.model).to(device)).train()
    step, _ = bare_steps(model, device, precision)
    step(epochs["random"][0])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in WAYS}
    for repeat in range(args.repeats):
        for name in interleaved(WAYS, repeat):
            rates[name].append(1 / timed_per_sample(step, epochs[name]))
            print(f"round {repeat + 1} {name}: {rates[name][-1]:.3f} samples/s", flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def epoch_batches_both_ways(args: argparse.Namespace,
                            device: torch.device) -> dict[str, list[dict]]:
    """One epoch of `timed_samples` training reviews in train.py's batches, random and grouped."""
    tokenizer = load_tokenizer(args.model)
    train, _ = split_train_validation(load_split(args.data, "train"), args.timed_samples,
                                      validation_size=0.1, seed=0)
    tokens = tokenize(train, tokenizer, args.max_length)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    epochs = {}
    for name in WAYS:
        loader = make_loader(tokens, default_batch_size(), collator, shuffle=True,
                             seed=default_seed(), group_by_length=name == "grouped")
        loader.sampler.set_epoch(0)
        epochs[name] = list(loader)
    return epochs


def padding_fractions(args: argparse.Namespace) -> dict:
    """Share of padded tokens in one epoch's training batches, random vs length-grouped."""
    tokenizer = load_tokenizer(args.model)
    train_split = load_split(args.data, "train")
    batch_size, seed = default_batch_size(), default_seed()
    result = {}
    for name, n in (("", None), ("subset_", args.timed_samples)):
        train, _ = split_train_validation(train_split, n, validation_size=0.1, seed=0)
        lengths = example_lengths(tokenize(train, tokenizer, args.max_length))
        samplers = {"random": DistributedSampler(range(len(lengths)), num_replicas=1, rank=0,
                                                 seed=seed),
                    "grouped": LengthGroupedSampler(lengths, batch_size, seed)}
        for kind, sampler in samplers.items():
            order = list(sampler)
            batches = [lengths[order[i:i + batch_size]]
                       for i in range(0, len(order), batch_size)]
            padded = sum(len(b) * round_up(int(b.max()), PAD_TO_MULTIPLE_OF) for b in batches)
            result[name + kind] = 1 - sum(int(b.sum()) for b in batches) / padded
        if n is None:
            result["reviews"] = len(lengths)
    return result
