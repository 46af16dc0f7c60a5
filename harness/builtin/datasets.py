"""Data sets by name: bundled or generated ones for the recipes, real loaders for users' own files.

A data set is built into a :class:`TaskData`: what kind of target it has, the shapes the model
needs, and splits (train / val / test). A split fetches a batch from a tensor of sample indices,
so the sampler (``harness.sampling``) alone decides which rank sees which samples.

torch_geometric is imported only by the graph data sets: it costs seconds at start-up.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from harness.components import register
from harness.contracts import ConfigError, TaskData, TaskKind, TaskSpec
from harness.data import GraphSplit, NodeSplit, TensorSplit


def _split_arrays(x: np.ndarray, y: np.ndarray, test_size: float, val_size: float, random_state: int,
                  standardize: bool) -> list[np.ndarray]:
    """[x_train, y_train, x_val, y_val, x_test, y_test]; the scaler is fitted on the training part only."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=random_state)
    if val_size > 0:
        x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=val_size,
                                                          random_state=random_state)
    else:
        # No separate validation part (as in the breast-cancer article): validate on the test part.
        x_val, y_val = x_test, y_test
    if standardize:
        scaler = StandardScaler().fit(x_train)
        x_train, x_val, x_test = (scaler.transform(a) for a in (x_train, x_val, x_test))
    return [np.asarray(a) for a in (x_train, y_train, x_val, y_val, x_test, y_test)]


def cached_arrays(name: str, arguments: dict, compute) -> list[np.ndarray]:
    """``compute()``'s arrays, kept in ``$HARNESS_CACHE_DIR`` (default ``~/.cache/harness``) under a
    key of the data set, its arguments and the scikit-learn and numpy versions: importing
    scikit-learn (scipy with it) and splitting costs ~0.8 s at every start, reading the arrays
    back ~1 ms. Plain ``.npy`` arrays (``allow_pickle=False``); written atomically, so ranks
    starting together may both write it; any problem with the cache just recomputes."""
    import hashlib
    import json
    import os
    from importlib import metadata

    try:
        versions = {p: metadata.version(p) for p in ("scikit-learn", "numpy")}
    except metadata.PackageNotFoundError:
        return compute()
    key = hashlib.sha256(json.dumps([name, arguments, versions, 1], sort_keys=True).encode()).hexdigest()[:20]
    root = Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "harness")
    path = root / f"{name}-{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return [stored[f"a{i}"] for i in range(len(stored.files))]
    except Exception:  # noqa: BLE001 - missing, truncated (BadZipFile), foreign: recompute
        pass
    arrays = compute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{path.name}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, path)
    except OSError:
        pass
    return arrays


def _standardised_splits(x: np.ndarray, y: np.ndarray, kind: TaskKind, test_size: float, val_size: float,
                         random_state: int, standardize: bool) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    return _as_splits(_split_arrays(x, y, test_size, val_size, random_state, standardize), kind)


def _as_splits(arrays: list[np.ndarray], kind: TaskKind) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    x_train, y_train, x_val, y_val, x_test, y_test = arrays

    def split(features, targets):
        features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if kind == "multiclass":
            targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        else:
            targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
            targets = targets.view(-1, 1) if targets.dim() == 1 else targets  # [N, K]: K labels each
        return TensorSplit(features, targets)

    return split(x_train, y_train), split(x_val, y_val), split(x_test, y_test)


