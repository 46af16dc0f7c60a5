"""Hand-written DDP baseline for figures 3 and 6: ``torchrun --standalone --nproc_per_node 2 benchmarks/ddp_baseline.py``.

The breast-cancer MLP (30-64-32-1) as a user would write it without the harness: scikit-learn's
table, the same split and scaling, a per-epoch permutation, each rank a contiguous half of every
global batch, sum-BCE scaled by world/global batch (the global-batch mean after DDP's average),
Adam, StepLR per epoch, the epoch loss all-reduced and printed by rank 0. Timing and output files
are those of ``benchmarks.probe``: ``$BENCH_PROBE_DIR/rank-<r>.json``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import os  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", default="64,32")
    args = parser.parse_args()
    out_dir = os.environ.get("BENCH_PROBE_DIR")
    rank_env = os.environ.get("RANK", "0")

    from benchmarks.common import StepClock, write_json

    milestones = {"probe_started": STARTED}
    clock = StepClock().install()
    milestones["torch_imported"] = time.time()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    milestones["imports_done"] = time.time()

    bunch = load_breast_cancer()
    x_train, _, y_train, _ = train_test_split(bunch.data, 1 - bunch.target, test_size=0.2, random_state=2)
    x = torch.as_tensor(StandardScaler().fit(x_train).transform(x_train), dtype=torch.float32)
    y = torch.as_tensor(y_train, dtype=torch.float32).view(-1, 1)
    milestones["data_ready"] = time.time()

    dist.init_process_group("gloo")
    milestones["process_group_ready"] = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layers, width = [], x.size(1)
    for size in (int(h) for h in args.hidden.split(",")):
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    model = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    milestones["trainer_built"] = time.time()

    def first_step_written(optimizer, a, kw):
        if len(clock.perf) == 1 and out_dir:
            write_json(os.path.join(out_dir, f"first-step-rank-{rank_env}.json"), {"first_step": clock.wall[0]})

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(first_step_written)
    generator = torch.Generator()
    step, done = 0, False
    milestones["fit_started"] = time.time()
    for epoch in range(args.epochs):
        model.train()
        generator.manual_seed(epoch)
        order = torch.randperm(len(x), generator=generator)
        epoch_loss = torch.zeros(1)
        for start in range(0, len(x), args.batch_size):
            batch = order[start:start + args.batch_size]
            local = torch.tensor_split(batch, world)[rank]
            loss = F.binary_cross_entropy_with_logits(model(x[local]), y[local], reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss * (world / len(batch))).backward()
            optimizer.step()
            epoch_loss += loss.detach()
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                done = True
                break
        scheduler.step()
        dist.all_reduce(epoch_loss)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} step {step} train_loss={epoch_loss.item() / len(x):.4f} "
                  f"lr={scheduler.get_last_lr()[0]:.3g}", flush=True)
        if done:
            break
    milestones["fit_returned"] = time.time()

    def record(rc):
        if out_dir:
            write_json(os.path.join(out_dir, f"rank-{rank}.json"),
                       {"rank": rank, "rc": rc, "milestones": milestones, "perf": clock.perf,
                        "first_step": clock.wall[0] if clock.wall else None})

    record(None)  # kept even if the teardown below aborts (gloo has been seen to)
    dist.barrier()
    dist.destroy_process_group()
    milestones["finished"] = time.time()
    record(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
