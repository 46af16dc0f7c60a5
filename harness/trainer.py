"""What one run holds (the Trainer and its counters), how its components are built and probed,
and the per-step log windows both the loop and the checkpoint code read."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from harness import components
from harness.assemble import build_data, build_model, loader_settings
from harness.checkpoint import CheckpointStore
from harness.config import Config, ConfigError
from harness.components import UserCodeError
from harness.contracts import TaskData
from harness.data import as_task_data, fingerprint
from harness.ema import EMA
from harness.distributed import gather_rows, raise_if_lrs_differ
from harness.objectives import averages_elements, build_loss, build_metrics, make_metric, metric_context, wrap_loss
from harness.preemption import PreemptionWatcher
from harness.progress import Progress
from harness.schedules import Horizon, LRSchedule
from harness.tracking import Trackers

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
    # The step of the latest validation inside an epoch (train.val_every_steps): a run preempted
    # during one resumes by redoing it.
    validated_at_step: int = 0


@dataclass
class StepLogs:
    """This rank's numbers between two log lines (flush_step_logs writes and cross-checks them)."""

    # LRs applied at steps not yet written/checked: [(step, [lr per group])]
    pending_lrs: list[tuple[int, list[float]]] = field(default_factory=list)
    # This rank's per-step summed losses (detached) since the log window / the epoch started: a list
    # append per step instead of a tensor op; summed when logged, folded when long (see add_loss).
    window_losses: list[torch.Tensor] = field(default_factory=list)
    epoch_losses: list[torch.Tensor] = field(default_factory=list)
    window_started: float = field(default_factory=time.perf_counter)
    window_samples: int = 0
    last_logged: dict = field(default_factory=dict)  # latest train loss and samples/s, for progress
    # This rank's own validation sums (loss_sum, metric_sum, count) before the reduction.
    local_validations: list[list[float]] = field(default_factory=list)


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
    trackers: Trackers  # run.log_with: TensorBoard, log.jsonl
    store: Optional[CheckpointStore] = None
    loss: object = None  # per_sample / summed (harness.contracts.Loss)
    metrics: list = field(default_factory=list)  # harness.contracts.Metric
    components: dict = field(default_factory=dict)  # import path + source hash of each component
    strategy: Any = None  # harness.strategy: DDP or FSDP2 (parameters are DTensors holding this rank's rows)
    # The loss gives several values per sample (tokens, labels): means are over the counted target
    # elements (harness.objectives.element_count), not over samples. Decided by probe_objective.
    per_element: bool = False
    # The monitored value (checkpoint.monitor) of the latest validation, for keep_best.
    last_monitored: Optional[float] = None
    preemption: Optional[PreemptionWatcher] = None
    progress: Optional[Progress] = None
    state: TrainState = field(default_factory=TrainState)
    logs: StepLogs = field(default_factory=lambda: StepLogs())
    # Backward seeds (the loss scale as a tensor), by scale: see backward().
    gradient_seeds: dict = field(default_factory=dict)

    # The model without Accelerate's wrappers (DDP...): unwrapped once, in build_trainer, because
    # Accelerator.unwrap_model looks for DeepSpeed with an uncached importlib search (~0.1 ms) per call.
    raw_model: Optional[torch.nn.Module] = None
    # A stream (IterableDataset) ran out before the epoch's planned steps: the epoch ends there.
    stream_ended: bool = False
    ema: Optional[EMA] = None  # train.ema: the averaged weights (harness/ema.py)
    profiler: Any = None  # train.profile: harness.profiling.StepProfiler on the ranks it profiles

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def streamed(self) -> bool:
        """The train split is a stream (an IterableDataset, harness.streams): no index to sample by."""
        return getattr(self.task.train, "streamed", False)

    def epoch_length(self) -> int:
        """Samples an epoch consumes (the last partial batch is dropped with drop_last, and always
        from a stream)."""
        n, batch = len(self.task.train), self.cfg.data.batch_size
        return n - n % batch if self.cfg.data.drop_last or self.streamed else n


@dataclass
class GivenComponents:
    """Objects handed over from Python (harness.train(model=..., data=...)) instead of being built
    from the recipe's sections."""

    model: object = None  # a module, or a class or factory the harness builds seeded (with the recipe's model keys)
    data: object = None  # anything a data factory may return (see harness.data)
    loss: object = None  # a loss function, class instance or harness Loss
    metrics: Optional[list] = None  # metric functions or objects


