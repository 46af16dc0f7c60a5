#!/usr/bin/env python
"""Benchmarks: the harness against hand-written baselines, each figure a ratio measured in one run.

    .venv/bin/python scripts/bench.py                 # every figure, 5 rounds
    .venv/bin/python scripts/bench.py --quick         # every figure, 2 rounds, shorter runs
    .venv/bin/python scripts/bench.py --only mlp_ddp2 # one figure (or a comma-separated list)
    .venv/bin/python scripts/bench.py --soak 50       # 50 clean starts and exits of a 2-rank run
    .venv/bin/python scripts/bench.py --stops 5       # seconds from a signal / a launcher's death to the stop
    .venv/bin/python scripts/bench.py --around-step 2 # compile, activation checkpointing, EMA, profiler: 2 rounds
    .venv/bin/python scripts/bench.py --multi-node 3  # 2 nodes vs 1 node, elastic restart (root: ip netns)

Harness and baseline alternate within every round (the order flips or rotates from round to
round), so a noisy shared machine slows both; the table gives the median of the per-round
ratios and their min-max. Results go to bench-results/ (markdown and JSON; raw worker output,
logs and profiles beside them) and the markdown is printed. BENCHMARKS.md explains each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import BREAST_CANCER, NO_CHECKPOINTS, loadavg, rates, subprocess_env, write_json  # noqa: E402
from benchmarks.launch import baseline_command, harness_command, launch  # noqa: E402
from benchmarks.stops import stops, stops_markdown  # noqa: E402
from benchmarks.around_step import around_step, around_step_markdown  # noqa: E402
from benchmarks.multi_node import multi_node, multi_node_markdown  # noqa: E402

RESULTS = ROOT / "bench-results"
HUGE = 1_000_000_000


@dataclass
class Figure:
    name: str
    title: str
    group: str
    harness: str  # key of the harness value in a round record
    baseline: str  # key of the baseline value
    kind: str  # "rate": higher is better, ratio = harness / baseline; "time": ratio = harness / baseline, lower is better
    target: Optional[float]
    unit: str
    info: bool = False  # an ablation or extra measurement, not one of the eight figures
    note: str = ""
    rounds: list = field(default_factory=list)  # [(harness value, baseline value)]
    cpu_rounds: list = field(default_factory=list)  # the same from CPU time (in-process figures only)


def figures() -> list[Figure]:
    F = Figure
    return [
        F("mlp_1proc", "1. steps/s, breast-cancer MLP, 1 process, 1 thread", "mlp", "harness", "baseline",
          "rate", 0.95, "steps/s"),
        F("gcn_1proc", "2. steps/s, GCN recipe (gcn_plateau), 1 process", "gcn", "harness", "baseline",
          "rate", 0.99, "steps/s"),
        F("mlp_ddp2", "3. steps/s, breast-cancer MLP, 2 ranks gloo", "ddp", "harness", "baseline",
          "rate", 0.97, "steps/s"),
        F("ckpt_save", "4. checkpoint save, 100.8M-param MLP + Adam (1.21 GB)", "ckpt", "save_harness",
          "save_raw", "time", 1.2, "s"),
        F("ckpt_load_cold", "5a. resume load (restore + state paged in), cold cache", "ckpt",
          "load_cold_harness", "load_cold_raw", "time", 1.5, "s"),
        F("ckpt_load_warm", "5b. resume load (restore + state paged in), warm cache", "ckpt",
          "load_warm_harness", "load_warm_raw", "time", 1.2, "s"),
        F("launch_first_step", "6. launch to first optimizer step, 2 ranks", "launch", "harness", "baseline",
          "time", 1.1, "s"),
        F("tb_logging", "7. steps/s with TensorBoard logging (every 10 steps) vs none", "mlp", "harness",
          "harness_no_logging", "rate", 0.99, "steps/s"),
        F("overlap_save", "8. training stall while saving, checkpoint.async_save vs synchronous", "ckpt",
          "save_harness_async", "save_harness", "time", 0.15, "s"),
        F("char_lm_1proc", "13. steps/s, char-LM recipe (a small GPT, the model's own loss, tied head), 1 process, "
          "1 thread", "charlm", "harness", "baseline", "rate", 0.98, "steps/s"),
        F("char_lm_first_step", "14. start to first optimizer step, char-LM recipe, 1 process, vs a hand-written "
          "script's imports + data + model + one step", "lmstart", "harness", "baseline", "time", 1.3, "s"),
        # Ablations and extra measurements (each against the same baseline as its figure).
        F("mlp_1proc_no_logging", "1a. harness without TensorBoard logging (log interval 1e9, no writer)", "mlp",
          "harness_no_logging", "baseline", "rate", None, "steps/s", info=True),
        F("gcn_1proc_subgraph3", "2a. GCN harness with data.subgraph_hops=3 (a k-hop subgraph per batch; the "
          "recipe's setting before commit 928a1bb)", "gcn", "harness_subgraph3", "baseline", "rate", None,
          "steps/s", info=True),
        F("gcn_1proc_no_logging", "2b. GCN harness without logging (the recipe logs every step)", "gcn",
          "harness_no_logging", "baseline", "rate", None, "steps/s", info=True),
        F("mlp_ddp2_check_every_100", "3a. 2 ranks, preemption.check_every_steps=100 (default auto: about every 0.2 s)", "ddp",
          "harness_check_every_100", "baseline", "rate", None, "steps/s", info=True),
        F("mlp_ddp2_no_step_collectives", "3b. 2 ranks, no per-step collectives: preemption check and log "
          "interval raised to 1e9, no TensorBoard", "ddp", "harness_no_step_collectives", "baseline", "rate", None,
          "steps/s", info=True),
        F("ckpt_save_nohash", "4a. harness save with the manifest's checksum pass stubbed out", "ckpt",
          "save_harness_nohash", "save_raw", "time", None, "s", info=True),
        F("ckpt_load_cold_lazy", "5c. restore() alone, cold (optimizer state left mmapped, read at first step)",
          "ckpt", "load_cold_harness_lazy", "load_cold_raw", "time", None, "s", info=True),
        F("ckpt_resume_cold", "5d. resume as build_trainer does it: verify CRC-32C manifest + restore, cold",
          "ckpt", "load_cold_resume", "load_cold_raw", "time", None, "s", info=True),
        F("ckpt_resume_warm", "5e. verify CRC-32C manifest + restore, warm", "ckpt", "load_warm_resume",
          "load_warm_raw", "time", None, "s", info=True),
        # Issue #12: a user's own torch Dataset read by DataLoader workers; resuming mid-epoch.
        F("data_workers", "9. steps/s, own map-style Dataset (decode + augment, ~3 ms/item), 2 loader workers, "
          "1 process", "data", "harness", "baseline", "rate", 0.97, "steps/s",
          note="By CPU time here: the loader workers' CPU time per step (RUSAGE_CHILDREN), not the training thread's"),
        F("resume_mid_epoch", "10. launch to first optimizer step, resumed at sample 599,936 of a 1M-sample epoch, vs "
          "a fresh run", "data", "resume", "fresh", "time", 1.05, "s"),
        # Issue #13: FSDP2 vs DDP, ~100M-parameter MLP, CPU gloo ranks.
        F("fsdp_memory_2", "11a. per-rank params + grads + Adam state, 100.8M-param MLP, FSDP vs DDP, 2 ranks", "fsdp",
          "mem_fsdp_2", "mem_ddp_2", "time", 0.55, "GB"),
        F("fsdp_memory_4", "11b. the same, 4 ranks", "fsdp", "mem_fsdp_4", "mem_ddp_4", "time", 0.30, "GB"),
        F("fsdp_save", "12a. sharded checkpoint save (FSDP, 2 ranks, 1.21 GB) vs raw write of each rank's share",
          "fsdp", "save_harness", "save_raw", "time", 1.2, "s"),
        F("fsdp_load_cold", "12b. sharded resume load (restore + state paged in), cold cache, vs raw read of each "
          "rank's share", "fsdp", "load_cold_harness", "load_cold_raw", "time", 1.5, "s"),
        F("launch_exit", "6a. launch to exit of a 1-step run, 2 ranks (harness also saves, tests, writes files)",
          "launch", "harness_exit", "baseline_exit", "time", None, "s", info=True),
        F("data_workers_fast_seed", "9a. harness with torch.manual_seed made CPU-only (default_generator.manual_seed; "
          "the harness seeds every item with it)", "data", "harness_fast_seed", "baseline", "rate", None, "steps/s",
          info=True),
        F("stream_0w", "9b. items/s, own IterableDataset (cheap items, noise from the global RNG) read by the "
          "harness (loader workers seeded per batch) vs a hand-written StatefulDataLoader, no loader workers", "streams",
          "harness_0w", "baseline_0w", "rate", None, "items/s", info=True),
        F("stream_2w", "9c. the same, 2 loader workers", "streams", "harness_2w", "baseline_2w", "rate", None,
          "items/s", info=True),
        F("fsdp_rss_2", "11c. RSS per rank at the first optimizer step, FSDP vs DDP, 2 ranks", "fsdp", "rss_fsdp_2",
          "rss_ddp_2", "time", None, "GB", info=True),
        F("fsdp_rss_4", "11d. RSS per rank at the first optimizer step, FSDP vs DDP, 4 ranks", "fsdp", "rss_fsdp_4",
          "rss_ddp_4", "time", None, "GB", info=True),
        F("fsdp_peak_rss_2", "11e. peak RSS per rank over the run (VmHWM), FSDP vs DDP, 2 ranks", "fsdp",
          "peak_fsdp_2", "peak_ddp_2", "time", None, "GB", info=True),
        F("fsdp_steps_2", "11f. steps/s, 100.8M-param MLP, batch 32, FSDP vs DDP, 2 ranks", "fsdp", "steps_fsdp_2",
          "steps_ddp_2", "rate", None, "steps/s", info=True),
        F("fsdp_load_warm", "12c. sharded resume load, warm cache, vs raw read of each rank's share", "fsdp",
          "load_warm_harness", "load_warm_raw", "time", None, "s", info=True),
        F("fsdp_init_rank0", "11g. rank 1's peak memory while starting (VmHWM after build: model built, sharded, "
          "probed), train.fsdp_init rank0 vs every_rank, 100.8M-param MLP, 2 ranks", "fsdp", "startpeak_rank0_2",
          "startpeak_fsdp_2", "time", None, "GB", info=True),
    ]


# --------------------------------------------------------------------------------------------
# Groups: each runs its rounds and fills the figures of its group
# --------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.args = args
        self.rounds = args.rounds or (2 if args.quick else 5)
        self.quick = args.quick
        self.raw = RESULTS / "raw"
        self.logs = RESULTS / "logs"
        self.work = Path(tempfile.mkdtemp(prefix="harness-bench-"))
        self.extra: dict = {}
        self.not_applied: dict = {}  # variant -> tweaks that were no-ops on this tree
        self.teardown_failures: list = []  # launches that trained but did not exit cleanly

    def python(self, module_args: list[str], log_name: str, timeout_s: float = 3600) -> None:
        log = self.logs / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", *module_args]
        with open(log, "w") as handle:
            handle.write("$ " + shlex.join(cmd) + "\n")
            handle.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}; log {log}:\n{tail}")


def variants_for(selected: list[Figure], group: str, always: tuple[str, ...]) -> list[str]:
    names = list(always)
    for f in selected:
        if f.group == group:
            for key in (f.harness, f.baseline):
                if key not in names:
                    names.append(key)
    return names


def run_inproc(ctx: Context, suite: str, selected: list[Figure]) -> list[dict]:
    names = variants_for(selected, suite, ("harness", "baseline"))
    epochs = {"mlp": 60 if ctx.quick else 200, "gcn": 60 if ctx.quick else 200, "charlm": 3 if ctx.quick else 6}[suite]
    out = ctx.raw / f"{suite}.json"
    ctx.python(["benchmarks.inproc", suite, "--rounds", str(ctx.rounds), "--epochs", str(epochs),
                "--variants", ",".join(names), "--out", str(out), "--profile", str(RESULTS / f"profile_{suite}.txt")],
               f"{suite}")
    data = json.loads(out.read_text())
    ctx.extra[suite] = {"epochs": epochs, "threads": data["threads"],
                        "profile": f"bench-results/profile_{suite}.txt"}
    rounds = []
    for r in data["rounds"]:
        for k, v in r.items():
            if isinstance(v, dict) and set(v.get("tweaks_requested", [])) - set(v.get("tweaks_applied", [])):
                ctx.not_applied[k] = sorted(set(v["tweaks_requested"]) - set(v["tweaks_applied"]))
        record = {k: (v["median"] if isinstance(v, dict) else v) for k, v in r.items()}
        record.update({f"{k}@cpu": v["cpu_median"] for k, v in r.items() if isinstance(v, dict)})
        rounds.append(record)
    return rounds


def run_ckpt(ctx: Context, selected: list[Figure]) -> list[dict]:
    out = ctx.raw / "ckpt.json"
    wanted = set()
    for f in selected:
        if f.group != "ckpt":
            continue
        if f.name == "overlap_save":
            wanted |= {"save", "overlap"}
        elif f.harness.startswith("save"):
            wanted.add("save")
        else:
            wanted.add("load_cold" if "cold" in f.harness else "load_warm")
    ctx.python(["benchmarks.ckpt_io", "--rounds", str(ctx.rounds), "--figures", ",".join(sorted(wanted)),
                "--profile", str(RESULTS / "profile_ckpt.txt"), "--out", str(out)], "ckpt")
    data = json.loads(out.read_text())
    ctx.extra["ckpt"] = {k: data[k] for k in ("parameters", "state_bytes", "checkpoint_bytes", "checkpoint_files",
                                              "drop_caches", "hidden")}
    ctx.extra["ckpt"]["profile"] = "bench-results/profile_ckpt.txt"
    return data["rounds"]


def run_ddp(ctx: Context, selected: list[Figure]) -> list[dict]:
    epochs = 40 if ctx.quick else 100
    steps_per_epoch = 15
    base = [f"train.epochs={epochs}", f"train.val_every_epochs={epochs}", NO_CHECKPOINTS]
    check = ["preemption.check_every_steps=100"]
    quiet = [f"preemption.check_every_steps={HUGE}", f"train.log_every_steps={HUGE}"]
    known = {
        "harness": (base, {}),
        "harness_check_every_100": (base + check, {}),
        "harness_no_step_collectives": (base + quiet, {"BENCH_TWEAKS": "no_logging"}),
    }
    names = variants_for(selected, "ddp", ("harness", "baseline"))
    rounds = []
    for r in range(ctx.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        record = {"order": order, "loadavg": loadavg()}
        for name in order:
            log = ctx.logs / f"ddp-{name}-{r + 1}.log"
            env = None
            if name == "baseline":
                result = launch(baseline_command(["--epochs", str(epochs)]), 600, log)
            else:
                overrides, env = known[name]
                result = launch(harness_command(BREAST_CANCER, [f"run.output_dir={ctx.work / f'ddp-{name}-{r}'}",
                                                                *overrides]), 600, log, extra_env=env)
            check_launch(result, name, ctx)
            record[name] = rates(result["ranks"][0]["perf"], steps_per_epoch, 30)["median"]
            requested = [t for t in (env or {}).get("BENCH_TWEAKS", "").split(",") if t] if name != "baseline" else []
            missing = set(requested) - set(result["ranks"][0].get("tweaks_applied", []))
            if missing:
                ctx.not_applied[name] = sorted(missing)
        rounds.append(record)
        print(f"[bench] ddp round {r + 1}: " + " ".join(f"{n}={record[n]:.1f}/s" for n in names), flush=True)
    ctx.extra["ddp"] = {"epochs": epochs}
    write_json(ctx.raw / "ddp.json", rounds)
    return rounds


def run_launch(ctx: Context, selected: list[Figure]) -> list[dict]:
    rounds, phases = [], {"harness": [], "baseline": []}
    # One untimed launch of each first: the page cache then holds the libraries for both.
    launch(harness_command(BREAST_CANCER, [f"run.output_dir={ctx.work / 'launch-warmup'}", "train.max_steps=1"]),
           600, ctx.logs / "launch-warmup-harness.log")
    launch(baseline_command(["--max-steps", "1"]), 600, ctx.logs / "launch-warmup-baseline.log")
    for r in range(ctx.rounds):
        record = {"loadavg": loadavg()}
        for side in (["harness", "baseline"] if r % 2 == 0 else ["baseline", "harness"]):
            log = ctx.logs / f"launch-{side}-{r + 1}.log"
            if side == "harness":
                result = launch(harness_command(BREAST_CANCER, [f"run.output_dir={ctx.work / f'launch-{r}'}",
                                                                "train.max_steps=1"]), 600, log)
            else:
                result = launch(baseline_command(["--max-steps", "1"]), 600, log)
            check_launch(result, side, ctx)
            record[side] = result["first_step_s"]
            record[f"{side}_exit"] = result["wall_s"]
            rank0 = result["ranks"][0]["milestones"]
            phases[side].append({k: v - result["started"] for k, v in rank0.items()})
        rounds.append(record)
        print(f"[bench] launch round {r + 1}: harness={record['harness']:.2f}s baseline={record['baseline']:.2f}s",
              flush=True)
    ctx.extra["launch"] = {"phases_median_s": {
        side: {k: statistics.median(p[k] for p in ps if k in p) for k in sorted({k for p in ps for k in p})}
        for side, ps in phases.items()}}
    write_json(ctx.raw / "launch.json", {"rounds": rounds, "phases": phases})
    return rounds


def run_lm_start(ctx: Context, selected: list[Figure]) -> list[dict]:
    """Figure 14: `python -m benchmarks.probe train recipes/char_lm.yaml train.max_steps=1` (the
    harness CLI, one process) against benchmarks/char_lm_start.py, alternating, from the start of
    the process to the first optimizer step."""
    from benchmarks.common import CHAR_LM

    def harness_side(name: str) -> list[str]:
        return [sys.executable, "-m", "benchmarks.probe", "train", str(CHAR_LM), f"run.output_dir={ctx.work / name}",
                "train.max_steps=1"]

    baseline = [sys.executable, "-m", "benchmarks.char_lm_start"]
    launch(harness_side("lm-warmup"), 600, ctx.logs / "lmstart-warmup-harness.log", processes=1)
    launch(baseline, 600, ctx.logs / "lmstart-warmup-baseline.log", processes=1)
    rounds = []
    for r in range(ctx.rounds):
        record = {"loadavg": loadavg()}
        for side in (["harness", "baseline"] if r % 2 == 0 else ["baseline", "harness"]):
            command = harness_side(f"lm-{r}") if side == "harness" else baseline
            result = launch(command, 600, ctx.logs / f"lmstart-{side}-{r + 1}.log", processes=1)
            if result["rc"] != 0 or result["first_step_s"] is None:
                raise RuntimeError(f"{side} launch failed (rc {result['rc']}); log {result['log']}")
            record[side] = result["first_step_s"]
        rounds.append(record)
        print(f"[bench] lm start round {r + 1}: harness={record['harness']:.2f}s baseline={record['baseline']:.2f}s",
              flush=True)
    return rounds


def run_data(ctx: Context, selected: list[Figure]) -> list[dict]:
    """Figure 9 (in-process, benchmarks.data_loading) and figure 10 (launches), merged by round."""
    names = {f.name for f in selected}
    throughput, resumes = [], []
    if names & {"data_workers", "data_workers_fast_seed"}:
        variants = [v for v in variants_for(selected, "data", ()) if v not in ("resume", "fresh")]
        out = ctx.raw / "data.json"
        epochs = 3 if ctx.quick else 5
        ctx.python(["benchmarks.data_loading", "throughput", "--rounds", str(ctx.rounds), "--epochs", str(epochs),
                    "--variants", ",".join(variants), "--out", str(out)], "data")
        data = json.loads(out.read_text())
        throughput = [{**{k: v["median"] for k, v in r.items() if isinstance(v, dict)},
                       **{f"{k}@cpu": v["cpu_median"] for k, v in r.items() if isinstance(v, dict) and "cpu_median" in v}}
                      for r in data["rounds"]]
        ctx.extra["data"] = {k: data[k] for k in ("epochs", "steps_per_epoch", "items", "item_ms_main_process",
                                                  "workers", "batch_size")}
    if "resume_mid_epoch" in names:
        resumes = run_resume(ctx)
    count = max(len(throughput), len(resumes))
    return [{**(throughput[i] if i < len(throughput) else {}), **(resumes[i] if i < len(resumes) else {})}
            for i in range(count)]


def run_resume(ctx: Context) -> list[dict]:
    """Launch -> first optimizer step of ``python -m benchmarks.probe train rows_1m.yaml``: fresh, and
    resumed from a checkpoint at sample ~600k of the 1M-sample epoch (its folder copied anew each
    time, untimed). Each run's sample trace (HARNESS_TRACE_SAMPLES) proves where it started."""
    import shutil

    from benchmarks.data_loading import ROWS_RECIPE
    from harness.sampling import epoch_order

    prepared = ctx.work / "resume-prepared"
    info_path = ctx.raw / "resume-prepare.json"
    ctx.python(["benchmarks.data_loading", "prepare-resume", "--run-dir", str(prepared), "--out", str(info_path)],
               "resume-prepare")
    info = json.loads(info_path.read_text())
    order = epoch_order(info["samples"], 0, 0, True)

    def run(side: str, tag: str) -> float:
        out_dir, trace = ctx.work / f"resume-{tag}", ctx.work / f"trace-{tag}"
        shutil.rmtree(out_dir, ignore_errors=True)
        if side == "resume":
            shutil.copytree(prepared, out_dir)
        steps_before = info["step"] if side == "resume" else 0
        cmd = [sys.executable, "-m", "benchmarks.probe", "train", str(ROWS_RECIPE), f"run.output_dir={out_dir}",
               f"train.max_steps={steps_before + 1}"]
        log = ctx.logs / f"resume-{tag}.log"
        result = launch(cmd, 600, log, extra_env={"HARNESS_TRACE_SAMPLES": str(trace)})
        rank0 = result["ranks"].get(0, {})
        if result["rc"] != 0 or not rank0.get("first_step"):
            raise RuntimeError(f"{side}: rc {result['rc']}; log {log}:\n{log.read_text(errors='replace')[-3000:]}")
        first = json.loads(Path(f"{trace}.rank0").read_text().splitlines()[0])
        start = info["samples_in_epoch"] if side == "resume" else 0
        expected = order[start:start + info["batch_size"]].tolist()
        if first["step"] != steps_before + 1 or first["indices"] != expected:
            raise RuntimeError(f"{side}: the first step trained step {first['step']} on samples not at position "
                               f"{start} of the epoch's order (trace {trace}.rank0)")
        Path(f"{trace}.rank0").unlink()
        shutil.rmtree(out_dir, ignore_errors=True)
        return rank0["first_step"] - result["started"]

    run("fresh", "warmup-fresh")  # untimed: the page cache then holds the libraries for both
    run("resume", "warmup-resume")
    rounds = []
    for r in range(ctx.rounds):
        record = {}
        for side in (["resume", "fresh"] if r % 2 == 0 else ["fresh", "resume"]):
            record[side] = run(side, f"{side}-{r + 1}")
        rounds.append(record)
        print(f"[bench] resume round {r + 1}: resume={record['resume']:.2f}s fresh={record['fresh']:.2f}s", flush=True)
    ctx.extra["resume"] = info
    return rounds


