"""What the trainer puts into a checkpoint, and how a run comes back from one.

Order on resume matters: weights, then the optimizer (it carries ``initial_lr``), then the
schedule, then a check that the LR each param group will use next is what the schedule says it
should be, recomputed independently by replaying the schedule from the start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from harness import checkpoint as ckpt, sharding
from harness.config import to_plain_dict
from harness.distributed import all_reduce_sum
from harness.optimizers import param_groups as recipe_param_groups
from harness.schedules import advance, lrs_rebuilt_from_last_epoch, LRSchedule, replay_lrs
from harness.streams import loader_state_text, STREAM_FILE
from harness.tracking import flatten
from harness.trainer import flush_step_logs, local_loss_sum, schedule_inputs

logger = logging.getLogger("harness")


def choose_checkpoint(trainer, store: ckpt.CheckpointStore) -> Optional[Path]:
    """Rank 0 picks (and verifies) the checkpoint, every rank gets the same answer."""
    from accelerate.utils import broadcast

    resume = trainer.cfg.run.resume
    chosen: Optional[Path] = None
    code = -1  # -1 none, >= 0 a step under the store, -2 an explicit path
    if trainer.accelerator.is_main_process:
        if resume == "never":
            if store.committed():
                raise ckpt.CheckpointError(
                    f"{store.root}: the run folder already holds checkpoints and run.resume is 'never'. "
                    "Use another run.output_dir, or run.resume=auto to continue; nothing was changed.")
        elif resume == "auto":
            info = store.latest_complete()
            if info is None and store.committed():
                raise ckpt.CheckpointError(
                    f"{store.root}: every checkpoint there is damaged (see warnings above); refusing to start "
                    "over on top of them. Move them away or pass run.resume=never with another run.output_dir.")
            if info is not None:
                code = info.step
        else:
            path = Path(resume)
            ckpt.verify(path)
            code = -2
    code_tensor = broadcast(torch.tensor([code], dtype=torch.long, device=trainer.accelerator.device)).item()
    if code_tensor >= 0:
        chosen = store.root / f"step-{code_tensor:06d}"
    elif code_tensor == -2:
        chosen = Path(resume)
    return chosen


def restore(trainer, folder: Path) -> list[dict]:
    """Load everything from ``folder`` into the built trainer (all ranks). Returns the recipe
    changes accepted under ``run.on_change: allow`` (empty when the recipe is unchanged)."""
    acc, state = trainer.accelerator, trainer.state
    meta = ckpt.read_trainer_json(folder)
    changes = recipe_changes(meta.get("config") or {}, to_plain_dict(trainer.cfg))
    warn_about_changed_components(meta.get("components") or {}, trainer.components, trainer.is_main)
    warn_about_changed_environment(meta.get("versions") or {}, ckpt.library_versions(), trainer.is_main)
    refuse_unapproved_changes(trainer.cfg, changes, folder, meta.get("step"))
    changed_keys = [c["key"] for c in changes]
    load_model_state(trainer.raw_model, folder)
    # This recipe's optimizer hyperparameters, before loading replaces them with the saved ones.
    recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    restore_optimizer(trainer, folder)
    saved_state = meta["state"]
    for f in dataclasses.fields(state):
        if f.name in saved_state:
            setattr(state, f.name, saved_state[f.name])
    allowed = trainer.cfg.run.on_change == "allow"
    rebuild = allowed and any(_matches(key, SCHEDULE_KEYS) for key in changed_keys)
    if allowed and any(key.startswith("optim.") for key in changed_keys):
        apply_recipe_hyperparameters(trainer.optimizer, recipe_groups)
    if rebuild:
        # The changed schedule applies as if the recipe had always said so, from this step on.
        fast_forward_schedule(trainer)
    else:
        try:
            trainer.schedule.load_state_dict(ckpt._read_json(folder / "scheduler.json"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ckpt.CheckpointError(f"{folder / 'scheduler.json'}: cannot restore the schedule: {exc}") from None
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    verify_lrs(trainer, meta, folder, schedule_rebuilt=rebuild)
    restore_rng(trainer, folder, meta)
    if trainer.streamed:
        restore_stream(trainer, folder, meta)
    if not acc.is_main_process:
        # Partial log sums were reduced over ranks at save time; rank 0 carries them.
        state.window_loss_sum = state.epoch_loss_sum = 0.0
    saved_world = meta["world_size"]
    if acc.is_main_process:
        if saved_world != acc.num_processes:
            logger.warning("World size changed: the checkpoint was written by %d rank(s), this run has %d. The "
                           "schedule continues unchanged and the rest of epoch %d (from sample %d) is re-split "
                           "across the new ranks.", saved_world, acc.num_processes, state.epoch + 1,
                           state.samples_in_epoch)
        logger.info("resumed from %s: epoch %d, step %d, %d samples into the epoch", folder, state.epoch, state.step,
                    state.samples_in_epoch)
        if changes:
            logger.warning("recipe changed on resume (run.on_change=allow), applied from step %d on: %s", state.step,
                           "; ".join(_describe(c) for c in changes))
    return changes


# --------------------------------------------------------------------------------------------
# A recipe changed between the checkpoint and this run (run.on_change)
# --------------------------------------------------------------------------------------------

# Keys that steer a run (where it is, where it stops, how it logs and saves) without changing what
# a step computes: never compared. A key ending in "." covers its whole section.
IGNORED_KEYS = ("run.resume", "run.on_change", "run.init_from", "run.init_optimizer", "run.output_dir", "run.name",
                "train.max_steps", "train.log_every_steps", "train.progress_every_s", "train.device",
                "train.early_stopping_patience", "train.early_stopping_min_delta", "train.strategy", "train.fsdp_wrap",
                "train.fsdp_init",
                "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
                "checkpoint.", "preemption.")
# Changed without run.on_change=allow as long as the LR check on resume passes (a longer run of a
# schedule that does not depend on the run's length): extending a run is the common case.
TOLERATED_KEYS = ("train.epochs",)
# Keys whose change alters the LR schedule: under on_change=allow the schedule is rebuilt from the
# recipe and fast-forwarded to the resumed step, instead of loaded from the checkpoint.
SCHEDULE_KEYS = ("optim.lr", "optim.param_groups", "schedule.", "train.epochs", "data.batch_size", "data.drop_last")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def recipe_changes(saved: dict, current: dict) -> list[dict]:
    """``[{"key", "saved", "now"}]`` for every compared key whose value differs. A key present on
    one side only (a setting added in a later version) is not a change."""

    before, after = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(before) & set(after)):
        if _matches(key, IGNORED_KEYS) or before[key] == after[key]:
            continue
        if isinstance(before[key], (int, float)) and isinstance(after[key], (int, float)) \
                and not isinstance(before[key], bool) and float(before[key]) == float(after[key]):
            continue  # 1 vs 1.0
        changes.append({"key": key, "saved": before[key], "now": after[key]})
    return changes


def _describe(change: dict) -> str:
    return f"{change['key']}: {change['saved']!r} -> {change['now']!r}"


def warn_about_changed_components(saved: dict, now: dict, is_main: bool) -> None:
    """A user's component whose source file changed since the checkpoint: the run goes on with
    the new code (the user may have fixed a bug), but says so: the result is no longer one run's."""
    if not is_main:
        return
    for section, entry in saved.items():
        current = now.get(section)
        pairs = zip(entry, current) if isinstance(entry, list) and isinstance(current, list) else [(entry, current)]
        for before, after in pairs:
            if not before or not after or not before.get("sha256") or not after.get("sha256"):
                continue
            if before["target"] != after["target"]:
                logger.warning("WARNING: %s was %s when the checkpoint was written, now %s", section,
                               before["target"], after["target"])
            elif before["sha256"] != after["sha256"]:
                logger.warning("WARNING: %s %s: its source file %s changed since the checkpoint was written; the "
                               "resumed run uses the new code", section, after["target"], after.get("file"))


