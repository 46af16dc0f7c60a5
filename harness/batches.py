"""Batches, and calling the model with one.

The model is called with what the batch has, matched to its ``forward`` by parameter name: the
first parameter gets the inputs (``x``) whatever its name (``nn.Sequential`` calls it ``input``),
the others by name (``edge_index``, ``batch``, ``num_graphs``, ``edge_attr``, ...); a ``forward``
whose only parameter is called ``data`` or ``batch`` gets the whole PyG batch. What it returns (a
tensor, a tuple, a dict, a dataclass or a ``ModelOutput``) is narrowed to the tensor the loss and
metrics receive (``train.model_output``).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Optional

import torch

from harness.contracts import Batch, ConfigError

WHOLE_BATCH_NAMES = ("data", "batch", "graph")


@functools.lru_cache(maxsize=64)
def _forward_plan(forward) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(mode, required names after the first, optional names after the first) of a forward."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return "positional", (), ()
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    plain = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not plain:
        return "positional", (), ()
    if len(plain) == 1 and plain[0].name in WHOLE_BATCH_NAMES:
        return "whole", (), ()
    rest = plain[1:]
    required = tuple(p.name for p in rest if p.default is p.empty)
    optional = tuple(p.name for p in rest if p.default is not p.empty)
    return "named", required, optional


# model -> (its train.model_output, the loss object when the model computes its own loss), for the
# models whose recipe sets either (weak: no model is kept alive by it).
_CALL_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def choose_output(model: torch.nn.Module, choice: Optional[Any], own_loss: Any = None) -> None:
    """What call_model returns of this model's outputs (train.model_output; see select_output),
    and, with ``loss.name: model``, the loss object that takes the model's own loss from them."""
    if choice is None and own_loss is None:
        _CALL_PLANS.pop(model, None)
    else:
        _CALL_PLANS[model] = (choice, own_loss)


def call_model(model, x: torch.Tensor, fields: dict[str, Any], whole: Any = None,
               targets: Optional[torch.Tensor] = None, args: Optional[tuple] = None) -> torch.Tensor:
    """``model(x, <fields its forward names>)`` (or ``model(*args)``), the tensor the loss and
    metrics receive of what it returns; see the module docstring. With the model's own loss
    (``loss.name: model``) the targets go in by their forward parameter's name and the loss it
    returns is handed to that loss object."""
    module = getattr(model, "module", model)  # DDP's forward takes *args: look at the model's own
    choice, own_loss = _CALL_PLANS.get(module, (None, None)) if _CALL_PLANS else (None, None)
    extra = {}
    if own_loss is not None:
        if targets is None:
            raise ConfigError("loss.name: model: this kind of data does not pass targets to the model (node-level "
                              "graphs: the model sees whole neighbourhoods, its own loss would cover other nodes); "
                              "use a loss of the harness's")
        extra = {own_loss.targets_parameter(module): targets}
    if args is not None:
        outputs = model(*args, **extra)
    else:
        outputs = _forward(model, module, x, {**fields, **extra}, whole)
    if own_loss is not None:
        outputs = own_loss.take(outputs)
    if choice is None and isinstance(outputs, torch.Tensor):
        return outputs
    return select_output(outputs, choice)


def _forward(model, module, x: torch.Tensor, fields: dict[str, Any], whole: Any):
    mode, required, optional = _forward_plan(type(module).forward)
    if mode == "whole" and whole is not None:
        return model(whole)
    if mode != "named":
        return model(x)
    missing = [name for name in required if name not in fields]
    if missing:
        raise ConfigError(f"model: {type(module).__name__}.forward needs {', '.join(repr(m) for m in missing)}, "
                          f"which this data does not provide; a batch here has: x, "
                          f"{', '.join(sorted(fields)) or '(nothing else)'}")
    kwargs = {name: fields[name] for name in (*required, *optional) if name in fields}
    return model(x, **kwargs)


