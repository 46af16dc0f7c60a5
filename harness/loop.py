"""The training loop: plain functions called in order, readable top to bottom.

Loss scaling, the one trick here: each rank's loss is (sum of its per-sample losses) times
world_size / (samples in the global batch). DDP averages gradients over ranks, so the applied
gradient is exactly the global-batch mean, however unevenly the batch splits across ranks and
micro-batches. That is what makes 1 rank and N ranks train the same model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from harness import faults, sampling
from harness.config import Config, ConfigError, dump_config, to_plain_dict
from harness.datasets import Split, TaskData, build_data
from harness.distributed import (all_reduce_sum, check_lrs_agree, gather_rows, launcher_pid, lost_rank_error,
                                 make_accelerator, raise_if_lrs_differ, shutdown_process_group, warn_if_ranks_lost)
from harness.models import build_model
from harness.objectives import METRIC_NAMES, per_sample_loss, per_sample_metric, summed_loss
from harness.optimizers import build_optimizer
from harness.schedules import Horizon, LRSchedule, build_schedule
from harness.checkpoint import CheckpointStore
from harness.progress import Progress
from harness.preemption import Preempted, PreemptionWatcher, clear_marker
from harness.run_lock import lock_run_folder
from harness.tracking import TensorBoardLog, flatten


def save_checkpoint(trainer, store, reason):
    from harness.resume import save_checkpoint as save

    return save(trainer, store, reason)

logger = logging.getLogger("harness")


@dataclass
class TrainState:
    """The trainer's counters; saved in every checkpoint like any other state."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    samples_in_epoch: int = 0  # position in the current epoch's (world-size independent) order
    best_metric: Optional[float] = None
    # Partial sums of the train-loss log windows, reduced over ranks, so a resumed run logs the
    # same values an uninterrupted one would.
    window_loss_sum: float = 0.0
    window_count: int = 0
    epoch_loss_sum: float = 0.0
    epoch_count: int = 0
    history: list[dict] = field(default_factory=list)  # per-epoch validation results
    validations_without_improvement: int = 0  # for early stopping
    early_stopped: bool = False
    # The checkpoint this run's weights started from (run.init_from), for the record.
    init_from: Optional[str] = None


@dataclass
class Trainer:
    """What one run holds; the functions below do the work."""

    cfg: Config
    accelerator: object
    task: TaskData
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped on several ranks)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    group_names: list[str]
    horizon: Horizon
    tb: TensorBoardLog
    store: Optional[CheckpointStore] = None
    metric_name: str = "accuracy"
    # The monitored value (checkpoint.monitor) of the latest validation, for keep_best.
    last_monitored: Optional[float] = None
    preemption: Optional[PreemptionWatcher] = None
    progress: Optional[Progress] = None
    last_logged: dict = field(default_factory=dict)  # latest train loss and samples/s, for progress
    state: TrainState = field(default_factory=TrainState)
    # LRs applied at steps not yet written/checked: [(step, [lr per group])]
    pending_lrs: list[tuple[int, list[float]]] = field(default_factory=list)
    # This rank's per-step summed losses (detached) since the log window / the epoch started: a list
    # append per step instead of a tensor op; summed when logged, folded when long (see add_loss).
    window_losses: list[torch.Tensor] = field(default_factory=list)
    epoch_losses: list[torch.Tensor] = field(default_factory=list)
    # Backward seeds (the loss scale as a tensor), by scale: see backward().
    gradient_seeds: dict = field(default_factory=dict)
    window_started: float = field(default_factory=time.perf_counter)
    window_samples: int = 0
    # This rank's own validation sums (loss_sum, metric_sum, count) before the reduction.
    local_validations: list[list[float]] = field(default_factory=list)
    # CPU copies of the model and optimizer tensors for background saves, reused between saves.
    checkpoint_staging: dict = field(default_factory=dict)

    # The model without Accelerate's wrappers (DDP...): unwrapped once, in build_trainer, because
    # Accelerator.unwrap_model looks for DeepSpeed with an uncached importlib search (~0.1 ms) per call.
    raw_model: Optional[torch.nn.Module] = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def epoch_length(self) -> int:
        """Samples an epoch consumes (the last partial batch is dropped with drop_last)."""
        n, batch = len(self.task.train), self.cfg.data.batch_size
        return n - n % batch if self.cfg.data.drop_last else n


# --------------------------------------------------------------------------------------------
# Setting up
# --------------------------------------------------------------------------------------------