@register("data", "breast_cancer", aliases=(), summary="scikit-learn's bundled breast cancer table")
def breast_cancer(
        test_size: float = 0.2,
        val_size: float = 0.1,
        random_state: int = 2,
        standardize: bool = True) -> TaskData:
    """The seed article's table (scikit-learn's copy): ``test_size`` of it held out for the test,
    ``val_size`` of the rest for validation (keep_best, early stopping and plateau choose on it).
    ``val_size: 0`` validates on the test part, as the article does: then val_* and test_* are the
    same numbers."""

    def compute() -> list[np.ndarray]:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        # scikit-learn codes malignant as 0; the article (and most users) code malignant as 1.
        return _split_arrays(bunch.data, 1 - bunch.target, test_size, val_size, random_state, standardize)

    arguments = {"test_size": test_size, "val_size": val_size, "random_state": random_state,
                 "standardize": standardize}
    arrays = cached_arrays("breast_cancer", arguments, compute)
    train, val, test = _as_splits(arrays, "binary")
    return TaskData(TaskSpec("binary", arrays[0].shape[1], 1), train, val, test,
                    description=f"breast cancer (scikit-learn bundled): {len(train)} train, "
                                + (f"{len(val)} val, {len(test)} test" if val_size > 0 else
                                   f"{len(test)} test (validating on the test part: val_size 0)"))


@register("data", "csv", aliases=(), summary="your own CSV table")
def csv_table(
        path: str = "",
        target: str = "target",
        features: Optional[list[str]] = None,
        task: TaskKind = "binary",
        test_size: float = 0.2,
        val_size: float = 0.1,
        random_state: int = 0,
        standardize: bool = True) -> TaskData:
    """A CSV file with a header row; ``features`` null: every column but the target."""
    if not path:
        raise ConfigError("data.path: the csv data set needs a path to a CSV file with a header row")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path: CSV file not found: {path}")
    # utf-8-sig: a spreadsheet export's byte-order mark would otherwise glue onto the first column name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ConfigError(f"{path}: empty file, expected a header row") from None
        rows = [row for row in reader if row]
    header = [h.strip() for h in header]
    if target not in header:
        raise ConfigError(f"{path}: no column {target!r} (data.target). Columns: {', '.join(header)}")
    features = features or [h for h in header if h != target]
    for name in features:
        if name not in header:
            raise ConfigError(f"{path}: no column {name!r} (data.features). Columns: {', '.join(header)}")
    if len(rows) < 10:
        raise ConfigError(f"{path}: only {len(rows)} rows; need at least 10 to split train/val/test")
    columns = [header.index(name) for name in features]
    target_column = header.index(target)
    x = np.empty((len(rows), len(columns)), dtype=np.float64)
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise ConfigError(f"{path}: line {r + 2} has {len(row)} fields, the header has {len(header)}")
        for c, column in enumerate(columns):
            try:
                x[r, c] = float(row[column])
            except ValueError:
                x[r, c] = math.nan
            if not math.isfinite(x[r, c]):
                raise ConfigError(f"{path}: line {r + 2}, column {header[column]!r}: "
                                  f"{row[column]!r} is not a finite number") from None
    raw_targets = [row[target_column].strip() for row in rows]
    if task == "regression":
        try:
            y = np.array([float(v) for v in raw_targets])
        except ValueError as exc:
            raise ConfigError(f"{path}: column {target!r}: regression targets must be numbers ({exc})") from None
        classes = []
    else:
        classes = sorted(set(raw_targets), key=_natural_key)
        y = np.array([classes.index(v) for v in raw_targets])
        if task == "binary" and len(classes) != 2:
            raise ConfigError(f"{path}: column {target!r} has {len(classes)} classes {classes[:10]}; "
                              "task: binary needs exactly 2 (use task: multiclass)")
    train, val, test = _standardised_splits(x, y, task, test_size, val_size, random_state, standardize)
    out_dim = len(classes) if task == "multiclass" else 1
    return TaskData(TaskSpec(task, len(columns), out_dim), train, val, test,
                    description=f"{path}: {len(rows)} rows, {len(columns)} features, task {task}")


def _natural_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


# --------------------------------------------------------------------------------------------
# Node classification on one graph
# --------------------------------------------------------------------------------------------


