"""Which samples each rank sees: a per-epoch order that does not depend on the world size.

The order of an epoch is a permutation drawn from (seed, epoch) alone. A global batch is the next
``batch_size`` entries of that order, and each rank takes a contiguous slice of it. So:

* the optimizer steps per epoch, and the LR series, are the same on any number of ranks;
* "where we are in the epoch" is one number (samples consumed), which re-splits across a
  different number of ranks on resume with nothing skipped or seen twice;
* validation shards are contiguous slices with no padding, so no sample is counted twice.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def _mix(seed: int, epoch: int) -> int:
    # Distinct, stable streams per (seed, epoch); a plain seed + epoch would make seed 1 epoch 0
    # equal seed 0 epoch 1.
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)


def steps_per_epoch(num_samples: int, batch_size: int, drop_last: bool) -> int:
    steps = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
    return max(1, steps)


def global_batches(order: torch.Tensor, batch_size: int, drop_last: bool,
                   start_sample: int = 0) -> Iterator[torch.Tensor]:
    """Global batches of one epoch, starting ``start_sample`` samples into its order."""
    end = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(start_sample, end, batch_size):
        yield order[start:min(start + batch_size, end)]


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice; sizes differ by at most one, some may be empty."""
    return torch.tensor_split(indices, world_size)[rank]


def micro_batches(indices: torch.Tensor, accumulation_steps: int) -> tuple[torch.Tensor, ...]:
    """Split one global batch into gradient-accumulation micro-batches, before sharding by rank."""
    return torch.tensor_split(indices, accumulation_steps)


def validation_shards(num_samples: int, batch_size: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """Global validation batches in order, each split across ranks with no padding."""
    for start in range(0, num_samples, batch_size):
        yield shard(torch.arange(start, min(start + batch_size, num_samples)), rank, world_size)


def local_micro_batches(global_indices: torch.Tensor, accumulation_steps: int, rank: int,
                        world_size: int) -> list[tuple[torch.Tensor, float]]:
    """This rank's (indices, weight) for each micro-batch of one global batch.

    A rank with no sample in a micro-batch still runs DDP's backward: on one real sample with
    weight 0, which adds nothing to the gradient."""
    micro = (global_indices,) if accumulation_steps == 1 else micro_batches(global_indices, accumulation_steps)
    out = []
    for indices in micro:
        local = indices if world_size == 1 else shard(indices, rank, world_size)
        out.append((local, 1.0) if len(local) else (global_indices[:1], 0.0))
    return out


def epoch_steps(order: torch.Tensor, batch_size: int, drop_last: bool, start_sample: int, accumulation_steps: int,
                rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, float]]]]:
    """(global batch, this rank's micro-batches) for the rest of an epoch, from ``start_sample``:
    resuming mid-epoch starts here at once, nothing replayed."""
    for global_indices in global_batches(order, batch_size, drop_last, start_sample):
        yield global_indices, local_micro_batches(global_indices, accumulation_steps, rank, world_size)


class LocalIndexBatches:
    """The index lists a rank loads in one epoch, in training order; iterable more than once (a
    DataLoader's batch sampler, read lazily as its workers prefetch)."""

    def __init__(self, make_steps):
        self.make_steps = make_steps

    def __iter__(self) -> Iterator[list[int]]:
        for _, micro in self.make_steps():
            for local, _ in micro:
                yield local
