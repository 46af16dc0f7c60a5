"""Preemption without SLURM: real signals to real launchers; a saved checkpoint, exit 75, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.checkpoint import verify
from tests.conftest import (BREAST_CANCER, LONG_RUN, ROOT, assert_same_weights, finish, harness_command,
                            launcher_exit_code, read_json, run_harness, subprocess_env, wait_for_training)


def start(run_dir: Path, launcher: str, nproc: int, extra=()) -> subprocess.Popen:
    cmd = harness_command(BREAST_CANCER, [f"run.output_dir={run_dir}", *LONG_RUN, *extra], nproc, launcher)
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def worker_pids(launcher_pid: int) -> list[int]:
    """The harness processes under a launcher (children that run `-m harness train`)."""
    out = subprocess.run(["pgrep", "-f", "-P", str(launcher_pid), "harness train"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


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
    run_harness(BREAST_CANCER, [f"run.output_dir={run_dir}", *LONG_RUN, f"train.max_steps={stop_at}"], nproc=1,
                launcher="python")
    assert not (run_dir / "PREEMPTED.json").exists(), "a resumed run clears the marker"
    straight = tmp_path / "straight"
    run_harness(BREAST_CANCER, [f"run.output_dir={straight}", *LONG_RUN, f"train.max_steps={stop_at}"], nproc=1,
                launcher="python")
    assert_same_weights(run_dir, straight)


def test_a_signal_to_one_rank_stops_both_ranks_at_the_same_step_a_poll_later_every_check_interval_s(tmp_path):
    """Any rank asked = all stop, at the same step, one poll after the poll that carried the request.
    README: with check_every_steps auto the ranks poll about every preemption.check_interval_s
    seconds. Rank 0 proposes the next interval from its measured step time: polls at steps 1 and 2
    (no measurement yet), then every check_interval_s / step time steps, capped at 1000
    (harness/preemption.py). With 1000 s the cap applies whatever the machine's speed: polls at 1,
    2, 3, 1003, 2003, 3003..., so a signal stops the run at step 3 + a multiple of 1000 (2003, or
    1003 / 3003 if it came before step 3 / after step 1003). Were the option ignored, the default
    0.2 s (about every 100 steps here) would stop it within ~200 steps of the signal."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "accelerate", 2, ["preemption.signals=[SIGUSR2]", "preemption.check_interval_s=1000"])
    wait_for_training(run_dir, proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGUSR2)  # only one rank hears it
    code, output = finish(proc)
    # The launcher reports its workers' non-zero exit as its own failure; its summary has each rank's.
    assert code == launcher_exit_code("accelerate", 75) and output.count("exitcode  : 75 ") == 2, output[-3000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    assert marker["exit_code"] == 75 and marker["step"] in (1003, 2003, 3003, 4003), marker
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

