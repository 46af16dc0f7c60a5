"""The files a run writes beside its checkpoints (config.yaml at the start; final/, metrics.json
and ranks/ at the end, each replaced atomically) and its console lines at the start and per epoch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from harness import checkpoint as ckpt, faults, sharding
from harness.checkpoint import EndFilesError, os_error_reason
from harness.config import dump_config
from harness.distributed import any_rank
from harness.trainer import Trainer

logger = logging.getLogger("harness")


def write_run_files(trainer: Trainer) -> None:
    if not trainer.is_main:
        return
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    (trainer.run_dir / "config.yaml").write_text(dump_config(trainer.cfg))


def write_end_files(trainer: Trainer, summary: dict) -> None:
    """final/model.safetensors, ranks/rank-<r>.json and metrics.json, each written to a temporary
    name and renamed. A write that fails on any rank (a full disk, a quota, permissions) fails on
    every rank together with one message (exit 4): the last checkpoint already holds the finished
    run, and the same command run again resumes at its end and writes these files."""

    def write_metrics() -> None:  # last, once every rank's files are written: it says the run is complete
        if trainer.is_main:
            _write_replacing(trainer.run_dir / "metrics.json",
                             lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))

    def every_rank_model_and_report() -> None:
        faults.before_end_files(trainer.accelerator.process_index, trainer.run_dir / "final")
        write_final_model(trainer)
        write_rank_report(trainer)

    for phase in (every_rank_model_and_report, write_metrics):
        failure: Optional[OSError] = None
        try:
            phase()
        except OSError as exc:
            failure = exc
        if any_rank(trainer.accelerator, failure is not None):
            raise end_files_error(trainer, failure)


def end_files_error(trainer: Trainer, failure: Optional[OSError]):
    committed = trainer.store.committed()
    newest = f"checkpoint {committed[0].path}" if committed else "no checkpoint (none was written)"
    what = ("another rank could not write its end-of-run files" if failure is None
            else f"{failure.filename or trainer.run_dir}: {os_error_reason(failure)}")
    return EndFilesError(f"writing the run's end files failed: {what}. Training finished; {newest} holds its end "
                         "state, nothing is lost. Free space (or fix the permissions) and run the same command "
                         "again: it resumes at the end and writes final/model.safetensors, metrics.json and ranks/")


def _write_replacing(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a failure leaves no half-written file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_final_model(trainer: Trainer) -> None:
    """Final weights of the unwrapped model, loadable with safetensors alone (FSDP: gathered whole,
    every rank takes part); tied weights once, their other names in the file's metadata. With
    train.ema, final/ema.safetensors beside it: the same keys, the averaged parameters."""
    _write_final_state(trainer, trainer.raw_model.state_dict(), "model.safetensors")
    if trainer.ema is not None:
        _write_final_state(trainer, trainer.ema.model_state(trainer.raw_model), "ema.safetensors")


def _write_final_state(trainer: Trainer, state: dict, name: str) -> None:
    _, aliases = sharding.saved_once(state)  # on the shards: gathered tensors share no memory
    state = trainer.strategy.full_state(state)
    if not trainer.is_main:
        return
    (trainer.run_dir / "final").mkdir(parents=True, exist_ok=True)
    kept = {key: tensor for key, tensor in state.items() if key not in aliases}
    _write_replacing(trainer.run_dir / "final" / name, lambda tmp: ckpt.save_tensors(kept, tmp, aliases))


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
        "local_validations": trainer.logs.local_validations,
    }
    folder = trainer.run_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    _write_replacing(folder / f"rank-{acc.process_index}.json",
                     lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))


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
