"""The optimizer, with named param groups that may carry their own LR (e.g. smaller for early layers)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from harness import components
from harness.contracts import ConfigError


def param_groups(model: nn.Module, cfg) -> tuple[list[dict], list[str]]:
    """Groups in recipe order, then 'default' with every unmatched parameter. A parameter goes to
    the first group whose glob matches its name (names as in ``model.named_parameters()``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups, names = [], []
    for group in cfg.param_groups:
        params = [(n, p) for n, p in named if n not in taken and any(fnmatchcase(n, g) for g in group.params)]
        if not params:
            available = ", ".join(n for n, _ in named)
            raise ConfigError(f"optim.param_groups[{group.name}]: patterns {group.params} match no parameter. "
                              f"Parameters: {available}")
        taken.update(n for n, _ in params)
        entry = {"params": [p for _, p in params], "lr": group.lr if group.lr is not None else cfg.lr}
        if group.weight_decay is not None:
            entry["weight_decay"] = group.weight_decay
        groups.append(entry)
        names.append(group.name)
    rest = [p for n, p in named if n not in taken]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr})
        names.append("default")
    return groups, names


# torch optimizers the loop cannot drive, and why.
UNSUPPORTED = {
    "lbfgs": "LBFGS needs a closure that re-evaluates the loss several times per step; the harness takes one "
             "step per global batch (use Adam, SGD, ... or your own loop)",
    "sparseadam": "SparseAdam takes sparse gradients only (nn.Embedding(sparse=True)), which DDP, FSDP and "
                  "gradient clipping here do not handle",
}


def build_optimizer(model: nn.Module, cfg, folders=()) -> tuple[torch.optim.Optimizer, list[str]]:
    """``optim.name`` (any torch.optim class, or an import path) over the named param groups."""
    groups, names = param_groups(model, cfg)
    target = components.resolve("optim", cfg.name, folders)
    try:
        optimizer = components.build(target, {"params": groups, "lr": cfg.lr, **cfg.options},
                                     f"building the optimizer {cfg.name!r}")
    except (ValueError, TypeError) as exc:  # torch's own refusal (e.g. Muon and 1-D parameters)
        raise ConfigError(f"optim.name: {cfg.name} refused this model's parameters or settings: {exc}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optim.name: {cfg.name!r} built a {type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer, names
