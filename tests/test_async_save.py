"""Background checkpoint saves (checkpoint.async_save): the same files as a synchronous save, taken
from a snapshot while training goes on, and just as safe against a crash or a preemption."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from harness.checkpoint import verify
from tests.conftest import (BREAST_CANCER, LONG_RUN, ROOT, assert_same_weights, finish, harness_command, read_json,
                            run_harness, subprocess_env, wait_for_training)

# 8 steps per epoch, 4 epochs, a checkpoint every 5 steps and at every epoch end: 10 saves.
BASE = ["data.batch_size=64", "train.epochs=4", "train.log_every_steps=3", "checkpoint.every_steps=5",
        "checkpoint.keep_last=20", "model.dropout=0.2", "schedule.name=cosine", "schedule.interval=step",
        "schedule.warmup_steps=6"]
ASYNC = "checkpoint.async_save=true"
# Each checkpoint file takes 0.15 s more to write: a save is in flight for over a second, many
# optimizer steps, so a writer that read live tensors instead of its snapshot would write other bytes.
SLOW_FILES = {"HARNESS_TEST_SAVE_FILE_DELAY_S": "0.15"}


def run(run_dir: Path, extra=(), nproc=2, env=None, check=True):
    return run_harness(BREAST_CANCER, [f"run.output_dir={run_dir}", *BASE, *extra], nproc=nproc, check=check,
                       env=env or subprocess_env(), launcher="python" if nproc == 1 else "accelerate")


def checkpoint_contents(run_dir: Path) -> dict[str, dict[str, object]]:
    """Every checkpoint's files; trainer.json without the fields that name the mode or the time."""
    out = {}
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        verify(folder)
        files = {}
        for path in sorted(folder.iterdir()):
            if path.name == "MANIFEST.json":
                continue
            if path.name == "trainer.json":
                data = json.loads(path.read_text())
                del data["saved_at"], data["config"]
                files[path.name] = data
            else:
                files[path.name] = path.read_bytes()
        out[folder.name] = files
    return out


def test_background_saves_write_exactly_the_files_a_synchronous_save_writes(tmp_path):
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    run(sync_dir)
    proc = run(async_dir, [ASYNC], env=subprocess_env(**SLOW_FILES))
    expected, got = checkpoint_contents(sync_dir), checkpoint_contents(async_dir)
    assert list(got) == list(expected) and len(expected) == 10
    for step, files in expected.items():
        assert got[step].keys() == files.keys(), step
        for name in files:
            assert got[step][name] == files[name], f"{step}/{name} differs from the synchronous save's"
    assert not list((async_dir / "checkpoints").glob(".tmp-*")) and not list(async_dir.rglob(".written-rank-*"))
    assert_same_weights(async_dir, sync_dir)
    assert "Traceback" not in proc.stderr


def test_a_sigkill_while_a_background_save_is_writing_resumes_from_the_last_committed_one(tmp_path):
    straight = tmp_path / "straight"
    run(straight, nproc=1)
    run_dir = tmp_path / "crashed"
    # The 2nd save (step 8) is killed after its 4th file, while training has gone on.
    proc = run(run_dir, [ASYNC], nproc=1, check=False,
               env=subprocess_env(HARNESS_TEST_KILL_AFTER_FILES="2:4", **SLOW_FILES))
    assert proc.returncode != 0
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000005"]
    resumed = run(run_dir, [ASYNC], nproc=1)
    assert "resumed from" in resumed.stdout and "step-000005" in resumed.stdout
    assert_same_weights(run_dir, straight)


@pytest.mark.parametrize("nproc", [2])  # 1 rank: the same code path, minus the cross-rank commit
def test_a_preemption_during_a_background_save_commits_both_and_saves_synchronously(tmp_path, nproc):
    run_dir = tmp_path / "run"
    # A checkpoint every 20 steps, each in flight for over a second: the signal most likely lands
    # during one (training waits for it before the next).
    cmd = harness_command(BREAST_CANCER, [f"run.output_dir={run_dir}", *LONG_RUN, ASYNC, "checkpoint.every_steps=20",
                                   "checkpoint.keep_last=100"], nproc, "python" if nproc == 1 else "accelerate")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**SLOW_FILES), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_training(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc)
    # One process exits 75 itself; accelerate launch reports its workers' exit as a failure (1).
    assert code == 75 if nproc == 1 else code != 0, output[-3000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    assert json.loads((Path(marker["checkpoint"]) / "trainer.json").read_text())["reason"] == "preempted"
    assert Path(marker["checkpoint"]).name == f"step-{marker['step']:06d}"
    for folder in (run_dir / "checkpoints").glob("step-*"):
        verify(folder)  # the background save in flight was finished and committed, not lost
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