def run_fsdp(ctx: Context, selected: list[Figure]) -> list[dict]:
    """benchmarks.sharded under ``accelerate launch``: FSDP (fsdp_cpu_2proc.yaml) and DDP
    (cpu_2proc.yaml) at 2 ranks (steps/s; FSDP also save/load) and 4 ranks (memory only). Memory is
    deterministic and a round takes minutes, so 1 round (quick) or 2 (full)."""
    from benchmarks.common import BIN, CPU_2PROC, RECIPES, free_port

    names = {f.name for f in selected}
    four = bool(names & {"fsdp_memory_4", "fsdp_rss_4"})
    io = bool(names & {"fsdp_save", "fsdp_load_cold", "fsdp_load_warm"})
    steps = 2
    launches = [("fsdp", 2), ("ddp", 2)] + ([("fsdp", 4), ("ddp", 4)] if four else []) + (
        [("rank0", 2)] if "fsdp_init_rank0" in names else [])
    # "rank0": FSDP with train.fsdp_init rank0 (the model built on rank 0 only), memory only.
    configs = {"fsdp": RECIPES / "accelerate" / "fsdp_cpu_2proc.yaml", "ddp": CPU_2PROC,
               "rank0": RECIPES / "accelerate" / "fsdp_cpu_2proc.yaml"}
    rounds = []
    for r in range(1 if ctx.quick else min(ctx.rounds, 2)):
        record = {}
        for strategy, world in launches[r % len(launches):] + launches[:r % len(launches)]:
            out = ctx.raw / f"fsdp-{strategy}-{world}-{r + 1}.json"
            args = ["--steps", str(steps if world == 2 and strategy != "rank0" else 0), "--out", str(out),
                    "--workdir", str(ctx.work)] + (["--init", "rank0"] if strategy == "rank0" else [])
            if strategy == "fsdp" and world == 2 and io:
                args += ["--io", "--rounds", "1"]
            cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(configs[strategy]), "--num_processes",
                   str(world), "--main_process_port", str(free_port()), "-m", "benchmarks.sharded", *args]
            log = ctx.logs / f"fsdp-{strategy}-{world}-{r + 1}.log"
            result = launch(cmd, 900, log, probe=False)
            if result["rc"] != 0 or not out.exists():
                raise RuntimeError(f"{strategy} x{world}: rc {result['rc']}, hung {result['hung']}; log {log}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            data = json.loads(out.read_text())
            if data["strategy"] != {"rank0": "fsdp"}.get(strategy, strategy) or data["world_size"] != world:
                raise RuntimeError(f"{log}: asked for {strategy} x{world}, ran {data['strategy']} x{data['world_size']}")
            memory = data["memory_max_over_ranks"]
            record.update({f"mem_{strategy}_{world}": memory["tensors"], f"rss_{strategy}_{world}": memory["rss_at_step"],
                           f"peak_{strategy}_{world}": data["peak_rss_max_over_ranks"],
                           f"startpeak_{strategy}_{world}": data["start_peak_by_rank"][-1],
                           f"detail_{strategy}_{world}": memory})
            if "steps_per_s" in data:
                record[f"steps_{strategy}_{world}"] = data["steps_per_s"]
            for io_round in data.get("io_rounds", []):
                record.update({k: v for k, v in io_round.items() if isinstance(v, float) and k != "loadavg"})
            if "checkpoint_bytes" in data:
                ctx.extra["fsdp"] = {k: data[k] for k in ("parameters", "hidden", "checkpoint_bytes",
                                                          "rank0_share_bytes", "drop_caches")}
        rounds.append(record)
        print(f"[bench] fsdp round {r + 1}: " + " ".join(f"{k}={v:.3g}" for k, v in record.items()
                                                         if isinstance(v, float)), flush=True)
    write_json(ctx.raw / "fsdp.json", rounds)
    return rounds


def check_launch(result: dict, name: str, ctx: Optional[Context] = None) -> None:
    """A launch counts if both ranks got to their steps; a failure after that (a teardown abort or
    hang, seen with gloo) is recorded, not fatal."""
    if result.get("first_step_s") is not None and 0 in result.get("ranks", {}):
        if (result["rc"] != 0 or result["hung"]) and ctx is not None:
            ctx.teardown_failures.append({"name": name, "rc": result["rc"], "hung": result["hung"],
                                          "log": str(Path(result["log"]).relative_to(ROOT))})
        return
    tail = Path(result["log"]).read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{name}: launch failed (rc {result['rc']}, hung {result['hung']}); log "
                       f"{result['log']}:\n{tail}")


