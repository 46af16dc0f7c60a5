"""Node batches: a seed set's (layers + 1)-hop subgraph gives the seeds the full graph's outputs."""

from __future__ import annotations

import torch

from harness.builtin.datasets import sbm_nodes
from harness.builtin.models import Gcn


def test_subgraph_outputs_equal_full_graph_outputs_for_the_seed_nodes():
    sub = sbm_nodes(num_nodes=300, subgraph_hops=3)
    full = sbm_nodes(num_nodes=300, subgraph_hops=None)
    torch.manual_seed(0)
    model = Gcn(sub.spec.in_dim, sub.spec.out_dim, hidden=[16], dropout=0.0).eval()
    seeds = torch.tensor([3, 17, 40, 41, 99])
    with torch.no_grad():
        a, b = sub.train.fetch(seeds), full.train.fetch(seeds)
        assert a.graph.x.size(0) < b.graph.x.size(0), "the subgraph is smaller than the graph"
        assert torch.equal(a.targets, b.targets)
        assert torch.allclose(a.predict(model), b.predict(model), atol=1e-5)
    # Two hops (= layers) would not be enough: degree normalisation needs the outer ring too.
    short = sbm_nodes(num_nodes=300, subgraph_hops=2)
    with torch.no_grad():
        assert not torch.allclose(short.train.fetch(seeds).predict(model), b.predict(model), atol=1e-5)
