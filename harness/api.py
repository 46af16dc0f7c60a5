"""Train from your own Python script, with the same guarantees as a YAML run.

    # train.py -- launch with: accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml train.py
    import harness

    data = {"train": (x_train, y_train), "val": (x_val, y_val)}   # or a PyG graph, or a TaskData
    harness.train(model=MyNet, data=data, loss=torch.nn.BCELoss(reduction="none"),
                  recipe={"optim": {"name": "adam", "lr": 1e-3},
                          "schedule": {"name": "plateau", "monitor": "val_loss", "patience": 5},
                          "run": {"output_dir": "runs/mine"}},
                  overrides=sys.argv[1:])

``model`` is a class or factory (built by the harness after seeding torch, numpy and random from
``run.seed``, with the recipe's ``model`` keys and in_dim/out_dim from the data: the same weights
on every rank and in every run), or a module you built (seed it yourself first:
``torch.manual_seed(0)``, or every rank and every run starts from other weights).

The recipe (a YAML file, a dict, or nothing) supplies everything not given as an object: the
optimizer, the schedule, batch size, epochs, checkpoints, preemption. Checkpoints, exact resume,
TensorBoard, the rank-reduced validation loss for ReduceLROnPlateau, preemption and the exit codes
are the YAML run's: running the script again resumes where it stopped. Like ``harness train`` it
exits the process with the harness's exit code on failure or preemption (75); on success it
returns the summary (also written to <run>/metrics.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from harness import components
from harness.commands import setup_logging, with_exit_codes
from harness.config import apply_override, config_from_dict, ConfigError, load_config, PROVIDED
from harness.loop import GivenComponents, train as run


def nn_module() -> type:
    import torch

    return torch.nn.Module


def given_model_section(cfg, target: Any, recipe, overrides: Sequence[str]) -> None:
    """A model class or factory given from Python takes the recipe's own ``model`` keys (not the
    default mlp's), checked against its signature like a recipe's model."""

    if not callable(target):
        raise ConfigError(f"model: given a {type(target).__name__}; give a torch.nn.Module, or a class or factory "
                          "that builds one")
    raw = recipe if isinstance(recipe, dict) else (yaml.safe_load(Path(recipe).read_text()) if recipe else None)
    keys = {k: v for k, v in dict((raw or {}).get("model") or {}).items() if k != "name"}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("model.") and key != "model.name":
            keys[key.removeprefix("model.")] = yaml.safe_load(value)
    given = components.check_arguments(target, keys, "model", provided=PROVIDED["model"])
    cfg.model.name = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"
    cfg.model.options = {**components.defaults_of(target, skip=PROVIDED["model"]), **given}


def load_recipe(recipe: Union[None, str, os.PathLike, dict], overrides: Sequence[str] = ()):
    """A Config from a YAML path, a dict of sections, or nothing (the defaults), plus overrides."""

    if recipe is None or isinstance(recipe, dict):
        raw = yaml.safe_load(yaml.safe_dump(recipe or {}))  # a deep copy, as YAML would give it
        for item in overrides:
            apply_override(raw, item)
        script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
        return config_from_dict(raw, recipe_dir=script)
    return load_config(recipe, list(overrides))


def train(recipe: Union[None, str, os.PathLike, dict] = None, overrides: Sequence[str] = (), *,
          model: Any = None, data: Any = None, loss: Any = None, metrics: Optional[list] = None,
          exit_on_failure: bool = True) -> Optional[dict]:
    """Train ``model`` on ``data`` under ``recipe``; see the module docstring.

    ``data``: anything a data factory may return (harness.data). ``loss``: a function of
    (outputs, targets) returning one value per sample, a torch loss built with
    ``reduction="none"``, or a registered name. ``metrics``: functions returning one value per
    sample, or metric objects (harness.contracts.Metric). With ``exit_on_failure=False`` the exit
    code is returned in the summary's place instead of ending the process (for notebooks/tests).
    """

    setup_logging()
    given_loss = loss
    outcome: dict = {}

    def command() -> int:
        cfg = load_recipe(recipe, overrides)
        if model is not None and not isinstance(model, nn_module()):
            given_model_section(cfg, model, recipe, overrides)
        if isinstance(given_loss, str):
            cfg.loss.name, cfg.loss.options = given_loss, {}
        outcome["summary"] = run(cfg, GivenComponents(model=model, data=data, metrics=metrics,
                                                      loss=None if isinstance(given_loss, str) else given_loss))
        return 0

    code = with_exit_codes(command)
    if code == 0:
        return outcome["summary"]
    if exit_on_failure:
        sys.exit(code)
    return {"exit_code": code}
