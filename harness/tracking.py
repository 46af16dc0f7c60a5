"""TensorBoard: rank 0 writes scalars into ``<run>/tb``; one reader for tests and plots.

A resumed run writes into the same folder with ``purge_step`` set to the resume step, so points
logged after the checkpoint by the interrupted process are dropped, not duplicated.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

TB_DIR = "tb"


class TensorBoardLog:
    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.writer = None
        self._worker = None
        if enabled:
            from concurrent.futures import ThreadPoolExecutor

            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge_step,
                                        flush_secs=10)
            # Events are built and queued on one background thread (in order): handing each one to
            # TensorBoard's writer queue from the training thread costs ~25 us of lock handoffs.
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-tb")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            self._worker.submit(self._write_scalars, step, dict(values))

    def _write_scalars(self, step: int, values: dict[str, float]) -> None:
        # Runs on the worker thread: an exception here would vanish with its future, so log it.
        try:
            self._write_scalars_now(step, values)
        except Exception:  # noqa: BLE001 - logging must never kill training, but must be seen
            logging.getLogger("harness").exception("TensorBoard: writing scalars at step %d failed", step)

    def _write_scalars_now(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        """The LR each group applied at optimizer steps first_step, first_step+1, ..."""
        if self.writer is not None:
            self._worker.submit(self._write_lr_series, first_step, list(group_names), lrs)

    def _write_lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        try:
            self._write_lr_series_now(first_step, group_names, lrs)
        except Exception:  # noqa: BLE001
            logging.getLogger("harness").exception("TensorBoard: writing LRs from step %d failed", first_step)

    def _write_lr_series_now(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        # One Summary per step holding every group, built directly (add_scalar converts each value).
        from tensorboard.compat.proto.summary_pb2 import Summary

        tags = [f"lr/{name}" for name in group_names]
        file_writer = self.writer._get_file_writer()
        for offset, row in enumerate(lrs):
            values = [Summary.Value(tag=tag, simple_value=lr) for tag, lr in zip(tags, row)]
            file_writer.add_summary(Summary(value=values), first_step + offset)

    def hparams(self, flat_config: dict, metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters, in this same event file (add_hparams would make a new folder)."""
        if self.writer is None:
            return
        self._drain()
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_config.items()}
        clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))}
        experiment, session_start, session_end = hparams(clean, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def _drain(self) -> None:
        """Wait until every submitted event is in TensorBoard's writer."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()

    def flush(self) -> None:
        if self.writer is not None:
            self._drain()
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self._worker.shutdown(wait=True)
            self.writer.close()
            self.writer = None


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
