"""CheckpointStore in one process: what counts as committed, and what pruning keeps."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from harness.checkpoint import TEMP_DIR, CheckpointError, CheckpointSaveError, CheckpointStore, verify
from tests.conftest import OneProcess


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


# --------------------------------------------------------------------------------------------
# Write failures: a clear error, the partial folder gone, earlier checkpoints untouched
# --------------------------------------------------------------------------------------------


def failing_writer(error: BaseException):
    def write(folder: Path, counter) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(b"partial")  # what a full disk leaves: part of a file
        raise error

    return write


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("error, reason, advice", [
    (OSError(28, "No space left on device"), r"\[Errno 28\] No space left on device \(ENOSPC\)", "Free space there"),
    (PermissionError(13, "Permission denied", "/x/model.safetensors"), r"\[Errno 13\] Permission denied \(EACCES\) "
     r"\(rank 0, writing model\.safetensors\)", "Let this user write in"),
    (OSError(30, "Read-only file system"), r"Read-only file system \(EROFS\)", "writable"),
])
def test_a_write_failure_removes_the_partial_save_and_names_what_survives(tmp_path, error, reason, advice):
    store = CheckpointStore(tmp_path, keep_last=5)
    first = save(store, 1, None)
    before = files_of(first)
    with pytest.raises(CheckpointSaveError) as caught:
        store.save(OneProcess(), 2, failing_writer(error), lambda folder, counter: None, None)
    message = str(caught.value)
    assert message.startswith(f"{store.root / 'step-000002'}: could not be saved: ")
    assert re.search(reason, message) and advice in message
    needed = sum(e["size"] for e in json.loads((first / "MANIFEST.json").read_text())["files"].values())
    assert f"It needs about {needed:,} bytes (the size of step-000001); " in message
    assert re.search(rf"; [\d,]+ bytes are free in {re.escape(str(store.root))}\.", message)
    assert f"the newest intact checkpoint is {first}." in message and "it resumes from step-000001." in message
    assert [p.name for p in store.root.iterdir()] == ["step-000001"], "the partial folder is removed"
    verify(first)
    assert files_of(first) == before


def test_a_failure_on_the_first_save_says_there_is_no_intact_checkpoint_and_the_planned_size(tmp_path):
    store = CheckpointStore(tmp_path)
    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(CheckpointSaveError, match=r"\[Errno 28\] No space left on device \(ENOSPC\) \(rank 0, "
                                                  r"at its first file\)\. It needs 4,096 bytes; .* there is no "
                                                  r"intact checkpoint \(none: a rerun starts over\)"):
        store.save(OneProcess(), 1, failing_writer(error), lambda folder, counter: None, None, size_bytes=4096)
    assert list(store.root.iterdir()) == []


def test_a_checkpoints_folder_that_cannot_be_created_is_a_save_failure(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointSaveError, match=r"step-000001: could not be saved: \[Errno 17\] File exists "
                                                  r"\(EEXIST\) \(rank 0, creating \.tmp-step-000001-"):
        save(store, 1, None)


def test_an_error_that_is_no_io_error_is_raised_as_it_is_after_the_cleanup(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ZeroDivisionError):
        store.save(OneProcess(), 1, failing_writer(ZeroDivisionError("a bug")), lambda folder, counter: None, None)
    assert list(store.root.iterdir()) == []


def test_a_failed_background_save_raises_a_save_error_and_leaves_no_temporary_folder(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    first = save(store, 1, None)
    store.save(OneProcess(), 2, failing_writer(OSError(122, "Disk quota exceeded")), lambda folder, counter: None,
               None, background=True)
    with pytest.raises(CheckpointSaveError, match=r"step-000002: the background save failed: \[Errno 122\] Disk "
                                                  r"quota exceeded \(EDQUOT\) .* Free space within your quota"):
        store.wait_for_background(OneProcess())
    assert [p.name for p in store.root.iterdir()] == [first.name]


def test_each_process_saves_into_its_own_temporary_folder(tmp_path):
    seen = []

    def write_rank(folder: Path, counter) -> None:
        seen.append(folder.name)

    for store in (CheckpointStore(tmp_path), CheckpointStore(tmp_path)):  # two processes' stores
        store.save(OneProcess(), 3, lambda folder, counter: None, write_rank, None)
        shutil.rmtree(store.root / "step-000003")
    assert len(set(seen)) == 2 and all(TEMP_DIR.match(name) for name in seen), seen
    assert all(re.fullmatch(r"\.tmp-step-000003-[0-9a-f]{8}", name) for name in seen)


class ThreadRanks:
    """Ranks as threads of this process: the Accelerator members the store uses (barrier, sum)."""

    def __init__(self, world: int):
        self.num_processes, self.barrier, self.slots = world, threading.Barrier(world, timeout=20), [None] * world

    def rank(self, index: int) -> "ThreadRank":
        return ThreadRank(self, index)

    def run(self, work) -> list:
        """``work(rank)`` on every rank at once; what each returned or raised."""
        results = [None] * self.num_processes

        def one(index: int) -> None:
            try:
                results[index] = work(self.rank(index))
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                results[index] = exc

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(self.num_processes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return results


class ThreadRank:
    device = "cpu"

    def __init__(self, group: ThreadRanks, index: int):
        self.group, self.process_index, self.num_processes = group, index, group.num_processes
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        self.group.barrier.wait()

    def reduce(self, tensor, reduction: str = "sum"):
        self.group.slots[self.process_index] = tensor.clone()
        self.group.barrier.wait()
        total = sum(self.group.slots)
        self.group.barrier.wait()
        return total


def two_rank_save(tmp_path: Path, step: int, failing_rank: int | None, background: bool):
    """Both ranks save ``step`` (each with its own store, as two processes would); ``failing_rank``
    cannot write its files. Returns what each rank's save (and wait for it) raised, or its folder."""
    ranks = ThreadRanks(2)

    def work(rank: ThreadRank):
        store = CheckpointStore(tmp_path, keep_last=5)

        def write_rank(folder: Path, counter) -> None:
            if rank.process_index == failing_rank:
                raise PermissionError(13, "Permission denied", str(folder / f"rng-rank-{rank.process_index}.json"))
            path = folder / f"rng-rank-{rank.process_index}.json"
            path.write_text("{}")
            counter.wrote(path)

        def write_main(folder: Path, counter) -> None:
            (folder / "trainer.json").write_text("{}")
            counter.wrote(folder / "trainer.json")

        folder = store.save(rank, step, write_main, write_rank, None, background=background)
        store.wait_for_background(rank)
        return folder

    return ranks.run(work)


