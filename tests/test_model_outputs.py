"""A model may return more than a tensor: a tuple (nanoGPT's ``(logits, loss)``), a dict, a
dataclass or a Hugging Face ``ModelOutput``. The loss and metrics receive ``logits`` or the only
tensor, or what ``train.model_output`` names; an ambiguous output is a config error naming its
structure, before anything is written."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from harness.contracts import ConfigError
from harness.data import select_output
from tests.conftest import read_json, run_harness

LOGITS = torch.randn(4, 3)
OTHER = torch.randn(4, 7)


@dataclass
class Output:
    logits: torch.Tensor
    hidden: Optional[torch.Tensor] = None


class ModelOutputLike(OrderedDict):
    """transformers' ModelOutput: an OrderedDict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.mark.parametrize("outputs, choice", [
    (LOGITS, None),
    ((LOGITS, None), None),  # nanoGPT without targets
    ([LOGITS], None),
    ({"scores": LOGITS}, None),
    ({"logits": LOGITS, "hidden": OTHER}, None),
    (ModelOutputLike(loss=torch.tensor(0.5), logits=LOGITS), None),
    (Output(LOGITS, OTHER), None),
    ((OTHER, LOGITS), 1),
    ({"a": OTHER, "b": LOGITS}, "b"),
    (Output(OTHER, LOGITS), "hidden"),
    (ModelOutputLike(loss=torch.tensor(0.5), logits=OTHER, scores=LOGITS), "scores"),
])
def test_the_loss_receives_logits_the_only_tensor_or_what_train_model_output_names(outputs, choice):
    assert select_output(outputs, choice) is LOGITS


@pytest.mark.parametrize("outputs, choice, named", [
    ((LOGITS, OTHER), None, "a tuple (0: tensor [4, 3], 1: tensor [4, 7])"),
    ({"a": LOGITS, "b": OTHER}, None, "a dict (a: tensor [4, 3], b: tensor [4, 7])"),
    ("text", None, "a str"),
    ((LOGITS, None), 1, "a tuple (0: tensor [4, 3], 1: NoneType)"),
    ({"a": LOGITS}, "logits", "a dict (a: tensor [4, 3])"),
    (Output(LOGITS), "scores", "a Output (logits: tensor [4, 3], hidden: NoneType)"),
])
def test_an_ambiguous_or_missing_output_is_a_config_error_naming_the_structure(outputs, choice, named):
    with pytest.raises(ConfigError) as error:
        select_output(outputs, choice)
    assert named in str(error.value) and "train.model_output" in str(error.value)


MODULE = '''\
import torch
from torch import nn


class TupleNet(nn.Module):
    """nanoGPT's interface: forward(x, targets=None) returns (logits, loss)."""

    def __init__(self, in_dim, out_dim, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, out_dim))

    def forward(self, x, targets=None):
        logits = self.body(x)
        return logits, None


class DictNet(TupleNet):
    def forward(self, x):
        return {"features": x, "scores": self.body(x)}
'''

RECIPE = "data: {name: breast_cancer, batch_size: 64}\nmodel: {name: outnets:TupleNet}\ntrain: {epochs: 2}\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs_project")
    (folder / "outnets.py").write_text(MODULE)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


@pytest.mark.parametrize("overrides", [[], ["model.name=outnets:DictNet", "train.model_output=scores"]],
                         ids=["tuple", "dict-by-key"])
def test_a_model_returning_a_tuple_or_a_dict_trains_and_learns(project, tmp_path, overrides):
    run_dir = tmp_path / "run"
    run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}", *overrides], nproc=1, launcher="python")
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 14 and metrics["test_accuracy"] > 0.6


def test_an_ambiguous_output_stops_before_anything_is_written_naming_it(project, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}", "model.name=outnets:DictNet"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a dict (features: tensor [2, 30], scores: tensor [2, 1])" in proc.stderr
    assert "train.model_output" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
