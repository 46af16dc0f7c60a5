"""Shared helpers: run the harness the way users do (real processes, real files)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
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
    """Same names, and each tensor the same dtype, shape and bits (a tensor missing on one side fails)."""
    assert a.keys() == b.keys(), (f"only in the first: {sorted(a.keys() - b.keys())}; "
                                  f"only in the second: {sorted(b.keys() - a.keys())}")
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, \
            f"{name}: {a[name].dtype} {tuple(a[name].shape)} vs {b[name].dtype} {tuple(b[name].shape)}"
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"


def assert_same_weights(run_dir: Path, reference: Path | dict) -> None:
    """``run_dir``'s final weights bitwise equal to ``reference``: another run folder or a weights dict."""
    assert_bitwise_equal(weights(run_dir), weights(reference) if isinstance(reference, Path) else reference)


def lr_series(run_dir: Path, group: str = "default", steps: bool = True) -> list:
    """The logged LR of ``group`` (TensorBoard ``lr/<group>``): (step, lr) pairs; with ``steps=False``
    only the values, after checking there is exactly one point per optimizer step from step 1."""
    from harness.tracking import read_scalars

    points = read_scalars(run_dir)[f"lr/{group}"]
    if steps:
        return points
    assert [step for step, _ in points] == list(range(1, len(points) + 1)), "one LR point per optimizer step"
    return [value for _, value in points]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def harness_cli(*args, check_rc: int | None = 0, timeout: float = 300, env: dict | None = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m harness ARGS...`` as a user runs it; fails unless it exits ``check_rc`` (None: any)."""
    cmd = [sys.executable, "-m", "harness", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check_rc is not None and proc.returncode != check_rc:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}, expected {check_rc}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


class OneProcess:
    """The Accelerator members the checkpoint store and the run lock use, for a single process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Runs that a test signals or kills while they train (test_launcher_death, test_interrupt,
# test_preemption, test_async_save, test_options)
# --------------------------------------------------------------------------------------------

BREAST_CANCER = ROOT / "recipes" / "breast_cancer_mlp.yaml"
# 15 steps an epoch on 2 ranks; a mid-epoch checkpoint every 30 steps; the run ends at step 300.
CHECKPOINTED_RUN = ["train.max_steps=300", "checkpoint.every_steps=30", "train.log_every_steps=10"]
# Long enough to be signalled mid-run on a loaded 2-core machine: 300 epochs x 15 steps.
LONG_RUN = ["train.epochs=300", "checkpoint.every_epochs=100", "train.log_every_steps=50"]
# Each checkpoint file takes 20 ms longer to write (harness/faults.py), so the run is still going
# when the test acts on its first checkpoint; the weights are the same.
SLOW_SAVES = {"HARNESS_TEST_SAVE_FILE_DELAY_S": "0.02"}
# Any frame of our own package in the output means a rank printed a traceback.
HARNESS_FRAME = re.compile(r'File "[^"]*/harness/\w+\.py"')

_references: dict = {}


def hear_ctrl_c() -> None:
    """Children hear Ctrl-C as in a terminal. A suite started in the background (`pytest &`)
    ignores SIGINT and passes that down, and a run that inherits it stays deaf: so this process
    takes Python's own handler instead, which a child does not inherit (exec resets a handled
    signal to its default). Done here, in the parent, rather than in each child before exec: a
    preexec_fn in a process with threads (pytest-xdist's workers) is not safe, and failed here once
    with EBADF."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


hear_ctrl_c()


def start_logged(run_dir: Path, launcher: str, nproc: int, env: dict = SLOW_SAVES, wrap=()) -> subprocess.Popen:
    """BREAST_CANCER + CHECKPOINTED_RUN in its own session, as a terminal would start it (``wrap``:
    words in front of the command); output to <run_dir>.log (read it with ``output``)."""
    cmd = [*wrap, *harness_command(BREAST_CANCER, [f"run.output_dir={run_dir}", *CHECKPOINTED_RUN], nproc, launcher)]
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.log").read_text()


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Until a checkpoint at ``step`` or later is committed (older ones are pruned: keep_last)."""
    deadline = time.monotonic() + timeout
    while not any(int(f.name.split("-")[1]) >= step for f in (run_dir / "checkpoints").glob("step-*")):
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}:\n{output(run_dir)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint at step {step} in time:\n{output(run_dir)[-3000:]}")
        time.sleep(0.01)


def checkpoints(run_dir: Path) -> dict[int, dict]:
    """Committed checkpoints: step -> trainer.json."""
    return {int(folder.name.split("-")[1]): read_json(folder / "trainer.json")
            for folder in (run_dir / "checkpoints").glob("step-*")}


def reference_weights(tmp_path_factory, nproc: int) -> dict:
    """Final weights of BREAST_CANCER + CHECKPOINTED_RUN uninterrupted on ``nproc`` ranks (once per session)."""
    if nproc not in _references:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        run_harness(BREAST_CANCER, [f"run.output_dir={run_dir}", *CHECKPOINTED_RUN], nproc=nproc,
                    launcher="accelerate" if nproc > 1 else "python")
        _references[nproc] = weights(run_dir)
    return _references[nproc]


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until TensorBoard has step points, i.e. the ranks are inside the training loop (``proc``'s
    output a pipe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        events = list((run_dir / "tb").glob("events.*")) if (run_dir / "tb").is_dir() else []
        if events and events[0].stat().st_size > 2000:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """(exit code, output) of a run started with its output piped; its session SIGKILLed on a timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# The heaviest files first (by their time in a full run, 2026-12-07): pytest-xdist hands whole
# files to its workers in collection order, and a heavy file collected last kept one worker busy
# for minutes after the other ran out of work. The rest stay in name order.
HEAVY_FIRST = ("test_resume.py", "test_resume_holes.py", "test_datasets.py", "test_slurm.py", "test_streams.py",
               "test_user_components.py", "test_distributed.py", "test_resume_matrix.py", "test_fsdp.py",
               "test_training_controls.py", "test_blocks.py", "test_multi_node.py", "test_token_losses.py",
               "test_slurm_two_nodes.py", "test_launcher_death.py", "test_save_failures.py", "test_recipe_changes.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together