@pytest.mark.parametrize("background", [False, True])
def test_a_failure_on_rank_1_fails_the_save_on_both_ranks_and_rank_0_says_what_survives(tmp_path, background):
    first = two_rank_save(tmp_path, 1, None, background)
    assert all(result == tmp_path / "checkpoints" / "step-000001" for result in first), first
    started = time.monotonic()
    rank0, rank1 = two_rank_save(tmp_path, 2, 1, background)
    # In the background, rank 0's thread stops waiting for rank 1's files when it sees rank 1's failure marker.
    assert time.monotonic() - started < 10
    what = "the background save failed" if background else "could not be saved"
    final = tmp_path / "checkpoints" / "step-000002"
    assert isinstance(rank0, CheckpointSaveError) and isinstance(rank1, CheckpointSaveError), (rank0, rank1)
    assert str(rank0).startswith(f"{final}: {what}: [Errno 13] Permission denied (EACCES) (rank 1). It needs about ")
    assert f"the newest intact checkpoint is {tmp_path / 'checkpoints' / 'step-000001'}" in str(rank0)
    assert str(rank1) == (f"{final}: {what} (rank 1: [Errno 13] Permission denied (EACCES), writing rng-rank-1.json); "
                          "rank 0's message says what survives")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    verify(tmp_path / "checkpoints" / "step-000001")


def test_the_size_estimate_of_a_save_is_close_to_what_it_writes(tmp_path):
    import torch

    from harness.checkpoint import estimated_bytes, save_tensors

    files = {"model.safetensors": {"layers.0.weight": torch.zeros(64, 30), "layers.0.bias": torch.zeros(64)},
             "trainer.json": json.dumps({"step": 5, "lrs": [0.001]})}
    save_tensors(files["model.safetensors"], tmp_path / "model.safetensors")
    (tmp_path / "trainer.json").write_text(files["trainer.json"])
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert written <= estimated_bytes(files) <= written + 256
