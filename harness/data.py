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

The model is called with what the batch has, matched to its ``forward`` by parameter name: the
first parameter gets the inputs (``x``) whatever its name (``nn.Sequential`` calls it ``input``),
the others by name (``edge_index``, ``batch``, ``num_graphs``, ``edge_attr``, ...); a ``forward``
whose only parameter is called ``data`` or ``batch`` gets the whole PyG batch.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import weakref
from dataclasses import dataclass
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


# model -> (its train.model_output, the loss object when the model computes its own loss), for the
# models whose recipe sets either (weak: no model is kept alive by it).
_CALL_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def choose_output(model: torch.nn.Module, choice: Optional[Any], own_loss: Any = None) -> None:
    """What call_model returns of this model's outputs (train.model_output; see select_output),
    and, with ``loss.name: model``, the loss object that takes the model's own loss from them."""
    if choice is None and own_loss is None:
        _CALL_PLANS.pop(model, None)
    else:
        _CALL_PLANS[model] = (choice, own_loss)


def call_model(model, x: torch.Tensor, fields: dict[str, Any], whole: Any = None,
               targets: Optional[torch.Tensor] = None, args: Optional[tuple] = None) -> torch.Tensor:
    """``model(x, <fields its forward names>)`` (or ``model(*args)``), the tensor the loss and
    metrics receive of what it returns; see the module docstring. With the model's own loss
    (``loss.name: model``) the targets go in by their forward parameter's name and the loss it
    returns is handed to that loss object."""
    module = getattr(model, "module", model)  # DDP's forward takes *args: look at the model's own
    choice, own_loss = _CALL_PLANS.get(module, (None, None)) if _CALL_PLANS else (None, None)
    extra = {}
    if own_loss is not None:
        if targets is None:
            raise ConfigError("loss.name: model: this kind of data does not pass targets to the model (node-level "
                              "graphs: the model sees whole neighbourhoods, its own loss would cover other nodes); "
                              "use a loss of the harness's")
        extra = {own_loss.targets_parameter(module): targets}
    if args is not None:
        outputs = model(*args, **extra)
    else:
        outputs = _forward(model, module, x, {**fields, **extra}, whole)
    if own_loss is not None:
        outputs = own_loss.take(outputs)
    if choice is None and isinstance(outputs, torch.Tensor):
        return outputs
    return select_output(outputs, choice)


def _forward(model, module, x: torch.Tensor, fields: dict[str, Any], whole: Any):
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


def select_output(outputs: Any, choice: Optional[Any] = None) -> torch.Tensor:
    """The tensor the loss and metrics receive from what a model returned (``train.model_output``).

    ``choice`` null: a tensor as it is; a mapping (dict, a Hugging Face ``ModelOutput``) or an
    object with a tensor ``logits``: that; a tuple, list or mapping holding one tensor (nanoGPT's
    ``(logits, None)`` without targets): that one. An int indexes a tuple or list, a string is a
    key or attribute. Anything else is a ConfigError naming the structure."""
    if choice is None and isinstance(outputs, torch.Tensor):
        return outputs
    if choice is not None:
        try:
            if isinstance(choice, int) and not isinstance(outputs, dict):
                picked = outputs[choice]
            elif isinstance(outputs, dict):
                picked = outputs[choice]
            else:
                picked = getattr(outputs, choice)
        except (KeyError, IndexError, AttributeError, TypeError):
            picked = None
        if isinstance(picked, torch.Tensor):
            return picked
        raise ConfigError(f"train.model_output: {choice!r} is not a tensor of the model's output, "
                          f"{describe_output(outputs)}")
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = list(outputs.values()) if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else []
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    raise ConfigError(f"model: its forward returned {describe_output(outputs)}; set train.model_output to the "
                      "index (0) or key (logits) of the tensor the loss and metrics should receive")


def describe_output(outputs: Any) -> str:
    """``a tuple (0: tensor [2, 5], 1: None)``, ``a dict (logits: tensor [2, 5], ...)``."""
    def part(value: Any) -> str:
        return f"tensor {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

    if isinstance(outputs, dict):
        items = ", ".join(f"{key}: {part(value)}" for key, value in list(outputs.items())[:8])
    elif isinstance(outputs, (tuple, list)):
        items = ", ".join(f"{i}: {part(value)}" for i, value in enumerate(outputs[:8]))
    else:
        fields = {k: v for k, v in vars(outputs).items() if not k.startswith("_")} if hasattr(outputs, "__dict__") else {}
        items = ", ".join(f"{key}: {part(value)}" for key, value in list(fields.items())[:8])
    return f"a {type(outputs).__name__} ({items})"


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


class TensorBatch(Batch):
    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def predict(self, model) -> torch.Tensor:
        return call_model(model, self.features, {}, targets=self.targets)

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
        return call_model(model, self.batch.x, fields, whole=self.batch, targets=self.targets)

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


