"""What runs inside the model's blocks: ``train.activation_checkpointing`` and ``train.compile``.

Both act on module instances in place (a block's ``forward`` recomputed in backward, a module's
``compile()``), never by wrapping them in new modules: parameter names, ``state_dict`` keys, the
optimizer's param groups and checkpoints stay the model's own (no ``_orig_mod.`` or
``_checkpoint_wrapped_module.`` prefixes), so a run saved with either resumes without it and back.
Applied before DDP or FSDP2 wraps the model, as torchtitan applies them before ``fully_shard``.
"""

from __future__ import annotations

import functools
import logging
from typing import Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.contracts import ConfigError

logger = logging.getLogger("harness")


def apply(model: nn.Module, train, is_main: bool) -> None:
    """``train.activation_checkpointing`` then ``train.compile`` (the recipe's train section)."""
    if train.activation_checkpointing:
        count = checkpoint_activations(model, train.activation_checkpointing)
        if is_main:
            logger.info("activation checkpointing: %d blocks (%s)", count, ", ".join(train.activation_checkpointing))
    if train.compile is not False:
        count = compile_model(model, train.compile)
        if is_main:
            logger.info("torch.compile: %s", "the whole model" if train.compile is True else
                        f"{count} blocks ({', '.join(train.compile)}), each compiled on its own")


def modules_of_classes(model: nn.Module, class_names: list[str], key: str) -> list[nn.Module]:
    """The model's submodules whose class is named in ``class_names`` (outermost only)."""
    wanted = set(class_names)
    found, inside = [], set()
    for module in model.modules():
        if type(module).__name__ in wanted and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    missing = wanted - {type(m).__name__ for m in model.modules()}
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"{key}: no module of class {sorted(missing)} in the model; its classes: {', '.join(classes)}")
    return found


def checkpoint_activations(model: nn.Module, class_names: list[str]) -> int:
    """Each block's activations are dropped after its forward and recomputed in backward
    (torch.utils.checkpoint, non-reentrant: works with DDP, FSDP2, keyword arguments and
    no_grad evaluation). The RNG state is replayed, so dropout draws the same masks and the
    gradients are bitwise those of the run without it. Returns the number of blocks."""
    blocks = modules_of_classes(model, class_names, "train.activation_checkpointing")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def compile_model(model: nn.Module, setting: Union[bool, list[str]]) -> int:
    """``true``: the whole model compiled; a list of class names: each such block compiled on its
    own (regional compilation: the repeated blocks share one compiled graph, far shorter compile
    times). ``nn.Module.compile`` compiles in place. Returns the number of modules compiled."""
    if setting is False:
        return 0
    modules = [model] if setting is True else modules_of_classes(model, setting, "train.compile")
    for module in modules:
        module.compile()
    return len(modules)