def build_trainer(cfg: Config) -> Trainer:
    accelerator = make_accelerator(cfg.train.device, cfg.train.mixed_precision)
    warn_if_ranks_lost(accelerator.num_processes)
    # Before anything in the run folder is read or written: one run per folder (exit 2 otherwise).
    lock_run_folder(cfg.run_dir, accelerator)
    if cfg.run.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    task = build_data(cfg.data, cfg.run.seed)
    if cfg.data.batch_size > len(task.train) and cfg.data.drop_last:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {len(task.train)} "
                          "training samples and data.drop_last is true: no step would run")
    model = build_model(cfg.model, task.spec)
    optimizer, group_names = build_optimizer(model, cfg.optim)
    horizon = Horizon(sampling.steps_per_epoch(len(task.train), cfg.data.batch_size, cfg.data.drop_last),
                      cfg.train.epochs)
    schedule = build_schedule(optimizer, cfg.schedule, horizon, group_names)
    # Only the model is prepared (DDP, device, autocast). The scheduler is not: Accelerate's wrapper
    # steps it once per process. Nor the optimizer: AcceleratedOptimizer re-checks installed packages
    # and inspects signatures on every step()/zero_grad(), ~1 ms a step; we do its one job (fp16
    # loss scaling) ourselves in optimizer_step().
    model = accelerator.prepare(model)
    store = CheckpointStore(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                            cfg.checkpoint.monitor_mode)
    trainer = Trainer(cfg, accelerator, task, model, optimizer, schedule, group_names, horizon,
                      TensorBoardLog(cfg.run_dir, enabled=False), store=store,
                      metric_name=METRIC_NAMES[task.spec.kind], raw_model=accelerator.unwrap_model(model))
    # Dropout and other training randomness: a distinct stream per rank, derived from the seed;
    # python's and numpy's generators too, for user code (datasets, factors) that draws from them.
    rank_seed = cfg.run.seed * 1000 + 17 + accelerator.process_index
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    from harness.resume import choose_checkpoint, initialize_from, record_changes, restore

    folder = choose_checkpoint(trainer, store)
    changes = []
    if folder is not None:
        changes = restore(trainer, folder)
    elif cfg.run.init_from:
        initialize_from(trainer, cfg.run.init_from)
    # Opened only now, so a failed resume writes nothing. purge_step drops points the interrupted
    # process logged after its last checkpoint: the resumed run logs them again.
    trainer.tb = TensorBoardLog(cfg.run_dir, enabled=accelerator.is_main_process,
                                purge_step=trainer.state.step + 1 if folder is not None else None)
    record_changes(trainer, changes)
    if accelerator.is_main_process:
        clear_marker(cfg.run_dir)
    return trainer


def write_run_files(trainer: Trainer) -> None:
    if not trainer.is_main:
        return
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    (trainer.run_dir / "config.yaml").write_text(dump_config(trainer.cfg))


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


def train_step(trainer: Trainer, global_indices: torch.Tensor) -> None:
    acc, cfg = trainer.accelerator, trainer.cfg
    rank, world = acc.process_index, acc.num_processes
    global_count = len(global_indices)
    # TensorBoard's x axis is the optimizer step, counted from 1: this LR is applied in step state.step + 1.
    trainer.pending_lrs.append((trainer.state.step + 1, [g["lr"] for g in trainer.optimizer.param_groups]))
    if faults.TRACE_SAMPLES:
        faults.trace_samples(rank, trainer.state.step + 1, trainer.state.epoch, sampling.shard(global_indices, rank, world))
    accumulation = cfg.train.grad_accum_steps
    micro = (global_indices,) if accumulation == 1 else sampling.micro_batches(global_indices, accumulation)
    scale = world / global_count
    for i, micro_indices in enumerate(micro):
        local = micro_indices if world == 1 else sampling.shard(micro_indices, rank, world)
        weight = 1.0
        if len(local) == 0:
            # This rank has no sample in this micro-batch; DDP still needs its backward, so run
            # one real sample with weight 0: it adds nothing to the gradient.
            local, weight = global_indices[:1], 0.0
        batch = trainer.task.train.fetch(local)
        if acc.device.type != "cpu":
            batch = batch.to(acc.device)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last else acc.no_sync(trainer.model)
        with sync:
            outputs = batch.predict(trainer.model)
            loss_sum = summed_loss(trainer.task.spec.kind, outputs.float(), batch.targets)
            if weight != 1.0:
                loss_sum = loss_sum * weight
            backward(trainer, loss_sum, scale)
        add_loss(trainer, loss_sum.detach())
    optimizer_step(trainer)
    trainer.schedule.after_optimizer_step()
    trainer.state.step += 1
    trainer.state.samples_in_epoch += global_count
    trainer.state.window_count += global_count
    trainer.state.epoch_count += global_count
    trainer.window_samples += global_count


