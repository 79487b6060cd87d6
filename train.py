"""Fine-tune BERT with LoRA on IMDB reviews, with a hand-written PyTorch training loop.

    python train.py                                  # bert-base-uncased + the Hub's imdb
    python train.py --model PATH --data PATH ...     # local folders, offline
    torchrun --nproc_per_node=4 train.py ...         # data parallel over 4 GPUs (see README)

``--method head`` trains only the classifier head and ``--method full`` every weight, with
the same loop and data, for comparison with LoRA.

Before training the pre-trained model (seeded random head) is scored on the test reviews;
after training the best adapter (chosen on a validation split carved out of the training
data, never on the test set) is scored on the same reviews, and the two are shown side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import datasets
import peft
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from cli import (
    UsageError,
    run_command,
)
from data import (
    PaddingCollator,
    Preprocessing,
    load_split,
    make_loader,
    move_to_device,
    split_train_validation,
    take_subset,
    tokenize,
)
from evaluate import evaluate_model, format_comparison, test_loader_for
from lora_model import (
    ADAPTER_DIR,
    DEFAULT_METHOD,
    METHODS,
    MODEL_DIR,
    check_encoder,
    check_lora_targets,
    checkpoint_folder,
    format_parameter_counts,
    load_base_model,
    load_checkpoint,
    load_tokenizer,
    parameter_counts,
    prepare_model,
    save_checkpoint,
)
from report import (
    COMPARISON_PNG,
    CONFIG_FILE,
    CURVES_PNG,
    LOG_FILE,
    METRICS_FILE,
    REPORT_MD,
    write_json,
    write_report,
)
from resumable import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    PARTIAL_CHECKPOINT_DIR,
    PREVIOUS_CHECKPOINT_DIR,
    PROGRESS_FILE,
    TRAINABLE_FILE,
    TRAINING_STATE_FILE,
    LoopState,
    lock_run_folder,
    plan_resume,
    publish_checkpoint,
    release_run_folders,
    restore_rng_states,
    rng_states,
    run_settings,
    swap_in_folder,
    write_checkpoint,
)
from runtime import (
    all_ranks_true,
    autocast,
    close_distributed,
    fill_device_defaults,
    from_main_process,
    gather_to_main,
    init_distributed,
    is_distributed,
    is_main_process,
    mean_over_ranks,
    pick_precision,
    print_main,
    wait_for_all_ranks,
)
from train_flags import ADJUSTABLE_ON_RESUME, DEFAULT_LRS, build_parser

# Parameters that AdamW should not decay: biases and LayerNorm weights (BERT convention).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
# A loss that is inf/NaN this many optimizer steps in a row stops the run (one such step is
# skipped and forgotten: fp16 overflow, one bad batch).
MAX_NONFINITE_STEPS = 5
# The GradScaler's scale for bf16 and fp32: the loss is not scaled (see loss_scaler).
UNSCALED = 1.0
# Everything a run writes into its folder (what --overwrite clears first).
RUN_FILES = (ADAPTER_DIR, MODEL_DIR, CONFIG_FILE, LOG_FILE, METRICS_FILE, REPORT_MD, CURVES_PNG,
             COMPARISON_PNG, CHECKPOINT_DIR, PREVIOUS_CHECKPOINT_DIR, PARTIAL_CHECKPOINT_DIR)
# Validation picks the best adapter by this metric (IMDB is balanced, so accuracy is fair).
SELECTION_METRIC = "accuracy"


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def default_output_dir(model: str, method: str = DEFAULT_METHOD) -> Path:
    """runs/<model name>-<method>-<YYYYmmdd-HHMMSS>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(model.rstrip('/')).name}-{method}-{stamp}"


