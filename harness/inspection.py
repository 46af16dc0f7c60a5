"""Looking without training: a recipe's planned run (``harness check``) and what a run folder holds
(``harness ckpt list|inspect``, the resume points of its TensorBoard files).

Nothing here builds an Accelerator or writes into a run folder. Functions return plain records;
the ``format_*`` functions turn them into the lines the CLI prints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from harness import checkpoint as ckpt, sampling
from harness.assemble import build_data, build_model
from harness.config import Config, ConfigError, ScheduleConfig
from harness.objectives import build_loss, build_metrics
from harness.optimizers import build_optimizer
from harness.parts import part_of
from harness.schedule_kinds import NAMED_FACTORS
from harness.schedules import Horizon, main_schedule_length, preview_lrs
from harness.tracking import read_scalars, TB_DIR

# The LR preview table stays readable: at most this many epoch-start rows (thinned evenly).
MAX_EPOCH_ROWS = 10


# --------------------------------------------------------------------------------------------
# harness check: the planned run of a recipe
# --------------------------------------------------------------------------------------------


@dataclass
class GroupSummary:
    name: str
    parameters: int
    tensors: int
    lr: float
    weight_decay: float


@dataclass
class RankShares:
    """How the samples of one epoch split across ranks (train) and over one validation (val)."""

    world_size: int
    batch_size: int
    grad_accum_steps: int
    per_micro_batch: list[int]  # samples of a full micro-batch, per rank
    train_per_epoch: list[int]
    val_per_rank: list[int]
    idle_micro_batches: int  # (rank, micro-batch) pairs with no sample: that rank runs a zero-weight one


@dataclass
class Plan:
    recipe: str
    cfg: Config
    description: str
    train_samples: int
    val_samples: int
    model_name: str
    model_parameters: int
    groups: list[GroupSummary]
    shares: RankShares
    steps_per_epoch: int
    epochs: int
    total_steps: int
    stop_step: int  # train.max_steps when it cuts the run short, else total_steps
    lr_series: dict[str, list[float]] = field(default_factory=dict)
    preview_error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def schedule(self) -> ScheduleConfig:
        return self.cfg.schedule


def plan_run(recipe: str, cfg: Config, world_size: int, preview: bool = True) -> Plan:
    """Build the data, the model and the optimizer as training would (no Accelerator), and (with
    ``preview``) step a scratch schedule through the planned run for the LR of every param group."""

    if world_size < 1:
        raise ConfigError(f"--world-size: got {world_size}, expected an integer >= 1")
    torch.manual_seed(cfg.run.seed)
    folders = cfg.import_folders
    task = build_data(cfg.data, cfg.run.seed, folders)
    n_train = len(task.train)
    # The same refusal build_trainer makes, so check fails where train would.
    if cfg.data.batch_size > n_train and cfg.data.drop_last:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {n_train} "
                          "training samples and data.drop_last is true: no step would run")
    model = build_model(cfg.model, task.spec, folders)
    # Built as training would, so a bad loss or metric argument fails here, not on the cluster.
    build_metrics(cfg.metrics, task.spec, build_loss(cfg.loss.name, cfg.loss.options, task.spec, folders), folders)
    optimizer, group_names = build_optimizer(model, cfg.optim, folders)
    groups = [GroupSummary(name, sum(p.numel() for p in g["params"]), len(g["params"]), g["lr"],
                           g.get("weight_decay", 0.0))
              for name, g in zip(group_names, optimizer.param_groups)]
    spe = sampling.steps_per_epoch(n_train, cfg.data.batch_size, cfg.data.drop_last)
    horizon = Horizon(spe, cfg.train.epochs)
    stop = horizon.total_steps if cfg.train.max_steps is None else min(cfg.train.max_steps, horizon.total_steps)
    plan = Plan(recipe, cfg, task.description, n_train, len(task.val), cfg.model.name,
                sum(p.numel() for p in model.parameters()), groups,
                rank_shares(n_train, len(task.val), cfg, world_size), spe, cfg.train.epochs,
                horizon.total_steps, stop)
    if not preview:
        return plan
    try:
        plan.lr_series = preview_lrs(lambda: build_optimizer(model, cfg.optim, folders)[0], cfg.schedule, horizon,
                                     group_names)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        # e.g. OneCycleLR stepped past its total_steps: training would stop with the same error.
        plan.preview_error = f"schedule ({cfg.schedule.name}): stepping through the planned run fails: {exc}"
    plan.warnings, plan.notes = horizon_findings(cfg, horizon, plan.lr_series)
    return plan


def rank_shares(n_train: int, n_val: int, cfg: Config, world_size: int) -> RankShares:
    """Count, with the sampler's own functions, how many samples each rank gets."""
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    train = [0] * world_size
    idle = 0
    # An epoch has at most two distinct global batch sizes (full ones and a last partial one):
    # split each size once and multiply, instead of walking every batch of a large data set.
    sizes: dict[int, int] = {}
    for global_batch in sampling.global_batches(torch.arange(n_train), batch, cfg.data.drop_last):
        sizes[len(global_batch)] = sizes.get(len(global_batch), 0) + 1
    for size, count in sizes.items():
        for micro in sampling.micro_batches(torch.arange(size), accum):
            for rank in range(world_size):
                share = len(sampling.shard(micro, rank, world_size))
                train[rank] += share * count
                idle += count if share == 0 else 0
    first_micro = sampling.micro_batches(torch.arange(min(batch, n_train)), accum)[0]
    per_micro = [len(sampling.shard(first_micro, rank, world_size)) for rank in range(world_size)]
    val = [sum(len(s) for s in sampling.validation_shards(n_val, cfg.data.val_batch_size, rank, world_size))
           for rank in range(world_size)]
    return RankShares(world_size, batch, accum, per_micro, train, val, idle)