def backward(trainer: Trainer, loss_sum: torch.Tensor, scale: float) -> None:
    """Backpropagate ``loss_sum * scale``.

    Without loss scaling and with plain DDP, autograd is seeded with ``scale`` instead: the same
    gradients bit for bit (the multiply's backward is 1.0 * scale), without a multiply node in the
    forward and backward of every step. Otherwise Accelerator.backward (fp16 scaler, DeepSpeed...).
    """
    acc = trainer.accelerator
    if getattr(acc, "scaler", None) is None and acc.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU"):
        seed = trainer.gradient_seeds.get(scale)
        if seed is None or seed.dtype != loss_sum.dtype or seed.device != loss_sum.device:
            seed = trainer.gradient_seeds[scale] = torch.tensor(scale, dtype=loss_sum.dtype, device=loss_sum.device)
        loss_sum.backward(seed)
    else:
        acc.backward(loss_sum * scale)


def add_loss(trainer: Trainer, loss_sum: torch.Tensor) -> None:
    trainer.window_losses.append(loss_sum)
    trainer.epoch_losses.append(loss_sum)
    if len(trainer.epoch_losses) >= 64:  # bounded memory for long epochs and long log windows
        fold(trainer.epoch_losses)
    if len(trainer.window_losses) >= 64:
        fold(trainer.window_losses)


def fold(losses: list[torch.Tensor]) -> None:
    """Replace the entries by their sum (one tensor)."""
    if len(losses) > 1:
        # In float64: a few float32 values add up exactly there, so the sum does not depend on where
        # a checkpoint split the window (a resumed run logs the same loss as an uninterrupted one).
        losses[:] = [torch.stack([loss.double() for loss in losses]).sum()]


def local_loss_sum(losses: list[torch.Tensor]) -> float:
    fold(losses)
    return float(losses[0]) if losses else 0.0


def optimizer_step(trainer: Trainer) -> None:
    """Clip, step, zero. With fp16 the grad scaler unscales first and may skip a step on inf/nan."""
    acc, max_norm = trainer.accelerator, trainer.cfg.train.max_grad_norm
    scaler = getattr(acc, "scaler", None)
    if scaler is not None:
        scaler.unscale_(trainer.optimizer)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(trainer.optimizer)
        scaler.update()
    else:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def flush_step_logs(trainer: Trainer, close_window: bool, sums: Sequence[float] = ()) -> list[float]:
    """Write and cross-check pending per-step LRs; if ``close_window``, log the train-loss window.

    Called every log interval. With several ranks, one collective gathers each rank's loss sum
    and LRs together: the loss is summed, the LRs must agree. ``sums``: more of this rank's
    values to add up over the ranks in that same collective; returns their totals.
    """
    acc, state = trainer.accelerator, trainer.state
    close = close_window and state.window_count > 0
    rows = [lrs for _, lrs in trainer.pending_lrs]
    local_loss = local_loss_sum(trainer.window_losses) if close else 0.0
    loss_of_ranks, totals = local_loss, list(sums)
    if acc.num_processes > 1 and (rows or close or sums):
        payload = torch.tensor([local_loss, *sums] + [lr for row in rows for lr in row], dtype=torch.float64)
        gathered = gather_rows(acc, payload)  # [world, 1 + len(sums) + steps * groups]
        added = gathered[:, :1 + len(sums)].sum(dim=0).tolist()
        loss_of_ranks, totals = added[0], added[1:]
        if rows:
            raise_if_lrs_differ(gathered[:, 1 + len(sums):].reshape(gathered.size(0), len(rows), -1),
                                trainer.group_names, trainer.pending_lrs[0][0], "optimizer step")
    if rows:
        trainer.tb.lr_series(trainer.pending_lrs[0][0], trainer.group_names, rows)
        trainer.pending_lrs = []
    if close:
        elapsed = time.perf_counter() - trainer.window_started
        trainer.last_logged = {"loss": (loss_of_ranks + state.window_loss_sum) / state.window_count,
                               "samples_per_s": trainer.window_samples / max(elapsed, 1e-9)}
        trainer.tb.scalars(state.step, {
            "train/loss": trainer.last_logged["loss"],
            "perf/samples_per_s": trainer.last_logged["samples_per_s"],
        })
        trainer.window_losses.clear()
        state.window_loss_sum = 0.0
        state.window_count = 0
        trainer.window_started = time.perf_counter()
        trainer.window_samples = 0
    return totals


