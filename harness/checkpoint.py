"""Checkpoints: one folder per checkpoint, written atomically across ranks, verified on load.

Layout of ``<run>/checkpoints/step-000120/``::

    model.safetensors        unwrapped model weights (load with safetensors alone)
    optimizer.safetensors    optimizer state tensors, keyed "<param index>/<name>"
    optimizer.json           param groups (lr, initial_lr, betas, ...) and non-tensor state
    scheduler.json           LRSchedule state: warmup counter + the torch scheduler's state_dict
    trainer.json             counters, data position, best metric, LRs, config, world size, versions
    rng-rank-<r>.json        python and numpy RNG of rank r
    rng-rank-<r>.safetensors torch CPU (and CUDA) RNG of rank r
    MANIFEST.json            every file above with size and CRC-32C; written last

Saving: every rank writes into ``.tmp-step-000120-<attempt>`` and fsyncs, the ranks agree that
every file is on disk, then rank 0 writes the manifest and renames the folder into place. The
attempt id is drawn by rank 0 once per process, so two processes never share a temporary folder.
A folder without a verified manifest never counts. Old checkpoints are pruned only after the new
one is committed. Nothing here unpickles: tensors are safetensors, everything else is JSON.

Background saves (``checkpoint.async_save``): the training thread takes a snapshot (tensors
copied into reused staging buffers, JSON rendered) and goes on; a thread per rank writes the
files, leaves a marker, and rank 0's thread commits as above once every marker is there. The
next save, a preemption save and the end of the run first wait for it.

A save that cannot be written (no space, quota, read-only file system, permission) fails on
every rank together: the ranks agree on it with one all-reduce where a barrier would be, rank 0
removes the temporary folder, and every rank raises CheckpointSaveError naming the checkpoint,
the reason, the space needed and free, and the newest intact checkpoint (earlier ones are never
touched). In a background save, a failing rank's thread leaves a failure marker so rank 0's
thread stops waiting for it; the ranks agree at the next wait for the save.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import crc32c
import torch

from harness import faults
from harness.contracts import CheckpointError
from harness.sharding import aliases_metadata, saved_once

logger = logging.getLogger("harness")

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")
# A save in progress, or one a crash interrupted: ".tmp-step-000120-<attempt>" (before attempt
# ids: ".tmp-step-000120"). Never resumed from; removed when the next run takes the folder's lock.
TEMP_DIR = re.compile(r"^\.tmp-step-(\d{6,})(?:-([0-9a-f]+))?$")


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (no space, quota, read-only file system, permission).
    Its partial folder is removed and earlier checkpoints are untouched; the message names the
    newest intact one."""


