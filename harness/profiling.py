"""``train.profile``: torch.profiler over a window of optimizer steps (wait, warmup, active, per
torch.profiler.schedule), on the main rank or on every rank. Each active window is written when
it closes, as a Chrome trace (``<run>/profile/rank<r>.<time>.pt.trace.json``) that Perfetto
(ui.perfetto.dev), chrome://tracing and TensorBoard's profiler plugin open."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("harness")

PROFILE_DIR = "profile"


class StepProfiler:
    def __init__(self, profiler, folder: Path):
        self.profiler, self.folder = profiler, folder

    @classmethod
    def start(cls, profile, run_dir: Path, rank: int, is_main: bool, on_cuda: bool) -> Optional["StepProfiler"]:
        """The profiler ``profile`` (the recipe's train.profile) asks for on this rank, started; or None."""
        if profile is None or (profile.ranks == "main" and not is_main):
            return None
        folder = Path(run_dir) / PROFILE_DIR
        activities = [torch.profiler.ProfilerActivity.CPU]
        if on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=profile.wait, warmup=profile.warmup, active=profile.active,
                                             repeat=profile.repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{rank}"),
            record_shapes=profile.record_shapes, profile_memory=profile.profile_memory, with_stack=profile.with_stack)
        profiler.start()
        if is_main:
            logger.info("profiling optimizer steps %d-%d of this process into %s", profile.wait + profile.warmup + 1,
                        profile.wait + profile.warmup + profile.active, folder)
        return cls(profiler, folder)

    def step(self) -> None:
        self.profiler.step()

    def stop(self) -> None:
        self.profiler.stop()
