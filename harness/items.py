"""Your own map-style torch Dataset, read through a DataLoader: the items, their seeds, the split.

Each item is loaded with the global torch, ``random`` and numpy generators seeded from (run seed,
epoch, sample index), in a loader worker or not, so its randomness does not depend on how the data
is loaded; :func:`item_generator` gives the same seed as an explicit generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from harness.batches import _is_pyg_data, as_batch
from harness.contracts import Batch, ConfigError, Split

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
