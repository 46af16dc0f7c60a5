"""Seed 000's GCN, exactly as the article writes it, and a graph to train it on.

The article trains ``Net`` on a random graph (``Data(x=torch.randn(100, 16), ...)``) with
``F.binary_cross_entropy`` on its sigmoid output. Random labels teach nothing, so ``graph`` builds
a graph with the same shapes (16 node features, binary labels) where neighbours tend to share a
label, and the train/val/test masks the harness reads.
"""

import torch
import torch.nn.functional as F
from torch_geometric.data import Data
from torch_geometric.nn import GCNConv


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GCNConv(16, 64)
        self.conv2 = GCNConv(64, 1)

    def forward(self, x, edge_index):
        x = self.conv1(x, edge_index)
        x = F.relu(x)
        x = F.dropout(x, training=self.training)
        x = self.conv2(x, edge_index)
        return torch.sigmoid(x)


def graph(num_nodes: int = 1000, p_in: float = 0.02, p_out: float = 0.004, noise: float = 2.5, seed: int = 0):
    """Two communities; each node's 16 features are its community's centroid plus noise."""
    from torch_geometric.utils import stochastic_blockmodel_graph

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        edge_index = stochastic_blockmodel_graph([num_nodes // 2, num_nodes - num_nodes // 2],
                                                 [[p_in, p_out], [p_out, p_in]])
    y = torch.cat([torch.zeros(num_nodes // 2), torch.ones(num_nodes - num_nodes // 2)]).long()
    centroids = torch.randn(2, 16, generator=generator)
    x = centroids[y] + noise * torch.randn(num_nodes, 16, generator=generator)
    order = torch.randperm(num_nodes, generator=generator)
    masks = [torch.zeros(num_nodes, dtype=torch.bool) for _ in range(3)]
    for mask, part in zip(masks, (order[:600], order[600:800], order[800:])):
        mask[part] = True
    return Data(x=x, edge_index=edge_index, y=y, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])
