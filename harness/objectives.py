"""The objective of a run: one loss and the metrics, built from the recipe (or given from Python).

``loss.name`` and each entry of ``metrics`` is a short name (harness/builtin/objectives.py) or an
import path. What an import path may name:

* a loss *function* ``f(outputs, targets, **kwargs)`` (``torch.nn.functional:binary_cross_entropy``,
  ``mylosses:focal``), or a loss *class* (``torch.nn:BCELoss``) built with the recipe's keys.
  ``reduction="none"`` is passed when it takes one: the harness needs a value per sample.
* a metric function ``f(outputs, targets) -> one value per sample`` (averaged over the split), or
  a class or factory whose object has ``sums(outputs, targets)``, ``compute(totals)``, ``width``
  and ``name`` (see harness.contracts.Metric) for metrics that are not means (F1, IoU, AUC bins).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from harness import components
from harness.contracts import IGNORE_INDEX, ConfigError, Metric, TaskSpec

DEFAULT_LOSS = {"binary": "bce_with_logits", "multiclass": "cross_entropy", "regression": "mse"}
DEFAULT_METRICS = {"binary": ["accuracy"], "multiclass": ["accuracy"], "regression": ["mae"]}
# torch losses whose targets must match the outputs' shape and dtype (the seeds' y of shape [N]).
_FLOAT_TARGET_LOSSES = ("binary_cross_entropy", "bceloss", "bcewithlogitsloss", "mse", "l1", "huber", "smooth_l1",
                        "smoothl1loss")


def float_targets_like(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets as the outputs' dtype and shape, when they hold one value per output (the seeds'
    ``y`` of shape [N] against outputs [N, 1], integer labels for BCE)."""
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return targets.to(outputs.dtype) if targets.dtype != outputs.dtype else targets


def _outputs_kind(target: Any) -> str:
    name = getattr(target, "__name__", type(target).__name__).lower()
    declared = getattr(target, "outputs", None)
    if declared in ("logits", "probabilities", "values"):
        return declared
    if "logits" in name:
        return "logits"
    if name in ("binary_cross_entropy", "bceloss"):
        return "probabilities"
    return "logits"


