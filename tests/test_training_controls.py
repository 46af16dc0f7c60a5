"""Gradient accumulation and clipping: optimizer steps, not micro-batches, drive the schedule."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from harness.tracking import read_scalars
from tests.conftest import ROOT, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
COMMON = ["train.epochs=3", "data.batch_size=32", "schedule.step_size=1", "schedule.gamma=0.7"]


def final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


def test_two_micro_batches_of_16_train_like_one_batch_of_32(tmp_path):
    whole, accumulated, two_ranks = tmp_path / "whole", tmp_path / "accumulated", tmp_path / "two_ranks"
    run_harness(RECIPE, [f"run.output_dir={whole}", *COMMON], nproc=1, launcher="python")
    run_harness(RECIPE, [f"run.output_dir={accumulated}", *COMMON, "train.grad_accum_steps=2"], nproc=1,
                launcher="python")
    run_harness(RECIPE, [f"run.output_dir={two_ranks}", *COMMON, "train.grad_accum_steps=2"], nproc=2)
    lrs = {name: [v for _, v in read_scalars(d)["lr/default"]] for name, d in
           [("whole", whole), ("accumulated", accumulated), ("two_ranks", two_ranks)]}
    assert len(lrs["whole"]) == 3 * 15, "15 optimizer steps per epoch, not 30 micro-batches"
    assert lrs["whole"] == lrs["accumulated"] == lrs["two_ranks"]
    reference = final_weights(whole)
    for other in (accumulated, two_ranks):
        got = final_weights(other)
        for name in reference:
            assert torch.allclose(reference[name], got[name], rtol=1e-4, atol=1e-6), name
        assert read_json(other / "metrics.json")["steps"] == 45


def test_gradient_clipping_scales_the_step_to_the_max_norm_and_keeps_the_schedule(tmp_path):
    # One plain SGD step: w1 = w0 - lr * g * min(1, max_norm / |g|), |g| the norm over all parameters.
    def one_step(name, *extra):
        run_dir = tmp_path / name
        run_harness(RECIPE, [f"run.output_dir={run_dir}", "optim.name=sgd", "train.max_steps=1", *extra], nproc=1,
                    launcher="python")
        return torch.cat([t.flatten() for _, t in sorted(final_weights(run_dir).items())])

    start = one_step("start", "optim.lr=1e-30")  # the initial weights (the seed fixes them): a step below any ulp
    free = one_step("free", "optim.lr=0.05") - start
    clipped = one_step("clipped", "optim.lr=0.05", "train.max_grad_norm=0.01") - start
    assert free.norm() > 0.05 * 0.01 * 10, "the gradient is well above the max norm"
    # (Differences of float32 weights: about 1e-3 relative rounding on steps this small.)
    assert torch.isclose(clipped.norm(), torch.tensor(0.05 * 0.01), rtol=5e-3), clipped.norm()
    cosine = torch.nn.functional.cosine_similarity(clipped.double(), free.double(), dim=0)
    assert cosine > 0.9999, f"the clipped step points elsewhere than the free one: cosine {cosine}"
    # Over epochs: a different trajectory, the same LR schedule.
    long_free, long_clipped = tmp_path / "long_free", tmp_path / "long_clipped"
    run_harness(RECIPE, [f"run.output_dir={long_free}", *COMMON, "optim.lr=0.05"], nproc=1, launcher="python")
    run_harness(RECIPE, [f"run.output_dir={long_clipped}", *COMMON, "optim.lr=0.05", "train.max_grad_norm=0.01"],
                nproc=1, launcher="python")
    assert read_scalars(long_free)["lr/default"] == read_scalars(long_clipped)["lr/default"]


def test_output_without_a_terminal_has_plain_progress_lines_and_no_carriage_returns(tmp_path):
    proc = run_harness(RECIPE, [f"run.output_dir={tmp_path / 'run'}", "train.epochs=2", "train.progress_every_s=0"],
                       nproc=2)
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[harness] step ")]
    assert len(lines) == 30 and lines[-1].startswith("[harness] step 30/30 | epoch 2")
    assert "[harness rank 1]" not in proc.stdout, "other ranks stay quiet"


def test_early_stopping_stops_every_rank_at_the_same_epoch_and_survives_resume(tmp_path):
    run_dir = tmp_path / "run"
    # min_delta 10 (in loss units): nothing after the first validation counts as an improvement.
    overrides = [f"run.output_dir={run_dir}", "train.epochs=10", "train.early_stopping_patience=2",
                 "train.early_stopping_min_delta=10"]
    run_harness(RECIPE, overrides, nproc=2)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["early_stopped"] is True and metrics["epochs"] == 4 and metrics["steps"] == 60
    ranks = [read_json(run_dir / "ranks" / f"rank-{r}.json") for r in (0, 1)]
    assert len(ranks[0]["local_validations"]) == len(ranks[1]["local_validations"]) == 4
    # Running the command again resumes from the final checkpoint and does not train further.
    again = run_harness(RECIPE, overrides, nproc=2)
    assert "resumed from" in again.stdout
    assert read_json(run_dir / "metrics.json")["steps"] == 60


def test_bf16_mixed_precision_trains_on_two_cpu_ranks_with_the_same_schedule(tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_harness(RECIPE, [f"run.output_dir={fp32}", *COMMON], nproc=2)
    proc = run_harness(RECIPE, [f"run.output_dir={bf16}", *COMMON, "train.mixed_precision=bf16"], nproc=2)
    assert "mixed precision bf16" in proc.stdout
    assert read_scalars(fp32)["lr/default"] == read_scalars(bf16)["lr/default"]
    a, b = read_json(fp32 / "metrics.json"), read_json(bf16 / "metrics.json")
    # bf16 keeps 8 bits of mantissa: autocast really ran (not bitwise fp32), and trained the same model.
    assert 1e-5 < abs(a["val_loss"] - b["val_loss"]) / a["val_loss"] < 0.1, (a["val_loss"], b["val_loss"])
    assert b["test_accuracy"] > 0.9


DTYPE_PROBE = """\
import os
import torch
from torch import nn


