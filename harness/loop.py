"""The training loop: plain functions called in order, readable top to bottom.

Loss scaling, the one trick here: each rank's loss is (sum of its per-sample losses) times
world_size / (samples in the global batch). DDP averages gradients over ranks, so the applied
gradient is exactly the global-batch mean, however unevenly the batch splits across ranks and
micro-batches. That is what makes 1 rank and N ranks train the same model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

from harness import blocks, faults, sampling, sharding, states, strategy
from harness.batches import choose_output
from harness.checkpoint import CheckpointStore
from harness.config import Config, ConfigError, to_plain_dict
from harness.contracts import Split
from harness.ema import EMA
from harness.objectives import element_count
from harness.optimizers import build_optimizer
from harness.parts import rehearse_model_save
from harness.preemption import clear_marker, Preempted, PreemptionWatcher
from harness.profiling import StepProfiler
from harness.progress import Progress
from harness.resume import choose_checkpoint, initialize_from, record_changes, restore
from harness.run_files import log_epoch, log_start, write_end_files, write_run_files
from harness.run_lock import lock_run_folder
from harness.schedules import build_schedule, Horizon
from harness.snapshot import SavePolicy, save_checkpoint
from harness.tracking import flatten, Trackers
from harness.distributed import (all_reduce_sum, any_rank, check_lrs_agree, launcher_pid, lost_rank_error,
                                 make_accelerator, shutdown_process_group, warn_if_ranks_lost)
from harness.trainer import (GivenComponents, Trainer, build_components, check_same_data, flush_step_logs, fold,
                             local_loss_sum, check_monitors, monitored_value, probe_objective, schedule_inputs,
                             seed_everything)

logger = logging.getLogger("harness")


# --------------------------------------------------------------------------------------------
# Setting up
# --------------------------------------------------------------------------------------------


def build_trainer(cfg: Config, given: Optional[GivenComponents] = None) -> Trainer:
    configured = sharding.strategy_from_launch(cfg.train.strategy)  # before Accelerator reads the launch's env
    accelerator = make_accelerator(cfg.train.device, cfg.train.mixed_precision, cfg.train.find_unused_parameters,
                                   cfg.train.collective_timeout_s)
    warn_if_ranks_lost(accelerator.num_processes)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    given = given or GivenComponents()
    # train.fsdp_init rank0: only rank 0 builds the model's memory; the others get theirs from it.
    from_rank0 = configured == "fsdp" and cfg.train.fsdp_init == "rank0" and accelerator.num_processes > 1
    if from_rank0 and isinstance(given.model, torch.nn.Module):
        raise ConfigError("train.fsdp_init: rank0 builds the model on the meta device on ranks > 0, but this model was "
                          "built in Python before harness.train(); use every_rank, or let the recipe build it")
    task, model, loss, metrics, origins = build_components(
        cfg, given, model_device="meta" if from_rank0 and not accelerator.is_main_process else None)
    check_same_data(accelerator, task)
    if cfg.data.batch_size > len(task.train) and cfg.data.drop_last:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {len(task.train)} "
                          "training samples and data.drop_last is true: no step would run")
    distribution = strategy.choose(accelerator, configured, cfg.train.fsdp_wrap, from_rank0)
    streamed = getattr(task.train, "streamed", False)
    if streamed:
        task.train.configure(cfg.data.batch_size, cfg.train.grad_accum_steps, accelerator.num_processes)
    distribution.check_data(task)
    blocks.apply(model, cfg.train, accelerator.is_main_process)  # activation checkpointing, compile
    model = distribution.shard(model)
    optimizer, group_names = build_optimizer(model, cfg.optim, cfg.import_folders)
    horizon = Horizon(sampling.steps_per_epoch(len(task.train), cfg.data.batch_size, cfg.data.drop_last or streamed),
                      cfg.train.epochs)
    schedule = build_schedule(optimizer, cfg.schedule, horizon, group_names)
    # Only the model is prepared (DDP, device, autocast). The scheduler is not: Accelerate's wrapper
    # steps it once per process. Nor the optimizer: AcceleratedOptimizer re-checks installed packages
    # and inspects signatures on every step()/zero_grad(), ~1 ms a step; we do its one job (fp16
    # loss scaling) ourselves in optimizer_step().
    model, raw_model = distribution.wrap(model)
    store = CheckpointStore(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                            cfg.checkpoint.monitor_mode)
    trainer = Trainer(cfg, accelerator, task, model, optimizer, schedule, group_names, horizon,
                      Trackers(cfg.run_dir, [], enabled=False), store=store, loss=loss, metrics=metrics,
                      raw_model=raw_model, components=origins, strategy=distribution)
    trainer.ema = EMA.from_config(raw_model, cfg.train.ema)
    check_monitors(trainer)
    choose_output(trainer.raw_model, cfg.train.model_output, loss if hasattr(loss, "take") else None)
    probe_objective(trainer)
    rehearse_model_save(trainer.raw_model)
    # Dropout and other training randomness: a distinct stream per rank, derived from the seed;
    # python's and numpy's generators too, for user code (datasets, factors) that draws from them.
    seed_everything(cfg.run.seed * 1000 + 17 + accelerator.process_index)

    # Before anything in the run folder is read or written (building the components and probing
    # them write nothing): one run per folder (exit 2 otherwise).
    lock_run_folder(cfg.run_dir, accelerator)
    folder = choose_checkpoint(trainer, store)
    changes = []
    if folder is not None:
        changes = restore(trainer, folder)
    elif cfg.run.init_from:
        initialize_from(trainer, cfg.run.init_from)
    # Opened only now, so a failed resume writes nothing. purge_step drops points the interrupted
    # process logged after its last checkpoint: the resumed run logs them again.
    trainer.trackers = Trackers(cfg.run_dir, cfg.run.log_with, enabled=accelerator.is_main_process,
                                purge_step=trainer.state.step + 1 if folder is not None else None,
                                run_name=cfg.run.name, flat_config=flatten(to_plain_dict(cfg)))
    record_changes(trainer, changes)
    if accelerator.is_main_process:
        clear_marker(cfg.run_dir)
    return trainer


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


def train_step(trainer: Trainer, global_indices: torch.Tensor, micro=None, loaded=None) -> None:
    """One optimizer step on one global batch. ``micro``: this rank's (indices, weight) per
    micro-batch (sampling.local_micro_batches); ``loaded``: an iterator yielding their batches,
    already loaded (DataLoader workers); without it they are fetched here."""
    if faults.STEP_HOOKS:
        for hook in faults.STEP_HOOKS:
            hook(trainer)
    acc, cfg = trainer.accelerator, trainer.cfg
    rank, world = acc.process_index, acc.num_processes
    global_count = len(global_indices)
    # TensorBoard's x axis is the optimizer step, counted from 1: this LR is applied in step state.step + 1.
    trainer.logs.pending_lrs.append((trainer.state.step + 1, [g["lr"] for g in trainer.optimizer.param_groups]))
    if faults.TRACE_SAMPLES:
        faults.trace_samples(rank, trainer.state.step + 1, trainer.state.epoch, sampling.shard(global_indices, rank, world))
    if micro is None:
        micro = sampling.local_micro_batches(global_indices, cfg.train.grad_accum_steps, rank, world)
    scale = world / global_count
    counted = global_count
    if trainer.per_element:
        # The mean is over the global batch's counted tokens/labels, known once every micro-batch
        # of every rank is loaded: one all-reduce of the count per step.
        batches = [next(loaded) if loaded is not None else trainer.task.train.fetch(local) for local, _ in micro]
        local_count = sum(float(element_count(b.targets, trainer.loss)) for b, (_, weight) in zip(batches, micro)
                          if weight)
        counted = int(all_reduce_sum(acc, [local_count])[0]) if world > 1 else int(local_count)
        scale = world / max(counted, 1)
        loaded = iter(batches)
    for i, (local, weight) in enumerate(micro):
        batch = next(loaded) if loaded is not None else trainer.task.train.fetch(local)
        if acc.device.type != "cpu":
            batch = batch.to(acc.device)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last else no_gradient_sync(trainer)
        with sync:
            outputs = batch.predict(trainer.model)
            loss_sum = trainer.loss.summed(outputs.float(), batch.targets)
            if weight != 1.0:
                loss_sum = loss_sum * weight
            backward(trainer, loss_sum, scale)
        add_loss(trainer, loss_sum.detach())
    optimizer_step(trainer)
    trainer.schedule.after_optimizer_step()
    trainer.state.step += 1
    if trainer.ema is not None:
        trainer.ema.after_step(trainer.state.step)
    trainer.state.samples_in_epoch += global_count
    trainer.state.window_count += counted  # what the logged train loss is a mean over
    trainer.state.epoch_count += counted
    trainer.logs.window_samples += global_count


def no_gradient_sync(trainer: Trainer):
    """A micro-batch before the last: accumulate locally, reduce once at the last (DDP or FSDP)."""
    return trainer.strategy.no_sync(trainer.model)


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
            if len(trainer.gradient_seeds) >= 8:  # per-element losses: a scale per token count
                trainer.gradient_seeds.clear()
            seed = trainer.gradient_seeds[scale] = torch.tensor(scale, dtype=loss_sum.dtype, device=loss_sum.device)
        loss_sum.backward(seed)
    else:
        acc.backward(loss_sum * scale)


def add_loss(trainer: Trainer, loss_sum: torch.Tensor) -> None:
    trainer.logs.window_losses.append(loss_sum)
    trainer.logs.epoch_losses.append(loss_sum)
    if len(trainer.logs.epoch_losses) >= 64:  # bounded memory for long epochs and long log windows
        fold(trainer.logs.epoch_losses)
    if len(trainer.logs.window_losses) >= 64:
        fold(trainer.logs.window_losses)


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


# --------------------------------------------------------------------------------------------
# Validation: (sum, count) over the whole split, reduced once
# --------------------------------------------------------------------------------------------


def evaluate(trainer: Trainer, split: Split, interruptible: bool = False) -> dict[str, float]:
    """Global mean loss and every metric over ``split`` ({"loss": ..., "<metric>": ...}): each
    rank adds up its contiguous shards' sums (loss sum, count, each metric's sums), one all-reduce.
    On the averaged weights with ``train.ema.evaluate``.

    With ``interruptible``, the ranks check for a preemption request every few batches (every rank
    walks the same global batches, some with an empty shard, so the collectives line up).
    """
    if trainer.ema is None or not trainer.cfg.train.ema.evaluate:
        return _evaluate(trainer, split, interruptible)
    with trainer.ema.applied():
        return _evaluate(trainer, split, interruptible)


def _evaluate(trainer: Trainer, split: Split, interruptible: bool) -> dict[str, float]:
    acc = trainer.accelerator
    model = trainer.raw_model  # no DDP collectives inside a rank-local loop
    trainer.strategy.before_validation(model)
    # A preemption inside this validation saves the RNG state of the step boundary before it (a
    # model may draw randomness in eval mode): the resumed run redoes the validation from there.
    boundary_rng = states.raw_rng_state() if interruptible else None
    was_training = model.training
    model.eval()
    widths = [metric.width for metric in trainer.metrics]
    sums = torch.zeros(2 + sum(widths), dtype=torch.float64, device=acc.device)
    streamed = getattr(split, "streamed", False)
    # A stream: each rank reads its own to the end, with no collective on the way (ranks may have
    # different counts), so it is not interrupted; a preemption waits for its end.
    shards = [None] if streamed else list(sampling.validation_shards(
        len(split), trainer.cfg.data.val_batch_size, acc.process_index, acc.num_processes))
    every = len(shards) if streamed else trainer.cfg.preemption.check_every_val_batches
    with torch.no_grad(), acc.autocast():
        for start in range(0, len(shards), every):
            chunk = shards[start:start + every]
            if streamed:
                loaded = ((batch, True) for batch in split.whole(trainer.cfg.data.val_batch_size))
            else:
                loaded = trainer.strategy.validation_batches(split, chunk)
            for batch, counts in loaded:
                batch = batch.to(acc.device)
                outputs = batch.predict(model).float()
                if not counts:
                    continue
                sums[0] += trainer.loss.per_sample(outputs, batch.targets).double().sum()
                sums[1] += element_count(batch.targets, trainer.loss) if trainer.per_element else len(outputs)
                if widths:
                    sums[2:] += torch.cat([metric.sums(outputs, batch.targets).to(sums) for metric in trainer.metrics])
            if interruptible and start + every < len(shards) and trainer.preemption is not None \
                    and trainer.preemption.should_stop(acc):
                model.train(was_training)
                states.set_raw_rng_state(boundary_rng)
                if trainer.ema is not None:
                    trainer.ema.swap_out()  # the checkpoint holds the training weights
                stop_for_preemption(trainer)
    sums = sums.cpu()
    if split is trainer.task.val:
        trainer.logs.local_validations.append(sums.tolist())
    total = all_reduce_sum(acc, sums).tolist()
    model.train(was_training)
    results = {"loss": total[0] / max(total[1], 1.0)}
    offset = 2
    for metric, width in zip(trainer.metrics, widths):
        results[metric.name] = float(metric.compute(total[offset:offset + width]))
        offset += width
    return results


def stop_for_preemption(trainer: Trainer) -> None:
    """Save at this step boundary, leave a marker for batch scripts, unwind to the CLI."""
    watcher = trainer.preemption
    watcher.drain()
    watcher.announce_stop(trainer.is_main, trainer.state.step)
    folder = save_checkpoint(trainer, trainer.store, "preempted")
    # At once, before rank 0 writes the marker: a peer that exits first makes the launcher
    # SIGTERM this rank, which must still end with the exit code its saved stop earned.
    watcher.ignore_further()
    if trainer.is_main:
        watcher.report_stop(trainer.run_dir, folder, trainer.state.step)
    raise Preempted(watcher.requested or "a signal to another rank", folder, watcher.interrupted)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: Config, given: Optional[GivenComponents] = None) -> dict:
    # Installed first, so a signal during start-up is not lost: it is acted on at the first step.
    # Under torchrun / accelerate launch it also watches the launcher: if it dies, we stop too.
    watcher = PreemptionWatcher(cfg.preemption, launcher_pid()).install()
    try:
        trainer = build_trainer(cfg, given)
        trainer.preemption = watcher
        write_run_files(trainer)
        log_start(trainer)
        trainer.progress = Progress(trainer.is_main, trainer.horizon.total_steps, trainer.state.step,
                                    cfg.train.progress_every_s)
        trainer.profiler = StepProfiler.start(cfg.train.profile, cfg.run_dir, trainer.accelerator.process_index,
                                              trainer.is_main, trainer.accelerator.device.type == "cuda")
        try:
            summary = fit(trainer)
            trainer.store.wait_for_background(trainer.accelerator)  # the last checkpoint is committed
        except BaseException:
            # Give a save in flight a moment to land; it is a daemon thread and never blocks exit.
            with contextlib.suppress(Exception):
                trainer.store.wait_for_background(None, timeout_s=60.0)
            raise
        finally:
            if trainer.profiler is not None:
                trainer.profiler.stop()
            trainer.progress.close()
            trainer.trackers.close()
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
    if not faults.KEEP_PROCESS_GROUP:
        shutdown_process_group()
    return summary


def fit(trainer: Trainer) -> dict:
    """Epochs of optimizer steps, each epoch closed by validation and the schedule's epoch step;
    checkpoints wherever the save policy says. Reads top to bottom; each phase is a function."""
    cfg, state = trainer.cfg, trainer.state
    policy = SavePolicy.from_config(cfg)
    # A run resumed where it had already stopped (early stopping, train.max_steps: a rerun after
    # the end files failed, a job requeued at its last step) trains no further. An epoch whose steps
    # are all done but not its end (preempted at its last step) is still closed first, as the
    # uninterrupted run did.
    stop = state.early_stopped or max_steps_reached(trainer)
    while state.epoch < cfg.train.epochs and (not stop or state.samples_in_epoch >= trainer.epoch_length()):
        trainer.model.train()
        trainer.stream_ended = False
        # The rest of this epoch's global batches, in an order that does not depend on the world size,
        # and this rank's share of each, loaded ahead by the split (DataLoader workers where it has them).
        steps = epoch_steps(trainer)
        loaded = trainer.task.train.batches(sampling.LocalIndexBatches(lambda: epoch_steps(trainer)),
                                            epoch=state.epoch)
        validate_mid_epoch_if_due(trainer)  # one a preemption interrupted: redone first
        for global_indices, micro in steps:
            if trainer.streamed:  # this step's batches from each rank's stream, or the epoch's end
                loaded = step_batches_of_streams(trainer, loaded, len(micro))
                if loaded is None:
                    if trainer.is_main:
                        logger.info("epoch %d: the train stream ran out after %d of %d steps", state.epoch + 1,
                                    state.samples_in_epoch // cfg.data.batch_size, trainer.horizon.steps_per_epoch)
                    break
            train_step(trainer, global_indices, micro, loaded)  # forward, backward, optimizer + schedule step
            after_step(trainer)  # test hooks, preemption agreement, logs, progress
            validate_mid_epoch_if_due(trainer)  # train.val_every_steps
            reason = policy.after_step(state.step, epoch_done=state.samples_in_epoch >= trainer.epoch_length())
            if reason:
                save_checkpoint(trainer, trainer.store, reason)
            # Early stopping decided by a validation inside the epoch stops here, at once.
            if max_steps_reached(trainer) or state.early_stopped:
                stop = True
                break
        if stop and state.samples_in_epoch < trainer.epoch_length() and not trainer.stream_ended:
            # Stopped mid-epoch: resumable there (a save at a step already saved is skipped).
            save_checkpoint(trainer, trainer.store, "early_stopped" if state.early_stopped else "max_steps")
            break
        end_epoch(trainer)  # validation, plateau, epoch-interval schedules, epoch logs
        stop = stop or state.early_stopped
        reason = policy.after_epoch(state.epoch, state.step, stopping=stop)
        if reason:
            save_checkpoint(trainer, trainer.store, reason)
    return finish(trainer)


def max_steps_reached(trainer: Trainer) -> bool:
    return trainer.cfg.train.max_steps is not None and trainer.state.step >= trainer.cfg.train.max_steps


def epoch_steps(trainer: Trainer):
    cfg, state, acc = trainer.cfg, trainer.state, trainer.accelerator
    # A stream's order is its own: the positions only count its samples.
    order = sampling.epoch_order(len(trainer.task.train), cfg.run.seed, state.epoch,
                                 cfg.data.shuffle and not trainer.streamed)
    return sampling.epoch_steps(order, cfg.data.batch_size, cfg.data.drop_last or trainer.streamed,
                                state.samples_in_epoch, cfg.train.grad_accum_steps, acc.process_index,
                                acc.num_processes)


class _StepBatches(list):
    """One step's batches from a stream; the iterator they came from goes on with the next step."""

    def __init__(self, batches, source):
        super().__init__(batches)
        self.source, self.position = source, 0

    def __next__(self):
        self.position += 1
        return self[self.position - 1]


