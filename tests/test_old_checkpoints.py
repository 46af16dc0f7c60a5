"""Checkpoints written by earlier versions of the harness still resume, bitwise."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_json, run_harness

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
OLD = ROOT / "tests/data/checkpoint-main-26f75aa/step-000020"


def test_a_checkpoint_written_before_components_resumes_to_the_same_weights_as_a_straight_run(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(OLD, resumed / "checkpoints" / OLD.name)
    settings = ["train.epochs=3", "checkpoint.every_steps=10"]
    proc = run_harness(RECIPE, [f"run.output_dir={resumed}", *settings], nproc=1, launcher="python")
    assert "resumed from" in proc.stdout and "step 20" in proc.stdout
    run_harness(RECIPE, [f"run.output_dir={straight}", *settings], nproc=1, launcher="python")
    a, b = load_file(resumed / "final/model.safetensors"), load_file(straight / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(resumed / "metrics.json")["val_accuracy"] == read_json(straight / "metrics.json")["val_accuracy"]