@register("data", "sbm_nodes", aliases=(), summary="generated SBM graph, node classification")
def sbm_nodes(
        num_nodes: int = 1200,
        num_classes: int = 4,
        num_features: int = 16,
        p_in: float = 0.02,
        p_out: float = 0.002,
        feature_noise: float = 2.0,
        train_fraction: float = 0.6,
        val_fraction: float = 0.2,
        subgraph_hops: Optional[int] = 3,
        graph_seed: int = 0,
        num_workers: int = 0,
        num_neighbors: Optional[list[int]] = None,
        seed: int = 0) -> TaskData:
    """A stochastic-block-model graph whose node features are noisy class centroids.

    Neighbours mostly share a class, so a GCN that averages over them beats a per-node MLP.
    """
    from torch_geometric.data import Data
    from torch_geometric.utils import stochastic_blockmodel_graph

    generator = torch.Generator().manual_seed(graph_seed)
    sizes = [num_nodes // num_classes] * num_classes
    sizes[-1] += num_nodes - sum(sizes)
    probs = [[p_in if i == j else p_out for j in range(num_classes)] for i in range(num_classes)]
    with torch.random.fork_rng():
        torch.manual_seed(graph_seed)  # stochastic_blockmodel_graph draws from the global RNG
        edge_index = stochastic_blockmodel_graph(sizes, probs)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(sizes)])
    centroids = torch.randn(num_classes, num_features, generator=generator)
    x = centroids[y] + feature_noise * torch.randn(num_nodes, num_features, generator=generator)
    graph = Data(x=x, edge_index=edge_index, y=y)
    order = torch.randperm(num_nodes, generator=generator)
    n_train = int(train_fraction * num_nodes)
    n_val = int(val_fraction * num_nodes)
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    spec = TaskSpec("multiclass", num_features, num_classes, graph="node")
    if num_neighbors:  # data.num_neighbors: sampled neighbourhoods instead of whole k-hop ones
        subgraph_hops = None
    splits = [NodeSplit(graph, nodes, subgraph_hops, num_workers if nodes is train else 0, num_neighbors, seed)
              for nodes in (train, val, test)]
    return TaskData(spec, *splits,
                    description=f"SBM graph: {num_nodes} nodes, {edge_index.size(1)} edges, "
                                f"{num_classes} classes; {len(train)}/{len(val)}/{len(test)} train/val/test nodes")


# --------------------------------------------------------------------------------------------
# Graph-level learning: batches of many small graphs
# --------------------------------------------------------------------------------------------


ATOM_TYPES = ("C", "N", "O", "S", "Cl")


@register("data", "molecules", aliases=(), summary="generated molecule-like graphs, graph regression")
def molecules(
        num_graphs: int = 2000,
        min_atoms: int = 6,
        max_atoms: int = 20,
        ring_probability: float = 0.3,
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        graph_seed: int = 0,
        num_workers: int = 0) -> TaskData:
    """Generated molecule-like graphs (atoms as one-hot types, bonds as edges, some rings).

    The target is a made-up additive property (think of a group-contribution estimate):
    per-atom contributions plus a per-ring term, standardised. A GNN with sum pooling can learn it.
    """
    from torch_geometric.data import Data

    rng = np.random.default_rng(graph_seed)
    contributions = np.array([0.5, 1.0, -0.8, 1.5, -1.2])
    ring_term = 0.7
    graphs, raw_targets = [], []
    for _ in range(num_graphs):
        n = int(rng.integers(min_atoms, max_atoms + 1))
        atoms = rng.choice(len(ATOM_TYPES), size=n, p=[0.6, 0.15, 0.15, 0.05, 0.05])
        bonds = [(i, int(rng.integers(0, i))) for i in range(1, n)]  # a random tree: connected
        rings = 0
        for _ in range(3):
            if rng.random() < ring_probability:
                a, b = (int(v) for v in rng.choice(n, size=2, replace=False))
                if (a, b) not in bonds and (b, a) not in bonds:
                    bonds.append((a, b))
                    rings += 1
        src = [a for a, b in bonds] + [b for a, b in bonds]
        dst = [b for a, b in bonds] + [a for a, b in bonds]
        x = torch.zeros(n, len(ATOM_TYPES))
        x[torch.arange(n), torch.as_tensor(atoms)] = 1.0
        raw_targets.append(float(contributions[atoms].sum() + ring_term * rings))
        graphs.append(Data(x=x, edge_index=torch.tensor([src, dst], dtype=torch.long)))
    targets = np.array(raw_targets)
    mean, std = targets.mean(), targets.std()
    for graph, value in zip(graphs, targets):
        graph.y = torch.tensor([[(value - mean) / std]], dtype=torch.float32)
    order = np.random.default_rng(graph_seed + 1).permutation(num_graphs)
    n_train, n_val = int(train_fraction * num_graphs), int(val_fraction * num_graphs)
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    train, val, test = ([graphs[i] for i in part] for part in parts)
    spec = TaskSpec("regression", len(ATOM_TYPES), 1, graph="graph")
    return TaskData(spec, GraphSplit(train, num_workers), GraphSplit(val, num_workers),
                    GraphSplit(test, num_workers),
                    description=f"generated molecules: {num_graphs} graphs of {min_atoms}-{max_atoms} atoms; "
                                f"{len(train)}/{len(val)}/{len(test)} train/val/test; target standardised")


