"""What a checkpoint holds: one ordered list of stateful parts, :data:`PARTS`.

Each part saves its own files (tensors to safetensors, the rest to JSON; written by rank 0 for the
run, or by every rank for its own) and loads them back. A save (harness/snapshot.py) walks the list
in order, a resume (harness/resume.py) loads in the same order, ``harness ckpt inspect`` names
each part's files. Adding a checkpointed object is one entry here.

    part         written by   files
    model        rank 0       model.safetensors (FSDP2: model-rank-<r>.safetensors, rows in sharding.json)
    ema          rank 0       ema.safetensors: train.ema's float32 averages (FSDP2: ema-rank-<r>.safetensors)
    optimizer    rank 0       optimizer.safetensors + optimizer.json (FSDP2: optimizer-rank-<r>.safetensors)
    trainer      rank 0       trainer.json: counters, data position, history, LRs, recipe, versions
    scheduler    rank 0       scheduler.json (then the LRs are checked against a replay of the schedule)
    grad_scaler  rank 0       grad_scaler.json (fp16 on GPU only)
    rng          every rank   rng-rank-<r>.json + rng-rank-<r>.safetensors
    stream       every rank   stream-rank-<r>.json (a train stream only)

File names never change, so checkpoints of older harness versions keep loading.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save as save_in_memory

from harness import checkpoint as ckpt, sharding, states
from harness.config import to_plain_dict
from harness.optimizers import param_groups as recipe_param_groups
from harness.schedules import LRSchedule, advance, lrs_rebuilt_from_last_epoch, replay_lrs
from harness.streams import STREAM_FILE, loader_state_text
from harness.trainer import schedule_inputs

# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------


@dataclass
class Files:
    """What one part writes on this rank: ``run`` files (rank 0 writes them) and this rank's own
    ``rank`` files; each file name -> JSON text or a dict of tensors."""

    run: dict = field(default_factory=dict)
    rank: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)  # tensor file -> {tied name: the name stored}


@dataclass
class Saving:
    """One save, as the parts see it."""

    trainer: Any
    rank: int
    world: int
    strategy: Any  # harness.strategy: who writes which rows of the model and optimizer
    saved_state: dict  # TrainState as saved (partial log sums reduced over the ranks)
    reason: str
    staging: Optional[dict]  # reused CPU buffers of a background save (None: the live tensors)
    layouts: dict = field(default_factory=dict)  # FSDP2 rows per part, for sharding.json

    @property
    def writes_run_files(self) -> bool:
        return self.rank == 0

    def stage(self, tensors: dict, prefix: str) -> dict:
        return tensors if self.staging is None else stage(tensors, self.staging, prefix)


@dataclass
class Loading:
    """One resume, as the parts see it."""

    trainer: Any
    folder: Path
    meta: dict  # trainer.json
    optim_changed: bool  # run.on_change: allow with optim.* changed: this recipe's hyperparameters
    schedule_changed: bool  # ... with the schedule changed: rebuilt from this recipe


@dataclass(frozen=True)
class Part:
    name: str
    files: str  # a regular expression for its file names (ckpt inspect names the part of each file)
    save: Callable[[Saving], Files]
    load: Callable[[Loading], None]


def _save_model(s: Saving) -> Files:
    return _state_files(s, "model", s.trainer.raw_model.state_dict())


def _state_files(s: Saving, part: str, state: dict) -> Files:
    """A state dict as ``<part>.safetensors`` (rank 0), or under FSDP2 as each rank's rows in
    ``<part>-rank-<r>.safetensors`` with the layout for sharding.json."""
    if not s.strategy.writes_state(s.rank):
        return Files()
    tensors, layout = s.strategy.rows_to_save(state, s.rank, s.world)
    if layout is not None:
        s.layouts[part] = layout
    # Tied weights once (before staging, which would copy them apart); their names in the metadata.
    tensors, aliases = sharding.saved_once(tensors)
    name = f"{part}-rank-{s.rank}.safetensors" if layout is not None else f"{part}.safetensors"
    tensors = s.stage(tensors, f"{part}/")
    return Files(rank={name: tensors}, aliases={name: aliases}) if layout is not None else \
        Files(run={name: tensors}, aliases={name: aliases})


def _load_model(r: Loading) -> None:
    load_model_state(r.trainer.raw_model, r.folder)


def _save_ema(s: Saving) -> Files:
    return Files() if s.trainer.ema is None else _state_files(s, "ema", s.trainer.ema.state())


def _load_ema(r: Loading) -> None:
    ema = r.trainer.ema
    if ema is None:
        return
    sharded = (r.folder / sharding.SHARDING).is_file()
    if (r.folder / ("ema-rank-0.safetensors" if sharded else "ema.safetensors")).is_file():
        load_tensors_into(ema.state(), r.folder, "ema")
    else:  # train.ema added on resume (run.on_change: allow): the average starts from these weights
        ema.reset_to_weights()


def _save_optimizer(s: Saving) -> Files:
    if not s.strategy.writes_state(s.rank):
        return Files()
    tensors, meta = states.optimizer_to_files(s.trainer.optimizer.state_dict())
    tensors, layout = s.strategy.rows_to_save(tensors, s.rank, s.world)
    tensors = s.stage(tensors, "optimizer/")
    if layout is not None:
        s.layouts["optimizer"] = layout
        return Files(run={"optimizer.json": ckpt.json_text(meta)} if s.writes_run_files else {},
                     rank={f"optimizer-rank-{s.rank}.safetensors": tensors})
    return Files(run={"optimizer.safetensors": tensors, "optimizer.json": ckpt.json_text(meta)})


def _load_optimizer(r: Loading) -> None:
    optimizer = r.trainer.optimizer
    # This recipe's hyperparameters, before loading replaces them with the saved ones.
    recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    restore_optimizer(r.trainer, r.folder)
    if r.optim_changed:
        apply_recipe_hyperparameters(optimizer, recipe_groups)


def _save_trainer(s: Saving) -> Files:
    if not s.writes_run_files:
        return Files()
    t, state = s.trainer, s.trainer.state
    return Files(run={"trainer.json": ckpt.json_text({
        "state": s.saved_state,
        "step": state.step,
        "epoch": state.epoch,
        "samples_in_epoch": state.samples_in_epoch,
        "lrs": [g["lr"] for g in t.optimizer.param_groups],
        "group_names": t.group_names,
        "metric_name": t.metrics[0].name if t.metrics else None,
        "metrics": [m.name for m in t.metrics],
        # Import path and source hash of each component, read by `ckpt inspect` without importing it.
        "components": t.components,
        "world_size": s.world,
        "reason": s.reason,
        "config": to_plain_dict(t.cfg),
        "versions": states.library_versions(),
        "saved_at": time.time(),
    })})


def _load_trainer(r: Loading) -> None:
    state, saved = r.trainer.state, r.meta["state"]
    for f in dataclasses.fields(state):
        if f.name in saved:
            setattr(state, f.name, saved[f.name])
    if not r.trainer.accelerator.is_main_process:
        # Partial log sums were reduced over ranks at save time; rank 0 carries them.
        state.window_loss_sum = state.epoch_loss_sum = 0.0


def _save_scheduler(s: Saving) -> Files:
    return Files(run={"scheduler.json": ckpt.json_text(s.trainer.schedule.state_dict())}) if s.writes_run_files \
        else Files()


def _load_scheduler(r: Loading) -> None:
    if r.schedule_changed:
        # The changed schedule applies as if the recipe had always said so, from this step on.
        fast_forward_schedule(r.trainer)
    else:
        try:
            r.trainer.schedule.load_state_dict(ckpt._read_json(r.folder / "scheduler.json"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ckpt.CheckpointError(f"{r.folder / 'scheduler.json'}: cannot restore the schedule: {exc}") from None
    verify_lrs(r.trainer, r.meta, r.folder, schedule_rebuilt=r.schedule_changed)


def _save_grad_scaler(s: Saving) -> Files:
    # fp16 on GPU: the loss scale and its growth tracker, so the resumed run scales identically.
    scaler = getattr(s.trainer.accelerator, "scaler", None)
    if scaler is None or not s.writes_run_files:
        return Files()
    return Files(run={"grad_scaler.json": ckpt.json_text(scaler.state_dict())})


def _load_grad_scaler(r: Loading) -> None:
    scaler = getattr(r.trainer.accelerator, "scaler", None)
    path = r.folder / "grad_scaler.json"
    # Checkpoints before this file kept the scaler's state in trainer.json.
    saved = ckpt._read_json(path) if path.is_file() else r.meta.get("grad_scaler")
    if scaler is not None and saved:
        scaler.load_state_dict(saved)


def _save_rng(s: Saving) -> Files:
    meta, tensors = states.rng_state()  # fresh copies already
    return Files(rank={f"rng-rank-{s.rank}.json": ckpt.json_text(meta), f"rng-rank-{s.rank}.safetensors": tensors})


def _load_rng(r: Loading) -> None:
    restore_rng(r.trainer, r.folder, r.meta)


def _save_stream(s: Saving) -> Files:
    t = s.trainer
    if not t.streamed:
        return Files()
    return Files(rank={STREAM_FILE.format(rank=s.rank): loader_state_text(t.task.train, t.cfg.data.num_workers)})


def _load_stream(r: Loading) -> None:
    if r.trainer.streamed:
        restore_stream(r.trainer, r.folder, r.meta)


PARTS: list[Part] = [
    Part("model", r"model(-rank-\d+)?\.safetensors|sharding\.json", _save_model, _load_model),
    Part("ema", r"ema(-rank-\d+)?\.safetensors", _save_ema, _load_ema),
    Part("optimizer", r"optimizer(-rank-\d+)?\.safetensors|optimizer\.json", _save_optimizer, _load_optimizer),
    Part("trainer", r"trainer\.json", _save_trainer, _load_trainer),
    Part("scheduler", r"scheduler\.json", _save_scheduler, _load_scheduler),
    Part("grad_scaler", r"grad_scaler\.json", _save_grad_scaler, _load_grad_scaler),
    Part("rng", r"rng-rank-\d+\.(json|safetensors)", _save_rng, _load_rng),
    Part("stream", r"stream-rank-\d+\.json", _save_stream, _load_stream),
]


def part_of(file_name: str) -> Optional[str]:
    """The part a checkpoint file belongs to (None: the manifest, or not a checkpoint file)."""
    return next((part.name for part in PARTS if re.fullmatch(part.files, file_name)), None)


def load_parts(loading: Loading) -> None:
    for part in PARTS:
        part.load(loading)


def rehearse_model_save(model: torch.nn.Module) -> None:
    """Before the first step: the model's state goes through what a save does (tied tensors
    kept once, every value to safetensors), on one element of each tensor, in memory. A model
    that cannot be checkpointed fails now, naming its tensors, not an epoch later at its first save."""
    problems = []
    kept, _ = sharding.saved_once(model.state_dict())
    for name, value in kept.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name}: a {type(value).__name__}, not a tensor (get_extra_state?)")
            continue
        try:
            value = sharding.local(value)
            if value.device.type != "meta":
                save_in_memory({name: value.detach().reshape(-1)[:1].cpu().clone()})
        except Exception as exc:  # noqa: BLE001 - sparse layouts, dtypes safetensors cannot store
            problems.append(f"{name}: {type(value).__name__} {value.dtype} {value.layout}: {exc}")
    if problems:
        raise ckpt.CheckpointError("the model cannot be checkpointed (its state_dict goes to safetensors, which "
                              "stores dense tensors only):\n  " + "\n  ".join(problems[:20]))


# --------------------------------------------------------------------------------------------
# Loading each part
# --------------------------------------------------------------------------------------------


def apply_recipe_hyperparameters(optimizer, recipe_groups: list[dict]) -> None:
    """Loading an optimizer state replaces every group setting with the saved one; put back this
    recipe's (weight_decay, betas, momentum, ...). LR keys are the schedule's business."""
    lr_keys = {"lr", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"}
    for group, recipe in zip(optimizer.param_groups, recipe_groups):
        group.update({k: v for k, v in recipe.items() if k not in lr_keys})


def recorded_validations(trainer) -> list[tuple]:
    """(step, at an epoch's end, val_loss, the plateau's monitored value) of every record so far
    (epoch ends, and validations inside epochs with train.val_every_steps), for replaying the
    schedule: see schedules.advance."""

    return [(record["step"], not record.get("mid_epoch"), *schedule_inputs(trainer, record))
            for record in trainer.state.history]


def fast_forward_schedule(trainer) -> None:
    """Rebuild the schedule from the recipe on the restored optimizer and step it through the run
    so far (the recorded validations feed ReduceLROnPlateau): the LR is what the changed recipe
    gives at this step, as if it had always been the recipe."""

    recipe_lrs = [g["lr"] for g in recipe_param_groups(trainer.raw_model, trainer.cfg.optim)[0]]
    for group, lr in zip(trainer.optimizer.param_groups, recipe_lrs):
        for key in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"):
            group.pop(key, None)  # set again by the new scheduler, from this recipe
        group["lr"] = lr
    state = trainer.state
    trainer.schedule = LRSchedule(trainer.optimizer, trainer.cfg.schedule, trainer.horizon, trainer.group_names)
    validations = recorded_validations(trainer)
    advance(trainer.schedule, trainer.horizon, state.step, state.epoch, validations)


def load_model_state(model: torch.nn.Module, folder: Path) -> None:
    """The checkpoint's weights, sharded or not, into ``model``, sharded or not (each rank takes
    its own rows of an FSDP parameter: resuming on another number of ranks reshards)."""
    load_tensors_into(model.state_dict(), folder, "model")


def load_tensors_into(own: dict[str, torch.Tensor], folder: Path, part: str) -> None:
    """A part's tensors (``<part>.safetensors``, or FSDP2's ``<part>-rank-<r>.safetensors`` rows)
    copied into ``own``'s tensors, plain or DTensors (each rank reads only its rows)."""
    reader = sharding.Reader(folder, part)
    path = folder / (f"{part}.safetensors" if not (folder / sharding.SHARDING).is_file() else sharding.SHARDING)
    names = set(reader.names())
    missing, unexpected = sorted(set(own) - names), sorted(names - set(own))
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{path}: does not fit this model: missing {missing[:5]}, unexpected "
                                   f"{unexpected[:5]} (a checkpoint from another recipe?)")
    with torch.no_grad():
        for name in sorted(own):
            saved_shape = reader.shape(name)
            if tuple(saved_shape) != tuple(own[name].shape):
                raise ckpt.CheckpointError(f"{path}: tensor {name!r} has shape {tuple(saved_shape)}, this model has "
                                           f"{tuple(own[name].shape)} (a checkpoint from a recipe with other shapes?)")
            if sharding.is_dtensor(own[name]):
                own[name].to_local().copy_(sharding.local_rows(reader, name, own[name]))
            else:
                own[name].copy_(reader.full(name))


