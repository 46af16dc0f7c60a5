"""CheckpointStore in one process: what counts as committed, and what pruning keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.checkpoint import CheckpointError, CheckpointStore, verify


class OneProcess:
    """The two Accelerator members the store uses, for a single process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


def save(store: CheckpointStore, step: int, metric: float | None, background: bool = False) -> Path:
    def write_main(folder: Path, counter) -> None:
        path = folder / "trainer.json"
        path.write_text(json.dumps({"step": step}))
        counter.wrote(path)

    def write_rank(folder: Path, counter) -> None:
        path = folder / "rng-rank-0.json"
        path.write_text("{}")
        counter.wrote(path)

    return store.save(OneProcess(), step, write_main, write_rank, metric, background=background)


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


def test_the_manifest_holds_each_files_size_and_crc32c_and_any_changed_byte_is_caught(tmp_path):
    import crc32c

    store = CheckpointStore(tmp_path, keep_last=3)
    folder = save(store, 3, None)
    entries = json.loads((folder / "MANIFEST.json").read_text())["files"]
    data = (folder / "trainer.json").read_bytes()
    assert entries["trainer.json"] == {"size": len(data), "crc32c": f"{crc32c.crc32c(data):08x}"}
    assert entries["rng-rank-0.json"] == {"size": 2, "crc32c": f"{crc32c.crc32c(b'{}'):08x}"}
    for position in range(len(data)):  # every single-byte change, same size
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        (folder / "trainer.json").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=r"trainer\.json: CRC-32C does not match the manifest"):
            verify(folder)
    (folder / "trainer.json").write_bytes(data)
    verify(folder)


def test_a_manifest_with_sha256_entries_from_before_crc32c_still_verifies(tmp_path):
    import hashlib

    store = CheckpointStore(tmp_path, keep_last=3)
    folder = save(store, 4, None)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": entry["size"], "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    verify(folder)
    (folder / "trainer.json").write_text('{"step": 5}')  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"trainer\.json: sha256 does not match"):
        verify(folder)


def test_a_background_save_commits_on_its_thread_and_the_next_save_waits_for_it(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    first = save(store, 1, None, background=True)
    second = save(store, 2, None, background=True)  # waits for the first before starting
    store.wait_for_background(OneProcess())
    verify(second)
    assert not first.exists(), "pruned (keep_last=1) once the second was committed"
    assert [p.name for p in store.root.iterdir()] == ["step-000002"]


def test_a_failed_background_save_is_reported_on_the_training_thread_and_never_committed(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    save(store, 1, None)

    def write_main(folder: Path, counter) -> None:
        raise OSError(28, "No space left on device")

    store.save(OneProcess(), 2, write_main, lambda folder, counter: None, None, background=True)
    with pytest.raises(CheckpointError, match=r"step-000002: the background save failed: .*No space left"):
        store.wait_for_background(OneProcess())
    assert [c.step for c in store.committed()] == [1]
    store.wait_for_background(OneProcess())  # reported once; nothing is pending any more