class DtypeProbe(nn.Module):
    \"\"\"Fails its forward unless the first layer's output has the dtype $EXPECT names.\"\"\"

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc, self.out = nn.Linear(in_dim, 8), nn.Linear(8, out_dim)

    def forward(self, x):
        h = self.fc(x)
        if h.dtype != getattr(torch, os.environ["EXPECT"]):
            raise RuntimeError(f"the forward ran in {h.dtype}")
        return self.out(torch.relu(h)).float()
"""


def test_bf16_runs_the_forward_under_bf16_autocast_and_fp32_does_not(tmp_path):
    (tmp_path / "dtype_probe.py").write_text(DTYPE_PROBE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {name: breast_cancer, batch_size: 32}\nmodel: {name: dtype_probe:DtypeProbe}\n"
                      "optim: {name: adam, lr: 0.001}\ntrain: {epochs: 1}\n")

    def train(name: str, expect: str, *extra: str):
        env = subprocess_env(EXPECT=expect, PYTHONPATH=f"{tmp_path}:{ROOT}")
        proc = run_harness(recipe, [f"run.output_dir={tmp_path / name}", *extra], nproc=1, launcher="python",
                           env=env, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    assert train("bf16", "bfloat16", "train.mixed_precision=bf16")[0] == 0
    assert train("fp32", "float32")[0] == 0
    code, text = train("wrong", "bfloat16")  # no mixed precision: the forward runs in float32
    assert code == 1 and "the forward ran in torch.float32" in text, text[-2000:]


def test_the_save_policy_saves_at_step_intervals_inside_epochs_and_at_epoch_ends():
    from harness.loop import SavePolicy

    policy = SavePolicy(every_steps=5, every_epochs=None, epochs=3)
    assert [s for s in range(1, 16) if policy.after_step(s, epoch_done=(s % 8 == 0))] == [5, 10, 15]
    assert policy.after_step(16, epoch_done=True) is None, "the epoch-end save covers an epoch's last step"
    assert policy.after_epoch(2, 16, stopping=False) is None
    assert policy.after_epoch(3, 24, stopping=False) == "epoch_end", "the run's end"
    assert policy.after_epoch(2, 15, stopping=False) == "epoch_end", "a step interval landing on an epoch end"
    assert policy.after_epoch(1, 8, stopping=True) == "epoch_end", "early stopping"
    every_epoch = SavePolicy(every_steps=None, every_epochs=2, epochs=5)
    assert [e for e in range(1, 6) if every_epoch.after_epoch(e, e * 8, stopping=False)] == [2, 4, 5]
