"""How fast a run stops (`scripts/bench.py --stops N`): the timings the README quotes.

- SIGTERM to one process, and to the launcher of 2 ranks: seconds from the signal to the
  committed checkpoint, as the run itself records them in PREEMPTED.json
  (``seconds_from_signal_to_saved``), and from the signal to the exit.
- The launcher of 2 ranks SIGKILLed: seconds until the last worker is gone (each notices, saves
  at its next step and exits).

Each run trains the breast-cancer recipe long enough to be stopped mid-run, in its own session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.common import BIN, BREAST_CANCER, CPU_2PROC, ROOT, free_port, subprocess_env
from harness.verify import proc_stats, process_tree

LONG = ["train.epochs=300", "checkpoint.every_steps=30", "train.log_every_steps=50"]


def _command(run_dir: Path, ranks: int) -> list[str]:
    args = ["-m", "harness", "train", str(BREAST_CANCER), f"run.output_dir={run_dir}", *LONG]
    if ranks == 1:
        return [str(BIN / "python"), *args]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes", str(ranks),
            "--main_process_port", str(free_port()), *args]


def _start(run_dir: Path, ranks: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(_command(run_dir, ranks), cwd=ROOT, env=subprocess_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step-*")):  # past start-up, inside the loop
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the run did not reach its first checkpoint; see {log}")
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def _sigterm(run_dir: Path, ranks: int, log: Path) -> dict:
    proc = _start(run_dir, ranks, log)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    exited = time.monotonic() - sent
    marker = json.loads((run_dir / "PREEMPTED.json").read_text())
    return {"signal_to_saved_s": marker["seconds_from_signal_to_saved"], "signal_to_exit_s": exited}


def _launcher_killed(run_dir: Path, log: Path) -> dict:
    proc = _start(run_dir, 2, log)
    # Its descendants (each rank in its own process group): the two workers.
    workers = [pid for pid in process_tree(proc.pid) if pid != proc.pid]
    if len(workers) < 2:
        raise RuntimeError(f"expected 2 workers under the launcher, found {workers}")
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while any(pid in workers and state != "Z" for pid, state, _, _ in proc_stats()):
        if time.monotonic() - killed > 120:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"workers still alive 120 s after their launcher died; see {log}")
        time.sleep(0.02)
    return {"launcher_killed_to_workers_gone_s": time.monotonic() - killed}


def stops(work: Path, logs: Path, runs: int) -> dict:
    cases = {"sigterm_1": [], "sigterm_2": [], "launcher_killed_2": []}
    for i in range(runs):
        for name, measure in (("sigterm_1", lambda d, log: _sigterm(d, 1, log)),
                              ("sigterm_2", lambda d, log: _sigterm(d, 2, log)),
                              ("launcher_killed_2", _launcher_killed)):
            result = measure(work / f"{name}-{i}", logs / f"stops-{name}-{i + 1:02d}.log")
            cases[name].append(result)
            print(f"[stops] {name} {i + 1}/{runs}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
                  flush=True)
    summary = {}
    for name, results in cases.items():
        for key in results[0]:
            values = [r[key] for r in results]
            summary[f"{name}.{key}"] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {"runs": runs, "summary": summary, "results": cases}


TITLES = {
    "sigterm_1.signal_to_saved_s": "SIGTERM to committed checkpoint, 1 process",
    "sigterm_1.signal_to_exit_s": "SIGTERM to exit (code 75), 1 process",
    "sigterm_2.signal_to_saved_s": "SIGTERM to the launcher to committed checkpoint, 2 ranks",
    "sigterm_2.signal_to_exit_s": "SIGTERM to the launcher to its exit, 2 ranks",
    "launcher_killed_2.launcher_killed_to_workers_gone_s": "launcher SIGKILLed to the last worker gone "
                                                           "(saved a checkpoint first), 2 ranks",
}


def stops_markdown(s: dict, command: str, when: str) -> str:
    lines = [f"# Stops: how fast a run stops, {s['runs']} runs of each", "", f"- when: {when}",
             f"- command: `{command}`", f"- harness: commit {s['tree']['commit']}"
             + (" (uncommitted changes)" if s["tree"]["harness_uncommitted"] else ""),
             f"- each run: `recipes/breast_cancer_mlp.yaml {' '.join(LONG)}`, stopped once its first checkpoint "
             "is committed", "", "| Measurement | Median | Min-max |", "|---|---|---|"]
    for key, title in TITLES.items():
        v = s["summary"][key]
        lines.append(f"| {title} | {v['median']:.2f} s | {v['min']:.2f}-{v['max']:.2f} s |")
    return "\n".join(lines) + "\n"
