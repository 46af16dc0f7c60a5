"""Splits and batches the engine reads, and the conversion of a data factory's result into them.

A data factory (built-in or ``mydata:load``) may return:

* a :class:`~harness.contracts.TaskData` (full control);
* a dict ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` of tensors or arrays ("test"
  optional), optionally with ``"task": "binary" | "multiclass" | "regression"``;
* a PyTorch Geometric ``Data`` graph with ``y`` and boolean ``train_mask`` / ``val_mask``
  (and ``test_mask``): node-level learning on that graph;
* a dict ``{"train": [Data, ...], "val": [...], "test": [...]}`` of graphs: graph-level learning.

The model is called with what the batch has, matched to its ``forward`` by parameter name: the
first parameter gets the inputs (``x``) whatever its name (``nn.Sequential`` calls it ``input``),
the others by name (``edge_index``, ``batch``, ``num_graphs``, ``edge_attr``, ...); a ``forward``
whose only parameter is called ``data`` or ``batch`` gets the whole PyG batch.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from harness.contracts import Batch, ConfigError, Split, TaskData, TaskSpec

# --------------------------------------------------------------------------------------------
# Calling a model with a batch's fields
# --------------------------------------------------------------------------------------------

WHOLE_BATCH_NAMES = ("data", "batch", "graph")


@functools.lru_cache(maxsize=64)
def _forward_plan(forward) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(mode, required names after the first, optional names after the first) of a forward."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return "positional", (), ()
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    plain = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not plain:
        return "positional", (), ()
    if len(plain) == 1 and plain[0].name in WHOLE_BATCH_NAMES:
        return "whole", (), ()
    rest = plain[1:]
    required = tuple(p.name for p in rest if p.default is p.empty)
    optional = tuple(p.name for p in rest if p.default is not p.empty)
    return "named", required, optional


def call_model(model, x: torch.Tensor, fields: dict[str, Any], whole: Any = None) -> torch.Tensor:
    """``model(x, <fields its forward names>)``; see the module docstring."""
    module = getattr(model, "module", model)  # DDP's forward takes *args: look at the model's own
    mode, required, optional = _forward_plan(type(module).forward)
    if mode == "whole" and whole is not None:
        return model(whole)
    if mode != "named":
        return model(x)
    missing = [name for name in required if name not in fields]
    if missing:
        raise ConfigError(f"model: {type(module).__name__}.forward needs {', '.join(repr(m) for m in missing)}, "
                          f"which this data does not provide; a batch here has: x, "
                          f"{', '.join(sorted(fields)) or '(nothing else)'}")
    kwargs = {name: fields[name] for name in (*required, *optional) if name in fields}
    return model(x, **kwargs)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


class TensorBatch(Batch):
    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def predict(self, model) -> torch.Tensor:
        return call_model(model, self.features, {})

    def to(self, device) -> "TensorBatch":
        return TensorBatch(self.features.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


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


def _graph_fields(graph) -> dict[str, Any]:
    return {key: value for key, value in graph.items() if key not in ("x", "y") and not key.endswith("_mask")}


class NodeBatch(Batch):
    def __init__(self, graph, seed_positions, targets):
        self.graph, self.seed_positions, self.targets = graph, seed_positions, targets

    def predict(self, model) -> torch.Tensor:
        return call_model(model, self.graph.x, _graph_fields(self.graph), whole=self.graph)[self.seed_positions]

    def to(self, device) -> "NodeBatch":
        return NodeBatch(self.graph.to(device), self.seed_positions.to(device), self.targets.to(device))


class NodeSplit(Split):
    """Nodes of one split; a batch is the subgraph around its seed nodes.

    With ``hops`` = model layers + 1 the seed nodes' outputs equal the full-graph outputs (GCN's
    degree normalisation needs the neighbours of the outermost layer too), so splitting seed
    nodes across ranks shares the work without changing the result. None: the whole graph.
    """

    def __init__(self, graph, node_index: torch.Tensor, hops: Optional[int]):
        self.graph, self.node_index, self.hops = graph, node_index, hops

    def __len__(self) -> int:
        return len(self.node_index)

    def fetch(self, indices: torch.Tensor) -> NodeBatch:
        seeds = self.node_index[indices]
        targets = self.graph.y[seeds]
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


def _edge_attributes(graph) -> bool:
    return any(key in graph for key in ("edge_attr", "edge_weight"))


# --------------------------------------------------------------------------------------------
# Graph-level learning: batches of many small graphs
# --------------------------------------------------------------------------------------------


class GraphBatch(Batch):
    def __init__(self, batch):
        self.batch = batch
        self.targets = batch.y

    def predict(self, model) -> torch.Tensor:
        fields = _graph_fields(self.batch)
        fields["num_graphs"] = self.batch.num_graphs
        return call_model(model, self.batch.x, fields, whole=self.batch)

    def to(self, device) -> "GraphBatch":
        return GraphBatch(self.batch.to(device))

    def __len__(self) -> int:
        return int(self.batch.num_graphs)


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
        loader = DataLoader(self.graphs, batch_sampler=batch_lists, num_workers=self.num_workers)
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
    x = x.float() if not x.is_floating_point() else x
    if kind == "multiclass":
        y = y.long().view(-1)
    elif kind == "binary":
        y = y.float().view(-1, 1)
    else:
        y = y.float().view(len(y), -1)
    return TensorSplit(x, y)


def as_task_data(result: Any, where: str = "data") -> TaskData:
    """Turn what a data factory returned into a TaskData (see the module docstring)."""
    if isinstance(result, TaskData):
        return result
    if _is_pyg_data(result):
        return _node_task(result, where)
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
        out_dim = (int(train_targets.max().item()) + 1 if kind == "multiclass"
                   else splits["train"].targets.shape[1])
        spec = TaskSpec(kind, int(splits["train"].features.shape[1]), out_dim)
        return TaskData(spec, splits["train"], splits["val"], splits.get("test"),
                        description=f"your data: {len(splits['train'])} train, {len(splits['val'])} val samples, "
                                    f"task {kind}")
    raise ConfigError(f"{where}: the data factory returned a {type(result).__name__}; expected a "
                      "harness.contracts.TaskData, a dict {'train': (x, y), 'val': (x, y), 'test': (x, y)}, "
                      "a PyG Data graph with train_mask/val_mask, or a dict of lists of PyG Data graphs")


def _is_pyg_data(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch_geometric.data") and hasattr(value, "edge_index")


def _node_task(graph, where: str) -> TaskData:
    for key in ("x", "y", "train_mask", "val_mask"):
        if getattr(graph, key, None) is None:
            raise ConfigError(f"{where}: the graph has no {key!r}; node-level learning needs x, y, "
                              "train_mask and val_mask (and optionally test_mask)")
    kind, out_dim = infer_task(graph.y)
    splits = [NodeSplit(graph, getattr(graph, f"{name}_mask").nonzero().view(-1), None)
              if getattr(graph, f"{name}_mask", None) is not None else None for name in ("train", "val", "test")]
    spec = TaskSpec(kind, int(graph.num_node_features), out_dim, graph="node")
    return TaskData(spec, splits[0], splits[1], splits[2],
                    description=f"your graph: {graph.num_nodes} nodes, {graph.num_edges} edges; "
                                f"{len(splits[0])}/{len(splits[1])}/{len(splits[2]) if splits[2] else 0} "
                                "train/val/test nodes")


def _graph_task(result: dict, where: str) -> TaskData:
    train = list(result["train"])
    targets = torch.cat([g.y.view(1, -1) for g in train])
    kind = result.get("task") or infer_task(targets.view(-1) if targets.shape[1] == 1 else targets)[0]
    out_dim = int(targets.max().item()) + 1 if kind == "multiclass" else int(targets.shape[1])
    spec = TaskSpec(kind, int(train[0].num_node_features), out_dim, graph="graph")
    splits = {name: GraphSplit(list(result[name])) for name in ("train", "val", "test") if name in result}
    return TaskData(spec, splits["train"], splits["val"], splits.get("test"),
                    description=f"your graphs: {len(train)} train, {len(splits['val'])} val")