def horizon_findings(cfg: Config, horizon, series: dict[str, list[float]]) -> tuple[list[str], list[str]]:
    """Warnings where a schedule's own horizon does not match the planned run, and notes."""

    s = cfg.schedule
    o = s.options
    length = main_schedule_length(s, horizon)
    unit = "optimizer steps" if s.interval == "step" else "epochs"
    planned = f"the planned run has {length} {unit} after warmup ({horizon.steps_per_epoch} steps/epoch x " \
              f"{horizon.epochs} epochs{f', minus {s.warmup_steps} warmup steps' if s.warmup_steps else ''})"
    last = {name: values[-1] for name, values in series.items() if values}
    end = ", ".join(f"{name} {lr:.4g}" for name, lr in last.items())
    warnings: list[str] = []
    notes: list[str] = []

    def horizon_key(key: str, value: Optional[int], short: str, long: str) -> None:
        if value is None or value == length:
            return
        warnings.append(f"schedule.{key}={value} but {planned}: " + (short if value < length else long))

    if s.name == "onecycle":
        horizon_key("total_steps", o.total_steps,
                    "OneCycleLR raises an error once stepped past total_steps, so training would stop there",
                    f"the cycle is cut short and never reaches its final low LR (last LR: {end})")
    elif s.name == "cosine":
        horizon_key("T_max", o.T_max,
                    "the cosine reaches eta_min early and then rises again (CosineAnnealingLR is periodic)",
                    f"the run ends before the LR reaches eta_min (last LR: {end})")
    elif s.name == "polynomial":
        horizon_key("total_iters", o.total_iters,
                    "the LR reaches the end of its decay early and stays there for the rest of the run",
                    f"the decay is unfinished when the run ends (last LR: {end})")
    elif s.name == "lambda":
        if o.factor in NAMED_FACTORS:
            horizon_key("total", o.total,
                        f"the {o.factor} factor finishes early (then held at min_factor={o.min_factor} or beyond)",
                        f"the {o.factor} factor is unfinished when the run ends (last LR: {end})")
        else:
            notes.append(f"schedule.factor={o.factor}: your own function; check its horizon against {planned}")
    elif s.name == "linear" and o.total_iters > length:
        warnings.append(f"schedule.total_iters={o.total_iters} but {planned}: the linear ramp is unfinished "
                        f"when the run ends (last LR: {end})")
    elif s.name == "step" and o.step_size >= length:
        warnings.append(f"schedule.step_size={o.step_size} but {planned}: the LR never decays")
    elif s.name == "multistep":
        late = [m for m in o.milestones if m >= length]
        if late:
            warnings.append(f"schedule.milestones {late} are not reached: {planned}")
    elif s.name == "plateau":
        notes.append(f"ReduceLROnPlateau lowers the LR (x{o.factor} after {o.patience} validations without "
                     f"improvement of {o.monitor}) only in response to validation results: the preview shows "
                     "the plan without them, a flat LR (after any warmup)")
    if s.warmup_steps >= horizon.total_steps:
        warnings.append(f"schedule.warmup_steps={s.warmup_steps} but the run has only {horizon.total_steps} "
                        "steps: the warmup never finishes")
    if cfg.train.max_steps is not None and cfg.train.max_steps < horizon.total_steps:
        notes.append(f"train.max_steps={cfg.train.max_steps} stops the run before the planned "
                     f"{horizon.total_steps} steps; the schedule is sized to the planned run, not to max_steps")
    return warnings, notes


