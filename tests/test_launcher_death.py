"""Workers die with their launcher: a SIGKILLed torchrun / accelerate launch leaves no rank training
on alone. The ranks notice, save a checkpoint at the next step, exit; the relaunch resumes bitwise."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.checkpoint import verify
from harness.distributed import is_launcher_command, lost_rank_error
from harness.verify import proc_stats
from tests.conftest import (BREAST_CANCER, CHECKPOINTED_RUN, HARNESS_FRAME, assert_same_weights, checkpoints, output,
                            read_json, reference_weights, run_harness, start_logged, wait_for_checkpoint)


def workers_of(run_dir: Path, *not_workers: int) -> list[int]:
    """Live processes whose command line names the run folder, other than ``not_workers`` (the
    launcher, the reaper)."""
    found = []
    for pid, state, _, _ in proc_stats():
        if pid in not_workers or state == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"run.output_dir={run_dir}\0" in cmdline:
            found.append(pid)
    return found


def alive(pids: list[int]) -> list[int]:
    live = {pid for pid, state, _, _ in proc_stats() if state != "Z"}
    return [pid for pid in pids if pid in live]


def wait_gone(pids: list[int], since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until none of ``pids`` is alive; SIGKILLs them and fails after ``timeout``."""
    while alive(pids):
        if time.monotonic() - since > timeout:
            for pid in alive(pids):
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"workers {pids} still alive {timeout:.0f} s after their launcher died")
        time.sleep(0.01)
    return time.monotonic() - since


# Runs the command in its arguments as a child subreaper (prctl PR_SET_CHILD_SUBREAPER): the ranks
# a killed launcher leaves behind become its children instead of init's, so their exit codes can be
# read. Writes the launcher's pid to <argv[1]>.launcher at once and, when every process below it is
# gone, {pid: exit code (-N: killed by signal N)} to <argv[1]>.
REAPER = r"""
import ctypes, json, os, subprocess, sys
from pathlib import Path
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
result = Path(sys.argv[1])
launcher = subprocess.Popen(sys.argv[2:])
Path(f"{result}.launcher").write_text(str(launcher.pid))
codes = {}
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    codes[pid] = os.waitstatus_to_exitcode(status)
result.write_text(json.dumps(codes))
"""


@dataclass
class TwoRanks:
    reaper: subprocess.Popen
    launcher: int
    workers: list[int]  # [rank 0's pid, rank 1's pid]
    result: Path

    def exit_codes(self, timeout: float = 60) -> dict[int, int]:
        """pid -> exit code of the launcher and every rank, once all are gone."""
        self.reaper.wait(timeout=timeout)
        return {int(pid): code for pid, code in read_json(self.result).items()}


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(entry for entry in environ if entry.startswith(b"RANK="))[5:])


def started_on_two_ranks(run_dir: Path, launcher: str) -> TwoRanks:
    """The run on 2 ranks under REAPER, past its step-30 checkpoint."""
    result = Path(f"{run_dir}.exits.json")
    proc = start_logged(run_dir, launcher, 2, wrap=[sys.executable, "-c", REAPER, str(result)])
    wait_for_checkpoint(run_dir, proc, 30)
    launcher_pid = int(Path(f"{result}.launcher").read_text())
    workers = sorted(workers_of(run_dir, launcher_pid, proc.pid), key=rank_of)
    assert len(workers) == 2, workers
    return TwoRanks(proc, launcher_pid, workers, result)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_killing_the_launcher_makes_every_rank_save_and_exit_75_and_the_relaunch_resumes_bitwise(
        tmp_path, tmp_path_factory, launcher):
    run_dir = tmp_path / "run"
    run = started_on_two_ranks(run_dir, launcher)
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(run.launcher, signal.SIGKILL)  # the launcher only
    seconds = wait_gone(run.workers, killed)
    print(f"\n{launcher}: launcher SIGKILLed -> all workers gone in {seconds:.2f} s")
    # ~2-3 s here, ~5 s under heavy load; the bound catches workers that train on (the checks below
    # prove they stopped early, at a step of their own).
    assert seconds < 20, f"workers took {seconds:.1f} s to exit"
    codes = run.exit_codes()
    text = output(run_dir)
    # README, Exit codes: 75 on every rank, also when the ranks stopped because their launcher died.
    assert [codes[pid] for pid in run.workers] == [75, 75], (codes, text[-3000:])
    assert codes[run.launcher] == -signal.SIGKILL

    saved = checkpoints(run_dir)
    last = max(saved)
    assert saved[last]["reason"] == "preempted" and saved[last]["world_size"] == 2
    assert all(step < last for step, trainer in saved.items() if trainer["reason"] != "preempted")
    folder = run_dir / "checkpoints" / f"step-{last:06d}"
    assert verify(folder)["step"] == last < 300
    assert (folder / "MANIFEST.json").stat().st_mtime >= killed_wall, "committed after the kill"
    # What happened, said once (by the main rank; the other stays quiet), and no traceback.
    assert text.count(f"launcher (pid {run.launcher}) exited: saving a checkpoint at step {last} and exiting") == 1
    assert text.count(f"saved {folder}; exiting (run the same command again to resume)") == 1, text[-3000:]
    assert text.count("launcher (pid") == 1 and "lost contact" not in text, text[-3000:]
    assert "Traceback" not in text and not HARNESS_FRAME.search(text), text[-3000:]
    assert not (run_dir / "PREEMPTED.json").exists(), "a launcher's death is not a request to requeue"

    resumed = run_harness(BREAST_CANCER, [f"run.output_dir={run_dir}", *CHECKPOINTED_RUN], nproc=2, launcher=launcher)
    assert f"resumed from {folder}" in resumed.stdout
    assert_same_weights(run_dir, reference_weights(tmp_path_factory, 2))


