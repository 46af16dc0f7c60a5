"""Saving a checkpoint: the log sums reduced over the ranks, a snapshot of every part of
:data:`harness.parts.PARTS`, written through the checkpoint store (atomic folder, manifest),
synchronously or in the background; and when one is due (SavePolicy)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import checkpoint as ckpt, sharding
from harness.distributed import all_reduce_sum
from harness.parts import PARTS, Saving
from harness.trainer import flush_step_logs, local_loss_sum

logger = logging.getLogger("harness")


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
    trainer.trackers.flush()
    local = [local_loss_sum(trainer.logs.window_losses), local_loss_sum(trainer.logs.epoch_losses)]
    window, epoch = all_reduce_sum(acc, local).tolist()
    trainer.logs.window_losses.clear()
    trainer.logs.epoch_losses.clear()
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
                                       staging=trainer.store.staging if background else None)
    # What this rank writes, for the message when a save fails (disk full...).
    size = ckpt.estimated_bytes({**snapshot.run, **snapshot.rank})
    folder = store.save(acc, state.step, snapshot.write_main, snapshot.write_rank, trainer.last_monitored,
                        background=background, size_bytes=size)
    trainer.trackers.checkpointed(state.step)  # MLflow, W&B: the points up to this step are sent now
    total = all_reduce_sum(acc, [float(size)]).tolist()[0] if acc.num_processes > 1 else size
    if acc.is_main_process:
        # One line a save: where, why, how large (all ranks' files), how long the training waited.
        logger.info("checkpoint %s (%s): %s, %s in %.2f s", folder, reason, human_bytes(total),
                    "snapshot taken, writing in the background," if background else "saved synchronously",
                    time.perf_counter() - started)
    return folder


def human_bytes(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


@dataclasses.dataclass
class CheckpointSnapshot:
    """Everything one rank writes into a checkpoint, captured at one step boundary: the files of
    every part of :data:`harness.parts.PARTS`, in that order.

    Without staging buffers the tensors are the live ones (a synchronous save writes them before
    training moves on). With them, every tensor is copied into its reused buffer and every JSON
    file is rendered now, so a background thread can write while training changes the originals.
    """

    run: dict  # rank 0: the run's files, file name -> JSON text or tensors
    rank: dict  # this rank's own files
    aliases: dict  # tensor file name -> {tied name: name stored}

    @classmethod
    def take(cls, trainer, saved_state: dict, reason: str, staging: Optional[dict]) -> "CheckpointSnapshot":
        acc = trainer.accelerator
        saving = Saving(trainer, acc.process_index, acc.num_processes, trainer.strategy, saved_state, reason,
                        staging)
        run, rank, aliases = {}, {}, {}
        for part in PARTS:
            files = part.save(saving)
            run.update(files.run)
            rank.update(files.rank)
            aliases.update(files.aliases)
        if saving.layouts and saving.writes_run_files:
            # FSDP2: which rank's file holds which rows of each tensor (first: read before any shard).
            run = {sharding.SHARDING: ckpt.json_text({"world_size": saving.world, **saving.layouts}), **run}
        return cls(run, rank, aliases)

    def write_rank(self, folder: Path, counter) -> None:
        self._write(self.rank, folder, counter)

    def write_main(self, folder: Path, counter) -> None:
        self._write(self.run, folder, counter)

    def _write(self, files: dict, folder: Path, counter) -> None:
        for name, content in files.items():  # in the parts' order: a crash mid-save is tested file by file
            path = folder / name
            if isinstance(content, str):
                path.write_text(content)
            else:
                ckpt.save_tensors(content, path, self.aliases.get(name))
            counter.wrote(path)


@dataclass(frozen=True)
class SavePolicy:
    """When a checkpoint is due: the decision, apart from the loop that acts on it (and testable
    without a run). Returns the reason recorded in trainer.json, or None."""

    every_steps: Optional[int]
    every_epochs: Optional[int]
    epochs: int

    @classmethod
    def from_config(cls, cfg) -> "SavePolicy":
        return cls(cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs, cfg.train.epochs)

    def after_step(self, step: int, epoch_done: bool) -> Optional[str]:
        # At an epoch's last step the epoch-end save below covers it (after the validation).
        if self.every_steps and step % self.every_steps == 0 and not epoch_done:
            return "every_steps"
        return None

    def after_epoch(self, epoch: int, step: int, stopping: bool) -> Optional[str]:
        due = (self.every_epochs and epoch % self.every_epochs == 0) or epoch == self.epochs or stopping or (
            self.every_steps and step % self.every_steps == 0)
        return "epoch_end" if due else None
