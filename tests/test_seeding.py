"""run.seed seeds everything the harness calls: a data factory that draws from torch, numpy or
random builds the same data on every rank, a model class given from Python is built with the same
weights in every run; data that still differs between ranks stops the run at start, naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

DATA_MODULE = '''\
import os
import random

import numpy as np
import torch


def drawn(samples: int = 200):
    """Draws from all three global generators, seeding none."""
    x = torch.randn(samples, 4) + float(np.random.rand()) + random.random()
    return {"train": (x[:160], (x[:160, 0] > x[:, 0].mean()).long()),
            "val": (x[160:], (x[160:, 0] > x[:, 0].mean()).long()), "task": "binary"}


def per_rank(samples: int = 200):
    """A different table on each rank (as rank-local files would give)."""
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    x = torch.randn(samples, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return {"train": (x[:160], y[:160]), "val": (x[160:], y[160:])}
'''

RECIPE = "data: {name: seeddata:drawn, batch_size: 32}\nmodel: {name: mlp, hidden: [8]}\ntrain: {epochs: 2}\n"

SCRIPT = '''\
import sys

import torch
from torch import nn

import harness


class Net(nn.Module):
    def __init__(self, in_dim, out_dim, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x):
        return self.body(x)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long()
    model = Net if sys.argv[1] == "class" else Net(4, 1)  # an instance built unseeded
    harness.train(model=model, data={"train": (x[:96], y[:96]), "val": (x[96:], y[96:])},
                  recipe={"data": {"batch_size": 32}, "train": {"epochs": 1}}, overrides=sys.argv[2:])
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seeding_project")
    (folder / "seeddata.py").write_text(DATA_MODULE)
    (folder / "recipe.yaml").write_text(RECIPE)
    (folder / "train.py").write_text(SCRIPT)
    return folder


def test_a_factory_drawing_from_every_global_generator_builds_the_same_data_on_both_ranks(project, tmp_path):
    run_dir = tmp_path / "run"
    run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}"], nproc=2)  # the ranks' check passes
    one = tmp_path / "one"
    run_harness(project / "recipe.yaml", [f"run.output_dir={one}"], nproc=1, launcher="python")
    # The same data in a 1-process run: the same validation loss (reduced over ranks on 2).
    assert abs(read_json(run_dir / "metrics.json")["val_loss"] - read_json(one / "metrics.json")["val_loss"]) < 1e-4


def test_data_that_differs_between_ranks_stops_at_start_naming_what_each_rank_built(project, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}", "data.name=seeddata:per_rank"],
                       nproc=2, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "data: the ranks built different data (rank 0: train 160, val 40, items " in text, text[-3000:]
    assert "rank 1: train 160, val 40, items " in text
    assert f'File "{ROOT / "harness"}' not in text and "[rank" not in text  # the ranks print no traceback
    assert not (run_dir / "checkpoints").exists()


def launch(project: Path, run_dir: Path, how: str) -> None:
    proc = subprocess.run([sys.executable, str(project / "train.py"), how, f"run.output_dir={run_dir}"],
                          cwd=project, env=subprocess_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_model_class_given_from_python_is_built_seeded_an_instance_is_not(project, tmp_path):
    launch(project, tmp_path / "class-1", "class")
    launch(project, tmp_path / "class-2", "class")
    assert_bitwise_equal(weights(tmp_path / "class-1"), weights(tmp_path / "class-2"))
    launch(project, tmp_path / "instance-1", "instance")
    launch(project, tmp_path / "instance-2", "instance")
    first, second = weights(tmp_path / "instance-1"), weights(tmp_path / "instance-2")
    assert any(not (first[k] == second[k]).all() for k in first), "an unseeded instance differs from run to run"
    assert read_json(tmp_path / "class-1" / "checkpoints" / "step-000003" / "trainer.json")["components"]["model"][
        "target"] == "__main__:Net"
