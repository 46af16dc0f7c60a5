"""Built-in losses and metrics, registered like a user's.

Losses return their unreduced values (``reduction="none"``): one per sample, or one per element
(a token, a label, an output column) when the targets hold several per sample; the engine forms
exact global means as (sum, count) over samples or over the counted elements (harness.objectives).
Metrics return additive sums. Integer targets equal to ``IGNORE_INDEX`` (-100, torch's default:
padding) count in neither.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from harness.batches import describe_output
from harness.components import register
from harness.contracts import IGNORE_INDEX, ConfigError, OutputKind
from harness.objectives import float_targets_like


def class_targets(targets: torch.Tensor) -> torch.Tensor:
    return targets.reshape(-1).long() if targets.dim() > 1 or targets.dtype != torch.long else targets


def per_position(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Class scores for each position of a sequence: outputs [B, T, C] against targets [B, T]."""
    return outputs.dim() > 2 and outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape


class TorchLoss:
    """A torch.nn.functional loss, unreduced; ``summed`` is its one-op sum (the training step needs
    only the sum). Class losses take sequences too: logits [B, T, C], targets [B, T]."""

    def __init__(self, fn, outputs: OutputKind, float_targets: bool, **kwargs):
        self.fn, self.outputs, self.float_targets, self.kwargs = fn, outputs, float_targets, kwargs

    def arguments(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.float_targets:
            return outputs, float_targets_like(outputs, targets)
        if per_position(outputs, targets):
            return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long()
        return outputs, class_targets(targets)

    def values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unreduced: one value per sample, or per element (token, label) where targets have several."""
        return self.fn(*self.arguments(outputs, targets), reduction="none", **self.kwargs)

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values = self.values(outputs, targets)
        return values.reshape(len(outputs), -1).sum(dim=1) if values.numel() != len(outputs) else values.reshape(-1)

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.arguments(outputs, targets), reduction="sum", **self.kwargs)


@register("loss", "bce_with_logits", aliases=("binary_cross_entropy_with_logits", "bcewithlogitsloss"),
          summary="binary cross-entropy on logits (the stable form of sigmoid + BCE)")
def bce_with_logits(pos_weight: Optional[float] = None) -> TorchLoss:
    kwargs = {} if pos_weight is None else {"pos_weight": torch.tensor(pos_weight)}
    return TorchLoss(F.binary_cross_entropy_with_logits, "logits", True, **kwargs)


@register("loss", "bce", aliases=("binary_cross_entropy", "bceloss"),
          summary="binary cross-entropy on probabilities (a model ending in a sigmoid)")
def bce() -> TorchLoss:
    return TorchLoss(F.binary_cross_entropy, "probabilities", True)


@register("loss", "cross_entropy", aliases=("ce", "crossentropyloss"), summary="softmax cross-entropy on logits")
def cross_entropy(label_smoothing: float = 0.0) -> TorchLoss:
    return TorchLoss(F.cross_entropy, "logits", False, label_smoothing=label_smoothing)


@register("loss", "nll", aliases=("nllloss",), summary="negative log-likelihood on log-probabilities")
def nll() -> TorchLoss:
    return TorchLoss(F.nll_loss, "logits", False)


@register("loss", "mse", aliases=("mseloss",), summary="squared error")
def mse() -> TorchLoss:
    return TorchLoss(F.mse_loss, "values", True)


@register("loss", "l1", aliases=("mae", "l1loss"), summary="absolute error")
def l1() -> TorchLoss:
    return TorchLoss(F.l1_loss, "values", True)


@register("loss", "smooth_l1", aliases=("smoothl1loss",), summary="smooth L1 (Huber with beta)")
def smooth_l1(beta: float = 1.0) -> TorchLoss:
    return TorchLoss(F.smooth_l1_loss, "values", True, beta=beta)


@register("loss", "huber", aliases=("huberloss",), summary="Huber loss")
def huber(delta: float = 1.0) -> TorchLoss:
    return TorchLoss(F.huber_loss, "values", True, delta=delta)


class ModelLoss:
    """The loss the model computes itself (``loss.name: model``): nanoGPT's ``forward(idx,
    targets)`` returning ``(logits, loss)``, a Hugging Face model's ``.loss`` with ``labels``.

    The targets go in by the forward's parameter name (``targets_arg``; found among targets,
    labels, target, y when not given), the loss is read from the output (``output``: a key,
    attribute or index; found as ``loss`` or the one 0-dim tensor when not given) and the rest
    (logits) goes to the metrics. The model's loss is taken as the mean over its micro-batch's
    counted elements (tokens other than ``ignore_index`` when the targets hold several per
    sample, else samples), so the harness forms the exact global mean as sum(loss x count) /
    sum(count) over micro-batches and ranks."""

    outputs: OutputKind = "logits"
    TARGET_NAMES = ("targets", "labels", "target", "y")

    def __init__(self, targets_arg: Optional[str], output, ignore_index: int, shifted: bool = False):
        self.targets_arg, self.output, self.ignore_index, self.shifted = targets_arg, output, ignore_index, shifted
        self.last: Optional[torch.Tensor] = None

    def targets_parameter(self, module) -> str:
        names = list(inspect.signature(type(module).forward).parameters)
        if self.targets_arg is not None:
            if self.targets_arg not in names:
                raise ConfigError(f"loss.targets_arg: {type(module).__name__}.forward has no parameter "
                                 f"{self.targets_arg!r} (it takes {', '.join(n for n in names if n != 'self')})")
            return self.targets_arg
        for name in self.TARGET_NAMES:
            if name in names:
                return name
        raise ConfigError(f"loss.name: model: {type(module).__name__}.forward takes none of {', '.join(self.TARGET_NAMES)}"
                         " for the targets; name its parameter with loss.targets_arg")

    def take(self, outputs):
        """Keep the model's loss, return the rest of its outputs (for train.model_output / metrics)."""
        key = self.output
        if key is None:
            if isinstance(outputs, dict) or hasattr(outputs, "loss"):
                key = "loss"
            elif isinstance(outputs, (tuple, list)):
                scalars = [i for i, v in enumerate(outputs) if isinstance(v, torch.Tensor) and v.dim() == 0]
                key = scalars[0] if len(scalars) == 1 else None
        try:
            loss = outputs[key] if isinstance(outputs, (dict, tuple, list)) else getattr(outputs, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            loss = None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"loss.name: model: no one-value loss {'at ' + repr(key) if key is not None else ''} in "
                             f"the model's output, {describe_output(outputs)}; set loss.output to its key or index "
                             "(and pass the targets: loss.targets_arg)")
        self.last = loss.reshape(())
        if isinstance(outputs, dict):
            return {k: v for k, v in outputs.items() if k != key}
        if isinstance(outputs, (tuple, list)):
            return tuple(v for i, v in enumerate(outputs) if i != key)
        return outputs

    def averages_elements(self, targets: torch.Tensor) -> bool:
        return targets.numel() > len(targets)

    def count(self, targets: torch.Tensor) -> torch.Tensor:
        if targets.numel() > len(targets):
            # shifted: the model predicts labels[t + 1] at t (Hugging Face causal LMs), so the first
            # label of each sequence is never a target of its loss.
            counted = targets[..., 1:] if self.shifted else targets
            return (counted != self.ignore_index).sum()
        return torch.tensor(len(targets), device=targets.device)

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.last.float() * self.count(targets)

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's sum as one value (evaluation adds them up; the model gives no per-sample losses)."""
        return self.summed(outputs, targets).reshape(1)


