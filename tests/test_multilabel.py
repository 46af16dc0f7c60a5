"""The shipped multi-label recipe (recipes/multilabel_mlp.yaml): 5 labels per sample, the loss the
mean over every label (torch's reduction="mean"), accuracy and F1 per label, on 2 ranks; a
SIGKILL mid-epoch resumes bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.assemble import build_data
from harness.builtin.models import Mlp
from harness.config import load_config
from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

RECIPE = ROOT / "recipes" / "multilabel_mlp.yaml"
SHORT = ["train.epochs=6"]  # 23 steps an epoch: 138 steps, checkpoints every 50


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multilabel") / "straight"
    run_harness(RECIPE, [f"run.output_dir={run_dir}", *SHORT], nproc=2)
    return run_dir


def test_the_multilabel_recipe_reports_torchs_mean_over_labels_and_beats_the_majority(straight):
    cfg = load_config(RECIPE, SHORT)
    test = build_data(cfg.data, cfg.run.seed).test
    model = Mlp(20, 5, hidden=[64], dropout=0.1).eval()
    model.load_state_dict(weights(straight))
    with torch.no_grad():
        outputs = model(test.features)
    summary = read_json(straight / "metrics.json")
    assert summary["test_loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(outputs, test.targets)),
                                                 rel=1e-5)
    assert summary["test_accuracy"] == pytest.approx(float(((outputs >= 0).float() == test.targets).float().mean()),
                                                     abs=1e-6)
    majority = float(torch.maximum(test.targets.mean(0), 1 - test.targets.mean(0)).mean())
    assert summary["test_accuracy"] > majority + 0.1 and summary["test_f1"] > 0.6


def test_the_multilabel_recipe_killed_mid_epoch_on_two_ranks_resumes_bitwise(straight, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = [f"run.output_dir={run_dir}", *SHORT]
    killed = run_harness(RECIPE, overrides, nproc=2, check=False, env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="60"))
    assert killed.returncode != 0 and not (run_dir / "final").exists()
    resumed = run_harness(RECIPE, overrides, nproc=2)
    assert "step 50," in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(run_dir))
    for tag in ("train/loss", "val/loss", "val/accuracy", "val/f1"):
        assert read_scalars(run_dir)[tag] == read_scalars(straight)[tag], tag
