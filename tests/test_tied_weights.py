"""Tied weights (one parameter under two names, as an LM's embedding and head) are checkpointed
once, resume bitwise, unsharded and under FSDP2; a model whose state safetensors cannot store
fails before its first step, naming the tensors.

The user's model lives in a temporary project folder beside its recipe, as a user works.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model

from harness.sharding import ALIASES_KEY, saved_once
from tests.conftest import assert_bitwise_equal, harness_cli, run_harness, subprocess_env, weights

TIED_MODULE = '''\
import torch
from torch import nn


class TiedNet(nn.Module):
    """Two layers sharing one weight matrix, with dropout between them."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 16, dropout: float = 0.2):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.again = nn.Linear(hidden, hidden, bias=False)
        self.again.weight = self.mid.weight
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x):
        h = self.drop(torch.relu(self.mid(torch.relu(self.inp(x)))))
        return self.out(torch.relu(self.again(h)))


class SparseBufferNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 16):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.register_buffer("adjacency", torch.eye(3).to_sparse())

    def forward(self, x):
        return self.lin(x)
'''

RECIPE = """\
data: {name: breast_cancer, batch_size: 64}
model: {name: tiedmodels:TiedNet, hidden: 16}
optim: {name: adam, lr: 0.003}
schedule: {name: cosine, interval: step}
train: {epochs: 3}
checkpoint: {every_steps: 5}
"""
KILL_AT_STEP = 12  # mid epoch 2 (8 steps per epoch); the last checkpoint before it is step 10


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tied_project")
    (folder / "tiedmodels.py").write_text(TIED_MODULE)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def killed_and_resumed(project: Path, run_dir: Path, nproc: int, extra: list[str]) -> None:
    overrides = [f"run.output_dir={run_dir}", *extra]
    launcher = "python" if nproc == 1 else "accelerate"
    killed = run_harness(project / "recipe.yaml", overrides, nproc=nproc, launcher=launcher, check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT_STEP)))
    assert killed.returncode != 0 and not (run_dir / "final").exists(), killed.stderr[-3000:]
    resumed = run_harness(project / "recipe.yaml", overrides, nproc=nproc, launcher=launcher)
    assert "resumed from" in resumed.stdout and "step 10," in resumed.stdout


def stored_names(path: Path) -> tuple[list[str], dict]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys()), json.loads(f.metadata()[ALIASES_KEY])


def test_a_tied_model_is_checkpointed_once_and_resumes_bitwise(project, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_harness(project / "recipe.yaml", [f"run.output_dir={straight}"], nproc=1, launcher="python")
    killed_and_resumed(project, resumed, 1, [])
    assert_bitwise_equal(weights(straight), weights(resumed))
    newest = sorted((resumed / "checkpoints").glob("step-*"))[-1]
    for path in (newest / "model.safetensors", resumed / "final" / "model.safetensors"):
        names, aliases = stored_names(path)
        assert "again.weight" not in names and "mid.weight" in names
        assert aliases == {"again.weight": "mid.weight"}
    # The final file loads into the user's class with safetensors alone, the tie intact.
    sys.path.insert(0, str(project))
    try:
        from tiedmodels import TiedNet
    finally:
        sys.path.remove(str(project))
    model = TiedNet(30, 1)  # binary: one logit
    missing, unexpected = load_model(model, str(resumed / "final" / "model.safetensors"))
    assert not missing and not unexpected and model.again.weight is model.mid.weight
    assert torch.equal(model.mid.weight, weights(resumed)["mid.weight"])


def test_a_tied_model_under_fsdp2_on_two_ranks_resumes_bitwise_and_exports_once(project, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fsdp = ["train.strategy=fsdp"]
    run_harness(project / "recipe.yaml", [f"run.output_dir={straight}", *fsdp], nproc=2)
    killed_and_resumed(project, resumed, 2, fsdp)
    assert_bitwise_equal(weights(straight), weights(resumed))
    saved = sorted((resumed / "checkpoints").glob("step-*"))[-1]
    for rank in (0, 1):
        names, aliases = stored_names(saved / f"model-rank-{rank}.safetensors")
        assert "again.weight" not in names and aliases == {"again.weight": "mid.weight"}
    out = tmp_path / "export.safetensors"
    harness_cli("ckpt", "export", resumed, out, timeout=120)
    names, aliases = stored_names(out)
    assert names == sorted(weights(resumed)) and aliases == {"again.weight": "mid.weight"}


def test_a_model_safetensors_cannot_store_fails_before_the_first_step_naming_the_tensor(project, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}", "model.name=tiedmodels:SparseBufferNet"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "cannot be checkpointed" in proc.stderr and "adjacency" in proc.stderr
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout
    assert not (run_dir / "checkpoints").exists()


def test_saved_once_keeps_a_tied_tensor_once_and_copies_apart_tensors_that_overlap():
    weight = torch.randn(4, 3)
    buffer = torch.arange(10.0)
    kept, aliases = saved_once({"a": weight, "b": weight, "first": buffer[:6], "last": buffer[4:], "own": torch.ones(2)})
    assert aliases == {"b": "a"} and sorted(kept) == ["a", "first", "last", "own"]
    assert kept["a"] is weight  # not copied
    assert kept["first"].untyped_storage().data_ptr() != kept["last"].untyped_storage().data_ptr()
    assert torch.equal(kept["last"], buffer[4:])