class EndFilesError(CheckpointSaveError):
    """The end-of-run files (final/model.safetensors, metrics.json, ranks/) could not be written;
    the last checkpoint holds the finished run, and rerunning the command writes them again."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


@dataclass
class _BackgroundSave:
    final: Path
    tmp: Path
    size_bytes: Optional[int] = None
    world: int = 1
    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None
    doing: str = ""  # what the thread was doing when it failed


# A background save's "my files are on disk" marker, one per rank; never part of a commit.
_WRITTEN_MARKER = ".written-rank-"
# A background save's "I could not write my files" marker: rank 0's thread stops waiting.
_FAILED_MARKER = ".failed-rank-"
# Rank 0's background thread waits this long for the other ranks' files before giving up.
BACKGROUND_COMMIT_TIMEOUT_S = 3600.0


# --------------------------------------------------------------------------------------------
# Files: write + fsync, hash, JSON
# --------------------------------------------------------------------------------------------


class _FileCounter:
    """fsyncs each written file and takes its CRC-32C while it is in the page cache (each rank its
    own files, in parallel: rank 0 no longer reads every rank's files to commit); counts them for
    the test hooks inside a save (faults.py)."""

    def __init__(self) -> None:
        self.count = 0
        self.digests: dict[str, dict] = {}  # file name -> {"size", "crc32c"} for the manifest
        self.save_number, self.kill_after = faults.save_started()

    def wrote(self, path: Path) -> None:
        _fsync_file(path)
        self.digests[path.name] = {"size": path.stat().st_size, "crc32c": crc32c_of(path)}
        self.count += 1
        if self.kill_after is not None and self.count >= self.kill_after:
            faults.kill_now()
        faults.after_checkpoint_file(self.save_number, self.count, path)


_DIGESTS = ".digests-rank-"


def _write_files(tmp: Path, counter: "_FileCounter", write_main, write_rank, rank: int, is_main: bool) -> None:
    """One rank's part of a save (synchronous or on the background thread): its own files, rank
    0's shared ones, and a non-zero rank's checksums for rank 0's manifest."""
    write_rank(tmp, counter)
    if is_main:
        write_main(tmp, counter)
    else:
        _hand_over_digests(tmp, rank, counter)


def _hand_over_digests(tmp: Path, rank: int, counter: "_FileCounter") -> None:
    """A rank's checksums of its own files, for rank 0's manifest (removed before the commit)."""
    path = tmp / f"{_DIGESTS}{rank}.json"
    path.write_text(json.dumps(counter.digests))
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_text(data) -> str:
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def _write_json(path: Path, data) -> None:
    path.write_text(json_text(data))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def crc32c_of(path: Path) -> str:
    """CRC-32C of a file, read through a memory map (no copy; ~10 GB/s from the page cache).

    The manifest guards against torn, truncated and bit-rotted files, not against an attacker
    (who could rewrite the manifest too), so a CRC is the right tool: the sha256 it replaces
    re-read a 1.2 GB checkpoint at ~1.2 GB/s, which was half the cost of saving it."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return f"{crc32c.crc32c(b''):08x}"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return f"{crc32c.crc32c(view):08x}"


def sha256_of(path: Path) -> str:
    """For manifests written before the switch to CRC-32C (they still verify)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, aliases: Optional[dict[str, str]] = None) -> None:
    """A safetensors file; tied tensors once, their other names (``aliases``, and any found here)
    in its metadata (sharding.Reader reads them under every name)."""
    from safetensors.torch import save_file

    tensors, found = saved_once({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    save_file(tensors, str(path), metadata=aliases_metadata({**(aliases or {}), **found}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it may be truncated, "
                              "damaged or of another format (pickles are never loaded)") from None


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, run_dir: Path, keep_last: int = 2, keep_best: int = 0, monitor_mode: str = "min"):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.keep_best, self.monitor_mode = keep_last, keep_best, monitor_mode
        self._background: Optional[_BackgroundSave] = None
        self._attempt_id: Optional[str] = None
        self.staging: dict = {}  # CPU copies of the state for background saves, reused between saves

    # Finding

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoint folders, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append(CheckpointInfo(path, int(match.group(1))))
        return sorted(found, key=lambda c: c.step, reverse=True)

    def latest_complete(self) -> Optional[CheckpointInfo]:
        """The newest checkpoint whose manifest verifies; damaged newer ones are skipped loudly."""
        for info in self.committed():
            try:
                verify(info.path)
                return info
            except CheckpointError as exc:
                logger.warning("WARNING: skipping damaged checkpoint %s: %s. Falling back to an older one.",
                               info.path, exc)
        return None

    # Saving

    def save(self, accelerator, step: int, write_main, write_rank, metric: Optional[float],
             background: bool = False, size_bytes: Optional[int] = None) -> Path:
        """All ranks call this. ``write_main(folder, counter)`` runs on rank 0 and
        ``write_rank(folder, counter)`` on every rank; both call ``counter.wrote(path)`` per file.

        With ``background``, the writing and the commit run on a thread and this returns at once;
        the writers must then use only data captured beforehand (a snapshot), never live state.
        ``size_bytes``: what this rank's writers will write, for the message if the save fails
        (without it, the newest checkpoint's size is the estimate). A save that fails on any rank
        raises CheckpointSaveError on every rank (a background one at the next wait for it).
        """
        self.wait_for_background(accelerator)  # one save at a time, committed in order
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}-{self._attempt(accelerator)}"
        counter = _FileCounter()
        already = final.is_dir() and (final / MANIFEST).is_file()
        failure = None
        if accelerator.is_main_process and not already:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as exc:
                failure = _Failure(exc, f"creating {tmp.name}")
        self._settle(accelerator, final, tmp, failure, size_bytes)  # the folder exists for every rank
        if already:
            return final
        rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
        if background:
            record = self._background = _BackgroundSave(final, tmp, size_bytes, world)
            # A daemon: a run that dies with a save in flight must not hang at exit waiting for it.
            record.thread = threading.Thread(
                target=self._write_in_background, name=f"harness-ckpt-{step}", daemon=True,
                args=(record, tmp, step, metric, write_main, write_rank, counter, rank, world, is_main))
            record.thread.start()
            return final
        try:
            _write_files(tmp, counter, write_main, write_rank, rank, is_main)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others hang
            failure = _Failure(exc, _doing(exc, counter))
        self._settle(accelerator, final, tmp, failure, size_bytes)  # every rank's files are on disk
        if is_main:
            try:
                self._commit(tmp, final, step, metric, counter)
            except Exception as exc:  # noqa: BLE001 - as above
                failure = _Failure(exc, f"committing ({_doing(exc, counter)})")
        self._settle(accelerator, final, tmp, failure, size_bytes)
        return final

    def _attempt(self, accelerator) -> str:
        """This process's attempt id: drawn by rank 0 at the first save and shared with every rank,
        so the temporary folder of a save is this process's alone, whatever else shares the folder."""
        if self._attempt_id is None:
            drawn = secrets.randbits(32) if accelerator.is_main_process else 0
            (value,) = _sum_over_ranks(accelerator, [drawn])  # rank 0's, on every rank
            self._attempt_id = f"{int(value):08x}"
        return self._attempt_id

    def _commit(self, tmp: Path, final: Path, step: int, metric: Optional[float], counter: "_FileCounter") -> None:
        """Rank 0, once every rank's files are on disk: manifest, atomic rename, prune."""
        digests = dict(counter.digests)
        for sidecar in tmp.glob(f"{_DIGESTS}*"):  # the other ranks' files, checksummed by their writers
            digests.update(json.loads(sidecar.read_text()))
            sidecar.unlink()
        files = sorted(p for p in tmp.iterdir() if p.is_file())

        def entry(path: Path) -> dict:
            size, known = path.stat().st_size, digests.get(path.name)
            if known is not None and known.get("size") == size:
                return {"size": size, "crc32c": known["crc32c"]}
            return {"size": size, "crc32c": crc32c_of(path)}

        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "metric": metric,
            "files": {p.name: entry(p) for p in files},
        }
        _write_json(tmp / MANIFEST, manifest)
        counter.wrote(tmp / MANIFEST)
        _fsync_dir(tmp)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(self.root)
        self.prune()

    def _write_in_background(self, record: "_BackgroundSave", tmp: Path, step: int, metric: Optional[float],
                             write_main, write_rank, counter: "_FileCounter", rank: int, world: int,
                             is_main: bool) -> None:
        """The background save's thread on each rank. No collectives here (they belong to the
        training thread): each rank leaves a marker file when its files are on disk (or when it
        failed), and rank 0 commits once it sees every rank's marker. A checkpoint folder must
        therefore be on a file system every rank sees, as it must be for resuming anyway."""
        try:
            _write_files(tmp, counter, write_main, write_rank, rank, is_main)
            marker = tmp / f"{_WRITTEN_MARKER}{rank}"
            marker.touch()
            _fsync_file(marker)
            if not is_main:
                return
            markers = [tmp / f"{_WRITTEN_MARKER}{r}" for r in range(world)]
            deadline = time.monotonic() + BACKGROUND_COMMIT_TIMEOUT_S
            while not all(m.exists() for m in markers):
                failed = sorted(p.name for p in tmp.glob(f"{_FAILED_MARKER}*"))
                if failed:
                    raise _OtherRankFailed(f"{', '.join(failed)} in {tmp}")
                if time.monotonic() > deadline:
                    raise CheckpointError(f"{tmp}: not every rank wrote its files within "
                                          f"{BACKGROUND_COMMIT_TIMEOUT_S:.0f} s; not committed")
                time.sleep(0.005)
            for m in markers:
                m.unlink()
            self._commit(tmp, record.final, step, metric, counter)
            logger.debug("checkpoint %s committed in the background", record.final)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread by wait_for_background
            record.error, record.doing = exc, _doing(exc, counter)
            if not is_main:
                with contextlib.suppress(OSError):  # best effort: the file system may take no file at all
                    (tmp / f"{_FAILED_MARKER}{rank}").touch()

    def wait_for_background(self, accelerator, timeout_s: Optional[float] = None) -> None:
        """Block until this rank's background save is written (and, on rank 0, committed); then,
        with an ``accelerator``, the ranks agree whether it succeeded everywhere. All ranks call
        this together. Raises if the background save failed (CheckpointSaveError on every rank
        for a write failure on any rank); without an ``accelerator`` only this rank's failure."""
        pending, self._background = self._background, None
        if pending is None:
            return
        pending.thread.join(timeout_s)
        if pending.thread.is_alive():
            raise CheckpointError(f"{pending.final}: the background save did not finish within {timeout_s} s")
        error = pending.error
        if accelerator is None:  # an exception is unwinding: no collectives, report this rank's failure
            if error is not None:
                if pending.world == 1:
                    shutil.rmtree(pending.tmp, ignore_errors=True)
                raise CheckpointError(f"{pending.final}: the background save failed: {error}") from error
            return
        own = None if error is None or isinstance(error, _OtherRankFailed) else _Failure(error, pending.doing)
        self._settle(accelerator, pending.final, pending.tmp, own, pending.size_bytes, background=True)

    def _settle(self, accelerator, final: Path, tmp: Path, failure: Optional["_Failure"],
                size_bytes: Optional[int], background: bool = False) -> None:
        """Where a save's barrier would be: one all-reduce tells every rank whether any rank failed.
        If one did, rank 0 removes the temporary folder and every rank raises (an error that is no
        I/O error is re-raised as it is on its rank, with its traceback)."""
        world, rank = accelerator.num_processes, accelerator.process_index
        values = [0.0] * (world + 2)
        values[rank] = failure.code if failure is not None else 0
        values[world:] = [size_bytes or 0, 0 if size_bytes is None else 1]
        total = _sum_over_ranks(accelerator, values)
        codes = {r: int(total[r]) for r in range(world) if total[r]}
        if not codes:
            return
        planned = int(total[world]) if int(total[world + 1]) == world else None
        what = f"{final}: the background save failed" if background else f"{final}: could not be saved"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            message = self._failure_message(what, codes, failure, planned)
        else:
            own = f"{_reason(failure.code)}, {failure.doing}" if failure is not None else "another rank failed"
            message = f"{what} (rank {rank}: {own}); rank 0's message says what survives"
        accelerator.wait_for_everyone()  # removed before any rank exits
        if failure is not None and failure.code == _NOT_IO:
            raise failure.error
        raise CheckpointSaveError(message) from (failure.error if failure is not None else None)

    def _failure_message(self, what: str, codes: dict[int, int], failure: Optional["_Failure"],
                         planned: Optional[int]) -> str:
        reasons = "; ".join(f"{_reason(code)} (rank {r}" + (f", {failure.doing})" if r == 0 and failure else ")")
                            for r, code in sorted(codes.items()))
        newest = self.latest_complete()
        if planned is not None:
            needed = f"It needs {planned:,} bytes"
        elif newest is not None:
            size = sum(entry["size"] for entry in _read_json(newest.path / MANIFEST)["files"].values())
            needed = f"It needs about {size:,} bytes (the size of {newest.path.name})"
        else:
            needed = "It needs an unknown number of bytes (no earlier checkpoint to compare with)"
        where = self.root if self.root.is_dir() else next(p for p in self.root.parents if p.is_dir())
        free = shutil.disk_usage(where).free
        survivor = (f"the newest intact checkpoint is {newest.path}" if newest is not None
                    else "there is no intact checkpoint (none: a rerun starts over)")
        codes_seen = set(codes.values())
        if codes_seen & {errno.ENOSPC}:
            fix = "Free space there (or lower checkpoint.keep_last)"
        elif codes_seen & {errno.EDQUOT}:
            fix = "Free space within your quota there, or have it raised"
        elif codes_seen & {errno.EROFS}:
            fix = f"Make {self.root} writable (the file system is read-only: remounted so after an error?)"
        elif codes_seen & {errno.EACCES, errno.EPERM}:
            fix = f"Let this user write in {self.root} (permissions)"
        else:
            fix = "Fix the cause"
        then = f"it resumes from {newest.path.name}" if newest is not None else "it starts over"
        return (f"{what}: {reasons}. {needed}; {free:,} bytes are free in {where}. The partial save was removed "
                f"and earlier checkpoints are untouched: {survivor}. {fix}, then run the same command again: "
                f"{then}.")

    def prune(self) -> None:
        """Keep the newest ``keep_last`` and the best ``keep_best``; delete the others. Temporary
        folders are left alone: another attempt's may be a save in progress (a stale one is removed
        when the next run takes the folder's lock)."""
        infos = self.committed()
        keep = {c.path for c in infos[: self.keep_last]}
        if self.keep_best:
            scored = []
            for c in infos:
                try:
                    metric = _read_json(c.path / MANIFEST).get("metric")
                except CheckpointError:
                    continue
                if metric is not None:
                    scored.append((metric if self.monitor_mode == "min" else -metric, c.path))
            keep.update(path for _, path in sorted(scored)[: self.keep_best])
        for c in infos:
            if c.path not in keep:
                shutil.rmtree(c.path, ignore_errors=True)


