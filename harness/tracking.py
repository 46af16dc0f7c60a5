"""Trackers (``run.log_with``): TensorBoard, rank 0 writing scalars into ``<run>/tb``, with one
reader for tests and plots; and ``<run>/log.jsonl``, a JSON record per logged point.

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
import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Optional

import crc32c

from harness.contracts import ConfigError
from harness.remote_trackers import MlflowLog, TrackerStartError, WandbLog, plain_params

TB_DIR = "tb"
FLUSH_EVERY_S = 10.0  # events reach the disk at least this often (and at close)
_file_numbers = itertools.count()


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_value_prefixes: dict[str, bytes] = {}


def scalar_summary_field(values) -> bytes:
    """The serialized ``summary`` field (5) of an Event holding ``Summary.Value(tag, simple_value)``
    for each (tag, value) pair: what ``Event(summary=Summary(value=[...])).SerializeToString()``
    gives (tests/test_tracking.py), at a fraction of its cost. A Value is field 1 ``tag``
    (tag 0x0a, length, UTF-8) and field 2 ``simple_value`` (tag 0x15, little-endian float32)."""
    summary = bytearray()
    for tag, value in values:
        prefix = _value_prefixes.get(tag)
        if prefix is None:
            encoded = tag.encode()
            prefix = _value_prefixes[tag] = b"\x0a" + _varint(len(encoded)) + encoded + b"\x15"
        value_bytes = prefix + _float32(value)
        summary += b"\x0a" + _varint(len(value_bytes)) + value_bytes
    return b"\x2a" + _varint(len(summary)) + bytes(summary)


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: protobuf stores an infinity
        return struct.pack("<f", math.copysign(math.inf, value))


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
                              f"{os.getpid()}.{next(_file_numbers):04d}")
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

    def write_series(self, first_step: int, wall_time: float, summary_fields: list[bytes]) -> None:
        """Events at steps first_step, first_step+1, ..., each from an already-serialized
        ``summary`` field (see ``scalar_summary_field``).

        The hot path of per-step LR logging, so the Event's two other fields are encoded here
        directly: field 1 ``wall_time`` (tag 0x09, little-endian double) and field 2 ``step``
        (tag 0x10, varint). Protobuf messages concatenate, so header + summary field is the Event
        ``Event(wall_time=..., step=..., summary=...)`` serializes to (tests/test_tracking.py)."""
        head = b"\x09" + struct.pack("<d", wall_time) + b"\x10"
        pack, masked = struct.pack, _masked_crc32c
        parts = []
        for step, summary_field in enumerate(summary_fields, first_step):
            data = head + _varint(step) + summary_field
            length = pack("<Q", len(data))
            parts += (length, pack("<I", masked(length)), data, pack("<I", masked(data)))
        self._file.write(b"".join(parts))

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
        self.file.write_series(step, time.time(), [scalar_summary_field(values.items())])
        self.file.flush_if_due()

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        """The LR each group applied at optimizer steps first_step, first_step+1, ..."""
        if self.file is None:
            return
        names = tuple(group_names)
        fields = []
        for row in lrs:
            key = (names, *row)
            summary_field = self._lr_summaries.get(key)
            if summary_field is None:
                summary_field = self._lr_summary_field(group_names, row)
                if len(self._lr_summaries) > 64:  # a schedule that changes the LR every step
                    self._lr_summaries.clear()
                self._lr_summaries[key] = summary_field
            fields.append(summary_field)
        self.file.write_series(first_step, time.time(), fields)
        self.file.flush_if_due()

    def _lr_summary_field(self, group_names: list[str], row: list[float]) -> bytes:
        return scalar_summary_field((f"lr/{name}", lr) for name, lr in zip(group_names, row))

    def hparams(self, flat_config: dict, metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters, in this same event file (add_hparams would make a new folder)."""
        if self.file is None:
            return
        from torch.utils.tensorboard.summary import hparams

        # TensorBoard's hparams take no null and no NaN: a null as its text, a NaN left out.
        clean = {k: "None" if v is None else v for k, v in plain_params(flat_config).items()
                 if not (isinstance(v, float) and math.isnan(v))}
        for summary in hparams(clean, metrics):
            self.file.write_summary(0, summary)
        self.scalars(step, metrics)

    def text(self, step: int, tag: str, markdown: str) -> None:
        """A note in TensorBoard's Text tab (e.g. the recipe changes accepted on a resume)."""
        if self.file is None:
            return
        from torch.utils.tensorboard.summary import text

        self.file.write_summary(step, text(tag, markdown))
        self.file.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


