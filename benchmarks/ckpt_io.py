"""Checkpoint save and resume load of a ~100M-parameter model (figures 4, 5, 8), in one process.

    python -m benchmarks.ckpt_io --rounds 5 --hidden 4096x7 --out result.json

The trainer is the harness's own (``harness.loop.build_trainer`` on the breast-cancer recipe with
``model.hidden`` widened), with Adam's state initialised by one ``harness.loop.train_step``.

* save (4): ``harness.snapshot.save_checkpoint`` (model, optimizer, scheduler, trainer state, RNG;
  every file fsynced; CRC-32C manifest; atomic rename; directory fsyncs) vs writing the same
  number of bytes straight from the tensors' memory into one file, then fsync of the file and its
  folder. ``checkpoint.keep_last`` is raised so pruning never deletes inside the timed window;
  folders are deleted, and the disk synced, between timings.

Timing order: within a round the sides run in a rotated order and back (A B C C B A) and each side
keeps the best of its two timings (all timings are in the JSON). The save block starts with an
untimed write of the same size: this VM's disk is several times slower on the first large write
after a pause (1.2 GB: ~3 s vs ~0.8 s back to back), which otherwise lands on whichever side
happens to go first.
* load (5): ``harness.resume.restore`` into the built model and optimizer, then every page of the
  optimizer state touched with a write (see ``materialise``: safetensors maps the file lazily, so
  without this the reading would be deferred into the first optimizer step), vs ``readinto`` of
  every file of the same checkpoint folder into one newly allocated buffer (a resumed process has
  no optimizer state memory yet, so both sides pay for fresh pages).
  Cold: page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before each timing; warm:
  the folder read once beforehand. Also timed, for information: ``restore`` alone (lazy), and the
  resume path ``build_trainer`` takes, which first verifies the manifest (CRC-32C of every file).
  And a save with the manifest's checksum pass stubbed out (into a separate store), to size what
  hashing costs a save.
* overlap (8): ``checkpoint.async_save``: the training thread's stall (``save_checkpoint`` returns
  once the snapshot is copied into the staging buffers) vs the synchronous save. The background
  write is waited for, untimed, after each timing (``async_write_after_stall`` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BREAST_CANCER, loadavg, write_json


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def state_tensors(trainer) -> list[torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    tensors = [t for t in model.state_dict().values()]
    for entries in trainer.optimizer.state_dict()["state"].values():
        tensors += [v for v in entries.values() if isinstance(v, torch.Tensor)]
    return tensors


def raw_write(path: Path, tensors: list[torch.Tensor], total: int) -> float:
    """``total`` bytes, the tensors' own memory first (no copy), padded to the checkpoint's size."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        for t in tensors:
            view = memoryview(t.detach().contiguous().numpy()).cast("B")
            while view:
                n = os.write(fd, view)
                view, written = view[n:], written + n
        if written < total:
            os.write(fd, b"\0" * (total - written))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return time.perf_counter() - started


def raw_read(folder: Path, total: int) -> torch.Tensor:
    """Every file of ``folder`` into one newly allocated buffer (as a resume must: the optimizer
    state does not exist before it), ``readinto`` straight from the file."""
    data = torch.empty(total, dtype=torch.uint8)
    buffer = memoryview(data.numpy())
    offset = 0
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        with open(p, "rb", buffering=0) as handle:
            while True:
                n = handle.readinto(buffer[offset:])
                if not n:
                    break
                offset += n
    return data


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as handle:
                while handle.read(1 << 24):
                    pass


@contextlib.contextmanager
def no_hashing():
    """The manifest's checksum pass stubbed out (an ablation: the folder it writes does not verify)."""
    import harness.checkpoint as ckpt

    original = ckpt.crc32c_of
    ckpt.crc32c_of = lambda path: "0" * 8
    try:
        yield
    finally:
        ckpt.crc32c_of = original


def materialise(trainer) -> None:
    """Write one byte in every page of every optimizer state tensor, as the first Adam step would.

    ``safetensors.torch.load_file`` returns tensors backed by a private mmap of the file, so after
    ``restore`` the optimizer state has not been read yet: the first step faults every page in
    (a disk read when cold) and copies it (copy-on-write). A load is only done when that is.
    """
    for entries in trainer.optimizer.state_dict()["state"].values():
        for value in entries.values():
            if isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= 4096:
                value.view(-1).view(torch.uint8)[::4096].add_(0)