@register("loss", "model", aliases=("own", "model_loss"),
          summary="the loss the model returns itself (nanoGPT's (logits, loss), a Hugging Face model's .loss)")
def model_loss(targets_arg: Optional[str] = None, output: Optional[Union[int, str]] = None,
               ignore_index: int = IGNORE_INDEX, shifted: bool = False) -> ModelLoss:
    """``shifted: true`` for a model that shifts its labels itself (Hugging Face causal LMs take
    ``labels = input_ids``): its mean is over the labels after the first of each sequence."""
    return ModelLoss(targets_arg, output, ignore_index, shifted)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def predicted_classes(outputs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class per sample: argmax over several outputs, or one output against the threshold."""
    if outputs.dim() > 1 and outputs.shape[-1] > 1:
        return outputs.argmax(dim=-1)
    return (outputs.reshape(-1) >= threshold).long()


def scored(outputs: torch.Tensor, targets: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, truth) as flat integer classes of the elements that count, for any shape the
    harness trains: one class per sample (logits [B, C] or one output [B, 1] against [B]); one
    per position (logits [B, T, C] against [B, T], IGNORE_INDEX left out); one per label
    (multi-label: outputs and targets both [B, K], each label cut at the threshold)."""
    if per_position(outputs, targets):
        keep = targets != IGNORE_INDEX
        return outputs.argmax(dim=-1)[keep], targets[keep].long()
    if targets.dim() > 1 and targets.shape == outputs.shape and targets.shape[-1] > 1:
        return (outputs >= threshold).long().reshape(-1), targets.reshape(-1).long()
    predicted, truth = predicted_classes(outputs, threshold), targets.reshape(-1).long()
    if predicted.shape != truth.shape:
        raise ValueError(f"outputs {list(outputs.shape)} do not score against targets {list(targets.shape)}: "
                         "expected [B, C] or [B, 1] against [B], [B, T, C] against [B, T], or [B, K] against [B, K]")
    return predicted, truth


def default_threshold(loss_outputs: Optional[str]) -> float:
    return 0.5 if loss_outputs == "probabilities" else 0.0


class Accuracy:
    """Share of samples (tokens, labels: see ``scored``) whose predicted class is the target.
    Logits are cut at 0, probabilities (a loss such as ``bce`` says so) at 0.5, unless
    ``threshold`` is given."""

    width = 2
    higher_is_better = True

    def __init__(self, name: str, threshold: float):
        self.name, self.threshold = name, threshold

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted, truth = scored(outputs, targets, self.threshold)
        correct = (predicted == truth).sum()
        return torch.stack([correct.double(), torch.tensor(float(len(truth)), dtype=torch.float64,
                                                           device=outputs.device)])

    def compute(self, totals: Sequence[float]) -> float:
        return float(totals[0]) / max(float(totals[1]), 1.0)


@register("metric", "accuracy", aliases=("acc",), summary="share of correctly classified samples")
def accuracy(threshold: Optional[float] = None, loss_outputs: Optional[str] = None) -> Accuracy:
    return Accuracy("accuracy", default_threshold(loss_outputs) if threshold is None else threshold)


class F1:
    """F1 of the positive class (binary; multi-label: over every label's elements, micro), or
    the mean F1 over classes (multiclass, macro; per token for sequences)."""

    higher_is_better = True

    def __init__(self, name: str, num_classes: int, threshold: float):
        self.name, self.threshold = name, threshold
        self.classes = max(2, num_classes)
        self.binary = num_classes <= 2
        self.width = 3 if self.binary else 3 * self.classes

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted, truth = scored(outputs, targets, self.threshold)
        classes = [1] if self.binary else range(self.classes)
        counts = []
        for c in classes:
            tp = ((predicted == c) & (truth == c)).sum()
            fp = ((predicted == c) & (truth != c)).sum()
            fn = ((predicted != c) & (truth == c)).sum()
            counts += [tp, fp, fn]
        return torch.stack(counts).double()

    def compute(self, totals: Sequence[float]) -> float:
        scores = []
        for i in range(0, len(totals), 3):
            tp, fp, fn = (float(v) for v in totals[i:i + 3])
            scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0)
        return sum(scores) / len(scores)


