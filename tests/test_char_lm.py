"""The shipped language-model recipe (recipes/char_lm.yaml): a small GPT in nanoGPT's interface,
its own loss, a tied embedding and head, learns next-character prediction on Python's own
sources on 2 ranks, and a SIGKILL mid-epoch resumes bitwise."""

from __future__ import annotations

import math

import pytest

from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

RECIPE = ROOT / "recipes" / "char_lm.yaml"
# 60,000 characters: 844 train windows of 64, 27 steps an epoch (the last one short); 2 epochs.
SHORT = ["data.max_chars=60000", "checkpoint.every_steps=10", "train.log_every_steps=5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("char_lm") / "straight"
    run_harness(RECIPE, [f"run.output_dir={run_dir}", *SHORT], nproc=2)
    return run_dir


def test_the_char_lm_recipe_learns_with_token_level_metrics(straight):
    summary = read_json(straight / "metrics.json")
    assert summary["world_size"] == 2 and summary["steps"] == 54
    val = read_scalars(straight)["val/loss"]
    assert val[-1][1] < val[0][1] < math.log(256)  # better than uniform over bytes, and improving
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert summary["val_accuracy"] > 0.2
    assert "lm_head.weight" not in weights(straight)  # tied to wte.weight: stored once


def test_the_char_lm_recipe_killed_mid_epoch_on_two_ranks_resumes_bitwise(straight, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = [f"run.output_dir={run_dir}", *SHORT]
    killed = run_harness(RECIPE, overrides, nproc=2, check=False, env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="33"))
    assert killed.returncode != 0 and not (run_dir / "final").exists()
    resumed = run_harness(RECIPE, overrides, nproc=2)
    assert "step 30," in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(run_dir))
    for tag in ("train/loss", "val/loss", "val/perplexity", "lr/default"):
        assert read_scalars(run_dir)[tag] == read_scalars(straight)[tag], tag