def preview_rows(plan: Plan) -> list[tuple[int, str]]:
    """(step, why) rows for the LR table: the first steps, warmup end, epoch starts, the last step.

    Steps count from 1, as on TensorBoard's x axis: row n is the LR applied in optimizer step n.
    """
    total, spe = plan.total_steps, plan.steps_per_epoch
    rows: dict[int, str] = {}
    for step in range(1, min(3, total) + 1):
        rows[step] = "first steps"
    every = max(1, math.ceil(plan.epochs / MAX_EPOCH_ROWS))
    for epoch in range(0, plan.epochs, every):
        rows.setdefault(epoch * spe + 1, f"epoch {epoch + 1} start")
    if plan.schedule.interval == "epoch" and plan.lr_series:
        # Epoch-interval schedules change the LR only at epoch starts: when that happens at a few
        # epochs only (StepLR, MultiStepLR), show each change; otherwise the thinned rows suffice.
        values = list(zip(*plan.lr_series.values()))
        changes = [epoch for epoch in range(1, plan.epochs)
                   if values[epoch * spe] != values[(epoch - 1) * spe]]
        if len(changes) <= MAX_EPOCH_ROWS:
            for epoch in changes:
                rows[epoch * spe + 1] = f"epoch {epoch + 1} start (LR changes)"
    warmup = plan.schedule.warmup_steps
    if 0 < warmup < total:
        rows[warmup + 1] = "first step after warmup"
    if plan.stop_step < total:
        rows[plan.stop_step] = "train.max_steps stops here"
    rows[total] = "last step"
    return sorted(rows.items())


