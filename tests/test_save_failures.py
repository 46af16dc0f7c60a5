"""A checkpoint that cannot be written (disk full, quota, read-only, permission): every rank exits 4 with
one clear message, the partial save is gone, earlier checkpoints are intact, and the same command
resumes once the cause is fixed. The disk is a real, small tmpfs where this machine lets us mount one
(root); elsewhere the same failure is injected at the write layer (harness/faults.py)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

from harness.checkpoint import verify
from tests.conftest import ROOT, assert_bitwise_equal, run_harness, subprocess_env, weights

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 8 steps per epoch, 2 epochs; checkpoints at steps 5, 8, 10, 15 and 16. A checkpoint takes 100 KiB
# of tmpfs pages on one rank, 128 KiB on two: the disk holds two, and the third (step 10) fails.
BASE = ["data.batch_size=64", "train.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep_last=20"]
DISK_KIB = {1: 240, 2: 300}
ASYNC = "checkpoint.async_save=true"
HARNESS_FRAME = re.compile(r'File "[^"]*/harness/\w+\.py"')


class SmallDisk:
    """A tmpfs of ``kib`` KiB mounted on ``folder``, or (where mounting is not allowed) a disk that
    reports ENOSPC at the 3rd save through the test hook."""

    def __init__(self, folder: Path, kib: int):
        self.folder = folder
        folder.mkdir(parents=True)
        try:
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                                   capture_output=True, text=True)
            self.mounted, why = mount.returncode == 0, mount.stderr.strip()
        except OSError as exc:  # no mount program
            self.mounted, why = False, str(exc)
        if not self.mounted:
            # CI runs as root and must test the real disk; elsewhere the fallback says so.
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs on {folder} ({why}): CI tests a real full disk")
            warnings.warn(f"no tmpfs ({why}): the full disk is injected at the write layer instead")
        self.full = True

    def env(self) -> dict:
        if self.full and not self.mounted:
            return subprocess_env(HARNESS_TEST_SAVE_ERROR="ENOSPC,save=3")
        return subprocess_env()

    def free_space(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=8m", str(self.folder)], check=True)
        self.full = False

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(folder: Path, kib: int) -> SmallDisk:
        disks.append(SmallDisk(folder, kib))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of an uninterrupted run on 1 and on 2 ranks, trained once for the module."""
    done = {}

    def of(nproc: int) -> dict:
        if nproc not in done:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted{nproc}") / "run"
            assert run(run_dir, nproc).returncode == 0
            done[nproc] = weights(run_dir)
        return done[nproc]

    return of


def run(run_dir: Path, nproc: int, extra=(), env=None) -> subprocess.CompletedProcess:
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *BASE, *extra], nproc=nproc, check=False, env=env,
                       launcher="python" if nproc == 1 else "accelerate")


def contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_every_rank_exited(proc: subprocess.CompletedProcess, nproc: int, code: int) -> None:
    output = proc.stdout + proc.stderr
    if nproc == 1:
        assert proc.returncode == code, output[-3000:]
        assert "Traceback" not in output
    else:  # accelerate launch exits 1; its summary lists every rank's own exit code
        assert proc.returncode != 0 and proc.stderr.count(f"exitcode  : {code} ") == nproc, output[-3000:]
    assert not HARNESS_FRAME.search(output), output[-3000:]


@pytest.mark.parametrize("nproc, mode", [(1, "sync"), (2, "sync"), (2, "async")])
def test_a_full_disk_fails_the_save_on_every_rank_keeps_the_earlier_checkpoints_and_resumes_after(
        tmp_path, small_disk, uninterrupted, nproc, mode):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    disk = small_disk(checkpoints, DISK_KIB[nproc])
    extra = [ASYNC] if mode == "async" else []
    failed = run(run_dir, nproc, extra, env=disk.env())
    assert_every_rank_exited(failed, nproc, 4)
    what = "the background save failed" if mode == "async" else "could not be saved"
    message = next((line for line in failed.stderr.splitlines()
                    if line.startswith(f"harness: checkpoint save failed: {checkpoints / 'step-000010'}: {what}: "
                                       "[Errno 28] No space left on device (ENOSPC) (rank ")), None)
    assert message is not None, failed.stderr[-3000:]
    sizes = re.search(r"It needs ([\d,]+) bytes; ([\d,]+) bytes are free in "
                      + re.escape(str(checkpoints)) + r"\.", message)
    assert sizes is not None, message
    needed, free = (int(v.replace(",", "")) for v in sizes.groups())
    if disk.mounted:
        assert free < needed, message
    assert (f"The partial save was removed and earlier checkpoints are untouched: the newest intact checkpoint "
            f"is {checkpoints / 'step-000008'}. Free space there (or lower checkpoint.keep_last), then run the same "
            "command again: it resumes from step-000008.") in message
    if nproc == 2:
        assert f"{checkpoints / 'step-000010'}: {what} (rank 1: " in failed.stderr
    # Nothing partial is left (no temporary folder, no marker); the earlier ones verify.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000005", "step-000008"]
    earlier = {name: contents(checkpoints / name) for name in ("step-000005", "step-000008")}
    for name in earlier:
        verify(checkpoints / name)

    disk.free_space()
    resumed = run(run_dir, nproc, extra, env=disk.env())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step-000008'}" in resumed.stdout
    assert {name: contents(checkpoints / name) for name in earlier} == earlier, "earlier checkpoints changed"
    steps = sorted(p.name for p in checkpoints.iterdir())
    assert steps == ["step-000005", "step-000008", "step-000010", "step-000015", "step-000016"]
    for name in steps:
        verify(checkpoints / name)
    assert_bitwise_equal(weights(run_dir), uninterrupted(nproc))



def test_a_read_only_file_system_at_the_first_save_exits_4_saying_no_checkpoint_survives(tmp_path):
    # The write-layer hook the full-disk test falls back on, here with EROFS (chmod does not stop root).
    run_dir = tmp_path / "run"
    failed = run(run_dir, 1, env=subprocess_env(HARNESS_TEST_SAVE_ERROR="EROFS,save=1,file=3"))
    assert_every_rank_exited(failed, 1, 4)
    assert (f"harness: checkpoint save failed: {run_dir / 'checkpoints' / 'step-000005'}: could not be saved: "
            "[Errno 30] Read-only file system (EROFS) (rank 0, writing model.safetensors). It needs ") in failed.stderr
    assert ("there is no intact checkpoint (none: a rerun starts over). Make "
            f"{run_dir / 'checkpoints'} writable") in failed.stderr
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_a_full_disk_at_the_end_files_exits_4_on_every_rank_and_the_rerun_writes_them(tmp_path):
    """final/, metrics.json and ranks/ come after the last checkpoint: a write refused there (rank 1
    only, so the other rank must learn of it) is one message, no traceback, and the rerun resumes
    at the end and writes them."""
    run_dir = tmp_path / "run"
    failed = run(run_dir, 2, env=subprocess_env(HARNESS_TEST_END_FILES_ERROR="ENOSPC,rank=1"))
    assert_every_rank_exited(failed, 2, 4)
    assert "writing the run's end files failed" in failed.stderr and "ENOSPC" in failed.stderr
    assert "nothing is lost" in failed.stderr and "run the same command again" in failed.stderr
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.rglob(".*.tmp"))
    newest = max((run_dir / "checkpoints").glob("step-*"))
    again = run(run_dir, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {newest}" in again.stdout
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "metrics.json").is_file()
