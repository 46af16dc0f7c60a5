"""A user's own model, data, loss and metric, named by import path in a recipe beside their module.

Everything here lives outside the package, in a temporary project folder, the way a user works:
``mymodels.py`` and ``recipe.yaml`` side by side, ``harness train recipe.yaml`` from anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.tracking import read_scalars
from tests.conftest import ROOT, assert_bitwise_equal, harness_cli, read_json, run_harness, subprocess_env, weights

SEEDS = ROOT / "recipes" / "seeds"

USER_MODULE = '''\
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, out_dim))

    def forward(self, x):
        return self.body(x)


def blobs(samples: int = 400, features: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    w = torch.randn(features, generator=g)
    y = (x @ w > 0).long()
    a, b = int(0.7 * samples), int(0.85 * samples)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:]), "task": "binary"}


def weighted_bce(outputs, targets, pos_weight: float = 1.0):
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.reshape(-1).float(),
                                              pos_weight=torch.tensor(pos_weight), reduction="none")


def hit_rate(outputs, targets):
    return ((outputs.reshape(-1) > 0).long() == targets.reshape(-1)).float()
'''

# 400 samples -> 280 train; global batch 28 -> 10 steps per epoch, 30 steps in 3 epochs.
RECIPE = '''\
run: {name: mine}
data: {name: "MODULE:blobs", batch_size: 28, samples: 400}
model: {name: "MODULE:TinyNet", hidden: 12}
loss: {name: "MODULE:weighted_bce", pos_weight: 1.5}
metrics: ["MODULE:hit_rate"]
optim: {name: SGD, lr: 0.2, momentum: 0.9}
schedule: {name: step, interval: step, step_size: 7, gamma: 0.5}
train: {epochs: 3, log_every_steps: 1}
'''
STEPS = 30


def write_project(folder: Path, module: str = "mymodels", extra_code: str = "") -> Path:
    """A user's project: their module and a recipe naming it; returns the recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(USER_MODULE + extra_code)
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.replace("MODULE", module))
    return recipe


def stock_step_lrs(lr: float, step_size: int, gamma: float, steps: int) -> list[float]:
    """What torch's own StepLR gives when stepped after every optimizer step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def float32(values) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).tolist()


# --------------------------------------------------------------------------------------------
# 1. The user's own components on two ranks: LR, exact resume, verify-resume, inspect, check
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One project trained on 2 ranks straight through, and again killed at step 14 (after the
    mid-epoch checkpoint of step 12) with its module edited before the rerun resumes."""
    root = tmp_path_factory.mktemp("project")
    recipe = write_project(root / "project")
    every = ["checkpoint.every_steps=4", "checkpoint.monitor=val_hit_rate", "checkpoint.monitor_mode=max"]
    straight, killed = root / "straight", root / "killed"
    run_harness(recipe, [f"run.output_dir={straight}", *every], nproc=2)
    crashed = run_harness(recipe, [f"run.output_dir={killed}", *every], nproc=2, check=False,
                          env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="14"))
    # A comment only: the code computes the same, but the file is not the one the checkpoint saw.
    with (root / "project" / "mymodels.py").open("a") as handle:
        handle.write("# edited after the crash\n")
    resumed = run_harness(recipe, [f"run.output_dir={killed}", *every], nproc=2)
    return {"recipe": recipe, "straight": straight, "killed": killed, "crashed": crashed, "resumed": resumed}


def test_the_lr_of_a_users_run_on_two_ranks_is_torchs_own_steplr_stepped_every_step(two_rank_runs):
    logged = read_scalars(two_rank_runs["straight"])["lr/default"]
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert [lr for _, lr in logged] == float32(stock_step_lrs(0.2, 7, 0.5, STEPS))


def test_a_users_metric_is_reported_as_val_and_test_with_its_own_name_and_can_be_monitored(two_rank_runs):
    summary = read_json(two_rank_runs["straight"] / "metrics.json")
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    # A linearly separable problem: the user's hit rate is high on both held-out splits.
    assert summary["val_hit_rate"] >= 0.85 and summary["test_hit_rate"] >= 0.85
    scalars = read_scalars(two_rank_runs["straight"])
    assert [s for s, _ in scalars["val/hit_rate"]] == [10, 20, 30]
    # checkpoint.monitor=val_hit_rate (max): the best is the highest of the three validations.
    validations = [value for _, value in scalars["val/hit_rate"]]
    assert summary["best_monitored"] == pytest.approx(max(validations), abs=1e-6)  # TensorBoard: float32


