"""Fine-tune BERT with LoRA on IMDB reviews, with a hand-written PyTorch training loop.

    python train.py                                  # bert-base-uncased + the Hub's imdb
    python train.py --model PATH --data PATH ...     # local folders, offline
    torchrun --nproc_per_node=4 train.py ...         # data parallel over 4 GPUs (see README)

Before training the pre-trained model (seeded random head) is scored on the test reviews;
after training the best adapter (chosen on a validation split carved out of the training
data, never on the test set) is scored on the same reviews, and the two are shown side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import datasets
import peft
import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from data import (
    PaddingCollator,
    UsageError,
    add_data_arguments,
    at_least,
    check_can_write,
    load_split,
    make_loader,
    move_to_device,
    non_negative_float,
    positive_float,
    split_train_validation,
    take_subset,
    tokenize,
    unit_fraction,
)
from evaluate import (
    add_runtime_arguments,
    autocast,
    evaluate_model,
    format_comparison,
    is_distributed,
    is_main_process,
    pick_device,
    pick_precision,
    run_command,
    test_loader_for,
)
from lora_model import (
    ADAPTER_DIR,
    add_lora_arguments,
    add_model_argument,
    check_encoder,
    check_lora_targets,
    format_parameter_counts,
    load_adapted_model,
    load_base_model,
    load_tokenizer,
    parameter_counts,
    save_adapter,
    wrap_with_lora,
)
from report import (
    COMPARISON_PNG,
    CONFIG_FILE,
    CURVES_PNG,
    LOG_FILE,
    METRICS_FILE,
    REPORT_MD,
    write_report,
)

# LoRA trains few, freshly initialised weights, so it wants a far larger learning rate than
# full fine-tuning (2e-5..5e-5): the LoRA paper used 4e-4..5e-4 for RoBERTa-base (r=8).
DEFAULT_LR = 5e-4
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEED = 42
DEFAULT_VALIDATION_SIZE = 0.1
# Parameters that AdamW should not decay: biases and LayerNorm weights (BERT convention).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# Everything a run writes into its folder (what --overwrite clears first).
RUN_FILES = (ADAPTER_DIR, CONFIG_FILE, LOG_FILE, METRICS_FILE, REPORT_MD, CURVES_PNG,
             COMPARISON_PNG)
# Validation picks the best adapter by this metric (IMDB is balanced, so accuracy is fair).
SELECTION_METRIC = "accuracy"


def build_parser() -> argparse.ArgumentParser:
    """The train.py command line."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a BERT classifier with LoRA on IMDB reviews and compare it "
                    "with the pre-trained model.")
    add_model_argument(parser)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="run folder for the adapter, metrics and logs "
                             "(default: runs/<model>-lora-<date-time>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into an --output-dir that already holds files")
    parser.add_argument("--seed", type=at_least(0), default=DEFAULT_SEED,
                        help="seed for LoRA init, dropout and batch order "
                             f"(default: {DEFAULT_SEED})")
    add_data_arguments(parser)
    group = parser.add_argument_group("training data")
    group.add_argument("--train-samples", type=at_least(1), default=None, metavar="N",
                       help="train on N reviews drawn with the subset rule (default: all that "
                            "the validation split leaves)")
    group.add_argument("--validation-size", type=positive_float,
                       default=DEFAULT_VALIDATION_SIZE,
                       help="validation reviews carved (stratified, seeded) out of the training "
                            "split: a fraction of the training reviews (<1) or a count (>=1) "
                            f"(default: {DEFAULT_VALIDATION_SIZE})")
    group.add_argument("--group-by-length", action="store_true",
                       help="batch training reviews of similar length (shuffled groups, a new "
                            "random draw every epoch): less padding, faster with --max-length "
                            "above 128 (default: off, plain random batches)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=at_least(1), default=1,
                       help="passes over the training reviews (default: 1)")
    group.add_argument("--batch-size", type=at_least(1), default=DEFAULT_BATCH_SIZE,
                       help="training batch size per process (per GPU under torchrun) "
                            f"(default: {DEFAULT_BATCH_SIZE})")
    group.add_argument("--grad-accum-steps", type=at_least(1), default=1,
                       help="batches whose gradients are averaged per optimizer step; the "
                            "effective batch is batch-size x processes x this (default: 1)")
    group.add_argument("--lr", type=positive_float, default=DEFAULT_LR,
                       help=f"peak AdamW learning rate (default: {DEFAULT_LR}; see README)")
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01,
                       help="AdamW weight decay, not applied to biases and LayerNorm "
                            "(default: 0.01)")
    group.add_argument("--warmup-ratio", type=unit_fraction, default=0.06,
                       help="fraction of optimizer steps with linear warm-up, then linear "
                            "decay to 0 (default: 0.06)")
    group.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                       help="clip the gradient norm to this; 0 disables (default: 1.0)")
    group.add_argument("--eval-every", type=at_least(1), default=None, metavar="STEPS",
                       help="also validate every STEPS optimizer steps (default: only at the "
                            "end of each epoch)")
    group.add_argument("--log-every", type=at_least(1), default=10, metavar="STEPS",
                       help="log loss, learning rate and speed every STEPS optimizer steps "
                            "(default: 10)")
    add_lora_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for training and validation; compiling "
                             "takes minutes, so it pays only on long runs (default: off; see "
                             "BENCHMARKS.md)")
    return parser


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def default_output_dir(model: str) -> Path:
    """runs/<model name>-lora-<YYYYmmdd-HHMMSS>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(model.rstrip('/')).name}-lora-{stamp}"


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, without decay on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all parameters in one launch; it exists for CUDA tensors.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "datasets": datasets.__version__}


def remove_run_files(folder: Path) -> None:
    """Delete what an earlier train.py run wrote into `folder` (other files stay)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json(path: Path, value: object) -> None:
    """Write `value` as indented JSON."""
    path.write_text(json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when torchrun started us; return (rank, world size, device).

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address for every process it
    starts; a plain ``python train.py`` sets none and runs as rank 0 of 1 on `device_name`.
    Under torchrun a CUDA device means this machine's GPU number LOCAL_RANK, one per process.
    """
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # NCCL moves CUDA tensors between GPUs directly; gloo is PyTorch's CPU backend.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    if dist.get_rank() != 0:
        datasets.disable_progress_bars()  # loading and tokenizing: rank 0 shows the bars
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all_ranks() -> None:
    """A barrier: return once every rank has got here (at once in one process)."""
    if dist.is_initialized():
        dist.barrier()


def from_main_process(value: object) -> object:
    """Rank 0's `value`, on every rank (`value` itself in one process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks; every rank must call this at the same point."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / dist.get_world_size()


def print_main(*values: object) -> None:
    """print() on rank 0 only, so that a torchrun job prints each line once."""
    if is_main_process():
        print(*values)


# ---------------------------------------------------------------------------------------------
# The training loop


class Trainer:
    """State of one LoRA fine-tuning run, with the loop written out in ``train_epoch``.

    Under torchrun each rank runs this same loop on its shard of every batch, through a
    ``DistributedDataParallel`` wrapper that averages the gradients across ranks in backward;
    only rank 0 writes the log and the adapter.
    """

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, tokenizer,
                 train_loader, validation_loader, device: torch.device, precision: str):
        self.args, self.model, self.tokenizer = args, model, tokenizer
        # Under torchrun forward and backward go through the DDP wrapper (which starts every
        # rank from rank 0's weights); evaluation and saving use the model itself.
        self.ddp_model = DistributedDataParallel(model) if is_distributed() else None
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.train_loader, self.validation_loader = train_loader, validation_loader
        self.device, self.precision = device, precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay, device)
        steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
        self.total_steps = steps_per_epoch * args.epochs
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(args.warmup_ratio * self.total_steps), self.total_steps)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        # A disabled scaler passes everything through, so one code path serves all precisions.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.step = 0  # optimizer steps (with fp16, steps the scaler skipped count too)
        self.validation_seconds = 0.0  # time spent validating and saving, not training
        self.best_score = -math.inf
        self.log_file = (args.output_dir / LOG_FILE).open("w") if is_main_process() else None

    def train_epoch(self, epoch: int) -> None:
        """One pass over the training batches; optimizer step every `grad_accum_steps`."""
        args = self.args
        model = self.model if self.ddp_model is None else self.ddp_model
        accum, n_batches = args.grad_accum_steps, len(self.train_loader)
        self.train_loader.sampler.set_epoch(epoch)  # a new order every epoch, the same on all ranks
        model.train()
        # Loss is summed on the device and read (a host sync) only when logging.
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        samples, started = 0, time.perf_counter()
        progress = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                        dynamic_ncols=True, disable=not is_main_process())
        for i, batch in enumerate(progress):
            # No-op when the collator already delivered the batch (num_workers=0).
            batch = move_to_device(batch, self.device)
            # The last group of an epoch can be short: average over the batches it really has.
            group_size = min(accum, n_batches - (i // accum) * accum)
            last_of_group = (i + 1) % accum == 0 or i + 1 == n_batches
            with self.gradient_sync(last_of_group):
                with autocast(self.device, self.precision):
                    loss = model(**batch).loss
                self.scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach()
            loss_count += 1
            samples += len(batch["labels"])
            if not last_of_group:
                continue  # keep accumulating gradients

            self.optimizer_step()
            if self.step % args.log_every == 0 or i + 1 == n_batches:
                # Every rank trains as many samples per step, so the job's rate is world x ours.
                rate = samples * self.world_size / (time.perf_counter() - started)
                self.log({"epoch": epoch + 1,
                          "loss": mean_over_ranks(loss_sum / loss_count).item(),
                          "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate},
                         progress)
                loss_sum.zero_()
                loss_count = 0
                samples, started = 0, time.perf_counter()  # the rate since the last log line
            if args.eval_every and self.step % args.eval_every == 0 and i + 1 != n_batches:
                self.validate(epoch)
                model.train()
                samples, started = 0, time.perf_counter()  # validation is not training time
        self.validate(epoch)

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP with `sync` False, a context in which backward skips the all-reduce.

        The micro-steps before the last of an accumulation group only add to the local
        gradients; averaging them across ranks once, in the last backward, gives the same sum
        for a fraction of the traffic. In one process, or with `sync`, it does nothing.
        """
        if sync or self.ddp_model is None:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def optimizer_step(self) -> None:
        """Unscale, clip, step; the scheduler advances only when the optimizer really stepped.

        Under DDP the gradients are already averaged and equal on every rank, so each rank
        clips, steps and schedules exactly as one process would and the copies stay equal.
        """
        # Clip the true gradients: with fp16 they are still multiplied by the loss scale.
        self.scaler.unscale_(self.optimizer)
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.scaler.step(self.optimizer)  # skipped by the scaler if gradients hold inf/NaN
        if self.scaler.is_enabled():
            # Reading the scale waits for the GPU, so only fp16 pays for it.
            scale_before = self.scaler.get_scale()
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale_before  # lowered: the step was skipped
        else:
            stepped = True
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def validate(self, epoch: int) -> None:
        """Score the validation split; save the adapter when it is the best so far.

        Every rank scores its share and gets the same metrics; rank 0 alone saves and logs.
        """
        started = time.perf_counter()
        metrics = evaluate_model(self.model, self.validation_loader, self.device,
                                 self.precision, desc="Validating")
        score = metrics[SELECTION_METRIC]
        improved = score > self.best_score
        if improved:
            self.best_score = score
            if is_main_process():
                save_adapter(self.model, self.tokenizer, self.args.output_dir / ADAPTER_DIR)
        self.log({"epoch": epoch + 1, "validation": metrics, "best": improved})
        self.validation_seconds += time.perf_counter() - started
        if is_main_process():
            tqdm.write(f"step {self.step}: validation accuracy {metrics['accuracy']:.4f}, "
                       f"F1 {metrics['f1']:.4f}" + ("  (best so far, saved)" if improved else ""))

    def log(self, record: dict, progress: tqdm | None = None) -> None:
        """Append a record to the log and show the training numbers on the progress bar.

        Rank 0 only: the other ranks hold no log file and show no progress bar.
        """
        if self.log_file is None:
            return
        record = {"step": self.step, **record}
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}")

    def close(self) -> None:
        """Close the log file."""
        if self.log_file is not None:
            self.log_file.close()


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    """Train, score before/after on the test reviews, write metrics.json and the report.

    Returns the metrics as written to metrics.json.
    """
    run_started = time.perf_counter()
    # Every check that can refuse the run comes before the run folder is created.
    rank, world_size, device = init_distributed(args.device)
    precision = pick_precision(args.precision, device)
    # The default folder name holds the time: take rank 0's, in case a second ticks between.
    args.output_dir = from_main_process(args.output_dir or default_output_dir(args.model))
    check_can_write(args.output_dir, "--output-dir", args.overwrite)
    if Path(args.model).expanduser().exists():
        # adapter_config.json records this path: an absolute one keeps the adapter loadable
        # from any working directory.
        args.model = str(Path(args.model).expanduser().resolve())
    check_encoder(args.model)
    # Python, numpy and torch. Rank 0 gets `seed` itself, so its LoRA init (which DDP copies
    # to every rank) is the one-process init; other ranks draw their own dropout masks.
    transformers.set_seed(args.seed + rank)

    tokenizer = load_tokenizer(args.model)
    train, validation = split_train_validation(
        load_split(args.data, "train", args.text_column, args.label_column),
        args.train_samples, args.validation_size, args.data_seed)
    test = take_subset(load_split(args.data, "test", args.text_column, args.label_column),
                       args.eval_samples, args.data_seed)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    tokenize_started = time.perf_counter()
    # Every rank tokenizes (the `datasets` cache files are written atomically, so concurrent
    # ranks are safe) and loads its own share of each split.
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length), args.batch_size,
                               collator, shuffle=True, seed=args.seed,
                               num_workers=args.num_workers, rank=rank, world_size=world_size,
                               group_by_length=args.group_by_length)
    validation_loader = make_loader(tokenize(validation, tokenizer, args.max_length),
                                    args.eval_batch_size, collator, shuffle=False,
                                    num_workers=args.num_workers, rank=rank,
                                    world_size=world_size)
    test_loader = test_loader_for(tokenizer, test, args, device, rank, world_size)
    tokenize_seconds = time.perf_counter() - tokenize_started
    model = load_base_model(args.model).to(device)
    check_lora_targets(model, args.lora_targets)

    wait_for_all_ranks()  # every rank has passed its checks before rank 0 writes a file
    if is_main_process():
        if args.overwrite:
            remove_run_files(args.output_dir)  # start over: no stale adapter, log or plots
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.output_dir / CONFIG_FILE, {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "resolved_device": str(device), "resolved_precision": precision,
            "world_size": world_size,
            "train_examples": len(train), "validation_examples": len(validation),
            "test_examples": len(test), "versions": library_versions()})
    wait_for_all_ranks()
    if not (args.output_dir / CONFIG_FILE).is_file():
        raise UsageError(f"--output-dir {args.output_dir} is not the folder rank 0 writes: every "
                         "process loads the best adapter back from it, so with several machines "
                         "put it on a filesystem they all share")
    print_main(f"Data: {len(train)} training, {len(validation)} validation, {len(test)} test "
               f"reviews; {device}, {precision}"
               + (f" x {world_size} processes" if world_size > 1 else "")
               + f"; output in {args.output_dir}")

    test_started = time.perf_counter()
    before = evaluate_model(model, test_loader, device, precision, desc="Scoring pre-trained")
    test_seconds = {"before": time.perf_counter() - test_started}
    print_main(f"Pre-trained model: test accuracy {before['accuracy']:.4f}")

    model = wrap_with_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                           args.lora_targets)
    trainable, total = parameter_counts(model)
    print_main(f"LoRA r={args.lora_r}, alpha={args.lora_alpha:g} on {args.lora_targets}: "
               f"{format_parameter_counts(trainable, total)}")
    if args.compile:
        model.compile()  # in place: parameter names, and so the saved adapter, stay the same
    trainer = Trainer(args, model, tokenizer, train_loader, validation_loader, device, precision)
    started = time.perf_counter()
    try:
        for epoch in range(args.epochs):
            trainer.train_epoch(epoch)
    finally:
        trainer.close()
    train_seconds = time.perf_counter() - started - trainer.validation_seconds

    # Score the best adapter exactly as evaluate.py will: loaded back from disk (once rank 0
    # has finished writing it).
    wait_for_all_ranks()
    best = load_adapted_model(args.output_dir / ADAPTER_DIR, args.model).to(device)
    test_started = time.perf_counter()
    after = evaluate_model(best, test_loader, device, precision, desc="Scoring fine-tuned")
    test_seconds["after"] = time.perf_counter() - test_started
    metrics = {"before": before, "after": after,
               "parameters": {"trainable": trainable, "total": total},
               "train_seconds": train_seconds,
               "train_samples_per_s": len(train) * args.epochs / train_seconds,
               "tokenize_seconds": tokenize_seconds,
               "test_seconds": test_seconds,
               "wall_seconds": time.perf_counter() - run_started}
    if is_main_process():
        write_json(args.output_dir / METRICS_FILE, metrics)
        write_report(args.output_dir)
    print_main(f"\nTest reviews ({len(test)}), pre-trained vs LoRA fine-tuned:")
    print_main(format_comparison([("before", before), ("after", after)]))
    print_main(f"\nTraining took {train_seconds:.0f} s ({metrics['train_samples_per_s']:.1f} "
               f"samples/s). Wrote {args.output_dir / METRICS_FILE} and "
               f"{args.output_dir / REPORT_MD} with its plots; the adapter is in "
               f"{args.output_dir / ADAPTER_DIR}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of train.py (also under torchrun)."""
    try:
        return run_command(build_parser(), run, argv)
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
