"""A recipe changed on resume (run.on_change) and a new run from another run's weights (run.init_from)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_same_weights, lr_series, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 455 samples, global batch 64 -> 8 steps per epoch, 4 epochs = 32 steps; stopped at step 12 (mid epoch 2).
BASE = ["data.batch_size=64", "train.epochs=4", "checkpoint.every_steps=4", "checkpoint.keep_last=5"]
STOP = 12


def run(run_dir: Path, extra=(), check=True):
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *BASE, *extra], nproc=1, launcher="python", check=check)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "RUN.lock"}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    run(run_dir, [f"train.max_steps={STOP}"])
    return run_dir


@pytest.fixture
def resumable(stopped, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(stopped, target)
    return target


def f32(values: list[float]) -> list[float]:
    """TensorBoard stores scalars as float32."""
    return torch.tensor(values, dtype=torch.float32).tolist()


def test_a_changed_recipe_is_refused_by_default_naming_each_key_and_nothing_changes(resumable):
    before = snapshot(resumable)
    proc = run(resumable, ["optim.lr=0.0005", "optim.weight_decay=0.01"], check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "optim.lr: 0.001 -> 0.0005" in proc.stderr and "optim.weight_decay: 0.0 -> 0.01" in proc.stderr
    assert "run.on_change=allow" in proc.stderr and "run.init_from=" in proc.stderr
    assert snapshot(resumable) == before


def test_an_allowed_lr_change_applies_from_the_resumed_step_and_is_recorded(resumable):
    run(resumable, ["optim.lr=0.0005", "optim.weight_decay=0.01", "run.on_change=allow"])
    lrs = dict(lr_series(resumable))
    assert [lrs[s] for s in range(1, STOP + 1)] == f32([0.001] * STOP)
    assert [lrs[s] for s in range(STOP + 1, 33)] == f32([0.0005] * (32 - STOP)), "the new LR from the next step on"
    (entry,) = [json.loads(line) for line in (resumable / "changes.jsonl").read_text().splitlines()]
    assert entry["step"] == STOP and entry["lrs"] == {"default": 0.0005}
    assert {c["key"]: (c["saved"], c["now"]) for c in entry["changes"]} == {
        "optim.lr": (0.001, 0.0005), "optim.weight_decay": (0.0, 0.01)}
    final = resumable / "checkpoints" / "step-000032"
    assert read_json(final / "optimizer.json")["param_groups"][0]["weight_decay"] == 0.01, \
        "the changed hyperparameter is in force, not the saved one"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumable / "tb"))
    events.Reload()
    assert any(tag.startswith("run/recipe_changes") for tag in events.Tags()["tensors"])
    # The next resume compares against the new recipe: nothing more to record.
    run(resumable, ["optim.lr=0.0005", "optim.weight_decay=0.01", "run.on_change=allow"])
    assert len((resumable / "changes.jsonl").read_text().splitlines()) == 1


def test_an_allowed_schedule_change_continues_as_if_the_recipe_had_always_said_so(resumable):
    run(resumable, ["schedule.name=cosine", "schedule.interval=step", "run.on_change=allow"])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=0.001)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=32)
    expected = []
    for _ in range(32):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    lrs = dict(lr_series(resumable))
    assert [lrs[s] for s in range(STOP + 1, 33)] == f32(expected[STOP:])


# README (Checkpoints and exact resume): "keys that only steer the run (max_steps, logging, checkpoint
# and preemption settings, epochs as long as the LR check passes) may change freely". All of them
# change together here, in one resume (max_steps: the stopped run had train.max_steps=12, this one
# has none).
STEERING = ["train.log_every_steps=3", "train.progress_every_s=0.000001", "checkpoint.every_steps=5",
            "checkpoint.keep_last=100", "checkpoint.async_save=true", "preemption.check_every_steps=7",
            "preemption.check_interval_s=0.5", "preemption.signals=[SIGUSR2]", "preemption.graceful_interrupt=false",
            "preemption.check_every_val_batches=3"]


def test_steering_settings_and_more_epochs_change_freely_on_resume_and_take_effect(resumable, tmp_path):
    before = {int(p.name.split("-")[1]) for p in (resumable / "checkpoints").glob("step-*")}
    assert before == {4, 8, 12}
    proc = run(resumable, [*STEERING, "train.epochs=5"])  # exit 0, not 3
    assert f"resumed from {resumable / 'checkpoints' / f'step-{STOP:06d}'}" in proc.stdout
    assert read_json(resumable / "metrics.json")["steps"] == 40
    # More epochs (StepLR per epoch does not depend on them) are recorded; the steering keys are not
    # even changes.
    (entry,) = [json.loads(line) for line in (resumable / "changes.jsonl").read_text().splitlines()]
    assert entry["step"] == STOP and entry["changes"] == [{"key": "train.epochs", "saved": 4, "now": 5}]
    # Logging: a progress line after every step (the log is no terminal), train/loss every 3 steps.
    progress = [int(step) for step in re.findall(r"^\[harness\] step (\d+)/40 ", proc.stdout, re.MULTILINE)]
    assert progress == list(range(STOP + 1, 41)), proc.stdout[-3000:]
    losses = [step for step, _ in read_scalars(resumable)["train/loss"] if step > STOP]
    assert losses == list(range(15, 40, 3)), losses
    # Checkpoints: every 5 steps from the resume on (and at each epoch's end, 8 steps), none pruned
    # (keep_last was 5).
    after = {int(p.name.split("-")[1]) for p in (resumable / "checkpoints").glob("step-*")}
    assert after == before | {15, 20, 25, 30, 35, 40} | {16, 24, 32}, sorted(after)
    # Preemption: the settings a later resume compares with are the new ones.
    config = read_json(resumable / "checkpoints" / "step-000040" / "trainer.json")["config"]
    assert config["preemption"] == {**config["preemption"], "check_every_steps": 7, "check_interval_s": 0.5,
                                    "signals": ["SIGUSR2"], "graceful_interrupt": False,
                                    "check_every_val_batches": 3}
    assert config["checkpoint"]["async_save"] is True
    # None of it changes what a step computes: the weights of a run that never stopped.
    straight = tmp_path / "straight"
    run(straight, ["train.epochs=5"])
    assert_same_weights(resumable, straight)


def test_more_epochs_are_refused_when_they_would_change_the_schedule(resumable, tmp_path):
    cosine = ["schedule.name=cosine", "schedule.interval=step"]
    stopped = tmp_path / "cosine"
    run(stopped, [*cosine, f"train.max_steps={STOP}"])
    proc = run(stopped, [*cosine, "train.epochs=5"], check=False)
    assert proc.returncode == 3 and "LR check after resume failed" in proc.stderr


INSPECT_INIT = """
import json, sys
import torch
from safetensors.torch import load_file
from harness.config import load_config
from harness.loop import build_trainer
recipe, source, *overrides = sys.argv[1:]
trainer = build_trainer(load_config(recipe, overrides))
weights = load_file(f"{source}/model.safetensors")
own = trainer.raw_model.state_dict()
moments = {}
saved = load_file(f"{source}/optimizer.safetensors")
for index, param in enumerate(p for g in trainer.optimizer.param_groups for p in g["params"]):
    state = trainer.optimizer.state.get(param, {})
    if "exp_avg" in state:
        moments[index] = torch.equal(state["exp_avg"], saved[f"{index}/exp_avg"])