# What changes the numbers a step computes (safetensors only stores them).
NUMERIC_ENVIRONMENT = ("torch", "accelerate", "numpy", "python", "cpu", "gpu")


def warn_about_changed_environment(saved: dict, now: dict, is_main: bool) -> None:
    """One warning line when the checkpoint was written with other library versions or another CPU
    kernel set / GPU: the run continues correctly, but its numbers can no longer be bitwise those
    of an uninterrupted run (another summation order, other vectorised kernels)."""
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in NUMERIC_ENVIRONMENT
               if key in saved and key in now and saved[key] != now[key]]
    if changed and is_main:
        logger.warning("WARNING: resuming on another environment than the checkpoint was written on (%s): training "
                       "continues correctly, but is no longer bitwise equal to an uninterrupted run",
                       "; ".join(changed))


def refuse_unapproved_changes(cfg, changes: list[dict], folder: Path, step) -> None:
    if cfg.run.on_change == "allow":
        return
    refused = [c for c in changes if not _matches(c["key"], TOLERATED_KEYS)]
    if not refused:
        return
    listed = "; ".join(_describe(c) for c in refused)
    raise ckpt.CheckpointError(
        f"{folder}: this recipe differs from the one the checkpoint was written with: {listed}. Resuming would "
        f"silently mix two recipes. To continue this run with the new values from step {step} on, add "
        f"run.on_change=allow (the change is recorded in the run folder's changes.jsonl and in TensorBoard); to "
        f"start a new run from these weights, use another run.output_dir with run.init_from={folder}; or undo "
        "the change. Nothing was changed.")


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


