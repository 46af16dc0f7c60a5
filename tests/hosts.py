"""Two hosts on one machine: network namespaces joined by a veth pair, for the multi-node tests
(tests/test_multi_node.py) and the multi-node benchmark (scripts/bench.py --multi-node). The
addresses are the project's own (10.213.0.1 and 10.213.0.2), reachable only between the two
namespaces; each is torn down with its namespace."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import psutil

ADDRESSES = ("10.213.0.1", "10.213.0.2")


class Hosts:
    """Two network namespaces, a veth pair between them; names carry the creating process's pid."""

    def __init__(self, tag: Optional[str] = None):
        tag = tag or f"{os.getpid() % 100000}"
        self.names = (f"hn{tag}a", f"hn{tag}b")
        self.links = (f"vh{tag}a", f"vh{tag}b")

    def up(self) -> None:
        a, b = self.names
        commands = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                    ["ip", "link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1]]]
        for name, link, address in zip(self.names, self.links, ADDRESSES):
            commands += [["ip", "link", "set", link, "netns", name],
                         ["ip", "-n", name, "addr", "add", f"{address}/24", "dev", link],
                         ["ip", "-n", name, "link", "set", link, "up"], ["ip", "-n", name, "link", "set", "lo", "up"]]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, text=True)

    def down(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)

    def cut(self, up: bool = False) -> None:
        """Take the link down on the second host (or bring it back)."""
        subprocess.run(["ip", "-n", self.names[1], "link", "set", self.links[1], "up" if up else "down"], check=True)

    def torchrun(self, rank: int, bin_dir: Path, launch: list[str], *target: str) -> list[str]:
        """``torchrun`` on host ``rank``, one process, listening on that host's address."""
        return ["ip", "netns", "exec", self.names[rank], str(bin_dir / "torchrun"), *launch, "--nproc_per_node", "1",
                "--local-addr", ADDRESSES[rank], *target]

    def accelerate(self, rank: int, bin_dir: Path, config: Path, port: int, *target: str) -> list[str]:
        """``accelerate launch`` on host ``rank`` as machine ``rank`` of 2, one process each."""
        return ["ip", "netns", "exec", self.names[rank], str(bin_dir / "accelerate"), "launch", "--config_file",
                str(config), "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                "--main_process_ip", ADDRESSES[0], "--main_process_port", str(port), *target]

    def env(self, rank: int) -> dict:
        """What the ranks on host ``rank`` need: gloo on that host's link."""
        return {"GLOO_SOCKET_IFNAME": self.links[rank]}


def static_rendezvous(rank: int, port: int) -> list[str]:
    """torchrun's arguments for node ``rank`` of a fixed 2-node job, the first host its master."""
    return ["--nnodes", "2", "--node_rank", str(rank), "--master_addr", ADDRESSES[0], "--master_port", str(port)]


def elastic_rendezvous(rank: int, port: int) -> list[str]:
    """torchrun's arguments for node ``rank`` of an elastic 1-2 node job (c10d rendezvous hosted by
    the first host, restarts up to 3)."""
    return ["--nnodes", "1:2", "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{ADDRESSES[0]}:{port}", "--rdzv-id", f"elastic-{port}",
            "--rdzv-conf", f"is_host={int(rank == 0)},last_call_timeout=1"]


def kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and every process under it, at once (nothing if it has ended)."""
    if process.poll() is not None:
        return
    try:
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [process.pid]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
