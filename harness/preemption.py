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

    def due(self, counter: int, every: int) -> bool:
        return counter % every == 0

    def poll(self, accelerator) -> bool:
        """Non-blocking agreement, for every optimizer step: starts an all-reduce of this rank's
        flag and reads the one started at the previous call. Every rank gets the same answer at
        the same step, one step late, without waiting on a collective in the hot loop."""
        if accelerator.num_processes == 1:
            return self.requested is not None
        import torch
        import torch.distributed as dist

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item() > 0)
        flag = torch.tensor([1.0 if self.requested is not None else 0.0], device=accelerator.device)
        self._pending = (dist.all_reduce(flag, async_op=True), flag)
        return agreed

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
