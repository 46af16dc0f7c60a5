"""Splits and batches the engine reads, and the conversion of a data factory's result into them.

A data factory (built-in or ``mydata:load``) may return:

* a :class:`~harness.contracts.TaskData` (full control);
* a dict ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` of tensors or arrays ("test"
  optional), optionally with ``"task": "binary" | "multiclass" | "regression"``;
* a PyTorch Geometric ``Data`` graph with ``y`` and boolean ``train_mask`` / ``val_mask``
  (and ``test_mask``): node-level learning on that graph;
* a dict ``{"train": [Data, ...], "val": [...], "test": [...]}`` of graphs: graph-level learning;
* a dict ``{"train": Dataset, "val": Dataset, ...}`` of torch Datasets: map-style ones are read by
  index through a DataLoader (:class:`DatasetSplit`), IterableDatasets with ``state_dict`` as
  streams (:mod:`harness.streams`).

The batches call the model as harness.batches describes; the items of a map-style Dataset are
loaded as harness.items describes.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from harness.batches import (GraphBatch, TensorBatch, _edge_attributes, _graph_fields, _is_pyg_data,  # noqa: F401
                             call_model, choose_output, describe_output, select_output)
from harness.contracts import Batch, ConfigError, Split, TaskData, TaskSpec
from harness.items import DatasetSplit, LoaderSettings, SampleError, item_generator, item_seed  # noqa: F401
from harness.streams import StreamSplit, is_stream


def fingerprint(task: TaskData) -> torch.Tensor:
    """What every rank must agree on, cheaply: the size of each split (-1: a stream or none) and a
    hash of three items of each (first, middle, last; at most 1 MiB of each of their tensors)."""
    digest = hashlib.sha256()
    sizes = []
    for split in (task.train, task.val, task.test):
        if split is None or getattr(split, "streamed", False):
            sizes.append(-1.0)
            continue
        sizes.append(float(len(split)))
        if len(split):
            batch = split.fetch(torch.tensor(sorted({0, len(split) // 2, len(split) - 1})))
            for tensor in _tensors_of(batch):
                flat = tensor.detach().reshape(-1)[: (1 << 20) // max(tensor.element_size(), 1)]
                digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    # 48 bits of the hash: exact in the float64 that harness.distributed.gather_rows carries.
    return torch.tensor([*sizes, float(int.from_bytes(digest.digest()[:6], "little"))], dtype=torch.float64)


def _tensors_of(batch: Batch) -> list[torch.Tensor]:
    """The dense tensors a batch holds, directly or in a dict / PyG batch, in a fixed order."""
    found = []
    for _, value in sorted(vars(batch).items()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "items"):
            found += [v for _, v in sorted(value.items(), key=lambda kv: str(kv[0])) if isinstance(v, torch.Tensor)]
    return [t for t in found if t.layout == torch.strided and t.device.type != "meta"]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


class TensorSplit(Split):
    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def fetch(self, indices: torch.Tensor) -> TensorBatch:
        return TensorBatch(self.features[indices], self.targets[indices])


# --------------------------------------------------------------------------------------------
# Node classification on one graph
# --------------------------------------------------------------------------------------------


class NodeBatch(Batch):
    def __init__(self, graph, seed_positions, targets):
        self.graph, self.seed_positions, self.targets = graph, seed_positions, targets

    def predict(self, model) -> torch.Tensor:
        return call_model(model, self.graph.x, _graph_fields(self.graph), whole=self.graph)[self.seed_positions]

    def to(self, device) -> "NodeBatch":
        return NodeBatch(self.graph.to(device), self.seed_positions.to(device), self.targets.to(device))


class NodeSplit(Split):
    """Nodes of one split; a batch is the subgraph around its seed nodes.

    * ``hops``: each batch's k-hop neighbourhood, every neighbour. With ``hops`` = model layers + 1
      the seed nodes' outputs equal the full-graph outputs (GCN's degree normalisation needs the
      neighbours of the outermost layer too), so splitting seed nodes across ranks shares the work
      without changing the result.
    * ``num_neighbors`` ([10, 5]: at most 10 neighbours of each seed node, then at most 5 of each
      of those): sampled neighbourhoods (GraphSAGE), drawn by :class:`NeighborSampler` from
      (run seed, epoch, node) alone, so a batch is the same whatever the workers, ranks or
      interruptions.
    * neither: the whole graph.
    """

    def __init__(self, graph, node_index: torch.Tensor, hops: Optional[int], num_workers: int = 0,
                 num_neighbors: Optional[list[int]] = None, run_seed: int = 0):
        self.graph, self.node_index, self.hops, self.num_workers = graph, node_index, hops, num_workers
        self.sampler = NeighborSampler(graph, num_neighbors, run_seed) if num_neighbors else None

    def __len__(self) -> int:
        return len(self.node_index)

    def batches(self, index_batches: Iterable[torch.Tensor], epoch: int = -1) -> Iterator[NodeBatch]:
        """With workers (and subgraphs), each batch's subgraph is cut in a loader worker."""
        if self.num_workers == 0 or (self.hops is None and self.sampler is None):
            for indices in index_batches:
                yield self.fetch(indices, epoch)
            return
        loader = torch.utils.data.DataLoader(_Positions(len(self)), batch_sampler=_Lists(index_batches),
                                             num_workers=self.num_workers,
                                             collate_fn=functools.partial(self._fetch_list, epoch=epoch),
                                             generator=torch.Generator().manual_seed(0))
        yield from loader

    def _fetch_list(self, positions: list[int], epoch: int) -> NodeBatch:
        return self.fetch(torch.tensor(positions, dtype=torch.long), epoch)

    def fetch(self, indices: torch.Tensor, epoch: int = -1) -> NodeBatch:
        seeds = self.node_index[indices]
        targets = self.graph.y[seeds]
        if self.sampler is not None:
            sub = self.sampler.subgraph(seeds, epoch)
            return NodeBatch(sub, torch.arange(len(seeds)), targets)
        if self.hops is None:
            return NodeBatch(self.graph, seeds, targets)
        from torch_geometric.utils import k_hop_subgraph

        subset, edge_index, mapping, edge_mask = k_hop_subgraph(seeds, self.hops, self.graph.edge_index,
                                                                relabel_nodes=True, num_nodes=self.graph.num_nodes)
        sub = self.graph.subgraph(subset) if _edge_attributes(self.graph) else None
        if sub is None:
            from torch_geometric.data import Data

            sub = Data(x=self.graph.x[subset], edge_index=edge_index)
        return NodeBatch(sub, mapping, targets)


