"""Checkpoints written by earlier versions of the harness still resume, exactly.

Every comparison is between things made on this machine in this test: the old files were written
on another CPU with other library versions, so a run here cannot match their numbers bit for bit
(see the README on when bitwise holds). What must hold anywhere: the state restored from the old
files is exactly what they hold, and training on from it is bitwise what training on from the
same state saved by today's code gives.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata

from safetensors.torch import load_file

from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
OLD = ROOT / "tests/data/checkpoint-main-26f75aa/step-000020"
SETTINGS = ["train.epochs=3", "checkpoint.every_steps=10"]


def metadata_version(name: str) -> str:
    if name == "python":
        return platform.python_version()
    import torch  # its __version__ carries the local label (+cpu) that the checkpoint records

    return torch.__version__ if name == "torch" else metadata.version(name)


def test_a_checkpoint_written_before_components_restores_its_state_and_trains_on_as_todays_save_of_it(tmp_path):
    old_run, new_run = tmp_path / "old", tmp_path / "new"
    shutil.copytree(OLD, old_run / "checkpoints" / OLD.name)
    worker = subprocess.run([sys.executable, str(ROOT / "tests/old_checkpoint_worker.py"), str(old_run), str(new_run),
                             *SETTINGS], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-4000:]
    report = json.loads(worker.stdout.strip().splitlines()[-1])
    # Weights, optimizer moments and groups, schedule, counters and every RNG as the old files hold them.
    assert report["mismatches"] == [] and report["step"] == 20, report
    today = new_run / "checkpoints" / OLD.name
    assert report["saved"] == str(today)
    assert_bitwise_equal(load_file(today / "model.safetensors"), load_file(OLD / "model.safetensors"))
    assert_bitwise_equal(load_file(today / "optimizer.safetensors"), load_file(OLD / "optimizer.safetensors"))
    assert read_json(today / "trainer.json")["state"]["samples_in_epoch"] == 160

    outputs = {}
    for run in (old_run, new_run):
        proc = run_harness(RECIPE, [f"run.output_dir={run}", *SETTINGS], nproc=1, launcher="python")
        outputs[run] = proc.stdout + proc.stderr
        assert "resumed from" in outputs[run] and "step 20" in outputs[run]
    # The old files name the versions they were written with; where any differs from this
    # environment, the resume says in one line that it cannot be bitwise. Today's save: no warning.
    saved = read_json(OLD / "trainer.json")["versions"]
    differ = [k for k in ("torch", "accelerate", "python") if saved[k] != metadata_version(k)]
    warning = "no longer bitwise equal to an uninterrupted run"
    assert (outputs[old_run].count(warning) == 1) == bool(differ), (differ, outputs[old_run][-3000:])
    for key in differ:
        assert f"{key} {saved[key]} -> " in outputs[old_run]
    assert warning not in outputs[new_run]
    assert_bitwise_equal(weights(old_run), weights(new_run))
    assert read_json(old_run / "metrics.json") == read_json(new_run / "metrics.json")
    assert read_json(old_run / "metrics.json")["steps"] == 45
