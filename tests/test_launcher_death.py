"""Workers die with their launcher: a SIGKILLed torchrun / accelerate launch leaves no rank training
on alone. The ranks notice, save a checkpoint at the next step, exit; the relaunch resumes bitwise."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.checkpoint import verify
from harness.distributed import is_launcher_command, lost_rank_error
from harness.verify import proc_stats
from tests.conftest import ROOT, assert_bitwise_equal, harness_command, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 15 steps an epoch on 2 ranks; a mid-epoch checkpoint every 30 steps; the run ends at step 300.
RUN = ["train.max_steps=300", "checkpoint.every_steps=30", "train.log_every_steps=10"]
# Each checkpoint file takes 20 ms longer to write (harness/faults.py), so the run is still going
# when the test acts on its first checkpoint; the weights are the same.
SLOW_SAVES = {"HARNESS_TEST_SAVE_FILE_DELAY_S": "0.02"}
# Any frame of our own package in the output means a rank printed a traceback.
HARNESS_FRAME = re.compile(r'File "[^"]*/harness/\w+\.py"')

_references: dict = {}


def start(run_dir: Path, launcher: str, nproc: int, env: dict = SLOW_SAVES) -> subprocess.Popen:
    """The run in its own session, as a terminal would start it; output to <run_dir>.log."""
    cmd = harness_command(RECIPE, [f"run.output_dir={run_dir}", *RUN], nproc, launcher)
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=hear_ctrl_c)


def hear_ctrl_c() -> None:
    """In the child: Ctrl-C's default action, as in a terminal. A suite started in the background
    (`pytest &`) passes SIGINT ignored down to its children, and a run that inherits that stays deaf."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.log").read_text()


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Until a checkpoint at ``step`` or later is committed (older ones are pruned: keep_last)."""
    deadline = time.monotonic() + timeout
    while not any(int(f.name.split("-")[1]) >= step for f in (run_dir / "checkpoints").glob("step-*")):
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}:\n{output(run_dir)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint at step {step} in time:\n{output(run_dir)[-3000:]}")
        time.sleep(0.01)


def workers_of(run_dir: Path, launcher_pid: int) -> list[int]:
    """Live processes other than the launcher whose command line names the run folder."""
    found = []
    for pid, state, _, _ in proc_stats():
        if pid == launcher_pid or state == "Z":
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


def checkpoints(run_dir: Path) -> dict[int, dict]:
    """Committed checkpoints: step -> trainer.json."""
    return {int(folder.name.split("-")[1]): read_json(folder / "trainer.json")
            for folder in (run_dir / "checkpoints").glob("step-*")}


def reference_weights(tmp_path_factory, nproc: int) -> dict:
    """Final weights of the uninterrupted run on ``nproc`` ranks (computed once per session)."""
    if nproc not in _references:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        run_harness(RECIPE, [f"run.output_dir={run_dir}", *RUN], nproc=nproc, launcher="accelerate" if nproc > 1
                    else "python")
        _references[nproc] = load_file(run_dir / "final/model.safetensors")
    return _references[nproc]


def assert_same_weights(run_dir: Path, reference: dict) -> None:
    assert_bitwise_equal(load_file(run_dir / "final/model.safetensors"), reference)


def started_on_two_ranks(run_dir: Path, launcher: str) -> tuple[subprocess.Popen, list[int]]:
    """The run on 2 ranks, past its step-30 checkpoint: (the launcher, its two workers' pids)."""
    proc = start(run_dir, launcher, 2)
    wait_for_checkpoint(run_dir, proc, 30)
    workers = workers_of(run_dir, proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_killing_the_launcher_makes_every_rank_save_and_exit_and_the_relaunch_resumes_bitwise(
        tmp_path, tmp_path_factory, launcher):
    run_dir = tmp_path / "run"
    proc, workers = started_on_two_ranks(run_dir, launcher)
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only
    proc.wait()
    seconds = wait_gone(workers, killed)
    print(f"\n{launcher}: launcher SIGKILLed -> all workers gone in {seconds:.2f} s")
    # ~2-3 s here, ~5 s under heavy load; the bound catches workers that train on (the checks below
    # prove they stopped early, at a step of their own).
    assert seconds < 20, f"workers took {seconds:.1f} s to exit"

    text = output(run_dir)
    saved = checkpoints(run_dir)
    last = max(saved)
    assert saved[last]["reason"] == "preempted" and saved[last]["world_size"] == 2
    assert all(step < last for step, trainer in saved.items() if trainer["reason"] != "preempted")
    folder = run_dir / "checkpoints" / f"step-{last:06d}"
    assert verify(folder)["step"] == last < 300
    assert (folder / "MANIFEST.json").stat().st_mtime >= killed_wall, "committed after the kill"
    assert f"launcher (pid {proc.pid}) exited: saving a checkpoint at step {last} and exiting" in text
    assert not (run_dir / "PREEMPTED.json").exists(), "a launcher's death is not a request to requeue"
    assert not HARNESS_FRAME.search(text), text[-3000:]

    resumed = run_harness(RECIPE, [f"run.output_dir={run_dir}", *RUN], nproc=2, launcher=launcher)
    assert f"resumed from {folder}" in resumed.stdout
    assert_same_weights(run_dir, reference_weights(tmp_path_factory, 2))


def test_a_rank_whose_peer_died_with_the_launcher_exits_at_once_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc, workers = started_on_two_ranks(run_dir, "accelerate")
    killed = time.monotonic()
    for pid in (max(workers), proc.pid):  # one rank (the later-started), then the launcher
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    seconds = wait_gone(workers, killed)
    print(f"\nrank and launcher SIGKILLed -> the other rank gone in {seconds:.2f} s")
    assert seconds < 20
    text = output(run_dir)
    assert "lost contact with the other ranks" in text or "saving a checkpoint at step" in text, text[-3000:]
    assert "Traceback" not in text and not HARNESS_FRAME.search(text), text[-3000:]


def test_a_rank_whose_peer_hangs_gives_up_30_s_after_the_launcher_died_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    proc, workers = started_on_two_ranks(run_dir, "accelerate")
    frozen, waiting = max(workers), min(workers)
    os.kill(frozen, signal.SIGSTOP)  # hung: alive, but never reaches the next collective
    committed = set(checkpoints(run_dir))
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        seconds = wait_gone([waiting], killed, timeout=90)
    finally:
        os.kill(frozen, signal.SIGKILL)
    print(f"\nlauncher SIGKILLed, peer frozen -> the other rank gone in {seconds:.1f} s")
    assert 30 <= seconds < 60, seconds
    text = output(run_dir)
    assert (f"harness: the launcher (pid {proc.pid}) exited 30 s ago and this rank could not stop at a step boundary "
            "(another rank is gone or hung): exiting without a checkpoint") in text, text[-3000:]
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