def profile_text(profiler: cProfile.Profile, limit: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", default="4096x7", help="WIDTHxLAYERS of the MLP's hidden layers")
    parser.add_argument("--figures", default="save,load_cold,load_warm,overlap")
    parser.add_argument("--profile", help="write cProfiles of one save and one restore here")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    figures = set(args.figures.split(","))

    from harness.config import load_config
    from harness.loop import build_trainer, train_step
    from harness.preemption import PreemptionWatcher
    from harness.checkpoint import CheckpointStore
    from harness.resume import restore
    from harness.snapshot import save_checkpoint

    width, layers = (int(v) for v in args.hidden.split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="harness-bench-ckpt-", dir=args.workdir))
    result = {"rounds": [], "hidden": [width] * layers, "figures": sorted(figures)}
    try:
        cfg = load_config(BREAST_CANCER, [f"run.output_dir={workdir / 'run'}", f"model.hidden={[width] * layers}",
                                          "checkpoint.keep_last=1000", "train.epochs=1"])
        trainer = build_trainer(cfg)
        trainer.preemption = PreemptionWatcher(cfg.preemption)
        train_step(trainer, torch.arange(cfg.data.batch_size))  # Adam's state exists from here on
        store = trainer.store
        params = sum(p.numel() for p in trainer.model.parameters())
        tensors = state_tensors(trainer)
        result.update(parameters=params, state_bytes=sum(t.numel() * t.element_size() for t in tensors))
        print(f"[bench] model: {params / 1e6:.1f}M parameters, {result['state_bytes'] / 1e9:.2f} GB of "
              "model + optimizer tensors", flush=True)

        def harness_save() -> tuple[float, Path]:
            started = time.perf_counter()
            folder = save_checkpoint(trainer, store, "bench")
            return time.perf_counter() - started, folder

        # The checkpoint every load reads: also the first save's warm-up.
        _, folder = harness_save()
        total = folder_bytes(folder)
        result.update(checkpoint_bytes=total, checkpoint_files=sorted(p.name for p in folder.iterdir()))
        raw_path = workdir / "raw.bin"
        raw_write(raw_path, tensors, total)  # warm-up
        raw_path.unlink()
        can_drop = drop_caches()
        result["drop_caches"] = can_drop
        nohash_store = CheckpointStore(workdir / "nohash", keep_last=1000)

        def clear(path: Path) -> None:
            if path.exists():
                junk = path.with_name(".junk")
                os.replace(path, junk)
                shutil.rmtree(junk)

        def timed_save(side: str) -> float:
            if side == "harness":
                clear(folder)  # the same step is saved again, not skipped as already there
                os.sync()
                return harness_save()[0]
            if side == "harness_async":
                # The stall: save_checkpoint returns once the snapshot is taken. The background
                # write is then waited for, untimed, so it never overlaps another timing.
                clear(folder)
                os.sync()
                trainer.cfg.checkpoint.async_save = True
                try:
                    stall = harness_save()[0]
                    started = time.perf_counter()
                    store.wait_for_background(trainer.accelerator)
                    record_extra.setdefault("async_write_after_stall", []).append(time.perf_counter() - started)
                finally:
                    trainer.cfg.checkpoint.async_save = False
                return stall
            if side == "raw":
                elapsed = raw_write(raw_path, tensors, total)
                raw_path.unlink()
                return elapsed
            with no_hashing():
                started = time.perf_counter()
                junk = save_checkpoint(trainer, nohash_store, "bench")
                elapsed = time.perf_counter() - started
            shutil.rmtree(junk)
            return elapsed

        def timed_load(temperature: str, side: str) -> float:
            drop_caches() if temperature == "cold" else warm(folder)
            started = time.perf_counter()
            if side == "raw":
                raw_read(folder, total)
                materialise(trainer)  # already resident here: costs next to nothing
            else:
                target = store.latest_complete().path if side == "resume" else folder
                restore(trainer, target)
                if side != "harness_lazy":
                    materialise(trainer)
            elapsed = time.perf_counter() - started
            materialise(trainer)  # untimed: the next timing starts from resident state
            return elapsed

        def block(record: dict, prefix: str, sides: list[str], r: int, timed) -> None:
            """Sides in a rotated order and back (A B C C B A); each side's best of its two timings."""
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            samples: dict[str, list[float]] = {side: [] for side in sides}
            for side in order + order[::-1]:
                samples[side].append(timed(side))
                os.sync()
            for side, values in samples.items():
                record[f"{prefix}_{side}"] = min(values)
                record[f"{prefix}_{side}_samples"] = values

        for r in range(args.rounds):
            record = {"loadavg": loadavg()}
            if "save" in figures or "overlap" in figures:
                # Untimed: this VM's disk is far slower on the first big write after a pause.
                raw_write(raw_path, tensors, total)
                raw_path.unlink()
                os.sync()
                sides = ["harness", "raw", "harness_nohash"] + (["harness_async"] if "overlap" in figures else [])
                record_extra = {}
                block(record, "save", sides, r, timed_save)
                record.update(record_extra)
            for temperature in ("cold", "warm"):
                if f"load_{temperature}" in figures and (temperature == "warm" or can_drop):
                    block(record, f"load_{temperature}", ["harness", "raw", "harness_lazy", "resume"], r,
                          lambda side, t=temperature: timed_load(t, side))
            tensors = state_tensors(trainer)  # restore() replaced the optimizer's state tensors
            result["rounds"].append(record)
            print(f"[bench] round {r + 1}: " + " ".join(f"{k}={v:.3f}s" for k, v in record.items()
                                                       if isinstance(v, float)), flush=True)

        if args.profile:
            texts = []
            clear(folder)
            os.sync()
            profiler = cProfile.Profile()
            profiler.enable()
            save_checkpoint(trainer, store, "bench")
            profiler.disable()
            texts.append("=== harness.snapshot.save_checkpoint (one save) ===\n" + profile_text(profiler))
            drop_caches()
            profiler = cProfile.Profile()
            profiler.enable()
            restore(trainer, store.latest_complete().path)
            profiler.disable()
            texts.append("=== verify + harness.resume.restore, cold cache ===\n" + profile_text(profiler))
            Path(args.profile).write_text("\n".join(texts))
        trainer.trackers.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        subprocess.run(["sync"], check=False)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
