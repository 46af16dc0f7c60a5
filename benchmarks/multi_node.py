"""Past one machine (`scripts/bench.py --multi-node N`): two hosts made of network namespaces
joined by a veth pair (tests/hosts.py), each running its own torchrun.

- The network path: steps/s of figure 3's run (the breast-cancer MLP, 2 ranks gloo) on 2 nodes x
  1 process against 1 node x 2 processes (loopback), alternating within each of N rounds.
- An elastic restart: the same recipe on 2 nodes under ``torchrun --nnodes 1:2 --max-restarts 3``
  (c10d rendezvous on the first host), the second node SIGKILLed with its worker 2 s after the
  first checkpoint. Measured: seconds from the SIGKILL to the survivor's first optimizer step
  after its agent restarted it as a world of 1, and the training it lost (steps it had done past
  the checkpoint it resumed from).

Needs root (``ip netns``); the run's steps come from benchmarks.probe's step clock.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import BIN, BREAST_CANCER, NO_CHECKPOINTS, ROOT, free_port, rates, subprocess_env
from tests.hosts import Hosts, elastic_rendezvous, kill_node, static_rendezvous

STEPS_PER_EPOCH = 15


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _probe(run_dir: Path, overrides: list[str]) -> list[str]:
    return ["-m", "benchmarks.probe", "train", str(BREAST_CANCER), f"run.output_dir={run_dir}", *overrides]


def _wait(processes: list[subprocess.Popen], timeout_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    for process, log in zip(processes, logs):
        try:
            rc = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                kill_node(p)
            raise RuntimeError(f"a node did not finish in {timeout_s:.0f} s; see {log}") from None
        if rc != 0:
            raise RuntimeError(f"a node exited with {rc}; see {log}")


def _steps_per_s(probe_dir: Path) -> float:
    perf = json.loads((probe_dir / "rank-0.json").read_text())["perf"]
    return rates(perf, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)["median"]


def _start_nodes(hosts: Hosts, rendezvous, run_dir: Path, overrides: list[str], probe_dir: Path, logs: Path,
                 tag: str, **env: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """torchrun on both hosts, ``rendezvous(rank, port)`` their arguments; (processes, log files)."""
    port = free_port()
    files = [logs / f"multi_node-{tag}-node{rank}.log" for rank in (0, 1)]
    nodes = [_start(hosts.torchrun(rank, BIN, rendezvous(rank, port), *_probe(run_dir, overrides)),
                    subprocess_env(BENCH_PROBE_DIR=str(probe_dir), **env, **hosts.env(rank)), files[rank])
             for rank in (0, 1)]
    return nodes, files


def _two_nodes(hosts: Hosts, work: Path, logs: Path, overrides: list[str], tag: str) -> float:
    probe_dir = Path(tempfile.mkdtemp(prefix="harness-bench-probe-"))
    nodes, files = _start_nodes(hosts, static_rendezvous, work / tag, overrides, probe_dir, logs, tag)
    _wait(nodes, 600, files)
    return _steps_per_s(probe_dir)


def _one_node(work: Path, logs: Path, overrides: list[str], tag: str) -> float:
    probe_dir = Path(tempfile.mkdtemp(prefix="harness-bench-probe-"))
    log = logs / f"multi_node-{tag}.log"
    process = _start([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *_probe(work / tag, overrides)],
                     subprocess_env(BENCH_PROBE_DIR=str(probe_dir)), log)
    _wait([process], 600, [log])
    return _steps_per_s(probe_dir)


def _elastic_restart(hosts: Hosts, work: Path, logs: Path, tag: str) -> dict:
    probe_dir = Path(tempfile.mkdtemp(prefix="harness-bench-probe-"))
    run_dir = work / tag
    overrides = ["train.epochs=200", "checkpoint.every_steps=50", "train.collective_timeout_s=10"]
    nodes, files = _start_nodes(hosts, elastic_rendezvous, run_dir, overrides, probe_dir, logs, tag,
                                TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see the README
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-*")):
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                raise RuntimeError(f"no checkpoint before the kill; see {files[0]}")
            time.sleep(0.05)
        time.sleep(2.0)
        killed = time.time()
        kill_node(nodes[1])
        _wait(nodes[:1], 300, files[:1])
    finally:
        for process in nodes:
            kill_node(process)
    restarted = json.loads((probe_dir / "first-step-rank-0-restart-1.json").read_text())["first_step"]
    before = json.loads((probe_dir / "rank-0.json").read_text())  # the survivor's worker that lost its peer
    resumed = re.search(r"resumed from \S+step-(\d+)", files[0].read_text())
    if resumed is None:
        raise RuntimeError(f"the restarted worker did not resume; see {files[0]}")
    step = int(resumed.group(1))
    perf = before["perf"]
    lost_steps = len(perf) - step
    seconds_per_step = statistics.median(b - a for a, b in zip(perf, perf[1:]))
    return {"kill_to_training_s": restarted - killed, "resumed_step": step, "steps_before_kill": len(perf),
            "lost_steps": lost_steps, "lost_s": lost_steps * seconds_per_step}


def multi_node(work: Path, logs: Path, rounds: int) -> dict:
    hosts = Hosts(tag=f"b{int(time.time()) % 10000}")
    hosts.up()
    overrides = ["train.epochs=40", "train.val_every_epochs=40", NO_CHECKPOINTS]
    try:
        results = []
        for r in range(rounds):
            order = ["two_nodes", "one_node"] if r % 2 == 0 else ["one_node", "two_nodes"]
            record = {"order": order}
            for name in order:
                if name == "two_nodes":
                    record[name] = _two_nodes(hosts, work, logs, overrides, f"static-{r}")
                else:
                    record[name] = _one_node(work, logs, overrides, f"local-{r}")
            record["elastic"] = _elastic_restart(hosts, work, logs, f"elastic-{r}")
            results.append(record)
            print(f"[multi-node] round {r + 1}/{rounds}: 2 nodes {record['two_nodes']:.1f} steps/s, 1 node "
                  f"{record['one_node']:.1f} steps/s; elastic: SIGKILL to training again "
                  f"{record['elastic']['kill_to_training_s']:.1f} s, lost {record['elastic']['lost_steps']} steps",
                  flush=True)
    finally:
        hosts.down()
    ratios = [r["two_nodes"] / r["one_node"] for r in results]
    restarts = [r["elastic"]["kill_to_training_s"] for r in results]
    lost = [r["elastic"]["lost_s"] for r in results]
    return {"rounds": rounds, "results": results,
            "summary": {"ratio": _spread(ratios), "two_nodes": _spread([r["two_nodes"] for r in results]),
                        "one_node": _spread([r["one_node"] for r in results]),
                        "kill_to_training_s": _spread(restarts), "lost_s": _spread(lost)}}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def multi_node_markdown(s: dict, command: str, when: str) -> str:
    v = s["summary"]
    lines = [f"# Multi-node: 2 hosts (network namespaces, a veth pair), {s['rounds']} rounds", "",
             f"- when: {when}", f"- command: `{command}`", f"- harness: commit {s['tree']['commit']}"
             + (" (uncommitted changes)" if s["tree"]["harness_uncommitted"] else ""), "",
             "| Measurement | Median | Min-max |", "|---|---|---|",
             f"| steps/s, breast-cancer MLP, 2 nodes x 1 process | {v['two_nodes']['median']:.1f} | "
             f"{v['two_nodes']['min']:.1f}-{v['two_nodes']['max']:.1f} |",
             f"| steps/s, the same, 1 node x 2 processes | {v['one_node']['median']:.1f} | "
             f"{v['one_node']['min']:.1f}-{v['one_node']['max']:.1f} |",
             f"| ratio 2 nodes / 1 node (the network path's cost) | {v['ratio']['median']:.2f}x | "
             f"{v['ratio']['min']:.2f}-{v['ratio']['max']:.2f}x |",
             f"| elastic: a node SIGKILLed to the survivor's first step after its restart | "
             f"{v['kill_to_training_s']['median']:.1f} s | {v['kill_to_training_s']['min']:.1f}-"
             f"{v['kill_to_training_s']['max']:.1f} s |",
             f"| elastic: training lost (past the checkpoint resumed from) | {v['lost_s']['median']:.2f} s | "
             f"{v['lost_s']['min']:.2f}-{v['lost_s']['max']:.2f} s |"]
    return "\n".join(lines) + "\n"