def optimizer_tensors(trainer, folder: Path) -> dict[str, torch.Tensor]:
    """The optimizer state tensors ("<param index>/<name>"), laid out like their parameters."""
    reader = sharding.Reader(folder, "optimizer")
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    out = {}
    for name in reader.names():
        index = int(name.partition("/")[0])
        param = params[index] if index < len(params) else None
        if param is not None and sharding.is_dtensor(param) and tuple(reader.shape(name)) == tuple(param.shape):
            out[name] = sharding.as_dtensor_like(sharding.local_rows(reader, name, param), param)
        else:
            out[name] = reader.full(name)
    return out


def restore_optimizer(trainer, folder: Path) -> None:
    tensors = optimizer_tensors(trainer, folder)
    meta = ckpt._read_json(folder / "optimizer.json")
    state_dict = states.optimizer_from_files(tensors, meta)
    groups_now = trainer.optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups_now] != [len(g["params"]) for g in state_dict["param_groups"]]:
        raise ckpt.CheckpointError(f"{folder / 'optimizer.json'}: param groups do not match this recipe's "
                                   "(a checkpoint from another recipe or param_groups setting?)")
    try:
        trainer.optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ckpt.CheckpointError(f"{folder / 'optimizer.safetensors'}: cannot restore the optimizer: {exc}") from None


