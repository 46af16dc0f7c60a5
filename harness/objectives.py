"""Per-sample losses and metrics for each kind of target.

Everything is returned per sample so the loop can form exact global means as (sum, count),
whatever the number of ranks or micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRIC_NAMES = {"binary": "accuracy", "multiclass": "accuracy", "regression": "mae"}
METRIC_HIGHER_IS_BETTER = {"accuracy": True, "mae": False}


def per_sample_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "binary":
        # BCE on logits: the seed's sigmoid + BCELoss, without its overflow.
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(dim=1)
    if kind == "multiclass":
        return F.cross_entropy(outputs, targets, reduction="none")
    return F.mse_loss(outputs, targets, reduction="none").sum(dim=1)


def summed_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of per_sample_loss in one op (the training step needs only the sum)."""
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
    if kind == "multiclass":
        return F.cross_entropy(outputs, targets, reduction="sum")
    return F.mse_loss(outputs, targets, reduction="sum")


def per_sample_metric(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "binary":
        return ((outputs >= 0).float() == targets).float().view(-1)
    if kind == "multiclass":
        return (outputs.argmax(dim=1) == targets).float()
    return (outputs - targets).abs().mean(dim=1)
