"""Your own ``IterableDataset``: a stream that can save and restore its position.

A map-style Dataset is read by index, so the harness decides which rank sees which sample and a
resume starts at one number (samples consumed). A stream has no index: each rank reads its own
stream, and where every stream (and every loader worker's copy of it) has got to is state only
the stream itself can save. So a stream is accepted when it has ``state_dict()`` (JSON-able:
numbers, strings, lists, dicts) and ``load_state_dict(state)``, and it is read through torchdata's
``StatefulDataLoader``, which collects that state from the loader workers at every batch.

The contract, in the README's words:

* the stream yields **this rank's** samples: split your source with
  ``index, count = harness.streams.shard_of_stream()`` (rank and loader worker together:
  keep every ``count``-th item starting at ``index``), as any DDP IterableDataset must;
* ``len(dataset)``: samples in one epoch over all ranks. It sets the steps per epoch
  (``len // data.batch_size``), which the LR schedule and progress need; an epoch ends there, or
  earlier when any rank's stream runs out (the ranks agree at every step);
* each epoch starts from the state the dataset had when the run started (``set_epoch(epoch)`` is
  called first when the dataset has it);
* each rank takes ``batch_size / world_size`` samples per step (per micro-batch: divided by
  ``train.grad_accum_steps`` too), so ``data.batch_size`` must divide evenly; a last partial
  batch is dropped (with loader workers, each worker batches its own share of the stream and
  drops its own last partial batch);
* a checkpoint holds each rank's loader state (``stream-rank-R.json``): a run resumes mid-epoch
  exactly at the same world size (and ``data.num_workers``); another world size is a clear error
  mid-epoch, and fine at an epoch boundary.
"""

from __future__ import annotations

import copy
import json
import random
import warnings
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from harness.batches import as_batch
from harness.contracts import Batch, ConfigError, Split
from harness.items import SampleError, default_collate, describe_item, item_seed
from harness.values import from_json_safe, to_json_safe

STREAM_FILE = "stream-rank-{rank}.json"


def shard_of_stream() -> tuple[int, int]:
    """(index, count) of the stream being read here, over all ranks and loader workers: a
    stream keeps items ``index, index + count, ...`` of its source, so each sample is read by
    exactly one worker of one rank."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def check_stream(dataset, name: str, where: str) -> None:
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(dataset, m, None))]
    cls = type(dataset).__name__
    if missing:
        raise ConfigError(
            f"{where}: the {name} split is an IterableDataset ({cls}) without {' and '.join(missing)}: the "
            "harness cannot resume it mid-epoch without replaying it. Add `def state_dict(self)` returning "
            "where the stream is (JSON-able: numbers, strings, lists, dicts) and `def load_state_dict(self, "
            "state)` that makes the next __iter__ continue from there; or give a map-style Dataset "
            "(__getitem__ and __len__)")
    if name == "train":
        try:
            length = len(dataset)
        except TypeError:
            raise ConfigError(
                f"{where}: the train split is an IterableDataset ({cls}) without __len__: give it one returning "
                "the number of samples in one epoch over all ranks; it sets the steps per epoch, which the LR "
                "schedule and progress need (an epoch still ends early if a stream runs out)") from None
        if length <= 0:
            raise ConfigError(f"{where}: len() of the train stream ({cls}) is {length}; expected > 0")


def _json_safe(state, dataset) -> dict:
    """``state`` as strict JSON (to_json_safe), or a ConfigError naming the dataset's state_dict."""

    name = f"{type(dataset).__name__}.state_dict()"
    try:
        return to_json_safe(state, name)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


