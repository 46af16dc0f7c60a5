"""Fault injection and tracing for tests and for users proving their own setup (verify-resume).

All off unless an environment variable is set; each check is one dict lookup at import time.

* HARNESS_TEST_KILL_AT_STEP=N: SIGKILL this process right after optimizer step N (every rank
  that has it set; under a launcher the other ranks are then torn down by the launcher).
* HARNESS_TEST_KILL_AFTER_FILES=[S:]K: SIGKILL right after writing the K-th file of the S-th
  checkpoint save of this process (S defaults to 1): a crash at any point inside a save.
* HARNESS_TEST_SAVE_FILE_DELAY_S=T: sleep T seconds after writing each checkpoint file, so a
  background save is still writing while training goes on (its snapshot must not change).
* HARNESS_TRACE_SAMPLES=PATH: each rank appends one JSON line per optimizer step to
  PATH.rank<r>: {"step", "epoch", "indices"}, the global sample indices it trained on.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Optional

_KILL_AT_STEP = os.environ.get("HARNESS_TEST_KILL_AT_STEP")
_KILL_AFTER_FILES = os.environ.get("HARNESS_TEST_KILL_AFTER_FILES")
_SAVE_FILE_DELAY_S = float(os.environ.get("HARNESS_TEST_SAVE_FILE_DELAY_S", "0"))
_TRACE = os.environ.get("HARNESS_TRACE_SAMPLES")
TRACE_SAMPLES = _TRACE is not None
_saves_started = 0


def after_step(step: int) -> None:
    if _KILL_AT_STEP is not None and step == int(_KILL_AT_STEP):
        os.kill(os.getpid(), signal.SIGKILL)


def save_started() -> Optional[int]:
    """Returns K (kill after the K-th file of this save) when this save is the one to crash in."""
    global _saves_started
    _saves_started += 1
    if _KILL_AFTER_FILES is None:
        return None
    save, _, files = _KILL_AFTER_FILES.rpartition(":")
    return int(files) if int(save or 1) == _saves_started else None


def after_checkpoint_file() -> None:
    if _SAVE_FILE_DELAY_S > 0:
        import time

        time.sleep(_SAVE_FILE_DELAY_S)


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def trace_samples(rank: int, step: int, epoch: int, indices) -> None:
    if _TRACE is None:
        return
    with Path(f"{_TRACE}.rank{rank}").open("a") as handle:
        handle.write(json.dumps({"step": step, "epoch": epoch, "indices": [int(i) for i in indices]}) + "\n")


_SIGNAL_IN_VALIDATION_AT_STEP = os.environ.get("HARNESS_TEST_SIGNAL_IN_VALIDATION_AT_STEP")


def before_validation(step: int, rank: int) -> None:
    """HARNESS_TEST_SIGNAL_IN_VALIDATION_AT_STEP=N: rank 0 sends itself SIGTERM as the validation
    inside the epoch at step N starts, so the preemption lands inside that validation."""
    if _SIGNAL_IN_VALIDATION_AT_STEP is not None and step == int(_SIGNAL_IN_VALIDATION_AT_STEP) and rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
