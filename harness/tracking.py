"""TensorBoard: rank 0 writes scalars into ``<run>/tb``; one reader for tests and plots.

Events are written by our own small writer, on the training thread, at the log interval: the
records are a few hundred bytes, so encoding them costs microseconds. TensorBoard's SummaryWriter
hands every event to a writer thread instead, and on a small model that thread's share of the GIL
cost ~12% of the step rate (BENCHMARKS.md). The file format is TensorBoard's own: each record is
a TFRecord (length, masked CRC-32C of the length, the serialized ``Event`` proto, masked CRC-32C
of the data), built from TensorBoard's proto classes; the ``crc32c`` package computes the checksum
(in hardware where the CPU has it).

A resumed run writes a new event file into the same folder, opening with a ``SessionLog.START``
at the resume step (what ``SummaryWriter(purge_step=...)`` writes): TensorBoard then drops the
points the interrupted process logged after its last checkpoint, instead of showing them twice.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Optional

import crc32c

TB_DIR = "tb"
FLUSH_EVERY_S = 10.0  # events reach the disk at least this often (and at close)
_file_numbers = itertools.count()


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", _masked_crc32c(header)), data,
                     struct.pack("<I", _masked_crc32c(data))))


class EventFile:
    """One ``events.out.tfevents.*`` file, appended to through a buffer, flushed every few seconds."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._event = Event
        folder.mkdir(parents=True, exist_ok=True)
        # The name TensorBoard's writers use; the counter keeps two files of one process apart.
        self.path = folder / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                              f"{os.getpid()}.{next(_file_numbers)}")
        self._file = open(self.path, "ab")
        self._flushed_at = time.monotonic()
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self.write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def write(self, event) -> None:
        self._file.write(tf_record(event.SerializeToString()))

    def write_summary(self, step: int, summary) -> None:
        self.write(self._event(wall_time=time.time(), step=step, summary=summary))

    def serialized_summary_field(self, summary) -> bytes:
        """``summary`` as the serialized ``summary`` field of an Event, for write_summary_bytes."""
        return self._event(summary=summary).SerializeToString()

    def write_summary_bytes(self, step: int, wall_time: float, summary_field: bytes) -> None:
        """An Event from its header fields plus an already-serialized ``summary`` field: protobuf
        messages concatenate, so the two serializations together are one Event."""
        self._file.write(tf_record(self._event(wall_time=wall_time, step=step).SerializeToString() + summary_field))

    def flush_if_due(self) -> None:
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class TensorBoardLog:
    """Scalars for TensorBoard, all on the optimizer-step x axis. Disabled off the main rank."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.file: Optional[EventFile] = EventFile(Path(run_dir) / TB_DIR, purge_step) if enabled else None
        # Serialized ``summary`` fields of recent LR rows: the LR changes rarely, the step always.
        self._lr_summaries: dict[tuple, bytes] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.file is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self.file.write_summary(step, summary)
        self.file.flush_if_due()

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        """The LR each group applied at optimizer steps first_step, first_step+1, ..."""
        if self.file is None:
            return
        wall_time = time.time()
        for offset, row in enumerate(lrs):
            key = (tuple(group_names), tuple(row))
            summary_field = self._lr_summaries.get(key)
            if summary_field is None:
                summary_field = self._lr_summary_field(group_names, row)
                if len(self._lr_summaries) > 64:  # a schedule that changes the LR every step
                    self._lr_summaries.clear()
                self._lr_summaries[key] = summary_field
            self.file.write_summary_bytes(first_step + offset, wall_time, summary_field)
        self.file.flush_if_due()

    def _lr_summary_field(self, group_names: list[str], row: list[float]) -> bytes:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=f"lr/{name}", simple_value=lr) for name, lr in zip(group_names, row)]
        return self.file.serialized_summary_field(Summary(value=values))

    def hparams(self, flat_config: dict, metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters, in this same event file (add_hparams would make a new folder)."""
        if self.file is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_config.items()}
        clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))}
        for summary in hparams(clean, metrics):
            self.file.write_summary(0, summary)
        self.scalars(step, metrics)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_scalars(run_dir: Path | str, keep_duplicates: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``<run>/tb`` as sorted (step, value) pairs, purges applied.

    With ``keep_duplicates`` a step logged twice shows twice (to prove a resume does not)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(run_dir) / TB_DIR
    if not tb_dir.is_dir():
        raise FileNotFoundError(f"no TensorBoard folder at {tb_dir}")
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        events = [(event.step, event.value) for event in accumulator.Scalars(tag)]
        if keep_duplicates:
            series[tag] = sorted(events, key=lambda e: e[0])
        else:
            series[tag] = sorted(dict(events).items())  # a later write of the same step wins
    return series
