"""Built-in models: a plain MLP, a GCN for node classification, a GIN-style graph regressor.

Registered as a user's model would be: a class whose ``__init__`` takes its recipe keys as keyword
arguments; ``in_dim`` and ``out_dim`` are filled in from the data when the recipe leaves them out.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from harness.components import register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@register("model", "mlp", summary="multi-layer perceptron for tables (outputs logits)")
class Mlp(nn.Module):
    """Outputs logits: the loss applies the sigmoid/softmax (BCEWithLogits is the stable BCE)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int] = (64, 32),
                 activation: Literal["relu", "gelu", "tanh"] = "relu", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x if x.is_floating_point() else x.float())


@register("model", "gcn", summary="GCN for node classification (needs graph data)")
class Gcn(nn.Module):
    """The seed's GCNConv stack: conv, ReLU, dropout, ..., conv."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int] = (64,), dropout: float = 0.5):
        super().__init__()
        from torch_geometric.nn import GCNConv

        sizes = [in_dim, *hidden, out_dim]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        return x


@register("model", "gin", summary="GIN + sum pooling for graph-level targets (needs graph data)")
class GinRegressor(nn.Module):
    """GIN layers, sum pooling (counts survive it), an MLP head. Works for classification too."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64, layers: int = 3, dropout: float = 0.0):
        super().__init__()
        from torch_geometric.nn import GINConv

        def mlp(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, b))

        dims = [in_dim] + [hidden] * layers
        self.convs = nn.ModuleList(GINConv(mlp(a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, out_dim))

    def forward(self, x, edge_index, batch, num_graphs: int) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool

        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.head(global_add_pool(x, batch, size=num_graphs))