def _is_pyg_data(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch_geometric.data") and hasattr(value, "edge_index")


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
# Your own torch Dataset, read through a DataLoader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderSettings:
    """``data.num_workers`` etc.: how a Dataset split is read (not what is read)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None
    collate_fn: Any = None  # None: torch's default_collate, PyG's Collater for Data items
    target_key: str = "y"  # the target of dict items
    hops: Optional[int] = None  # node-level graphs: k-hop neighbourhoods of each batch's seed nodes
    num_neighbors: Optional[tuple] = None  # ... or sampled neighbours per hop (NeighborSampler)


def item_seed(run_seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's randomness in one epoch: the same whatever the number of workers,
    ranks, or interruptions (epoch -1: outside training, e.g. validation)."""
    return (run_seed * 1_000_003 + (epoch + 1) * 7_919 + index * 104_729 + 12_345) % (2**63 - 1)


_current_item_seed: Optional[int] = None


def item_generator(device: str = "cpu") -> torch.Generator:
    """A generator for the sample being loaded, seeded from (run seed, epoch, sample index): the
    one line a Dataset's ``__getitem__`` writes for augmentations that do not depend on how the
    data is loaded (``g = harness.data.item_generator(); torch.rand(3, generator=g)``). The
    global torch, random and numpy generators are seeded the same way while an item loads, so
    code that uses them is reproducible too."""
    if _current_item_seed is None:
        raise RuntimeError("harness.data.item_generator() is meant for a Dataset's __getitem__ while the "
                           "harness loads it")
    return torch.Generator(device).manual_seed(_current_item_seed)


class SampleError(RuntimeError):
    """A sample that could not be loaded: names the split, the index and the dataset's own error."""


class _SeededItems(torch.utils.data.Dataset):
    """Wraps the user's Dataset: key (index, epoch) -> its item, loaded with that item's seed;
    checks each item against the first one's structure."""

    def __init__(self, dataset, split_name: str, run_seed: int, reference: Optional[tuple], in_worker_safe: bool):
        self.dataset, self.split_name, self.run_seed = dataset, split_name, run_seed
        self.reference = reference  # (kind, shapes) of item 0
        self.in_main_process = not in_worker_safe

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        global _current_item_seed
        import random

        seed = item_seed(self.run_seed, epoch, index)
        saved = None
        if torch.utils.data.get_worker_info() is None:
            # In the training process: keep its own random streams (dropout) untouched.
            saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        # The CPU generator only: torch.manual_seed also queues seeds for every accelerator backend,
        # ~0.1-0.4 ms an item (benchmarks figure 9). Items are loaded on the CPU.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        _current_item_seed = seed
        try:
            item = self.dataset[index]
        except Exception as exc:
            import traceback

            raise SampleError(f"loading sample {index} of the {self.split_name} split "
                              f"({type(self.dataset).__name__}) failed:\n{traceback.format_exc()}") from exc
        finally:
            _current_item_seed = None
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])
        if self.reference is not None:
            check_item(item, self.reference, index, self.split_name)
        return item


def describe_item(item) -> tuple:
    """(kind, shapes) of an item: what every other item of the data set must look like."""
    if _is_pyg_data(item):
        return ("graph", (None if item.x is None else item.x.shape[1:],))
    if isinstance(item, dict):
        return ("dict", tuple(sorted((k, _shape(v)) for k, v in item.items())))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return ("pair", (_shape(item[0]), _shape(item[1])))
    return ("other", type(item).__name__)


def _shape(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, np.ndarray):
        return ("array", value.shape, str(value.dtype))
    if isinstance(value, (tuple, list)):
        return ("seq", tuple(_shape(v) for v in value))
    return (type(value).__name__,)


def check_item(item, reference: tuple, index: int, split_name: str) -> None:
    seen = describe_item(item)
    if seen[0] == "graph" and reference[0] == "graph":
        if seen != reference:
            raise SampleError(f"sample {index} of the {split_name} split: node features of shape {seen[1][0]}, "
                              f"expected {reference[1][0]} (as sample 0)")
        return
    if seen != reference:
        raise SampleError(f"sample {index} of the {split_name} split is {_readable(seen)}; expected "
                          f"{_readable(reference)} (as sample 0): every item must have the same structure, "
                          "types and shapes (or give data.collate_fn)")


def _readable(described: tuple) -> str:
    kind, detail = described
    if kind == "pair":
        return f"an (input, target) pair of {detail[0]} and {detail[1]}"
    if kind == "dict":
        return "a dict " + ", ".join(f"{k}: {v}" for k, v in detail)
    return f"a {detail}" if kind == "other" else f"a {kind} {detail}"


def default_collate(reference: tuple, dataset):
    """How items like ``reference`` (describe_item) are collated without data.collate_fn: PyG's
    Collater for graphs, torch's default_collate otherwise."""
    if reference[0] == "graph":
        from torch_geometric.loader.dataloader import Collater

        return Collater(dataset)
    return torch.utils.data.default_collate