# --------------------------------------------------------------------------------------------
# Validation: (sum, count) over the whole split, reduced once
# --------------------------------------------------------------------------------------------


def evaluate(trainer: Trainer, split: Split, interruptible: bool = False) -> tuple[float, float]:
    """Global mean loss and metric over ``split``: each rank sums its contiguous shards, one all-reduce.

    With ``interruptible``, the ranks check for a preemption request every few batches (every rank
    walks the same global batches, some with an empty shard, so the collectives line up).
    """
    acc = trainer.accelerator
    model = trainer.raw_model  # no DDP collectives inside a rank-local loop
    was_training = model.training
    model.eval()
    kind = trainer.task.spec.kind
    sums = torch.zeros(3, dtype=torch.float64)
    shards = list(sampling.validation_shards(len(split), trainer.cfg.data.val_batch_size,
                                             acc.process_index, acc.num_processes))
    every = trainer.cfg.preemption.check_every_val_batches
    with torch.no_grad(), acc.autocast():
        for start in range(0, len(shards), every):
            chunk = [s for s in shards[start:start + every] if len(s)]
            for batch in split.batches(chunk):
                batch = batch.to(acc.device)
                outputs = batch.predict(model).float()
                sums[0] += per_sample_loss(kind, outputs, batch.targets).sum().item()
                sums[1] += per_sample_metric(kind, outputs, batch.targets).sum().item()
                sums[2] += len(batch.targets)
            if interruptible and start + every < len(shards) and trainer.preemption is not None \
                    and trainer.preemption.should_stop(acc):
                model.train(was_training)
                stop_for_preemption(trainer)
    if split is trainer.task.val:
        trainer.local_validations.append(sums.tolist())
    total = all_reduce_sum(acc, sums)
    model.train(was_training)
    count = max(total[2].item(), 1.0)
    return total[0].item() / count, total[1].item() / count


def stop_for_preemption(trainer: Trainer) -> None:
    """Save at this step boundary, leave a marker for batch scripts, unwind to the CLI."""
    watcher = trainer.preemption
    watcher.drain()
    watcher.announce_stop(trainer.is_main, trainer.state.step)
    folder = save_checkpoint(trainer, trainer.store, "preempted")
    if trainer.is_main:
        watcher.report_stop(trainer.run_dir, folder, trainer.state.step)
    raise Preempted(watcher.requested or "a signal to another rank", folder, watcher.interrupted)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    # Installed first, so a signal during start-up is not lost: it is acted on at the first step.
    # Under torchrun / accelerate launch it also watches the launcher: if it dies, we stop too.
    watcher = PreemptionWatcher(cfg.preemption, launcher_pid()).install()
    try:
        trainer = build_trainer(cfg)
        trainer.preemption = watcher
        write_run_files(trainer)
        log_start(trainer)
        trainer.progress = Progress(trainer.is_main, trainer.horizon.total_steps, trainer.state.step,
                                    cfg.train.progress_every_s)
        try:
            summary = fit(trainer)
            trainer.store.wait_for_background(trainer.accelerator)  # the last checkpoint is committed
        except BaseException:
            # Give a save in flight a moment to land; it is a daemon thread and never blocks exit.
            with contextlib.suppress(Exception):
                trainer.store.wait_for_background(None, timeout_s=60.0)
            raise
        finally:
            trainer.progress.close()
            trainer.tb.close()
        trainer.accelerator.wait_for_everyone()
    except Preempted:
        # The checkpoint is saved: further warnings change nothing. Ignore them, rather than
        # restoring SIGUSR1's default action (terminate), which would let a repeated warning kill
        # the process during teardown instead of it exiting with EXIT_PREEMPTED.
        watcher.ignore_further()
        raise
    except BaseException as exc:
        watcher.uninstall()
        lost = lost_rank_error(exc)  # a peer is gone: one line instead of this rank's traceback
        if lost is not None:
            raise lost from exc
        raise
    watcher.uninstall()
    shutdown_process_group()
    return summary


