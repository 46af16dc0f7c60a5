"""Shared by the benchmark workers: paths, subprocess environment, the step clock, JSON I/O."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPES = ROOT / "recipes"
CPU_2PROC = RECIPES / "accelerate" / "cpu_2proc.yaml"
BREAST_CANCER = RECIPES / "breast_cancer_mlp.yaml"
GCN = RECIPES / "gcn_plateau.yaml"
# Checkpointing is switched off in the step-rate figures: a save is a figure of its own (4) and
# would otherwise dominate a tiny model's epoch. (The save after the last epoch still happens,
# after the timed window.)
NO_CHECKPOINTS = "checkpoint.every_epochs=1000000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    """The environment of every launched process, harness and baseline alike."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class StepClock:
    """Timestamps every optimizer step in this process through torch's global step post-hook.

    Harness and baseline register the same hook, so its (sub-microsecond) cost is on both sides.
    """

    def __init__(self) -> None:
        self.perf: list[float] = []
        self.wall: list[float] = []
        self._handle = None

    def install(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        perf, wall = self.perf, self.wall

        def hook(optimizer, args, kwargs):
            perf.append(time.perf_counter())
            if not wall:
                wall.append(time.time())

        self._handle = register_optimizer_step_post_hook(hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reset(self) -> None:
        self.perf.clear()
        self.wall.clear()

    def steps_per_s(self, skip: int) -> float:
        """Steps per second between the end of step ``skip`` and the end of the last step."""
        if len(self.perf) < skip + 2:
            raise RuntimeError(f"only {len(self.perf)} optimizer steps timed, need more than {skip + 1}")
        steps = len(self.perf) - 1 - skip
        return steps / (self.perf[-1] - self.perf[skip])


def write_json(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []
