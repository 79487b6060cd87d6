"""The GPU benchmark (issue 16): train.py's loop against the bare model and the lab recipe, for
one call on an H100/H200 (about 2-3 minutes there with the default flags).

    python -m benchmarks.benchmark gpu --markdown BENCHMARKS.md --json gpu.json
    python -m benchmarks.benchmark gpu --device cpu --tiny --quick    # smoke test, any machine

The model: random-weight bert-base (``BertConfig()``: 12 layers, width 768, bert-base-uncased's
shape; no download), LoRA through ``lora_model.wrap_with_lora`` (r=8, alpha=32, dropout 0.1 on
query and value), the precision ``--precision auto`` picks (bf16 on Ampere and newer). The data:
random token ids, no tokenizer and no data files, so it runs offline. Review lengths are drawn
to look like IMDB's: a seeded log-normal with median 233 tokens and sigma 0.65 (the median and
the spread of the log of the token counts of the real IMDB training reviews with bert-base's
vocabulary, [CLS] and [SEP] included; their mean is 314), clipped to [32, max length]. At max
length 128, 82% of the drawn rows fill all 128 tokens (89% of the real reviews); at 512, 11%
reach 512 (15% of the real ones), and a batch is padded to its longest row (rounded up to a
multiple of 8, as ``PaddingCollator`` does), which in most batches of 16 or more is 512.

Measured for each ``--configs`` entry BATCHxLENGTH (default: batch 16, the recipe's, and 64 and
128 at length 128; 16 and 64 at length 512), in this order, ``--repeats`` times (the tables show
medians, and the largest peak memory):

* the bare model: forward+backward (training, gradients dropped, no optimizer) and forward alone
  under ``torch.inference_mode`` (evaluation, at the same batch) on batches prepared on the
  device before the clock starts; ``--warmup-batches`` untimed batches first, then
  ``--bare-batches`` timed ones, timed with CUDA events on a GPU (``perf_counter`` on a CPU);
* train.py's loop: ``train.Trainer(...).train()`` for one epoch of ``--loop-batches`` batches
  (optimizer, clipping, schedule, logging, the end-of-epoch validation and checkpoint), then
  ``evaluate.evaluate_model`` twice over ``--eval-samples`` rows, with the loaders train.py
  builds (``make_loader``, ``PaddingCollator``) at train.py's defaults for the device
  (evaluation batch, DataLoader workers). Training time is the Trainer's own clock
  (``state.train_seconds``: training steps only, no validation or checkpoint writing); it
  includes the epoch's first batches (the loader's workers starting, the first optimizer
  step), which is why the epoch has 100 batches, and the table also shows the rate the Trainer
  logged after its first log window. Evaluation is the second pass (the first starts the
  loader's workers, as the "before" scoring of a real run does).

Once, after the first configuration: the lab recipe (``lab_recipe.py``'s HF ``Trainer``, its
batch, learning rate and max length, ``padding="max_length"``, bf16/fp16 as the project picks)
on ``--recipe-batches`` batches and the same ``--eval-samples``; skipped, with a note, where
``accelerate`` is missing. From the recipe and train.py's loop at the recipe's batch and length
(train.py evaluating at its default batch) comes an estimate of the full-size job: 25,000
training reviews for one epoch plus 25,000 test reviews scored before and 25,000 after training,
from the measured rates alone (no tokenization, no model loading).

Model FLOPs per sequence of length s (the formula behind MFU): forward
``2 * P * s + 4 * L * s^2 * d`` with P the encoder's and pooler's matrix-multiply weights,
L layers and width d (the second term is QK^T and the attention-weighted sum of V), s the
padded width the model really computes. LoRA training with frozen weights computes no weight
gradients, only activation gradients, which cost about one forward more: training = 2 x forward
(full fine-tuning would be 3 x). LoRA's own products (rank 8) are left out. MFU = model FLOP/s /
the GPU's dense peak for the precision (``PEAK_FLOPS``, from NVIDIA's datasheets; no MFU is
shown for a GPU or precision not in the table, fp32 and CPUs included).

Progress lines are printed as each measurement ends, and ``--json``/``--markdown`` are rewritten
after each one, so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.benchmark import synchronize

# Dense (no sparsity) tensor-core peak FLOP/s per GPU and autocast precision, from NVIDIA's
# datasheets; where a datasheet gives only the figure "with sparsity", half of it. Matched
# against torch.cuda.get_device_name() in this order (most specific first): every word must
# appear as a whole word ("A10" is not "A100" or "A10G"), case-insensitively. A GPU that is
# not here (A10G: NVIDIA publishes no datasheet figure; L40, GH200, H800, ...) and fp32 get no
# MFU rather than a guess.
PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H200", "NVL"), {"bf16": 835.5e12, "fp16": 835.5e12}),  # H200 datasheet: 1,671 sparse
    (("H200",), {"bf16": 989.4e12, "fp16": 989.4e12}),  # H200 SXM: as the H100 SXM
    (("H100", "PCIe"), {"bf16": 756.5e12, "fp16": 756.5e12}),  # H100 datasheet: 1,513 sparse
    (("H100", "NVL"), {"bf16": 835.5e12, "fp16": 835.5e12}),  # H100 datasheet: 1,671 sparse
    # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse in the datasheet; 989.4 dense in the
    # H100 whitepaper.
    (("H100",), {"bf16": 989.4e12, "fp16": 989.4e12}),
    (("A100",), {"bf16": 312e12, "fp16": 312e12}),  # A100 datasheet, SXM and PCIe alike
    (("A10",), {"bf16": 125e12, "fp16": 125e12}),  # A10 datasheet
    (("L40S",), {"bf16": 362.05e12, "fp16": 362.05e12}),  # L40S datasheet
    (("L4",), {"bf16": 121e12, "fp16": 121e12}),  # L4 datasheet: 242 sparse
    (("T4",), {"fp16": 65e12}),  # T4 datasheet (Turing: no bf16 tensor cores)
    (("V100S",), {"fp16": 130e12}),  # V100 datasheet, V100S PCIe (Volta: no bf16)
    (("V100", "PCIe"), {"fp16": 112e12}),  # V100 datasheet, PCIe
    (("V100",), {"fp16": 125e12}),  # V100 datasheet, SXM2
)

# Synthetic review lengths (see the module docstring).
IMDB_MEDIAN_TOKENS = 233
IMDB_LOG_SIGMA = 0.65
MIN_REVIEW_TOKENS = 32
# The full-size job of the estimate: one epoch over every training review, and every test
# review scored before and after training.
FULL_TRAIN_REVIEWS = FULL_TEST_REVIEWS = 25_000
# Targets of issue 16.
TARGET_MFU = 0.40
TARGET_MFU_SHAPE = "64x128"
TARGET_JOB_SPEEDUP = 10.0
LOOP_LR = 5e-4  # train.py's default for LoRA
DEFAULTS = {"configs": "16x128,64x128,128x128,16x512,64x512", "warmup_batches": 5,
            "bare_batches": 30, "loop_batches": 100, "eval_samples": 4096,
            "recipe_batches": 100, "repeats": 2}
# --quick: a smoke test of the benchmark itself (with --tiny, seconds on a CPU).
QUICK = {"configs": "16x128,64x128", "warmup_batches": 1, "bare_batches": 2,
         "loop_batches": 3, "eval_samples": 8, "recipe_batches": 2, "repeats": 1}
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """One configuration: training batch size and max length."""

    batch: int
    length: int

    @property
    def name(self) -> str:
        """BATCHxLENGTH, as --configs spells it."""
        return f"{self.batch}x{self.length}"


def parse_configs(text: str) -> list[Shape]:
    """``--configs``: comma-separated BATCHxLENGTH entries, e.g. ``16x128,64x512``."""
    shapes = []
    for entry in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", entry)
        if not match or int(match[1]) < 1 or not 8 <= int(match[2]) <= 512:
            raise argparse.ArgumentTypeError(
                f"{entry!r} is not BATCHxLENGTH (batch >= 1, length 8 to 512), e.g. 16x128")
        shapes.append(Shape(int(match[1]), int(match[2])))
    return shapes


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the gpu subcommand."""

    from cli import at_least

    def count(flag: str, what: str) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, type=at_least(0 if key == "warmup_batches" else 1),
                            default=None, metavar="N",
                            help=f"{what} (default: {DEFAULTS[key]}; --quick: {QUICK[key]})")

    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N, cpu, or auto (default: %(default)s)")
    parser.add_argument("--configs", type=parse_configs, default=None, metavar="BxL,...",
                        help="training batch x max length of each configuration "
                             f"(default: {DEFAULTS['configs']}; --quick: {QUICK['configs']})")
    count("--warmup-batches", "untimed batches the bare model runs first, for training and "
                              "for evaluation")
    count("--bare-batches", "timed batches of the bare model, for training and for evaluation")
    count("--loop-batches", "training batches of train.py's loop (one epoch)")
    count("--eval-samples", "rows that train.py's loop and the recipe score")
    count("--recipe-batches", "training batches of the lab recipe")
    count("--repeats", "measurements of each configuration (the tables show medians); 2 fit "
                       "an H200 in about 3 minutes")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer, 32-wide model instead of bert-base, for a smoke test "
                             "(default: off)")
    parser.add_argument("--quick", action="store_true",
                        help="the small counts shown after each count flag, for a smoke test; "
                             "a count flag given explicitly wins (default: off)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the tables into this file between its benchmark:gpu "
                             "markers, e.g. BENCHMARKS.md (default: only print them)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every measurement and the tables as JSON, rewritten after "
                             "each measurement (default: none)")


def resolve_counts(args: argparse.Namespace) -> dict:
    """The counts and configurations of this run: the flags given, else --quick's or defaults."""
    chosen = {key: getattr(args, key) for key in DEFAULTS}
    for key, value in chosen.items():
        if value is None:
            chosen[key] = (QUICK if args.quick else DEFAULTS)[key]
    if isinstance(chosen["configs"], str):
        chosen["configs"] = parse_configs(chosen["configs"])
    return chosen


# ---------------------------------------------------------------------------------------------
# FLOPs and peaks


def model_config(tiny: bool):
    """bert-base's shape (BertConfig's defaults), or a tiny one for smoke tests."""
    from transformers import BertConfig

    if tiny:
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, num_labels=2)
    return BertConfig(num_labels=2)


def forward_flops_per_sequence(config, length: int) -> float:
    """Model FLOPs of one forward pass over one sequence (see the module docstring)."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    matmul_weights = layers * (4 * d * d + 2 * d * ff) + d * d  # + the pooler
    return 2 * matmul_weights * length + 4 * layers * length * length * d


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU named `device_name` at `precision` (``PEAK_FLOPS``).

    None for a GPU not in the table, a CPU, or a precision the table has no figure for (fp32).
    """
    for words, peaks in PEAK_FLOPS:
        if all(re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", device_name,
                         re.IGNORECASE) for word in words):
            return peaks.get(precision)
    return None