class NeighborSampler:
    """Sampled k-hop neighbourhoods (as PyG's ``NeighborLoader``, GraphSAGE), in plain torch.

    Which neighbours of node v are kept in an epoch is decided by a hash of (run seed, epoch, v,
    edge): the ``k`` incoming edges with the smallest keys. So v's sample depends on nothing but
    those, not on the batch it is in, the loader worker that cuts it, the number of ranks or an
    interruption, and needs neither ``pyg-lib`` nor ``torch-sparse`` (which PyG's sampler does,
    drawing from the global RNG). The subgraph holds the seed nodes first (in order), then the
    nodes each hop reached, and only the sampled edges (with their ``edge_attr`` / ``edge_weight``).
    """

    def __init__(self, graph, num_neighbors: list[int], run_seed: int):
        if not num_neighbors or any(int(k) < 0 and int(k) != -1 for k in num_neighbors):
            raise ConfigError(f"data.num_neighbors: {num_neighbors!r}; expected a list of neighbours per hop, "
                              "each >= 0 or -1 for all")
        self.graph, self.fanouts, self.run_seed = graph, [int(k) for k in num_neighbors], run_seed
        self.num_nodes = int(graph.num_nodes)
        source, target = graph.edge_index[0], graph.edge_index[1]
        # Incoming edges of each node, contiguous (CSC): what message passing aggregates at a node.
        self.edge_order = torch.argsort(target, stable=True)
        self.sources = source[self.edge_order]
        self.rowptr = torch.zeros(self.num_nodes + 1, dtype=torch.long)
        self.rowptr[1:] = torch.cumsum(torch.bincount(target, minlength=self.num_nodes), 0)

    def _keys(self, epoch: int, owners: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """24-bit pseudo-random keys from (seed, epoch, owner node, edge): a few integer mixes
        (int64 arithmetic wraps around, which is what a hash wants)."""
        x = owners * -7046029254386353131 + edges * 2862933555777941757 + item_seed(self.run_seed, epoch, 0)
        x = (x ^ (x >> 31)) * -4658895280553007687
        x = (x ^ (x >> 29)) * -7723592293110705685
        return (x >> 20) & 0xFFFFFF

    def subgraph(self, seeds: torch.Tensor, epoch: int):
        from torch_geometric.data import Data

        local = torch.full((self.num_nodes,), -1, dtype=torch.long)
        local[seeds] = torch.arange(len(seeds))
        nodes, frontier = [seeds], seeds
        kept_edges, kept_sources, kept_targets = [], [], []
        for fanout in self.fanouts:
            if len(frontier) == 0:
                break
            starts, degrees = self.rowptr[frontier], self.rowptr[frontier + 1] - self.rowptr[frontier]
            owner_slot = torch.repeat_interleave(torch.arange(len(frontier)), degrees)
            # Positions of every incoming edge of the frontier, owner by owner.
            offsets = torch.arange(len(owner_slot)) - torch.repeat_interleave(torch.cumsum(degrees, 0) - degrees,
                                                                              degrees)
            positions = starts[owner_slot] + offsets
            owners = frontier[owner_slot]
            if fanout != -1:
                edges = self.edge_order[positions]
                order = torch.argsort(owner_slot * (1 << 24) + self._keys(epoch, owners, edges), stable=True)
                positions, owners, owner_slot = positions[order], owners[order], owner_slot[order]
                group_start = torch.searchsorted(owner_slot, owner_slot)
                keep = (torch.arange(len(owner_slot)) - group_start) < fanout
                positions, owners = positions[keep], owners[keep]
            sources = self.sources[positions]
            kept_edges.append(self.edge_order[positions])
            kept_sources.append(sources)
            kept_targets.append(owners)
            new = torch.unique(sources[local[sources] < 0])
            local[new] = torch.arange(len(new)) + sum(len(n) for n in nodes)
            nodes.append(new)
            frontier = new
        nodes = torch.cat(nodes)
        edge_ids = torch.cat(kept_edges) if kept_edges else torch.zeros(0, dtype=torch.long)
        edge_index = torch.stack([local[torch.cat(kept_sources)], local[torch.cat(kept_targets)]]) if kept_edges \
            else torch.zeros(2, 0, dtype=torch.long)
        sub = Data(x=self.graph.x[nodes], edge_index=edge_index)
        for key in ("edge_attr", "edge_weight"):
            if key in self.graph:
                sub[key] = self.graph[key][edge_ids]
        sub.n_id = nodes
        return sub


class _Positions(torch.utils.data.Dataset):
    """Positions 0..n-1 as items: the split's fetch builds the batch in the worker."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Lists:
    def __init__(self, index_batches):
        self.index_batches = index_batches

    def __iter__(self):
        for indices in self.index_batches:
            yield [int(i) for i in indices]


# --------------------------------------------------------------------------------------------
# Graph-level learning: batches of many small graphs
# --------------------------------------------------------------------------------------------


class GraphSplit(Split):
    def __init__(self, graphs, num_workers: int = 0):
        self.graphs, self.num_workers = graphs, num_workers

    def __len__(self) -> int:
        return len(self.graphs)

    def fetch(self, indices: torch.Tensor) -> GraphBatch:
        from torch_geometric.data import Batch as PygBatch

        return GraphBatch(PygBatch.from_data_list([self.graphs[int(i)] for i in indices]))

    def batches(self, index_batches: Iterable[torch.Tensor], epoch: int = -1) -> Iterator[GraphBatch]:
        # PyG's loader collates; our sampler decides the indices (its batch_sampler).
        from torch_geometric.loader import DataLoader

        batch_lists = [idx.tolist() for idx in index_batches]
        # Its own generator: creating the iterator draws the workers' base seed from it; from the
        # global RNG, that draw would shift the restored training RNG (dropout) after a resume.
        loader = DataLoader(self.graphs, batch_sampler=batch_lists, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(0))
        for batch in loader:
            yield GraphBatch(batch)


# --------------------------------------------------------------------------------------------
# A data factory's result -> TaskData
# --------------------------------------------------------------------------------------------


def infer_task(targets: torch.Tensor) -> tuple[str, int]:
    """(kind, out_dim) from targets: integers -> binary (2 classes) or multiclass; floats in {0, 1}
    -> binary; other floats -> regression with one output per target column."""
    if not targets.is_floating_point():
        classes = int(targets.max().item()) + 1 if targets.numel() else 0
        return ("binary", 1) if classes <= 2 else ("multiclass", classes)
    if targets.numel() and bool(((targets == 0) | (targets == 1)).all()):
        return "binary", 1
    return "regression", 1 if targets.dim() == 1 else int(targets.shape[1])


def _tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data: {what} is a {type(value).__name__}, expected a tensor or array ({exc})") from None


def _table_split(pair, name: str, kind: str) -> TensorSplit:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ConfigError(f"data: split {name!r} must be a pair (features, targets), got {type(pair).__name__}")
    x, y = _tensor(pair[0], f"{name} features"), _tensor(pair[1], f"{name} targets")
    if len(x) != len(y):
        raise ConfigError(f"data: split {name!r} has {len(x)} feature rows but {len(y)} targets")
    # Inputs keep their dtype (integer tokens stay integers; the built-in mlp casts to float itself).
    # Targets keep their shape ([B, T] tokens, [B, K] labels; [B, 1] class labels become [B]); class
    # labels become integers, other targets floats.
    if kind == "multiclass":
        y = y.long().view(-1) if y.dim() == 2 and y.shape[1] == 1 else y.long()
    else:
        y = y.float()
    return TensorSplit(x, y)


def as_task_data(result: Any, where: str = "data", run_seed: int = 0,
                 settings: Optional[LoaderSettings] = None) -> TaskData:
    """Turn what a data factory returned into a TaskData (see the module docstring)."""
    if isinstance(result, TaskData):
        return result
    if isinstance(result, dict) and isinstance(result.get("train"), torch.utils.data.Dataset) \
            and not isinstance(result["train"], (list, tuple)):
        if "val" not in result:
            raise ConfigError(f"{where}: the factory's dict lacks 'val'; expected keys train, val (and test)")
        return _dataset_task(result, where, run_seed, settings)
    settings = settings or LoaderSettings()
    if _is_pyg_data(result):
        return _node_task(result, where, run_seed, settings)
    if settings.hops is not None or settings.num_neighbors is not None:
        raise ConfigError(f"{where}: data.hops / data.num_neighbors apply to node-level learning on one graph (the "
                          f"factory returning a PyG Data with train_mask/val_mask); this factory returned a "
                          f"{type(result).__name__}")
    if _is_loader(result):
        raise ConfigError(f"{where}: the data factory returned a {type(result).__name__}; the harness does the "
                          "loading itself (its sampler makes resume exact and ranks agree). Return the graph (a PyG "
                          "Data with train_mask/val_mask) and set data.num_neighbors: [10, 5] for sampled "
                          "neighbourhoods (the harness's own sampler: seeded per node and epoch, no pyg-lib or "
                          "torch-sparse needed) or data.hops: K for whole k-hop neighbourhoods; or return Datasets")
    if isinstance(result, dict) and "train" in result:
        missing = [name for name in ("train", "val") if name not in result]
        if missing:
            raise ConfigError(f"{where}: the factory's dict lacks {missing}; expected keys train, val (and test)")
        if isinstance(result["train"], (list, tuple)) and result["train"] and _is_pyg_data(result["train"][0]):
            return _graph_task(result, where)
        train_targets = _tensor(result["train"][1], "train targets")
        kind = result.get("task") or infer_task(train_targets)[0]
        if kind not in ("binary", "multiclass", "regression"):
            raise ConfigError(f"{where}: task {kind!r}: expected binary, multiclass or regression")
        splits = {name: _table_split(result[name], name, kind) for name in ("train", "val", "test") if name in result}
        targets = splits["train"].targets
        out_dim = (int(train_targets.max().item()) + 1 if kind == "multiclass"
                   else (targets.shape[1] if targets.dim() > 1 else 1))
        spec = TaskSpec(kind, int(splits["train"].features.shape[1]), out_dim)
        return TaskData(spec, splits["train"], splits["val"], splits.get("test"),
                        description=f"your data: {len(splits['train'])} train, {len(splits['val'])} val samples, "
                                    f"task {kind}")
    raise ConfigError(f"{where}: the data factory returned a {type(result).__name__}; expected a "
                      "harness.contracts.TaskData, a dict {'train': (x, y), 'val': (x, y), 'test': (x, y)}, "
                      "a PyG Data graph with train_mask/val_mask, or a dict of lists of PyG Data graphs")


def _is_loader(value: Any) -> bool:
    return isinstance(value, torch.utils.data.DataLoader) or type(value).__name__.endswith("Loader")


def _node_task(graph, where: str, run_seed: int, settings: LoaderSettings) -> TaskData:
    for key in ("x", "y", "train_mask", "val_mask"):
        if getattr(graph, key, None) is None:
            raise ConfigError(f"{where}: the graph has no {key!r}; node-level learning needs x, y, "
                              "train_mask and val_mask (and optionally test_mask)")
    kind, out_dim = infer_task(graph.y)
    neighbors = list(settings.num_neighbors) if settings.num_neighbors else None
    splits = [NodeSplit(graph, getattr(graph, f"{name}_mask").nonzero().view(-1), settings.hops,
                        settings.num_workers if name == "train" else 0, neighbors, run_seed)
              if getattr(graph, f"{name}_mask", None) is not None else None for name in ("train", "val", "test")]
    spec = TaskSpec(kind, int(graph.num_node_features), out_dim, graph="node")
    batches = (f"; batches of sampled neighbours {neighbors}" if neighbors else
               f"; batches of {settings.hops}-hop neighbourhoods" if settings.hops else "")
    return TaskData(spec, splits[0], splits[1], splits[2],
                    description=f"your graph: {graph.num_nodes} nodes, {graph.num_edges} edges; "
                                f"{len(splits[0])}/{len(splits[1])}/{len(splits[2]) if splits[2] else 0} "
                                f"train/val/test nodes{batches}")


def _graph_task(result: dict, where: str) -> TaskData:
    train = list(result["train"])
    targets = torch.cat([g.y.view(1, -1) for g in train])
    kind = result.get("task") or infer_task(targets.view(-1) if targets.shape[1] == 1 else targets)[0]
    out_dim = int(targets.max().item()) + 1 if kind == "multiclass" else int(targets.shape[1])
    spec = TaskSpec(kind, int(train[0].num_node_features), out_dim, graph="graph")
    splits = {name: GraphSplit(list(result[name])) for name in ("train", "val", "test") if name in result}
    return TaskData(spec, splits["train"], splits["val"], splits.get("test"),
                    description=f"your graphs: {len(train)} train, {len(splits['val'])} val")


# --------------------------------------------------------------------------------------------
# Your own torch Datasets (harness.items, harness.streams) -> TaskData
# --------------------------------------------------------------------------------------------


def _dataset_task(result: dict, where: str, run_seed: int, settings: LoaderSettings) -> TaskData:
    """Map-style splits become DatasetSplits, IterableDatasets StreamSplits (harness.streams)."""
    splits = {name: StreamSplit(result[name], name, settings, where, run_seed) if is_stream(result[name])
              else DatasetSplit(result[name], name, run_seed, settings)
              for name in ("train", "val", "test") if result.get(name) is not None}
    train = splits["train"]
    kind, out_dim = result.get("task"), result.get("num_classes") or result.get("out_dim")
    first = train.first_item
    if train.reference[0] == "graph":
        in_dim, target = int(first.num_node_features), first.y
        graph = "graph"
    elif train.reference[0] == "dict":
        inputs = {k: v for k, v in first.items() if k != settings.target_key}
        x = next(iter(inputs.values()))
        in_dim, target, graph = int(_tensor(x, "input").shape[-1]) if _tensor(x, "input").dim() else 1, \
            _tensor(first[settings.target_key], "target"), "none"
    else:
        x = first[0][0] if isinstance(first[0], (tuple, list)) else first[0]
        x = _tensor(x, "input")
        in_dim, target, graph = int(x.shape[-1]) if x.dim() else 1, _tensor(first[1], "target"), "none"
    target = torch.as_tensor(target)
    if kind is None:
        kind = "regression" if target.is_floating_point() else "multiclass"
        if kind == "multiclass" and out_dim is None:
            out_dim = getattr(train.dataset, "num_classes", None)
    if out_dim is None:
        out_dim = 1 if kind in ("binary", "regression") and target.numel() <= 1 else (
            int(target.numel()) if kind == "regression" else 0)
    spec = TaskSpec(kind, in_dim, int(out_dim), graph=graph)
    return TaskData(spec, splits["train"], splits["val"], splits.get("test"),
                    description=f"your dataset ({type(train.dataset).__name__}): "
                                f"{_count(train)} train, {_count(splits['val'])} val samples; "
                                f"{settings.num_workers} loader workers")


def _count(split) -> str:
    if not getattr(split, "streamed", False):
        return str(len(split))
    return f"{len(split)} (a stream)" if len(split) else "(a stream)"
