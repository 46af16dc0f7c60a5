"""Two nodes on one machine, for real: two network namespaces joined by a veth pair (the test's own
hosts, 10.213.0.1 and 10.213.0.2, torn down at the end), each running its own torchrun, the ranks
talking over that link. A 2-node x 1-process run trains bitwise like 1 node x 2 processes; a
network cut or a frozen peer stops every waiting rank within train.collective_timeout_s with one
line saying a peer became unreachable, and the relaunch resumes bitwise; under torchrun's elastic
agent a node SIGKILLed with its worker leaves the survivor to restart as a world of 1 and resume
from the newest checkpoint by itself, bitwise like a manual 1-process resume of that checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from harness.distributed import restarts_share_the_agent_store
from tests.conftest import BIN, ROOT, assert_bitwise_equal, free_port, subprocess_env, weights
from tests.hosts import Hosts, elastic_rendezvous, kill_node, static_rendezvous

SLOW_MODEL = '''\
import time
from torch import nn


class SlowNet(nn.Module):
    """A small MLP whose training forward takes 20 ms more, so the test can act while it trains."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, out_dim))

    def forward(self, x):
        if self.training:
            time.sleep(0.02)
        return self.net(x)
'''
RECIPE = """\
data: {name: breast_cancer, batch_size: 32}
model: {name: slow:SlowNet}
optim: {name: adam, lr: 0.003}
schedule: {name: cosine, interval: step}
train: {epochs: 6, collective_timeout_s: 5}
checkpoint: {every_steps: 10, keep_last: 100}
"""
TIMEOUT_S = 5  # train.collective_timeout_s above
# For torchrun under --max-restarts: a restarted worker would otherwise read the previous attempt's
# addresses from the agent's shared store (pytorch/pytorch#135712; the harness warns at start).
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def hosts():
    found = Hosts()
    try:
        found.up()
    except (OSError, subprocess.CalledProcessError) as exc:
        found.down()
        message = f"cannot create network namespaces here ({getattr(exc, 'stderr', exc)}); root and iproute2 needed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield found
    found.down()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multi_node")
    (folder / "slow.py").write_text(SLOW_MODEL)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def started(command: list[str], project: Path, **env: str) -> subprocess.Popen:
    """``command`` in the test project, in a session of its own, its output collected."""
    return subprocess.Popen(command, cwd=project, env=subprocess_env(PYTHONPATH=str(ROOT), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def train(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "harness", "train", "recipe.yaml", f"run.output_dir={run_dir}", *extra]


def node(hosts: Hosts, rank: int, project: Path, run_dir: Path, launch: list[str], *extra: str):
    """One node: torchrun in namespace ``rank``, its ranks talking over that namespace's link."""
    return started(hosts.torchrun(rank, BIN, launch, *train(run_dir, *extra)), project, **hosts.env(rank),
                   **NO_SHARED_STORE)


def two_nodes(hosts, project, run_dir, *extra) -> list[subprocess.Popen]:
    port = free_port()
    return [node(hosts, rank, project, run_dir, static_rendezvous(rank, port), *extra) for rank in (0, 1)]


def finish(processes, timeout: float = 240) -> list[str]:
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=timeout)
        outputs.append(out)
    return outputs


def wait_for(path: Path, processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        assert all(p.poll() is None for p in processes), "a node exited before " + str(path)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(hosts, project, tmp_path_factory) -> Path:
    """An uninterrupted 2-node x 1-process run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    outputs = finish(two_nodes(hosts, project, run_dir))
    assert (run_dir / "metrics.json").is_file(), outputs[0][-3000:]
    return run_dir


def local_torchrun(project: Path, run_dir: Path, *launch: str, overrides=()) -> subprocess.Popen:
    """torchrun on this host's loopback, 2 processes."""
    return started([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *launch,
                    *train(run_dir, *overrides)], project, **NO_SHARED_STORE)


def only_checkpoint(folder: Path, tmp_path: Path) -> Path:
    """A fresh run folder holding a copy of checkpoint ``folder`` alone, to resume it by hand."""
    manual = tmp_path / "manual"
    (manual / "checkpoints").mkdir(parents=True)
    shutil.copytree(folder, manual / "checkpoints" / folder.name)
    return manual


@pytest.fixture(scope="module")
def local(project, tmp_path_factory) -> Path:
    """The same run uninterrupted on 1 node x 2 processes."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    process = local_torchrun(project, run_dir)
    out = finish([process])[0]
    assert process.returncode == 0, out[-3000:]
    return run_dir


def test_two_nodes_of_one_process_train_bitwise_like_one_node_of_two(straight, local):
    assert_bitwise_equal(weights(straight), weights(local))
    # The global rank 0 alone wrote the run's files: one event file, one report per rank.
    assert len(list((straight / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (straight / "ranks").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_accelerate_launch_on_two_machines_trains_bitwise_like_one_node_of_two(hosts, project, local, tmp_path):
    """``accelerate launch --num_machines 2 --machine_rank R``, one per host, the README's way."""
    run_dir, port = tmp_path / "run", free_port()
    config = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
    nodes = [started(hosts.accelerate(rank, BIN, config, port, *train(run_dir)), project, **hosts.env(rank))
             for rank in (0, 1)]
    outputs = finish(nodes)
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0], outputs[0][-3000:]
    assert_bitwise_equal(weights(local), weights(run_dir))


def test_a_network_cut_stops_every_rank_in_bounded_time_and_the_relaunch_resumes_bitwise(
        hosts, project, straight, tmp_path):
    run_dir = tmp_path / "run"
    nodes = two_nodes(hosts, project, run_dir)
    try:
        wait_for(run_dir / "checkpoints" / "step-000020", nodes)
        hosts.cut()
        cut_at = time.monotonic()
        outputs = finish(nodes, timeout=TIMEOUT_S + 60)
        stopped_after = time.monotonic() - cut_at
    finally:
        hosts.cut(up=True)
    assert all(p.returncode != 0 for p in nodes)
    assert stopped_after < TIMEOUT_S + 15, stopped_after
    for rank, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("harness: ")]
        assert len(lines) == 1 and f"harness: rank {rank}: a peer became unreachable: a collective waited past " \
               "train.collective_timeout_s" in lines[0], out[-3000:]
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    verified = subprocess.run([str(BIN / "python"), "-m", "harness", "ckpt", "list", str(run_dir)], capture_output=True,
                              text=True, env=subprocess_env(), timeout=60)
    step = int(newest.name.removeprefix("step-"))
    assert re.search(rf"^\s+{step}\s.*\byes\s+<- run.resume=auto takes this", verified.stdout, re.M), verified.stdout
    # The link is back: the same command resumes and finishes, bitwise the uninterrupted run.
    outputs = finish(two_nodes(hosts, project, run_dir))
    assert "resumed from" in outputs[0], outputs[0][-3000:]
    assert_bitwise_equal(weights(straight), weights(run_dir))


def test_a_frozen_peer_is_detected_by_the_collective_timeout(hosts, project, tmp_path):
    run_dir = tmp_path / "run"
    nodes = two_nodes(hosts, project, run_dir)
    worker = None
    try:
        wait_for(run_dir / "checkpoints" / "step-000020", nodes)
        worker = psutil.Process(nodes[1].pid).children(recursive=True)[-1]
        worker.suspend()  # SIGSTOP
        frozen_at = time.monotonic()
        out, _ = nodes[0].communicate(timeout=TIMEOUT_S + 60)
        stopped_after = time.monotonic() - frozen_at
    finally:
        kill_node(nodes[1])
    assert nodes[0].returncode != 0 and stopped_after < TIMEOUT_S + 15, (stopped_after, out[-3000:])
    assert "harness: rank 0: a peer became unreachable" in out, out[-3000:]


def test_an_elastic_restart_after_losing_a_node_resumes_on_the_survivor_by_itself(hosts, project, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    nodes = [node(hosts, rank, project, run_dir, elastic_rendezvous(rank, port)) for rank in (0, 1)]
    try:
        wait_for(run_dir / "checkpoints" / "step-000020", nodes)
        kill_node(nodes[1])
        out, _ = nodes[0].communicate(timeout=240)
    finally:
        for process in nodes:
            kill_node(process)
    assert nodes[0].returncode == 0, out[-4000:]
    resumed = re.findall(r"resumed from (\S+step-(\d+)): epoch \d+ of 6, step \d+", out)
    assert len(resumed) == 1, out[-4000:]
    folder, step = Path(resumed[0][0]), int(resumed[0][1])
    assert step >= 20 and "World size changed: the checkpoint was written by 2 rank(s), this run has 1" in out
    # The same checkpoint resumed by hand on one process gives the same final weights.
    manual = only_checkpoint(folder, tmp_path)
    proc = subprocess.run([str(BIN / "python"), "-m", "harness", "train", "recipe.yaml", f"run.output_dir={manual}"],
                          cwd=project, capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(ROOT)),
                          timeout=240)
    assert proc.returncode == 0 and f"step {step}," in proc.stdout, proc.stderr[-3000:]
    assert_bitwise_equal(weights(run_dir), weights(manual))


def test_a_worker_killed_like_the_oom_killer_does_is_restarted_by_torchrun_and_resumes_exactly(
        project, local, tmp_path):
    """One node, ``torchrun --max-restarts 1``: rank 1's worker SIGKILLed (what the kernel's OOM killer
    sends) after a checkpoint. Rank 0 stops on the lost peer, the agent restarts both, they resume
    from the newest checkpoint by themselves, and the run ends bitwise like the uninterrupted one."""
    run_dir = tmp_path / "run"
    launcher = local_torchrun(project, run_dir, "--max-restarts", "1")
    try:
        wait_for(run_dir / "checkpoints" / "step-000020", [launcher])
        workers = psutil.Process(launcher.pid).children(recursive=True)
        rank_1 = [w for w in workers if w.environ().get("RANK") == "1" and "harness" in " ".join(w.cmdline())]
        assert len(rank_1) == 1, [(w.pid, w.cmdline()) for w in workers]
        rank_1[0].kill()
        out = finish([launcher])[0]
    finally:
        kill_node(launcher)
    assert launcher.returncode == 0, out[-4000:]
    assert len(re.findall(r"resumed from \S+step-(\d+): epoch \d+ of 6", out)) == 1, out[-4000:]
    assert_bitwise_equal(weights(local), weights(run_dir))


def test_a_node_that_joins_an_elastic_run_scales_it_up_at_a_checkpoint_and_training_goes_on_exactly(
        hosts, project, tmp_path):
    """``torchrun --nnodes 1:2``: the first node trains alone; when the second joins, the agent stops
    its worker with SIGTERM (the harness saves at the next step and exits 75), and both resume
    from that checkpoint as a world of 2, bitwise like a manual 2-process resume of it."""
    run_dir = tmp_path / "run"
    longer = "train.epochs=20"  # ~300 steps of 20 ms: the second node joins well before the end
    port = free_port()
    nodes = [node(hosts, 0, project, run_dir, elastic_rendezvous(0, port), longer)]
    try:
        wait_for(run_dir / "checkpoints" / "step-000020", nodes)
        nodes.append(node(hosts, 1, project, run_dir, elastic_rendezvous(1, port), longer))
        outputs = finish(nodes)
    finally:
        for process in nodes:
            kill_node(process)
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-4000:] + outputs[1][-3000:]
    resumed = re.findall(r"resumed from (\S+step-(\d+)): epoch \d+ of 20, step \d+", "".join(outputs))
    assert len(resumed) == 1, outputs[0][-4000:] + outputs[1][-3000:]
    folder = Path(resumed[0][0])
    assert "World size changed: the checkpoint was written by 1 rank(s), this run has 2" in "".join(outputs)
    manual = only_checkpoint(folder, tmp_path)
    process = local_torchrun(project, manual, overrides=[longer])
    out = finish([process])[0]
    assert process.returncode == 0 and f"step-{resumed[0][1]}: epoch" in out, out[-3000:]
    assert_bitwise_equal(weights(run_dir), weights(manual))


@pytest.mark.parametrize("unshared", [False, True])
def test_the_harness_tells_when_torchrun_restarts_share_the_agent_store(unshared):
    """What torchrun --max-restarts gives its workers, read from a real torchrun: the harness warns
    (restarts_share_the_agent_store) unless the launcher ran with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    extra = NO_SHARED_STORE if unshared else {}
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "--max-restarts", "2",
                           "--no-python", "env", "-0"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(**extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    worker_env = dict(item.split("=", 1) for item in proc.stdout.split("\0") if "=" in item)
    assert worker_env["TORCHELASTIC_MAX_RESTARTS"] == "2"
    assert restarts_share_the_agent_store(worker_env) is (not unshared)