def verify_lrs(trainer, meta: dict, folder: Path, schedule_rebuilt: bool = False) -> None:
    """The LRs after loading must equal the saved ones and an independent replay of the schedule.

    When an allowed recipe change rebuilt the schedule, the LRs are those of the new recipe at
    this step: they may differ from the saved ones, but must still equal the independent replay
    and torch's own ``last_epoch`` reconstruction."""
    loaded = [g["lr"] for g in trainer.optimizer.param_groups]
    saved = loaded if schedule_rebuilt else meta["lrs"]
    problems = []
    if loaded != saved:
        problems.append(f"restored optimizer/scheduler give {loaded}, the checkpoint recorded {saved}")
    val_history = recorded_validations(trainer)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    recipe_lrs = {g.name: (g.lr if g.lr is not None else trainer.cfg.optim.lr) for g in trainer.cfg.optim.param_groups}

    def scratch_optimizer():
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in trainer.group_names]
        groups = [{"params": [p], "lr": recipe_lrs.get(name, trainer.cfg.optim.lr)}
                  for p, name in zip(params, trainer.group_names)]
        accepted = inspect.signature(type(inner).__init__).parameters
        return type(inner)(groups, **{k: v for k, v in inner.defaults.items() if k != "lr" and k in accepted})

    replayed = replay_lrs(trainer.cfg.schedule, trainer.horizon, trainer.group_names, scratch_optimizer,
                          trainer.state.step, trainer.state.epoch, val_history)
    if replayed is not None and any(abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30) for a, b in zip(replayed, saved)):
        problems.append(f"replaying the schedule from the recipe gives {replayed}, the checkpoint recorded {saved}")
    # The other restore path torch offers, built with last_epoch on the restored optimizer's groups.
    groups = trainer.optimizer.state_dict()["param_groups"]
    try:
        rebuilt = lrs_rebuilt_from_last_epoch(trainer.cfg.schedule, trainer.horizon, groups,
                                              getattr(trainer.schedule.main, "last_epoch", None),
                                              trainer.schedule.steps_done)
    except KeyError as exc:
        rebuilt = None
        problems.append(f"the restored optimizer lacks {exc} needed to build the scheduler with last_epoch")
    if rebuilt is not None and any(abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-30) for a, b in zip(rebuilt, loaded)):
        problems.append(f"building the scheduler with last_epoch={getattr(trainer.schedule.main, 'last_epoch', None)} "
                        f"gives {rebuilt}, "
                        f"loading its state gives {loaded}")
    if problems:
        raise ckpt.CheckpointError(f"{folder}: LR check after resume failed: {'; '.join(problems)}. "
                                   "The recipe's schedule differs from the one that wrote this checkpoint.")