def seed_everything(seed: int) -> None:
    """torch's, numpy's and Python's global generators, as user code may draw from any of them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def check_same_data(accelerator, task: TaskData) -> None:
    """Every rank built the same data (split sizes and a hash of a few items): a factory that
    draws unseeded, or reads rank-local files, would train each rank on its own data unnoticed."""
    if accelerator.num_processes == 1:
        return
    rows = gather_rows(accelerator, fingerprint(task))
    differ = [rank for rank in range(len(rows)) if not torch.equal(rows[rank], rows[0])]
    if differ:
        def seen(rank: int) -> str:
            train, val, test, digest = (int(v) for v in rows[rank])
            sizes = ", ".join(f"{name} {n}" for name, n in (("train", train), ("val", val), ("test", test)) if n >= 0)
            return f"rank {rank}: {sizes}, items {digest:012x}"

        raise ConfigError(f"data: the ranks built different data ({'; '.join(seen(r) for r in [0, *differ][:4])}). "
                          "The data factory must build the same data on every rank (the harness splits it across "
                          "ranks itself): run.seed seeds torch, numpy and random before it runs; seed any other "
                          "generator it uses, and read the same files on every rank")


def build_components(cfg: Config, given: GivenComponents, model_device: Optional[str] = None):
    """The data, model, loss and metrics of a run, from the recipe or as given; with the import
    path and source hash of each (recorded in checkpoints, compared on resume)."""

    folders = cfg.import_folders
    origins = {}

    def origin(section: str, name: Optional[str], obj=None) -> dict:
        if obj is not None:
            return components.origin_of(obj, "").as_dict()
        if name is None:
            return {"target": None}
        if components.is_import_path(name):
            return components.origin_of(components.resolve(section, name, folders), name).as_dict()
        return {"target": name}  # built in: versioned with the harness

    seed_everything(cfg.run.seed)  # the data factory's draws, the same on every rank
    if given.data is not None:
        # Datasets given from Python are read with the recipe's loader settings (data.num_workers...).
        task = as_task_data(given.data, "data (given from Python)", cfg.run.seed, loader_settings(cfg.data, folders))
        origins["data"] = origin("data", None, given.data)
    else:
        task = build_data(cfg.data, cfg.run.seed, folders)
        origins["data"] = origin("data", cfg.data.name)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank, whatever the data factory drew
    if isinstance(given.model, torch.nn.Module):
        model, origins["model"] = given.model, origin("model", None, given.model)
    else:
        with torch.device(model_device) if model_device else contextlib.nullcontext():
            model = build_model(cfg.model, task.spec, folders, target=given.model)
        origins["model"] = origin("model", cfg.model.name) if given.model is None else origin("model", None, given.model)
    if given.loss is not None:
        loss, origins["loss"] = wrap_loss(given.loss, {}, "given from Python"), origin("loss", None, given.loss)
    else:
        loss, origins["loss"] = build_loss(cfg.loss.name, cfg.loss.options, task.spec, folders), \
            origin("loss", cfg.loss.name)
    if given.metrics is not None:
        context = metric_context(task.spec, loss)
        metrics = [make_metric(m, {}, getattr(m, "__name__", type(m).__name__), context) for m in given.metrics]
        origins["metrics"] = [origin("metric", None, m) for m in given.metrics]
    else:
        metrics = build_metrics(cfg.metrics, task.spec, loss, folders)
        names = [e if isinstance(e, str) else e["name"] for e in (cfg.metrics or [])]
        origins["metrics"] = [origin("metric", n) for n in names]
    origins["optim"] = origin("optim", cfg.optim.name)
    return task, model, loss, metrics, origins


def probe_objective(trainer: Trainer) -> None:
    """A forward of two training samples (eval mode, no gradient), before anything is written: a
    model, loss or metric that does not fit the data (a loss returning one number, a forward that
    needs what the batch lacks) fails here with its message, not after the run folder is made."""
    split, acc = trainer.task.train, trainer.accelerator
    model = trainer.raw_model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = split.fetch(torch.arange(min(2, len(split)))).to(acc.device)
            outputs = batch.predict(model).float()
            try:
                trainer.loss.per_sample(outputs, batch.targets)
            except (UserCodeError, ConfigError):
                raise
            except (ValueError, RuntimeError, IndexError) as exc:  # a built-in loss: shapes that do not pair
                raise ConfigError(f"loss: {trainer.cfg.loss.name or 'the default loss'} cannot pair outputs "
                                  f"{list(outputs.shape)} with targets {list(batch.targets.shape)}: {exc}") from None
            trainer.per_element = averages_elements(trainer.loss, outputs, batch.targets)
            for metric in trainer.metrics:
                try:
                    metric.sums(outputs, batch.targets)
                except (UserCodeError, ConfigError):
                    raise
                except (ValueError, RuntimeError, IndexError) as exc:
                    raise ConfigError(f"metrics: {metric.name} cannot score outputs {list(outputs.shape)} against "
                                      f"targets {list(batch.targets.shape)}: {exc}") from None
    finally:
        model.train(was_training)


def fold(losses: list[torch.Tensor]) -> None:
    """Replace the entries by their sum (one tensor)."""
    if len(losses) > 1:
        # In float64: a few float32 values add up exactly there, so the sum does not depend on where
        # a checkpoint split the window (a resumed run logs the same loss as an uninterrupted one).
        losses[:] = [torch.stack([loss.double() for loss in losses]).sum()]


def local_loss_sum(losses: list[torch.Tensor]) -> float:
    fold(losses)
    return float(losses[0]) if losses else 0.0


def flush_step_logs(trainer: Trainer, close_window: bool, sums: Sequence[float] = ()) -> list[float]:
    """Write and cross-check pending per-step LRs; if ``close_window``, log the train-loss window.

    Called every log interval. With several ranks, one collective gathers each rank's loss sum
    and LRs together: the loss is summed, the LRs must agree. ``sums``: more of this rank's
    values to add up over the ranks in that same collective; returns their totals.
    """
    acc, state = trainer.accelerator, trainer.state
    close = close_window and state.window_count > 0
    rows = [lrs for _, lrs in trainer.logs.pending_lrs]
    local_loss = local_loss_sum(trainer.logs.window_losses) if close else 0.0
    loss_of_ranks, totals = local_loss, list(sums)
    if acc.num_processes > 1 and (rows or close or sums):
        payload = torch.tensor([local_loss, *sums] + [lr for row in rows for lr in row], dtype=torch.float64)
        gathered = gather_rows(acc, payload)  # [world, 1 + len(sums) + steps * groups]
        added = gathered[:, :1 + len(sums)].sum(dim=0).tolist()
        loss_of_ranks, totals = added[0], added[1:]
        if rows:
            raise_if_lrs_differ(gathered[:, 1 + len(sums):].reshape(gathered.size(0), len(rows), -1),
                                trainer.group_names, trainer.logs.pending_lrs[0][0], "optimizer step")
    if rows:
        trainer.trackers.lr_series(trainer.logs.pending_lrs[0][0], trainer.group_names, rows)
        trainer.logs.pending_lrs = []
    if close:
        elapsed = time.perf_counter() - trainer.logs.window_started
        trainer.logs.last_logged = {"loss": (loss_of_ranks + state.window_loss_sum) / state.window_count,
                               "samples_per_s": trainer.logs.window_samples / max(elapsed, 1e-9)}
        trainer.trackers.scalars(state.step, {
            "train/loss": trainer.logs.last_logged["loss"],
            "perf/samples_per_s": trainer.logs.last_logged["samples_per_s"],
        })
        trainer.logs.window_losses.clear()
        state.window_loss_sum = 0.0
        state.window_count = 0
        trainer.logs.window_started = time.perf_counter()
        trainer.logs.window_samples = 0
    return totals


def monitored_value(record: dict, name: str, metrics: list) -> Optional[float]:
    """``val_loss``, ``train_loss``, ``val_<metric>`` (or the old ``val_metric``: the first metric)
    of one epoch's record; None when that epoch did not validate."""
    if name == "val_metric":
        name = f"val_{metrics[0].name}" if metrics else "val_loss"
    return record.get(name)


def monitor_names(metrics: list) -> list[str]:
    return ["val_loss", "train_loss", *(f"val_{m.name}" for m in metrics), "val_metric"]


def schedule_inputs(trainer: Trainer, record: dict) -> tuple[Optional[float], Optional[float]]:
    """(val_loss, the value ReduceLROnPlateau watches) for LRSchedule.after_validation."""
    monitor = trainer.schedule.monitor or "val_loss"
    return record.get("val_loss"), monitored_value(record, monitor, trainer.metrics)


def check_monitors(trainer: Trainer) -> None:
    """checkpoint.monitor and a plateau's monitor must name something this run reports."""
    valid = monitor_names(trainer.metrics)
    for key, name in (("checkpoint.monitor", trainer.cfg.checkpoint.monitor),
                      ("schedule.monitor", trainer.schedule.monitor)):
        if name is not None and name not in valid:
            raise ConfigError(f"{key}: {name!r} is not reported by this run; valid: {', '.join(valid)}")