def fit(trainer: Trainer) -> dict:
    cfg, state = trainer.cfg, trainer.state
    metric_name = METRIC_NAMES[trainer.task.spec.kind]
    stop = state.early_stopped
    while state.epoch < cfg.train.epochs and not stop:
        epoch = state.epoch
        trainer.model.train()
        order = sampling.epoch_order(len(trainer.task.train), cfg.run.seed, epoch, cfg.data.shuffle)
        for global_indices in sampling.global_batches(order, cfg.data.batch_size, cfg.data.drop_last,
                                                      state.samples_in_epoch):
            train_step(trainer, global_indices)
            faults.after_step(state.step)
            if trainer.preemption.due(state.step) and trainer.preemption.poll(trainer.accelerator, state.step):
                stop_for_preemption(trainer)
            if state.step % cfg.train.log_every_steps == 0:
                flush_step_logs(trainer, close_window=True)
            trainer.progress.update(state.step, state.epoch, trainer.last_logged.get("loss"),
                                    trainer.optimizer.param_groups[0]["lr"], trainer.last_logged.get("samples_per_s"))
            epoch_done = state.samples_in_epoch >= trainer.epoch_length()
            every = cfg.checkpoint.every_steps
            if every and state.step % every == 0 and not epoch_done:
                save_checkpoint(trainer, trainer.store, "every_steps")
            if cfg.train.max_steps is not None and state.step >= cfg.train.max_steps:
                stop = True
                break
        if stop and state.samples_in_epoch < trainer.epoch_length():
            save_checkpoint(trainer, trainer.store, "max_steps")
            break
        end_epoch(trainer, metric_name)
        stop = stop or state.early_stopped
        every = cfg.checkpoint.every_epochs
        if (every and state.epoch % every == 0) or state.epoch == cfg.train.epochs or stop or (
                cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0):
            save_checkpoint(trainer, trainer.store, "epoch_end")
    return finish(trainer, metric_name)


def end_epoch(trainer: Trainer, metric_name: str) -> None:
    cfg, state = trainer.cfg, trainer.state
    # One collective: the pending LRs cross-checked, this epoch's train-loss sum reduced.
    (epoch_loss_of_ranks,) = flush_step_logs(trainer, close_window=False, sums=[local_loss_sum(trainer.epoch_losses)])
    epoch_number = state.epoch + 1
    validate = epoch_number % cfg.train.val_every_epochs == 0 or epoch_number == cfg.train.epochs
    # Validation comes before any state changes: a preemption inside it saves the state of the
    # last step boundary, and the resumed run redoes this validation.
    if validate:
        val_loss, val_metric = evaluate(trainer, trainer.task.val, interruptible=True)
    train_loss = (epoch_loss_of_ranks + state.epoch_loss_sum) / max(state.epoch_count, 1)
    state.epoch = epoch_number
    state.samples_in_epoch = 0
    state.epoch_loss_sum, state.epoch_count = 0.0, 0
    trainer.epoch_losses.clear()
    trainer.schedule.after_epoch()
    scalars = {"train/loss_epoch": train_loss}
    record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss}
    if validate:
        trainer.schedule.after_validation(val_loss, val_metric)
        scalars.update({"val/loss": val_loss, f"val/{metric_name}": val_metric})
        record.update({"val_loss": val_loss, f"val_{metric_name}": val_metric})
        trainer.last_monitored = val_loss if cfg.checkpoint.monitor == "val_loss" else val_metric
        update_best(trainer, trainer.last_monitored)
    # The LRs for the next epoch are cross-checked with its first steps' (at the next log flush);
    # those after the last epoch by finish().
    lrs = trainer.schedule.lrs()
    scalars.update({f"lr_epoch/{name}": lr for name, lr in lrs.items()})
    scalars["epoch"] = state.epoch
    # Every series shares one x axis, the optimizer step, so a resume purges them all consistently.
    trainer.tb.scalars(state.step, scalars)
    state.history.append(record)
    log_epoch(trainer, record, lrs)


