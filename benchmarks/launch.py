"""Launching 2-rank runs (figures 3 and 6, the soak): commands, a bounded wait, probe files.

Every launch runs in its own session (process group), so a hung run is ended by its group id,
and anything a launcher leaves behind after it exits is found (and reported) by that id too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks.common import BIN, CPU_2PROC, ROOT, free_port, subprocess_env

TEARDOWN_WARNING = "destroy_process_group did not return"


def harness_command(recipe: Path, overrides: list[str], module: str = "benchmarks.probe") -> list[str]:
    """``accelerate launch`` as the README and tests do it; ``module`` is ``harness`` for the real CLI
    or ``benchmarks.probe`` for the CLI with a step clock."""
    return [str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", module, "train", str(recipe), *overrides]


def baseline_command(args: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "benchmarks.ddp_baseline", *args]


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    from harness.verify import proc_stats

    return [pid for pid, state, _, group in proc_stats() if state != "Z" and group == pgid]


def end_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the launch's own process group, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_members(pgid):
            time.sleep(0.1)


def launch(cmd: list[str], timeout_s: float, log_path: Path, probe: bool = True,
           extra_env: Optional[dict] = None, processes: int = 2) -> dict:
    """Run one launch to completion (or ``timeout_s``); returns timings, exit code and probe data."""
    probe_dir = Path(tempfile.mkdtemp(prefix="harness-bench-probe-"))
    env = subprocess_env(**(extra_env or {}))
    if probe:
        env["BENCH_PROBE_DIR"] = str(probe_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        hung = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            hung = True
            end_group(proc.pid)
            rc = proc.wait()
        finished = time.time()
    # Ranks still alive once the launcher has exited are a teardown problem of their own.
    deadline = time.monotonic() + 5.0
    leftovers = group_members(proc.pid)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = group_members(proc.pid)
    if leftovers:
        end_group(proc.pid)
    result = {"cmd": cmd, "started": started, "wall_s": finished - started, "rc": rc, "hung": hung,
              "leftover_pids": leftovers, "log": str(log_path)}
    text = log_path.read_text(errors="replace")
    result["teardown_warning"] = TEARDOWN_WARNING in text
    if probe:
        ranks = {}
        for path in sorted(probe_dir.glob("rank-*.json")):
            data = json.loads(path.read_text())
            ranks[data["rank"]] = data
        firsts = [json.loads(p.read_text())["first_step"] for p in probe_dir.glob("first-step-rank-*.json")]
        result["ranks"] = ranks
        result["first_step_s"] = (max(firsts) - started) if len(firsts) == processes else None
        for path in probe_dir.iterdir():
            path.unlink()
    probe_dir.rmdir()
    return result
