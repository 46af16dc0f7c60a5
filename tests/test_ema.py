"""train.ema: the float32 moving average of the weights is torch.lerp of the weights after each
step, a checkpointed part (a SIGKILL + resume continues it bitwise, 1 process and FSDP2 on 2
ranks, sharded like the parameters), final/ema.safetensors loads into the user's model with tied
weights kept tied, and `evaluate: true` validates on the averages without touching the training
weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

from harness.ema import EMA
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

MODELS = '''\
import torch
from torch import nn


class TiedNet(nn.Module):
    """An embedding-and-head style tie (one weight under two names), dropout, a BatchNorm buffer."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 16):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.again = nn.Linear(hidden, hidden, bias=False)
        self.again.weight = self.mid.weight
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x):
        h = self.drop(torch.relu(self.mid(torch.relu(self.norm(self.inp(x))))))
        return self.out(torch.relu(self.again(h)))
'''

RECIPE = """\
data: {name: breast_cancer, batch_size: 64, val_size: 0.2}
model: {name: emamodels:TiedNet, hidden: 16}
optim: {name: adam, lr: 0.01}
schedule: {name: plateau, monitor: val_loss, patience: 0, factor: 0.5}
train: {epochs: 3, ema: {decay: 0.8, start_step: 3, every_steps: 2}}
checkpoint: {every_steps: 5}
"""
STEPS = 18  # 364 training rows / 64 = 6 steps an epoch (the last one short), 3 epochs
KILL_AT_STEP = 12  # mid epoch 2... the last checkpoint before it is step 10

# Runs the recipe in one process, recording the weights each step starts from (so after each
# step) through the harness's step hook; the test recomputes the average from them.
RECORDER = '''\
import sys, torch, harness
from harness import faults
seen = []
faults.before_each_step(lambda t: seen.append({n: p.detach().clone() for n, p in t.raw_model.named_parameters()}))
harness.train(sys.argv[1], sys.argv[2:])
torch.save(seen, sys.argv[1] + ".weights.pt")
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ema_project")
    (folder / "emamodels.py").write_text(MODELS)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