def restore_stream(trainer, folder: Path, meta: dict) -> None:
    """A train stream continues where this rank's stream was (mid-epoch: same world size and
    loader workers only; at an epoch boundary there is nothing to continue)."""

    state, acc = trainer.state, trainer.accelerator
    if state.samples_in_epoch == 0:
        return
    saved_world, workers = meta["world_size"], trainer.cfg.data.num_workers
    path = folder / STREAM_FILE.format(rank=acc.process_index)
    where = f"{state.samples_in_epoch} samples into epoch {state.epoch + 1} of"
    if saved_world != acc.num_processes:
        raise ckpt.CheckpointError(
            f"{folder}: this checkpoint is {where} a stream (IterableDataset) read by {saved_world} rank(s); this run "
            f"has {acc.num_processes}. Each rank's stream saved its own position, which cannot be re-split: resume "
            f"with {saved_world} rank(s), or from a checkpoint at an epoch's end (checkpoint.every_epochs)")
    if not path.is_file():
        raise ckpt.CheckpointError(f"{folder}: {path.name} is missing: the checkpoint is {where} a stream, and holds "
                                   "no position for it (written before the data was a stream?)")
    saved = ckpt._read_json(path)
    if saved.get("num_workers") != workers:
        raise ckpt.CheckpointError(
            f"{path}: the stream was read by {saved.get('num_workers')} loader worker(s) per rank, this run has "
            f"data.num_workers={workers}; each worker's copy of the stream saved its own position: resume with "
            f"data.num_workers={saved.get('num_workers')} (or change it at an epoch boundary)")
    trainer.task.train.resume_at(state.epoch, saved["loader"])


