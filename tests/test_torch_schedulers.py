"""Every class in torch.optim.lr_scheduler, named by its class name with its own arguments, gives
the LR series torch itself gives (and the harness's names for them are aliases, not look-alikes)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.optim import lr_scheduler as torch_sched

from harness.config import ConfigError, config_from_dict
from harness.schedules import Horizon, preview_lrs

STEPS = 40
# Arguments per class (class name -> (recipe keys, the same for torch's constructor)).
CASES = {
    "StepLR": ({"step_size": 7, "gamma": 0.5}, {"step_size": 7, "gamma": 0.5}),
    "MultiStepLR": ({"milestones": [5, 20], "gamma": 0.3}, {"milestones": [5, 20], "gamma": 0.3}),
    "ConstantLR": ({"factor": 0.25, "total_iters": 9}, {"factor": 0.25, "total_iters": 9}),
    "LinearLR": ({"start_factor": 0.2, "end_factor": 1.0, "total_iters": 12},
                 {"start_factor": 0.2, "end_factor": 1.0, "total_iters": 12}),
    "ExponentialLR": ({"gamma": 0.9}, {"gamma": 0.9}),
    "PolynomialLR": ({"total_iters": 30, "power": 2.0}, {"total_iters": 30, "power": 2.0}),
    "CosineAnnealingLR": ({"T_max": 25, "eta_min": 1e-4}, {"T_max": 25, "eta_min": 1e-4}),
    "CosineAnnealingWarmRestarts": ({"T_0": 6, "T_mult": 2}, {"T_0": 6, "T_mult": 2}),
    "CyclicLR": ({"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 5},
                 {"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 5, "cycle_momentum": False}),
    "OneCycleLR": ({"max_lr": 0.01, "total_steps": STEPS}, {"max_lr": 0.01, "total_steps": STEPS}),
    "LambdaLR": ({"factor": "inverse_sqrt"}, {"lr_lambda": lambda t: 1.0 / max(1, t) ** 0.5}),
    "MultiplicativeLR": ({"factor": "tests.lr_factors:multiplicative_095"}, {"lr_lambda": lambda t: 0.95}),
    "ReduceLROnPlateau": ({"patience": 2, "factor": 0.5}, {"patience": 2, "factor": 0.5}),
}


def torch_classes() -> list[str]:
    return sorted(name for name, cls in vars(torch_sched).items()
                  if inspect.isclass(cls) and not name.startswith("_") and cls.__module__ == torch_sched.__name__
                  and (issubclass(cls, torch_sched.LRScheduler) or cls is torch_sched.ReduceLROnPlateau)
                  and cls is not torch_sched.LRScheduler)


def torch_series(name: str, kwargs: dict, val_losses=None) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.01)
    if name == "SequentialLR":
        scheduler = torch_sched.SequentialLR(optimizer, [torch_sched.LinearLR(optimizer, 0.1, total_iters=5),
                                                         torch_sched.CosineAnnealingLR(optimizer, T_max=35)],
                                             milestones=[5])
    elif name == "ChainedScheduler":
        scheduler = torch_sched.ChainedScheduler([torch_sched.ConstantLR(optimizer, 0.5, total_iters=5),
                                                  torch_sched.ExponentialLR(optimizer, 0.95)], optimizer=optimizer)
    else:
        scheduler = getattr(torch_sched, name)(optimizer, **kwargs)
    series = []
    for step in range(STEPS):
        series.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if name == "ReduceLROnPlateau":
            scheduler.step(val_losses[step])
        else:
            scheduler.step()
    return series


def harness_series(name: str, keys: dict, val_losses=None) -> list[float]:
    schedule = {"name": name, "interval": "step", **keys}
    cfg = config_from_dict({"schedule": schedule, "optim": {"name": "SGD", "lr": 0.01}})
    parameter = torch.nn.Parameter(torch.zeros(1))
    horizon = Horizon(steps_per_epoch=1, epochs=STEPS)
    return preview_lrs(lambda: torch.optim.SGD([parameter], lr=0.01), cfg.schedule, horizon, ["default"],
                       val_losses=val_losses)["default"]


def test_every_torch_scheduler_class_is_covered_here():
    assert set(torch_classes()) == set(CASES) | {"SequentialLR", "ChainedScheduler"}


@pytest.mark.parametrize("name", torch_classes())
def test_a_torch_scheduler_named_by_its_class_gives_torchs_own_lr_series(name):
    keys, kwargs = CASES.get(name, ({}, {}))
    if name == "SequentialLR":
        keys = {"schedulers": [{"name": "LinearLR", "start_factor": 0.1, "total_iters": 5},
                               {"name": "CosineAnnealingLR", "T_max": 35}], "milestones": [5]}
    if name == "ChainedScheduler":
        keys = {"schedulers": [{"name": "ConstantLR", "factor": 0.5, "total_iters": 5},
                               {"name": "ExponentialLR", "gamma": 0.95}]}
    losses = [1.0 / (1 + i // 4) if i < 20 else 0.2 for i in range(STEPS)] if name == "ReduceLROnPlateau" else None
    if name == "ReduceLROnPlateau":
        # The harness steps plateau once per validation (here one per epoch of one step).
        assert harness_series(name, keys, losses) == pytest.approx(torch_series(name, kwargs, losses), rel=1e-12)
        return
    assert harness_series(name, keys) == pytest.approx(torch_series(name, kwargs), rel=1e-12)


def test_constant_lr_is_torchs_constant_lr_not_a_flat_schedule():
    series = harness_series("ConstantLR", {"factor": 0.5, "total_iters": 3})
    assert series[:4] == pytest.approx([0.005, 0.005, 0.005, 0.01])


def test_torchs_verbose_is_accepted_and_last_epoch_is_refused_with_a_reason():
    config_from_dict({"schedule": {"name": "StepLR", "step_size": 3, "verbose": True}})
    with pytest.raises(ConfigError, match="schedule.last_epoch: set by the harness itself when it resumes"):
        config_from_dict({"schedule": {"name": "StepLR", "step_size": 3, "last_epoch": 10}})


def test_a_nested_scheduler_is_checked_like_a_top_level_one():
    with pytest.raises(ConfigError, match=r"schedule.schedulers\[1\].*gama"):
        harness_series("SequentialLR", {"schedulers": [{"name": "linear"}, {"name": "exponential", "gama": 0.9}],
                                        "milestones": [5]})
