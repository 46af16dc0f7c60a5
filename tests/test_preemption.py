"""Preemption without SLURM: real signals to real launchers; a saved checkpoint, exit 75, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.checkpoint import verify
from tests.conftest import (ROOT, assert_bitwise_equal, harness_command, launcher_exit_code, read_json, run_harness,
                            subprocess_env)

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# Long enough to be signalled mid-run on a loaded 2-core machine: 300 epochs x 15 steps.
LONG = ["train.epochs=300", "checkpoint.every_epochs=100", "train.log_every_steps=50"]


def start(run_dir: Path, launcher: str, nproc: int, extra=()) -> subprocess.Popen:
    cmd = harness_command(RECIPE, [f"run.output_dir={run_dir}", *LONG, *extra], nproc, launcher)
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until TensorBoard has step points, i.e. the ranks are inside the training loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        events = list((run_dir / "tb").glob("events.*")) if (run_dir / "tb").is_dir() else []
        if events and events[0].stat().st_size > 2000:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def worker_pids(launcher_pid: int) -> list[int]:
    """The harness processes under a launcher (children that run `-m harness train`)."""
    out = subprocess.run(["pgrep", "-f", "-P", str(launcher_pid), "harness train"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, output


def test_one_process_exits_75_after_saving_on_sigterm_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "python", 1)
    wait_for_training(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc)
    assert code == 75, output[-2000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == 75 and marker["seconds_from_signal_to_saved"] < 10
    checkpoint = Path(marker["checkpoint"])
    assert verify(checkpoint)["step"] == marker["step"] and 0 < marker["step"] < 4500
    # Resume, shortened to the step after the preemption + 30 so the test stays quick.
    stop_at = marker["step"] + 30
    run_harness(RECIPE, [f"run.output_dir={run_dir}", *LONG, f"train.max_steps={stop_at}"], nproc=1,
                launcher="python")
    assert not (run_dir / "PREEMPTED.json").exists(), "a resumed run clears the marker"
    straight = tmp_path / "straight"
    run_harness(RECIPE, [f"run.output_dir={straight}", *LONG, f"train.max_steps={stop_at}"], nproc=1,
                launcher="python")
    a, b = load_file(run_dir / "final/model.safetensors"), load_file(straight / "final/model.safetensors")
    assert_bitwise_equal(a, b)


def test_a_signal_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "accelerate", 2, ["preemption.signals=[SIGUSR2]"])
    wait_for_training(run_dir, proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGUSR2)  # only one rank hears it
    code, output = finish(proc)
    # The launcher reports its workers' non-zero exit as its own failure; its summary has each rank's.
    assert code == launcher_exit_code("accelerate", 75) and output.count("exitcode  : 75 ") == 2, output[-3000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    assert marker["exit_code"] == 75
    trainer = json.loads((Path(marker["checkpoint"]) / "trainer.json").read_text())
    assert trainer["reason"] == "preempted" and trainer["world_size"] == 2
    assert sorted(p.name for p in Path(marker["checkpoint"]).glob("rng-rank-*.json")) == \
        ["rng-rank-0.json", "rng-rank-1.json"]
    verify(Path(marker["checkpoint"]))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_launcher_forwards_sigterm_and_the_ranks_save_in_time(tmp_path, launcher):
    run_dir = tmp_path / "run"
    proc = start(run_dir, launcher, 2)
    wait_for_training(run_dir, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher (torchrun's agent), which forwards it to the workers
    code, output = finish(proc)
    assert code == launcher_exit_code(launcher, 75, signal.SIGTERM), output[-3000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == 75 and marker["seconds_from_signal_to_saved"] < 30
    verify(Path(marker["checkpoint"]))


def test_a_second_signal_while_saving_does_not_corrupt_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "python", 1)
    wait_for_training(run_dir, proc)
    # Keep signalling through the save and until the process has exited.
    for _ in range(400):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.002)
    code, output = finish(proc)
    assert code == 75, output[-2000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    manifest = verify(Path(marker["checkpoint"]))
    assert manifest["step"] == marker["step"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
