"""Token- and label-level objectives: integer tokens stay integers, targets keep their shape, a
loss with several values per sample is the mean over the counted elements (padding, -100, left
out), over ranks and micro-batches exactly as torch's reduction="mean" on the whole batch; the
built-in metrics score tokens and labels, and a metric that cannot score the outputs is a config
error at start."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.builtin.models import Mlp
from harness.builtin.objectives import IGNORE_INDEX, accuracy, cross_entropy, bce_with_logits, f1, perplexity
from harness.objectives import averages_elements, element_count
from harness.tracking import read_scalars
from tests.conftest import assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

MODULE = '''\
import torch
from torch import nn

VOCAB, T = 11, 12


def tokens(samples: int = 320, seed: int = 0):
    """Next token = (token + 3) mod VOCAB; each sequence padded (-100) after a random length."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (samples, T), generator=g)
    y = (x + 3) % VOCAB
    lengths = torch.randint(2, T + 1, (samples,), generator=g)
    y[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    return {"train": (x[:256], y[:256]), "val": (x[256:], y[256:]), "task": "multiclass"}


def labels(samples: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=g)
    y = torch.stack([(x[:, i] > 0).float() for i in range(5)], dim=1)
    return {"train": (x[:320], y[:320]), "val": (x[320:], y[320:])}


class TinyLM(nn.Module):
    def __init__(self, in_dim, out_dim, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x):
        assert not x.is_floating_point(), "tokens arrive as integers"
        return self.head(self.drop(torch.relu(self.embed(x))))


class GPTish(nn.Module):
    """nanoGPT's interface: forward(idx, targets=None) -> (logits, loss); embedding and head tied."""

    def __init__(self, in_dim, out_dim, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.drop(torch.relu(self.mix(self.wte(idx)))))
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss
'''

LM_RECIPE = """\
data: {name: toks:tokens, batch_size: 32}
model: {name: toks:TinyLM, hidden: 16}
metrics: [accuracy, perplexity]
optim: {name: adam, lr: 0.01}
schedule: {name: cosine, interval: step}
train: {epochs: 3}
checkpoint: {every_steps: 5}
"""
GPT_RECIPE = LM_RECIPE.replace("toks:TinyLM", "toks:GPTish") + "loss: {name: model}\n"
LABELS_RECIPE = """\
data: {name: toks:labels, batch_size: 32}
model: {name: mlp, hidden: [16]}
metrics: [accuracy, f1]
optim: {name: adam, lr: 0.01}
train: {epochs: 4}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens_project")
    (folder / "toks.py").write_text(MODULE)
    (folder / "lm.yaml").write_text(LM_RECIPE)
    (folder / "labels.yaml").write_text(LABELS_RECIPE)
    (folder / "gpt.yaml").write_text(GPT_RECIPE)
    return folder


def user_module(project: Path):
    sys.path.insert(0, str(project))
    try:
        import toks
    finally:
        sys.path.remove(str(project))
    return toks


# ---------------------------------------------------------------------------------------------
# The objectives, in process
# ---------------------------------------------------------------------------------------------


def token_batch(batch: int = 4, length: int = 6, vocab: int = 7):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(batch, length, vocab, generator=g)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[0, 2:] = IGNORE_INDEX
    targets[3, 5:] = IGNORE_INDEX
    return logits, targets


def test_a_token_loss_sums_over_counted_tokens_to_torchs_mean():
    logits, targets = token_batch()
    loss = cross_entropy()
    assert averages_elements(loss, logits, targets)
    assert int(element_count(targets)) == 24 - 4 - 1
    mean = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss.summed(logits, targets) / element_count(targets), mean)
    assert torch.allclose(loss.per_sample(logits, targets).sum() / element_count(targets), mean)


def test_a_multi_label_loss_is_the_mean_over_labels_not_their_sum_per_sample():
    g = torch.Generator().manual_seed(4)
    outputs, targets = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.5).float()
    loss = bce_with_logits()
    assert averages_elements(loss, outputs, targets) and int(element_count(targets)) == 40
    assert torch.allclose(loss.summed(outputs, targets) / 40, F.binary_cross_entropy_with_logits(outputs, targets))
    # One value per sample (binary, [B, 1] against [B]): a mean over samples, as before.
    assert not averages_elements(loss, outputs[:, :1], targets[:, 0])


def test_the_built_in_metrics_score_tokens_labels_and_perplexity():
    logits, targets = token_batch()
    keep = targets != IGNORE_INDEX
    right = (logits.argmax(-1) == targets)[keep].sum()
    metric = accuracy()
    assert metric.compute(metric.sums(logits, targets).tolist()) == pytest.approx(float(right) / int(keep.sum()))
    ppl = perplexity()
    expected = math.exp(float(F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))))
    assert ppl.compute(ppl.sums(logits, targets).tolist()) == pytest.approx(expected, rel=1e-6)

    outputs = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    metric = accuracy()
    assert metric.compute(metric.sums(outputs, labels).tolist()) == pytest.approx(4 / 6)  # per label
    score = f1()
    assert score.compute(score.sums(outputs, labels).tolist()) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # micro
    with pytest.raises(ValueError, match=r"outputs \[2, 3\] do not score against targets \[2, 4\]"):
        accuracy().sums(outputs, torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def test_a_token_model_reports_the_token_mean_and_two_ranks_with_accumulation_train_alike(project, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # No dropout: the ranks' own dropout streams would differ from one process's.
    run_harness(project / "lm.yaml", [f"run.output_dir={one}", "model.dropout=0.0"], nproc=1, launcher="python")
    # 2 ranks x 2 micro-batches: each holds another number of tokens; the mean is still the global one.
    run_harness(project / "lm.yaml", [f"run.output_dir={two}", "model.dropout=0.0", "train.grad_accum_steps=2"],
                nproc=2)
    a, b = weights(one), weights(two)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-6), f"{name}: {(a[name] - b[name]).abs().max()}"
    toks = user_module(project)
    model = toks.TinyLM(12, 11).eval()
    model.load_state_dict(a)
    data = toks.tokens()
    x, y = data["val"]
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), ignore_index=IGNORE_INDEX)
    summary = read_json(one / "metrics.json")
    assert summary["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert summary["val_perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    keep = y != IGNORE_INDEX
    assert summary["val_accuracy"] == pytest.approx(float((logits.argmax(-1) == y)[keep].float().mean()), abs=1e-6)
    assert summary["val_accuracy"] > 0.5  # it learns the rule
    assert read_json(two / "metrics.json")["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


def test_a_token_model_killed_mid_epoch_resumes_bitwise(project, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_harness(project / "lm.yaml", [f"run.output_dir={straight}"], nproc=1, launcher="python")
    crashed = run_harness(project / "lm.yaml", [f"run.output_dir={killed}"], nproc=1, launcher="python", check=False,
                          env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="12"))
    assert crashed.returncode != 0 and not (killed / "final").exists()
    run_harness(project / "lm.yaml", [f"run.output_dir={killed}"], nproc=1, launcher="python")
    assert_bitwise_equal(weights(straight), weights(killed))
    assert read_scalars(killed)["train/loss"] == read_scalars(straight)["train/loss"]


def test_multi_label_targets_get_a_mean_loss_and_per_label_metrics(project, tmp_path):
    run_dir = tmp_path / "run"
    run_harness(project / "labels.yaml", [f"run.output_dir={run_dir}"], nproc=1, launcher="python")
    summary = read_json(run_dir / "metrics.json")
    model = Mlp(6, 5, hidden=[16]).eval()
    model.load_state_dict(weights(run_dir))
    x, y = user_module(project).labels()["val"]
    with torch.no_grad():
        outputs = model(x)
    # torch's mean over every label of every sample (a sum per sample would be 5x larger).
    assert summary["val_loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(outputs, y)), rel=1e-5)
    assert summary["val_accuracy"] == pytest.approx(float(((outputs >= 0).float() == y).float().mean()), abs=1e-6)
    assert summary["val_accuracy"] > 0.85 and 0.8 < summary["val_f1"] <= 1.0


@pytest.mark.parametrize("overrides, message", [
    (["model.out_dim=3"], "loss: the default loss cannot pair outputs [2, 3] with targets [2, 5]"),
    (["metrics=[perplexity]"], "metrics: perplexity cannot score outputs [2, 5] against targets [2, 5]"),
], ids=["loss", "metric"])
def test_a_loss_or_metric_that_cannot_score_the_outputs_stops_at_start(project, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_harness(project / "labels.yaml", [f"run.output_dir={run_dir}", *overrides],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# The model's own loss
# ---------------------------------------------------------------------------------------------


def test_the_models_own_loss_over_two_ranks_with_accumulation_is_the_global_token_mean(project, tmp_path):
    own, harness_loss = tmp_path / "own", tmp_path / "harness_loss"
    # Each micro-batch's loss is the model's mean over its own tokens; weighted by their counts the
    # step is the global token mean: the same weights as the harness's cross-entropy on one process.
    run_harness(project / "gpt.yaml", [f"run.output_dir={own}", "model.dropout=0.0", "train.grad_accum_steps=2"],
                nproc=2)
    run_harness(project / "gpt.yaml", [f"run.output_dir={harness_loss}", "model.dropout=0.0", "loss.name=cross_entropy"],
                nproc=1, launcher="python")
    a, b = weights(own), weights(harness_loss)
    assert sorted(a) == ["mix.bias", "mix.weight", "wte.weight"]  # the tied head stored once
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-6), f"{name}: {(a[name] - b[name]).abs().max()}"
    mine, theirs = read_json(own / "metrics.json"), read_json(harness_loss / "metrics.json")
    assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
    assert mine["val_perplexity"] == pytest.approx(math.exp(mine["val_loss"]), rel=1e-5)  # logits reach the metrics


def test_the_models_own_loss_on_two_ranks_killed_mid_epoch_resumes_bitwise(project, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_harness(project / "gpt.yaml", [f"run.output_dir={straight}"], nproc=2)
    crashed = run_harness(project / "gpt.yaml", [f"run.output_dir={killed}"], nproc=2, check=False,
                          env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="7"))
    assert crashed.returncode != 0 and not (killed / "final").exists()
    resumed = run_harness(project / "gpt.yaml", [f"run.output_dir={killed}"], nproc=2)
    assert "step 5," in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(killed))
    assert read_scalars(killed)["train/loss"] == read_scalars(straight)["train/loss"]


@pytest.mark.parametrize("overrides, message", [
    (["model.name=toks:TinyLM"], "TinyLM.forward takes none of targets, labels, target, y"),
    (["loss.output=0"], "no one-value loss at 0 in the model's output, a tuple (0: tensor [2, 12, 11], 1: tensor [])"),
], ids=["no-targets-parameter", "not-a-loss"])
def test_the_models_own_loss_misconfigured_stops_at_start_saying_what_to_set(project, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_harness(project / "gpt.yaml", [f"run.output_dir={run_dir}", *overrides], nproc=1, launcher="python",
                       check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
