"""Fault injection and tracing for tests and for users proving their own setup (verify-resume).

All off unless an environment variable is set; each check is one dict lookup at import time.

* HARNESS_TEST_KILL_AT_STEP=N: SIGKILL this process right after optimizer step N (every rank
  that has it set; under a launcher the other ranks are then torn down by the launcher).
* HARNESS_TEST_KILL_AFTER_FILES=[S:]K: SIGKILL right after writing the K-th file of the S-th
  checkpoint save of this process (S defaults to 1): a crash at any point inside a save.
* HARNESS_TEST_SAVE_FILE_DELAY_S=T: sleep T seconds after writing each checkpoint file, so a
  background save is still writing while training goes on (its snapshot must not change).
* HARNESS_TEST_SAVE_ERROR=ERRNO[,save=S][,file=K][,rank=R]: the K-th file (default 1) of the S-th
  checkpoint save (default 1) of rank R (default: every rank) fails with OSError ERRNO (a name
  such as EROFS, EACCES, EDQUOT, ENOSPC), as a write or fsync refused by the file system would.
* HARNESS_TEST_END_FILES_ERROR=ERRNO[,rank=R]: writing the end-of-run files (final/, metrics.json,
  ranks/) fails on rank R (default: every rank) with OSError ERRNO, as a full disk would.
* HARNESS_TRACE_SAMPLES=PATH: each rank appends one JSON line per optimizer step to
  PATH.rank<r>: {"step", "epoch", "indices"}, the global sample indices it trained on.

And from Python, :func:`before_each_step` (a function the loop calls with the trainer before each
optimizer step: verify-resume's pause, tests, benchmarks) and ``KEEP_PROCESS_GROUP``, instead of
replacing loop functions.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable, Optional

_KILL_AT_STEP = os.environ.get("HARNESS_TEST_KILL_AT_STEP")
_KILL_AFTER_FILES = os.environ.get("HARNESS_TEST_KILL_AFTER_FILES")
_SAVE_FILE_DELAY_S = float(os.environ.get("HARNESS_TEST_SAVE_FILE_DELAY_S", "0"))
_SAVE_ERROR = os.environ.get("HARNESS_TEST_SAVE_ERROR")
_TRACE = os.environ.get("HARNESS_TRACE_SAMPLES")
_END_FILES_ERROR = os.environ.get("HARNESS_TEST_END_FILES_ERROR")
TRACE_SAMPLES = _TRACE is not None
_saves_started = 0
# Called with the trainer before each optimizer step (before_each_step); empty: nothing to do.
STEP_HOOKS: list[Callable] = []


# Set from Python to keep the process group joined when a run ends, for several runs in one
# process (Accelerate's state is a process-wide singleton that would still say it is joined).
KEEP_PROCESS_GROUP = False


def before_each_step(hook: Callable) -> None:
    """``hook(trainer)`` runs before each optimizer step of this process, from now on."""
    STEP_HOOKS.append(hook)


def after_step(step: int) -> None:
    if _KILL_AT_STEP is not None and step == int(_KILL_AT_STEP):
        os.kill(os.getpid(), signal.SIGKILL)


def save_started() -> tuple[int, Optional[int]]:
    """This save's number in the process, and K (kill after the K-th file of this save) when it is
    the one to crash in."""
    global _saves_started
    _saves_started += 1
    if _KILL_AFTER_FILES is None:
        return _saves_started, None
    save, _, files = _KILL_AFTER_FILES.rpartition(":")
    return _saves_started, int(files) if int(save or 1) == _saves_started else None


def after_checkpoint_file(save: int, file: int, path: Path) -> None:
    """After the ``file``-th file of the ``save``-th save is written (and fsynced)."""
    if _SAVE_FILE_DELAY_S > 0:
        import time

        time.sleep(_SAVE_FILE_DELAY_S)
    if _SAVE_ERROR is not None:
        import errno

        name, *options = _SAVE_ERROR.split(",")
        where = {"save": 1, "file": 1, "rank": None}
        where.update({k: int(v) for k, v in (o.split("=") for o in options)})
        rank = int(os.environ.get("RANK", "0"))
        if (save, file) == (where["save"], where["file"]) and where["rank"] in (None, rank):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), str(path))


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


def before_end_files(rank: int, path: Path) -> None:
    """Before the end-of-run files are written (HARNESS_TEST_END_FILES_ERROR)."""
    if _END_FILES_ERROR is None:
        return
    import errno

    name, *options = _END_FILES_ERROR.split(",")
    where = {k: int(v) for k, v in (o.split("=") for o in options)}
    if where.get("rank") in (None, rank):
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code), str(path))
