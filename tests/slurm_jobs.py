"""Helpers of the SLURM cluster tests (tests/test_slurm.py, tests/test_slurm_two_nodes.py): ports
for a private cluster, a job's record, a job's output."""

from __future__ import annotations

import random
import re
import socket
import subprocess
from pathlib import Path


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                return False
    return True


def pick_ports() -> int:
    """A slurmctld port whose successor (slurmd's) is free too. Below the job rendezvous ports
    (20000 + job id % 10000) and Linux's ephemeral range."""
    for _ in range(200):
        port = random.randrange(15000, 19998, 2)
        if _port_pair_free(port):
            return port
    raise RuntimeError("no free port pair in 15000-19999")


def job_info(env: dict, job_id: str, check: bool = False) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...); {} when it prints
    nothing. ``check``: scontrol failing is an error."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0])) if proc.stdout.strip() else {}


def read_output(path: Path) -> str:
    """A job's output file, or a placeholder if the job never wrote one."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "<no output file>"