def record_changes(trainer, changes: list[dict]) -> None:
    """Rank 0: one line per accepted change set in <run>/changes.jsonl, and a TensorBoard text."""
    if not changes or not trainer.is_main:
        return
    entry = {"step": trainer.state.step, "epoch": trainer.state.epoch, "time": time.time(),
             "lrs": trainer.schedule.lrs(), "changes": changes}
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    with (trainer.run_dir / "changes.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    rows = "\n".join(f"| `{c['key']}` | `{c['saved']!r}` | `{c['now']!r}` |" for c in changes)
    trainer.tb.text(trainer.state.step, "run/recipe_changes",
                    f"Resumed at step {trainer.state.step} with a changed recipe (run.on_change=allow):\n\n"
                    f"| key | before | from this step |\n|---|---|---|\n{rows}")


# --------------------------------------------------------------------------------------------
# A new run from another run's weights (run.init_from)
# --------------------------------------------------------------------------------------------


def resolve_init_checkpoint(path: str) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint); verified."""
    folder = Path(path)
    if (folder / "checkpoints").is_dir():
        info = ckpt.CheckpointStore(folder).latest_complete()
        if info is None:
            raise ckpt.CheckpointError(f"run.init_from: {folder} holds no complete checkpoint")
        return info.path
    if not folder.is_dir():
        raise ckpt.CheckpointError(f"run.init_from: {folder}: no such checkpoint or run folder")
    ckpt.verify(folder)
    return folder


def load_weights_that_fit(model: torch.nn.Module, path: Path) -> None:
    """Like checkpoint.load_model_weights, but every tensor that does not fit is listed (a warm
    start from another recipe is where a user needs the whole list)."""
    reader = sharding.Reader(path.parent, "model")
    tensors = {name: reader.full(name) for name in reader.names()}
    own = model.state_dict()
    problems = [f"{name}: missing from the checkpoint" for name in sorted(set(own) - set(tensors))]
    problems += [f"{name}: in the checkpoint, not in this model" for name in sorted(set(tensors) - set(own))]
    problems += [f"{name}: checkpoint {tuple(tensors[name].shape)}, this model {tuple(own[name].shape)}"
                 for name in sorted(set(own) & set(tensors)) if own[name].shape != tensors[name].shape]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise ckpt.CheckpointError(f"run.init_from: {path} does not fit this model ({len(problems)} tensors):\n  {shown}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            sharding.local(own[name]).copy_(sharding.local(sharding.place_like(tensor, own[name])))


def initialize_from(trainer, path: str) -> Path:
    """Load another run's weights (and with run.init_optimizer its optimizer state) into this
    fresh run; the schedule, counters and RNG stay this run's own."""
    folder = resolve_init_checkpoint(path)
    load_weights_that_fit(trainer.raw_model, folder / "model.safetensors")
    if trainer.cfg.run.init_optimizer:
        tensors = optimizer_tensors(trainer, folder)
        saved = ckpt.optimizer_from_files(tensors, ckpt._read_json(folder / "optimizer.json"))
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        problems = []
        for index, entries in sorted(saved["state"].items()):
            if index >= len(params):
                problems.append(f"state of parameter #{index}: this model has {len(params)} parameters")
                continue
            for name, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    problems.append(f"{index}/{name}: shape {tuple(value.shape)}, parameter #{index} has "
                                    f"{tuple(params[index].shape)}")
        if problems:
            raise ckpt.CheckpointError(f"{folder / 'optimizer.safetensors'}: run.init_optimizer: the optimizer "
                                       f"state does not fit this model: {'; '.join(problems[:20])}")
        # Only the per-parameter state: groups (LRs, hyperparameters) stay this recipe's.
        current = trainer.optimizer.state_dict()
        try:
            trainer.optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt.CheckpointError(f"{folder}: run.init_optimizer: cannot load the optimizer state: {exc}") \
                from None
    trainer.state.init_from = str(folder)
    if trainer.is_main:
        logger.info("initialized from %s (weights%s); schedule and counters start fresh", folder,
                    " and optimizer state" if trainer.cfg.run.init_optimizer else "")
    return folder