class _SeededStream(torch.utils.data.IterableDataset):
    """The user's stream as the loader reads it. In a loader worker, before the first item of each
    batch is pulled, the worker's global torch, random and numpy generators are seeded from (run
    seed, epoch, which stream, items pulled so far): an augmentation that draws from them is the
    same whatever the interruptions (a worker's random state is in no checkpoint, the count is:
    it is part of the state the loader collects from each worker) and differs from epoch to epoch.
    Once a batch, not once an item: seeding costs ~40 us, a cheap item less. Without loader
    workers the training process's own generators draw, and checkpoints hold them already."""

    def __init__(self, dataset, run_seed: int):
        self.dataset, self.run_seed = dataset, run_seed
        self.epoch, self.pulled, self.seed_every = -1, 0, 1

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return {"stream": self.dataset.state_dict(), "items_pulled": self.pulled}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and set(state) == {"stream", "items_pulled"}:
            self.dataset.load_state_dict(state["stream"])
            self.pulled = state["items_pulled"]
        else:  # a checkpoint from before the count was kept: the stream's own state alone
            self.dataset.load_state_dict(state)

    def __iter__(self):

        index, count = shard_of_stream()
        in_worker = torch.utils.data.get_worker_info() is not None

        def seed_the_next_batch() -> None:  # before its first item is pulled
            if in_worker and self.pulled % self.seed_every == 0:
                self._seed(item_seed(self.run_seed, self.epoch, (self.pulled // self.seed_every) * count + index))

        seed_the_next_batch()
        for item in self.dataset:
            self.pulled += 1
            yield item
            seed_the_next_batch()

    @staticmethod
    def _seed(seed: int) -> None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)


class StreamSplit(Split):
    """One rank's stream, read by a StatefulDataLoader in fixed-size batches."""

    streamed = True

    def __init__(self, dataset, name: str, settings, where: str = "data", run_seed: int = 0):
        check_stream(dataset, name, where)
        self.dataset, self.name, self.settings = dataset, name, settings
        self.seeded = _SeededStream(dataset, run_seed)
        # What every epoch starts from; and a probe of the first item restores it after. Checked
        # JSON-able first (a clear error), then copied: a dataset may hand out its live state dict.
        state = dataset.state_dict()
        _json_safe(state, dataset)
        self.initial_state = copy.deepcopy(state)
        self.first_item = self._first_items(1)[0]

        self.reference = describe_item(self.first_item)
        self.collate = settings.collate_fn or default_collate(self.reference, dataset)
        self.epoch_samples = len(dataset) if name == "train" else None
        self._loader = None
        self._resume: Optional[tuple[int, dict]] = None  # (epoch, loader state) from a checkpoint
        self.micro_batch: Optional[int] = None  # set by configure()

    def _first_items(self, k: int) -> list:

        items = []
        try:
            for item in self.dataset:
                items.append(item)
                if len(items) == k:
                    break
        except Exception as exc:
            import traceback

            raise SampleError(f"reading the {self.name} stream ({type(self.dataset).__name__}) failed:\n"
                              f"{traceback.format_exc()}") from exc
        finally:
            self.dataset.load_state_dict(copy.deepcopy(self.initial_state))
        if not items:
            raise ConfigError(f"data: the {self.name} stream ({type(self.dataset).__name__}) yielded nothing")
        return items

    def __len__(self) -> int:
        # Training: the epoch's samples as the steps see them; otherwise unknown until read.
        return self.epoch_samples if self.epoch_samples is not None else 0

    def configure(self, batch_size: int, accumulation: int, world_size: int) -> None:
        """Each rank's share of a micro-batch; the batch must divide evenly (no index to split by)."""
        parts = accumulation * world_size
        if batch_size % parts:
            raise ConfigError(f"data.batch_size: {batch_size} does not divide by {world_size} rank(s) x "
                              f"{accumulation} accumulation step(s); with a stream (IterableDataset) each rank "
                              f"reads batch_size / (ranks x grad_accum_steps) samples per micro-batch: use a "
                              f"multiple of {parts}")
        self.micro_batch = batch_size // parts

    def fetch(self, indices: torch.Tensor) -> Batch:
        """The stream's first ``len(indices)`` samples (the probe before a run; the stream is left
        where it was)."""

        return as_batch(self.collate(self._first_items(len(indices))), self.settings.target_key)

    # -- training ---------------------------------------------------------------------------

    def resume_at(self, epoch: int, loader_state: dict) -> None:
        self._resume = (epoch, loader_state)

    def state_dict(self) -> dict:
        return self._loader.state_dict() if self._loader is not None else {}

    def _make_loader(self, batch_size: int, for_epoch: Optional[int]):
        from torchdata.stateful_dataloader import StatefulDataLoader

        s = self.settings
        self.dataset.load_state_dict(copy.deepcopy(self.initial_state))
        if for_epoch is not None and callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(for_epoch)
        self.seeded.epoch, self.seeded.pulled = (-1 if for_epoch is None else for_epoch), 0
        self.seeded.seed_every = batch_size  # each worker batches its own share: its batches start there
        extra = {} if s.prefetch_factor is None or s.num_workers == 0 else {"prefetch_factor": s.prefetch_factor}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(self.seeded, batch_size=batch_size, drop_last=for_epoch is not None,
                                      num_workers=s.num_workers, collate_fn=self.collate, pin_memory=s.pin_memory,
                                      persistent_workers=False, generator=torch.Generator().manual_seed(0), **extra)

    def batches(self, index_batches: Iterable[torch.Tensor], epoch: int = -1) -> Iterator[Optional[Batch]]:
        """One batch of ``micro_batch`` samples per index list (only their count matters); None
        once this rank's stream has run out."""

        self._loader = self._make_loader(self.micro_batch, epoch)
        if self._resume is not None:
            saved_epoch, state = self._resume
            self._resume = None
            if saved_epoch == epoch:

                self._loader.load_state_dict(from_json_safe(state))
        source = iter(self._loader)
        for _ in index_batches:
            try:
                collated = next(source)
            except StopIteration:
                yield None
                continue
            yield as_batch(collated, self.settings.target_key)

    # -- validation -------------------------------------------------------------------------

    def whole(self, batch_size: int) -> Iterator[Batch]:
        """Every sample of this rank's stream, from its start, in batches (the last may be short)."""

        for collated in self._make_loader(batch_size, None):
            yield as_batch(collated, self.settings.target_key)


def loader_state_text(split: StreamSplit, num_workers: int) -> str:
    """This rank's ``stream-rank-R.json``: its loader's state (epoch and world size are in trainer.json)."""
    return json.dumps({"num_workers": num_workers, "loader": _json_safe(split.state_dict(), split.dataset)})
