"""FSDP2 on CPU ranks: the same training as DDP, sharded checkpoints that reshard on resume."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.tracking import read_scalars
from tests.conftest import (BIN, ROOT, assert_bitwise_equal, free_port, harness_cli, lr_series, run_harness,
                            subprocess_env, weights)

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
FSDP_2PROC = ROOT / "recipes/accelerate/fsdp_cpu_2proc.yaml"
# 455 samples, batch 64 -> 8 steps per epoch, 3 epochs = 24 steps; warmup + cosine per step.
BASE = ["data.batch_size=64", "train.epochs=3", "train.log_every_steps=2", "checkpoint.every_steps=5",
        "checkpoint.keep_last=10", "schedule.name=cosine", "schedule.interval=step", "schedule.warmup_steps=4",
        "model.hidden=[33, 17]"]  # odd sizes: the ranks' shards differ in length
KILL_AT = 13  # mid epoch 2; resumes from step 10
# A copy of a finished run that ends at its step-15 checkpoint (5 + 2 steps into epoch 2, of 8).
UP_TO_STEP_15 = ("step-000016", "step-000020", "step-000024", "final", "metrics.json")


def fsdp(run_dir: Path, extra=(), nproc=2, env=None, check=True, base=BASE):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(FSDP_2PROC), "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), "-m", "harness", "train", str(RECIPE),
           f"run.output_dir={run_dir}", *base, *extra]
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def ddp(run_dir: Path, extra=(), nproc=2, env=None, check=True):
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *BASE, *extra], nproc=nproc, env=env, check=check,
                       launcher="python" if nproc == 1 else "accelerate")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One FSDP and one DDP run of the same recipe on 2 ranks, trained once, inspected by many tests."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"fsdp": root / "fsdp", "ddp": root / "ddp"}
    fsdp(out["fsdp"])
    ddp(out["ddp"])
    return out


def assert_trains_like_ddp(fsdp_run: Path, ddp_run: Path, groups=("default",)) -> None:
    """The same LR series per group, the same logged steps with losses to 1e-4, weights to 1e-5."""
    for group in groups:
        assert lr_series(fsdp_run, group) == lr_series(ddp_run, group), group
    a, b = read_scalars(fsdp_run)["train/loss"], read_scalars(ddp_run)["train/loss"]
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 3
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4)
    fsdp_w, ddp_w = weights(fsdp_run), weights(ddp_run)
    assert fsdp_w.keys() == ddp_w.keys()
    for name in ddp_w:
        assert torch.allclose(fsdp_w[name], ddp_w[name], atol=1e-5), name


def test_fsdp_trains_like_ddp_same_lrs_and_losses_within_float_tolerance(runs):
    assert_trains_like_ddp(runs["fsdp"], runs["ddp"])


def test_accumulation_clipping_and_a_param_group_train_under_fsdp_as_under_ddp(tmp_path):
    """The loop's own parts under FSDP2: 2 micro-batches per step, the global norm clipped over the
    shards (small enough to clip every step), a param group with its own LR."""
    extra = ["train.grad_accum_steps=2", "train.max_grad_norm=0.05", "train.epochs=2",
             "optim.param_groups=[{name: first_layer, params: ['layers.0.*'], lr: 3e-4}]"]
    fsdp(tmp_path / "fsdp", extra)
    ddp(tmp_path / "ddp", extra)
    assert_trains_like_ddp(tmp_path / "fsdp", tmp_path / "ddp", groups=("default", "first_layer"))
    assert lr_series(tmp_path / "fsdp", "first_layer")[-1][1] < 3e-4


def test_fsdp_checkpoints_hold_each_ranks_own_rows_and_no_pickle(runs):
    folder = runs["fsdp"] / "checkpoints" / "step-000010"
    names = {p.name for p in folder.iterdir()}
    assert {"model-rank-0.safetensors", "model-rank-1.safetensors", "optimizer-rank-0.safetensors",
            "optimizer-rank-1.safetensors", "sharding.json"} <= names and "model.safetensors" not in names
    layout = json.loads((folder / "sharding.json").read_text())
    assert layout["world_size"] == 2
    assert layout["model"]["layers.0.weight"] == {"shape": [33, 30], "dtype": "float32", "rows": [[0, 17], [17, 33]]}
    assert load_file(folder / "model-rank-1.safetensors")["layers.0.weight"].shape == (16, 30)
    assert not any(name.endswith((".pt", ".pkl", ".metadata")) for name in names)


def test_ckpt_export_of_an_fsdp_checkpoint_equals_the_ddp_runs_weights(runs, tmp_path):
    out = tmp_path / "model.safetensors"
    harness_cli("ckpt", "export", runs["fsdp"], out, timeout=120)
    exported, ddp_w = load_file(out), weights(runs["ddp"])
    assert exported.keys() == ddp_w.keys()
    for name in ddp_w:
        assert torch.allclose(exported[name], ddp_w[name], atol=1e-5), name


def test_fsdp_sigkilled_mid_epoch_resumes_bitwise(runs, tmp_path):
    killed = tmp_path / "killed"
    proc = fsdp(killed, check=False, env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT)))
    assert proc.returncode != 0
    fsdp(killed)
    a, b = weights(killed), weights(runs["fsdp"])
    assert_bitwise_equal(a, b)
    assert lr_series(killed) == lr_series(runs["fsdp"])


@pytest.mark.parametrize("after", [1, 3])
def test_an_fsdp_checkpoint_resumes_on_another_world_size_continuing_the_schedule_and_the_epoch(runs, tmp_path,
                                                                                                  after):
    moved = tmp_path / "moved"
    shutil.copytree(runs["fsdp"], moved, ignore=shutil.ignore_patterns(*UP_TO_STEP_15))
    trace = tmp_path / "trace"
    extra = ["train.strategy=fsdp"] if after == 1 else []
    env = subprocess_env(HARNESS_TRACE_SAMPLES=str(trace))
    proc = (ddp(moved, extra, nproc=1, env=env) if after == 1 else fsdp(moved, nproc=after, env=env))
    assert "resumed from" in proc.stdout and "step-000015" in proc.stdout
    assert lr_series(moved) == lr_series(runs["fsdp"])
    # Epoch 1 (steps 9-16) was checkpointed at step 15: 7 global batches of 64 done, the last 7 samples left.
    records = [json.loads(line) for path in tmp_path.glob("trace.rank*") for line in path.read_text().splitlines()]
    rest = sorted(i for r in records if r["epoch"] == 1 for i in r["indices"])
    assert len(rest) == 455 - 7 * 64 and len(set(rest)) == len(rest), "each remaining sample once"
    assert {r["step"] for r in records if r["epoch"] == 1} == {16}
    final = weights(moved)
    for name, tensor in weights(runs["fsdp"]).items():
        assert torch.allclose(final[name], tensor, atol=1e-5), name


def test_a_ddp_checkpoint_resumes_under_fsdp_and_an_fsdp_one_under_ddp(runs, tmp_path):
    to_fsdp, to_ddp = tmp_path / "to_fsdp", tmp_path / "to_ddp"
    keep = shutil.ignore_patterns(*UP_TO_STEP_15)
    shutil.copytree(runs["ddp"], to_fsdp, ignore=keep)
    shutil.copytree(runs["fsdp"], to_ddp, ignore=keep)
    fsdp(to_fsdp)
    ddp(to_ddp)
    for moved in (to_fsdp, to_ddp):
        assert lr_series(moved) == lr_series(runs["ddp"])
        for name, tensor in weights(runs["ddp"]).items():
            assert torch.allclose(weights(moved)[name], tensor, atol=1e-5), name


@pytest.mark.parametrize("damage", ["pickle", "missing", "truncated"])
def test_a_damaged_shard_is_never_unpickled_and_the_resume_falls_back_to_the_previous_checkpoint(runs, tmp_path,
                                                                                                 damage):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run_dir, ignore=shutil.ignore_patterns(*UP_TO_STEP_15))
    shard = run_dir / "checkpoints" / "step-000015" / "model-rank-1.safetensors"
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    if damage == "pickle":
        shard.write_bytes(pickle.dumps({"w": Payload()}))
    elif damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:64])
    proc = fsdp(run_dir)
    assert "skipping damaged checkpoint" in proc.stdout + proc.stderr and "model-rank-1.safetensors" in proc.stdout + proc.stderr
    assert "step-000010" in proc.stdout, "resumed from the previous checkpoint"
    assert not marker.exists()


@pytest.mark.parametrize("variable,name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                           ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
                                           ("PJRT_DEVICE", "XLA/TPU")])
def test_an_accelerate_config_asking_for_another_engine_is_refused_not_run_as_ddp(tmp_path, variable, name):
    proc = run_harness(RECIPE, [f"run.output_dir={tmp_path / 'run'}", "train.epochs=1"], nproc=1, launcher="python",
                       check=False, env=subprocess_env(**{variable: "true"}))
    assert proc.returncode == 2 and name in proc.stderr and "FSDP" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_recipe_saying_ddp_under_an_fsdp_config_is_refused(tmp_path):
    proc = fsdp(tmp_path / "run", ["train.strategy=ddp", "train.epochs=1"], check=False)
    # Each rank exits 2; the launcher reports that as its own failure (1).
    assert proc.returncode != 0
    assert "the recipe says ddp but the Accelerate config asks for FSDP" in proc.stdout + proc.stderr


BUFFERED = """
import os

