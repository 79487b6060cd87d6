"""The GPU benchmark, prepared for one call on an H100/H200 (not yet measured: see BENCHMARKS.md).

    python -m benchmarks.benchmark gpu --markdown BENCHMARKS.md
    python -m benchmarks.benchmark gpu --device cpu --tiny --steps 2    # smoke test, any machine

Random-weight bert-base (``BertConfig()``: 12 layers, width 768, bert-base-uncased's shape),
LoRA r=8 on query and value, max length 128, batch 32, bf16 autocast (``--precision auto``),
random token ids: no download, no data files and no tokenizer, so it runs offline. Measured in
one process, interleaved over ``--repeats``:

* bare: forward+backward (training) and forward (evaluation) on prepared batches, nothing else;
* train.py's loop: ``Trainer.train`` (optimizer, clipping, schedule, logging) and
  ``evaluate_model``, fed by ``make_loader`` and ``PaddingCollator`` as in train.py;
* the lab recipe: HF ``Trainer`` with ``bf16=True`` on the same token ids padded to 128
  (skipped, with a note, where ``accelerate`` is missing).

Model FLOPs per sequence of length s (the formula behind MFU): forward
``2 * P * s + 4 * L * s^2 * d`` with P the encoder's and pooler's matrix-multiply weights,
L layers and width d (the second term is QK^T and the attention-weighted sum of V). LoRA
training with frozen weights computes no weight gradients, only activation gradients, which
cost about one forward more: training = 2 x forward (full fine-tuning would be 3 x). LoRA's own
products (rank 8) are left out. MFU = model FLOP/s / 989 TFLOP/s, the H100 SXM's dense bf16
peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

H100_BF16_PEAK_FLOPS = 989e12
GPU_MAX_LENGTH = 128
GPU_BATCH_SIZE = 32
DEFAULT_STEPS = 50
DEFAULT_GPU_REPEATS = 3
GPU_LR = 5e-4


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the gpu subcommand."""
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N, cpu, or auto (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="training and evaluation batches per measurement "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_GPU_REPEATS,
                        help="interleaved repeats; the table shows medians "
                             "(default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer, 32-wide model instead of bert-base (smoke test)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the table into this file between its markers")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every measurement as JSON")


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


def new_model(config, device):
    """A random-weight classifier with LoRA (the project's defaults), on `device`."""
    import torch
    from transformers import BertForSequenceClassification

    from lora_model import wrap_with_lora

    torch.manual_seed(0)
    return wrap_with_lora(BertForSequenceClassification(config)).to(device)