def test_a_rank_whose_peer_died_with_the_launcher_exits_at_once_with_one_line(tmp_path):
    """Rank 1 SIGKILLed, then the launcher. One outcome only: rank 0 cannot save, since its stop
    flag (set when it sees the launcher gone, after rank 1's death) reaches the other rank only
    through an all-reduce that rank 1 never joins; its next collective (the gradient all-reduce,
    the stop agreement or a save's) fails on the closed connection at once, and it exits 1 with
    the one line that names the lost contact. The 30 s give-up (the next test) would take 30 s."""
    run_dir = tmp_path / "run"
    run = started_on_two_ranks(run_dir, "accelerate")
    committed = set(checkpoints(run_dir))
    survivor, victim = run.workers
    killed = time.monotonic()
    for pid in (victim, run.launcher):
        os.kill(pid, signal.SIGKILL)
    seconds = wait_gone([survivor], killed)
    print(f"\nrank and launcher SIGKILLed -> the other rank gone in {seconds:.2f} s")
    assert seconds < 20
    codes = run.exit_codes()
    text = output(run_dir)
    assert codes[survivor] == 1 and codes[victim] == codes[run.launcher] == -signal.SIGKILL, (codes, text[-3000:])
    line = re.compile(r"^harness: rank 0 lost contact with the other ranks \((.+)\); the output of the rank that "
                      r"stopped first says why\. Run the same command again to resume from the newest complete "
                      r"checkpoint$", re.MULTILINE)
    assert len(line.findall(text)) == 1 and text.count("lost contact") == 1, text[-3000:]
    assert "saving a checkpoint" not in text and "exited 30 s ago" not in text, text[-3000:]
    assert "Traceback" not in text and not HARNESS_FRAME.search(text), text[-3000:]
    # Nothing saved on the way out; a periodic save that rank 1 finished before its death may commit.
    saved = checkpoints(run_dir)
    assert committed <= set(saved) and all(trainer["reason"] != "preempted" for trainer in saved.values())
    assert all(verify(run_dir / "checkpoints" / f"step-{step:06d}")["step"] == step for step in saved)
    assert not (run_dir / "PREEMPTED.json").exists()


def test_a_rank_whose_peer_hangs_gives_up_30_s_after_the_launcher_died_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    run = started_on_two_ranks(run_dir, "accelerate")
    waiting, frozen = run.workers
    os.kill(frozen, signal.SIGSTOP)  # hung: alive, but never reaches the next collective
    committed = set(checkpoints(run_dir))
    killed = time.monotonic()
    os.kill(run.launcher, signal.SIGKILL)
    try:
        seconds = wait_gone([waiting], killed, timeout=90)
    finally:
        os.kill(frozen, signal.SIGKILL)
    print(f"\nlauncher SIGKILLed, peer frozen -> the other rank gone in {seconds:.1f} s")
    assert 30 <= seconds < 60, seconds
    codes = run.exit_codes()
    text = output(run_dir)
    assert codes[waiting] == 1, (codes, text[-3000:])
    line = (f"harness: the launcher (pid {run.launcher}) exited 30 s ago and this rank could not stop at a step "
            "boundary (another rank is gone or hung): exiting without a checkpoint")
    assert text.count(line) == 1 and "Traceback" not in text and not HARNESS_FRAME.search(text), text[-3000:]
    assert set(checkpoints(run_dir)) == committed, "nothing new committed, nothing removed"
    assert all(verify(run_dir / "checkpoints" / f"step-{step:06d}") for step in committed)


@pytest.mark.parametrize("argv, is_launcher", [
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--config_file", "x.yaml", "-m", "harness"], True),
    (["/venv/bin/python3.11", "-u", "/venv/bin/torchrun", "--standalone", "-m", "harness"], True),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "harness"], True),
    (["/usr/bin/python3", "-X", "faulthandler", "-m", "accelerate.commands.launch", "-m", "harness"], True),
    (["torchrun", "--nproc-per-node=2", "train.py"], True),
    (["bash"], False),
    (["nohup", "python", "-m", "harness", "train", "recipes/breast_cancer_mlp.yaml"], False),
    (["/bin/bash", "/home/me/accelerate-runs/torchrun.sh"], False),
    (["python", "-m", "harness", "train", "recipes/accelerate/cpu_2proc.yaml"], False),
    (["/usr/sbin/slurmstepd"], False),
])
def test_only_torchrun_and_accelerate_launch_count_as_a_launcher(argv, is_launcher):
    assert is_launcher_command(argv) is is_launcher


def test_a_collective_failing_on_a_lost_peer_is_reported_in_one_line():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:42186: Connection reset by peer. This is typically caused by a remote "
                        "worker hanging or bugs in the application.")
    lost = lost_rank_error(gloo)
    assert lost is not None and "(Read error [127.0.0.1]:42186: Connection reset by peer)" in str(lost)
    assert "\n" not in str(lost) and "pair.cc" not in str(lost)
    assert lost_rank_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_rank_error(KeyboardInterrupt()) is None
