"""Shared helpers: run the harness the way users do (real processes, real files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPU_2PROC = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"


ACCELERATE_VERSION = tuple(int(part) for part in metadata.version("accelerate").split(".")[:2])


def launcher_exit_code(launcher: str, ranks_code: int, signal_to_launcher: int | None = None) -> int:
    """What the command a user typed exits with when every rank exited ``ranks_code`` (README, Exit
    codes): a launcher reports its workers' failure as 1, except accelerate launch 1.16 and later
    when the launcher itself received the signal (Ctrl-C, SIGTERM): 128 + the signal."""
    if launcher == "python":
        return ranks_code
    if signal_to_launcher is not None and launcher == "accelerate" and ACCELERATE_VERSION >= (1, 16):
        return 128 + signal_to_launcher
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def harness_command(recipe: str | Path, overrides: list[str], nproc: int, launcher: str = "accelerate") -> list[str]:
    args = ["-m", "harness", "train", str(recipe), *overrides]
    if nproc == 1 and launcher == "python":
        return [sys.executable, *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]
    if nproc == 1:
        return [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), *args]


def run_harness(recipe, overrides=(), nproc: int = 2, launcher: str = "accelerate", check: bool = True,
                timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = harness_command(recipe, list(overrides), nproc, launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's final weights (final/model.safetensors)."""
    return load_file(run_dir / "final" / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
