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
CHAR_LM = RECIPES / "char_lm.yaml"
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
        self.cpu: list[float] = []  # CPU time of the thread that steps (the training thread)
        self.wall: list[float] = []
        self._handle = None

    def install(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        perf, cpu, wall = self.perf, self.cpu, self.wall

        def hook(optimizer, args, kwargs):
            perf.append(time.perf_counter())
            cpu.append(time.thread_time())
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
        self.cpu.clear()
        self.wall.clear()

    def rates(self, skip: int, chunk: int) -> dict:
        """Steps/s after the first ``skip`` steps (warm-up, first epoch).

        ``mean``: steps over the whole window. ``median``: ``chunk`` steps over the median duration of
        consecutive ``chunk``-step windows; with ``chunk`` a multiple of the epoch and of the log
        interval every window holds the same work, and the median shrugs off the stalls other
        processes on a shared machine cause. ``median`` is the figure reported. ``cpu_median``:
        the same from the training thread's CPU time, which other processes hardly disturb (a
        cross-check; it leaves out time spent blocked, and work done by other threads).
        """
        out = rates(self.perf, skip, chunk)
        out["cpu_median"] = rates(self.cpu, skip, chunk)["median"]
        return out


def rates(perf: list[float], skip: int, chunk: int) -> dict:
    if len(perf) < skip + chunk + 1:
        raise RuntimeError(f"only {len(perf)} optimizer steps timed, need at least {skip + chunk + 1}")
    steps = len(perf) - 1 - skip
    windows = sorted(perf[i + chunk] - perf[i] for i in range(skip, len(perf) - chunk, chunk))
    middle = len(windows) // 2
    median = windows[middle] if len(windows) % 2 else (windows[middle - 1] + windows[middle]) / 2
    return {"mean": steps / (perf[-1] - perf[skip]), "median": chunk / median, "steps": steps,
            "windows": len(windows), "chunk": chunk}


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