def token_batches(config, n_batches: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Random token ids, full length, and random labels for `n_batches` batches."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    n = n_batches * GPU_BATCH_SIZE
    ids = torch.randint(1000, config.vocab_size, (n, GPU_MAX_LENGTH), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return ids.tolist(), labels.tolist()


def peak_memory(device) -> float | None:
    """Peak GPU memory since the last reset, in GB (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device) -> None:
    """Start a new peak-memory measurement, with nothing left over from the last model."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_bare(config, device, precision: str, ids, labels) -> dict:
    """Forward+backward and forward alone on prepared batches."""
    import torch

    from benchmarks.benchmark import samples_per_second
    from runtime import autocast

    model = new_model(config, device)
    batches = [{"input_ids": torch.tensor(ids[i:i + GPU_BATCH_SIZE], device=device),
                "attention_mask": torch.ones((len(ids[i:i + GPU_BATCH_SIZE]), GPU_MAX_LENGTH),
                                             dtype=torch.long, device=device),
                "labels": torch.tensor(labels[i:i + GPU_BATCH_SIZE], device=device)}
               for i in range(0, len(ids), GPU_BATCH_SIZE)]
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
    train_rate = samples_per_second(train_step, batches, device)
    model.eval()
    with torch.inference_mode():
        eval_rate = samples_per_second(eval_step, batches, device)
    return {"train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate}


class NoTokenizer:
    """Stands in for the tokenizer that train.py saves beside each adapter (none here)."""

    def save_pretrained(self, folder: Path) -> None:
        """Nothing to save."""


def measure_project(config, device, precision: str, ids, labels) -> dict:
    """train.py's Trainer.train and evaluate_model on loaders built as train.py builds."""
    from datasets import Dataset

    from data import PaddingCollator, make_loader
    from evaluate import evaluate_model
    from train import Trainer, build_parser

    tokens = Dataset.from_dict({"input_ids": ids, "label": labels})
    collator = PaddingCollator(pad_token_id=0, device=device)
    train_loader = make_loader(tokens, GPU_BATCH_SIZE, collator, shuffle=True)
    test_loader = make_loader(tokens, GPU_BATCH_SIZE, collator, shuffle=False)
    validation_loader = make_loader(tokens.select(range(GPU_BATCH_SIZE)), GPU_BATCH_SIZE,
                                    collator, shuffle=False)
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        args = build_parser().parse_args(["--output-dir", folder, "--batch-size",
                                          str(GPU_BATCH_SIZE), "--lr", str(GPU_LR),
                                          "--log-every", "10"])
        trainer = Trainer(args, model, NoTokenizer(), train_loader, validation_loader, device,
                          precision)
        trainer.train()  # one epoch (--epochs 1)
        # train.py's own clock: training only, not its validation or checkpoint writing.
        train_seconds = trainer.state.train_seconds
        started = time.perf_counter()
        evaluate_model(model, test_loader, device, precision)
        eval_seconds = time.perf_counter() - started
    return {"train_samples_per_s": len(ids) / train_seconds,
            "eval_samples_per_s": len(ids) / eval_seconds}


def measure_recipe(config, device, precision: str, ids, labels) -> dict:
    """The lab recipe's HF Trainer (bf16=True where the project uses bf16) on the same ids."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": row, "attention_mask": [1] * len(row), "labels": label}
            for row, label in zip(ids, labels, strict=True)]
    model = new_model(config, device)
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            output_dir=folder, learning_rate=GPU_LR, per_device_train_batch_size=GPU_BATCH_SIZE,
            per_device_eval_batch_size=GPU_BATCH_SIZE, num_train_epochs=1, weight_decay=0.01,
            bf16=precision == "bf16", fp16=precision == "fp16", report_to="none",
            save_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, eval_dataset=rows)
        trained = trainer.train()
        evaluated = trainer.evaluate()
    return {"train_samples_per_s": trained.metrics["train_samples_per_second"],
            "eval_samples_per_s": evaluated["eval_samples_per_second"]}


def gpu_command(args: argparse.Namespace) -> dict:
    """Measure bare, train.py's loop and the recipe; print (and write) the table."""
    import torch

    from benchmarks.benchmark import markdown_table, write_section
    from cli import quiet_library_logs
    from runtime import pick_device, pick_precision
    from train import library_versions

    quiet_library_logs()
    device = pick_device(args.device)
    precision = pick_precision("auto", device)
    config = model_config(args.tiny)
    ids, labels = token_batches(config, args.steps)
    measures = {"recipe": measure_recipe, "project": measure_project, "bare": measure_bare}
    try:
        import accelerate  # noqa: F401 (HF Trainer needs it)
    except ImportError:
        del measures["recipe"]
    runs: dict[str, list[dict]] = {name: [] for name in measures}
    for repeat in range(args.repeats):
        names = list(measures)
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            reset_peak(device)
            result = measures[name](config, device, precision, ids, labels)
            runs[name].append({**result, "peak_gb": peak_memory(device)})
            print(f"repeat {repeat + 1} {name}: {runs[name][-1]}", flush=True)
    forward = forward_flops_per_sequence(config, GPU_MAX_LENGTH)
    rows = [["", "train samples/s", "eval samples/s", "peak memory (GB)", "train MFU",
             "eval MFU"]]
    labels_of = {"recipe": "lab recipe (HF Trainer)", "project": "train.py loop",
                 "bare": "bare model"}
    for name, results in runs.items():
        train = statistics.median(r["train_samples_per_s"] for r in results)
        evaluation = statistics.median(r["eval_samples_per_s"] for r in results)
        peaks = [r["peak_gb"] for r in results if r["peak_gb"] is not None]
        rows.append([labels_of[name], f"{train:.1f}", f"{evaluation:.1f}",
                     f"{max(peaks):.2f}" if peaks else "—",
                     f"{train * 2 * forward / H100_BF16_PEAK_FLOPS:.1%}",
                     f"{evaluation * forward / H100_BF16_PEAK_FLOPS:.1%}"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    text = "\n".join([
        f"{name}, {precision}; {'tiny model' if args.tiny else 'random bert-base'}, batch "
        f"{GPU_BATCH_SIZE}, length {GPU_MAX_LENGTH}, {args.steps} batches, medians of "
        f"{args.repeats}; forward {forward / 1e9:.1f} GFLOP per sequence; {versions}.",
        "" if "recipe" in runs else "The recipe was skipped: accelerate is not installed.",
        markdown_table(rows)])
    print(text)
    if args.markdown:
        write_section(args.markdown, "gpu", text)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    sys.exit("run it as: python -m benchmarks.benchmark gpu")
