"""One run per run folder: rank 0 holds a lock on ``<run>/RUN.lock`` for the life of its process.

Two runs in one folder (a relaunch while the first still runs, two array tasks with the same
run.name, a second terminal) would resume from, prune and overwrite each other's checkpoints. So a
run locks its folder before it reads or writes anything there; a second run is refused (exit 2,
nothing written) with the holder's host, pid and start time, which rank 0 writes into the file.

What is relied on:

* ``fcntl.flock`` on a file held open by rank 0. The kernel drops the lock when the process ends,
  however it ends (SIGKILL, OOM killer, node reboot), so a stale lock never blocks the next run; the
  file itself stays and is simply locked again. Nothing else releases it: in one process, locking a
  folder again reuses the lock already held (in-process callers such as the benchmarks).
* Local file systems: flock is exact. NFS (v4, or v3 with lockd; not mounted ``nolock``): Linux
  turns flock into a POSIX lock on the whole file, taken at the server, so it holds across
  nodes; a crashed client's lock is dropped when its lease expires (90 s by default), until then
  the next run is refused. Lustre: only when mounted with ``-o flock`` (``-o localflock`` locks on
  one node only: two nodes would both get it). Other cluster file systems (GPFS, BeeGFS, CephFS)
  support flock across nodes in their default setups.
* A file system that refuses locks (ENOLCK, ENOSYS, EOPNOTSUPP: Lustre without ``-o flock``, some
  FUSE mounts): a loud warning, and the run goes on unlocked. Refusing would make the harness
  unusable there with no way around it; going on is no worse than before locks existed, and the
  checkpoint store still keeps two runs' saves apart (a temporary folder per process). Without the
  lock, interrupted saves from earlier runs are not cleaned up at start (they may be a live run's).

A forked child (a data loader worker) shares the lock's open file: the lock outlives rank 0 only
as long as such a child does. Exec'd programs do not inherit it (close-on-exec).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.checkpoint import remove_interrupted_saves
from harness.config import ConfigError

logger = logging.getLogger("harness")

LOCK_FILE = "RUN.lock"
# flock errors meaning "this file system does not do locks", not "someone else holds it".
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# What rank 0 tells the other ranks (one broadcast).
_LOCKED, _IN_USE, _UNLOCKED, _FAILED, _ALREADY_HELD = 0, 1, 2, 3, 4


class RunFolderInUse(RuntimeError):
    """Another live run holds the run folder's lock; the message names it and what to do."""


@dataclass
class RunLock:
    path: Path
    fd: Optional[int]  # None: the file system refused locks and the run goes on unlocked
    holder: dict

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Normally never called: the process's exit releases the lock."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
        _held.pop(str(self.path.resolve()), None)


# Locks this process holds, by resolved path: they must stay open for the life of the process.
_held: dict[str, RunLock] = {}


def lock_run_folder(run_dir: Path, accelerator) -> RunLock:
    """All ranks call this before anything in ``run_dir`` is read or written. Rank 0 takes the lock
    and tells the others; every rank raises RunFolderInUse if another run holds it. Once held, the
    interrupted saves earlier runs left in ``run_dir/checkpoints`` are removed."""

    run_dir = Path(run_dir)
    lock, problem, status = None, None, _FAILED
    if accelerator.is_main_process:
        try:
            lock, status = _take(run_dir)
        except (OSError, RunFolderInUse) as exc:
            problem = exc
            status = _IN_USE if isinstance(exc, RunFolderInUse) else _FAILED
    status = _broadcast(accelerator, status)
    if status == _IN_USE:
        raise problem if problem is not None else RunFolderInUse(
            f"{run_dir}: in use by another run (rank 0 names it); nothing was written")
    if status == _FAILED:
        if problem is not None:
            raise ConfigError(f"run.output_dir: cannot create the run folder's lock file {run_dir / LOCK_FILE}: "
                              f"{problem}. It must be a folder this user can write in; nothing was written")
        raise ConfigError(f"run.output_dir: rank 0 could not lock {run_dir} (see its message)")
    if accelerator.is_main_process and status == _LOCKED:  # not when re-entered: a save may be in flight
        remove_interrupted_saves(run_dir / "checkpoints")
    return lock if lock is not None else RunLock(run_dir / LOCK_FILE, None, {})


def _take(run_dir: Path) -> tuple[RunLock, int]:
    path = run_dir / LOCK_FILE
    held = _held.get(str(path.resolve()))
    if held is not None:
        return held, _ALREADY_HELD
    run_dir.mkdir(parents=True, exist_ok=True)
    # Opened once and never again by this process: on NFS, where flock is a POSIX lock, closing any
    # other descriptor of the file would drop the lock. Not truncated on open: a refused run must
    # leave the holder's details in place.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # held (EACCES: some NFS servers)
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderInUse(_in_use_message(run_dir, holder)) from None
        os.close(fd)
        if exc.errno not in _NO_LOCKS:
            raise
        _warn_unlocked(run_dir, exc)
        lock = _held[str(path.resolve())] = RunLock(path, None, {})
        return lock, _UNLOCKED
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder, indent=1) + "\n").encode(), 0)
    os.fsync(fd)
    lock = _held[str(path.resolve())] = RunLock(path, fd, holder)
    # A forked child (a DataLoader worker) shares the locked file: closing its copy keeps the lock
    # with this process alone, so it ends with this process (a SIGKILLed rank's workers may linger).
    os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
    return lock, _LOCKED


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # the holder has locked but not yet written its details


def _in_use_message(run_dir: Path, holder: dict) -> str:
    host, pid, since = holder.get("host"), holder.get("pid"), holder.get("since")
    if host is None or pid is None:
        who = "another run (it has not written its host and pid yet: it is starting)"
        stop = "stop it"
    else:
        who = f"another run: pid {pid} on host {host}, running since {since}"
        stop = f"stop it (`kill {pid}` on {host}; it saves a checkpoint and exits)"
    return (f"{run_dir}: in use by {who} (lock file {run_dir / LOCK_FILE}). Two runs in one folder would "
            f"overwrite each other's checkpoints. Wait for it to finish, {stop}, or give this run "
            "another run.output_dir. Nothing was written.")


def _warn_unlocked(run_dir: Path, exc: OSError) -> None:
    bar = "!" * 78
    message = (f"\n{bar}\n!! {run_dir}: the file system refuses file locks ({exc.strerror}).\n"
               "!! This run goes on UNLOCKED: nothing stops a second run from using this folder at the\n"
               "!! same time. Make sure none does. On Lustre, mount with -o flock; on NFS, without nolock.\n"
               f"{bar}")
    logger.warning(message)
    print(message, file=sys.stderr, flush=True)


def _broadcast(accelerator, status: int) -> int:
    if accelerator.num_processes == 1:
        return status
    from accelerate.utils import broadcast

    return int(broadcast(torch.tensor([status], dtype=torch.long, device=accelerator.device)).item())