def update_best(trainer: Trainer, value: float) -> None:
    """Best monitored value and the early-stopping count; ``value`` is the same on every rank."""
    cfg, state = trainer.cfg, trainer.state
    sign = 1.0 if cfg.checkpoint.monitor_mode == "min" else -1.0
    improved = state.best_metric is None or sign * (state.best_metric - value) > cfg.train.early_stopping_min_delta
    if improved:
        state.best_metric = value
        state.validations_without_improvement = 0
    else:
        state.validations_without_improvement += 1
    patience = cfg.train.early_stopping_patience
    if patience is not None and state.validations_without_improvement > patience:
        state.early_stopped = True
        if trainer.is_main:
            logger.info("early stopping: %s has not improved for %d validations (best %.6g)", cfg.checkpoint.monitor,
                        state.validations_without_improvement, state.best_metric)


def finish(trainer: Trainer, metric_name: str) -> dict:
    state = trainer.state
    summary = {"epochs": state.epoch, "steps": state.step, "world_size": trainer.accelerator.num_processes,
               "early_stopped": state.early_stopped, "best_monitored": state.best_metric}
    if state.history and "val_loss" in state.history[-1]:
        summary["val_loss"] = state.history[-1]["val_loss"]
        summary[f"val_{metric_name}"] = state.history[-1][f"val_{metric_name}"]
    if trainer.task.test is not None:
        test_loss, test_metric = evaluate(trainer, trainer.task.test)
        summary.update({"test_loss": test_loss, f"test_{metric_name}": test_metric})
        trainer.tb.scalars(state.step, {"test/loss": test_loss, f"test/{metric_name}": test_metric})
    summary["final_lrs"] = trainer.schedule.lrs()
    check_lrs_agree(trainer.accelerator, torch.tensor([list(summary["final_lrs"].values())]), trainer.group_names,
                    state.epoch, "end of epoch")
    write_final_model(trainer)
    write_rank_report(trainer)
    trainer.tb.hparams(flatten(to_plain_dict(trainer.cfg)),
                       {f"hparam/{k}": v for k, v in summary.items() if isinstance(v, float)}, state.step)
    if trainer.is_main:
        (trainer.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        parts = [f"{k}={v:.4f}" for k, v in summary.items() if isinstance(v, float) and k != "best_monitored"]
        best = "" if state.best_metric is None else f" | best {trainer.cfg.checkpoint.monitor} {state.best_metric:.4f}"
        logger.info("done: %d epochs, %d steps, %s%s%s | checkpoints %s | TensorBoard %s", state.epoch, state.step,
                    " ".join(parts), " (early stopped)" if state.early_stopped else "", best,
                    trainer.store.root, trainer.run_dir / "tb")
    return summary


def write_final_model(trainer: Trainer) -> None:
    """Final weights of the unwrapped model, loadable with safetensors alone."""
    if not trainer.is_main:
        return
    from safetensors.torch import save_model

    (trainer.run_dir / "final").mkdir(parents=True, exist_ok=True)
    save_model(trainer.raw_model, str(trainer.run_dir / "final" / "model.safetensors"))


def write_rank_report(trainer: Trainer) -> None:
    """Each rank's own view at the end (LRs, scheduler counters, local validation sums), so a user
    can see that ranks agree, or where they do not."""
    acc = trainer.accelerator
    main = trainer.schedule.main
    report = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "lrs": trainer.schedule.lrs(),
        "schedule_steps_done": trainer.schedule.steps_done,
        "scheduler_last_epoch": getattr(main, "last_epoch", None),
        "plateau_num_bad_epochs": getattr(main, "num_bad_epochs", None),
        "local_validations": trainer.local_validations,
    }
    folder = trainer.run_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{acc.process_index}.json").write_text(json.dumps(report, indent=2) + "\n")


def log_start(trainer: Trainer) -> None:
    acc = trainer.accelerator
    if trainer.is_main:
        logger.info("%s | world size %d | device %s | mixed precision %s | %d steps/epoch x %d epochs | "
                    "schedule %s (%s) | run folder %s", trainer.task.description, acc.num_processes, acc.device,
                    acc.mixed_precision, trainer.horizon.steps_per_epoch, trainer.horizon.epochs,
                    trainer.cfg.schedule.name, trainer.cfg.schedule.interval, trainer.run_dir)


def log_epoch(trainer: Trainer, record: dict, lrs: dict[str, float]) -> None:
    if not trainer.is_main:
        return
    values = " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float))
    lr_text = " ".join(f"lr/{k}={v:.3g}" for k, v in lrs.items())
    logger.info("epoch %d/%d step %d %s %s", record["epoch"], trainer.cfg.train.epochs, record["step"], values, lr_text)
