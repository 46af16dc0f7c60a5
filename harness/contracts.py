"""What the engine and every component agree on; imports nothing else of the harness.

A user's own model, data, loss or metric meets the harness here, exactly as the built-in ones do:

* **data**: a factory returns a :class:`TaskData` (or something :func:`harness.data.as_task_data`
  turns into one: tensors, a PyG graph with masks, ...): a :class:`TaskSpec` and the splits.
* **a split** fetches a :class:`Batch` for a tensor of sample indices; the engine's sampler alone
  decides which rank sees which samples.
* **a batch** calls the model (``predict``) and holds the targets.
* **a loss** maps (outputs, targets) to one value per sample (``reduction="none"`` semantics), so
  the engine forms exact global means as (sum, count) across ranks and micro-batches.
* **a metric** maps (outputs, targets) to additive statistics (sums) and turns their totals over
  all ranks into one number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

TaskKind = Literal["binary", "multiclass", "regression"]
GraphKind = Literal["none", "node", "graph"]
# What a model's outputs are, for metrics that threshold them (binary accuracy, F1).
OutputKind = Literal["logits", "probabilities", "values"]


# Integer targets equal to this are padding: counted in no loss or metric (torch's ignore_index default).
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says where and what was expected."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about the data, and what the default loss and metric are."""

    kind: TaskKind
    in_dim: int  # features per sample (per node for graphs)
    out_dim: int  # 1 for binary and regression, the number of classes for multiclass
    graph: GraphKind = "none"

    @property
    def num_classes(self) -> int:
        return self.out_dim if self.kind == "multiclass" else (2 if self.kind == "binary" else 0)


class Batch:
    """One rank's share of a global batch: ``predict(model)`` returns one output row per sample."""

    targets: torch.Tensor

    def predict(self, model) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "Batch":
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)


class Split:
    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, indices: torch.Tensor) -> Batch:
        raise NotImplementedError

    def batches(self, index_batches: Iterable[torch.Tensor], epoch: int = -1) -> Iterator[Batch]:
        """The batches of ``index_batches`` in order (``epoch``: the training epoch, -1 outside
        training; per-item randomness derives from it). Splits backed by a DataLoader load ahead."""
        for indices in index_batches:
            yield self.fetch(indices)


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split
    val: Split
    test: Optional[Split] = None
    description: str = ""


@runtime_checkable
class Loss(Protocol):
    """``per_sample(outputs, targets)`` -> tensor [batch]; ``outputs`` says what the model emits."""

    outputs: OutputKind

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Metric(Protocol):
    """Additive statistics per batch, reduced over ranks by summing, then ``compute``d.

    A per-sample metric's sums are (sum of values, count) and ``compute`` divides; F1's are
    (true positives, false positives, false negatives)."""

    name: str
    higher_is_better: bool
    width: int  # how many sums ``sums`` returns

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def compute(self, totals: Sequence[float]) -> float: ...
