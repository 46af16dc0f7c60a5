"""Progress on the main rank: a tqdm bar on a terminal, a plain periodic line otherwise.

SLURM logs and CI capture stdout to a file, where a bar's carriage returns turn into thousands
of lines; there we print one line every ``every_s`` seconds instead. Other ranks print nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional


class Progress:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, every_s: float = 30.0):
        self.enabled, self.total, self.every_s = enabled, total_steps, every_s
        self.start_step, self.started = start_step, time.perf_counter()
        self.last_print = self.started
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # A terminal that reports no size (a bare pty) would get no bar: assume 100 x 24.
            sized = _columns() > 0
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=sized,
                            ncols=None if sized else 100, nrows=None if sized else 24, leave=False)
            # Log lines go above the bar instead of being written into it.
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, step: int, epoch: int, loss: Optional[float], lr: float, samples_per_s: Optional[float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            fields = {"epoch": epoch + 1, "lr": f"{lr:.3g}"}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self.bar.set_postfix(fields, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_print < self.every_s:
            return
        self.last_print = now
        done = step - self.start_step
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total}", f"epoch {epoch + 1}", f"lr {lr:.3g}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if samples_per_s is not None:
            parts.append(f"{samples_per_s:.0f} samples/s")
        parts.append(f"ETA {_duration(eta)}")
        print("[harness] " + " | ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.close()
            self.bar.close()
            self.bar = None


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 0


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