def load_model_state(model: torch.nn.Module, folder: Path) -> None:
    """The checkpoint's weights, sharded or not, into ``model``, sharded or not (each rank takes
    its own rows of an FSDP parameter: resuming on another number of ranks reshards)."""
    reader = sharding.Reader(folder, "model")
    path = folder / ("model.safetensors" if not (folder / sharding.SHARDING).is_file() else sharding.SHARDING)
    own = model.state_dict()
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
    state_dict = ckpt.optimizer_from_files(tensors, meta)
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
        import inspect

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
        ckpt.set_rng_state(ckpt._read_json(json_path), ckpt._load_tensors(tensor_path))
    else:
        # A rank that did not exist when the checkpoint was written: derive its stream from the
        # seed and the step, so it does not replay the stream of the run's start.
        torch.manual_seed(trainer.cfg.run.seed * 1000 + 17 + rank + 7919 * trainer.state.step)


def save_checkpoint(trainer, store: ckpt.CheckpointStore, reason: str) -> Path:
    """All ranks call this at the same point. Reduces partial log sums first so any world size can resume.

    With ``checkpoint.async_save`` (and for any reason but a preemption, whose save must be on
    disk before the process exits), the files are written by a background thread from a snapshot,
    and training goes on while they are."""

    started = time.perf_counter()
    acc, state = trainer.accelerator, trainer.state
    background = trainer.cfg.checkpoint.async_save and reason != "preempted"
    store.wait_for_background(acc)  # its snapshot's staging buffers are about to be reused
    flush_step_logs(trainer, close_window=False)
    # Logged points up to this checkpoint reach the disk with it: a resume purges only later ones.
    trainer.tb.flush()
    local = [local_loss_sum(trainer.window_losses), local_loss_sum(trainer.epoch_losses)]
    window, epoch = all_reduce_sum(acc, local).tolist()
    trainer.window_losses.clear()
    trainer.epoch_losses.clear()
    if acc.is_main_process:
        state.window_loss_sum += window
        state.epoch_loss_sum += epoch
    else:
        state.window_loss_sum = state.epoch_loss_sum = 0.0
    # Every rank must hold the same counters in the file: take rank 0's partial sums.
    sums = all_reduce_sum(acc, [state.window_loss_sum, state.epoch_loss_sum]).tolist()
    saved_state = dataclasses.asdict(state)
    saved_state["window_loss_sum"], saved_state["epoch_loss_sum"] = sums
    snapshot = CheckpointSnapshot.take(trainer, saved_state, reason,
                                       staging=trainer.checkpoint_staging if background else None)
    # What this rank writes, for the message when a save fails (disk full...).
    size = ckpt.estimated_bytes({**(snapshot.main or {}), **snapshot.rank_files, "rng.json": snapshot.rank_json,
                                 "rng.safetensors": snapshot.rank_tensors, "stream.json": snapshot.stream_json or ""})
    folder = store.save(acc, state.step, snapshot.write_main, snapshot.write_rank, trainer.last_monitored,
                        background=background, size_bytes=size)
    if acc.is_main_process:
        # Routine saves stay out of the console (harness ckpt list shows them); the others are news.
        log = logger.debug if reason in ("epoch_end", "every_steps") else logger.info
        log("checkpoint %s (%s) %s in %.2f s", folder, reason,
            "snapshot taken, writing in the background," if background else "saved", time.perf_counter() - started)
    return folder