def run_overhead(ctx: Context) -> None:
    out = ctx.raw / "overhead.json"
    ctx.python(["benchmarks.overhead", "--out", str(out)], "overhead")
    ctx.extra["overhead"] = json.loads(out.read_text())["rows"]


def run_streams(ctx: Context, selected: list[Figure]) -> list[dict]:
    """Figures 9b and 9c (benchmarks.streams, in-process)."""
    out = ctx.raw / "streams.json"
    ctx.python(["benchmarks.streams", "--rounds", str(ctx.rounds), "--items", "8000" if ctx.quick else "20000",
                "--out", str(out)], "streams")
    data = json.loads(out.read_text())
    ctx.extra["streams"] = {k: data[k] for k in ("items", "batch_size")}
    return [{k: v["median"] for k, v in r.items()} for r in data["rounds"]]


GROUPS: dict[str, Callable] = {
    "mlp": lambda ctx, sel: run_inproc(ctx, "mlp", sel),
    "gcn": lambda ctx, sel: run_inproc(ctx, "gcn", sel),
    "charlm": lambda ctx, sel: run_inproc(ctx, "charlm", sel),
    "lmstart": run_lm_start,
    "ddp": run_ddp,
    "ckpt": run_ckpt,
    "launch": run_launch,
    "data": run_data,
    "streams": run_streams,
    "fsdp": run_fsdp,
}