class FunctionLoss:
    """A user's (or torch's) loss callable, checked to return one value per sample."""

    def __init__(self, fn, label: str, outputs: str, float_targets: bool):
        self.fn, self.label, self.outputs, self.float_targets = fn, label, outputs, float_targets
        self.checked = False

    def values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unreduced: one value per sample, or one per target element (token, label)."""
        if self.float_targets:
            targets = float_targets_like(outputs, targets)
        with components.user_code(f"computing the loss {self.label}", while_training=True):
            values = self.fn(outputs, targets)
        if not self.checked:
            self._check(values, outputs, targets)
        return values

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values = self.values(outputs, targets)
        return values.reshape(len(outputs), -1).sum(dim=1) if values.numel() != len(outputs) else values.reshape(-1)

    def _check(self, values: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        fits = isinstance(values, torch.Tensor) and values.dim() > 0 and (
            len(values) == len(outputs) or values.numel() == targets.numel())
        if not fits:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ConfigError(
                f"loss.name: {self.label} returned {shape} for a batch of {len(outputs)} samples (targets "
                f"{tuple(targets.shape)}); the harness needs one value per sample (or one per target element: a token, a "
                "label), reduction='none' semantics, to form exact means over ranks and micro-batches. "
                "Return them, e.g. F.binary_cross_entropy(outputs, targets, reduction='none').")
        self.checked = True

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_sample(outputs, targets).sum()


def element_count(targets: torch.Tensor, loss=None) -> torch.Tensor:
    """How many target elements a per-element loss is averaged over: every element of float
    targets; integer targets other than IGNORE_INDEX (-100, torch's default: padding). A loss
    that counts its own (the model's loss, with its ignore_index) says so."""
    if hasattr(loss, "count"):
        return loss.count(targets)
    if targets.is_floating_point():
        return torch.tensor(targets.numel(), device=targets.device)
    return (targets != IGNORE_INDEX).sum()


def averages_elements(loss, outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """True when the loss gives several values per sample (a token, a label, an output column):
    its mean is then over the counted target elements, as torch's reduction="mean" for the same
    batch, not over samples. A loss without ``values`` (a harness Loss of your own) is per sample."""
    if hasattr(loss, "averages_elements"):
        return loss.averages_elements(targets)
    if not hasattr(loss, "values") or targets.numel() <= len(targets):
        return False
    values = loss.values(outputs, targets)
    if values.numel() <= len(outputs):
        return False
    if values.numel() != targets.numel():
        raise ConfigError(f"loss: {values.numel()} loss values for {targets.numel()} target elements (outputs "
                          f"{list(outputs.shape)}, targets {list(targets.shape)}); a loss with several values per "
                          "sample needs one per target element")
    return True


def build_loss(name: Optional[str], kwargs: dict, spec: TaskSpec, folders=()):
    """The run's loss object (``per_sample``, ``summed``, ``outputs``)."""
    name = name or DEFAULT_LOSS[spec.kind]
    target = components.resolve("loss", name, folders)
    if not components.is_import_path(name):
        return components.build(target, kwargs, f"building the loss {name!r}")
    return wrap_loss(target, kwargs, name)


def wrap_loss(target: Any, kwargs: dict, label: str):
    """A loss given by import path or from Python: a harness Loss, a class, or a function."""
    if hasattr(target, "per_sample") and not inspect.isclass(target):
        return target  # already a harness loss object
    if inspect.isclass(target) and hasattr(target, "per_sample"):
        return components.build(target, kwargs, f"building the loss {label}")
    accepts_reduction = "reduction" in (getattr(components.signature_of(target), "parameters", None) or {})
    extra = {"reduction": "none"} if accepts_reduction else {}
    float_targets = getattr(target, "__name__", type(target).__name__).lower() in _FLOAT_TARGET_LOSSES
    if inspect.isclass(target):
        instance = components.build(target, {**kwargs, **extra}, f"building the loss {label}")
        return FunctionLoss(instance, label, _outputs_kind(target), float_targets)
    if not inspect.isroutine(target) and callable(target):  # an instance (torch.nn.BCELoss(reduction="none"))
        return FunctionLoss(target, label, _outputs_kind(target), float_targets)
    bound = {**kwargs, **extra}
    return FunctionLoss(lambda o, t: target(o, t, **bound), label, _outputs_kind(target), float_targets)


class PerSampleFunction:
    """A user's metric function returning one value per sample: averaged over the split."""

    width = 2

    def __init__(self, fn, name: str, higher_is_better: bool):
        self.fn, self.name, self.higher_is_better = fn, name, higher_is_better

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with components.user_code(f"computing the metric {self.name}", while_training=True):
            values = self.fn(outputs, targets)
        if not isinstance(values, torch.Tensor) or values.dim() == 0 or len(values) != len(outputs) or (
                values.dim() > 1 and values.shape != outputs.shape):
            raise ConfigError(f"metrics: {self.name} returned {getattr(values, 'shape', type(values).__name__)} for "
                              f"{len(outputs)} samples; a metric function returns one value per sample (or give a "
                              "class with sums/compute, see harness.contracts.Metric)")
        values = values.reshape(len(values), -1).mean(dim=1) if values.dim() > 1 else values
        return torch.stack([values.double().sum(), torch.tensor(float(len(values)), dtype=torch.float64,
                                                                 device=values.device)])

    def compute(self, totals) -> float:
        return float(totals[0]) / max(float(totals[1]), 1.0)


METRIC_CONTEXT = ("loss_outputs", "num_classes")


def metric_context(spec: TaskSpec, loss) -> dict:
    return {"loss_outputs": getattr(loss, "outputs", None), "num_classes": spec.num_classes}


def build_metrics(entries: Optional[list], spec: TaskSpec, loss, folders=()) -> list[Metric]:
    """Each entry: a name or {name: ..., **kwargs}."""
    if entries is None:
        entries = DEFAULT_METRICS[spec.kind]
    metrics = []
    context = metric_context(spec, loss)
    for entry in entries:
        name, kwargs = (entry, {}) if isinstance(entry, str) else (entry["name"], {k: v for k, v in entry.items()
                                                                                   if k != "name"})
        target = components.resolve("metric", name, folders)
        metrics.append(make_metric(target, kwargs, name, context))
    names = [m.name for m in metrics]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"metrics: {', '.join(duplicated)} listed twice")
    return metrics


def make_metric(target: Any, kwargs: dict, label: str, context: dict) -> Metric:
    short = str(label).rpartition(":")[2].rpartition(".")[2]
    if hasattr(target, "sums") and not inspect.isclass(target):
        return target
    parameters = getattr(components.signature_of(target), "parameters", {}) or {}
    given = {k: v for k, v in context.items() if k in parameters and k not in kwargs}
    if inspect.isclass(target) or not _looks_per_sample(parameters, kwargs, given):
        built = components.build(target, {**kwargs, **given}, f"building the metric {label}")
        if hasattr(built, "sums"):
            if not getattr(built, "name", None):
                built.name = short
            return built
        if callable(built):
            return PerSampleFunction(built, short, getattr(built, "higher_is_better", True))
        raise ConfigError(f"metrics: {label} built a {type(built).__name__}, expected an object with sums/compute "
                          "or a function of (outputs, targets)")
    return PerSampleFunction(lambda o, t: target(o, t, **kwargs), short, getattr(target, "higher_is_better", True))


def _looks_per_sample(parameters, kwargs: dict, given: dict) -> bool:
    """A function of (outputs, targets, ...) rather than a factory of a metric object."""
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in kwargs and n not in given]
    return len(required) >= 2