def test_a_users_run_killed_mid_epoch_resumes_to_the_same_weights_bit_for_bit(two_rank_runs):
    crashed, killed = two_rank_runs["crashed"], two_rank_runs["killed"]
    assert crashed.returncode != 0
    log = two_rank_runs["resumed"].stdout + two_rank_runs["resumed"].stderr
    assert "resumed from" in log and "step 12, 56 samples into the epoch" in log
    assert_bitwise_equal(weights(two_rank_runs["straight"]), weights(killed))
    assert read_scalars(killed)["lr/default"] == read_scalars(two_rank_runs["straight"])["lr/default"]


def test_resuming_after_the_users_module_changed_warns_and_names_the_file(two_rank_runs):
    log = two_rank_runs["resumed"].stdout + two_rank_runs["resumed"].stderr
    assert "changed since the checkpoint was written" in log
    assert "mymodels.py" in log and "mymodels:TinyNet" in log


def test_the_checkpoint_records_each_components_import_path_file_and_hash(two_rank_runs):
    folder = two_rank_runs["straight"] / "checkpoints" / "step-000030"
    components = read_json(folder / "trainer.json")["components"]
    module = two_rank_runs["recipe"].parent / "mymodels.py"
    assert components["model"]["target"] == "mymodels:TinyNet"
    assert components["data"]["target"] == "mymodels:blobs"
    assert components["loss"]["target"] == "mymodels:weighted_bce"
    assert [m["target"] for m in components["metrics"]] == ["mymodels:hit_rate"]
    assert components["optim"] == {"target": "sgd"}
    assert Path(components["model"]["file"]) == module.resolve()
    assert len(components["model"]["sha256"]) == 64


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """``harness verify-resume`` on a user's recipe, on one rank, its runs kept in a work folder."""
    root = tmp_path_factory.mktemp("verify")
    recipe = write_project(root / "project", module="verified_mine")
    proc = harness_cli("verify-resume", recipe, "--nproc", "1", "--workdir", root / "work", check_rc=None)
    return proc, root


def test_verify_resume_passes_on_a_users_recipe(verified):
    proc, _ = verified
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout


def test_ckpt_inspect_lists_the_components_without_importing_the_users_module(verified):
    _, root = verified
    checkpoints = sorted((root / "work" / "uninterrupted" / "checkpoints").glob("step-*"))
    assert checkpoints
    shutil.rmtree(root / "project")  # the module is gone: inspecting must not need it
    proc = harness_cli("ckpt", "inspect", checkpoints[-1], check_rc=None)
    assert proc.returncode == 0, proc.stderr
    module = root / "project" / "verified_mine.py"
    for line in ("model: verified_mine:TinyNet", "data: verified_mine:blobs", "loss: verified_mine:weighted_bce",
                 "metrics: verified_mine:hit_rate", "optim: sgd"):
        assert line in proc.stdout
    assert f"({module.resolve()}, sha256 " in proc.stdout
    assert "manifest: verified" in proc.stdout


