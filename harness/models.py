"""Models by name: a plain MLP, a GCN for node classification, a GIN-style graph regressor.

Each builder receives only the model section's options and the task's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from harness.config import ModelConfig
from harness.datasets import TaskSpec
from harness.registry import Kind

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class MlpOptions:
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = 0.0


class Mlp(nn.Module):
    """Outputs logits: the loss applies the sigmoid/softmax (BCEWithLogits is the stable BCE)."""

    def __init__(self, in_dim: int, out_dim: int, o: MlpOptions):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in o.hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[o.activation]()]
            if o.dropout > 0:
                layers.append(nn.Dropout(o.dropout))
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class GcnOptions:
    hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.5


class Gcn(nn.Module):
    """The seed's GCNConv stack: conv, ReLU, dropout, ..., conv."""

    def __init__(self, in_dim: int, out_dim: int, o: GcnOptions):
        super().__init__()
        from torch_geometric.nn import GCNConv

        sizes = [in_dim, *o.hidden, out_dim]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = o.dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        return x


@dataclass
class GinOptions:
    hidden: int = 64
    layers: int = 3
    dropout: float = 0.0


class GinRegressor(nn.Module):
    """GIN layers, sum pooling (counts survive it), an MLP head. Works for classification too."""

    def __init__(self, in_dim: int, out_dim: int, o: GinOptions):
        super().__init__()
        from torch_geometric.nn import GINConv

        def mlp(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, b))

        dims = [in_dim] + [o.hidden] * o.layers
        self.convs = nn.ModuleList(GINConv(mlp(a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Sequential(nn.Linear(o.hidden, o.hidden), nn.ReLU(), nn.Dropout(o.dropout),
                                  nn.Linear(o.hidden, out_dim))

    def forward(self, x, edge_index, batch, num_graphs: int) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool

        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.head(global_add_pool(x, batch, size=num_graphs))


def _build_mlp(spec: TaskSpec, o: MlpOptions) -> nn.Module:
    return Mlp(spec.in_dim, spec.out_dim, o)


def _build_gcn(spec: TaskSpec, o: GcnOptions) -> nn.Module:
    return Gcn(spec.in_dim, spec.out_dim, o)


def _build_gin(spec: TaskSpec, o: GinOptions) -> nn.Module:
    return GinRegressor(spec.in_dim, spec.out_dim, o)


MODELS: dict[str, Kind] = {
    "mlp": Kind(MlpOptions, _build_mlp, (), "multi-layer perceptron for tables"),
    "gcn": Kind(GcnOptions, _build_gcn, (), "GCN for node classification (needs graph: node data)"),
    "gin": Kind(GinOptions, _build_gin, (), "GIN + sum pooling for graph-level targets (needs graph data)"),
}

_NEEDS = {"mlp": "none", "gcn": "node", "gin": "graph"}


def build_model(cfg: ModelConfig, spec: TaskSpec) -> nn.Module:
    from harness.config import ConfigError
    from harness.registry import lookup

    if _NEEDS[cfg.name] != spec.graph:
        compatible = [name for name, need in _NEEDS.items() if need == spec.graph]
        raise ConfigError(f"model.name: {cfg.name!r} does not fit this data set (graph: {spec.graph}); "
                          f"use one of {', '.join(compatible)}")
    return lookup("model", cfg.name).build(spec, cfg.options)