print(json.dumps({"weights_equal": own.keys() == weights.keys() and all(torch.equal(own[k], weights[k]) for k in weights),
                  "step": trainer.state.step, "lr": trainer.optimizer.param_groups[0]["lr"],
                  "weight_decay": trainer.optimizer.param_groups[0]["weight_decay"],
                  "moments_equal": moments, "init_from": trainer.state.init_from}))
"""


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_init_from_starts_a_new_run_from_another_runs_weights(stopped, tmp_path, with_optimizer):
    source = stopped / "checkpoints" / f"step-{STOP:06d}"
    new = tmp_path / "new"
    overrides = [f"run.output_dir={new}", *BASE, f"run.init_from={stopped}", "optim.lr=0.0003",
                 "optim.weight_decay=0.02", f"run.init_optimizer={str(with_optimizer).lower()}"]
    proc = subprocess.run([sys.executable, "-c", INSPECT_INIT, str(RECIPE), str(source), *overrides], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["weights_equal"] and seen["step"] == 0 and seen["init_from"] == str(source)
    assert seen["lr"] == 0.0003 and seen["weight_decay"] == 0.02, "this recipe's LR and hyperparameters"
    if with_optimizer:
        assert seen["moments_equal"] and all(seen["moments_equal"].values())
    else:
        assert seen["moments_equal"] == {}, "a fresh optimizer state"


def test_init_from_a_checkpoint_of_other_shapes_lists_every_tensor_that_does_not_fit(stopped, tmp_path):
    new = tmp_path / "new"
    proc = run_harness(RECIPE, [f"run.output_dir={new}", *BASE, f"run.init_from={stopped}", "model.hidden=[16, 32]"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "does not fit this model (3 tensors)" in proc.stderr
    assert "layers.0.weight: checkpoint (64, 30), this model (16, 30)" in proc.stderr
    assert "layers.0.bias: checkpoint (64,), this model (16,)" in proc.stderr
    assert "layers.2.weight: checkpoint (32, 64), this model (32, 16)" in proc.stderr
    assert not (new / "checkpoints").exists()


def test_init_from_applies_only_until_the_new_run_has_checkpoints_of_its_own(stopped, tmp_path):
    new = tmp_path / "new"
    run_harness(RECIPE, [f"run.output_dir={new}", *BASE, f"run.init_from={stopped}", "train.max_steps=4"],
                nproc=1, launcher="python")
    proc = run_harness(RECIPE, [f"run.output_dir={new}", *BASE, f"run.init_from={stopped}"], nproc=1,
                       launcher="python")
    assert "resumed from" in proc.stdout and str(new / "checkpoints" / "step-000004") in proc.stdout
    assert "initialized from" not in proc.stdout
    assert read_json(new / "checkpoints" / "step-000032" / "trainer.json")["state"]["init_from"] == \
        str(stopped / "checkpoints" / f"step-{STOP:06d}")