# --------------------------------------------------------------------------------------------
# Statistics and reports
# --------------------------------------------------------------------------------------------


def summarise(f: Figure) -> dict:
    pairs = [(h, b) for h, b in f.rounds if h is not None and b is not None]
    out = {"name": f.name, "title": f.title, "kind": f.kind, "unit": f.unit, "target": f.target, "info": f.info,
           "note": f.note, "rounds": [{"harness": h, "baseline": b} for h, b in pairs]}
    if not pairs:
        out["status"] = "not measured"
        return out
    ratios = [h / b for h, b in pairs]
    out.update(harness_median=statistics.median(h for h, _ in pairs),
               baseline_median=statistics.median(b for _, b in pairs),
               ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
               ratios=ratios)
    if f.kind == "rate":
        out["added_us_per_step"] = statistics.median(1e6 / h - 1e6 / b for h, b in pairs)
    cpu_pairs = [(h, b) for h, b in f.cpu_rounds if h is not None and b is not None]
    if cpu_pairs:
        cpu_ratios = [h / b for h, b in cpu_pairs]
        out.update(cpu_ratio_median=statistics.median(cpu_ratios), cpu_ratio_min=min(cpu_ratios),
                   cpu_ratio_max=max(cpu_ratios),
                   cpu_added_us_per_step=statistics.median(1e6 / h - 1e6 / b for h, b in cpu_pairs))
    if f.target is None:
        out["status"] = "info"
    else:
        def meets(ratio):
            return ratio >= f.target if f.kind == "rate" else ratio <= f.target

        out["status"] = "met" if meets(out["ratio_median"]) else "NOT met"
        if meets(out["ratio_min"]) != meets(out["ratio_max"]):
            out["status"] += ", noisy (spread crosses the target)"
        if "cpu_ratio_median" in out and meets(out["cpu_ratio_median"]) != meets(out["ratio_median"]):
            out["status"] += f"; by CPU time {'met' if meets(out['cpu_ratio_median']) else 'NOT met'}"
    return out


