"""Per-step overhead components of the harness loop, each timed in isolation (µs per call).

    python -m benchmarks.overhead --out result.json

A trainer is built for the breast-cancer recipe (1 process, 1 thread) and the pieces of
``train_step`` / ``fit`` are timed with ``timeit`` (best of several repeats, so other processes on
the machine barely matter) next to what a hand-written loop does instead. Each entry says how
often it runs. Pieces the harness may rename later are skipped with the error recorded.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import BREAST_CANCER, write_json


def best_us(fn, number: int = 2000, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from harness import sampling
    from harness.config import load_config
    from harness.loop import build_trainer, flush_step_logs
    from harness.preemption import PreemptionWatcher

    workdir = Path(tempfile.mkdtemp(prefix="harness-bench-overhead-"))
    rows: list[dict] = []
    result_meta: dict = {}

    def row(name: str, per: str, harness_fn=None, baseline_fn=None, note: str = "", number: int = 2000):
        entry = {"name": name, "per": per, "note": note}
        try:
            entry["harness_us"] = best_us(harness_fn, number) if harness_fn else None
            entry["baseline_us"] = best_us(baseline_fn, number) if baseline_fn else 0.0
            entry["added_us"] = entry["harness_us"] - entry["baseline_us"]
        except Exception as exc:  # the harness moved on: record, keep going
            entry["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(entry)
        print(f"[overhead] {name}: {entry}", flush=True)

    try:
        cfg = load_config(BREAST_CANCER, [f"run.output_dir={workdir / 'run'}"])
        trainer = build_trainer(cfg)
        trainer.preemption = PreemptionWatcher(cfg.preemption)
        acc, model = trainer.accelerator, trainer.model
        split = trainer.task.train
        idx = torch.randperm(len(split))[:32]
        x, y = split.features[idx], split.targets[idx]
        wrapped = type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
        result_meta["optimizer_wrapped"] = wrapped

        twin = copy.deepcopy(acc.unwrap_model(model))  # for the AcceleratedOptimizer rows

        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils.imports import is_lomo_available

        row("accelerate is_lomo_available()", "2x per AcceleratedOptimizer.step", is_lomo_available, None,
            "uncached importlib.util.find_spec over sys.path (accelerate "
            f"{__import__('accelerate').__version__})")
        probe_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
        wrapper = AcceleratedOptimizer(probe_opt, device_placement=False)
        F.binary_cross_entropy_with_logits(twin(x), y).backward()  # gradients for the steps below
        row("AcceleratedOptimizer.step() vs torch Adam.step()"
            + (" (the harness wraps its optimizer)" if wrapped else " (the harness no longer wraps it)"),
            "per step", lambda: wrapper.step(), lambda: probe_opt.step(), number=500)
        row("AcceleratedOptimizer.zero_grad() vs torch", "per step", lambda: wrapper.zero_grad(set_to_none=True),
            lambda: probe_opt.zero_grad(set_to_none=True), "the wrapper calls inspect.signature every time")

        import harness.loop as loop
        backward = getattr(loop, "backward", None)  # newer harness: autograd directly unless fp16/DeepSpeed

        def harness_loss():
            batch = split.fetch(idx).to(acc.device)
            outputs = batch.predict(model).float()
            loss_sum = trainer.loss.summed(outputs, batch.targets)
            if backward is not None:
                backward(trainer, loss_sum, 1 / 32)
            else:
                acc.backward(loss_sum * (1 / 32))

        def plain_loss():
            F.binary_cross_entropy_with_logits(model(split.features[idx]), split.targets[idx]).backward()

        row("fetch + forward + loss + backward as train_step does them vs x[idx], mean BCE, loss.backward()",
            "per step", harness_loss, plain_loss, number=500)
        row("batch fetch: split.fetch(idx).to(device) vs x[idx], y[idx]", "per step",
            lambda: split.fetch(idx).to(acc.device), lambda: (split.features[idx], split.targets[idx]))
        row("sampling: micro_batches + shard", "per step",
            lambda: [sampling.shard(m, 0, 1) for m in sampling.micro_batches(idx, 1)])
        check = getattr(trainer.preemption, "poll", None) or trainer.preemption.should_stop
        row(f"preemption check: due() + {check.__name__}() (1 process: no collective)", "per step",
            lambda: trainer.preemption.due(5) and check(acc, 5))
        row("pending LR record: [g['lr'] for g in param_groups]", "per step",
            lambda: [g["lr"] for g in trainer.optimizer.param_groups])

        def flush_setup():
            trainer.logs.pending_lrs[:] = [(s, [1e-3]) for s in range(1, 11)]
            trainer.state.window_count, trainer.logs.window_samples = 320, 320
            trainer.logs.window_losses[:] = [torch.tensor(3.0)]

        def flush():
            flush_setup()
            flush_step_logs(trainer, close_window=True)

        row("flush_step_logs(close_window=True), TensorBoard on, 10 pending LRs", "every log_every_steps (10)",
            flush, flush_setup, "LR series of 10 steps + loss + samples/s", number=300)
        progress = getattr(trainer, "progress", None)
        if progress is None:
            from harness.progress import Progress

            progress = Progress(True, 1000, 0, 30.0)
        row("progress.update (no terminal: a time check)", "per step",
            lambda: progress.update(5, 0, 0.5, 1e-3, 100.0))
        trainer.trackers.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, {"rows": rows, **result_meta})


if __name__ == "__main__":
    main()
