"""train.compile, train.activation_checkpointing, train.ema and train.profile, measured through
the harness itself.

Compile: the char-LM recipe on 1 process, 1 thread, eager vs ``train.compile: true`` vs
``train.compile: [_Block]`` (regional), each with a cold inductor cache of its own, with the
recipe's dropout and without dropout. Reported: steps/s over steps 20-79 (after compiling), and
the compile cost, the time to the end of step 3 beyond eager's.

Activation checkpointing: a GPT whose activations dominate its memory (6 blocks, dim 128, 256
tokens, batch 32: 1.2M parameters), 2 ranks under DDP and under FSDP2, with and without
``train.activation_checkpointing: [_Block]``: each rank's peak resident memory (VmHWM) and steps/s.

EMA and profiler: the char-LM recipe on 1 process, eager, with and without ``train.ema`` (steps/s
over steps 20-79) and ``train.profile`` (steps/s of its traced window, steps 8-12, and after it).

    .venv/bin/python scripts/bench.py --around-step 2
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BIN, CHAR_LM, CPU_2PROC, free_port, subprocess_env

# Run inside each launched process: harness.train with a clock at every step's start, then the
# step times, the time since the process started and the peak RSS written as JSON (one per rank).
WORKER = '''\
import json, os, sys, time
started = time.perf_counter()
import harness
from harness import faults
marks = []
faults.before_each_step(lambda trainer: marks.append(time.perf_counter()))
harness.train(sys.argv[1], sys.argv[3:])
marks.append(time.perf_counter())
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
rank = os.environ.get("RANK", "0")
with open(f"{sys.argv[2]}.rank{rank}.json", "w") as f:
    json.dump({"since_start": [m - started for m in marks], "peak_kb": peak_kb}, f)
'''

COMPILE_VARIANTS = {"eager": [], "compile": ["train.compile=true"], "regional": ["train.compile=[_Block]"]}
# The recipe's dropout 0.1, and none: inductor's random numbers on the CPU are what costs most.
DROPOUTS = {"": [], "_nodrop": ["model.dropout=0"]}
COMPILE_STEPS = ["train.max_steps=80", "train.epochs=1", "checkpoint.every_epochs=1000000",
                 "checkpoint.every_steps=1000000", "train.log_every_steps=1000"]
AC_MODEL = ["model.dim=128", "model.layers=6", "data.block_size=256", "data.batch_size=32", "train.max_steps=8",
            "train.epochs=1", "checkpoint.every_epochs=1000000", "checkpoint.every_steps=1000000",
            "train.log_every_steps=1000"]
AC_VARIANTS = {"plain": [], "checkpointed": ["train.activation_checkpointing=[_Block]"]}
AC_STRATEGIES = ("ddp", "fsdp")
# train.ema's cost, and train.profile's: a window of steps 8-12 traced (wait 5, warmup 2, active 5).
COST_VARIANTS = {"plain": [], "ema": ["train.ema.decay=0.999"],
                 "profiled": ["train.profile.wait=5", "train.profile.warmup=2", "train.profile.active=5"]}


def _launch(work: Path, logs: Path, name: str, overrides: list[str], nproc: int, env: dict) -> list[dict]:
    script = work / "around_step_worker.py"
    script.write_text(WORKER)
    out = work / name
    command = [sys.executable, str(script)] if nproc == 1 else [
        str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes", str(nproc),
        "--main_process_port", str(free_port()), str(script)]
    command += [str(CHAR_LM), str(out), f"run.output_dir={work / 'runs' / name}", *overrides]
    with open(logs / f"around-{name}.log", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=1800).returncode
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}; log {logs / f'around-{name}.log'}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def compile_round(work: Path, logs: Path, r: int) -> dict:
    record = {}
    order = list(COMPILE_VARIANTS) if r % 2 == 0 else list(reversed(COMPILE_VARIANTS))
    for suffix, dropout in DROPOUTS.items():
        for variant in order:
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # a cold compile every time
                (result,) = _launch(work, logs, f"{variant}{suffix}-{r}", COMPILE_VARIANTS[variant] + COMPILE_STEPS
                                    + dropout, 1, subprocess_env(TORCHINDUCTOR_CACHE_DIR=cache))
            # Step k starts at marks[k-1]; the last mark is the end of the run (its validation, its
            # test, its files), left out: steps 20-79 lie between marks[19] and marks[79].
            marks = result["since_start"]
            record[f"{variant}{suffix}_steps_per_s"] = 60 / (marks[79] - marks[19])
            record[f"{variant}{suffix}_to_step3_s"] = marks[3]
        for variant in ("compile", "regional"):
            record[f"{variant}{suffix}_compile_s"] = (record[f"{variant}{suffix}_to_step3_s"]
                                                      - record[f"eager{suffix}_to_step3_s"])
            record[f"{variant}{suffix}_ratio"] = (record[f"{variant}{suffix}_steps_per_s"]
                                                  / record[f"eager{suffix}_steps_per_s"])
    return record


def ac_round(work: Path, logs: Path, r: int) -> dict:
    record = {}
    order = list(AC_VARIANTS) if r % 2 == 0 else list(reversed(AC_VARIANTS))
    for strategy in AC_STRATEGIES:
        for variant in order:
            ranks = _launch(work, logs, f"ac-{strategy}-{variant}-{r}",
                            AC_MODEL + AC_VARIANTS[variant] + [f"train.strategy={strategy}"], 2, subprocess_env())
            record[f"{strategy}_{variant}_peak_gb"] = max(rank["peak_kb"] for rank in ranks) / 1e6
            marks = ranks[0]["since_start"]
            record[f"{strategy}_{variant}_steps_per_s"] = 5 / (marks[7] - marks[2])  # steps 3-7
        record[f"{strategy}_peak_ratio"] = (record[f"{strategy}_checkpointed_peak_gb"]
                                            / record[f"{strategy}_plain_peak_gb"])
        record[f"{strategy}_speed_ratio"] = (record[f"{strategy}_checkpointed_steps_per_s"]
                                             / record[f"{strategy}_plain_steps_per_s"])
    return record


def cost_round(work: Path, logs: Path, r: int) -> dict:
    """train.ema's and train.profile's cost per step: the char-LM, 1 process, eager, with and
    without each. The profiled run: its traced window (steps 8-12) and the steps after it (20-79)."""
    record = {}
    order = list(COST_VARIANTS) if r % 2 == 0 else list(reversed(COST_VARIANTS))
    for variant in order:
        (result,) = _launch(work, logs, f"cost-{variant}-{r}", COST_VARIANTS[variant] + COMPILE_STEPS, 1,
                            subprocess_env())
        marks = result["since_start"]
        record[f"{variant}_steps_per_s"] = 60 / (marks[79] - marks[19])
        record[f"{variant}_window_steps_per_s"] = 5 / (marks[12] - marks[7])  # steps 8-12
    for variant in ("ema", "profiled"):
        record[f"{variant}_ratio"] = record[f"{variant}_steps_per_s"] / record["plain_steps_per_s"]
    record["ema_ms_per_step"] = 1000 * (1 / record["ema_steps_per_s"] - 1 / record["plain_steps_per_s"])
    record["profiled_window_ratio"] = record["profiled_window_steps_per_s"] / record["plain_window_steps_per_s"]
    return record


def around_step(work: Path, logs: Path, rounds: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    measured = {"compile": compile_round, "activation_checkpointing": ac_round, "costs": cost_round}
    out = {"rounds": rounds, **{name: [] for name in measured}}
    for r in range(rounds):
        started = time.perf_counter()
        record = {}
        for name, measure in measured.items():
            out[name].append(measure(work, logs, r))
            record.update(out[name][-1])
        print(f"[bench] around-step round {r + 1}: {time.perf_counter() - started:.0f} s "
              f"{json.dumps(record, default=lambda v: round(v, 3))}", flush=True)
    return out


def _median(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows]
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def around_step_markdown(s: dict, command: str, when: str) -> str:
    c, a, e = s["compile"], s["activation_checkpointing"], s["costs"]
    lines = [f"### train.compile and train.activation_checkpointing ({when}, `{command}`, {s['rounds']} rounds, "
             "median (min-max))", "",
             "| measurement | eager / plain | whole model compiled / checkpointed | per block (`[_Block]`) |",
             "|---|---|---|---|",
             *[row for suffix, what in (("", "dropout 0.1 (the recipe)"), ("_nodrop", "dropout 0")) for row in (
                 f"| char-LM steps/s, 1 process, 1 thread, {what} | {_median(c, f'eager{suffix}_steps_per_s')} | "
                 f"{_median(c, f'compile{suffix}_steps_per_s')} | {_median(c, f'regional{suffix}_steps_per_s')} |",
                 f"| ratio to eager, {what} | 1 | {_median(c, f'compile{suffix}_ratio')} | "
                 f"{_median(c, f'regional{suffix}_ratio')} |",
                 f"| compile time (to step 3, beyond eager's), cold inductor cache, {what}, s | - | "
                 f"{_median(c, f'compile{suffix}_compile_s')} | {_median(c, f'regional{suffix}_compile_s')} |")],
             *[row for strategy, what in (("ddp", "2 DDP ranks"), ("fsdp", "2 FSDP2 ranks")) for row in (
                 f"| peak RSS per rank (VmHWM), {what}, 6-block GPT, GB | {_median(a, f'{strategy}_plain_peak_gb')} | "
                 f"{_median(a, f'{strategy}_checkpointed_peak_gb')} (ratio {_median(a, f'{strategy}_peak_ratio')}) "
                 "| - |",
                 f"| steps/s of that run | {_median(a, f'{strategy}_plain_steps_per_s')} | "
                 f"{_median(a, f'{strategy}_checkpointed_steps_per_s')} (ratio {_median(a, f'{strategy}_speed_ratio')})"
                 " | - |")],
             "", "| char-LM, 1 process, eager | without | with | ratio |", "|---|---|---|---|",
             f"| train.ema (decay 0.999, every step): steps/s | {_median(e, 'plain_steps_per_s')} | "
             f"{_median(e, 'ema_steps_per_s')} | {_median(e, 'ema_ratio')} ({_median(e, 'ema_ms_per_step')} ms a step) |",
             f"| train.profile (wait 5, warmup 2, active 5): steps/s of the traced steps 8-12 | "
             f"{_median(e, 'plain_window_steps_per_s')} | {_median(e, 'profiled_window_steps_per_s')} | "
             f"{_median(e, 'profiled_window_ratio')} |",
             f"| train.profile: steps/s of steps 20-79, after the window | {_median(e, 'plain_steps_per_s')} | "
             f"{_median(e, 'profiled_steps_per_s')} | {_median(e, 'profiled_ratio')} |", ""]
    return "\n".join(lines)