import torch
from torch import nn


class Buffered(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU())
        self.head = nn.Linear(17, out_dim)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, in_dim))
        self.register_buffer("shift", 0.1 * torch.randn(in_dim), persistent=False)  # not in any state dict
        with open(os.environ["BUILT_LOG"], "a") as log:  # where this rank's memory was built
            log.write(f"{os.environ['RANK']} {self.head.weight.device.type}\\n")

    def forward(self, x):
        return self.head(self.body(x * self.scale + self.shift))
"""


def test_rank0_init_builds_the_model_once_and_trains_bitwise_like_every_rank_building_it(tmp_path):
    (tmp_path / "bufmodel.py").write_text(BUFFERED)
    base = [b for b in BASE if not b.startswith("model.")] + ["model.name=bufmodel:Buffered"]
    every, rank0 = tmp_path / "every_rank", tmp_path / "rank0"
    built = {}
    for run_dir, init in ((every, "every_rank"), (rank0, "rank0")):
        log = tmp_path / f"built-{init}.txt"
        fsdp(run_dir, [f"train.fsdp_init={init}"], base=base,
             env=subprocess_env(PYTHONPATH=str(tmp_path), BUILT_LOG=str(log)))
        built[init] = sorted(log.read_text().splitlines())
    assert built == {"every_rank": ["0 cpu", "1 cpu"], "rank0": ["0 cpu", "1 meta"]}, built
    a, b = weights(every), weights(rank0)
    assert "scale" in a  # the non-persistent buffer reached rank 1 too, or its updates would differ
    assert_bitwise_equal(a, b)
    assert read_scalars(every)["train/loss"] == read_scalars(rank0)["train/loss"]
