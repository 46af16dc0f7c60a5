"""Graceful stop on a signal: the handler records the request, the loop acts at a safe point.

SLURM (``--signal=B:USR1@N``, ``scancel -s ...``), torchrun (forwards TERM/INT/HUP/QUIT to workers,
SIGKILLs them 30 s later) and Kubernetes all warn with a signal. Saving inside a handler could run
in the middle of an optimizer step, so the handler only sets a flag; the loop checks it at every
optimizer-step boundary and inside long validations, the ranks agree with one collective (any
rank asked = all stop), a checkpoint is saved, and the process exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Optional

from harness.config import PreemptionConfig

logger = logging.getLogger("harness")

# "Saved a checkpoint because of a signal; requeue me." (EX_TEMPFAIL from sysexits.h)
EXIT_PREEMPTED = 75
MARKER = "PREEMPTED.json"
# check_every_steps: auto never waits longer than this many steps between two agreements.
MAX_STEPS_BETWEEN_CHECKS = 1000


class Preempted(Exception):
    """Raised after the preemption checkpoint is committed, to unwind to the CLI."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(f"stopped on {signal_name}; checkpoint {checkpoint}")
        self.signal_name, self.checkpoint = signal_name, checkpoint


class PreemptionWatcher:
    def __init__(self, cfg: PreemptionConfig):
        self.cfg = cfg
        self.requested: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous = {}
        self._pending = None  # (work, tensor) of the in-flight non-blocking agreement
        self._next_check_step: Optional[int] = None  # agreed by all ranks (check_every_steps: auto)
        self._last_poll: Optional[tuple[int, float]] = None  # rank 0: (step, time) of its last poll

    def install(self) -> "PreemptionWatcher":
        for name in self.cfg.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def ignore_further(self) -> None:
        """SIG_IGN for the preemption signals (kept by Python's teardown, unlike a handler)."""
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        # Record only. A second signal while saving lands here too and changes nothing.
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            self.received_at = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether the loop polls after this optimizer step; the same answer on every rank."""
        every = self.cfg.check_every_steps
        if every != "auto":
            return step % every == 0
        return self._next_check_step is None or step >= self._next_check_step

    def poll(self, accelerator, step: int) -> bool:
        """Non-blocking agreement at an optimizer-step boundary: starts an all-reduce of this
        rank's flag and reads the one started at the previous poll. Every rank gets the same
        answer at the same step, one poll late, without waiting on a collective in the hot loop.

        With ``check_every_steps: auto`` the same all-reduce carries rank 0's proposal for the
        number of steps until the next poll (``check_interval_s`` over its measured step time),
        so the ranks agree on when to poll next without another collective: every ~0.2 s on
        2 ms steps is every ~100 steps, on 2 s steps every step."""
        if accelerator.num_processes == 1:
            self._next_check_step = step + 1
            return self.requested is not None
        import torch
        import torch.distributed as dist

        agreed, interval = False, 1
        if self._pending is not None:
            work, result = self._pending
            work.wait()
            agreed, interval = bool(result[0].item() > 0), max(1, int(result[1].item()))
        self._next_check_step = step + interval
        proposal = self._propose_interval(step) if accelerator.is_main_process else 0.0
        result = torch.tensor([1.0 if self.requested is not None else 0.0, proposal], device=accelerator.device)
        self._pending = (dist.all_reduce(result, async_op=True), result)
        return agreed

    def _propose_interval(self, step: int) -> float:
        now = time.monotonic()
        last, self._last_poll = self._last_poll, (step, now)
        if self.cfg.check_every_steps != "auto" or last is None or step <= last[0]:
            return 1.0
        seconds_per_step = (now - last[1]) / (step - last[0])
        return float(min(MAX_STEPS_BETWEEN_CHECKS, max(1, round(self.cfg.check_interval_s / max(seconds_per_step, 1e-9)))))

    def drain(self) -> None:
        """Finish the in-flight agreement before other collectives (all ranks call this together)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def should_stop(self, accelerator) -> bool:
        """All ranks call this at the same point; True everywhere if any rank got a signal."""
        from harness.distributed import any_rank

        return any_rank(accelerator, self.requested is not None)


def write_marker(run_dir: Path, signal_name: str, checkpoint: Path, step: int, received_at: Optional[float]) -> None:
    """Tells a batch script (which cannot rely on the launcher's exit code) that we saved on a signal."""
    payload = {"signal": signal_name, "checkpoint": str(checkpoint), "step": step, "time": time.time(),
               "seconds_from_signal_to_saved": None if received_at is None else time.monotonic() - received_at}
    (Path(run_dir) / MARKER).write_text(json.dumps(payload, indent=2) + "\n")


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


def parse_signal_names(names: list[str]) -> list[str]:
    from harness.config import ConfigError

    out = []
    for name in names:
        canonical = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not isinstance(getattr(signal, canonical, None), signal.Signals):
            raise ConfigError(f"preemption.signals: unknown signal {name!r}, expected e.g. SIGTERM, SIGUSR1, SIGUSR2")
        if canonical in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"preemption.signals: {canonical} cannot be caught")
        out.append(canonical)
    return out