def mfu(samples_per_s: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (None without a peak)."""
    return None if peak is None else samples_per_s * flops_per_sample / peak


def batch_flops(config, rows: int, width: int) -> float:
    """Forward FLOPs of a batch of `rows` sequences padded to `width` tokens."""
    return rows * forward_flops_per_sequence(config, width)


# ---------------------------------------------------------------------------------------------
# Synthetic data


def review_lengths(n: int, max_length: int, seed: int) -> list[int]:
    """`n` token counts drawn like IMDB reviews': log-normal, median ``IMDB_MEDIAN_TOKENS``,
    sigma ``IMDB_LOG_SIGMA``, clipped to [``MIN_REVIEW_TOKENS``, `max_length`]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    drawn = torch.exp(math.log(IMDB_MEDIAN_TOKENS) + IMDB_LOG_SIGMA * normal).round()
    return drawn.clamp(min(MIN_REVIEW_TOKENS, max_length), max_length).long().tolist()


def synthetic_rows(config, n: int, max_length: int, seed: int) -> list[dict]:
    """`n` examples as train.py's tokenized data holds them: random token ids of IMDB-like
    lengths (``review_lengths``) and random 0/1 labels."""
    import torch

    from data_sources import LABEL

    generator = torch.Generator().manual_seed(seed + 1_000_003)
    ids = torch.randint(1000, config.vocab_size, (n, max_length), generator=generator).tolist()
    labels = torch.randint(0, 2, (n,), generator=generator).tolist()
    return [{"input_ids": row[:length], LABEL: label}
            for row, length, label in zip(ids, review_lengths(n, max_length, seed), labels,
                                          strict=True)]


def as_dataset(rows: list[dict]):
    """The rows as a `datasets.Dataset`, the form ``make_loader`` takes."""
    from datasets import Dataset

    return Dataset.from_list(rows)


@dataclass
class ConfigData:
    """The synthetic rows of one configuration, made once and kept over the repeats."""

    bare: list[dict]
    train: object  # datasets.Dataset
    validation: object
    test: object


def config_data(config, shape: Shape, counts: dict, eval_batch_size: int) -> ConfigData:
    """Rows for the bare model, and train.py's training, validation and test sets."""
    bare_rows = (counts["warmup_batches"] + counts["bare_batches"]) * shape.batch
    return ConfigData(
        bare=synthetic_rows(config, bare_rows, shape.length, seed=3),
        train=as_dataset(synthetic_rows(config, counts["loop_batches"] * shape.batch,
                                        shape.length, seed=0)),
        # One evaluation batch: the end-of-epoch validation, which also warms up evaluation.
        validation=as_dataset(synthetic_rows(config, eval_batch_size, shape.length, seed=2)),
        test=as_dataset(synthetic_rows(config, counts["eval_samples"], shape.length, seed=1)))


def loader_flops(config, loader, dataset) -> tuple[float, int, float]:
    """Forward FLOPs of one pass over `loader` (its epoch 0 for a training loader), the rows
    and the mean padded width, from the batches' indices and the rows' lengths (no batch is
    built: a loader with worker processes builds its batches where this process cannot count
    them)."""
    from data import PAD_TO_MULTIPLE_OF
    from samplers import example_lengths, round_up

    lengths = example_lengths(dataset)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)  # the epoch Trainer.train() runs (it sets it again)
    flops, rows, tokens = 0.0, 0, 0
    for indices in loader.batch_sampler:
        width = round_up(int(max(lengths[i] for i in indices)), PAD_TO_MULTIPLE_OF)
        flops += batch_flops(config, len(indices), width)
        rows += len(indices)
        tokens += len(indices) * width
    return flops, rows, tokens / rows