def remove_interrupted_saves(root: Path) -> list[Path]:
    """Delete the temporary folders of saves a crash interrupted. Only while holding the run
    folder's lock (harness.run_lock): another live run's save in progress looks the same."""
    root = Path(root)
    stale = sorted(p for p in root.iterdir() if TEMP_DIR.match(p.name) and p.is_dir()) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.info("removed %d interrupted save(s) an earlier run left: %s", len(stale),
                    ", ".join(p.name for p in stale))
    return stale


def estimated_bytes(files: dict) -> int:
    """What writing ``files`` ({name: JSON text or {tensor name: tensor}}) takes on disk, about:
    the text's bytes, the tensors' nbytes and a safetensors header. For ``save(size_bytes=...)``."""
    total = 0
    for content in files.values():
        if isinstance(content, str):
            total += len(content.encode())
        else:
            total += 8 + 64 + sum(t.nbytes + len(name) + 80 for name, t in content.items())
    return total


# --------------------------------------------------------------------------------------------
# Save failures
# --------------------------------------------------------------------------------------------

_IO_UNKNOWN = -1  # an I/O error without an errno
_NOT_IO = -2  # not an I/O error at all: a bug, shown with its traceback


class _OtherRankFailed(Exception):
    """Rank 0's background thread found another rank's failure marker: nothing to commit."""


