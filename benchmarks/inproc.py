"""One-process step rates (figures 1, 2, 7 and the per-step overhead breakdown), measured in-process.

    python -m benchmarks.inproc {mlp,gcn} --rounds 5 --epochs N --variants a,b,... --out result.json

The harness side is the real entry point, ``harness.loop.train(cfg)``, as the CLI calls it (CLI
logging set up; stdout goes to a file, as under SLURM or CI). The baseline is a hand-written loop
on the same tensors (the data set is built by the harness's builder, untimed). Both are timed by
the same global optimizer-step hook from the end of the first epoch(s) to the last optimizer step:
start-up, the last epoch's validation, the final save and ``finish`` are outside the window.
Variants alternate within each round, in an order rotated every round so none always runs first.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import BREAST_CANCER, CHAR_LM, GCN, NO_CHECKPOINTS, StepClock, loadavg, write_json
from benchmarks.tweaks import apply_all, patched_train

CLOCK = StepClock()
HUGE = 1_000_000_000


class HarnessRun:
    """``harness.loop.train(cfg)`` on a recipe plus overrides, in a fresh run folder each time."""

    def __init__(self, workdir: Path, recipe: Path, skip: int, chunk: int):
        self.workdir, self.recipe, self.skip, self.chunk = workdir, recipe, skip, chunk
        self.count = 0

    def __call__(self, overrides: list[str], tweaks: tuple[str, ...] = (), profiler=None) -> dict:
        import harness.loop as loop
        from harness.config import load_config

        self.count += 1
        out = self.workdir / f"run-{self.count}"
        cfg = load_config(self.recipe, [*overrides, f"run.output_dir={out}"])

        def around_fit(fit, trainer):
            CLOCK.reset()
            if profiler is None:
                return fit(trainer)
            profiler.enable()
            try:
                return fit(trainer)
            finally:
                profiler.disable()

        tweak = apply_all(tweaks)
        with patched_train(tweak, around_fit):
            loop.train(cfg)
        shutil.rmtree(out, ignore_errors=True)
        result = CLOCK.rates(self.skip, self.chunk)
        result["tweaks_requested"], result["tweaks_applied"] = list(tweaks), tweak.applied
        return result


# --------------------------------------------------------------------------------------------
# Hand-written baselines
# --------------------------------------------------------------------------------------------


def baseline_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, skip: int, chunk: int) -> dict:
    """The seed article's loop: index tensors by a per-epoch permutation, BCE, Adam, StepLR per epoch,
    one log line per epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.size(1), 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    generator = torch.Generator()
    steps_per_epoch = math.ceil(len(x) / batch_size)
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
        print(f"epoch {epoch + 1}/{epochs} train_loss={float(total) / steps_per_epoch:.4f} "
              f"lr={scheduler.get_last_lr()[0]:.3g}")
    return CLOCK.rates(skip, chunk)