def select_output(outputs: Any, choice: Optional[Any] = None) -> torch.Tensor:
    """The tensor the loss and metrics receive from what a model returned (``train.model_output``).

    ``choice`` null: a tensor as it is; a mapping (dict, a Hugging Face ``ModelOutput``) or an
    object with a tensor ``logits``: that; a tuple, list or mapping holding one tensor (nanoGPT's
    ``(logits, None)`` without targets): that one. An int indexes a tuple or list, a string is a
    key or attribute. Anything else is a ConfigError naming the structure."""
    if choice is None and isinstance(outputs, torch.Tensor):
        return outputs
    if choice is not None:
        try:
            if isinstance(choice, int) and not isinstance(outputs, dict):
                picked = outputs[choice]
            elif isinstance(outputs, dict):
                picked = outputs[choice]
            else:
                picked = getattr(outputs, choice)
        except (KeyError, IndexError, AttributeError, TypeError):
            picked = None
        if isinstance(picked, torch.Tensor):
            return picked
        raise ConfigError(f"train.model_output: {choice!r} is not a tensor of the model's output, "
                          f"{describe_output(outputs)}")
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = list(outputs.values()) if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else []
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    raise ConfigError(f"model: its forward returned {describe_output(outputs)}; set train.model_output to the "
                      "index (0) or key (logits) of the tensor the loss and metrics should receive")


def describe_output(outputs: Any) -> str:
    """``a tuple (0: tensor [2, 5], 1: None)``, ``a dict (logits: tensor [2, 5], ...)``."""
    def part(value: Any) -> str:
        return f"tensor {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

    if isinstance(outputs, dict):
        items = ", ".join(f"{key}: {part(value)}" for key, value in list(outputs.items())[:8])
    elif isinstance(outputs, (tuple, list)):
        items = ", ".join(f"{i}: {part(value)}" for i, value in enumerate(outputs[:8]))
    else:
        fields = {k: v for k, v in vars(outputs).items() if not k.startswith("_")} if hasattr(outputs, "__dict__") else {}
        items = ", ".join(f"{key}: {part(value)}" for key, value in list(fields.items())[:8])
    return f"a {type(outputs).__name__} ({items})"


class TensorBatch(Batch):
    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def predict(self, model) -> torch.Tensor:
        return call_model(model, self.features, {}, targets=self.targets)

    def to(self, device) -> "TensorBatch":
        return TensorBatch(self.features.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


def _graph_fields(graph) -> dict[str, Any]:
    return {key: value for key, value in graph.items() if key not in ("x", "y") and not key.endswith("_mask")}


def _edge_attributes(graph) -> bool:
    return any(key in graph for key in ("edge_attr", "edge_weight"))


class GraphBatch(Batch):
    def __init__(self, batch):
        self.batch = batch
        self.targets = batch.y

    def predict(self, model) -> torch.Tensor:
        fields = _graph_fields(self.batch)
        fields["num_graphs"] = self.batch.num_graphs
        return call_model(model, self.batch.x, fields, whole=self.batch, targets=self.targets)

    def to(self, device) -> "GraphBatch":
        return GraphBatch(self.batch.to(device))

    def __len__(self) -> int:
        return int(self.batch.num_graphs)


def _is_pyg_data(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch_geometric.data") and hasattr(value, "edge_index")


class ItemBatch(Batch):
    """A collated batch of (input, target) pairs or dicts; the model gets the input(s)."""

    def __init__(self, inputs, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def predict(self, model) -> torch.Tensor:
        if isinstance(self.inputs, dict):
            (first, x), *rest = self.inputs.items()
            return call_model(model, x, dict(rest), targets=self.targets)
        if isinstance(self.inputs, (tuple, list)):
            return call_model(model, None, {}, targets=self.targets, args=tuple(self.inputs))
        return call_model(model, self.inputs, {}, targets=self.targets)

    def to(self, device) -> "ItemBatch":
        move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
        inputs = ({k: move(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else type(self.inputs)(move(v) for v in self.inputs) if isinstance(self.inputs, (tuple, list))
                  else move(self.inputs))
        return ItemBatch(inputs, move(self.targets))


def as_batch(collated, target_key: str) -> Batch:
    if _is_pyg_data(collated) or type(collated).__name__ in ("Batch", "DataBatch"):
        return GraphBatch(collated)
    if isinstance(collated, dict):
        if target_key not in collated:
            raise ConfigError(f"data.target_key: items are dicts without {target_key!r} (keys: {sorted(collated)})")
        inputs = {k: v for k, v in collated.items() if k != target_key}
        return ItemBatch(inputs, _targets(collated[target_key]))
    inputs, targets = collated
    return ItemBatch(inputs, _targets(targets))


def _targets(targets: torch.Tensor) -> torch.Tensor:
    return targets.view(-1, 1) if targets.is_floating_point() and targets.dim() == 1 else targets