@dataclass
class _Failure:
    """What went wrong on this rank during a save."""

    error: BaseException
    doing: str

    @property
    def code(self) -> int:
        """errno for the one all-reduce that tells every rank (0 means no failure)."""
        if isinstance(self.error, OSError):
            return self.error.errno or _IO_UNKNOWN
        if type(self.error).__name__ == "SafetensorError":  # "... I/O error: ... (os error 28)"
            found = re.search(r"os error (\d+)|code: (\d+)", str(self.error))
            return int(found.group(1) or found.group(2)) if found else _IO_UNKNOWN
        return _NOT_IO


def _sum_over_ranks(accelerator, values: list[float]) -> list[float]:
    """One all-reduce of a few numbers (exact in float64 up to 2**53), where a save's barriers were.
    Through the accelerator's own reduce, not torch.distributed: a few times per save it costs
    nothing, and a fake accelerator (tests: ranks as threads) can stand in."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").cpu().tolist()


def _reason(code: int) -> str:
    if code > 0:
        return f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, '?')})"
    return "an I/O error" if code == _IO_UNKNOWN else "an unexpected error (see that rank's traceback)"


def os_error_reason(error: OSError) -> str:
    """"[Errno 28] No space left on device (ENOSPC)": how save failures name an I/O error."""
    return _reason(error.errno or _IO_UNKNOWN)


def _doing(exc: BaseException, counter: "_FileCounter") -> str:
    name = getattr(exc, "filename", None)
    if name:
        return f"writing {Path(name).name}"
    return f"after {counter.count} file(s) written" if counter.count else "at its first file"


def verify(folder: Path) -> dict:
    """Check the manifest against every file (size and CRC-32C, or sha256 in older manifests).
    Returns the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing: the save did not complete")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "files" not in manifest:
        raise CheckpointError(f"{manifest_path}: not a harness checkpoint manifest (format {FORMAT_VERSION})")
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or changed)")
        if "crc32c" in entry:
            algorithm, expected, actual = "CRC-32C", entry["crc32c"], crc32c_of
        elif "sha256" in entry:
            algorithm, expected, actual = "sha256", entry["sha256"], sha256_of
        else:
            raise CheckpointError(f"{manifest_path}: the entry for {name} has no checksum (crc32c or sha256)")
        if actual(path) != expected:
            raise CheckpointError(f"{path}: {algorithm} does not match the manifest (damaged or changed)")
    return manifest


def read_trainer_json(folder: Path) -> dict:
    return _read_json(Path(folder) / "trainer.json")
