"""MLflow and Weights & Biases as trackers (``run.log_with: [mlflow, wandb]``), on the main rank.

Both services keep every point they are sent: a point cannot be taken back the way TensorBoard's
purge drops what a killed process logged after its last checkpoint. So these trackers hold the
points in memory and send them when a checkpoint is saved (the points up to its step) and when
the run finishes (the rest). A process killed after its last checkpoint has sent nothing past it;
the resumed run sends those steps once. The price: a point reaches the service at the next
checkpoint, not at once (save more often, ``checkpoint.every_steps``, to see it sooner).

A resumed run continues the same tracker run: its id is kept in ``<run>/trackers.json``.
MLflow: ``MLFLOW_TRACKING_URI`` (default: the run folder's own ``mlruns/``, MLflow's file store),
``MLFLOW_EXPERIMENT_NAME`` (default: ``run.name``). W&B: its own settings (``WANDB_MODE=offline``,
``WANDB_PROJECT``, default project ``run.name``), files under ``<run>/wandb``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Optional

TRACKERS_FILE = "trackers.json"


class TrackerStartError(Exception):
    """A tracker could not start (not installed, unreachable, refused): raised before training."""


class _UpToCheckpoint:
    """Points held until a checkpoint covers them (see the module docstring)."""

    def __init__(self, run_dir: Path, name: str, run_name: str, enabled: bool):
        self.run_dir, self.name, self.run_name, self.enabled = Path(run_dir), name, run_name, enabled
        self.pending: list[tuple[int, dict]] = []  # (step, {tag: value}) in the order logged
        self.params: dict = {}

    # The tracker interface (harness.tracking.Trackers)
    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            self.pending.append((step, dict(values)))

    def lr_series(self, first_step: int, group_names: list[str], lrs: list[list[float]]) -> None:
        if self.enabled:
            self.pending += [(step, {f"lr/{name}": lr for name, lr in zip(group_names, row)})
                             for step, row in enumerate(lrs, first_step)]

    def hparams(self, flat_config: dict, metrics: dict[str, float], step: int) -> None:
        self.scalars(step, metrics)

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self.enabled:
            self._note(tag, markdown)

    def flush(self) -> None:
        pass

    def checkpointed(self, step: int) -> None:
        if not self.enabled:
            return
        ready = [(s, values) for s, values in self.pending if s <= step]
        self.pending = [(s, values) for s, values in self.pending if s > step]
        if ready:
            self._send(ready)

    def finished(self) -> None:
        if self.enabled and self.pending:
            self._send(self.pending)
            self.pending = []
        self._finished = True

    def close(self) -> None:
        if self.enabled:
            self._end(getattr(self, "_finished", False))
            self.enabled = False

    # The run id kept in the run folder
    def saved_id(self) -> Optional[str]:
        path = self.run_dir / TRACKERS_FILE
        return json.loads(path.read_text()).get(self.name) if path.is_file() else None

    def save_id(self, run_id: str) -> None:
        path = self.run_dir / TRACKERS_FILE
        ids = json.loads(path.read_text()) if path.is_file() else {}
        ids[self.name] = run_id
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(ids, indent=2) + "\n")
        os.replace(tmp, path)

    def _send(self, points: list[tuple[int, dict]]) -> None:
        raise NotImplementedError

    def _note(self, tag: str, markdown: str) -> None:
        raise NotImplementedError

    def _end(self, finished: bool) -> None:
        raise NotImplementedError


def _params(flat_config: dict) -> dict[str, str]:
    """MLflow's params: strings."""
    return {key: str(value) for key, value in flat_config.items()}


def plain_params(flat_config: dict) -> dict:
    """The recipe as typed parameters (W&B's config, log.jsonl): numbers, strings, booleans and
    nulls as they are, anything else (a list) as its text."""
    return {key: value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
            for key, value in flat_config.items()}


class MlflowLog(_UpToCheckpoint):
    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int], run_name: str, flat_config: dict):
        super().__init__(run_dir, "mlflow", run_name, enabled)
        if not enabled:
            return
        try:
            from mlflow.entities import Param, RunStatus
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerStartError(f"mlflow is not installed ({exc}): pip install mlflow-skinny (or "
                                    "pip install 'harness[trackers]')") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the run folder's own file store
            uri = (self.run_dir / "mlruns").resolve().as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self.saved_id()
            if self.run_id is None:
                experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run_name
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                params = [Param(k, v[:6000]) for k, v in _params(flat_config).items()]
                for start in range(0, len(params), 100):  # MLflow takes 100 params a call
                    self.client.log_batch(self.run_id, params=params[start:start + 100])
                self.save_id(self.run_id)
            else:
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        except Exception as exc:  # noqa: BLE001 - any failure of the service or its store: named, before training
            raise TrackerStartError(f"MLflow at {uri}: {type(exc).__name__}: {exc}") from None

    def _send(self, points: list[tuple[int, dict]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for step, values in points for tag, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def _note(self, tag: str, markdown: str) -> None:
        self.client.set_tag(self.run_id, tag, markdown[:5000])

    def _end(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class WandbLog(_UpToCheckpoint):
    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int], run_name: str, flat_config: dict):
        super().__init__(run_dir, "wandb", run_name, enabled)
        if not enabled:
            return
        try:
            import wandb
        except ImportError as exc:
            raise TrackerStartError(f"wandb is not installed ({exc}): pip install wandb (or "
                                    "pip install 'harness[trackers]')") from None
        run_id = self.saved_id() or secrets.token_hex(4)  # W&B's ids: short, lowercase
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or run_name, name=run_name, id=run_id,
                                  resume="allow", dir=str(self.run_dir), config=plain_params(flat_config),
                                  allow_val_change=True,
                                  settings=wandb.Settings(silent=True, console="off"))
        except Exception as exc:  # noqa: BLE001 - login, network, settings: named, before training
            raise TrackerStartError(f"W&B: {type(exc).__name__}: {exc}") from None
        self.save_id(run_id)

    def _send(self, points: list[tuple[int, dict]]) -> None:
        for step, values in points:
            self.run.log(values, step=step)

    def _note(self, tag: str, markdown: str) -> None:
        self.run.summary[tag] = markdown

    def _end(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