@pytest.fixture(scope="module")
def straight(project, tmp_path_factory) -> Path:
    """One uninterrupted run, weights recorded after every step."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    recipe = project / "recipe.yaml"
    proc = subprocess.run([sys.executable, "-c", RECORDER, str(recipe), f"run.output_dir={run_dir}"], cwd=project,
                          env=subprocess_env(PYTHONPATH=f"{ROOT}:{project}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir / "weights.pt").write_bytes(Path(str(recipe) + ".weights.pt").read_bytes())
    return run_dir


def test_the_average_is_torch_lerp_of_the_weights_after_each_step(straight):
    before_steps = torch.load(straight / "weights.pt", weights_only=True)  # weights before steps 1..18
    final = weights(straight)
    assert len(before_steps) == STEPS
    after = before_steps[1:] + [{name: final[name] for name in before_steps[0]}]
    decay, start, every = 0.8, 3, 2
    average = {name: w.float().clone() for name, w in before_steps[0].items()}  # the initial weights
    for step, w in enumerate(after, start=1):
        for name in average:
            if step < start:
                average[name] = w[name].float().clone()
            elif (step - start) % every == 0:
                average[name] = torch.lerp(average[name], w[name].float(), 1 - decay)
    ema = load_file(straight / "final" / "ema.safetensors")
    # Parameters averaged (tied ones once), buffers as the model holds them: a model's state dict.
    assert set(ema) == set(final) - {"again.weight"}
    for name in average:
        assert torch.equal(ema[name], average[name]), name
        assert not torch.equal(ema[name], final[name]), name
    for buffer in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        assert torch.equal(ema[buffer], final[buffer])


def test_final_ema_loads_into_the_users_model_with_its_tie(project, straight):
    sys.path.insert(0, str(project))
    try:
        from emamodels import TiedNet
    finally:
        sys.path.remove(str(project))
    model = TiedNet(30, 1)
    missing, unexpected = load_model(model, str(straight / "final" / "ema.safetensors"))
    assert not missing and not unexpected
    assert model.again.weight is model.mid.weight
    assert torch.equal(model.mid.weight, load_file(straight / "final" / "ema.safetensors")["mid.weight"])


def test_a_sigkilled_run_resumes_the_average_bitwise(project, straight, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = [f"run.output_dir={run_dir}"]
    killed = run_harness(project / "recipe.yaml", overrides, nproc=1, launcher="python", check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT_STEP)))
    assert killed.returncode != 0 and not (run_dir / "final").exists()
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-000010" and (newest / "ema.safetensors").is_file()
    inspect = subprocess.run([sys.executable, "-m", "harness", "ckpt", "inspect", str(newest)], cwd=ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    line = next(line for line in inspect.stdout.splitlines() if "ema.safetensors" in line)
    assert " ema " in f" {line} ", inspect.stdout
    resumed = run_harness(project / "recipe.yaml", overrides, nproc=1, launcher="python")
    assert "step 10" in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(run_dir))
    assert_bitwise_equal(load_file(straight / "final" / "ema.safetensors"), load_file(run_dir / "final" / "ema.safetensors"))
    assert read_json(straight / "metrics.json") == read_json(run_dir / "metrics.json")


def test_evaluate_validates_on_the_average_and_leaves_the_training_weights_alone(project, straight, tmp_path):
    # StepLR: the LR does not depend on the validation, so the training is the same in all three.
    common = ["schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.7"]
    runs = {}
    for name, extra in (("plain", ["train.ema=null"]), ("ema", ["train.ema.evaluate=true"]),
                        ("not_started", ["train.ema.evaluate=true", "train.ema.start_step=1000"])):
        runs[name] = tmp_path / name
        run_harness(project / "recipe.yaml", [f"run.output_dir={runs[name]}", *common, *extra], nproc=1,
                    launcher="python")
    metrics = {name: read_json(folder / "metrics.json") for name, folder in runs.items()}
    assert_bitwise_equal(weights(runs["plain"]), weights(runs["ema"]))
    assert_bitwise_equal(weights(runs["plain"]), weights(runs["not_started"]))
    # Before start_step the average is the weights: the same validation as without an average.
    for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        assert metrics["not_started"][key] == metrics["plain"][key], key
    # Validation and the test split both ran on the averages.
    assert metrics["ema"]["val_loss"] != metrics["plain"]["val_loss"]
    assert metrics["ema"]["test_loss"] != metrics["plain"]["test_loss"]


def test_the_average_of_bfloat16_weights_is_kept_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.99, start_step=0, every_steps=1)
    expected = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.after_step(step)
        for name, p in model.named_parameters():
            expected[name] = torch.lerp(expected[name], p.detach().float(), 0.01)
    for name, average in ema.state().items():
        assert average.dtype == torch.float32 and torch.equal(average, expected[name]), name
        # A bfloat16 average could not hold these: 1% steps are below its resolution.
        assert not torch.equal(average.bfloat16().float(), average), name


def test_fsdp2_shards_the_average_like_the_parameters_and_resumes_it_bitwise(project, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Evaluated on the averages too: the plateau schedule follows the sharded averages' val_loss.
    # The metrics are bitwise only if every rank validates with rank 0's BatchNorm statistics (the
    # ones the checkpoint holds): FSDP2 does not keep the ranks' buffers equal.
    fsdp = ["train.strategy=fsdp", "train.ema.evaluate=true"]
    run_harness(project / "recipe.yaml", [f"run.output_dir={straight}", *fsdp], nproc=2)
    overrides = [f"run.output_dir={resumed}", *fsdp]
    killed = run_harness(project / "recipe.yaml", overrides, nproc=2, check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT_STEP)))
    assert killed.returncode != 0 and not (resumed / "final").exists()
    saved = sorted((resumed / "checkpoints").glob("step-*"))[-1]
    layout = read_json(saved / "sharding.json")
    assert layout["ema"]["mid.weight"]["rows"] == [[0, 8], [8, 16]]
    rows = [load_file(saved / f"ema-rank-{rank}.safetensors") for rank in (0, 1)]
    assert rows[0]["mid.weight"].shape == (8, 16) and rows[1]["mid.weight"].shape == (8, 16)
    assert not (saved / "ema.safetensors").exists()
    run_harness(project / "recipe.yaml", overrides, nproc=2)
    assert_bitwise_equal(weights(straight), weights(resumed))
    assert_bitwise_equal(load_file(straight / "final" / "ema.safetensors"), load_file(resumed / "final" / "ema.safetensors"))
    assert read_json(straight / "metrics.json") == read_json(resumed / "metrics.json")


def test_a_run_initialized_from_another_averages_from_the_weights_it_starts_from(project, straight, tmp_path):
    run_dir = tmp_path / "init"
    run_harness(project / "recipe.yaml", [f"run.output_dir={run_dir}", f"run.init_from={straight}",
                                          "train.max_steps=1", "train.ema.start_step=0", "train.ema.every_steps=1",
                                          "train.ema.decay=0.5"],
                nproc=1, launcher="python")
    started_from, after_one_step = weights(straight), weights(run_dir)
    ema = load_file(run_dir / "final" / "ema.safetensors")
    for name in ema:
        if name.startswith("norm.running") or name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(ema[name], torch.lerp(started_from[name], after_one_step[name], 0.5)), name