def save_run_checkpoint(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> None:
    """Save the run's best checkpoint with the preprocessing evaluate.py must repeat, whole or
    not at all: written into a folder beside it, then swapped in (``swap_in_folder``), so a
    full disk or a kill leaves the previous best in place."""
    folder = checkpoint_folder(args.output_dir, args.method)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a save that a kill cut short
    save_checkpoint(model, tokenizer, partial, args.method)
    Preprocessing(args.truncation, args.max_length).save(partial)
    swap_in_folder(partial, folder)


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


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The GradScaler: fp16's loss scaling, and for every precision the skip of a step whose
    gradients hold inf/NaN, decided on the device.

    fp16 gradients underflow without loss scaling, so fp16 gets the dynamic scale (halved after
    an overflow, doubled after 2000 clean steps). bf16 has fp32's range and needs no scaling:
    bf16 and fp32 start at a scale of exactly 1, kept there by ``Trainer.optimizer_step``, and
    use the scaler only for its inf/NaN check, which tells the fused AdamW to leave the weights
    alone without the host waiting for the answer.
    """
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=UNSCALED)


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


def claim_output_dir(folder: Path) -> None:
    """Rank 0 takes the run folder's lock (``lock_run_folder``); if another run holds it,
    every rank stops with the same sentence, before anything in the folder is read or written."""
    refusal = None
    if is_main_process():
        try:
            lock_run_folder(folder)
        except UsageError as error:
            refusal = str(error)
    refusal = from_main_process(refusal)
    if refusal:
        raise UsageError(refusal)


class TrainingStopped(Exception):
    """The run stopped before the end on purpose (a signal, a diverged loss); exits with
    `exit_code` after saying why and what to do."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# The training loop


class Trainer:
    """State of one LoRA fine-tuning run, with the loop written out in ``train_epoch``.

    Under torchrun each rank runs this same loop on its shard of every batch, through a
    ``DistributedDataParallel`` wrapper that averages the gradients across ranks in backward;
    only rank 0 writes the log, the adapter and the checkpoints.
    """

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, tokenizer,
                 train_loader, validation_loader, device: torch.device, precision: str):
        self.args, self.model, self.tokenizer = args, model, tokenizer
        # Under torchrun forward and backward go through the DDP wrapper (which starts every
        # rank from rank 0's weights); evaluation and saving use the model itself. BERT's
        # buffers (position and token type ids) never change: no broadcast of them per forward.
        self.ddp_model = (DistributedDataParallel(model, broadcast_buffers=False)
                          if is_distributed() else None)
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.train_loader, self.validation_loader = train_loader, validation_loader
        self.device, self.precision = device, precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay)
        self.batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        self.total_steps = steps_per_epoch * args.epochs
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(args.warmup_ratio * self.total_steps), self.total_steps)
        self.scaler = loss_scaler(device, precision)
        self.state = LoopState()  # where the loop is: saved and restored as a whole
        self.saved_step = -1  # the step of the newest checkpoint
        # Counters the loop keeps on the device, where adding to them costs no host sync; the
        # host reads them at log, save and validation steps (read_device_counters).
        self.window_loss = torch.zeros((), device=device)  # loss summed since the last log
        self.group_loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)  # not yet read
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=device)  # steps in a row
        self.longest_nonfinite_run = torch.zeros((), dtype=torch.long, device=device)
        self.stop_signal = 0  # set by SIGINT/SIGTERM: stop after the current step
        self.log_file = None

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        """Train from the current position (the start, or a restored checkpoint's) to the end."""
        self.open_log()
        try:
            with self.stop_on_signals():
                while self.state.epoch < self.args.epochs:
                    self.train_epoch(self.state.epoch, start=self.state.batches_done)
                    self.state.epoch, self.state.batches_done = self.state.epoch + 1, 0
        finally:
            if self.log_file is not None:
                self.log_file.close()

    def train_epoch(self, epoch: int, start: int = 0) -> None:
        """One pass over the training batches from batch `start`; optimizer step every
        `grad_accum_steps` batches, a checkpoint every `save_every` steps and at the end."""
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
        progress = tqdm(iter(self.train_loader), desc=f"epoch {epoch + 1}/{args.epochs}",
                        initial=start, total=n_batches, dynamic_ncols=True,
                        disable=not is_main_process())
        for i, batch in enumerate(progress, start=start):
            # No-op when the collator already delivered the batch (num_workers=0).
            batch = move_to_device(batch, self.device)
            # The last group of an epoch can be short: average over the batches it really has.
            group_size = min(accum, n_batches - (i // accum) * accum)
            last_of_group = (i + 1) % accum == 0 or i + 1 == n_batches
            with self.gradient_sync(last_of_group):
                with autocast(self.device, self.precision):
                    loss = model(**batch).loss
                self.scaler.scale(loss / group_size).backward()
            self.window_loss += loss.detach()
            self.state.window_batches += 1
            self.group_loss_finite &= torch.isfinite(loss.detach())
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
                self.log_training(epoch, samples * self.world_size / window_seconds, progress)
                samples, window_seconds = 0, 0.0
            if validate_now:
                self.validate(epoch)
                model.train()
            stop = self.stop_requested(agree=log_now or validate_now or save_now)
            if stop or save_now:
                self.save_resumable_checkpoint()
            if stop:
                raise self.interrupted(stop)
            clock = time.perf_counter()  # validation and saving are not training time
        self.validate(epoch)
        self.save_resumable_checkpoint()
        stop = self.stop_requested(agree=True)
        if stop:
            raise self.interrupted(stop)

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
        self.scaler.update(None if self.precision == "fp16" else UNSCALED)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A non-finite norm is what the scaler found: the step just queued will be skipped.
        self.skipped_steps += ~torch.isfinite(norm)
        loss_finite = all_ranks_true(self.group_loss_finite)
        self.nonfinite_run = torch.where(loss_finite, 0, self.nonfinite_run + 1)
        torch.maximum(self.longest_nonfinite_run, self.nonfinite_run,
                      out=self.longest_nonfinite_run)
        self.group_loss_finite.fill_(True)
        self.state.step += 1

    def read_device_counters(self) -> None:
        """Read what the device counted since the last look (one host sync): give the
        schedule back the advance of skipped steps, and stop a run whose loss stayed inf/NaN
        for MAX_NONFINITE_STEPS steps in a row."""
        skipped, run, longest = torch.stack(
            [self.skipped_steps, self.nonfinite_run, self.longest_nonfinite_run]).tolist()
        if skipped:
            # Rewind the schedule to the steps really taken; step() sets their learning rate.
            self.scheduler.last_epoch -= skipped + 1
            self.scheduler.step()
            self.skipped_steps.zero_()
        self.state.nonfinite_steps = run
        self.longest_nonfinite_run.fill_(run)
        if longest >= MAX_NONFINITE_STEPS:
            where = (f"the checkpoint of step {self.saved_step} in "
                     f"{self.args.output_dir / CHECKPOINT_DIR} is kept"
                     if self.saved_step >= 0 else "no checkpoint was written yet")
            raise TrainingStopped(
                f"the training loss was inf/NaN for {longest} steps in a row (up to step "
                f"{self.state.step}); stopped: {where}. Lower --lr or --max-grad-norm, or use "
                "--precision fp32", exit_code=1)

    def validate(self, epoch: int) -> None:
        """Score the validation split; save the adapter when it is the best so far.

        Every rank scores its share and gets the same metrics; rank 0 alone saves and logs.
        """
        metrics = evaluate_model(self.model, self.validation_loader, self.device,
                                 self.precision, desc="Validating")
        score = metrics[SELECTION_METRIC]
        improved = self.state.best_score is None or score > self.state.best_score
        if improved:
            self.state.best_score = score
            if is_main_process():
                save_run_checkpoint(self.args, self.model, self.tokenizer)
        self.log({"epoch": epoch + 1, "validation": metrics, "best": improved})
        if is_main_process():
            tqdm.write(f"step {self.state.step}: validation accuracy {metrics['accuracy']:.4f}, "
                       f"F1 {metrics['f1']:.4f}" + ("  (best so far, saved)" if improved else ""))

    # -- the log ----------------------------------------------------------------------------

    def open_log(self) -> None:
        """Open log.jsonl: new, or cut back to what the restored checkpoint had logged."""
        if not is_main_process():
            return
        path = self.args.output_dir / LOG_FILE
        if self.state.step == 0:
            self.log_file = path.open("w")
        else:
            self.log_file = path.open("r+" if path.exists() else "w")
            self.log_file.truncate(self.state.log_bytes)
            self.log_file.seek(self.state.log_bytes)

    def log_training(self, epoch: int, samples_per_s: float, progress: tqdm) -> None:
        """Log the mean loss since the last log line (a host sync), the lr and the speed."""
        self.log({"epoch": epoch + 1,
                  "loss": mean_over_ranks(self.window_loss / self.state.window_batches).item(),
                  "lr": self.scheduler.get_last_lr()[0], "samples_per_s": samples_per_s},
                 progress)
        self.window_loss.zero_()
        self.state.window_batches = 0

    def log(self, record: dict, progress: tqdm | None = None) -> None:
        """Append a record to the log and show the training numbers on the progress bar.

        Rank 0 only: the other ranks hold no log file and show no progress bar.
        """
        if self.log_file is None:
            return
        record = {"step": self.state.step, **record}
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}")

    # -- stopping and resuming --------------------------------------------------------------

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (pre-emption, ``kill``) ask the loop to stop after the
        current optimizer step and write a checkpoint; a second Ctrl-C stops at once."""
        def request_stop(signum: int, frame) -> None:
            if self.stop_signal and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if is_main_process():
                tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving "
                           "a checkpoint (Ctrl-C again to stop at once, without one)")

        handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def stop_requested(self, agree: bool) -> int:
        """The signal that asked to stop (0 if none).

        Under DDP the ranks must stop at the same step, so they agree on it (a collective and a
        host sync) only where `agree` is True: at log, validation and save steps and at the end
        of an epoch. One process reads its own flag at every step, for free.
        """
        if not is_distributed():
            return self.stop_signal
        if not agree:
            return 0
        flag = torch.tensor(self.stop_signal, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def interrupted(self, signum: int) -> TrainingStopped:
        """The exception that ends an interrupted run: exit code 128 + signal, as shells do."""
        return TrainingStopped(
            f"stopped by {signal.Signals(signum).name} at step {self.state.step}; the checkpoint "
            f"is in {self.args.output_dir / CHECKPOINT_DIR}. Resume by running the same command "
            f"again (or add --resume)", exit_code=128 + signum)

    def save_resumable_checkpoint(self) -> None:
        """Write everything needed to continue from this step, crash-safely (rank 0 writes,
        but every rank contributes its random-number states)."""
        if self.saved_step == self.state.step:
            return
        self.read_device_counters()  # the schedule and counters as of this step
        rng = gather_to_main(rng_states(self.device))
        if is_main_process():
            partial = self.args.output_dir / PARTIAL_CHECKPOINT_DIR
            shutil.rmtree(partial, ignore_errors=True)  # a save that a kill cut short
            write_checkpoint(partial, {
                TRAINABLE_FILE: {name: param.detach().contiguous()
                                 for name, param in self.model.named_parameters()
                                 if param.requires_grad},
                TRAINING_STATE_FILE: {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "rng": rng,
                    "epoch_order": torch.tensor(self.train_loader.sampler.epoch_order())},
                PROGRESS_FILE: {
                    **asdict(replace(self.state, window_loss=self.window_loss.item(),
                                     log_bytes=self.log_file.tell())),
                    "settings": run_settings(self.args, self.precision, self.world_size)}})
            publish_checkpoint(partial, self.args.output_dir)
        wait_for_all_ranks()
        self.saved_step = self.state.step

    def restore(self, folder: Path) -> None:
        """Continue from the checkpoint in `folder`: weights, optimizer, scheduler, scaler,
        position in the data, best score, log length and every random stream."""
        tensors = load_file(folder / TRAINABLE_FILE, device=str(self.device))
        trainable = {name for name, param in self.model.named_parameters()
                     if param.requires_grad}
        if set(tensors) != trainable:
            raise UsageError(f"the checkpoint in {folder} holds other trainable weights than "
                             "this model; pass --overwrite to start over")
        self.model.load_state_dict(tensors, strict=False)
        state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
        for group in state["optimizer"]["param_groups"]:  # saved groups replace the settings;
            group.update(fused=True, foreach=None)  # older runs' CPU AdamW was not fused
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty from a run whose scaler was disabled (older versions)
            self.scaler.load_state_dict(state["scaler"])
        progress = json.loads((folder / PROGRESS_FILE).read_text())
        del progress["settings"]  # checked against the flags before the run started
        self.state = saved = LoopState(**progress)
        self.saved_step = saved.step
        self.window_loss.fill_(saved.window_loss)
        self.nonfinite_run.fill_(saved.nonfinite_steps)
        self.longest_nonfinite_run.fill_(saved.nonfinite_steps)
        if saved.batches_done == self.batches_per_epoch:  # saved at the end of an epoch
            self.state = replace(saved, epoch=saved.epoch + 1, batches_done=0)
        else:  # mid-epoch: the rest of this epoch's order must be the checkpoint's
            self.check_data_order(state["epoch_order"], saved.epoch)
        restore_rng_states(state["rng"][dist.get_rank() if is_distributed() else 0],
                           self.device)

    def check_data_order(self, saved_order: torch.Tensor, epoch: int) -> None:
        """Refuse to resume when the training data no longer comes in the checkpoint's order."""
        self.train_loader.sampler.set_epoch(epoch)
        same = is_main_process() and torch.equal(
            saved_order, torch.tensor(self.train_loader.sampler.epoch_order()))
        if not from_main_process(same):  # rank 0 holds the saved order; all ranks must agree
            raise UsageError("the training data is not the checkpoint's: the reviews or their "
                             "order changed since the run started; pass --overwrite to start "
                             "over")


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    """Train, score before/after on the test reviews, write metrics.json and the report.

    Returns the metrics as written to metrics.json.
    """
    run_started = time.perf_counter()
    # Every check that can refuse the run comes before the run folder is created.
    rank, world_size, device = init_distributed(args.device)
    fill_device_defaults(args, device)
    precision = pick_precision(args.precision, device)
    # The default folder name holds the time: take rank 0's, in case a second ticks between.
    if args.resume and args.output_dir is None:
        raise UsageError("--resume needs the --output-dir of the run to continue")
    args.output_dir = from_main_process(args.output_dir
                                        or default_output_dir(args.model, args.method))
    if args.lr is None:
        args.lr = DEFAULT_LRS[args.method]
    if Path(args.model).expanduser().exists():
        # adapter_config.json records this path: an absolute one keeps the adapter loadable
        # from any working directory.
        args.model = str(Path(args.model).expanduser().resolve())
    if (args.output_dir / LOCK_FILE).is_file():  # a folder some run has used: is it in use?
        claim_output_dir(args.output_dir)
    checkpoint = plan_resume(args, run_settings(args, precision, world_size),
                             ADJUSTABLE_ON_RESUME)
    if checkpoint is None and not args.overwrite and (args.output_dir / CONFIG_FILE).is_file():
        print_main(f"{args.output_dir} holds an unfinished run that was stopped before its "
                   "first checkpoint: starting it again from the beginning")
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
    train_loader = make_loader(tokenize(train, tokenizer, args.max_length, args.truncation),
                               args.batch_size, collator, shuffle=True, seed=args.seed,
                               num_workers=args.num_workers, rank=rank, world_size=world_size,
                               group_by_length=args.group_by_length)
    validation_loader = make_loader(tokenize(validation, tokenizer, args.max_length,
                                             args.truncation),
                                    args.eval_batch_size, collator, shuffle=False,
                                    num_workers=args.num_workers, rank=rank,
                                    world_size=world_size)
    test_loader = test_loader_for(tokenizer, test, args, device, rank, world_size)
    tokenize_seconds = time.perf_counter() - tokenize_started
    model = load_base_model(args.model).to(device)
    if args.method == "lora":
        check_lora_targets(model, args.lora_targets)

    wait_for_all_ranks()  # every rank has passed its checks before rank 0 writes a file
    if is_main_process():
        args.output_dir.mkdir(parents=True, exist_ok=True)
    claim_output_dir(args.output_dir)  # held already, or a run started at the same moment
    if is_main_process():
        if checkpoint is None:
            remove_run_files(args.output_dir)  # start over: no stale adapter, log or plots
            write_json(args.output_dir / CONFIG_FILE, {
                **run_settings(args, precision, world_size), "resolved_device": str(device),
                "train_examples": len(train), "validation_examples": len(validation),
                "test_examples": len(test), "versions": library_versions()})
        elif checkpoint.name == PREVIOUS_CHECKPOINT_DIR:
            # The latest is damaged: remove it, so that the next save keeps this one.
            shutil.rmtree(args.output_dir / CHECKPOINT_DIR, ignore_errors=True)
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
    if checkpoint is None:
        before = evaluate_model(model, test_loader, device, precision,
                                desc="Scoring pre-trained")
        test_seconds = {"before": time.perf_counter() - test_started}
    else:  # scored when the run started; the checkpoint keeps the numbers
        before = json.loads((checkpoint / PROGRESS_FILE).read_text())["before"]
        test_seconds = {"before": None}
    print_main(f"Pre-trained model: test accuracy {before['accuracy']:.4f}")

    model = prepare_model(model, args.method, args.lora_r, args.lora_alpha, args.lora_dropout,
                          args.lora_targets)
    trainable, total = parameter_counts(model)
    what = (f"LoRA r={args.lora_r}, alpha={args.lora_alpha:g} on {args.lora_targets}"
            if args.method == "lora" else METHODS[args.method])
    print_main(f"{what}, lr {args.lr:g}: {format_parameter_counts(trainable, total)}")
    if args.compile:
        # In place: parameter names, and so the saved weights, stay the same. Dynamic shapes:
        # batches are padded to their longest review, so the width changes from batch to batch.
        model.compile(dynamic=True)
    trainer = Trainer(args, model, tokenizer, train_loader, validation_loader, device, precision)
    trainer.state.before = before
    if checkpoint is not None:
        trainer.restore(checkpoint)
        position = trainer.state
        print_main(f"Resuming from {checkpoint} at step {position.step} of "
                   f"{trainer.total_steps} (epoch {min(position.epoch + 1, args.epochs)}, "
                   f"batch {position.batches_done} of {trainer.batches_per_epoch})")
    trainer.train()
    train_seconds = trainer.state.train_seconds
    # Free the trained model and its optimizer before the best checkpoint is loaded, so that
    # two copies of the model are never in memory together.
    del trainer, model
    gc.collect()

    # Score the best checkpoint exactly as evaluate.py will: loaded back from disk (once rank 0
    # has finished writing it).
    wait_for_all_ranks()
    best = load_checkpoint(args.output_dir, args.model)[0].to(device)
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
        # Finished: the best checkpoint holds the result, and a finished run is not resumed,
        # so the resumable checkpoints (which can be large) are removed.
        for name in (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT_DIR, PARTIAL_CHECKPOINT_DIR):
            shutil.rmtree(args.output_dir / name, ignore_errors=True)
    print_main(f"\nTest reviews ({len(test)}), pre-trained vs fine-tuned ({args.method}):")
    print_main(format_comparison([("before", before), ("after", after)]))
    print_main(f"\nTraining took {train_seconds:.0f} s ({metrics['train_samples_per_s']:.1f} "
               f"samples/s). Wrote {args.output_dir / METRICS_FILE} and "
               f"{args.output_dir / REPORT_MD} with its plots; the checkpoint is in "
               f"{checkpoint_folder(args.output_dir, args.method)}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of train.py (also under torchrun)."""
    try:
        return run_command(build_parser(), run, argv)
    except TrainingStopped as stop:
        print_main(f"train.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print_main("train.py: interrupted; run the same command again to resume from the "
                   "latest checkpoint, if one was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        release_run_folders()
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