def fmt_value(value: float, unit: str) -> str:
    if unit == "steps/s":
        return f"{value:,.1f} steps/s" if value >= 10 else f"{value:.3f} steps/s"
    if unit == "GB":
        return f"{value / 1e9:.3f} GB"
    if unit == "items/s":
        return f"{value:,.0f} items/s"
    return f"{value:.3f} s" if value < 10 else f"{value:.2f} s"


def markdown(summary: dict) -> str:
    lines = [f"# Benchmark results ({summary['mode']}, {summary['rounds']} rounds)", "",
             f"- when: {summary['when']}",
             f"- command: `{summary['command']}`",
             f"- machine: {summary['machine']['nproc']} CPUs ({summary['machine']['cpu']}), "
             f"{summary['machine']['memory_gb']:.0f} GB RAM, torch {summary['machine']['torch']}, accelerate "
             f"{summary['machine']['accelerate']}, safetensors {summary['machine']['safetensors']}, Python "
             f"{summary['machine']['python']}; gloo on CPU",
             f"- load average at start / end: {summary['loadavg_start']} / {summary['loadavg_end']}",
             f"- harness measured: commit {summary['tree']['commit']}"
             + (f" plus uncommitted changes to {', '.join(summary['tree']['harness_uncommitted'])} (diff sha256 "
                f"{summary['tree']['harness_diff_sha256']})" if summary['tree']['harness_uncommitted'] else "")
             + (f"; WARNING: harness/ changed during the run (at the end: commit {summary['tree_end']['commit']}, "
                f"uncommitted {summary['tree_end']['harness_uncommitted']})" if summary["tree_changed_during_run"]
                else ""),
             "",
             "Ratio = harness / baseline per round (steps/s: higher is better; seconds: lower is better); "
             "median and min-max over the rounds. Per step: median added microseconds per optimizer step. "
             "By CPU time: the same ratio and added time per step from the training thread's CPU time "
             "instead of wall time (in-process figures only): a cross-check that other processes on the "
             "machine hardly disturb, though it leaves out time spent blocked and work on other threads.", ""]

    def table(rows: list[dict], with_target: bool) -> list[str]:
        head = "| Figure | Harness | Baseline | Ratio (median) | Spread (min-max) | Per step | By CPU time |"
        sep = "|---|---|---|---|---|---|---|"
        if with_target:
            head += " Target | Status |"
            sep += "---|---|"
        out = [head, sep]
        for row in rows:
            if "ratio_median" not in row:
                out.append(f"| {row['title']} | - | - | - | - | - | - |" + (" - | not measured |" if with_target else ""))
                continue
            per_step = f"{row['added_us_per_step']:+.0f} µs" if "added_us_per_step" in row else ""
            by_cpu = ""
            if "cpu_ratio_median" in row:
                by_cpu = (f"{row['cpu_ratio_median']:.3f}x ({row['cpu_ratio_min']:.3f}-{row['cpu_ratio_max']:.3f}), "
                          f"{row['cpu_added_us_per_step']:+.0f} µs")
            target = ""
            if row["target"] is not None:
                target = (">= " if row["kind"] == "rate" else "<= ") + f"{row['target']:.2f}x"
            line = (f"| {row['title']} | {fmt_value(row['harness_median'], row['unit'])} | "
                    f"{fmt_value(row['baseline_median'], row['unit'])} | {row['ratio_median']:.3f}x | "
                    f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f} | {per_step} | {by_cpu} |")
            if with_target:
                status = row["status"]
                line += f" {target or '-'} | {'**' + status + '**' if status.startswith('NOT') else status} |"
            out.append(line)
        return out

    main = [r for r in summary["figures"] if not r["info"]]
    info = [r for r in summary["figures"] if r["info"]]
    if main:
        lines += table(main, True) + [""]
    if info:
        lines += ["Ablations and extra measurements (same baseline as the figure they belong to):", ""]
        lines += table(info, False) + [""]
    notes = [r for r in summary["figures"] if r.get("note")]
    for r in notes:
        lines.append(f"- {r['title'].split('.')[0]}: {r['note']}")
    extra = summary.get("extra", {})
    if "launch" in extra:
        lines += ["", "Start-up milestones of rank 0, seconds after the launcher started (medians):", ""]
        for side, phases in extra["launch"]["phases_median_s"].items():
            lines.append(f"- {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items(),
                                                                                      key=lambda kv: kv[1])))
    if extra.get("teardown_failures"):
        lines += ["", "Launches that trained (their figures count) but did not exit cleanly:", ""]
        for f in extra["teardown_failures"]:
            lines.append(f"- {f['name']}: rc {f['rc']}, hung {f['hung']} ({f['log']})")
    if "overhead" in extra:
        lines += ["", "Per-step components of the harness loop, timed in isolation (best of 7 repeats, µs per call; "
                      "1 process, 1 thread, breast-cancer MLP):", "",
                  "| Component | Runs | Harness | Hand-written | Added |", "|---|---|---|---|---|"]
        for r in extra["overhead"]:
            if "error" in r:
                lines.append(f"| {r['name']} | {r['per']} | error: {r['error']} | | |")
                continue
            base = f"{r['baseline_us']:.1f}" if r["baseline_us"] else "-"
            lines.append(f"| {r['name']} | {r['per']} | {r['harness_us']:.1f} | {base} | {r['added_us']:+.1f} |")
    if "ckpt" in extra:
        c = extra["ckpt"]
        lines += ["", f"Checkpoint model: MLP hidden {c['hidden'][0]}x{len(c['hidden'])}, {c['parameters']:,} "
                      f"parameters; {c['checkpoint_bytes']:,} bytes on disk in {len(c['checkpoint_files'])} files; "
                      f"page cache dropped for cold loads: {c['drop_caches']}."]
    lines.append("")
    return "\n".join(lines)


