"""Your own torch Dataset read through DataLoader workers (issue #12), and resuming mid-epoch.

    python -m benchmarks.data_loading throughput --rounds 5 --epochs 5 --out result.json
    python -m benchmarks.data_loading prepare-resume --run-dir DIR --at 600000

* throughput (figure 9): ``benchmarks/recipes/decode_augment.yaml`` run by the harness's own entry
  point, ``harness.loop.train(cfg)``, in this process, against a hand-written loop over a torch
  ``DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2)`` on the same Dataset object,
  with the same MLP, loss and optimizer. Every item costs a few ms of CPU (``DecodeAugment``), so
  both sides are bound by their two loader workers. Both are timed by the same global
  optimizer-step hook; a window is a whole epoch (each window holds one start of the workers, as
  neither side keeps them between epochs), the first epoch is skipped.
* prepare-resume (figure 10): the run folder a resumed run starts from, a checkpoint at sample
  ``--at`` of the first epoch of ``benchmarks/recipes/rows_1m.yaml``. Reaching it by training
  (~4,700 steps) would take minutes, so the trainer is built, takes one real step (the optimizer
  state exists), and its counters are then set to that step and sample; the schedule is
  advanced as the loop would (``harness.schedules.advance``) and the harness saves. The resumed
  run cannot tell the difference: its recipe check, LR check and sample position all pass.
  scripts/bench.py then times launch -> first optimizer step of a fresh run and of a resumed one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import resource
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import ROOT, loadavg, write_json

DECODE_RECIPE = ROOT / "benchmarks" / "recipes" / "decode_augment.yaml"
ROWS_RECIPE = ROOT / "benchmarks" / "recipes" / "rows_1m.yaml"
SIDE, CROP, POOL, CLASSES = 192, 144, 8, 10


# --------------------------------------------------------------------------------------------
# The data sets (data factories named by the recipes)
# --------------------------------------------------------------------------------------------


class DecodeAugment(torch.utils.data.Dataset):
    """Images stored compressed (zlib, 3x192x192 uint8); an item is decoded, resized, blurred,
    randomly cropped and flipped, noised, normalised and pooled to 3x18x18 (972 features): ~3 ms of
    CPU on this machine. Randomness from torch's global generator, as typical user code does."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.blobs, self.labels = [], []
        for i in range(n):
            blocks = (rng.integers(0, 16, (3, SIDE // 4, SIDE // 4), dtype=np.uint8) * 16)
            self.blobs.append(zlib.compress(blocks.repeat(4, axis=1).repeat(4, axis=2).tobytes(), 6))
            self.labels.append(i % CLASSES)
        self.kernel = torch.full((3, 1, 3, 3), 1 / 9)

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int):
        raw = np.frombuffer(zlib.decompress(self.blobs[index]), dtype=np.uint8).reshape(3, SIDE, SIDE)
        x = torch.from_numpy(raw.copy()).float().div_(255)
        x = F.interpolate(x[None], size=(160, 160), mode="bilinear", align_corners=False)
        x = F.conv2d(x, self.kernel, padding=1, groups=3)[0]
        top, left = torch.randint(0, 160 - CROP + 1, (2,)).tolist()
        x = x[:, top:top + CROP, left:left + CROP]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = (x + 0.05 * torch.randn_like(x) - 0.5) / 0.25
        return F.avg_pool2d(x[None], POOL)[0].reshape(-1), self.labels[index]


@functools.lru_cache(maxsize=4)
def _decode_sets(train: int, val: int, seed: int):
    return DecodeAugment(train, seed), DecodeAugment(val, seed + 1)


def decode_augment(train: int = 768, val: int = 64, seed: int = 0) -> dict:
    """Data factory of decode_augment.yaml (cached: in-process runs share one Dataset object)."""
    train_set, val_set = _decode_sets(train, val, seed)
    return {"train": train_set, "val": val_set, "task": "multiclass", "num_classes": CLASSES}


class Rows(torch.utils.data.Dataset):
    """A TensorDataset-like table: row ``i`` of ``x`` and its target, nothing else per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def rows(n: int = 1_000_000, features: int = 16, val: int = 1_000, seed: int = 0) -> dict:
    """Data factory of rows_1m.yaml: ``n`` training rows, a linear rule's sign as the target."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n + val, features, generator=generator)
    y = (x @ torch.linspace(-1, 1, features) > 0).float()
    return {"train": Rows(x[:n], y[:n]), "val": Rows(x[n:], y[n:]), "task": "binary"}


# --------------------------------------------------------------------------------------------
# Figure 9: steps/s, harness vs a hand-written DataLoader loop
# --------------------------------------------------------------------------------------------


def baseline(dataset, epochs: int, batch_size: int, workers: int, skip: int, chunk: int, clock) -> dict:
    """A user's loop: DataLoader with shuffle and workers, the MLP, cross-entropy, Adam, a print per epoch."""
    torch.manual_seed(0)
    in_dim = dataset[0][0].numel()
    model = nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    clock.reset()
    for epoch in range(epochs):
        model.train()
        total, count = None, 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            detached = loss.detach()
            total = detached if total is None else total + detached
            count += 1
        print(f"epoch {epoch + 1}/{epochs} train_loss={float(total) / count:.4f}", flush=True)
    return clock.rates(skip, chunk)


def worker_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_only_manual_seed():
    """Ablation 9a: ``torch.manual_seed`` as a CPU-only run needs it, ``default_generator.manual_seed``.

    torch's own also queues the seed for CUDA, XPU and MTIA, each lazily, recording
    ``traceback.format_stack()`` per call: ~130 us at the top of a stack, ~400 us 30 frames deep
    (a DataLoader worker), against ~2 us for the CPU generator alone. ``_SeededItems`` calls it for
    every item. Patched process-wide before the workers fork; the baseline never calls it per item.
    """
    original = torch.manual_seed
    torch.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    try:
        yield
    finally:
        torch.manual_seed = original


def throughput(args) -> None:
    from benchmarks.common import NO_CHECKPOINTS
    from benchmarks.inproc import CLOCK, HarnessRun
    from harness.commands import setup_logging as _setup_logging
    from harness.config import load_config

    torch.set_num_threads(1)
    _setup_logging()
    CLOCK.install()
    cfg = load_config(DECODE_RECIPE, [])
    dataset = decode_augment()["train"]
    steps_per_epoch = math.ceil(len(dataset) / cfg.data.batch_size)
    skip, chunk = steps_per_epoch, steps_per_epoch  # whole epochs: one worker start-up per window
    workdir = Path(tempfile.mkdtemp(prefix="harness-bench-data-"))
    # Validation only after the last epoch (outside the window): the baseline does not validate.
    overrides = [f"train.epochs={args.epochs}", f"train.val_every_epochs={args.epochs}", NO_CHECKPOINTS]
    run = HarnessRun(workdir, DECODE_RECIPE, skip, chunk)
    variants = {
        "harness": lambda: run(overrides),
        "baseline": lambda: baseline(dataset, args.epochs, cfg.data.batch_size, cfg.data.num_workers, skip, chunk,
                                     CLOCK),
    }

    def fast_seed():
        with cpu_only_manual_seed():
            return run(overrides)

    variants["harness_fast_seed"] = fast_seed
    variants = {name: variants[name] for name in args.variants.split(",")}
    dataset[0]
    item_ms = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(32):
            dataset[i]
        item_ms.append((time.perf_counter() - t) / 32 * 1e3)
    try:
        for name in variants:  # warm-up, untimed
            variants[name]()
        rounds = []
        names = list(variants)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            record = {"order": order, "loadavg": loadavg()}
            for name in order:
                before = worker_cpu_s()
                record[name] = variants[name]()
                # Load-insensitive cross-check: CPU seconds the loader workers used per step. They
                # exit at each epoch's end (neither side keeps them), so RUSAGE_CHILDREN has them all.
                # The harness's also load the validation split once (64 items, ~2% more).
                record[name]["worker_cpu_s_per_step"] = (worker_cpu_s() - before) / len(CLOCK.perf)
                record[name]["cpu_median"] = 1.0 / record[name]["worker_cpu_s_per_step"]
            rounds.append(record)
            print(f"[bench] data round {r + 1}: " + " ".join(f"{n}={record[n]['median']:.2f}/s" for n in names),
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, {"rounds": rounds, "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                          "items": len(dataset), "item_ms_main_process": min(item_ms),
                          "workers": cfg.data.num_workers, "batch_size": cfg.data.batch_size})


# --------------------------------------------------------------------------------------------
# Figure 10: a run folder with a checkpoint in the middle of a 1M-sample epoch
# --------------------------------------------------------------------------------------------


def prepare_resume(args) -> None:
    from harness.config import load_config
    from harness.loop import build_trainer, train_step
    from harness.preemption import PreemptionWatcher
    from harness.snapshot import save_checkpoint
    from harness.schedules import advance

    cfg = load_config(ROWS_RECIPE, [f"run.output_dir={args.run_dir}"])
    trainer = build_trainer(cfg)
    trainer.preemption = PreemptionWatcher(cfg.preemption)
    batch = cfg.data.batch_size
    train_step(trainer, torch.arange(batch))  # a real step: the optimizer state exists
    steps = args.at // batch
    state = trainer.state
    state.step, state.samples_in_epoch, state.epoch_count = steps, steps * batch, steps * batch
    trainer.logs.pending_lrs.clear()
    advance(trainer.schedule, trainer.horizon, steps, 0, [])
    folder = save_checkpoint(trainer, trainer.store, "every_steps")
    trainer.trackers.close()
    write_json(args.out, {"folder": str(folder), "step": steps, "samples_in_epoch": steps * batch,
                          "batch_size": batch, "samples": len(trainer.task.train)})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--variants", default="harness,baseline,harness_fast_seed")
    p.add_argument("--out", required=True)
    p = sub.add_parser("prepare-resume")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--at", type=int, default=600_000)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    throughput(args) if args.command == "throughput" else prepare_resume(args)


if __name__ == "__main__":
    main()
