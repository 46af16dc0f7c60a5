"""CheckpointStore in one process: what counts as committed, and what pruning keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.checkpoint import CheckpointError, CheckpointStore, verify


class OneProcess:
    """The two Accelerator members the store uses, for a single process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def save(store: CheckpointStore, step: int, metric: float | None) -> Path:
    def write_main(folder: Path, counter) -> None:
        path = folder / "trainer.json"
        path.write_text(json.dumps({"step": step}))
        counter.wrote(path)

    def write_rank(folder: Path, counter) -> None:
        path = folder / "rng-rank-0.json"
        path.write_text("{}")
        counter.wrote(path)

    return store.save(OneProcess(), step, write_main, write_rank, metric)


def test_keep_last_and_keep_best_by_a_minimised_metric(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=2, monitor_mode="min")
    for step, metric in [(10, 0.5), (20, 0.2), (30, 0.9), (40, 0.3), (50, 0.8), (60, 0.7)]:
        save(store, step, metric)
    kept = sorted(c.step for c in store.committed())
    assert kept == [20, 40, 50, 60]  # best two (0.2 at 20, 0.3 at 40) + newest two


def test_keep_best_with_a_maximised_metric(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1, monitor_mode="max")
    for step, metric in [(1, 0.90), (2, 0.97), (3, 0.93)]:
        save(store, step, metric)
    assert sorted(c.step for c in store.committed()) == [2, 3]


def test_a_folder_without_manifest_never_counts_and_temp_folders_are_ignored(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 5, None)
    (store.root / "step-000009").mkdir()  # a half-copied folder: no manifest
    (store.root / ".tmp-step-000010").mkdir()
    assert store.latest_complete().step == 5
    with pytest.raises(CheckpointError, match="MANIFEST.json: missing"):
        verify(store.root / "step-000009")


def test_saving_the_same_step_twice_keeps_the_first_commit(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    first = save(store, 7, 0.1)
    before = (first / "MANIFEST.json").read_text()
    assert save(store, 7, 0.2) == first
    assert (first / "MANIFEST.json").read_text() == before
