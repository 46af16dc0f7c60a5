"""Build a run's data and model from their recipe sections (or take the objects given from Python)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from harness import components
from harness.contracts import ConfigError, TaskData, TaskSpec
from harness.data import as_task_data

# Model arguments the data can fill in, and from which part of the TaskSpec.
FROM_DATA = {"in_dim": "in_dim", "num_features": "in_dim", "in_channels": "in_dim",
             "out_dim": "out_dim", "out_channels": "out_dim", "num_classes": "num_classes"}


def build_data(cfg, seed: int, folders=()) -> TaskData:
    target = components.resolve("data", cfg.name, folders)
    kwargs = dict(cfg.options)
    parameters = getattr(components.signature_of(target), "parameters", {}) or {}
    if "seed" in parameters and "seed" not in kwargs:
        kwargs["seed"] = seed
    result = components.build(target, kwargs, f"building the data {cfg.name!r}")
    return as_task_data(result, f"data ({cfg.name})")


def model_arguments(target: Any, options: dict, spec: TaskSpec) -> dict:
    """The recipe's arguments plus those the data gives (in_dim, out_dim, ...) that it left out."""
    parameters = getattr(components.signature_of(target), "parameters", {}) or {}
    kwargs = dict(options)
    for name, field in FROM_DATA.items():
        if name in parameters and name not in kwargs:
            kwargs[name] = getattr(spec, field)
    return kwargs


def build_model(cfg, spec: TaskSpec, folders=()) -> nn.Module:
    target = components.resolve("model", cfg.name, folders)
    model = components.build(target, model_arguments(target, cfg.options, spec), f"building the model {cfg.name!r}")
    if not isinstance(model, nn.Module):
        kind = "class" if inspect.isclass(target) else "factory"
        raise ConfigError(f"model.name: the {kind} {cfg.name!r} returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model
