"""FSDP2 against DDP on CPU ranks (issue #13): memory per rank, steps/s, sharded save and load.

    accelerate launch --config_file recipes/accelerate/fsdp_cpu_2proc.yaml --num_processes 2 \\
        -m benchmarks.sharded --hidden 4096x7 --steps 3 --io --rounds 2 --out result.json
    (recipes/accelerate/cpu_2proc.yaml for DDP; the launch config selects the strategy)

Every rank builds the harness's own trainer (``harness.loop.build_trainer`` on the breast-cancer
recipe with ``model.hidden`` widened to ~100M parameters) and calls ``harness.loop.train_step``.

* memory (figures 11a/b): at the first optimizer step, from torch's global step post-hook (after
  ``optimizer.step()``, before ``zero_grad``: parameters, gradients and optimizer state all exist),
  the bytes of the distinct storages behind this rank's parameters (``to_local()`` of DTensors),
  their gradients and every optimizer state tensor. Also the process's RSS then, and its peak RSS
  (VmHWM) over the run. Rank 0 reports the largest value over the ranks.
* steps/s (11c, information): ``--steps`` steps after the first, between two barriers.
* save / load (12a-c, FSDP only): ``harness.snapshot.save_checkpoint`` (each rank writes its rows,
  rank 0 the shared files, CRC-32C manifest, atomic rename) vs each rank writing the same number
  of bytes (its share of the checkpoint folder: its ``*-rank-<r>.*`` files, and the shared files
  on rank 0) from its tensors' memory into one file, fsync of file and folder, then a barrier.
  Load: ``harness.resume.restore`` + every page of the optimizer state touched (as in
  benchmarks/ckpt_io.py) vs each rank ``readinto`` of its own share of the same folder into a new
  buffer. Cold: rank 0 drops the page cache before each timing; warm: the folder read once
  before. Each timing runs from one barrier to the next; the order is A B B A, best of two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.ckpt_io import drop_caches, folder_bytes, raw_write, warm
from benchmarks.common import BREAST_CANCER, loadavg, write_json


def local(value):
    return value.to_local() if type(value).__name__ == "DTensor" else value


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = local(t).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_memory(trainer) -> dict:
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {"params": storage_bytes(params), "grads": storage_bytes([p.grad for p in params if p.grad is not None]),
           "optimizer_state": storage_bytes(state), "rss_at_step": proc_status_kb("VmRSS") * 1024}
    out["tensors"] = out["params"] + out["grads"] + out["optimizer_state"]
    return out


def max_over_ranks(values: dict) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def timed(fn) -> float:
    dist.barrier()
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started


def materialise(trainer) -> None:
    """One byte written in every page of every optimizer state tensor (see benchmarks/ckpt_io.py)."""
    for entries in trainer.optimizer.state.values():
        for value in entries.values():
            if isinstance(value, torch.Tensor):
                value = local(value)
                if value.numel() * value.element_size() >= 4096:
                    value.reshape(-1).view(torch.uint8)[::4096].add_(0)


def rank_files(folder: Path, rank: int) -> list[Path]:
    """This rank's share of a checkpoint folder: its own files, and (rank 0) the shared ones."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    own = [p for p in files if f"-rank-{rank}." in p.name]
    shared = [p for p in files if "-rank-" not in p.name]
    return own + (shared if rank == 0 else [])


