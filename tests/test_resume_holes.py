"""Decisions that change a run's future, each recorded at a step boundary or recomputed from what
is: a finished run stays finished, early stopping inside an epoch, plateau on epochs that do not
validate, a preemption inside a validation (eval-mode randomness, BatchNorm buffers on 2 ranks),
and verify-resume's own kill points. Each case failed before its fix."""

from __future__ import annotations

import textwrap

import pytest

from harness.cli import main
from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
SEED_GCN = ROOT / "recipes/seeds/seed000_gcn.yaml"


def train(run_dir, *overrides, env=None, check=True, nproc=1):
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *overrides], nproc=nproc, env=env, check=check,
                       launcher="python" if nproc == 1 else "accelerate")


# --------------------------------------------------------------------------------------------
# A finished run relaunched trains no further
# --------------------------------------------------------------------------------------------


# 455 samples, batch 32: 15 steps per epoch. Step 20 is mid-epoch 2, step 30 the end of epoch 2.
@pytest.mark.parametrize("max_steps", [20, 30])
def test_a_run_relaunched_at_its_max_steps_trains_no_further_also_after_its_end_files_failed(tmp_path, max_steps):
    settings = [f"train.max_steps={max_steps}", "checkpoint.every_steps=10"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    train(straight, *settings)
    expected = read_json(straight / "metrics.json")
    assert expected["steps"] == max_steps
    again = train(straight, *settings)  # the same command once more
    assert f"done: {expected['epochs']} epochs, {max_steps} steps" in again.stdout, again.stdout[-2000:]
    assert read_json(straight / "metrics.json") == expected
    assert max(s for s, _ in read_scalars(straight)["lr/default"]) == max_steps
    # Killed while writing the end files (exit 4: "rerun"): the rerun writes them, trains nothing.
    proc = train(failed, *settings, env=subprocess_env(HARNESS_TEST_END_FILES_ERROR="ENOSPC"), check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert not (failed / "metrics.json").exists()
    train(failed, *settings)
    assert read_json(failed / "metrics.json") == expected
    assert_bitwise_equal(weights(failed), weights(straight))


# --------------------------------------------------------------------------------------------
# Cases read off verify-resume: the straight run and a SIGKILLed-and-resumed one agree
# --------------------------------------------------------------------------------------------


def verify_resume(capsys, work, recipe, *args) -> str:
    code = main(["verify-resume", str(recipe), "--workdir", str(work), "--keep", *args])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out, out[-4000:]
    return out


EARLY_STOPPING = ["model.dropout=0.2", "train.val_every_steps=3", "checkpoint.monitor=val_accuracy",
                  "checkpoint.monitor_mode=max", "train.early_stopping_patience=2"]


def test_early_stopping_at_an_epochs_end_agrees_in_the_straight_and_the_resumed_run(tmp_path, capsys):
    # val_loss must improve by 0.03 per epoch; patience 1 runs out at the end of epoch 7 (step 105).
    verify_resume(capsys, tmp_path / "work", RECIPE, "train.early_stopping_patience=1",
                  "train.early_stopping_min_delta=0.03",
                  "--steps", "120", "--checkpoint-every", "80", "--kill-at", "95")
    summary = read_json(tmp_path / "work/uninterrupted/metrics.json")
    assert summary["early_stopped"] and 95 < summary["steps"] < 120 and summary["steps"] % 15 == 0, summary


def test_early_stopping_inside_an_epoch_stops_there_in_the_straight_and_the_resumed_run(tmp_path, capsys):
    # Validations every 3 steps; the patience runs out at a validation inside epoch 3 (step 33 here),
    # after the checkpoint at step 25 and the kill at 28.
    verify_resume(capsys, tmp_path / "work", RECIPE, *EARLY_STOPPING,
                  "--steps", "45", "--checkpoint-every", "25", "--kill-at", "28")
    summary = read_json(tmp_path / "work/uninterrupted/metrics.json")
    assert summary["early_stopped"] and 28 < summary["steps"] < 45
    # Stopped at the validation where the patience ran out, not at the end of its epoch.
    assert summary["steps"] % 3 == 0 and summary["steps"] % 15 != 0, summary
    assert read_json(tmp_path / "work/interrupted/metrics.json")["steps"] == summary["steps"]
    # Relaunched, the early-stopped run (its checkpoint is mid-epoch) trains no further.
    again = train(tmp_path / "work/uninterrupted", *EARLY_STOPPING, "train.max_steps=45", "checkpoint.every_steps=25",
                  "checkpoint.every_epochs=null")
    assert f"{summary['steps']} steps" in again.stdout and read_json(tmp_path / "work/uninterrupted/metrics.json") \
        == summary


@pytest.mark.parametrize("recipe, monitor", [(SEED_GCN, "train_loss"), (RECIPE, "val_loss")])
def test_plateau_with_validation_every_second_epoch_resumes(tmp_path, capsys, recipe, monitor):
    if recipe == SEED_GCN:  # one full-graph step per epoch, plateau on the training loss
        args = ["train.val_every_epochs=2", "--steps", "80", "--checkpoint-every", "60", "--kill-at", "65"]
    else:
        args = ["train.val_every_epochs=2", "schedule.name=plateau", f"schedule.monitor={monitor}",
                "schedule.patience=0", "schedule.threshold=0.2", "schedule.factor=0.5", "data.batch_size=128",
                "--steps", "40", "--checkpoint-every", "30", "--kill-at", "33"]
    verify_resume(capsys, tmp_path / "work", recipe, *args)
    report = read_json(tmp_path / "work/uninterrupted/ranks/rank-0.json")
    assert report["lrs"]["default"] < 0.01 if recipe == SEED_GCN else report["lrs"]["default"] < 1e-3, report
    epochs = read_json(tmp_path / "work/uninterrupted/metrics.json")["epochs"]
    # The plateau steps once per epoch on the training loss, once per validating epoch on val_loss.
    assert report["scheduler_last_epoch"] == (epochs if monitor == "train_loss" else epochs // 2), report


@pytest.mark.parametrize("extra", [[], ["checkpoint.async_save=true"]])
def test_verify_resume_kills_after_the_checkpoint_of_the_kill_step(tmp_path, capsys, extra):
    # The kill comes after step 10 is wholly done: its checkpoint (also a background one) is committed.
    out = verify_resume(capsys, tmp_path / "work", RECIPE, *extra, "--steps", "30", "--checkpoint-every", "10",
                        "--kill-at", "10" if not extra else "11")
    assert "resumes from step 10" in out and "step 10, 10 samples" not in out


# --------------------------------------------------------------------------------------------
# A preemption inside a validation: 2 ranks, BatchNorm, randomness in eval mode
# --------------------------------------------------------------------------------------------

MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F


    class BatchNormNet(torch.nn.Module):
        """BatchNorm (running statistics: each rank's own between DDP's broadcasts) and a dropout
        without training= (a common slip): it draws randomness in eval mode too."""

        def __init__(self, in_dim):
            super().__init__()
            self.inner = torch.nn.Linear(in_dim, 32)
            self.norm = torch.nn.BatchNorm1d(32)
            self.out = torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.out(F.dropout(torch.relu(self.norm(self.inner(x))), 0.3))
''')


def test_a_preemption_inside_a_validation_on_two_ranks_with_batchnorm_and_eval_randomness_resumes_bitwise(
        tmp_path):
    (tmp_path / "bnmodel.py").write_text(MODEL)
    env = {"PYTHONPATH": str(tmp_path)}
    settings = ["model.name=bnmodel:BatchNormNet", "data.batch_size=64", "train.epochs=3", "train.val_every_steps=3",
                "data.val_batch_size=16", "preemption.check_every_val_batches=2", "checkpoint.every_steps=4"]
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    train(straight, *settings, nproc=2, env=subprocess_env(**env))
    # SIGTERM to rank 0 as the validation at step 9 starts: saved at step 9's boundary, exit 75.
    proc = train(preempted, *settings, nproc=2, check=False,
                 env=subprocess_env(HARNESS_TEST_SIGNAL_IN_VALIDATION_AT_STEP="9", **env))
    marker = read_json(preempted / "PREEMPTED.json")
    assert proc.returncode == 1 and marker["step"] == 9 and marker["exit_code"] == 75, proc.stderr[-3000:]
    train(preempted, *settings, nproc=2, env=subprocess_env(**env))
    assert_bitwise_equal(weights(straight), weights(preempted))
    a, b = read_scalars(straight), read_scalars(preempted)
    assert [s for s, _ in b["val/loss"]] == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
    assert b["val/loss"] == a["val/loss"] and b["train/loss"] == a["train/loss"]
