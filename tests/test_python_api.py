"""harness.train() from a user's own script: objects built in Python, the YAML run's guarantees.

The script lives outside the package, builds its model and tensors itself, and is launched the way
the docstring of harness/api.py says: ``accelerate launch ... train.py [overrides]``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.tracking import read_scalars
from tests.conftest import assert_bitwise_equal, weights, BIN, CPU_2PROC, ROOT, free_port, read_json, subprocess_env

SCRIPT = '''\
import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

import harness


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.hidden(x))))


calls = 0


def loss(outputs, targets):
    global calls
    calls += 1
    if calls == int(os.environ.get("SEND_ME_SIGTERM_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice in the middle of an epoch
    # Targets reach the loss as the data gave them (binary labels as floats).
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.reshape(-1).float(), reduction="none")


def agreement(outputs, targets):
    return ((outputs.reshape(-1) > 0).long() == targets.reshape(-1).long()).float()


if __name__ == "__main__":
    print("harness from", harness.__file__, flush=True)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    data = {"train": (x[:240], y[:240]), "val": (x[240:], y[240:]), "task": "binary"}
    summary = harness.train(
        model=model, data=data, loss=loss, metrics=[agreement],
        recipe={"data": {"batch_size": 24},  # 240 samples: 10 steps an epoch
                "optim": {"name": "adam", "lr": 0.02},
                "schedule": {"name": "plateau", "monitor": "val_agreement", "mode": "max", "patience": 0,
                             "factor": 0.5, "threshold": 0.5, "threshold_mode": "abs"},
                "train": {"epochs": 3, "log_every_steps": 1},
                "checkpoint": {"every_steps": 4}},
        overrides=sys.argv[1:])
    print("summary", summary, flush=True)
'''
STEPS = 30


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "project" / "train.py"
    path.parent.mkdir()
    path.write_text(SCRIPT)
    return path


def launch(script: Path, run_dir: Path, nproc: int = 2, overrides=(), **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch train.py``, or plain ``python train.py`` for one process (its own exit code)."""
    if nproc == 1:
        command = [sys.executable, str(script)]
    else:
        command = [str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes",
                   str(nproc), "--main_process_port", str(free_port()), str(script)]
    # The script's folder comes first on sys.path, not the working directory: point it at this tree.
    environment = subprocess_env(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([*command, f"run.output_dir={run_dir}", *overrides], cwd=script.parent, env=environment,
                          capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_a_script_calling_harness_train_on_two_ranks_resumes_bitwise_after_a_sigkill(script, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = ok(launch(script, straight))
    assert f"harness from {ROOT / 'harness' / '__init__.py'}" in first.stdout
    summary = read_json(straight / "metrics.json")
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["val_agreement"] >= 0.85  # a linear rule: the user's metric, reported by its name

    crashed = launch(script, killed, HARNESS_TEST_KILL_AT_STEP="14")
    assert crashed.returncode != 0 and not (killed / "final").exists()
    resumed = ok(launch(script, killed))  # the same command again
    assert "step 12, 48 samples into the epoch" in resumed.stdout + resumed.stderr
    assert_bitwise_equal(weights(straight), weights(killed))

    # Plateau on the user's metric: every rank holds the same LRs, and the LR did drop.
    # The agreement must rise by 0.5 to count as better: after epoch 1 it never does, so each later
    # validation halves the LR (TensorBoard stores float32).
    lrs = [lr for _, lr in read_scalars(straight)["lr/default"]]
    assert lrs == torch.tensor([0.02] * 20 + [0.01] * 10, dtype=torch.float32).tolist()
    assert read_scalars(killed)["lr/default"] == read_scalars(straight)["lr/default"]
    ranks = [read_json(straight / "ranks" / f"rank-{r}.json")["lrs"] for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"default": 0.005}

    # The checkpoint records where the objects came from: the user's script.
    components = read_json(straight / "checkpoints" / "step-000030" / "trainer.json")["components"]
    assert components["model"]["target"] == "__main__:Net"
    assert Path(components["model"]["file"]) == script.resolve()


def test_a_script_preempted_by_sigterm_saves_mid_epoch_and_exits_75(script, tmp_path):
    run_dir = tmp_path / "run"
    # The 13th loss call is step 12 (epoch 1: 10 steps and one validation batch): the harness saves at
    # that step's end, mid-epoch, says where in PREEMPTED.json, and harness.train exits the script with 75.
    # (Resuming from a mid-epoch checkpoint is the SIGKILL test's subject.)
    # Call 1 is the harness's check of the loss before training; call 14 is step 13's.
    preempted = launch(script, run_dir, nproc=1, SEND_ME_SIGTERM_AT_CALL="14")
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    assert "summary" not in preempted.stdout  # harness.train did not return
    marker = read_json(run_dir / "PREEMPTED.json")
    assert marker["signal"] == "SIGTERM" and marker["step"] == 12
    assert Path(marker["checkpoint"]) == run_dir / "checkpoints" / "step-000012"
    assert read_json(run_dir / "checkpoints" / "step-000012" / "trainer.json")["samples_in_epoch"] == 48
    assert not (run_dir / "final").exists()


DATASET_SCRIPT = '''\
import sys

import torch

import harness


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


if __name__ == "__main__":
    torch.manual_seed(0)
    harness.train(model=torch.nn.Linear(4, 2), data={"train": Rows(64, 0), "val": Rows(16, 1)},
                  recipe={"data": {"batch_size": 16}, "train": {"epochs": 1}}, overrides=sys.argv[1:])
'''


def test_datasets_given_from_python_are_read_with_the_recipes_loader_settings(tmp_path):
    script = tmp_path / "project" / "train.py"
    script.parent.mkdir()
    script.write_text(DATASET_SCRIPT)
    proc = ok(launch(script, tmp_path / "run", nproc=1, overrides=["data.num_workers=2"]))
    assert "64 train, 16 val samples; 2 loader workers" in proc.stdout, proc.stdout