def raw_read(files: list[Path]) -> None:
    total = sum(p.stat().st_size for p in files)
    data = torch.empty(total, dtype=torch.uint8)
    buffer, offset = memoryview(data.numpy()), 0
    for p in files:
        with open(p, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer[offset:]):
                offset += n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", default="4096x7", help="WIDTHxLAYERS of the MLP's hidden layers")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (0: none)")
    parser.add_argument("--io", action="store_true", help="time sharded save and load too")
    parser.add_argument("--rounds", type=int, default=1, help="save/load timing rounds (A B B A each)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--init", default="every_rank", help="train.fsdp_init (every_rank or rank0)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from harness.config import load_config
    from harness.loop import build_trainer, train_step
    from harness.preemption import PreemptionWatcher
    from harness.resume import restore
    from harness.snapshot import save_checkpoint

    torch.set_num_threads(1)
    width, layers = (int(v) for v in args.hidden.split("x"))
    workdir = Path(args.workdir or tempfile.gettempdir()) / "harness-bench-sharded"
    cfg = load_config(BREAST_CANCER, [f"run.output_dir={workdir / 'run'}", f"model.hidden={[width] * layers}",
                                      "checkpoint.keep_last=1000", "train.epochs=1", f"train.fsdp_init={args.init}"])
    trainer = build_trainer(cfg)
    # Each rank's peak memory while starting (model built, sharded, probed): train.fsdp_init's figure.
    start_peak = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    start_peak[dist.get_rank()] = proc_status_kb("VmHWM") * 1024
    dist.all_reduce(start_peak)
    trainer.preemption = PreemptionWatcher(cfg.preemption)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    result = {"world_size": world, "strategy": trainer.strategy.name, "hidden": [width] * layers,
              "parameters": sum(p.numel() for p in trainer.raw_model.parameters()), "loadavg": loadavg(),
              "init": args.init, "start_peak_by_rank": start_peak.tolist()}

    memory = {}
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def at_first_step(optimizer, a, kw):
        if not memory:
            memory.update(measure_memory(trainer))

    handle = register_optimizer_step_post_hook(at_first_step)
    batch = cfg.data.batch_size
    indices = torch.arange(batch)
    train_step(trainer, indices)
    handle.remove()
    result["memory_max_over_ranks"] = max_over_ranks(memory)
    if args.steps:
        elapsed = timed(lambda: [train_step(trainer, indices) for _ in range(args.steps)])
        result["steps_per_s"] = args.steps / elapsed
    result["peak_rss_max_over_ranks"] = max_over_ranks({"vm_hwm": proc_status_kb("VmHWM") * 1024})["vm_hwm"]

    if args.io:
        store = trainer.store
        folder = save_checkpoint(trainer, store, "bench")  # warm-up, and the folder every load reads
        files = rank_files(folder, rank)
        share = sum(p.stat().st_size for p in files)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        tensors = [local(p.detach()) for p in params] + [
            local(v) for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        tensors = [t.reshape(-1) for t in tensors if t.numel()]  # rank 1 may hold no row of a 1-row weight
        raw_path = workdir / f"raw-rank-{rank}.bin"
        result.update(checkpoint_bytes=folder_bytes(folder), rank0_share_bytes=share if rank == 0 else None)
        can_drop = drop_caches() if rank == 0 else True

        def clear(path: Path) -> None:
            if rank == 0 and path.exists():
                junk = path.with_name(".junk")
                os.replace(path, junk)
                shutil.rmtree(junk)
            dist.barrier()

        def save(side: str) -> float:
            if side == "harness":
                clear(folder)
                os.sync()
                return timed(lambda: save_checkpoint(trainer, store, "bench"))
            elapsed = timed(lambda: raw_write(raw_path, tensors, share))
            raw_path.unlink()
            return elapsed

        def load(temperature: str, side: str) -> float:
            if temperature == "cold":
                if rank == 0:
                    drop_caches()
            else:
                warm(folder)
            if side == "harness":
                elapsed = timed(lambda: (restore(trainer, folder), materialise(trainer)))
            else:
                elapsed = timed(lambda: raw_read(files))
            materialise(trainer)
            return elapsed

        rounds = []
        for r in range(args.rounds):
            record = {"loadavg": loadavg()}
            for name, fn in (("save", save), ("load_cold", lambda s: load("cold", s)),
                             ("load_warm", lambda s: load("warm", s))):
                if name == "load_cold" and not can_drop:
                    continue
                order = ["harness", "raw"] if r % 2 == 0 else ["raw", "harness"]
                samples = {"harness": [], "raw": []}
                for side in order + order[::-1]:
                    samples[side].append(fn(side))
                    os.sync()
                for side, values in samples.items():
                    record[f"{name}_{side}"] = min(values)
                    record[f"{name}_{side}_samples"] = values
            rounds.append(record)
            if rank == 0:
                print(f"[bench] sharded io round {r + 1}: " + " ".join(
                    f"{k}={v:.3f}s" for k, v in record.items() if isinstance(v, float)), flush=True)
        result.update(io_rounds=rounds, drop_caches=bool(can_drop))
    trainer.trackers.close()
    if rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        write_json(args.out, result)
        print(f"[bench] sharded {result['strategy']} x{world}: " + ", ".join(
            f"{k}={v / 1e6:.0f} MB" for k, v in result["memory_max_over_ranks"].items())
            + (f", {result['steps_per_s']:.3f} steps/s" if "steps_per_s" in result else ""), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
