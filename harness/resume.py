"""How a run comes back from a checkpoint: which one, whether the recipe changed since, then
every part of harness.parts.PARTS loaded in order (weights, then the optimizer: it carries
``initial_lr``; the counters; the schedule, checked against an independent replay of the schedule
from the start; RNG; a stream's position). Also ``run.init_from``: another run's weights.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from harness import checkpoint as ckpt, sharding, states
from harness.config import to_plain_dict
from harness.parts import Loading, load_parts, optimizer_tensors
from harness.tracking import flatten

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
    warn_about_changed_environment(meta.get("versions") or {}, states.library_versions(), trainer.is_main)
    refuse_unapproved_changes(trainer.cfg, changes, folder, meta.get("step"))
    changed_keys = [c["key"] for c in changes]
    allowed = trainer.cfg.run.on_change == "allow"
    load_parts(Loading(trainer, folder, meta,
                       optim_changed=allowed and any(key.startswith("optim.") for key in changed_keys),
                       schedule_changed=allowed and any(_matches(key, SCHEDULE_KEYS) for key in changed_keys)))
    saved_world = meta["world_size"]
    if acc.is_main_process:
        finished = finished_because(trainer)
        if saved_world != acc.num_processes and finished is None:
            logger.warning("World size changed: the checkpoint was written by %d rank(s), this run has %d. The "
                           "schedule continues unchanged and the rest of epoch %d (from sample %d) is re-split "
                           "across the new ranks.", saved_world, acc.num_processes, state.epoch + 1,
                           state.samples_in_epoch)
        if finished is not None:
            logger.info("resumed from %s: step %d, the run had already finished (%s): nothing left to train", folder,
                        state.step, finished)
        else:
            where = "at its start" if state.samples_in_epoch == 0 else f"{state.samples_in_epoch} samples into the epoch"
            logger.info("resumed from %s: epoch %d of %d, step %d, %s", folder, state.epoch + 1,
                        trainer.cfg.train.epochs, state.step, where)
        if changes:
            logger.warning("recipe changed on resume (run.on_change=allow), applied from step %d on: %s", state.step,
                           "; ".join(_describe(c) for c in changes))
    return changes


def finished_because(trainer) -> Optional[str]:
    """Why a run resumed at this state trains no further (None: it goes on). The loop's rule: an
    epoch whose steps are all done is still closed first."""
    state, train = trainer.state, trainer.cfg.train
    if state.early_stopped:
        return "early stopped"
    if state.epoch >= train.epochs:
        return f"all {train.epochs} epochs done"
    if train.max_steps is not None and state.step >= train.max_steps and state.samples_in_epoch < trainer.epoch_length():
        return f"train.max_steps {train.max_steps} reached"
    return None


# --------------------------------------------------------------------------------------------
# A recipe changed between the checkpoint and this run (run.on_change)
# --------------------------------------------------------------------------------------------

# Keys that steer a run (where it is, where it stops, how it logs and saves) without changing what
# a step computes: never compared. A key ending in "." covers its whole section.
IGNORED_KEYS = ("run.resume", "run.on_change", "run.init_from", "run.init_optimizer", "run.output_dir", "run.name",
                "run.log_with",
                "train.max_steps", "train.log_every_steps", "train.progress_every_s", "train.device",
                "train.early_stopping_patience", "train.early_stopping_min_delta", "train.strategy", "train.fsdp_wrap",
                "train.fsdp_init", "train.compile", "train.activation_checkpointing", "train.profile",
                "train.collective_timeout_s",
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
    trainer.trackers.text(trainer.state.step, "run/recipe_changes",
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
        saved = states.optimizer_from_files(tensors, ckpt._read_json(folder / "optimizer.json"))
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
    if trainer.ema is not None:
        trainer.ema.reset_to_weights()  # train.ema: the average starts from the weights the run starts from
    if trainer.is_main:
        logger.info("initialized from %s (weights%s); schedule and counters start fresh", folder,
                    " and optimizer state" if trainer.cfg.run.init_optimizer else "")
    return folder


