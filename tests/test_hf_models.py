"""Hugging Face transformers models, built from a config (no download): GPT2LMHeadModel on the
shipped recipe (its own loss, shifted labels, tied embedding and head) on 2 ranks with a SIGKILL
resumed bitwise, and HF-style Dataset items {input_ids, labels} padded by a collator into
{input_ids, attention_mask, labels} whose logged loss is the model's own token mean over the
whole split. transformers is an optional extra (pip install -e .[hf]); the lock holds it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

transformers = pytest.importorskip("transformers")

RECIPE = ROOT / "recipes" / "hf_gpt2_chars.yaml"
SHORT = ["data.max_chars=60000", "checkpoint.every_steps=10", "train.log_every_steps=5"]  # 27 steps an epoch
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf_gpt2") / "straight"
    run_harness(RECIPE, [f"run.output_dir={run_dir}", *SHORT], nproc=2, env=subprocess_env(**OFFLINE))
    return run_dir


def test_gpt2_from_transformers_on_two_ranks_killed_mid_epoch_resumes_bitwise(straight, tmp_path):
    from harness.tracking import read_scalars

    run_dir = tmp_path / "killed"
    overrides = [f"run.output_dir={run_dir}", *SHORT]
    killed = run_harness(RECIPE, overrides, nproc=2, check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="33", **OFFLINE))
    assert killed.returncode != 0 and not (run_dir / "final").exists()
    resumed = run_harness(RECIPE, overrides, nproc=2, env=subprocess_env(**OFFLINE))
    assert "step 30," in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(run_dir))
    assert read_scalars(run_dir)["train/loss"] == read_scalars(straight)["train/loss"]
    final = weights(straight)
    assert "transformer.wte.weight" in final and "lm_head.weight" not in final  # tied: stored once
    val = read_scalars(straight)["val/loss"]
    assert val[-1][1] < val[0][1] < 5.0  # learning (uniform over 256 bytes: 5.55)


DATA_MODULE = '''\
import torch

IGNORE = -100


class Lines(torch.utils.data.Dataset):
    """HF-style items of different lengths: {"input_ids": [n], "labels": [n]} (labels = input_ids)."""

    def __init__(self, count, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            n = int(torch.randint(4, 24, (1,), generator=g))
            start = int(torch.randint(0, 40, (1,), generator=g))
            ids = (torch.arange(start, start + n) * 7) % 50  # a learnable pattern
            self.items.append(ids)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i].clone()}


def pad(items):
    """The padding collator an HF user writes: attention_mask 0 and labels -100 on padding."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], mask[row, :n], labels[row, :n] = item["input_ids"], 1, item["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load():
    return {"train": Lines(96, 0), "val": Lines(40, 1), "task": "multiclass"}
'''

DICT_RECIPE = """\
data: {name: hfdata:load, batch_size: 16, val_batch_size: 8, collate_fn: "hfdata:pad", target_key: labels}
model: {name: hf_gpt2, out_dim: 50, positions: 32, dim: 32, layers: 1, heads: 2}
loss: {name: model, targets_arg: labels, shifted: true}
metrics: []
optim: {name: adamw, lr: 0.003}
train: {epochs: 2}
"""


def test_hf_style_dict_items_with_a_padding_collator_report_the_models_token_mean_over_the_split(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "hfdata.py").write_text(DATA_MODULE)
    (project / "recipe.yaml").write_text(DICT_RECIPE)
    run_dir = tmp_path / "run"
    run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}"], nproc=1, launcher="python",
                env=subprocess_env(**OFFLINE))
    summary = read_json(run_dir / "metrics.json")
    # The model's own loss on the whole validation split in one padded batch: HF's mean over every
    # shifted label that is not padding. The harness saw it in 5 batches of other token counts.
    sys.path.insert(0, str(project))
    try:
        import hfdata
    finally:
        sys.path.remove(str(project))
    from harness.builtin.models import hf_gpt2

    model = hf_gpt2(32, 50, dim=32, layers=1, heads=2, positions=32).eval()
    missing, unexpected = model.load_state_dict(weights(run_dir), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head, stored once
    val = hfdata.Lines(40, 1)
    batch = hfdata.pad([val[i] for i in range(len(val))])
    with torch.no_grad():
        expected = model(**batch).loss
    assert summary["val_loss"] == pytest.approx(float(expected), rel=1e-5)