class BaselineGcn(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1, self.conv2, self.dropout = GCNConv(in_dim, hidden), GCNConv(hidden, out_dim), dropout

    def forward(self, x, edge_index):
        x = F.dropout(torch.relu(self.conv1(x, edge_index)), p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)


def baseline_gcn(graph, train_idx, val_idx, epochs: int, skip: int) -> dict:
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
    return CLOCK.rates(skip, 1)


def baseline_char_lm(x: torch.Tensor, y: torch.Tensor, cfg, epochs: int, skip: int, chunk: int) -> dict:
    """nanoGPT's loop on the recipe's model and tensors: the model's own loss, AdamW, linear warmup
    then cosine per step (LambdaLR), gradient clipping, a per-epoch permutation, one log line per
    epoch."""
    from harness.builtin.models import Gpt

    torch.manual_seed(0)
    m = cfg.model.options
    model = Gpt(x.size(1), 256, dim=m["dim"], layers=m["layers"], heads=m["heads"], dropout=m["dropout"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.options["weight_decay"])
    batch_size, warmup = cfg.data.batch_size, cfg.schedule.warmup_steps
    total = math.ceil(len(x) / batch_size) * epochs
    floor = cfg.schedule.options.eta_min / cfg.optim.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator()
    CLOCK.reset()
    for epoch in range(epochs):
        model.train()
        generator.manual_seed(epoch)
        order = torch.randperm(len(x), generator=generator)
        running = None
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            _, loss = model(x[idx], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            detached = loss.detach()
            running = detached if running is None else running + detached
        print(f"epoch {epoch + 1}/{epochs} train_loss={float(running) / math.ceil(len(x) / batch_size):.4f}")
    return CLOCK.rates(skip, chunk)


# --------------------------------------------------------------------------------------------
# Suites: name -> zero-argument callable returning the rates dict. scripts/bench.py runs the ones
# its figures name; the others (ablations of fixes that have since landed in harness/) stay
# available through --variants.
# --------------------------------------------------------------------------------------------


def mlp_suite(epochs: int, workdir: Path):
    from harness.config import load_config
    from harness.assemble import build_data

    cfg = load_config(BREAST_CANCER, [])
    task = build_data(cfg.data, cfg.run.seed)  # the harness's own tensors: the same data on both sides
    x, y = task.train.features, task.train.targets
    steps_per_epoch = math.ceil(len(x) / cfg.data.batch_size)
    skip = steps_per_epoch
    chunk = math.lcm(steps_per_epoch, cfg.train.log_every_steps)  # same work in every window
    # Validation only after the last epoch (outside the window): the baseline does not validate.
    base = [f"train.epochs={epochs}", f"train.val_every_epochs={epochs}", NO_CHECKPOINTS]
    no_log = [*base, f"train.log_every_steps={HUGE}"]
    run = HarnessRun(workdir, BREAST_CANCER, skip, chunk)
    variants = {
        "harness": lambda: run(base),
        "baseline": lambda: baseline_mlp(x, y, epochs, cfg.data.batch_size, skip, chunk),
        "harness_no_logging": lambda: run(no_log, ("no_logging",)),
        "harness_inner_optimizer": lambda: run(base, ("inner_optimizer",)),
        "harness_plain_backward": lambda: run(base, ("plain_backward",)),
        "harness_plain_backward_no_logging": lambda: run(no_log, ("plain_backward", "no_logging")),
    }
    return variants, lambda profiler: run(base, (), profiler)


def gcn_suite(epochs: int, workdir: Path):
    from harness.config import load_config
    from harness.assemble import build_data

    cfg = load_config(GCN, [])
    task = build_data(cfg.data, cfg.run.seed)
    graph = task.train.graph
    skip = 5
    base = [f"train.epochs={epochs}", NO_CHECKPOINTS]
    no_log = [*base, f"train.log_every_steps={HUGE}"]
    run = HarnessRun(workdir, GCN, skip, 1)
    variants = {
        "harness": lambda: run(base),
        "baseline": lambda: baseline_gcn(graph, task.train.node_index, task.val.node_index, epochs, skip),
        # The recipe's 3-hop subgraph per batch switched off: every batch is the whole graph.
        "harness_full_graph": lambda: run([*base, "data.subgraph_hops=null"]),
        # The 3-hop subgraph per batch (the recipe's setting until commit 928a1bb).
        "harness_subgraph3": lambda: run([*base, "data.subgraph_hops=3"]),
        "harness_inner_optimizer": lambda: run(base, ("inner_optimizer",)),
        "harness_no_logging": lambda: run(no_log, ("no_logging",)),
        "harness_full_graph_no_logging": lambda: run([*no_log, "data.subgraph_hops=null"], ("no_logging",)),
    }
    return variants, lambda profiler: run(base, (), profiler)


def charlm_suite(epochs: int, workdir: Path):
    from harness.config import load_config
    from harness.assemble import build_data

    cfg = load_config(CHAR_LM, [])
    task = build_data(cfg.data, cfg.run.seed)
    x, y = task.train.features, task.train.targets
    steps_per_epoch = math.ceil(len(x) / cfg.data.batch_size)
    skip = chunk = steps_per_epoch
    # A log interval that divides the epoch (88 steps: 4 windows of 22), so every timed window holds
    # the same logging work; the baseline logs once per epoch.
    log_every = next(n for n in range(cfg.train.log_every_steps, 0, -1) if steps_per_epoch % n == 0)
    base = [f"train.epochs={epochs}", f"train.val_every_epochs={epochs}", NO_CHECKPOINTS,
            f"train.log_every_steps={log_every}"]
    run = HarnessRun(workdir, CHAR_LM, skip, chunk)
    variants = {
        "harness": lambda: run(base),
        "baseline": lambda: baseline_char_lm(x, y, cfg, epochs, skip, chunk),
    }
    return variants, lambda profiler: run(base, (), profiler)


SUITES = {"mlp": mlp_suite, "gcn": gcn_suite, "charlm": charlm_suite}


def profile_text(profiler: cProfile.Profile, limit: int = 40) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--variants", required=True, help="comma-separated variant names")
    parser.add_argument("--profile", help="write a cProfile of one harness fit here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    from harness.commands import setup_logging as _setup_logging

    _setup_logging()  # epoch log lines go to stdout as in a CLI run (the bench sends it to a file)
    CLOCK.install()
    workdir = Path(tempfile.mkdtemp(prefix=f"harness-bench-{args.suite}-"))
    try:
        variants, profile = SUITES[args.suite](args.epochs, workdir)
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
            print(f"[bench] round {r + 1}: " + " ".join(f"{n}={record[n]['median']:.1f}/s" for n in names),
                  flush=True)
        result = {"suite": args.suite, "unit": "steps/s", "epochs": args.epochs,
                  "threads": torch.get_num_threads(), "rounds": rounds}
        if args.profile:
            profiler = cProfile.Profile()
            profile(profiler)
            Path(args.profile).write_text(profile_text(profiler))
        write_json(args.out, result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