@register("data", "tu_folder", aliases=('tudataset',), summary="your own TU-format graph data set")
def tu_folder(
        root: str = "",
        prefix: str = "",
        task: TaskKind = "multiclass",
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0) -> TaskData:
    """A graph data set in the TU format (PyG's TUDataset raw files) from a local folder.

    ``root/PREFIX_A.txt``, ``PREFIX_graph_indicator.txt``, ``PREFIX_graph_labels.txt`` and optionally
    ``PREFIX_node_labels.txt`` / ``PREFIX_node_attributes.txt``. Read straight from the text files:
    no processed pickle is written or trusted.
    """
    # prefix: the files' common prefix (PyG calls it the data set's name; data.name is the data set kind).
    from torch_geometric.data import InMemoryDataset
    from torch_geometric.io import read_tu_data

    if not root or not prefix:
        raise ConfigError("data.root and data.prefix: the tu_folder data set needs the folder and the file prefix")
    root = Path(root)
    required = [root / f"{prefix}_{part}.txt" for part in ("A", "graph_indicator", "graph_labels")]
    missing = [str(p) for p in required if not p.is_file()]
    if missing:
        raise ConfigError(f"data.root: missing TU files: {', '.join(missing)}")
    try:
        data, slices, _ = read_tu_data(str(root), prefix)
    except Exception as exc:  # malformed text files: name the folder, keep the cause
        raise ConfigError(f"{root}: cannot read TU data set {prefix!r}: {exc}") from exc

    class _Loaded(InMemoryDataset):
        def __init__(self):
            super().__init__(root=None)
            self.data, self.slices = data, slices

    dataset = _Loaded()
    if dataset.num_node_features == 0:
        raise ConfigError(f"{root}: {prefix} has no node labels or attributes to learn from")
    graphs = [dataset[i] for i in range(len(dataset))]
    if task == "multiclass":
        labels = torch.cat([g.y.view(-1) for g in graphs]).long()
        classes = sorted(set(labels.tolist()))
        remap = {c: i for i, c in enumerate(classes)}
        for g in graphs:
            g.y = torch.tensor([remap[int(g.y.view(-1)[0])]], dtype=torch.long)
        out_dim = len(classes)
    else:
        for g in graphs:
            g.y = g.y.view(1, -1).float()
        out_dim = 1
    order = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_train, n_val = int(train_fraction * len(graphs)), int(val_fraction * len(graphs))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    train, val, test = ([graphs[i] for i in part] for part in parts)
    if not train or not val:
        raise ConfigError(f"{root}: {len(graphs)} graphs are too few for train/val splits")
    spec = TaskSpec(task, dataset.num_node_features, out_dim, graph="graph")
    return TaskData(spec, GraphSplit(train, num_workers), GraphSplit(val, num_workers),
                    GraphSplit(test, num_workers) if test else None,
                    description=f"TU data set {prefix} from {root}: {len(graphs)} graphs")


