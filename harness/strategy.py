"""How the model is distributed: DDP (a full copy per rank, gradients all-reduced) or FSDP2 (each
rank holds its rows of every parameter). The loop, the evaluation, the checkpoint parts and the
end files ask this one object; none of them asks which strategy runs.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Optional

import torch

from harness import sharding
from harness.contracts import ConfigError
from harness.distributed import buffers_from_rank0

logger = logging.getLogger("harness")


class DDP:
    """A full model on every rank (torch DDP through ``accelerator.prepare`` on several ranks)."""

    name = "ddp"
    sharded = False

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def check_data(self, task) -> None:
        pass

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Before the optimizer is built: nothing to split."""
        return model

    def wrap(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """After the optimizer is built: (the model the step calls, the model without wrappers)."""
        prepared = self.accelerator.prepare(model)  # DDP on several ranks, device placement, autocast
        return prepared, self.accelerator.unwrap_model(prepared)

    def no_sync(self, model: torch.nn.Module):
        """A micro-batch before the last: accumulate locally, reduce once at the last."""
        return self.accelerator.no_sync(model)

    def before_validation(self, raw_model: torch.nn.Module) -> None:
        buffers_from_rank0(self.accelerator, raw_model)  # one set of BatchNorm statistics, the one checkpoints hold

    def validation_batches(self, split, shards: list) -> Iterator[tuple]:
        """(batch, counts) for this rank's validation shards: each rank runs only its own."""
        return ((batch, True) for batch in split.batches([s for s in shards if len(s)]))

    def writes_state(self, rank: int) -> bool:
        """Whether this rank writes part of the model and optimizer state into a checkpoint."""
        return rank == 0

    def rows_to_save(self, tensors: dict, rank: int, world: int) -> tuple[Optional[dict], Optional[dict]]:
        """(what this rank writes of a state, the rows layout): rank 0 writes it whole, once."""
        return (tensors if rank == 0 else None), None

    def full_state(self, state: dict) -> dict:
        return state


class FSDP2(DDP):
    """torch's fully_shard on a 1-D mesh of all ranks (harness/sharding.py)."""

    name = "fsdp"
    sharded = True

    def __init__(self, accelerator, wrap_classes: Optional[list[str]], from_rank0: bool):
        super().__init__(accelerator)
        self.wrap_classes, self.from_rank0 = wrap_classes, from_rank0

    def check_data(self, task) -> None:
        if any(getattr(split, "streamed", False) for split in (task.val, task.test)):
            raise ConfigError("data: a validation or test stream (IterableDataset) with train.strategy fsdp: every "
                              "rank must run every sharded forward in lockstep, which a stream of unknown length per "
                              "rank cannot promise; give map-style val/test Datasets")

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sharded before the optimizer is built: its state then holds this rank's rows only."""
        acc = self.accelerator
        return sharding.shard(model, acc.device, acc.num_processes, self.wrap_classes, acc.mixed_precision,
                              from_rank0=self.from_rank0)

    def wrap(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return model, model  # FSDP2 modules are distributed already

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module):
        sharding.set_gradient_sync(model, False)
        try:
            yield
        finally:
            sharding.set_gradient_sync(model, True)

    def validation_batches(self, split, shards: list) -> Iterable[tuple]:
        return sharding.lockstep(split.batches, shards)  # every rank runs every forward (each all-gathers)

    def writes_state(self, rank: int) -> bool:
        return True

    def rows_to_save(self, tensors: dict, rank: int, world: int) -> tuple[Optional[dict], Optional[dict]]:
        """Each rank writes its own rows; the layout (rank 0's sharding.json) says whose rows are where."""
        return sharding.split_for_files(tensors, rank, world)

    def full_state(self, state: dict) -> dict:
        return sharding.full_tensors(state)  # every rank takes part in the gathers


def choose(accelerator, configured: str, wrap_classes: Optional[list[str]], from_rank0: bool):
    """The strategy of this run: ``configured`` as sharding.strategy_from_launch resolved it."""
    if configured == "fsdp" and (accelerator.num_processes > 1 or sharding.join_single_rank_group(accelerator)):
        return FSDP2(accelerator, wrap_classes, from_rank0)
    if configured == "fsdp" and accelerator.is_main_process:
        logger.info("train.strategy fsdp with one process: nothing to shard, training unsharded")
    return DDP(accelerator)
