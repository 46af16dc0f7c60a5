"""One-process step rates (figures 1, 2, 7 and the per-step overhead breakdown), measured in-process.

    python -m benchmarks.inproc {mlp,gcn} --rounds 5 --variants a,b,... --out result.json

The harness side is the real entry point, ``harness.loop.train(cfg)``, as the CLI calls it (CLI
logging set up; stdout goes to a file, as under SLURM or CI). The baseline is a
hand-written loop on the same tensors. Both are timed by the same global optimizer-step hook, from
the end of the first epoch(s) to the last optimizer step: start-up, the last epoch's validation,
the final save and ``finish`` are outside the window. Variants alternate within each round, in an
order rotated every round so none always runs first.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import BREAST_CANCER, GCN, NO_CHECKPOINTS, StepClock, loadavg, write_json

CLOCK = StepClock()
HUGE = 1_000_000_000


# --------------------------------------------------------------------------------------------
# Harness side
# --------------------------------------------------------------------------------------------


class HarnessRun:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0

    def fit(self, recipe: Path, overrides: list[str], skip: int, tweak=None, profile: bool = False):
        """``harness.loop.train(cfg)`` as the CLI calls it; ``tweak(trainer)`` runs right after
        ``build_trainer`` (patched in for this call only) and the profiler, if any, wraps ``fit``."""
        import harness.loop as loop
        from harness.config import load_config

        self.count += 1
        out = self.workdir / f"run-{self.count}"
        cfg = load_config(recipe, [*overrides, f"run.output_dir={out}"])
        profiler = cProfile.Profile() if profile else None
        original_build, original_fit = loop.build_trainer, loop.fit

        def build_trainer(cfg):
            trainer = original_build(cfg)
            if tweak is not None:
                tweak(trainer)
            return trainer

        def fit(trainer):
            CLOCK.reset()
            if profiler is None:
                return original_fit(trainer)
            profiler.enable()
            try:
                return original_fit(trainer)
            finally:
                profiler.disable()

        loop.build_trainer, loop.fit = build_trainer, fit
        try:
            loop.train(cfg)
        finally:
            loop.build_trainer, loop.fit = original_build, original_fit
        shutil.rmtree(out, ignore_errors=True)
        rate = CLOCK.steps_per_s(skip)
        return (rate, profiler) if profile else rate


def no_logging(trainer) -> None:
    """No TensorBoard writer at all (the log interval is raised by an override as well)."""
    from harness.tracking import TensorBoardLog

    trainer.tb.close()
    trainer.tb = TensorBoardLog(trainer.run_dir, enabled=False)


def inner_optimizer(trainer) -> None:
    """Step and zero_grad the torch optimizer directly, not through accelerate's AcceleratedOptimizer
    (which calls importlib find_spec twice per step() and inspect.signature per zero_grad())."""
    trainer.optimizer = trainer.optimizer.optimizer


def plain_backward(trainer) -> None:
    """loss.backward() instead of Accelerator.backward (which divides by grad-accumulation steps, a
    no-op division that still adds an autograd node)."""
    trainer.accelerator.backward = lambda loss, **kwargs: loss.backward(**kwargs)


def chain(*tweaks):
    def run(trainer):
        for t in tweaks:
            t(trainer)
    return run


# --------------------------------------------------------------------------------------------
# Hand-written baselines
# --------------------------------------------------------------------------------------------


def baseline_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, skip: int) -> float:
    """The seed article's loop: index tensors by a per-epoch permutation, BCE, Adam, StepLR per epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.size(1), 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    generator = torch.Generator()
    CLOCK.reset()
    for epoch in range(epochs):
        model.train()
        generator.manual_seed(epoch)
        order = torch.randperm(len(x), generator=generator)
        total = None
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            detached = loss.detach()
            total = detached if total is None else total + detached
        scheduler.step()
        print(f"epoch {epoch + 1}/{epochs} train_loss={float(total) / len(range(0, len(x), batch_size)):.4f} "
              f"lr={scheduler.get_last_lr()[0]:.3g}")
    return CLOCK.steps_per_s(skip)


