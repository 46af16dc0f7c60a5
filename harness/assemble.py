"""Build a run's data and model from their recipe sections (or take the objects given from Python)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

from torch import nn

from harness import components
from harness.contracts import ConfigError, TaskData, TaskSpec
from harness.data import LoaderSettings, as_task_data

logger = logging.getLogger("harness")

# Model arguments the data can fill in, and from which part of the TaskSpec.
FROM_DATA = {"in_dim": "in_dim", "num_features": "in_dim", "in_channels": "in_dim",
             "out_dim": "out_dim", "out_channels": "out_dim", "num_classes": "num_classes"}


def build_data(cfg, seed: int, folders=()) -> TaskData:
    target = components.resolve("data", cfg.name, folders)
    kwargs = dict(cfg.options)
    parameters = getattr(components.signature_of(target), "parameters", {}) or {}
    for name, value in (("seed", seed), ("num_workers", cfg.num_workers), ("num_neighbors", cfg.num_neighbors)):
        if name in parameters and name not in kwargs:
            kwargs[name] = value
    result = components.build(target, kwargs, f"building the data {cfg.name!r}")
    settings = loader_settings(cfg, folders)
    if "num_neighbors" in parameters:  # the factory took it (as sbm_nodes does): not applied twice
        settings = dataclasses.replace(settings, num_neighbors=None)
    return as_task_data(result, f"data ({cfg.name})", seed, settings)


def loader_settings(cfg, folders=()) -> LoaderSettings:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.num_workers > cores:
        logger.warning("WARNING: data.num_workers=%d is more than the %d CPU cores this process may use: the "
                       "workers will compete with each other and with training", cfg.num_workers, cores)
    collate = None
    if cfg.collate_fn:
        collate = components.import_target(cfg.collate_fn, "data.collate_fn", folders)
    return LoaderSettings(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers, cfg.prefetch_factor, collate,
                          cfg.target_key, cfg.hops, tuple(cfg.num_neighbors) if cfg.num_neighbors else None)


def model_arguments(target: Any, options: dict, spec: TaskSpec) -> dict:
    """The recipe's arguments plus those the data gives (in_dim, out_dim, ...) that it left out."""
    parameters = getattr(components.signature_of(target), "parameters", {}) or {}
    kwargs = dict(options)
    for name, field in FROM_DATA.items():
        if name in parameters and name not in kwargs:
            value = getattr(spec, field)
            if not value:
                raise ConfigError(f"model.{name}: not given, and the data does not say it (task {spec.kind}); "
                                  f"set model.{name}, or return 'num_classes' with the data")
            kwargs[name] = value
    return kwargs


def build_model(cfg, spec: TaskSpec, folders=(), target: Any = None) -> nn.Module:
    """The recipe's model, or ``target`` (a class or factory given from Python) built with the
    recipe's model arguments and those the data gives."""
    label = cfg.name if target is None else getattr(target, "__qualname__", type(target).__name__)
    if target is None:
        target = components.resolve("model", cfg.name, folders)
    model = components.build(target, model_arguments(target, cfg.options, spec), f"building the model {label!r}")
    if not isinstance(model, nn.Module):
        kind = "class" if inspect.isclass(target) else "factory"
        raise ConfigError(f"model.name: the {kind} {label!r} returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model
