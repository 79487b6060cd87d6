"""Fine-tune BERT with LoRA on IMDB reviews, with a hand-written PyTorch training loop.

    python train.py                                  # bert-base-uncased + the Hub's imdb
    python train.py --model PATH --data PATH ...     # local folders, offline
    torchrun --nproc_per_node=4 train.py ...         # 4 GPUs, data parallel: docs/distributed.md

``--method head`` trains only the classifier head and ``--method full`` every weight, with
the same loop and data, for comparison with LoRA.

Before training the pre-trained model (seeded random head) is scored on the test reviews;
after training the best adapter (chosen on a validation split carved out of the training
data, never on the test set, which also fits its temperature: temperature.py) is scored on the
same reviews, and the two are shown side by side.
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import resumable
import run_folder
import runtime
import stopping
from cli import run_command
from data import (
    PaddingCollator,
    hash_reviews,
    make_loader,
    move_to_device,
    split_train_validation,
    take_subset,
    tokenize,
)
from data_sources import LABEL, load_split
from evaluate import evaluate_model, evaluation_loader, format_comparison, score_model
from files import write_json
from lora_model import (
    check_encoder,
    check_lora_targets,
    checkpoint_folder,
    format_parameter_counts,
    load_base_model,
    load_checkpoint,
    load_tokenizer,
    parameter_counts,
    prepare_model,
)
from report import LOG_FILE, METRICS_FILE, REPORT_MD, RunLog, headline_f1, write_report
from runtime import autocast, is_main_process, print_main
from temperature import calibration_effect, fit_calibration, format_calibration, save_temperature
from train_flags import ADJUSTABLE_ON_RESUME, build_parser, describe_method, fill_flag_defaults

# Parameters that AdamW should not decay: biases and LayerNorm weights (BERT convention).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# Validation picks the best checkpoint by this metric (IMDB is balanced, so accuracy is fair).
SELECTION_METRIC = "accuracy"


def build_optimizer(model: torch.nn.Module, lr: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, without decay on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one launch (CUDA and CPU), and it can skip
    # its update on the device when the GradScaler found inf/NaN gradients: no host sync.
    return torch.optim.AdamW(groups, lr=lr, fused=True)


# ---------------------------------------------------------------------------------------------
# The training loop


class Trainer:
    """State of one LoRA fine-tuning run, with the loop written out in ``train_epoch``.

    Under torchrun each rank runs this same loop on its shard of every batch, through a
    ``DistributedDataParallel`` wrapper that averages the gradients across ranks in backward;
    only rank 0 writes the log, the best checkpoint and the snapshots.
    """

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, tokenizer,
                 train_loader, validation_loader, device: torch.device, precision: str):
        self.args, self.model, self.tokenizer = args, model, tokenizer
        # Under torchrun forward and backward go through the DDP wrapper (which starts every
        # rank from rank 0's weights); evaluation and saving use the model itself. BERT's
        # buffers (position and token type ids) never change: no broadcast of them per forward.
        self.ddp_model = (DistributedDataParallel(model, broadcast_buffers=False)
                          if runtime.is_distributed() else None)
        self.world_size = dist.get_world_size() if runtime.is_distributed() else 1
        self.train_loader, self.validation_loader = train_loader, validation_loader
        self.device, self.precision = device, precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay)
        self.batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        self.total_steps = steps_per_epoch * args.epochs
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(args.warmup_ratio * self.total_steps), self.total_steps)
        self.scaler = runtime.loss_scaler(device, precision)
        self.state = resumable.LoopState()  # where the loop is: saved and restored as a whole
        self.saved_step = -1  # the step of the newest snapshot, in snapshot_dir
        self.snapshot_dir = args.output_dir / resumable.SNAPSHOT_DIR
        # Kept on the device, where adding costs no host sync; the host reads them at log,
        # validation and save steps (read_device_counters).
        self.window_loss = torch.zeros((), device=device)  # loss summed since the last log
        self.nonfinite = stopping.NonfiniteSteps(device)
        self.stop = stopping.StopSignals(device)  # SIGINT/SIGTERM: stop after this step
        self.log_file: RunLog | None = None  # rank 0's log.jsonl

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        """Train from the current position (the start, or a snapshot's) to the end."""
        if is_main_process():
            self.log_file = RunLog(self.args.output_dir / LOG_FILE, self.state.log_bytes)
        try:
            with self.stop:
                while self.state.epoch < self.args.epochs:
                    self.train_epoch(self.state.epoch, start=self.state.batches_done)
                    self.state.epoch, self.state.batches_done = self.state.epoch + 1, 0
        finally:
            if self.log_file is not None:
                self.log_file.close()

    def train_epoch(self, epoch: int, start: int = 0) -> None:
        """One pass over the training batches from batch `start`; optimizer step every
        `grad_accum_steps` batches, a snapshot every `save_every` steps and at the end."""
        args = self.args
        model = self.model if self.ddp_model is None else self.ddp_model
        accum, n_batches = args.grad_accum_steps, self.batches_per_epoch
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)  # a new order every epoch, the same on all ranks
        sampler.start_at(start * args.batch_size)  # resuming: skip the batches already trained
        model.train()
        samples, window_seconds, clock = 0, 0.0, time.perf_counter()
        # One iterator, made here: tqdm.auto would otherwise call iter() on the loader twice,
        # starting the worker processes twice and losing the resume position to the first.
        bar = tqdm(iter(self.train_loader), desc=f"epoch {epoch + 1}/{args.epochs}",
                        initial=start, total=n_batches, dynamic_ncols=True,
                        disable=not is_main_process())
        for i, batch in enumerate(bar, start=start):
            # No-op when the collator already delivered the batch (num_workers=0).
            batch = move_to_device(batch, self.device)
            # The last group of an epoch can be short: average over the batches it really has.
            group_size = min(accum, n_batches - (i // accum) * accum)
            last_of_group = (i + 1) % accum == 0 or i + 1 == n_batches
            with runtime.gradient_sync(self.ddp_model, last_of_group):
                with autocast(self.device, self.precision):
                    loss = model(**batch).loss
                self.scaler.scale(loss / group_size).backward()
            self.window_loss += loss.detach()
            self.state.window_batches += 1
            self.nonfinite.add_loss(loss)
            samples += len(batch["labels"])
            if not last_of_group:
                continue  # keep accumulating gradients

            self.optimizer_step()
            self.state.batches_done = i + 1
            step, last = self.state.step, i + 1 == n_batches
            log_now = step % args.log_every == 0 or last
            validate_now = bool(args.eval_every) and step % args.eval_every == 0 and not last
            save_now = step % args.save_every == 0 and not last
            # The host looks at the device's counters only at these steps (each look waits for
            # the GPU to catch up); the steps in between queue work without waiting.
            if log_now or validate_now or save_now:
                self.read_device_counters()
            elapsed = time.perf_counter() - clock
            self.state.train_seconds += elapsed
            window_seconds += elapsed
            if log_now:
                # Every rank trains as many samples per step, so the job's rate is world x ours.
                self.log_training(epoch, samples * self.world_size / window_seconds, bar)
                samples, window_seconds = 0, 0.0
            if validate_now:
                self.validate(epoch)
                model.train()
            stop = 0 if last else self.stop.requested(agree=log_now or validate_now or save_now)
            if stop or save_now:
                self.take_snapshot()
            if stop:
                raise stopping.stopped_by(stop, step, self.snapshot_dir)
            clock = time.perf_counter()  # validation and saving are not training time
        self.validate(epoch)  # first, also when the last step asked to stop (a resume skips it)
        self.take_snapshot()
        stop = self.stop.requested(agree=True)
        if stop:
            raise stopping.stopped_by(stop, self.state.step, self.snapshot_dir)

    def optimizer_step(self) -> None:
        """Unscale, clip, step, schedule: queued on the device without waiting for it.

        A step whose gradients hold inf/NaN (fp16 overflow, a bad batch) is skipped on the
        device: the scaler's unscale_ finds them and its step has the fused AdamW leave the
        weights and its moments alone (with fp16 the scale is lowered too). The scheduler
        advances here as if the step was taken; ``read_device_counters`` takes the advance
        back for skipped steps at the next log. Under DDP the gradients are already averaged
        and equal on every rank, so each rank clips, steps and schedules as one process would.
        """
        # Clip the true gradients: with fp16 they are still multiplied by the loss scale.
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        # fp16: lower the scale after an overflow, raise it after many clean steps; bf16 and
        # fp32 keep it at 1 (no scaling: the scaler is there for its inf/NaN check alone).
        self.scaler.update(None if self.precision == "fp16" else runtime.UNSCALED)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.count_step(norm)  # an inf/NaN norm: the step just queued is skipped
        self.state.step += 1

    def read_device_counters(self) -> None:
        """Read what the device counted since the last look (one host sync): give the
        schedule back the advance of skipped steps, and stop a run whose loss stayed inf/NaN
        for MAX_NONFINITE_STEPS steps in a row."""
        skipped, self.state.nonfinite_steps, longest = self.nonfinite.read()
        if skipped:
            # Rewind the schedule to the steps really taken; step() sets their learning rate.
            self.scheduler.last_epoch -= skipped + 1
            self.scheduler.step()
        if longest >= stopping.MAX_NONFINITE_STEPS:
            kept = (f"the snapshot of step {self.saved_step} in {self.snapshot_dir}"
                    if self.saved_step >= 0 else None)
            raise stopping.diverged(longest, self.state.step, kept)

    def validate(self, epoch: int) -> None:
        """Score the validation split; save the checkpoint when it is the best so far.

        Every rank scores its share and gets the same metrics; rank 0 alone saves and logs.
        """
        metrics = evaluate_model(self.model, self.validation_loader, self.device,
                                 self.precision, desc="Validating")
        score = metrics[SELECTION_METRIC]
        improved = self.state.best_score is None or score > self.state.best_score
        if improved:
            self.state.best_score = score
            if is_main_process():
                run_folder.save_best_checkpoint(self.args, self.model, self.tokenizer)
        self.log({"epoch": epoch + 1, "validation": metrics, "best": improved})
        if is_main_process():
            tqdm.write(f"step {self.state.step}: validation accuracy {metrics['accuracy']:.4f}, "
                       f"F1 {headline_f1(metrics):.4f}"
                       + ("  (best so far, saved)" if improved else ""))

    # -- the log and the snapshots ---------------------------------------------------------

    def log_training(self, epoch: int, samples_per_s: float, bar: tqdm) -> None:
        """Log the mean loss since the last log line (a host sync), the lr and the speed."""
        loss = runtime.mean_over_ranks(self.window_loss / self.state.window_batches).item()
        lr = self.scheduler.get_last_lr()[0]
        self.log({"epoch": epoch + 1, "loss": loss, "lr": lr, "samples_per_s": samples_per_s})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        self.window_loss.zero_()
        self.state.window_batches = 0

    def log(self, record: dict) -> None:
        """Append a record to log.jsonl (rank 0: the other ranks hold no log file)."""
        if self.log_file is not None:
            self.log_file.write({"step": self.state.step, **record})

    def take_snapshot(self) -> None:
        """Save everything needed to continue from this step (``save_snapshot``: rank 0 writes,
        but every rank contributes its random-number states)."""
        if self.saved_step == self.state.step:
            return
        self.read_device_counters()  # the schedule and counters as of this step
        rng = runtime.gather_to_main(resumable.rng_states(self.device))
        if is_main_process():
            state = replace(self.state, window_loss=self.window_loss.item(),
                            log_bytes=self.log_file.size())
            resumable.save_snapshot(
                self.args.output_dir, self.model, self.optimizer, self.scheduler, self.scaler,
                state, self.train_loader.sampler.epoch_order(), rng,
                run_folder.run_settings(self.args, self.precision, self.world_size))
        runtime.wait_for_all_ranks()
        self.saved_step = self.state.step

    def resume_from(self, folder: Path) -> None:
        """Continue from the snapshot in `folder`: weights, optimizer, scheduler, scaler,
        position in the data, best score, log length and every random stream."""
        saved, rest = resumable.restore_snapshot(folder, self.model, self.optimizer, self.scheduler,
                                                 self.scaler, self.device, self.state.reviews_hash)
        self.state, self.saved_step = saved, saved.step
        self.window_loss.fill_(saved.window_loss)
        self.nonfinite.restore(saved.nonfinite_steps)
        if saved.batches_done == self.batches_per_epoch:  # saved at the end of an epoch
            self.state = replace(saved, epoch=saved.epoch + 1, batches_done=0)
        else:  # mid-epoch: the rest of this epoch's order must be the snapshot's
            resumable.check_data_order(self.train_loader.sampler, rest["epoch_order"], saved.epoch)
        rank = dist.get_rank() if runtime.is_distributed() else 0
        resumable.restore_rng_states(rest["rng"][rank], self.device)
        print_main(f"Resuming from {folder} at step {self.state.step} of {self.total_steps} "
                   f"(epoch {min(self.state.epoch + 1, self.args.epochs)}, batch "
                   f"{self.state.batches_done} of {self.batches_per_epoch})")


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    """Train, score before/after on the test reviews, write metrics.json and the report.

    Returns the metrics as written to metrics.json.
    """
    run_started = time.perf_counter()
    # Every check that can refuse the run comes before the run folder is created.
    rank, world_size, device = runtime.init_distributed(args.device)
    runtime.fill_device_defaults(args, device)
    precision = runtime.pick_precision(args.precision, device)
    fill_flag_defaults(args)  # --lr by --method, --model as an absolute path
    snapshot = run_folder.plan_run_folder(args, precision, world_size, ADJUSTABLE_ON_RESUME)
    check_encoder(args.model)
    # Python, numpy and torch. Rank 0 gets `seed` itself, so its LoRA init (which DDP copies
    # to every rank) is the one-process init; other ranks draw their own dropout masks.
    transformers.set_seed(args.seed + rank)

    # Data: train/validation carved from the training split, whose labels decide the classes
    # (or --labels does); the test split, scored before and after, holds only those.
    tokenizer = load_tokenizer(args.model)
    train = load_split(args.data, "train", args.text_column, args.label_column, args.labels)
    label_names = tuple(train.features[LABEL].names)
    train, validation = split_train_validation(train, args.train_samples, args.validation_size,
                                               args.data_seed)
    test = take_subset(load_split(args.data, "test", args.text_column, args.label_column,
                                  label_names), args.eval_samples, args.data_seed)
    reviews_hash = hash_reviews(train, validation, test)  # a resumed run must see the same
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    tokenize_started = time.perf_counter()
    # Every rank tokenizes (the `datasets` cache files are written atomically, so concurrent
    # ranks are safe) and loads its own share of each split.
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length, args.truncation),
                               args.batch_size, collator, shuffle=True, seed=args.seed,
                               num_workers=args.num_workers, rank=rank, world_size=world_size,
                               group_by_length=args.group_by_length)
    validation_loader = evaluation_loader(tokenizer, validation, args, device, rank, world_size)
    test_loader = evaluation_loader(tokenizer, test, args, device, rank, world_size)
    tokenize_seconds = time.perf_counter() - tokenize_started
    model = load_base_model(args.model, label_names).to(device)
    if args.method == "lora":
        check_lora_targets(model, args.lora_targets)

    run_folder.start_run_folder(args.output_dir, snapshot, {
        **run_folder.run_settings(args, precision, world_size), "resolved_device": str(device),
        "train_examples": len(train), "validation_examples": len(validation),
        "test_examples": len(test), "versions": run_folder.library_versions()})
    processes = f" x {world_size} processes" if world_size > 1 else ""
    print_main(f"Data: {len(train)} training, {len(validation)} validation, {len(test)} test "
               f"reviews; {device}, {precision}{processes}; output in {args.output_dir}")

    # Before: the pre-trained model (seeded random head) on the test reviews.
    test_started = time.perf_counter()
    if snapshot is None:
        before = evaluate_model(model, test_loader, device, precision, desc="Scoring pre-trained")
    else:  # scored when the run started; the snapshot keeps the numbers
        before = resumable.saved_before(snapshot)
    test_seconds = {"before": None if snapshot else time.perf_counter() - test_started}
    print_main(f"Pre-trained model: test accuracy {before['accuracy']:.4f}")

    # The model: LoRA adapters (or the head alone, or every weight) on the pre-trained BERT.
    model = prepare_model(model, args.method, args.lora_r, args.lora_alpha, args.lora_dropout,
                          args.lora_targets)
    trainable, total = parameter_counts(model)
    print_main(f"{describe_method(args)}: {format_parameter_counts(trainable, total)}")
    if args.compile:
        # In place: parameter names, and so the saved weights, stay the same. Dynamic shapes:
        # batches are padded to their longest review, so the width changes from batch to batch.
        model.compile(dynamic=True)
    trainer = Trainer(args, model, tokenizer, train_loader, validation_loader, device, precision)
    trainer.state.before, trainer.state.reviews_hash = before, reviews_hash
    if snapshot is not None:
        trainer.resume_from(snapshot)
    trainer.train()
    train_seconds = trainer.state.train_seconds
    # Free the trained model and its optimizer before the best checkpoint is loaded, so that
    # two copies of the model are never in memory together.
    del trainer, model
    gc.collect()

    # After: the best checkpoint, scored exactly as evaluate.py will: loaded back from disk
    # (once rank 0 has finished writing it), its logits divided by one temperature fitted on
    # the validation reviews (temperature.py: the same accuracy, more honest probabilities).
    runtime.wait_for_all_ranks()
    best = load_checkpoint(args.output_dir, args.model)[0].to(device)
    validated = score_model(best, validation_loader, device, precision, desc="Calibrating")
    calibration = fit_calibration(validated.logits, validated.labels)
    if is_main_process():
        save_temperature(checkpoint_folder(args.output_dir, args.method), calibration)
    test_started = time.perf_counter()
    scored = score_model(best, test_loader, device, precision, calibration["temperature"],
                         desc="Scoring fine-tuned")
    test_seconds["after"] = time.perf_counter() - test_started
    calibration["test"] = calibration_effect(scored.logits, scored.labels, scored.temperature)
    metrics = {"before": before, "after": scored.metrics, "calibration": calibration,
               "parameters": {"trainable": trainable, "total": total},
               "train_seconds": train_seconds,
               "train_samples_per_s": len(train) * args.epochs / train_seconds,
               "tokenize_seconds": tokenize_seconds, "test_seconds": test_seconds,
               "wall_seconds": time.perf_counter() - run_started}
    if is_main_process():
        write_report(args.output_dir, metrics)
        write_json(args.output_dir / METRICS_FILE, metrics)  # last: the run is finished
        run_folder.finish_run_folder(args.output_dir)
    print_main(f"\nTest reviews ({len(test)}), pre-trained vs fine-tuned ({args.method}):")
    print_main(format_comparison([("before", before), ("after", scored.metrics)]))
    print_main(format_calibration(calibration))
    print_main(f"\nTraining took {train_seconds:.0f} s ({metrics['train_samples_per_s']:.1f} "
               f"samples/s). Wrote {args.output_dir / METRICS_FILE} and "
               f"{args.output_dir / REPORT_MD} with its plots; the checkpoint is in "
               f"{checkpoint_folder(args.output_dir, args.method)}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of train.py (also under torchrun)."""
    try:
        return run_command(build_parser(), run, argv, run_folder.disk_full_advice)
    except stopping.TrainingStopped as stop:
        print_main(f"train.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print_main("train.py: interrupted; run the same command again to resume from the "
                   "latest snapshot, if one was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        run_folder.release_run_folders()
        runtime.close_distributed()


if __name__ == "__main__":
    sys.exit(main())
