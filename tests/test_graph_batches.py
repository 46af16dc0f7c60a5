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


def _random_graph(nodes: int = 400, edges: int = 3000, seed: int = 0):
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    return Data(x=torch.randn(nodes, 4, generator=g), edge_index=torch.randint(0, nodes, (2, edges), generator=g),
                edge_attr=torch.randn(edges, 2, generator=g))


def _incoming(sub, node: int) -> list[int]:
    """Global ids of the sources of ``node``'s sampled incoming edges in ``sub``."""
    local = int((sub.n_id == node).nonzero())
    return sorted(sub.n_id[sub.edge_index[0][sub.edge_index[1] == local]].tolist())


def test_sampled_neighbourhoods_depend_on_seed_epoch_and_node_only():
    from harness.data import NeighborSampler

    graph = _random_graph()
    sampler = NeighborSampler(graph, [4, 3], run_seed=7)
    seeds = torch.tensor([5, 9, 100, 250])
    sub = sampler.subgraph(seeds, epoch=0)
    assert torch.equal(sub.n_id[:4], seeds), "the seed nodes come first, in order"
    # Every sampled edge is an edge of the graph, with its own attributes.
    edges = {tuple(e): i for i, e in enumerate(graph.edge_index.t().tolist())}
    pairs = torch.stack([sub.n_id[sub.edge_index[0]], sub.n_id[sub.edge_index[1]]]).t().tolist()
    assert all(tuple(p) in edges for p in pairs)
    # At most 4 incoming edges kept per seed, 3 per node of the first hop.
    targets = sub.n_id[sub.edge_index[1]]
    assert max(int((targets == s).sum()) for s in seeds) <= 4
    degree_in = torch.bincount(graph.edge_index[1], minlength=400)
    assert all(len(_incoming(sub, int(s))) == min(4, int(degree_in[s])) for s in seeds)
    # A node's sample is the same in another batch (the same seed and epoch), different in another epoch.
    alone = sampler.subgraph(torch.tensor([100]), epoch=0)
    assert _incoming(alone, 100) == _incoming(sub, 100)
    assert torch.equal(sampler.subgraph(seeds, 0).edge_index, sub.edge_index), "deterministic"
    other_epoch = [_incoming(sampler.subgraph(torch.tensor([s]), 1), s) for s in range(60)]
    this_epoch = [_incoming(sampler.subgraph(torch.tensor([s]), 0), s) for s in range(60)]
    assert other_epoch != this_epoch
    other_seed = NeighborSampler(graph, [4, 3], run_seed=8)
    assert [_incoming(other_seed.subgraph(torch.tensor([s]), 0), s) for s in range(60)] != this_epoch


def test_all_neighbours_is_the_k_hop_neighbourhood():
    from torch_geometric.utils import k_hop_subgraph

    from harness.data import NeighborSampler

    graph = _random_graph()
    seeds = torch.tensor([1, 2, 3])
    sub = NeighborSampler(graph, [-1, -1], run_seed=0).subgraph(seeds, epoch=0)
    subset, *_ = k_hop_subgraph(seeds, 2, graph.edge_index, num_nodes=400)
    assert sorted(sub.n_id.tolist()) == sorted(subset.tolist())


def test_a_loader_returned_by_the_factory_is_refused_saying_what_to_set_instead():
    import pytest

    from harness.contracts import ConfigError
    from harness.data import as_task_data

    with pytest.raises(ConfigError, match="data.num_neighbors: \\[10, 5\\].*no pyg-lib or torch-sparse needed"):
        as_task_data(torch.utils.data.DataLoader(list(range(4))), "data (mygraph:loader)")