def step_batches_of_streams(trainer: Trainer, loaded, count: int):
    """The next step's ``count`` micro-batches of this rank's stream, or None when any rank's
    stream has run out: the ranks agree at every step (one small all-reduce), so none waits in a
    collective for a step the others will not take."""
    source = loaded.source if isinstance(loaded, _StepBatches) else loaded
    batches = [next(source, None) for _ in range(count)]
    if any_rank(trainer.accelerator, any(batch is None for batch in batches)):
        trainer.stream_ended = True
        return None
    return _StepBatches(batches, source)


def after_step(trainer: Trainer) -> None:
    state = trainer.state
    faults.after_step(state.step)
    if trainer.profiler is not None:
        trainer.profiler.step()
    if trainer.preemption.due(state.step) and trainer.preemption.poll(trainer.accelerator, state.step):
        stop_for_preemption(trainer)
    if state.step % trainer.cfg.train.log_every_steps == 0:
        flush_step_logs(trainer, close_window=True)
    trainer.progress.update(state.step, state.epoch, trainer.logs.last_logged.get("loss"),
                            trainer.optimizer.param_groups[0]["lr"], trainer.logs.last_logged.get("samples_per_s"))


def end_epoch(trainer: Trainer) -> None:
    cfg, state = trainer.cfg, trainer.state
    # One collective: the pending LRs cross-checked, this epoch's train-loss sum reduced.
    (epoch_loss_of_ranks,) = flush_step_logs(trainer, close_window=False, sums=[local_loss_sum(trainer.logs.epoch_losses)])
    epoch_number = state.epoch + 1
    validate = epoch_number % cfg.train.val_every_epochs == 0 or epoch_number == cfg.train.epochs
    # Validation comes before any state changes: a preemption inside it saves the state of the
    # last step boundary, and the resumed run redoes this validation.
    if validate:
        validation = evaluate(trainer, trainer.task.val, interruptible=True)
    train_loss = (epoch_loss_of_ranks + state.epoch_loss_sum) / max(state.epoch_count, 1)
    state.epoch = epoch_number
    state.samples_in_epoch = 0
    state.epoch_loss_sum, state.epoch_count = 0.0, 0
    trainer.logs.epoch_losses.clear()
    trainer.schedule.after_epoch()
    scalars = {"train/loss_epoch": train_loss}
    record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss}
    if validate:
        scalars.update({f"val/{name}": value for name, value in validation.items()})
        record.update({f"val_{name}": value for name, value in validation.items()})
    # ReduceLROnPlateau steps on every epoch record that holds its monitored value: each epoch for
    # train_loss, each validating epoch for val_*: the same rule the resume's replay follows.
    trainer.schedule.after_validation(*schedule_inputs(trainer, record))
    if validate:
        trainer.last_monitored = monitored_value(record, cfg.checkpoint.monitor, trainer.metrics)
        update_best(trainer, trainer.last_monitored)
    # The LRs for the next epoch are cross-checked with its first steps' (at the next log flush);
    # those after the last epoch by finish().
    lrs = trainer.schedule.lrs()
    scalars.update({f"lr_epoch/{name}": lr for name, lr in lrs.items()})
    scalars["epoch"] = state.epoch
    # Every series shares one x axis, the optimizer step, so a resume purges them all consistently.
    trainer.trackers.scalars(state.step, scalars)
    state.history.append(record)
    log_epoch(trainer, record, lrs)


