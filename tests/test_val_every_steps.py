"""train.val_every_steps: validations inside epochs feed ReduceLROnPlateau once each, identically on
every rank, and a preemption inside one resumes by redoing it."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 455 samples, batch 64 -> 8 steps per epoch; 3 epochs. Validation every 3 steps inside an epoch
# (steps 3, 6, 9, 12, 15, 18, 21) plus each epoch end (8, 16, 24): 10 validations. 8 validation
# batches of 16, a preemption check every 2 of them.
SETTINGS = ["data.batch_size=64", "train.epochs=3", "train.val_every_steps=3", "data.val_batch_size=16",
            "preemption.check_every_val_batches=2", "schedule.name=plateau", "schedule.patience=0",
            "schedule.factor=0.5", "schedule.threshold=0.05", "optim.lr=0.01", "checkpoint.every_steps=4"]


def run(run_dir, nproc, env=None, check=True):
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *SETTINGS], nproc=nproc, env=env, check=check,
                       launcher="python" if nproc == 1 else "accelerate")


# 2 ranks only: everything here holds on one rank too, and "equal on every rank" needs two.
@pytest.mark.parametrize("nproc", [2])
def test_each_validation_steps_plateau_once_on_every_rank_and_a_preemption_inside_one_redoes_it(tmp_path, nproc):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run(straight, nproc)
    reports = [read_json(straight / "ranks" / f"rank-{r}.json") for r in range(nproc)]
    assert all(r["scheduler_last_epoch"] == 10 for r in reports), "one scheduler step per validation"
    assert all(r["lrs"] == reports[0]["lrs"] for r in reports)
    scalars = read_scalars(straight)
    assert [s for s, _ in scalars["val/loss"]] == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
    assert min(v for _, v in scalars["lr/default"]) < 0.01, "the plateau reduced the LR"
    # SIGTERM to rank 0 as the validation at step 9 (inside epoch 2) starts: saved at step 9, exit 75.
    proc = run(preempted, nproc, env=subprocess_env(HARNESS_TEST_SIGNAL_IN_VALIDATION_AT_STEP="9"), check=False)
    assert proc.returncode == (75 if nproc == 1 else 1)
    assert read_json(preempted / "PREEMPTED.json")["step"] == 9
    run(preempted, nproc)
    a, b = load_file(straight / "final/model.safetensors"), load_file(preempted / "final/model.safetensors")
    assert_bitwise_equal(a, b)
    resumed = read_scalars(preempted)
    assert resumed["lr/default"] == scalars["lr/default"]
    assert [s for s, _ in resumed["val/loss"]] == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24], "step 9's validation redone"
    assert resumed["val/loss"] == scalars["val/loss"]