# ---------------------------------------------------------------------------------------------
# The device


def new_model(config, device):
    """A random-weight classifier with LoRA (the project's defaults), made on `device`."""
    import torch
    from transformers import BertForSequenceClassification

    from lora_model import wrap_with_lora

    torch.manual_seed(0)
    with torch.device(device):
        model = wrap_with_lora(BertForSequenceClassification(config))
    return model.to(device)


def start_peak(device) -> None:
    """Free what the last measurement left and start a new peak-memory measurement."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    """Peak GPU memory allocated since ``start_peak``, in GB (None on a CPU)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def timed_seconds(step, batches: list[dict], device) -> float:
    """Seconds `step` takes over `batches`: CUDA events on a GPU, perf_counter on a CPU."""
    import torch

    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for batch in batches:
            step(batch)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - started


def loop_arguments(device, folder: str = "unused", *extra: str) -> argparse.Namespace:
    """train.py's flags as its parser gives them, with the device's defaults filled in as
    train.py fills them (evaluation batch, DataLoader workers)."""
    from runtime import fill_device_defaults
    from train_flags import build_parser

    args = build_parser().parse_args(["--output-dir", folder, *extra])
    fill_device_defaults(args, device)
    return args


# ---------------------------------------------------------------------------------------------
# The three measurements