def validate_mid_epoch_if_due(trainer: Trainer) -> None:
    """train.val_every_steps: a validation inside the epoch, recorded and fed to the schedule like
    an epoch-end one (not at an epoch's last step: the epoch end validates there)."""
    cfg, state = trainer.cfg, trainer.state
    every = cfg.train.val_every_steps
    if not every or state.step == 0 or state.step % every or state.validated_at_step == state.step:
        return
    if state.samples_in_epoch == 0 or state.samples_in_epoch >= trainer.epoch_length():
        return
    flush_step_logs(trainer, close_window=False)
    faults.before_validation(state.step, trainer.accelerator.process_index)
    validation = evaluate(trainer, trainer.task.val, interruptible=True)  # a preemption here: redone on resume
    state.validated_at_step = state.step
    record = {"epoch": state.epoch, "step": state.step, "mid_epoch": True,
              **{f"val_{name}": value for name, value in validation.items()}}
    trainer.schedule.after_validation(*schedule_inputs(trainer, record))
    trainer.last_monitored = monitored_value(record, cfg.checkpoint.monitor, trainer.metrics)
    update_best(trainer, trainer.last_monitored)
    trainer.trackers.scalars(state.step, {**{f"val/{name}": value for name, value in validation.items()},
                                    **{f"lr_validation/{n}": lr for n, lr in trainer.schedule.lrs().items()}})
    state.history.append(record)
    if trainer.is_main:
        logger.info("step %d (epoch %d) %s", state.step, state.epoch + 1,
                    " ".join(f"val_{k}={v:.4f}" for k, v in validation.items()))


