"""What a run says about itself: a run stopped by train.max_steps validates its final weights and
says where it stopped; the resume line counts epochs from 1 like the epoch lines; a finished run
relaunched (also on another number of ranks) says it had finished; plot-lr takes the run folder
or its tb/ alike.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes" / "breast_cancer_mlp.yaml"  # 455 training rows, batch 32: 15 steps an epoch
STOP = ["train.epochs=3", "train.max_steps=20", "checkpoint.every_steps=1000"]


def train(run_dir, *overrides, nproc=1):
    proc = run_harness(RECIPE, [f"run.output_dir={run_dir}", *overrides], nproc=nproc,
                       launcher="python" if nproc == 1 else "accelerate")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    return run_dir, train(run_dir, *STOP)


def test_a_run_stopped_by_max_steps_validates_its_final_weights(stopped, tmp_path):
    run_dir, out = stopped
    done = next(line for line in out.splitlines() if "done:" in line)
    assert "done: 1 epochs, 20 steps (train.max_steps: 160 samples into epoch 2), val_loss=" in done
    assert ", |" not in done and "test_accuracy=" in done
    # Each save is one line: the folder, why, its size over all ranks' files, how long it took.
    saves = [line for line in out.splitlines() if "] checkpoint " in line]
    assert len(saves) == 2, saves
    assert re.search(r"checkpoint \S+step-000015 \(epoch_end\): \d+\.\d kB, saved synchronously in \d+\.\d\d s$", saves[0])
    assert re.search(r"checkpoint \S+step-000020 \(max_steps\): \d+\.\d kB, saved synchronously in", saves[1])
    # The same weights validated by train.val_every_steps at step 20, as a history record.
    validated = tmp_path / "validated"
    train(validated, *STOP, "train.val_every_steps=20")
    summary, reference = read_json(run_dir / "metrics.json"), read_json(validated / "metrics.json")
    assert summary["val_loss"] == reference["val_loss"] and summary["val_accuracy"] == reference["val_accuracy"]
    # Not the first epoch's validation, the last in the history; and the history stays as saved.
    history = read_json(run_dir / "checkpoints" / "step-000020" / "trainer.json")["state"]["history"]
    assert len(history) == 1 and history[0]["val_loss"] != summary["val_loss"]


def test_a_periodic_save_in_the_background_is_one_line_too(tmp_path):
    out = train(tmp_path / "run", "train.epochs=1", "checkpoint.every_steps=10", "checkpoint.every_epochs=null",
                "checkpoint.async_save=true")
    saves = [line for line in out.splitlines() if "] checkpoint " in line]
    assert len(saves) == 2, saves  # step 10, and the run's end at step 15
    for line, step, reason in zip(saves, ("000010", "000015"), ("every_steps", "epoch_end")):
        assert re.search(rf"checkpoint \S+step-{step} \({reason}\): \d+\.\d kB, snapshot taken, writing in the "
                         r"background, in \d+\.\d\d s$", line), line


def test_the_resume_line_counts_epochs_from_one_and_a_finished_run_says_so(stopped, tmp_path):
    run_dir, _ = stopped
    again = train(run_dir, *STOP)
    assert re.search(r"resumed from \S+step-000020: step 20, the run had already finished \(train.max_steps 20 "
                     r"reached\): nothing left to train", again), again[-2000:]
    extended = train(run_dir, "train.epochs=3", "train.max_steps=40", "checkpoint.every_steps=1000")
    assert "resumed from" in extended and "epoch 2 of 3, step 20, 160 samples into the epoch" in extended
    assert "epoch 2/3 step 30" in extended  # the epoch line of the same epoch


def test_a_finished_run_relaunched_on_two_ranks_says_it_finished_not_that_its_epoch_is_resplit(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.epochs=1")
    out = train(run_dir, "train.epochs=1", nproc=2)
    assert "the run had already finished (all 1 epochs done)" in out
    assert "re-split" not in out and "done: 1 epochs, 15 steps" in out


def test_plot_lr_takes_the_run_folder_or_its_tb_folder(stopped, tmp_path):
    run_dir, _ = stopped
    for given in (run_dir, run_dir / "tb"):
        out = tmp_path / f"{given.name}.png"
        proc = subprocess.run([sys.executable, "-m", "harness", "plot-lr", str(given), "--out", str(out)], cwd=ROOT,
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 1000 and "wrote " in proc.stdout and "lr/default up to step " in proc.stdout