class ItemBatch(Batch):
    """A collated batch of (input, target) pairs or dicts; the model gets the input(s)."""

    def __init__(self, inputs, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def predict(self, model) -> torch.Tensor:
        if isinstance(self.inputs, dict):
            (first, x), *rest = self.inputs.items()
            return call_model(model, x, dict(rest), targets=self.targets)
        if isinstance(self.inputs, (tuple, list)):
            return call_model(model, None, {}, targets=self.targets, args=tuple(self.inputs))
        return call_model(model, self.inputs, {}, targets=self.targets)

    def to(self, device) -> "ItemBatch":
        move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
        inputs = ({k: move(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else type(self.inputs)(move(v) for v in self.inputs) if isinstance(self.inputs, (tuple, list))
                  else move(self.inputs))
        return ItemBatch(inputs, move(self.targets))


def as_batch(collated, target_key: str) -> Batch:
    if _is_pyg_data(collated) or type(collated).__name__ in ("Batch", "DataBatch"):
        return GraphBatch(collated)
    if isinstance(collated, dict):
        if target_key not in collated:
            raise ConfigError(f"data.target_key: items are dicts without {target_key!r} (keys: {sorted(collated)})")
        inputs = {k: v for k, v in collated.items() if k != target_key}
        return ItemBatch(inputs, _targets(collated[target_key]))
    inputs, targets = collated
    return ItemBatch(inputs, _targets(targets))


def _targets(targets: torch.Tensor) -> torch.Tensor:
    return targets.view(-1, 1) if targets.is_floating_point() and targets.dim() == 1 else targets


class DatasetSplit(Split):
    """A map-style torch Dataset; batches are the harness's index lists for this rank, loaded by a
    DataLoader (``batch_sampler``), so nothing is replayed on resume and a sample's randomness
    depends on (seed, epoch, index) only."""

    def __init__(self, dataset, name: str, run_seed: int, settings: LoaderSettings):
        if len(dataset) == 0:
            raise ConfigError(f"data: the {name} split is empty")
        self.dataset, self.name, self.run_seed, self.settings = dataset, name, run_seed, settings
        first = _SeededItems(dataset, name, run_seed, None, False)[(0, -1)]
        self.reference = describe_item(first)
        self.first_item = first
        self.collate = settings.collate_fn or default_collate(self.reference, dataset)
        self._loader = None
        self._index_lists: Iterable = ()

    def __len__(self) -> int:
        return len(self.dataset)

    def _items(self) -> _SeededItems:
        # A collate_fn of the user's own takes items of any shape (padding): nothing to check against item 0.
        check = self.reference if self.settings.collate_fn is None else None
        return _SeededItems(self.dataset, self.name, self.run_seed, check, self.settings.num_workers > 0)

    def fetch(self, indices: torch.Tensor, epoch: int = -1) -> Batch:
        items = self._items()
        return as_batch(self.collate([items[(int(i), epoch)] for i in indices]), self.settings.target_key)

    def batches(self, index_batches: Iterable[torch.Tensor], epoch: int = -1) -> Iterator[Batch]:
        if self.settings.num_workers == 0:
            for indices in index_batches:
                yield self.fetch(indices, epoch)
            return
        self._index_lists = _Keyed(index_batches, epoch)
        if self._loader is None or not self.settings.persistent_workers:
            self._loader = self._make_loader()
        for collated in self._loader:
            yield as_batch(collated, self.settings.target_key)

    def _make_loader(self):
        s = self.settings
        extra = {} if s.prefetch_factor is None else {"prefetch_factor": s.prefetch_factor}
        split = self

        class Sampler:  # reads the split's current index lists each time the loader iterates
            def __iter__(self):
                return iter(split._index_lists)

        # Its own generator: the loader draws its workers' base seed from it, not from the global RNG
        # (which drives dropout: with or without workers, the training stream stays the same).
        return torch.utils.data.DataLoader(self._items(), batch_sampler=Sampler(), num_workers=s.num_workers,
                                           collate_fn=self.collate, pin_memory=s.pin_memory,
                                           persistent_workers=s.persistent_workers,
                                           generator=torch.Generator().manual_seed(self.run_seed), **extra)


class _Keyed:
    """Index lists as lists of (index, epoch) keys, lazily."""

    def __init__(self, index_batches, epoch: int):
        self.index_batches, self.epoch = index_batches, epoch

    def __iter__(self):
        for indices in self.index_batches:
            yield [(int(i), self.epoch) for i in indices]


def _dataset_task(result: dict, where: str, run_seed: int, settings: LoaderSettings) -> TaskData:
    """Map-style splits become DatasetSplits, IterableDatasets StreamSplits (harness.streams)."""
    from harness.streams import StreamSplit, is_stream

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