@register("metric", "f1", aliases=("f1_score",), summary="F1 of the positive class (binary) or macro F1")
def f1(threshold: Optional[float] = None, num_classes: int = 2, loss_outputs: Optional[str] = None) -> F1:
    return F1("f1", num_classes, default_threshold(loss_outputs) if threshold is None else threshold)


class MeanOfSamples:
    """A per-sample value averaged over the split: sums (total, count)."""

    width = 2

    def __init__(self, name: str, fn, higher_is_better: bool):
        self.name, self.fn, self.higher_is_better = name, fn, higher_is_better

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values = self.fn(outputs, targets)
        return torch.stack([values.sum().double(), torch.tensor(float(len(values)), dtype=torch.float64,
                                                                 device=outputs.device)])

    def compute(self, totals: Sequence[float]) -> float:
        return float(totals[0]) / max(float(totals[1]), 1.0)


def _per_sample_error(outputs: torch.Tensor, targets: torch.Tensor, power: int) -> torch.Tensor:
    error = (outputs - float_targets_like(outputs, targets)).abs() ** power
    return error.reshape(len(error), -1).mean(dim=1)


@register("metric", "mae", summary="mean absolute error (averaged over a sample's outputs)")
def mae() -> MeanOfSamples:
    return MeanOfSamples("mae", lambda o, t: _per_sample_error(o, t, 1), higher_is_better=False)


@register("metric", "mse", summary="mean squared error (averaged over a sample's outputs)")
def mse_metric() -> MeanOfSamples:
    return MeanOfSamples("mse", lambda o, t: _per_sample_error(o, t, 2), higher_is_better=False)


class Perplexity:
    """exp of the mean cross-entropy per counted token (or sample): the language-model figure."""

    width = 2
    higher_is_better = False

    def __init__(self, name: str):
        self.name = name

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if per_position(outputs, targets):
            outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
        targets = targets.reshape(-1).long()
        total = F.cross_entropy(outputs.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
        count = (targets != IGNORE_INDEX).sum()
        return torch.stack([total.double(), count.double()])

    def compute(self, totals: Sequence[float]) -> float:
        return math.exp(float(totals[0]) / max(float(totals[1]), 1.0))


@register("metric", "perplexity", aliases=("ppl",), summary="exp(mean cross-entropy per token): class logits "
                                                           "[B, T, C] or [B, C] against integer targets")
def perplexity() -> Perplexity:
    return Perplexity("perplexity")