def format_plan(plan: Plan) -> list[str]:
    cfg, shares = plan.cfg, plan.shares
    lines = [f"recipe {plan.recipe}: valid",
             f"data: {plan.description}",
             f"  {plan.train_samples} train samples, {plan.val_samples} validation samples",
             f"model: {plan.model_name}, {plan.model_parameters:,} parameters",
             f"optimizer: {cfg.optim.name}, {len(plan.groups)} param group(s):"]
    width = max(len(g.name) for g in plan.groups)
    for g in plan.groups:
        lines.append(f"  {g.name:<{width}}  {g.parameters:>10,} parameters in {g.tensors} tensors  "
                     f"lr {g.lr:g}  weight_decay {g.weight_decay:g}")
    world = shares.world_size
    accum = f" in {shares.grad_accum_steps} micro-batches" if shares.grad_accum_steps > 1 else ""
    lines.append(f"world size {world}: global batch {shares.batch_size}{accum}; samples per rank per "
                 f"{'micro-batch' if accum else 'step'}: {compress_ranks(shares.per_micro_batch)}")
    lines.append(f"  train samples per rank per epoch: {compress_ranks(shares.train_per_epoch)}")
    lines.append(f"  validation samples per rank: {compress_ranks(shares.val_per_rank)}")
    if shares.idle_micro_batches:
        lines.append(f"  note: {shares.idle_micro_batches} (rank, micro-batch) pairs per epoch have no sample; "
                     "those ranks run one zero-weight sample so DDP's collectives line up")
    lines.append(f"steps per epoch: {plan.steps_per_epoch}")
    lines.append(f"total steps: {plan.total_steps} ({plan.steps_per_epoch} x {plan.epochs} epochs)"
                 + (f"; train.max_steps stops at {plan.stop_step}" if plan.stop_step < plan.total_steps else ""))
    s = cfg.schedule
    lines.append(f"schedule: {s.name}, stepped per {s.interval if s.name != 'plateau' else 'validation'}"
                 + (f", linear warmup {s.warmup_steps} steps from x{s.warmup_start_factor:g}" if s.warmup_steps else ""))
    if plan.lr_series:
        names = list(plan.lr_series)
        widths = [max(12, len(n)) for n in names]
        lines.append("planned LR (step = optimizer step, from 1):")
        lines.append("  " + f"{'step':>8}  {'epoch':>5}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
        for step, why in preview_rows(plan):
            epoch = (step - 1) // plan.steps_per_epoch + 1
            values = "  ".join(f"{plan.lr_series[n][step - 1]:>{w}.6g}" for n, w in zip(names, widths))
            lines.append(f"  {step:>8}  {epoch:>5}  {values}  {why}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    for warning in plan.warnings:
        lines.append(f"WARNING: {warning}")
    if plan.preview_error:
        lines.append(f"ERROR: {plan.preview_error}")
    return lines


def compress_ranks(values: list[int]) -> str:
    """[57, 57, 56] -> 'ranks 0-1: 57, rank 2: 56'; one rank -> '57'."""
    if len(values) == 1:
        return str(values[0])
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            label = f"rank {start}" if i - 1 == start else f"ranks {start}-{i - 1}"
            parts.append(f"{label}: {values[start]}")
            start = i
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# harness ckpt list / inspect: what a checkpoint folder holds, and whether it verifies
# --------------------------------------------------------------------------------------------


@dataclass
class CheckpointReport:
    path: Path
    step: Optional[int]
    verified: bool
    problem: Optional[str]  # why it does not verify, naming the file
    trainer: Optional[dict]  # trainer.json, when readable
    manifest: Optional[dict]  # MANIFEST.json, when readable
    files: list[tuple[str, int]]  # (name, bytes) of the files actually in the folder
    committed: bool = True  # False for a .tmp-step-* folder a crash left behind

    @property
    def lrs(self) -> dict[str, float]:
        if not self.trainer:
            return {}
        names = self.trainer.get("group_names") or [f"group{i}" for i in range(len(self.trainer.get("lrs", [])))]
        return dict(zip(names, self.trainer.get("lrs", [])))

    @property
    def monitor(self) -> str:
        config = (self.trainer or {}).get("config") or {}
        return (config.get("checkpoint") or {}).get("monitor", "val_loss")


def read_checkpoint(folder: Path | str) -> CheckpointReport:
    folder = Path(folder)
    match = ckpt.STEP_DIR.match(folder.name) or ckpt.TEMP_DIR.match(folder.name)
    step = int(match.group(1)) if match else None
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    committed = not folder.name.startswith(".tmp-")
    problem, manifest = None, None
    try:
        manifest = ckpt.verify(folder)
    except ckpt.CheckpointError as exc:
        problem = str(exc)
    if not committed:
        problem = f"{folder}: an interrupted save, never committed (a resume ignores it)"
    trainer = None
    try:
        trainer = ckpt.read_trainer_json(folder)
    except ckpt.CheckpointError as exc:
        problem = problem or str(exc)
    if manifest is None and (folder / ckpt.MANIFEST).is_file():
        try:
            manifest = ckpt._read_json(folder / ckpt.MANIFEST)
        except ckpt.CheckpointError:
            manifest = None
    if step is None and trainer is not None:
        step = trainer.get("step")
    return CheckpointReport(folder, step, problem is None, problem, trainer, manifest, files, committed)


def component_lines(components: dict) -> list[str]:
    """The model, data, loss, metrics and optimizer the checkpoint was trained with, as recorded
    (import path, source file, its hash): read from trainer.json, never imported."""
    if not components:
        return []
    lines = ["components:"]
    for section, entry in components.items():
        for item in entry if isinstance(entry, list) else [entry]:
            if not item or not item.get("target"):
                continue
            where = f"  ({item['file']}, sha256 {item['sha256'][:12]})" if item.get("sha256") else ""
            lines.append(f"  {section}: {item['target']}{where}")
    return lines


def checkpoints_folder(run_dir: Path | str) -> Path:
    """``<run>/checkpoints``; the checkpoints folder itself is accepted too."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if (run_dir / "checkpoints").is_dir():
        return run_dir / "checkpoints"
    if run_dir.name == "checkpoints":
        return run_dir
    raise FileNotFoundError(f"{run_dir}: no checkpoints folder (expected {run_dir / 'checkpoints'})")


def list_checkpoints(run_dir: Path | str) -> list[CheckpointReport]:
    """Every checkpoint folder of a run, committed or left over by a crash, oldest first."""

    root = checkpoints_folder(run_dir)
    folders = [p for p in root.iterdir() if p.is_dir() and (ckpt.STEP_DIR.match(p.name) or ckpt.TEMP_DIR.match(p.name))]
    reports = [read_checkpoint(p) for p in folders]
    return sorted(reports, key=lambda r: (r.step if r.step is not None else -1, r.committed))


def format_checkpoint_list(reports: list[CheckpointReport]) -> list[str]:
    if not reports:
        return []
    # What run.resume=auto would take: the newest committed checkpoint that verifies.
    chosen = next((r.path for r in reversed(reports) if r.verified), None)
    header = f"{'step':>8}  {'epoch':>11}  {'reason':<12}  {'LRs':<28}  {'metric':<20}  {'world':>5}  verified"
    lines = [header]
    for r in reports:
        t = r.trainer or {}
        epoch = f"{t['epoch']} +{t['samples_in_epoch']}" if "epoch" in t else "?"
        lrs = " ".join(f"{name}={lr:.4g}" for name, lr in r.lrs.items()) or "?"
        metric_value = (r.manifest or {}).get("metric")
        metric = f"{r.monitor}={metric_value:.4g}" if metric_value is not None else "-"
        verdict = "yes" if r.verified else f"NO: {r.problem}"
        resume = "  <- run.resume=auto takes this" if r.path == chosen else ""
        step = r.step if r.step is not None else "?"
        lines.append(f"{step:>8}  {epoch:>11}  {t.get('reason', '?'):<12}  {lrs:<28}  {metric:<20}  "
                     f"{t.get('world_size', '?'):>5}  {verdict}{resume}")
    lines.append("epoch: epochs completed +samples into the next one; metric: the monitored value when saved")
    return lines


def format_checkpoint(report: CheckpointReport) -> list[str]:
    t = report.trainer or {}
    lines = [f"checkpoint {report.path}"]
    listed = (report.manifest or {}).get("files", {})
    lines.append("files:")
    for name, size in report.files:
        mark = "" if name in listed or name == "MANIFEST.json" else "  (not in the manifest)"
        part = part_of(name) or ("the commit" if name == "MANIFEST.json" else "?")
        lines.append(f"  {name:<32} {size:>12,} bytes  {part}{mark}")
    for name in sorted(set(listed) - {n for n, _ in report.files}):
        lines.append(f"  {name:<32} {'MISSING':>12}  (listed in the manifest)")
    if t:
        state = t.get("state", {})
        lines += [f"step: {t.get('step')}",
                  f"epoch: {t.get('epoch')} completed",
                  f"samples into epoch {t.get('epoch', 0) + 1}: {t.get('samples_in_epoch')}",
                  "LRs (the next step's, per param group):"]
        lines += [f"  {name}: {lr!r}" for name, lr in report.lrs.items()]
        metric = (report.manifest or {}).get("metric")
        lines.append(f"metric ({report.monitor}) when saved: {metric!r}; best so far: {state.get('best_metric')!r}")
        lines.append(f"world size: {t.get('world_size')}")
        lines.append(f"reason: {t.get('reason')}")
        if "saved_at" in t:
            lines.append(f"saved at: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t['saved_at']))}")
        versions = t.get("versions") or {}
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        lines += component_lines(t.get("components") or {})
    if report.verified:
        lines.append(f"manifest: verified ({len(listed)} files, sizes and checksums match)")
    else:
        lines.append(f"manifest: NOT verified: {report.problem}")
    return lines


# --------------------------------------------------------------------------------------------
# Resume points: each process writes its own TensorBoard event file
# --------------------------------------------------------------------------------------------


def read_run_scalars(run_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """``tracking.read_scalars`` without TensorBoard's "out of order event.step ... purging" warning:
    for a run resumed from a checkpoint, dropping the points the stopped process logged past that
    checkpoint is the intended behaviour (the resumed run logs them again), not news for the user."""
    import logging

    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        return read_scalars(run_dir)
    finally:
        tb_logger.setLevel(level)


def resume_points(run_dir: Path | str) -> list[int]:
    """Optimizer steps a run resumed from, read from its TensorBoard event files.

    Every process (first start or resume) opens a new event file in ``<run>/tb``. A resumed
    process logs the LR of step k+1 first when it resumed from the checkpoint of step k, so each
    later file's first ``lr/`` step, minus one, is a resume point. Checkpoints are pruned, the
    event files are not, which is why this reads the files and not the checkpoints.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    starts = []
    for path in sorted((Path(run_dir) / TB_DIR).glob("events.out.tfevents.*")):
        opened_at, first_lr, first_any = None, None, None
        for event in EventFileLoader(str(path)).Load():
            opened_at = event.wall_time if opened_at is None else opened_at
            for value in event.summary.value:
                first_any = event.step if first_any is None else min(first_any, event.step)
                if value.tag.startswith("lr/"):
                    first_lr = event.step if first_lr is None else min(first_lr, event.step)
        if first_any is not None:
            starts.append((opened_at, first_lr - 1 if first_lr is not None else first_any))
    # Ordered by when each file was opened; the first file is the run's start, not a resume.
    return sorted({step for _, step in sorted(starts)[1:]})