def update_best(trainer: Trainer, value: Optional[float]) -> None:
    """Best monitored value and the early-stopping count; ``value`` is the same on every rank."""
    cfg, state = trainer.cfg, trainer.state
    if value is None:
        return
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


def finish(trainer: Trainer) -> dict:
    state = trainer.state
    summary = {"epochs": state.epoch, "steps": state.step, "world_size": trainer.accelerator.num_processes,
               "early_stopped": state.early_stopped, "best_monitored": state.best_metric}
    if state.history and "val_loss" in state.history[-1]:
        summary.update({k: v for k, v in state.history[-1].items() if k.startswith("val_")})
    stopped_inside_epoch = max_steps_reached(trainer) and 0 < state.samples_in_epoch < trainer.epoch_length()
    if stopped_inside_epoch and (not state.history or state.history[-1].get("step") != state.step):
        # Stopped by train.max_steps inside an epoch: the final weights validated, for the summary
        # only (the schedule and the history are as the checkpoint at this step holds them).
        summary.update({f"val_{name}": value for name, value in evaluate(trainer, trainer.task.val).items()})
    if trainer.task.test is not None:
        test = evaluate(trainer, trainer.task.test)
        summary.update({f"test_{name}": value for name, value in test.items()})
        trainer.trackers.scalars(state.step, {f"test/{name}": value for name, value in test.items()})
    summary["final_lrs"] = trainer.schedule.lrs()
    check_lrs_agree(trainer.accelerator, torch.tensor([list(summary["final_lrs"].values())]), trainer.group_names,
                    state.epoch, "end of epoch")
    write_end_files(trainer, summary)
    trainer.trackers.hparams({f"hparam/{k}": v for k, v in summary.items() if isinstance(v, float)}, state.step)
    trainer.trackers.finished()
    if trainer.is_main:
        parts = [f"{k}={v:.4f}" for k, v in summary.items() if isinstance(v, float) and k != "best_monitored"]
        best = "" if state.best_metric is None else f" | best {trainer.cfg.checkpoint.monitor} {state.best_metric:.4f}"
        where = f" (train.max_steps: {state.samples_in_epoch} samples into epoch {state.epoch + 1})" \
            if stopped_inside_epoch else ""
        logger.info("done: %d epochs, %d steps%s%s%s%s | checkpoints %s | TensorBoard %s", state.epoch, state.step,
                    where, ", " + " ".join(parts) if parts else "", " (early stopped)" if state.early_stopped else "",
                    best, trainer.store.root, trainer.run_dir / "tb")
    return summary