def restore_rng(trainer, folder: Path, meta: dict) -> None:
    acc = trainer.accelerator
    rank = acc.process_index
    json_path, tensor_path = folder / f"rng-rank-{rank}.json", folder / f"rng-rank-{rank}.safetensors"
    if rank < meta["world_size"] and json_path.is_file():
        states.set_rng_state(ckpt._read_json(json_path), ckpt._load_tensors(tensor_path))
    else:
        # A rank that did not exist when the checkpoint was written: derive its stream from the
        # seed and the step, so it does not replay the stream of the run's start.
        torch.manual_seed(trainer.cfg.run.seed * 1000 + 17 + rank + 7919 * trainer.state.step)


# --------------------------------------------------------------------------------------------
# Copies for background saves
# --------------------------------------------------------------------------------------------


def stage(tensors: dict[str, torch.Tensor], staging: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Copies into CPU buffers kept between saves (allocating ~1 GB anew each time costs more in
    page faults than the copy itself), pinned when the source is on a GPU. CPU-to-CPU copies run
    on a few threads in ~64 MB pieces (copy_ releases the GIL): one thread does not saturate the
    memory bandwidth, and this copy is the whole training stall of a background save."""
    out, pieces = {}, []
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        buffer = staging.get(prefix + name)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            staging[prefix + name] = buffer
        out[name] = buffer
        if tensor.is_cuda or not tensor.is_contiguous():
            buffer.copy_(tensor, non_blocking=tensor.is_cuda)
            continue
        flat_src, flat_dst = tensor.view(-1), buffer.view(-1)
        step = max(1, STAGING_PIECE_BYTES // max(1, tensor.element_size()))
        pieces += [(flat_dst[i:i + step], flat_src[i:i + step]) for i in range(0, flat_src.numel(), step)]
    if pieces:
        list(_copy_pool().map(lambda pair: pair[0].copy_(pair[1]), pieces))
    if any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()
    return out


STAGING_PIECE_BYTES = 64 << 20


_pool = None


def _copy_pool():
    global _pool
    if _pool is None:
        workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-stage")
    return _pool