def tree() -> dict:
    """Which harness was measured: the commit and any uncommitted changes under harness/."""
    def git(*args):
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "harness").splitlines() if line]
    diff = git("diff", "HEAD", "--", "harness")
    import hashlib

    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "harness_uncommitted": changed,
            "harness_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}


def machine() -> dict:
    import accelerate
    import safetensors
    import torch

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = int(line.split()[1]) / 1e6
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gb": memory, "torch": torch.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "kernel": platform.release()}


# --------------------------------------------------------------------------------------------
# Soak
# --------------------------------------------------------------------------------------------


def soak(ctx: Context, runs: int, timeout_s: float) -> dict:
    results = []
    for i in range(runs):
        log = ctx.logs / f"soak-{i + 1:03d}.log"
        cmd = harness_command(BREAST_CANCER, [f"run.output_dir={ctx.work / f'soak-{i}'}", "train.epochs=1"],
                              module="harness")
        result = launch(cmd, timeout_s, log, probe=False)
        ok = result["rc"] == 0 and not result["hung"] and not result["leftover_pids"]
        results.append({k: result[k] for k in ("rc", "hung", "wall_s", "leftover_pids", "teardown_warning")} |
                       {"run": i + 1, "ok": ok, "log": str(log.relative_to(ROOT))})
        if ok and not result["teardown_warning"]:
            log.unlink()  # keep the logs of the runs worth reading
        print(f"[soak] run {i + 1}/{runs}: rc={result['rc']} {result['wall_s']:.1f}s"
              + (" HUNG (killed)" if result["hung"] else "")
              + (f" leftover {result['leftover_pids']}" if result["leftover_pids"] else "")
              + (" teardown-timeout" if result["teardown_warning"] else ""), flush=True)
    walls = [r["wall_s"] for r in results]
    return {"runs": runs, "timeout_s": timeout_s, "ok": sum(r["ok"] for r in results),
            "hung": sum(r["hung"] for r in results),
            "nonzero_rc": sum(r["rc"] != 0 and not r["hung"] for r in results),
            "leftovers": sum(bool(r["leftover_pids"]) for r in results),
            "teardown_warnings": sum(r["teardown_warning"] for r in results),
            "wall_median_s": statistics.median(walls), "wall_max_s": max(walls), "wall_min_s": min(walls),
            "results": results}


