"""One run per run folder: a second run on a live run's folder is refused at once (exit 2, naming the
holder); a killed run never leaves a lock behind; what a crashed save left is cleaned at the next start."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness.checkpoint import verify
from harness.run_lock import LOCK_FILE, RunFolderInUse, lock_run_folder
from tests.conftest import ROOT, OneProcess, harness_command, read_json, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 8 steps per epoch, 2 epochs; checkpoints at steps 5, 8, 10, 15 and 16.
BASE = ["data.batch_size=64", "train.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep_last=20"]
HARNESS_FRAME = re.compile(r'File "[^"]*/harness/\w+\.py"')


def command(run_dir: Path, nproc: int = 1) -> list[str]:
    launcher = "python" if nproc == 1 else "accelerate"
    return harness_command(RECIPE, [f"run.output_dir={run_dir}", *BASE], nproc, launcher)


def run(run_dir: Path, nproc: int = 1, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, nproc), cwd=ROOT, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and mtime: any write shows."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def held():
    """Locks this test process takes, released afterwards (the process outlives the test)."""
    locks = []
    yield locks
    for lock in locks:
        lock.release()


def test_a_second_run_on_a_live_runs_folder_exits_2_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(run_dir), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / LOCK_FILE).is_file() or f'"pid": {first.pid}' not in (run_dir / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not take the lock"
            time.sleep(0.01)
        # Stopped, it still holds its lock and writes nothing: any change in the folder is the second's.
        first.send_signal(signal.SIGSTOP)
        before = listing(run_dir)
        started = time.monotonic()
        second = run(run_dir)
        seconds = time.monotonic() - started
        assert listing(run_dir) == before, "the refused run wrote something"
    finally:
        first.send_signal(signal.SIGCONT)
    output, _ = first.communicate(timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    holder = read_json(run_dir / LOCK_FILE)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    assert (f"harness: run folder in use: {run_dir}: in use by another run: pid {first.pid} on host "
            f"{socket.gethostname()}, running since {holder['since']} (lock file {run_dir / LOCK_FILE}).") \
        in second.stderr
    assert f"`kill {first.pid}` on {socket.gethostname()}" in second.stderr and "run.output_dir" in second.stderr
    assert "Traceback" not in second.stderr and "world size" not in second.stdout  # refused before building
    print(f"\nthe refused run exited 2 after {seconds:.1f} s (process start included)")
    assert seconds < 30
    assert first.returncode == 0, output[-3000:]
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-000005", "step-000008", "step-000010", "step-000015", "step-000016"]
    for step in steps:
        verify(run_dir / "checkpoints" / step)


def test_a_sigkilled_run_leaves_no_lock_and_the_next_run_cleans_its_partial_save_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    # SIGKILL after the 4th file of the 2nd save (step 8): a partial temporary folder stays.
    killed = run(run_dir, env=subprocess_env(HARNESS_TEST_KILL_AFTER_FILES="2:4"))
    assert killed.returncode == -signal.SIGKILL
    partial = [p.name for p in (run_dir / "checkpoints").glob(".tmp-*")]
    assert len(partial) == 1 and re.fullmatch(r"\.tmp-step-000008-[0-9a-f]{8}", partial[0]), partial
    stale_pid = read_json(run_dir / LOCK_FILE)["pid"]
    resumed = run(run_dir)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"removed 1 interrupted save(s) an earlier run left: {partial[0]}" in resumed.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000005'}" in resumed.stdout
    assert read_json(run_dir / LOCK_FILE)["pid"] not in (stale_pid, None)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_both_ranks_of_a_refused_two_rank_run_exit_2(tmp_path, held):
    run_dir = tmp_path / "run"
    held.append(lock_run_folder(run_dir, OneProcess()))  # this test process holds the folder
    before = listing(run_dir)
    proc = run(run_dir, nproc=2)
    assert proc.returncode != 0  # accelerate launch reports its workers' failure as its own
    assert f"in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert f"{run_dir}: in use by another run (rank 0 names it); nothing was written" in proc.stderr
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]  # the launcher's summary: both ranks
    assert not HARNESS_FRAME.search(proc.stderr), proc.stderr[-3000:]
    assert listing(run_dir) == before


def test_locking_again_in_the_same_process_reuses_the_lock(tmp_path, held):
    first = lock_run_folder(tmp_path / "run", OneProcess())
    held.append(first)
    assert lock_run_folder(tmp_path / "run", OneProcess()) is first and first.held
    assert read_json(tmp_path / "run" / LOCK_FILE)["pid"] == os.getpid()


def test_a_lock_held_elsewhere_is_refused_with_the_holders_details(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text('{"host": "node7", "pid": 4242, "since": "2025-01-02T03:04:05+00:00"}\n')
    other = os.open(run_dir / LOCK_FILE, os.O_RDONLY)  # another open file: flock conflicts as across processes
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunFolderInUse, match=r"in use by another run: pid 4242 on host node7, running since "
                                                 r"2025-01-02T03:04:05\+00:00 .*Wait for it to finish, stop it "
                                                 r"\(`kill 4242` on node7; .*Nothing was written\.$"):
            lock_run_folder(run_dir, OneProcess())
        assert "node7" in (run_dir / LOCK_FILE).read_text(), "the holder's details are left in place"
    finally:
        os.close(other)


def test_a_stale_partial_save_is_removed_once_the_lock_is_held_and_checkpoints_are_kept(tmp_path, held):
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in (".tmp-step-000003-0badcafe", ".tmp-step-000004", "step-000002"):
        (checkpoints / name).mkdir(parents=True)
    held.append(lock_run_folder(tmp_path / "run", OneProcess()))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]


def test_a_file_system_without_locks_warns_loudly_and_goes_on_without_cleaning_up(tmp_path, monkeypatch, capsys):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    (tmp_path / "run" / "checkpoints" / ".tmp-step-000003-0badcafe").mkdir(parents=True)
    lock = lock_run_folder(tmp_path / "run", OneProcess())
    try:
        assert not lock.held
        err = capsys.readouterr().err
        assert "the file system refuses file locks (No locks available)" in err and "UNLOCKED" in err
        assert "-o flock" in err
        # Without the lock it may be a live run's save in progress: left alone.
        assert (tmp_path / "run" / "checkpoints" / ".tmp-step-000003-0badcafe").is_dir()
    finally:
        lock.release()


def test_a_run_folder_that_cannot_hold_a_lock_file_is_a_config_error(tmp_path):
    from harness.config import ConfigError

    (tmp_path / "run").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match=r"run\.output_dir: cannot create the run folder's lock file .*nothing "
                                          r"was written"):
        lock_run_folder(tmp_path / "run", OneProcess())

