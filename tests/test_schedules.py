"""LRSchedule, in one process: each kind follows the stock torch scheduler; warmup composes with all."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as S

from harness.config import ConfigError, apply_override, config_from_dict
from harness.schedule_kinds import SCHEDULES, Kind, NoOptions
from harness.schedules import Horizon, LRSchedule, main_schedule_length, preview_lrs
from harness.values import from_json_safe, to_json_safe
from tests.reference import stock_series, warmup_cosine_closed_form

SPE, EPOCHS = 4, 9
BASE = [1e-3, 3e-4]


def schedule_cfg(*overrides: str):
    raw = {}
    for item in overrides:
        apply_override(raw, f"schedule.{item}")
    return config_from_dict(raw).schedule


def harness_series(overrides, val_losses=None):
    cfg = schedule_cfg(*overrides)

    def make_optimizer():
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE]
        return torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, BASE)])

    series = preview_lrs(make_optimizer, cfg, Horizon(SPE, EPOCHS), ["a", "b"], val_losses)
    return [list(row) for row in zip(series["a"], series["b"])]


def assert_same_series(got, expected, rel=1e-12):
    assert len(got) == len(expected)
    for step, (row, ref) in enumerate(zip(got, expected)):
        assert row == pytest.approx(ref, rel=rel, abs=0), f"step {step}: {row} != {ref}"


CASES = {
    "step": (["name=step", "step_size=2", "gamma=0.5"], lambda o: S.StepLR(o, 2, 0.5), "epoch"),
    "multistep": (["name=multistep", "milestones=[2, 5]", "gamma=0.3"], lambda o: S.MultiStepLR(o, [2, 5], 0.3), "epoch"),
    "exponential": (["name=exponential", "gamma=0.8", "interval=step"], lambda o: S.ExponentialLR(o, 0.8), "step"),
    "cosine": (["name=cosine", "interval=step", "eta_min=1e-5"],
               lambda o: S.CosineAnnealingLR(o, SPE * EPOCHS, 1e-5), "step"),
    "cosine_restarts": (["name=cosine_restarts", "T_0=3", "T_mult=2", "interval=step"],
                        lambda o: S.CosineAnnealingWarmRestarts(o, 3, 2), "step"),
    "linear": (["name=linear", "start_factor=0.25", "total_iters=4"], lambda o: S.LinearLR(o, 0.25, 1.0, 4), "epoch"),
    "polynomial": (["name=polynomial", "power=2.0"], lambda o: S.PolynomialLR(o, EPOCHS, 2.0), "epoch"),
    "lambda": (["name=lambda", "factor=linear_decay"], lambda o: S.LambdaLR(o, lambda e: 1 - e / EPOCHS), "epoch"),
    "lambda_user": (["name=lambda", "factor=tests.lr_factors:halve_every", "factor_kwargs={every: 2}"],
                    lambda o: S.LambdaLR(o, lambda e: 0.5 ** (e // 2)), "epoch"),
    "onecycle": (["name=onecycle", "interval=step"], lambda o: S.OneCycleLR(o, BASE, total_steps=SPE * EPOCHS), "step"),
    "cyclic": (["name=cyclic", "interval=step", "max_lr=0.01", "step_size_up=5"],
               lambda o: S.CyclicLR(o, BASE, 0.01, step_size_up=5, cycle_momentum=False), "step"),
    "none": (["name=none"], lambda o: S.LambdaLR(o, lambda e: 1.0), "epoch"),
}


@pytest.mark.parametrize("kind", CASES)
def test_each_kind_follows_the_stock_scheduler(kind):
    overrides, make, interval = CASES[kind]
    expected = stock_series(make, BASE, SPE, EPOCHS, interval)
    assert_same_series(harness_series(overrides), expected)


def test_plateau_follows_the_stock_scheduler_fed_the_same_values():
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7, 0.8]
    overrides = ["name=plateau", "patience=1", "factor=0.5", "cooldown=1", "min_lr=2e-4"]
    expected = stock_series(lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=1, min_lr=2e-4),
                            BASE, SPE, EPOCHS, "epoch", val_losses=losses)
    got = harness_series(overrides, val_losses=losses)
    assert_same_series(got, expected)
    assert got[-1][0] < BASE[0]  # it did reduce


def test_warmup_then_cosine_matches_the_closed_form():
    got = harness_series(["name=cosine", "interval=step", "warmup_steps=6", "warmup_start_factor=0.1", "eta_min=0"])
    total = SPE * EPOCHS
    for group, base in enumerate(BASE):
        expected = [warmup_cosine_closed_form(base, s, 6, 0.1, total, 0.0) for s in range(total)]
        assert [row[group] for row in got] == pytest.approx(expected, rel=1e-9)


def test_warmup_composes_with_plateau_which_only_counts_validations_after_warmup():
    losses = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]  # never improves
    got = harness_series(["name=plateau", "patience=0", "factor=0.5", "warmup_steps=8", "warmup_start_factor=0.5"],
                         val_losses=losses)
    first = [row[0] for row in got]
    assert first[0] == pytest.approx(BASE[0] * 0.5)
    assert first[4] == pytest.approx(BASE[0] * (0.5 + 0.5 * 4 / 8))
    assert first[8] == pytest.approx(BASE[0])  # warmup done at the end of epoch 2: full LR
    # The validation after epoch 0 fell inside the warmup and is ignored; the one after epoch 1
    # (warmup just ended) is the first counted, hence the best; each later one is worse and, with
    # patience 0, halves the LR.
    per_epoch = [first[e * SPE] for e in range(1, EPOCHS)]
    halvings = [round(torch.log2(torch.tensor(BASE[0] / v)).item()) for v in per_epoch]
    assert halvings == [0, 0, 1, 2, 3, 4, 5, 6]


def test_horizon_lengths_account_for_warmup():
    h = Horizon(steps_per_epoch=10, epochs=5)
    assert main_schedule_length(schedule_cfg("interval=step", "warmup_steps=7"), h) == 43
    assert main_schedule_length(schedule_cfg("interval=epoch", "warmup_steps=0"), h) == 5
    assert main_schedule_length(schedule_cfg("interval=epoch", "warmup_steps=10"), h) == 5
    assert main_schedule_length(schedule_cfg("interval=epoch", "warmup_steps=11"), h) == 4


def test_state_dict_is_json_and_restores_mid_run():
    cfg = schedule_cfg("name=multistep", "milestones=[3, 6]", "warmup_steps=5")

    def fresh():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=0.1)
        return opt, LRSchedule(opt, cfg, Horizon(4, 10), ["default"])

    opt, sched = fresh()
    for _ in range(3):
        for _ in range(4):
            sched.after_optimizer_step()
        sched.after_epoch()
    state = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(20):
        sched.after_optimizer_step(), sched2.after_optimizer_step()
        sched.after_epoch(), sched2.after_epoch()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_missing_user_factor_is_a_config_error():
    cfg = schedule_cfg("name=lambda", "factor=nowhere.mod:fn")
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="cannot import module 'nowhere.mod'"):
        LRSchedule(opt, cfg, Horizon(4, 4), ["default"])


@pytest.mark.parametrize("kind", [k for k in CASES if k not in ("cosine_restarts",)])
@pytest.mark.parametrize("warmup", [0, 5])
def test_building_with_last_epoch_agrees_with_loading_the_state_dict(kind, warmup):
    """Both ways torch restores a scheduler give the LR the run had, at every point of the run."""
    from harness.schedules import lrs_rebuilt_from_last_epoch

    overrides, _, _ = CASES[kind]
    cfg = schedule_cfg(*overrides, f"warmup_steps={warmup}")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE]
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, BASE)])
    schedule = LRSchedule(optimizer, cfg, Horizon(SPE, EPOCHS), ["a", "b"])
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    for epoch in range(EPOCHS):
        for _ in range(SPE):
            schedule.after_optimizer_step()
            restored_groups = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))
            rebuilt = lrs_rebuilt_from_last_epoch(cfg, Horizon(SPE, EPOCHS), restored_groups,
                                                  schedule.main.last_epoch, schedule.steps_done)
            assert rebuilt == pytest.approx([g["lr"] for g in optimizer.param_groups], rel=1e-9), \
                f"step {schedule.steps_done}"
        schedule.after_epoch()


def test_building_with_last_epoch_needs_the_restored_optimizer():
    from harness.schedules import lrs_rebuilt_from_last_epoch

    cfg = schedule_cfg("name=step", "step_size=2")
    with pytest.raises(KeyError, match="initial_lr"):
        lrs_rebuilt_from_last_epoch(cfg, Horizon(SPE, EPOCHS), [{"lr": 0.1}], 3, 12)


# --------------------------------------------------------------------------------------------
# Every kind's state is JSON, restores exactly, and names what it cannot hold
# --------------------------------------------------------------------------------------------

PLATEAU_LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7, 0.8]
ROUND_TRIP_CASES = {kind: CASES[kind][0] if kind in CASES else [f"name={kind}"] for kind in SCHEDULES}
ROUND_TRIP_CASES["plateau"] = ["name=plateau", "patience=1", "factor=0.5"]
ROUND_TRIP_CASES["lambda_user"] = CASES["lambda_user"][0]


def two_group_optimizer():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE]
    return torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, BASE)])


def drive(schedule: LRSchedule, first_step: int, last_step: int) -> list[list[float]]:
    """Steps ``first_step``..``last_step`` (1-based) as the loop runs them; the LRs after each."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no optimizer.step() here
        for step in range(first_step, last_step + 1):
            schedule.after_optimizer_step()
            if step % SPE == 0:
                schedule.after_epoch()
                schedule.after_validation(PLATEAU_LOSSES[step // SPE - 1], 0.0)
            seen.append([g["lr"] for g in schedule.optimizer.param_groups])
    return seen


def test_the_round_trip_covers_every_kind():
    assert set(SCHEDULES) <= set(ROUND_TRIP_CASES)


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_every_kind_restores_from_strict_json_mid_epoch_with_identical_lrs(case, warmup):
    cfg = schedule_cfg(*ROUND_TRIP_CASES[case], f"warmup_steps={warmup}")
    horizon, stop = Horizon(SPE, EPOCHS), 3 * SPE + 2  # mid epoch 4, after 3 validations
    straight = LRSchedule(two_group_optimizer(), cfg, horizon, ["a", "b"])
    drive(straight, 1, stop)
    text = json.dumps(straight.state_dict(), allow_nan=False)
    resumed = LRSchedule(two_group_optimizer(), cfg, horizon, ["a", "b"])
    resumed.optimizer.load_state_dict(straight.optimizer.state_dict())  # as on resume: optimizer first
    resumed.load_state_dict(json.loads(text))
    assert resumed.main.state_dict() == straight.main.state_dict()
    assert resumed.lrs() == straight.lrs()
    assert drive(resumed, stop + 1, SPE * EPOCHS) == drive(straight, stop + 1, SPE * EPOCHS)


def test_a_lambda_factor_is_saved_by_name_and_none_by_the_constant_factor():
    for case, factor in [("lambda", "linear_decay"), ("lambda_user", "tests.lr_factors:halve_every"),
                         ("none", "constant")]:
        schedule = LRSchedule(two_group_optimizer(), schedule_cfg(*ROUND_TRIP_CASES[case]), Horizon(SPE, EPOCHS),
                              ["a", "b"])
        entries = schedule.state_dict()["main"]["lr_lambdas"]
        assert [e["factor"] for e in entries] == [factor, factor]
        assert all(set(e) == {"factor", "total", "min_factor", "kwargs"} for e in entries)


class _HoldsAFunction:
    """The shape of the old bug: torch saves a callable object's __dict__, here holding a function."""

    def __init__(self):
        self.fn = lambda t: 1.0

    def __call__(self, t):
        return self.fn(t)


def test_a_schedule_whose_state_json_cannot_hold_fails_when_built_naming_the_key_and_type(monkeypatch):
    monkeypatch.setitem(SCHEDULES, "holds_function",
                        Kind(NoOptions, lambda opt, options, horizon: S.LambdaLR(opt, _HoldsAFunction())))
    cfg = schedule_cfg("name=holds_function")
    with pytest.raises(TypeError) as error:
        LRSchedule(two_group_optimizer(), cfg, Horizon(SPE, EPOCHS), ["a", "b"])
    message = str(error.value)
    assert "scheduler.json" in message and "main.lr_lambdas[0].fn is a function" in message
    assert "name or import path" in message


def test_state_gained_after_building_that_json_cannot_hold_fails_at_the_save():
    schedule = LRSchedule(two_group_optimizer(), schedule_cfg("name=step"), Horizon(SPE, EPOCHS), ["a", "b"])
    schedule.main.hook = object()
    with pytest.raises(TypeError, match=r"schedule 'step' \(StepLR\).*main\.hook is an object"):
        schedule.state_dict()


def test_json_safe_values_round_trip_and_the_rest_is_named_by_key_path():
    from collections import Counter

    value = {"milestones": Counter({3: 1, 6: 2}), "best": float("inf"), "worst": float("-inf"), "pair": (1, 2.5),
             "nested": [{"a": None, "b": True, "c": "cos"}]}
    text = json.dumps(to_json_safe(value), allow_nan=False)
    assert from_json_safe(json.loads(text)) == value
    restored_nan = from_json_safe(json.loads(json.dumps(to_json_safe(float("nan")), allow_nan=False)))
    assert math.isnan(restored_nan)
    with pytest.raises(TypeError, match=r"main\.phases\[1\]\.fn is a function"):
        to_json_safe({"phases": [{}, {"fn": drive}]}, "main")
    with pytest.raises(TypeError, match=r"main\.table has a key 3 of type an int"):
        to_json_safe({"table": {3: 1.0}}, "main")


USER_FACTOR = '''
def decay(t, rate=0.5):
    return 1.0 / (1.0 + rate * t)
'''


@pytest.fixture
def user_factor(tmp_path, monkeypatch):
    """A user's own factor module in a folder on sys.path, as PYTHONPATH would put it."""
    import sys

    (tmp_path / "my_lr_factors.py").write_text(USER_FACTOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_lr_factors:decay"
    sys.modules.pop("my_lr_factors", None)


def saved_lambda_state(factor: str, *extra: str) -> tuple[dict, LRSchedule]:
    cfg = schedule_cfg("name=lambda", f"factor={factor}", "interval=step", *extra)
    schedule = LRSchedule(two_group_optimizer(), cfg, Horizon(SPE, EPOCHS), ["a", "b"])
    drive(schedule, 1, 6)
    return json.loads(json.dumps(schedule.state_dict(), allow_nan=False)), schedule


def test_a_user_factor_round_trips_by_import_path(user_factor):
    state, straight = saved_lambda_state(user_factor, "factor_kwargs={rate: 0.25}")
    assert state["main"]["lr_lambdas"][0] == {"factor": user_factor, "total": SPE * EPOCHS, "min_factor": 0.0,
                                              "kwargs": {"rate": 0.25}}
    resumed = LRSchedule(two_group_optimizer(), schedule_cfg("name=lambda", f"factor={user_factor}",
                                                             "interval=step", "factor_kwargs={rate: 0.25}"),
                         Horizon(SPE, EPOCHS), ["a", "b"])
    resumed.load_state_dict(state)
    assert drive(resumed, 7, 20) == drive(straight, 7, 20)
    assert resumed.lrs()["a"] == pytest.approx(BASE[0] / (1 + 0.25 * 20))


def test_a_user_factor_that_cannot_be_imported_on_resume_is_an_error_naming_it(user_factor, tmp_path):
    import sys

    saved_lambda_state(user_factor)
    sys.modules.pop("my_lr_factors")
    sys.path.remove(str(tmp_path))  # resumed without the folder on PYTHONPATH
    with pytest.raises(ConfigError, match=r"cannot import module 'my_lr_factors' for 'my_lr_factors:decay'"):
        saved_lambda_state(user_factor)


def test_a_checkpoint_naming_a_factor_that_cannot_be_imported_is_an_error_naming_it():
    state, _ = saved_lambda_state("linear_decay")
    for entry in state["main"]["lr_lambdas"]:
        entry["factor"] = "gone.module:decay"
    fresh = LRSchedule(two_group_optimizer(), schedule_cfg("name=lambda", "interval=step"), Horizon(SPE, EPOCHS),
                       ["a", "b"])
    with pytest.raises(ValueError, match=r"factor 'gone\.module:decay'.*cannot import module 'gone\.module'"):
        fresh.load_state_dict(state)


def test_a_checkpoint_with_another_factor_than_the_recipe_is_an_error_naming_both():
    state, _ = saved_lambda_state("tests.lr_factors:halve_every")
    fresh = LRSchedule(two_group_optimizer(), schedule_cfg("name=lambda", "interval=step"), Horizon(SPE, EPOCHS),
                       ["a", "b"])
    with pytest.raises(ValueError, match=r"factor is 'tests\.lr_factors:halve_every', the recipe asks for "
                                         r"'linear_decay'"):
        fresh.load_state_dict(state)


def test_a_checkpoint_from_before_factors_were_saved_by_name_resumes_with_the_recipes_factor():
    state, straight = saved_lambda_state("linear_decay")
    for entry in state["main"]["lr_lambdas"]:  # what those checkpoints hold
        entry.pop("factor")
        entry.update({"fn": None, "named": True})
    resumed = LRSchedule(two_group_optimizer(), schedule_cfg("name=lambda", "interval=step"), Horizon(SPE, EPOCHS),
                         ["a", "b"])
    resumed.load_state_dict(state)
    assert drive(resumed, 7, 20) == drive(straight, 7, 20)