def soak_markdown(s: dict, command: str, when: str) -> str:
    bad = [r for r in s["results"] if not r["ok"] or r["teardown_warning"]]
    lines = [f"# Soak: {s['runs']} starts and exits of a 2-rank run", "", f"- when: {when}", f"- command: `{command}`",
             f"- harness: commit {s['tree']['commit']}"
             + (f" plus uncommitted changes to {', '.join(s['tree']['harness_uncommitted'])}"
                if s["tree"]["harness_uncommitted"] else ""),
             "- each run: `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m harness train "
             "recipes/breast_cancer_mlp.yaml train.epochs=1` (15 steps, validation, a checkpoint, test, exit), "
             f"timeout {s['timeout_s']:.0f} s, in its own process group", "",
             "| Runs | Clean exits | Hung (killed at timeout) | Non-zero exit | Ranks left behind | "
             "Teardown timeouts hit | Wall median (min-max) |", "|---|---|---|---|---|---|---|",
             f"| {s['runs']} | {s['ok']} | {s['hung']} | {s['nonzero_rc']} | {s['leftovers']} | "
             f"{s['teardown_warnings']} | {s['wall_median_s']:.1f} s ({s['wall_min_s']:.1f}-{s['wall_max_s']:.1f}) |", ""]
    for r in bad:
        lines.append(f"- run {r['run']}: rc={r['rc']} hung={r['hung']} leftovers={r['leftover_pids']} "
                     f"teardown_warning={r['teardown_warning']} log {r['log']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds and shorter runs")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    parser.add_argument("--only", default=None, help="figure names or groups (mlp, gcn, ddp, ckpt, launch, "
                                                     "data, streams, fsdp, overhead), comma-separated; see --list")
    parser.add_argument("--soak", type=int, default=None, metavar="N", help="start and exit a 2-rank run N times")
    parser.add_argument("--soak-timeout", type=float, default=180.0, help="seconds per soak run")
    parser.add_argument("--stops", type=int, default=None, metavar="N",
                        help="stop a run N times each way (SIGTERM on 1 and 2 ranks, launcher SIGKILLed)")
    parser.add_argument("--around-step", type=int, default=None, metavar="N",
                        help="N rounds of train.compile (steps/s, compile time), activation checkpointing (peak memory), "
                             "train.ema and train.profile (steps/s)")
    parser.add_argument("--multi-node", type=int, default=None, metavar="N",
                        help="N rounds on two network-namespace hosts: 2 nodes vs 1 node steps/s, elastic restart time")
    parser.add_argument("--list", action="store_true", help="list figure names and exit")
    args = parser.parse_args()
    all_figures = figures()
    if args.list:
        for f in all_figures:
            print(f"{f.name:45s} [{f.group}] {f.title}")
        return 0
    command = shlex.join(["python", "scripts/bench.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ctx = Context(args)
    RESULTS.mkdir(exist_ok=True)
    try:
        return run(args, ctx, all_figures, parser, command, when)
    finally:
        import shutil

        shutil.rmtree(ctx.work, ignore_errors=True)


def run(args, ctx: Context, all_figures: list[Figure], parser, command: str, when: str) -> int:
    # The measurements apart from the figures: each writes <name>.json and <name>.md.
    separate = [("soak", args.soak, lambda: soak(ctx, args.soak, args.soak_timeout), soak_markdown),
                ("stops", args.stops, lambda: stops(ctx.work, ctx.logs, args.stops), stops_markdown),
                ("around_step", args.around_step, lambda: around_step(ctx.work / "around", ctx.logs, args.around_step),
                 around_step_markdown),
                ("multi_node", args.multi_node, lambda: multi_node(ctx.work / "multi_node", ctx.logs, args.multi_node),
                 multi_node_markdown)]
    for name, asked, measure, to_markdown in separate:
        if asked is None:
            continue
        s = measure()
        s.update(command=command, when=when, machine=machine(), tree=tree())
        write_json(RESULTS / f"{name}.json", s)
        text = to_markdown(s, command, when)
        (RESULTS / f"{name}.md").write_text(text)
        print(text)
        return 0 if name != "soak" or s["ok"] == s["runs"] else 1

    selected = all_figures
    if args.only:
        wanted = set(args.only.split(","))
        known = {f.name for f in all_figures} | set(GROUPS) | {"overhead"}
        if wanted - known:
            parser.error(f"unknown --only {sorted(wanted - known)}; see --list")
        selected = [f for f in all_figures if f.name in wanted or f.group in wanted]
    start_load = loadavg()
    start_tree = tree()
    failures = {}
    for group, runner in GROUPS.items():
        members = [f for f in selected if f.group == group]
        if not members:
            continue
        print(f"[bench] {group}: {', '.join(f.name for f in members)}", flush=True)
        try:
            rounds = runner(ctx, members)
        except Exception as exc:  # a failed group is reported, the others still run
            failures[group] = str(exc)
            print(f"[bench] {group} FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        for f in members:
            f.rounds = [(r.get(f.harness), r.get(f.baseline)) for r in rounds]
            if f.harness in ctx.not_applied:
                f.note = (f"tweak {', '.join(ctx.not_applied[f.harness])} was a no-op on this tree (the harness "
                          "already does that), so this row measures the harness as it is")
            f.cpu_rounds = [(r.get(f.harness + "@cpu"), r.get(f.baseline + "@cpu")) for r in rounds]
    if not args.only or "overhead" in args.only.split(","):
        print("[bench] overhead: per-step components", flush=True)
        try:
            run_overhead(ctx)
        except Exception as exc:
            failures["overhead"] = str(exc)
            print(f"[bench] overhead FAILED: {exc}", file=sys.stderr, flush=True)
    if ctx.teardown_failures:
        ctx.extra["teardown_failures"] = ctx.teardown_failures
    end_tree = tree()
    summary = {"mode": "quick" if args.quick else "full", "rounds": ctx.rounds, "command": command, "when": when,
               "machine": machine(), "tree": start_tree, "tree_changed_during_run": end_tree != start_tree,
               "tree_end": end_tree, "loadavg_start": start_load, "loadavg_end": loadavg(),
               "figures": [summarise(f) for f in selected], "extra": ctx.extra, "failures": failures}
    stem = "results" + ("-quick" if args.quick else "") + (f"-{args.only.replace(',', '+')}" if args.only else "")
    write_json(RESULTS / f"{stem}.json", summary)
    text = markdown(summary)
    if failures:
        text += "\nFailed groups:\n" + "\n".join(f"- {g}: {e.splitlines()[0]}" for g, e in failures.items()) + "\n"
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