@dataclasses.dataclass
class CheckpointSnapshot:
    """Everything one rank writes into a checkpoint, captured at one step boundary.

    Without staging buffers the tensors are the live ones (a synchronous save writes them before
    training moves on). With them, every tensor is copied into its reused buffer and every JSON
    file is rendered now, so a background thread can write while training changes the originals.
    """

    rank: int
    rank_json: str
    rank_tensors: dict[str, torch.Tensor]
    main: Optional[dict] = None  # rank 0: file name -> JSON text or tensors
    rank_files: dict = dataclasses.field(default_factory=dict)  # FSDP: this rank's shards, file name -> tensors
    stream_json: Optional[str] = None  # a train stream's loader state on this rank (harness.streams)
    aliases: dict = dataclasses.field(default_factory=dict)  # tensor file name -> {tied name: name stored}

    @classmethod
    def take(cls, trainer, saved_state: dict, reason: str, staging: Optional[dict]) -> "CheckpointSnapshot":
        acc, state = trainer.accelerator, trainer.state
        rank, world = acc.process_index, acc.num_processes
        rng_meta, rng_tensors = ckpt.rng_state()  # fresh copies already
        snapshot = cls(rank, ckpt.json_text(rng_meta), rng_tensors)
        if trainer.streamed:
            snapshot.stream_json = loader_state_text(trainer.task.train, trainer.cfg.data.num_workers)
        sharded = sharding.is_sharded(trainer.raw_model)
        if not acc.is_main_process and not sharded:
            return snapshot
        model_tensors = trainer.raw_model.state_dict()
        optimizer_tensors, optimizer_meta = ckpt.optimizer_to_files(trainer.optimizer.state_dict())
        if sharded:
            # Each rank writes its own rows; sharding.json (rank 0) says whose rows are where.
            model_tensors, model_layout = sharding.split_for_files(model_tensors, rank, world)
            optimizer_tensors, optimizer_layout = sharding.split_for_files(optimizer_tensors, rank, world)
        # Tied weights once (before staging, which would copy them apart); their names in the metadata.
        model_tensors, model_aliases = sharding.saved_once(model_tensors)
        model_file = f"model-rank-{rank}.safetensors" if sharded else "model.safetensors"
        snapshot.aliases[model_file] = model_aliases
        if staging is not None:
            model_tensors = _stage(model_tensors, staging, "model/")
            optimizer_tensors = _stage(optimizer_tensors, staging, "optimizer/")
        if sharded:
            snapshot.rank_files = {f"model-rank-{rank}.safetensors": model_tensors,
                                   f"optimizer-rank-{rank}.safetensors": optimizer_tensors}
            if not acc.is_main_process:
                return snapshot
            tensor_files = {sharding.SHARDING: ckpt.json_text({"world_size": world, "model": model_layout,
                                                                 "optimizer": optimizer_layout})}
        else:
            tensor_files = {"model.safetensors": model_tensors, "optimizer.safetensors": optimizer_tensors}
        snapshot.main = {
            **tensor_files,
            "optimizer.json": ckpt.json_text(optimizer_meta),
            "scheduler.json": ckpt.json_text(trainer.schedule.state_dict()),
            "trainer.json": ckpt.json_text({
                "state": saved_state,
                "step": state.step,
                "epoch": state.epoch,
                "samples_in_epoch": state.samples_in_epoch,
                "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
                "group_names": trainer.group_names,
                "metric_name": trainer.metrics[0].name if trainer.metrics else None,
                "metrics": [m.name for m in trainer.metrics],
                # Import path and source hash of each component, read by `ckpt inspect` without importing it.
                "components": trainer.components,
                # fp16 on GPU: the loss scale and its growth tracker, so the resumed run scales identically.
                "grad_scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
                "world_size": acc.num_processes,
                "reason": reason,
                "config": to_plain_dict(trainer.cfg),
                "versions": ckpt.library_versions(),
                "saved_at": time.time(),
            }),
        }
        return snapshot

    def write_rank(self, folder: Path, counter) -> None:
        for name, tensors in self.rank_files.items():
            ckpt.save_tensors(tensors, folder / name, self.aliases.get(name))
            counter.wrote(folder / name)
        path = folder / f"rng-rank-{self.rank}.json"
        path.write_text(self.rank_json)
        counter.wrote(path)
        path = folder / f"rng-rank-{self.rank}.safetensors"
        ckpt.save_tensors(self.rank_tensors, path)
        counter.wrote(path)
        if self.stream_json is not None:
            path = folder / STREAM_FILE.format(rank=self.rank)
            path.write_text(self.stream_json)
            counter.wrote(path)

    def write_main(self, folder: Path, counter) -> None:
        for name, content in self.main.items():  # model first: a crash mid-save is tested file by file
            path = folder / name
            if isinstance(content, str):
                path.write_text(content)
            else:
                ckpt.save_tensors(content, path, self.aliases.get(name))
            counter.wrote(path)


def _stage(tensors: dict[str, torch.Tensor], staging: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
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
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-stage")
    return _pool