def measure_bare(config, device, precision: str, shape: Shape, rows: list[dict],
                 warmup: int) -> dict:
    """Forward+backward and forward alone on batches prepared on the device."""
    import torch

    from data import PaddingCollator
    from runtime import autocast

    collate = PaddingCollator(pad_token_id=0, device=device)
    batches = [collate(rows[i:i + shape.batch]) for i in range(0, len(rows), shape.batch)]
    warm, timed = batches[:warmup], batches[warmup:]
    flops = sum(batch_flops(config, *batch["input_ids"].shape) for batch in timed)
    samples = sum(len(batch["labels"]) for batch in timed)
    width = sum(batch["input_ids"].numel() for batch in timed) / samples
    model = new_model(config, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step(batch: dict) -> None:
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        for param in params:
            param.grad = None

    def eval_step(batch: dict) -> None:
        with autocast(device, precision):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    model.train()
    for batch in warm:
        train_step(batch)
    train_seconds = timed_seconds(train_step, timed, device)
    model.eval()
    with torch.inference_mode():
        for batch in warm:
            eval_step(batch)
        eval_seconds = timed_seconds(eval_step, timed, device)
    return {"train_samples_per_s": samples / train_seconds,
            "eval_samples_per_s": samples / eval_seconds,
            "train_flops_per_sample": 2 * flops / samples, "eval_flops_per_sample": flops / samples,
            "train_mean_width": width, "eval_mean_width": width, "train_samples": samples,
            "eval_samples": samples, "eval_batch_size": shape.batch}


class NoTokenizer:
    """Stands in for the tokenizer that train.py saves beside each adapter (none here)."""

    def save_pretrained(self, folder: Path) -> None:
        """Nothing to save."""


def logged_rate_after_first_window(folder: Path) -> float | None:
    """Training samples/s from the Trainer's log.jsonl, leaving out its first log window (the
    epoch's first batches); None when the log holds fewer than two windows or other keys."""
    from report import LOG_FILE

    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    windows = [r for r in records if "samples_per_s" in r and "step" in r]
    if len(windows) < 2:
        return None
    # A window of k steps holds k x batch samples (every batch is full here) and took
    # k x batch / rate seconds; the later windows together: their samples over their seconds,
    # in which the batch size cancels.
    steps = [b["step"] - a["step"] for a, b in itertools.pairwise(windows)]
    step_seconds = [k / w["samples_per_s"] for k, w in zip(steps, windows[1:], strict=True)]
    return sum(steps) / sum(step_seconds)


def measure_loop(config, device, precision: str, shape: Shape, data: ConfigData,
                 settings: argparse.Namespace) -> dict:
    """train.py's Trainer.train and evaluate_model on loaders built as train.py builds them."""
    from data import PaddingCollator, make_loader
    from evaluate import evaluate_model
    from train import Trainer
    from train_flags import DEFAULT_SEED

    workers = settings.num_workers
    collator = PaddingCollator(pad_token_id=0, device=device)
    train_loader = make_loader(data.train, shape.batch, collator, shuffle=True,
                               seed=DEFAULT_SEED, num_workers=workers)
    validation_loader = make_loader(data.validation, settings.eval_batch_size, collator,
                                    shuffle=False, num_workers=workers)
    test_loader = make_loader(data.test, settings.eval_batch_size, collator, shuffle=False,
                              num_workers=workers)
    train_flops, n_train, train_width = loader_flops(config, train_loader, data.train)
    eval_flops, n_eval, eval_width = loader_flops(config, test_loader, data.test)
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        args = loop_arguments(device, folder, "--batch-size", str(shape.batch), "--max-length",
                              str(shape.length), "--lr", str(LOOP_LR))
        trainer = Trainer(args, model, NoTokenizer(), train_loader, validation_loader, device,
                          precision)
        trainer.train()  # one epoch (--epochs 1)
        # train.py's own clock: training only, not its validation or checkpoint writing.
        train_seconds = trainer.state.train_seconds
        after_first_log = logged_rate_after_first_window(Path(folder))
        del trainer
    eval_seconds = []
    for _ in range(2):  # the first pass starts the loader's workers, as "before" scoring does
        synchronize(device)
        started = time.perf_counter()
        evaluate_model(model, test_loader, device, precision)
        synchronize(device)
        eval_seconds.append(time.perf_counter() - started)
    del train_loader, validation_loader, test_loader  # their worker processes end
    return {"train_samples_per_s": n_train / train_seconds,
            "eval_samples_per_s": n_eval / eval_seconds[1],
            "train_flops_per_sample": 2 * train_flops / n_train,
            "eval_flops_per_sample": eval_flops / n_eval,
            "train_mean_width": train_width, "eval_mean_width": eval_width,
            "train_samples": n_train, "eval_samples": n_eval,
            "eval_batch_size": settings.eval_batch_size, "train_seconds": train_seconds,
            "train_samples_per_s_after_first_log": after_first_log,
            "eval_seconds_first_pass": eval_seconds[0], "eval_seconds": eval_seconds[1]}


def recipe_settings() -> tuple[dict | None, str]:
    """The lab recipe's batch, learning rate and max length, or None and why it cannot run."""
    try:
        import accelerate  # noqa: F401 (HF Trainer needs it)
    except ImportError:
        return None, "accelerate is not installed (HF Trainer needs it)"
    try:
        from benchmarks.lab_recipe import RECIPE_BATCH_SIZE, RECIPE_LR, build_parser
    except ImportError as error:
        return None, f"benchmarks/lab_recipe.py does not import here ({error})"
    max_length = build_parser().get_default("max_length")
    return {"batch": RECIPE_BATCH_SIZE, "lr": RECIPE_LR, "max_length": max_length}, ""


def measure_recipe(config, device, precision: str, recipe: dict, counts: dict) -> dict:
    """The lab recipe's HF Trainer on rows padded to its max length, as its tokenizer call
    (``padding="max_length"``) pads them; bf16/fp16 where the project uses them."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from data_sources import LABEL

    batch, length = recipe["batch"], recipe["max_length"]

    def padded(rows: list[dict]) -> Dataset:
        return Dataset.from_dict({
            "input_ids": [r["input_ids"] + [0] * (length - len(r["input_ids"])) for r in rows],
            "token_type_ids": [[0] * length for _ in rows],
            "attention_mask": [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"]))
                               for r in rows],
            "label": [r[LABEL] for r in rows]})

    train = padded(synthetic_rows(config, counts["recipe_batches"] * batch, length, seed=10))
    test = padded(synthetic_rows(config, counts["eval_samples"], length, seed=11))
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            output_dir=folder, learning_rate=recipe["lr"], per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch, num_train_epochs=1, weight_decay=0.01,
            bf16=precision == "bf16", fp16=precision == "fp16", report_to="none",
            save_strategy="no", eval_strategy="no", use_cpu=device.type == "cpu",
            disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=train,
                          eval_dataset=test)
        trained = trainer.train()
        evaluated = trainer.evaluate()
    flops = forward_flops_per_sequence(config, length)
    return {"train_samples_per_s": len(train) / trained.metrics["train_runtime"],
            "eval_samples_per_s": len(test) / evaluated["eval_runtime"],
            "train_flops_per_sample": 2 * flops, "eval_flops_per_sample": flops,
            "train_mean_width": length, "eval_mean_width": length, "train_samples": len(train),
            "eval_samples": len(test), "eval_batch_size": batch, "batch": batch,
            "length": length}


# ---------------------------------------------------------------------------------------------
# The report


def summarize(result: dict) -> dict:
    """Medians per configuration and kind, the tables, the estimate and the targets, from the
    measurements made so far (a partial run gives partial tables)."""
    ctx = result["context"]
    peak = ctx["peak_flops"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in result["measurements"]:
        groups.setdefault((m["config"], m["kind"]), []).append(m)
    med = {key: median_of(runs) for key, runs in groups.items()}

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    def mfu_cell(m: dict | None, kind: str) -> str:
        if m is None:
            return "—"
        return cell(mfu(m[f"{kind}_samples_per_s"], m[f"{kind}_flops_per_sample"], peak),
                    "{:.1%}")

    training = [["batch x length", "mean padded width", "bare fwd+bwd samples/s", "bare MFU",
                 "train.py samples/s", "train.py MFU", "train.py after 1st log window",
                 "train.py / bare", "peak memory bare / train.py (GB)"]]
    evaluation = [["batch x length", "bare forward: batch", "samples/s", "MFU",
                   "evaluate_model: batch", "samples/s", "MFU"]]
    for name in ctx["configs"]:
        bare, loop = med.get((name, "bare")), med.get((name, "loop"))
        if bare is None and loop is None:
            continue
        some = bare or loop
        training.append([
            name, f"{some['train_mean_width']:.0f}",
            cell(bare and bare["train_samples_per_s"], "{:.0f}"), mfu_cell(bare, "train"),
            cell(loop and loop["train_samples_per_s"], "{:.0f}"), mfu_cell(loop, "train"),
            cell(loop and loop.get("train_samples_per_s_after_first_log"), "{:.0f}"),
            cell(bare and loop and loop["train_samples_per_s"] / bare["train_samples_per_s"],
                 "{:.2f}"),
            f"{cell(bare and bare['peak_gb'], '{:.2f}')} / "
            f"{cell(loop and loop['peak_gb'], '{:.2f}')}"])
        evaluation.append([
            name, cell(bare and bare["eval_batch_size"], "{}"),
            cell(bare and bare["eval_samples_per_s"], "{:.0f}"), mfu_cell(bare, "eval"),
            cell(loop and loop["eval_batch_size"], "{}"),
            cell(loop and loop["eval_samples_per_s"], "{:.0f}"), mfu_cell(loop, "eval")])

    recipe = result.get("recipe")
    recipe_shape = (f"{recipe['batch']}x{recipe['length']}"
                    if recipe and "train_samples_per_s" in recipe else None)
    loop = med.get((recipe_shape, "loop"))
    estimate = full_job_estimate(loop, recipe if recipe_shape else None)
    comparison = comparison_rows(loop, recipe if recipe_shape else None, estimate, peak)
    targets = issue_targets(med.get((TARGET_MFU_SHAPE, "loop")),
                            med.get((TARGET_MFU_SHAPE, "bare")), ctx, estimate)
    return {"medians": {f"{c} {k}": m for (c, k), m in med.items()}, "training": training,
            "evaluation": evaluation, "comparison": comparison, "estimate": estimate,
            "targets": targets}


def median_of(runs: list[dict]) -> dict:
    """The median of every numeric measurement over the repeats (of those that have it); the
    largest peak memory; what is the same in every repeat (counts, batch sizes) as it is."""
    out = {}
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        known = [v for v in values if isinstance(v, (int, float))]
        if key == "peak_gb":
            out[key] = max(known) if known else None
        elif all(v == value for v in values) or not known:
            out[key] = value
        else:
            out[key] = statistics.median(known)
    return out


def full_job_estimate(loop: dict | None, recipe: dict | None) -> dict | None:
    """Seconds of the full-size job (``FULL_TRAIN_REVIEWS`` trained, ``FULL_TEST_REVIEWS``
    scored twice) from the measured rates alone, for train.py's loop and the recipe."""
    if loop is None or recipe is None:
        return None

    def seconds(m: dict) -> float:
        return (FULL_TRAIN_REVIEWS / m["train_samples_per_s"]
                + 2 * FULL_TEST_REVIEWS / m["eval_samples_per_s"])

    project, lab = seconds(loop), seconds(recipe)
    return {"project_seconds": project, "recipe_seconds": lab, "speedup": lab / project}


def comparison_rows(loop: dict | None, recipe: dict | None, estimate: dict | None,
                    peak: float | None) -> list[list[str]]:
    """train.py's loop against the lab recipe, at the recipe's batch and length."""
    header = ["", "lab recipe (HF Trainer)", "train.py loop", "train.py vs recipe"]
    if loop is None or recipe is None:
        return [header]

    def rate_row(label: str, kind: str) -> list[str]:
        ours, theirs = loop[f"{kind}_samples_per_s"], recipe[f"{kind}_samples_per_s"]
        return [label, f"{theirs:.0f}", f"{ours:.0f}", f"{ours / theirs:.2f} x"]

    def mfu_row(label: str, kind: str) -> list[str]:
        values = [mfu(m[f"{kind}_samples_per_s"], m[f"{kind}_flops_per_sample"], peak)
                  for m in (recipe, loop)]
        return [label, *("—" if v is None else f"{v:.1%}" for v in values), "—"]

    def memory(m: dict) -> str:
        return "—" if m.get("peak_gb") is None else f"{m['peak_gb']:.2f}"

    return [header,
            rate_row(f"training samples/s (batch {recipe['batch']})", "train"),
            rate_row(f"evaluation samples/s (batch {recipe['eval_batch_size']} / "
                     f"{loop['eval_batch_size']})", "eval"),
            mfu_row("training MFU", "train"), mfu_row("evaluation MFU", "eval"),
            ["peak GPU memory (GB)", memory(recipe), memory(loop), "—"],
            [f"estimate: full-size job (s), {FULL_TRAIN_REVIEWS:,} trained + "
             f"2 x {FULL_TEST_REVIEWS:,} scored", f"{estimate['recipe_seconds']:.0f}",
             f"{estimate['project_seconds']:.0f}", f"{estimate['speedup']:.1f} x as fast"]]


def issue_targets(loop: dict | None, bare: dict | None, ctx: dict,
                  estimate: dict | None) -> list[dict]:
    """The targets of issue 16 with the measured value and whether each is met (None: could
    not be decided in this run)."""
    from benchmarks.benchmark import target

    goal = (f"training step >= {TARGET_MFU:.0%} MFU (bf16, batch "
            f"{TARGET_MFU_SHAPE.replace('x', ' x ')})")
    peak = ctx["peak_flops"]
    if loop is None:
        mfu_target = target(goal, "not measured in this run", None)
    elif peak is None:
        mfu_target = target(goal, f"no peak FLOP/s known for {ctx['device_name']} at "
                                  f"{ctx['precision']}", None)
    else:
        ours = mfu(loop["train_samples_per_s"], loop["train_flops_per_sample"], peak)
        measured = f"{ours:.1%} (train.py loop, {ctx['precision']})"
        if bare is not None:
            theirs = mfu(bare["train_samples_per_s"], bare["train_flops_per_sample"], peak)
            measured += f"; bare model {theirs:.1%}"
        mfu_target = target(goal, measured, ctx["precision"] == "bf16" and ours >= TARGET_MFU)
    goal = f"full-size job >= {TARGET_JOB_SPEEDUP:.0f} x faster than the lab recipe (estimate)"
    if estimate is None:
        job_target = target(goal, "not measured in this run", None)
    else:
        job_target = target(goal, f"{estimate['speedup']:.1f} x ({estimate['project_seconds']:.0f} "
                                  f"s vs {estimate['recipe_seconds']:.0f} s)",
                            estimate["speedup"] >= TARGET_JOB_SPEEDUP)
    return [mfu_target, job_target]


def report_markdown(result: dict) -> str:
    """The generated part of BENCHMARKS.md for the gpu benchmark."""
    from benchmarks.benchmark import markdown_table

    ctx, summary = result["context"], result["summary"]
    done = len(result["measurements"])
    planned = 2 * len(ctx["configs"]) * ctx["counts"]["repeats"]
    versions = ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    peak = ctx["peak_flops"]
    counts = ctx["counts"]
    lines = [
        f"{ctx['device_name']}, {ctx['precision']}; "
        f"{'tiny model' if ctx['tiny'] else 'random-weight bert-base'}, LoRA r=8 on query and "
        f"value; random token ids of IMDB-like lengths (log-normal, median "
        f"{IMDB_MEDIAN_TOKENS}, clipped to [{MIN_REVIEW_TOKENS}, max length]). Medians of "
        f"{counts['repeats']} repeat(s); peak {'—' if peak is None else f'{peak / 1e12:.1f}'} "
        f"TFLOP/s for MFU (dense, NVIDIA datasheet); model FLOPs = 2 x forward per trained "
        f"sequence, forward per scored one (benchmarks/gpu_benchmark.py).",
        f"Bare model: {counts['warmup_batches']} untimed then {counts['bare_batches']} timed "
        f"batches per kind. train.py: one epoch of {counts['loop_batches']} batches timed by its "
        f"Trainer (which includes the epoch's first batches), evaluate_model over "
        f"{counts['eval_samples']:,} rows at batch {ctx['eval_batch_size']} with "
        f"{ctx['num_workers']} loader worker(s) (train.py's defaults here).",
        "" if done == planned else f"**Partial: {done} of {planned} measurements.**",
        "", "Training:", "", markdown_table(summary["training"]),
        "", "Evaluation:", "", markdown_table(summary["evaluation"]), ""]
    recipe = result.get("recipe")
    if recipe is None:
        lines.append("The lab recipe was not measured.")
    elif "skipped" in recipe:
        lines.append(f"The lab recipe was skipped: {recipe['skipped']}.")
    elif len(summary["comparison"]) == 1:
        lines.append(f"train.py was not measured at the recipe's {recipe['batch']}x"
                     f"{recipe['length']}: no comparison.")
    else:
        lines += [f"Against the lab recipe (HF Trainer, padding to {recipe['length']}, "
                  f"{recipe['train_samples']:,} training and {recipe['eval_samples']:,} "
                  f"scored rows), at batch {recipe['batch']} x length {recipe['length']}. The "
                  "full-size job is an estimate from the measured rates alone, without "
                  "tokenization and model loading:", "",
                  markdown_table(summary["comparison"])]
    lines += ["", markdown_table([["target", "measured", "met"]] + [
        [t["target"], t["measured"],
         "—" if t["met"] is None else "yes" if t["met"] else "**no**"]
        for t in summary["targets"]]),
        "", f"{versions}. Measured {ctx['date']} in {ctx['minutes']:.1f} min.",
        "", "```bash", ctx["command"], "```"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def gpu_command(args: argparse.Namespace) -> dict:
    """Measure the bare model and train.py's loop per configuration, and the lab recipe once;
    print the tables and write them (and every measurement) where asked."""
    import torch

    from benchmarks.benchmark import write_section
    from cli import quiet_library_logs
    from run_folder import library_versions
    from runtime import pick_device, pick_precision, use_device

    began = time.perf_counter()
    quiet_library_logs()
    counts = resolve_counts(args)
    device = pick_device(args.device)
    use_device(device)  # as train.py: the current GPU, TF32 for fp32 products
    precision = pick_precision("auto", device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    config = model_config(args.tiny)
    settings = loop_arguments(device)
    recipe, why_not = recipe_settings()
    result = {
        "context": {
            "device_name": device_name, "precision": precision,
            "peak_flops": peak_flops(device_name, precision), "tiny": args.tiny,
            "configs": [shape.name for shape in counts["configs"]],
            "counts": {k: v for k, v in counts.items() if k != "configs"},
            "eval_batch_size": settings.eval_batch_size, "num_workers": settings.num_workers,
            "versions": library_versions(), "command": args.command_line,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "minutes": 0.0},
        "measurements": [],
        "recipe": None if recipe else {"skipped": why_not}}

    def save() -> None:
        """Rewrite --json and --markdown with everything measured so far."""
        result["context"]["minutes"] = (time.perf_counter() - began) / 60
        result["summary"] = summarize(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.markdown:
            write_section(args.markdown, "gpu", report_markdown(result))

    print(f"gpu benchmark: {device_name}, {precision}, peak FLOP/s "
          f"{result['context']['peak_flops']}, configs {', '.join(result['context']['configs'])}"
          f", {result['context']['counts']}, eval batch {settings.eval_batch_size}, "
          f"{settings.num_workers} loader worker(s)", flush=True)
    if not recipe:
        print(f"lab recipe skipped: {why_not}", flush=True)
    data: dict[Shape, ConfigData] = {}
    for repeat in range(counts["repeats"]):
        for shape in counts["configs"]:
            if shape not in data:
                data[shape] = config_data(config, shape, counts, settings.eval_batch_size)
            for kind in ("bare", "loop"):
                start_peak(device)
                started = time.perf_counter()
                if kind == "bare":
                    measured = measure_bare(config, device, precision, shape, data[shape].bare,
                                            counts["warmup_batches"])
                else:
                    measured = measure_loop(config, device, precision, shape, data[shape],
                                            settings)
                measured = {"repeat": repeat + 1, "config": shape.name, "batch": shape.batch,
                            "length": shape.length, "kind": kind, **measured,
                            "peak_gb": peak_gb(device),
                            "wall_seconds": time.perf_counter() - started}
                result["measurements"].append(measured)
                save()
                print(progress_line(measured, result["context"]["peak_flops"]), flush=True)
            if recipe and result["recipe"] is None:
                start_peak(device)
                result["recipe"] = {**measure_recipe(config, device, precision, recipe, counts),
                                    "peak_gb": peak_gb(device)}
                save()
                print(progress_line({"kind": "recipe", "repeat": 1, "config":
                                     f"{recipe['batch']}x{recipe['max_length']}",
                                     **result["recipe"]}, result["context"]["peak_flops"]),
                      flush=True)
    save()
    text = report_markdown(result)
    print(text, flush=True)
    return result


def progress_line(m: dict, peak: float | None) -> str:
    """One measurement as a line of progress."""
    rates = []
    for kind in ("train", "eval"):
        share = mfu(m[f"{kind}_samples_per_s"], m[f"{kind}_flops_per_sample"], peak)
        rates.append(f"{kind} {m[f'{kind}_samples_per_s']:.1f} samples/s"
                     + ("" if share is None else f" ({share:.1%} MFU)"))
    memory = "" if m.get("peak_gb") is None else f", peak {m['peak_gb']:.2f} GB"
    return f"repeat {m['repeat']} {m['config']} {m['kind']}: {', '.join(rates)}{memory}"


if __name__ == "__main__":
    sys.exit("run it as: python -m benchmarks.benchmark gpu")