def test_check_previews_a_users_recipe_with_its_own_model_and_planned_lr(tmp_path, capsys):
    from harness.cli import main

    recipe = write_project(tmp_path / "project", module="checked_mine")
    assert main(["check", str(recipe), "--no-png", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "model: checked_mine:TinyNet, 121 parameters" in out  # 8*12+12 + 12*1+1
    assert "steps per epoch: 10" in out and "total steps: 30" in out
    assert "world size 2: global batch 28; samples per rank per step: ranks 0-1: 14" in out
    table = out.split("planned LR")[1].splitlines()[2:]  # step, epoch, LR of the default group
    planned = {int(line.split()[0]): float(line.split()[2]) for line in table if line.strip()}
    stock = stock_step_lrs(0.2, 7, 0.5, STEPS)
    assert planned and all(lr == pytest.approx(stock[step - 1]) for step, lr in planned.items())


# --------------------------------------------------------------------------------------------
# 2. The seed recipes, unmodified, on 1 and 2 ranks
# --------------------------------------------------------------------------------------------

# (epochs, least val accuracy, least test accuracy or None when the recipe's data has no test split).
# With the recipes' full epochs they reach: seed000 0.99/0.995, seed002 0.956/0.956, seed003 ~0.80.
SEED_RUNS = {
    "seed000_gcn": (10, 0.9, 0.9),  # full-graph steps: 10 steps; 0.985 on 1 rank after 10 epochs
    "seed002_sequential": (4, 0.9, 0.9),  # 15 steps an epoch; 0.94-0.97 from epoch 2 on
    "seed003_net": (2, 0.7, None),  # 13 steps an epoch; 0.80 after epochs 1 and 2, 0.745-0.82 later (chance 0.5)
}


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("seed", SEED_RUNS)
def test_the_seed_recipes_run_unmodified_and_learn(seed, nproc, tmp_path):
    epochs, least_val, least_test = SEED_RUNS[seed]
    run_dir = tmp_path / "run"
    run_harness(SEEDS / f"{seed}.yaml", [f"run.output_dir={run_dir}", f"train.epochs={epochs}"], nproc=nproc,
                launcher="python" if nproc == 1 else "accelerate")
    summary = read_json(run_dir / "metrics.json")
    assert summary["world_size"] == nproc and summary["epochs"] == epochs
    assert summary["val_accuracy"] >= least_val, summary
    if least_test is not None:
        assert summary["test_accuracy"] >= least_test, summary


def test_seed003_unused_layer_fails_under_ddp_without_find_unused_parameters(tmp_path):
    """The seed's Net has a layer2 that forward never uses: the recipe sets
    train.find_unused_parameters (and trains on 2 ranks above); without it DDP stops at step 2."""
    proc = run_harness(SEEDS / "seed003_net.yaml", [f"run.output_dir={tmp_path / 'run'}", "train.epochs=1",
                                                     "train.find_unused_parameters=false"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "Expected to have finished reduction" in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


# --------------------------------------------------------------------------------------------
# 3. ReduceLROnPlateau on the training loss, on 2 ranks
#    (on a user's metric, val_<name>: tests/test_python_api.py; a user's metric named by import path
#    as checkpoint.monitor: the two-rank runs above)
# --------------------------------------------------------------------------------------------


def test_plateau_on_the_train_loss_drops_the_lr_alike_on_both_ranks_as_torchs_own_would(tmp_path):
    recipe = write_project(tmp_path / "project")
    run_dir = tmp_path / "run"
    # The epoch's train loss must halve to count as better: it does not for long, so the LR drops.
    run_harness(recipe, [f"run.output_dir={run_dir}", "schedule.name=plateau", "schedule.monitor=train_loss",
                         "schedule.mode=min", "schedule.threshold=0.5", "schedule.patience=0", "schedule.factor=0.5",
                         "schedule.interval=epoch", "train.epochs=4"], nproc=2)
    ranks = [read_json(run_dir / "ranks" / f"rank-{r}.json") for r in (0, 1)]
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    assert ranks[0]["plateau_num_bad_epochs"] == ranks[1]["plateau_num_bad_epochs"]
    scalars = read_scalars(run_dir)
    logged = [lr for _, lr in scalars["lr/default"]]
    assert len(logged) == 40 and min(logged) < logged[0] == pytest.approx(0.2)
    # The same LRs as torch's own ReduceLROnPlateau fed the epoch's train loss (over all ranks) once an epoch.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    stock = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", threshold=0.5, patience=0, factor=0.5)
    expected = []
    for _, train_loss in scalars["train/loss_epoch"]:
        expected += [optimizer.param_groups[0]["lr"]] * 10
        stock.step(train_loss)
    assert logged == float32(expected)
    assert ranks[0]["lrs"]["default"] == optimizer.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------
# 4. Errors: the message, exit 2, nothing written
# --------------------------------------------------------------------------------------------

MORE_CODE = '''

class NeedsWidth(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, width: int):
        super().__init__()
        self.body = nn.Linear(in_dim, out_dim)


class BrokenNet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        raise ValueError("BrokenNet cannot be built: no pretrained weights here")


def mean_bce(outputs, targets):
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.reshape(-1).float())
'''
BROKEN_INIT_LINE = len((USER_MODULE + MORE_CODE).splitlines()) - 4  # the raise in BrokenNet.__init__

# case -> (overrides, what the message says). Checked when the recipe loads: no process starts.
CONFIG_ERRORS = {
    "unknown argument": (["model.hiden=12"], ["unknown key 'model.hiden'", "Did you mean 'model.hidden'?"]),
    "missing argument": (["model.name=MODULE:NeedsWidth"], ["model.width: missing", "NeedsWidth requires it"]),
    "wrong type": (["model.hidden=twelve"], ["model.hidden: got 'twelve', expected an integer"]),
    "unknown module": (["model.name=nosuchmodule:TinyNet"], ["cannot import module 'nosuchmodule'",
                                                            "no nosuchmodule.py"]),
    "unknown attribute": (["model.name=MODULE:TinyNte"], ["has no 'TinyNte'", "Did you mean MODULE:TinyNet?"]),
}


def assert_nothing_written(run_dir: Path) -> None:
    """A lock file may exist; checkpoints, TensorBoard files and final weights may not."""
    for name in ("checkpoints", "tb", "final", "metrics.json"):
        assert not (run_dir / name).exists(), name


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_a_bad_component_argument_or_import_path_is_a_config_error_naming_the_key(case, tmp_path, capsys):
    from harness.cli import main

    module = f"mine_{case.replace(' ', '_')}"  # a module name of its own: imported in this process
    recipe = write_project(tmp_path / "project", module=module, extra_code=MORE_CODE)
    overrides, expected = CONFIG_ERRORS[case]
    run_dir = tmp_path / "run"
    code = main(["train", str(recipe), f"run.output_dir={run_dir}", *(o.replace("MODULE", module) for o in overrides)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "harness: config error:" in err
    for text in expected:
        assert text.replace("MODULE", module) in err
    assert_nothing_written(run_dir)



def test_an_exception_while_importing_the_users_module_shows_their_file_and_line(tmp_path, capsys):
    from harness.cli import main

    recipe = write_project(tmp_path / "project", module="raises_on_import")
    path = tmp_path / "project" / "raises_on_import.py"
    path.write_text("import torch\n\nraise RuntimeError('cannot find my weights file')\n")
    run_dir = tmp_path / "run"
    code = main(["train", str(recipe), f"run.output_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}, line 3" in err and "RuntimeError: cannot find my weights file" in err
    assert "harness/components.py" not in err and "importlib" not in err
    assert_nothing_written(run_dir)


def test_an_exception_in_the_users_model_init_shows_their_file_and_line_and_exits_2(tmp_path):
    recipe = write_project(tmp_path / "project", extra_code=MORE_CODE)
    run_dir = tmp_path / "run"
    proc = run_harness(recipe, [f"run.output_dir={run_dir}", "model.name=mymodels:BrokenNet"], nproc=1,
                       launcher="python", check=False)
    path = tmp_path / "project" / "mymodels.py"
    assert f"{path}, line {BROKEN_INIT_LINE}, in __init__" in proc.stderr
    assert "ValueError: BrokenNet cannot be built: no pretrained weights here" in proc.stderr
    assert_nothing_written(run_dir)
    assert "harness/" not in proc.stderr  # no harness internals: not components.py, not loop.py
    assert proc.returncode == 2, proc.stderr


def test_an_exception_in_the_users_loss_while_training_shows_their_file_and_line_and_exits_1(tmp_path):
    recipe = write_project(tmp_path / "project", extra_code=RAISING_LOSS)
    run_dir = tmp_path / "run"
    proc = run_harness(recipe, [f"run.output_dir={run_dir}", "loss.name=mymodels:fails_at_step_3"], nproc=1,
                       launcher="python", check=False)
    path = tmp_path / "project" / "mymodels.py"
    line = len((USER_MODULE + RAISING_LOSS).splitlines()) - 1
    assert f"{path}, line {line}, in fails_at_step_3" in proc.stderr
    assert "ArithmeticError: the third batch is cursed" in proc.stderr
    assert not (run_dir / "final").exists()
    assert proc.returncode == 1, proc.stderr
    assert "harness/" not in proc.stderr


RAISING_LOSS = '''

calls = []


def fails_at_step_3(outputs, targets):
    calls.append(1)
    if len(calls) == 3:
        raise ArithmeticError("the third batch is cursed")
    return (outputs.reshape(-1) - targets.reshape(-1).float()) ** 2
'''


@pytest.fixture(scope="module")
def scalar_loss_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scalar_loss")
    recipe = write_project(root / "project", extra_code=MORE_CODE)
    proc = run_harness(recipe, [f"run.output_dir={root / 'run'}", "loss.name=mymodels:mean_bce"], nproc=1,
                       launcher="python", check=False)
    return proc, root / "run"


def test_a_loss_returning_one_number_per_batch_is_refused_at_the_first_step(scalar_loss_run):
    proc, run_dir = scalar_loss_run
    assert proc.returncode == 2, proc.stderr
    assert "mymodels:mean_bce returned () for a batch of 2 samples" in proc.stderr  # checked before training
    assert "one value per sample" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final").exists()


def test_a_loss_refused_at_the_first_step_leaves_no_tensorboard_folder(scalar_loss_run):
    _, run_dir = scalar_loss_run
    assert_nothing_written(run_dir)


# --------------------------------------------------------------------------------------------
# 5. Every torch.optim optimizer by name, with its own arguments
# --------------------------------------------------------------------------------------------

# Class name as written in the recipe -> its own arguments (set in the recipe beside optim.name).
OPTIMIZERS = {
    "SGD": {"momentum": 0.9, "nesterov": True, "dampening": 0.0},
    "adam": {"betas": [0.8, 0.99], "amsgrad": True},
    "ADAMW": {"weight_decay": 0.05, "eps": 1e-6},
    "Adamax": {"betas": [0.7, 0.9]},
    "adagrad": {"lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adadelta": {"rho": 0.8},
    "Adafactor": {"beta2_decay": -0.7, "d": 2.0},
    "asgd": {"lambd": 0.001, "t0": 100.0},
    "NAdam": {"momentum_decay": 0.005},
    "RAdam": {"decoupled_weight_decay": True, "weight_decay": 0.01},
    "RMSprop": {"alpha": 0.9, "centered": True, "momentum": 0.5},
    "Rprop": {"etas": [0.4, 1.3], "step_sizes": [1e-5, 10]},
    "Muon": {"momentum": 0.9, "ns_steps": 3},  # 2-D parameters only: the model below has no biases
}
# Optimizers a plain training step cannot drive: LBFGS needs a closure, SparseAdam sparse gradients.
NOT_STEPPABLE = ("LBFGS", "SparseAdam")


def torch_optimizer_classes() -> set[str]:
    return {name for name in dir(torch.optim) if isinstance(getattr(torch.optim, name), type)
            and issubclass(getattr(torch.optim, name), torch.optim.Optimizer) and name != "Optimizer"}


def optim_overrides(name: str, arguments: dict) -> list[str]:
    return [f"optim.name={name}", "optim.lr=0.01", *(f"optim.{key}={json.dumps(value)}" for key, value in
                                                     arguments.items())]


@pytest.fixture(scope="module")
def plain_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("optim") / "recipe.yaml"
    path.write_text("model: {name: mlp}\noptim: {name: adam, lr: 0.001}\n")
    return path


def test_every_torch_optimizer_class_is_covered_here():
    assert {name.lower() for name in OPTIMIZERS} | {n.lower() for n in NOT_STEPPABLE} == \
        {name.lower() for name in torch_optimizer_classes()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_torch_optimizer_by_class_name_in_any_case_gets_its_own_arguments_and_steps(name, plain_recipe):
    from harness.config import load_config
    from harness.optimizers import build_optimizer

    arguments = OPTIMIZERS[name]
    cfg = load_config(plain_recipe, optim_overrides(name, arguments))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh(), torch.nn.Linear(3, 2, bias=False))
    optimizer, groups = build_optimizer(model, cfg.optim)
    cls = {n.lower(): getattr(torch.optim, n) for n in torch_optimizer_classes()}[name.lower()]
    assert type(optimizer) is cls and groups == ["default"]
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01
    for key, value in arguments.items():
        got = group[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_an_optimizers_unknown_argument_is_a_config_error_with_a_did_you_mean(plain_recipe):
    from harness.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"unknown key 'optim.momentun'.*Did you mean 'optim.momentum'\?"):
        load_config(plain_recipe, ["optim.name=SGD", "optim.momentun=0.9"])
    with pytest.raises(ConfigError, match=r"optim.params: cannot be set here"):
        load_config(plain_recipe, ["optim.params=[1]"])


@pytest.mark.parametrize("name", NOT_STEPPABLE)
def test_an_optimizer_a_training_step_cannot_drive_is_refused_when_the_recipe_loads(name, plain_recipe):
    from harness.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=name):
        load_config(plain_recipe, [f"optim.name={name}"])