class BaselineGcn(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1, self.conv2, self.dropout = GCNConv(in_dim, hidden), GCNConv(hidden, out_dim), dropout

    def forward(self, x, edge_index):
        x = F.dropout(torch.relu(self.conv1(x, edge_index)), p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)


def baseline_gcn(graph, train_idx, val_idx, epochs: int, skip: int) -> float:
    """The seed's full-graph PyG loop: one step per epoch, validate, ReduceLROnPlateau on val loss."""
    torch.manual_seed(0)
    model = BaselineGcn(graph.x.size(1), 64, int(graph.y.max()) + 1, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=5)
    x, edge_index, y = graph.x, graph.edge_index, graph.y
    CLOCK.reset()
    for epoch in range(epochs):
        model.train()
        out = model(x, edge_index)
        loss = F.cross_entropy(out[train_idx], y[train_idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            out = model(x, edge_index)[val_idx]
            val_loss = F.cross_entropy(out, y[val_idx]).item()
            val_acc = (out.argmax(dim=1) == y[val_idx]).float().mean().item()
        scheduler.step(val_loss)
        print(f"epoch {epoch + 1}/{epochs} train_loss={loss.item():.4f} val_loss={val_loss:.4f} "
              f"val_accuracy={val_acc:.4f} lr={optimizer.param_groups[0]['lr']:.3g}")
    return CLOCK.steps_per_s(skip)


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def mlp_variants(epochs: int, workdir: Path):
    """name -> zero-argument callable returning steps/s."""
    from harness.config import load_config
    from harness.datasets import build_data

    cfg = load_config(BREAST_CANCER, [])
    task = build_data(cfg.data, cfg.run.seed)  # the harness's own tensors: same data on both sides
    x, y = task.train.features, task.train.targets
    skip = -(-len(x) // cfg.data.batch_size)  # one epoch of steps
    base = [f"train.epochs={epochs}", f"train.val_every_epochs={epochs}", NO_CHECKPOINTS]
    no_log = [*base, f"train.log_every_steps={HUGE}"]
    harness = HarnessRun(workdir)
    variants = {
        "harness": lambda: harness.fit(BREAST_CANCER, base, skip),
        "baseline": lambda: baseline_mlp(x, y, epochs, cfg.data.batch_size, skip),
        "harness_no_logging": lambda: harness.fit(BREAST_CANCER, no_log, skip, no_logging),
        "harness_inner_optimizer": lambda: harness.fit(BREAST_CANCER, base, skip, inner_optimizer),
        "harness_inner_optimizer_plain_backward": lambda: harness.fit(
            BREAST_CANCER, base, skip, chain(inner_optimizer, plain_backward)),
        "harness_inner_optimizer_plain_backward_no_logging": lambda: harness.fit(
            BREAST_CANCER, no_log, skip, chain(inner_optimizer, plain_backward, no_logging)),
    }
    profile = lambda: harness.fit(BREAST_CANCER, base, skip, profile=True)  # noqa: E731
    return variants, profile, skip


def gcn_variants(epochs: int, workdir: Path):
    from harness.config import load_config
    from harness.datasets import build_data

    cfg = load_config(GCN, [])
    task = build_data(cfg.data, cfg.run.seed)
    graph = task.train.graph
    skip = 5
    base = [f"train.epochs={epochs}", NO_CHECKPOINTS]
    harness = HarnessRun(workdir)
    variants = {
        "harness": lambda: harness.fit(GCN, base, skip),
        "baseline": lambda: baseline_gcn(graph, task.train.node_index, task.val.node_index, epochs, skip),
        # The recipe's k-hop subgraph per batch, switched off: every batch is the whole graph.
        "harness_full_graph": lambda: harness.fit(GCN, [*base, "data.subgraph_hops=null"], skip),
        "harness_inner_optimizer": lambda: harness.fit(GCN, base, skip, inner_optimizer),
    }
    profile = lambda: harness.fit(GCN, base, skip, profile=True)  # noqa: E731
    return variants, profile, skip


def profile_text(profiler: cProfile.Profile, limit: int = 35) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=["mlp", "gcn"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--variants", required=True, help="comma-separated variant names")
    parser.add_argument("--profile", help="write a cProfile of one harness fit here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    from harness.cli import _setup_logging

    _setup_logging()  # the epoch log lines go to stdout as in a CLI run (the bench sends it to a file)
    CLOCK.install()
    workdir = Path(tempfile.mkdtemp(prefix=f"harness-bench-{args.suite}-"))
    try:
        build = mlp_variants if args.suite == "mlp" else gcn_variants
        variants, profile, skip = build(args.epochs, workdir)
        names = args.variants.split(",")
        unknown = [n for n in names if n not in variants]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {sorted(variants)}")
        for name in names:  # warm-up, untimed: imports, allocator, first-call paths
            variants[name]()
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            record = {"order": order, "loadavg": loadavg()}
            for name in order:
                record[name] = variants[name]()
            rounds.append(record)
            print(f"[bench] round {r + 1}: " + " ".join(f"{n}={record[n]:.1f}/s" for n in names), flush=True)
        result = {"suite": args.suite, "unit": "steps/s", "epochs": args.epochs, "skipped_steps": skip,
                  "threads": torch.get_num_threads(), "rounds": rounds}
        if args.profile:
            _, profiler = profile()
            Path(args.profile).write_text(profile_text(profiler))
        write_json(args.out, result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