JSONL_FILE = "log.jsonl"


class JsonlLog:
    """``<run>/log.jsonl``: one JSON record per logged point ({"step": s, tag: value, ...}), the
    same series as TensorBoard's. A resumed run first drops the records the interrupted process
    wrote after its last checkpoint (steps >= purge_step), as TensorBoard's purge does, so no step
    is logged twice."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.file = None
        if not enabled:
            return
        path = Path(run_dir) / JSONL_FILE
        if purge_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and _complete_record_before(line, purge_step)]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=True) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write({"step": step, **values})

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        for step, row in enumerate(lrs, first_step):
            self._write({"step": step, **{f"lr/{name}": lr for name, lr in zip(group_names, row)}})

    def hparams(self, flat_config: dict, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, "params": plain_params(flat_config), **metrics})

    def text(self, step: int, tag: str, markdown: str) -> None:
        self._write({"step": step, tag: markdown})

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def _complete_record_before(line: str, purge_step: int) -> bool:
    try:
        return json.loads(line)["step"] < purge_step
    except (ValueError, KeyError, TypeError):  # the last line of a process killed mid-write
        return False


# name -> (run_dir, enabled, purge_step, run name, flat recipe) -> tracker
TRACKERS = {"tensorboard": lambda run_dir, enabled, purge_step, *_: TensorBoardLog(run_dir, enabled, purge_step),
            "jsonl": lambda run_dir, enabled, purge_step, *_: JsonlLog(run_dir, enabled, purge_step),
            "mlflow": MlflowLog,
            "wandb": WandbLog}


class Trackers:
    """Every tracker of ``run.log_with``, each given the same series (the loop talks to this one)."""

    def __init__(self, run_dir: Path, names: list[str], enabled: bool, purge_step: Optional[int] = None,
                 run_name: str = "run", flat_config: Optional[dict] = None):
        self.loggers, self.flat_config = [], flat_config or {}
        try:
            for name in names:
                self.loggers.append(TRACKERS[name](Path(run_dir), enabled, purge_step, run_name, self.flat_config))
        except TrackerStartError as exc:
            self.close()
            raise ConfigError(f"run.log_with: {name} could not start, nothing was trained: {exc}") from None
        # The trackers that hold points until a checkpoint covers them (harness.remote_trackers).
        self.holding = [logger for logger in self.loggers if hasattr(logger, "checkpointed")]

    def _each(self, method: str, *args, loggers=None) -> None:
        for logger in self.loggers if loggers is None else loggers:
            getattr(logger, method)(*args)

    def checkpointed(self, step: int) -> None:
        """A checkpoint at ``step`` is saved: trackers that hold points until then send them."""
        self._each("checkpointed", step, loggers=self.holding)

    def finished(self) -> None:
        """The run is complete: everything logged may be sent."""
        self._each("finished", loggers=self.holding)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._each("scalars", step, values)

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        self._each("lr_series", first_step, group_names, lrs)

    def hparams(self, metrics: dict[str, float], step: int) -> None:
        """The run's metrics against its recipe (the flattened recipe given at the start)."""
        self._each("hparams", self.flat_config, metrics, step)

    def text(self, step: int, tag: str, markdown: str) -> None:
        self._each("text", step, tag, markdown)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")


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