@register("data", "multilabel", aliases=(), summary="scikit-learn's generated multi-label table (several 0/1 labels "
                                                   "per sample)")
def multilabel(
        samples: int = 2000,
        features: int = 20,
        labels: int = 5,
        labels_per_sample: int = 2,
        test_size: float = 0.2,
        val_size: float = 0.1,
        random_state: int = 0,
        standardize: bool = True) -> TaskData:
    """``sklearn.datasets.make_multilabel_classification``: word-count-like features, ``labels``
    independent 0/1 targets per sample (about ``labels_per_sample`` of them 1). Targets ``[N, K]``:
    the loss is the mean over every label, accuracy and F1 are per label."""

    def compute() -> list[np.ndarray]:
        from sklearn.datasets import make_multilabel_classification

        x, y = make_multilabel_classification(n_samples=samples, n_features=features, n_classes=labels,
                                              n_labels=labels_per_sample, random_state=random_state)
        return _split_arrays(x.astype(np.float64), y.astype(np.float32), test_size, val_size, random_state,
                             standardize)

    arguments = {"samples": samples, "features": features, "labels": labels, "labels_per_sample": labels_per_sample,
                 "test_size": test_size, "val_size": val_size, "random_state": random_state,
                 "standardize": standardize}
    arrays = cached_arrays("multilabel", arguments, compute)
    train, val, test = _as_splits(arrays, "binary")
    return TaskData(TaskSpec("binary", features, labels), train, val, test,
                    description=f"multi-label (scikit-learn generated): {len(train)} train, {len(val)} val, "
                                f"{len(test)} test, {labels} labels")


@register("data", "python_source_chars", aliases=("char_text",),
          summary="characters of Python's own standard-library sources, next-character prediction")
def python_source_chars(
        modules: tuple[str, ...] = ("argparse", "collections/__init__", "dataclasses", "functools", "inspect",
                                    "json/decoder", "pathlib", "string", "textwrap", "typing"),
        block_size: int = 64,
        max_chars: int = 400_000,
        val_fraction: float = 0.1,
        shift: bool = True) -> TaskData:
    """Text that ships with every Python: the named standard-library modules' sources, as bytes
    (a 256-symbol vocabulary, no tokenizer). Samples are non-overlapping windows of ``block_size``
    characters, the targets the same window shifted by one (tokens ``[B, T]`` -> next tokens
    ``[B, T]``; ``shift: false``: the window itself, for a model that shifts its labels, as
    Hugging Face causal LMs do); the last ``val_fraction`` of the text is validation and test."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in modules:
        path = folder / f"{name}.py"
        if not path.is_file():
            raise ConfigError(f"data.modules: {name!r}: no {path} in this Python's standard library")
        chunks.append(path.read_bytes())
    text = torch.frombuffer(bytearray(b"\n".join(chunks)[:max_chars]), dtype=torch.uint8).long()
    windows = (len(text) - 1) // block_size
    if windows < 4:
        raise ConfigError(f"data.block_size: {block_size}: the text ({len(text)} characters) gives {windows} windows")
    x = text[:windows * block_size].view(windows, block_size)
    y = text[1:windows * block_size + 1].view(windows, block_size) if shift else x.clone()
    held = max(2, int(windows * val_fraction))
    train, val = TensorSplit(x[:-held], y[:-held]), TensorSplit(x[-held:], y[-held:])
    return TaskData(TaskSpec("multiclass", block_size, 256), train, val, val,
                    description=f"Python's own sources: {len(text):,} characters of {len(modules)} modules, "
                                f"{len(train)} train / {len(val)} val windows of {block_size}")
