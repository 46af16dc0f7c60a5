"""The SLURM batch scripts (slurm/*.sbatch, slurm/lib/preempt.sh) against a real one-node cluster.

A module fixture starts a private cluster on 127.0.0.1 with scripts/slurm_local.sh (its own
folder and ports, so it never meets another cluster on the machine) and stops it at the end.
If SLURM cannot be started at all (no packages and no apt, not root) the cluster tests are
skipped with the reason, except under CI=true, where that fails instead.

What the cluster tests prove, on slurm/cpu.sbatch (2 CPU ranks under accelerate launch):
  * SIGUSR1 to the batch shell (`scancel -s USR1 -b`, what `--signal=B:USR1@N` sends) makes the
    ranks save, the job requeue itself, resume on the requeued run and finish, with the same final
    weights, bit for bit, as an uninterrupted run of the same recipe;
  * SIGUSR1 to the job steps instead (`scancel -s USR1 JOB`, what `--signal=USR1@N` sends) ends the
    same way, for an array task that requeues only itself (ARRAYJOB_TASK);
  * past HARNESS_MAX_REQUEUES the job stops requeueing, says so, and exits 75 with its checkpoint
    kept; running the same command again resumes from it;
  * a plain `scancel JOBID` (SIGTERM to everything) is not undone by a requeue.
The job's output file is checked line by line, not only its state: a misconfigured SLURM reports
COMPLETED for a job that never ran.

The other tests need no SLURM: key lines of the scripts (golden text), `bash -n`, and the shared
shell library run against a fake `scontrol` (wait/trap exit codes, array requeue target, cap).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_harness, subprocess_env

pytestmark = pytest.mark.slurm

SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
SLURM_DIR = ROOT / "slurm"
LIB = SLURM_DIR / "lib" / "preempt.sh"
SCRIPTS = ["cpu.sbatch", "single_node.sbatch", "multi_node.sbatch", "multi_node_per_task.sbatch"]
GPU_SCRIPTS = ["single_node.sbatch", "multi_node.sbatch", "multi_node_per_task.sbatch"]

# 60 epochs x 15 steps of the breast-cancer MLP: long enough (~10 s of training on 2 loaded cores)
# to be preempted right after the first epoch's checkpoint, short enough for the suite.
RECIPE = "recipes/breast_cancer_mlp.yaml"
EPOCHS = 60
STEPS = EPOCHS * 15
OVERRIDES = [f"train.epochs={EPOCHS}", "train.log_every_steps=15"]

POLL_S = 0.1
START_TIMEOUT_S = 180    # submission -> first checkpoint (the machine is shared and loaded)
FINISH_TIMEOUT_S = 240   # signal -> requeue (~7-11 s) -> resume -> COMPLETED


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                return False
    return True


def _pick_ports() -> int:
    # Below the job rendezvous ports (20000 + job id % 10000) and Linux's ephemeral range.
    for _ in range(200):
        port = random.randrange(15000, 19998, 2)
        if _port_pair_free(port):
            return port
    raise RuntimeError("no free port pair in 15000-19999")


class Cluster:
    def __init__(self, env: dict, folder: Path, owned: bool):
        self.env, self.folder, self.owned = env, folder, owned

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def sbatch(self, out_file: Path, args: list[str], sbatch_opts: tuple[str, ...] = (),
               env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", f"--output={out_file}", "--job-name=harness-test",
                               *sbatch_opts, "slurm/cpu.sbatch", *args],
                              env=env or self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout.strip().split(";")[0]


def _bring_up(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_LOCAL), "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def cluster():
    """A running cluster: CI's (HARNESS_SLURM_DIR set by .ci/run, left running) or our own."""
    env = subprocess_env()
    for key in ("HARNESS_MAX_REQUEUES", "HARNESS_RECIPE", "HARNESS_OVERRIDES", "SLURM_CONF"):
        env.pop(key, None)
    owned_dir = None
    if env.get("HARNESS_SLURM_DIR"):
        # Someone (.ci/run) runs a cluster for us: `up` is a no-op if it is healthy.
        already_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=60).returncode == 0
    else:
        # Our own: a short folder (the munge socket path must stay under 108 bytes), our own ports.
        owned_dir = tempfile.mkdtemp(prefix="hs-", dir="/tmp")
        env["HARNESS_SLURM_DIR"] = owned_dir
        env["HARNESS_SLURM_PORT"] = str(_pick_ports())
        already_up = False
    started = time.monotonic()
    proc = _bring_up(env)
    if proc.returncode != 0:
        if owned_dir:
            shutil.rmtree(owned_dir, ignore_errors=True)
        reason = (f"SLURM could not be started (scripts/slurm_local.sh up exited {proc.returncode}): "
                  + (proc.stderr.strip().splitlines() or ["no output"])[-1])
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(reason + "\n" + proc.stderr[-4000:], pytrace=False)
        pytest.skip(reason)
    env["SLURM_CONF"] = str(Path(env["HARNESS_SLURM_DIR"]) / "slurm.conf")
    print(f"\n[test_slurm] cluster up in {time.monotonic() - started:.1f} s: {env['HARNESS_SLURM_DIR']}")
    c = Cluster(env, Path(env["HARNESS_SLURM_DIR"]), owned=not already_up)
    yield c
    if c.owned:
        subprocess.run(["bash", str(SLURM_LOCAL), "down"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    if owned_dir:
        shutil.rmtree(owned_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, run directly (no SLURM) in the background while the jobs run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_harness, RECIPE, [f"run.output_dir={run_dir}", *OVERRIDES], nproc=2, timeout=600)
    yield lambda: (future.result(), run_dir)[1]
    pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "<no output file>"


def wait_for(what: str, predicate, timeout: float, out_file: Path, cluster: Cluster | None = None,
             job_id: str | None = None):
    """Poll ``predicate`` until it returns something truthy; fail early if the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cluster is not None and job_id is not None:
            state = cluster.job(job_id).get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                value = predicate()
                if value:
                    return value
                pytest.fail(f"job {job_id} ended ({state}) while waiting for {what}\n"
                            f"--- job output\n{_read(out_file)[-6000:]}")
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- job output\n{_read(out_file)[-6000:]}")


def wait_for_end(cluster: Cluster, job_id: str, out_file: Path, timeout: float) -> dict:
    def ended():
        info = cluster.job(job_id)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    return wait_for(f"job {job_id} to end", ended, timeout, out_file)


def first_checkpoint(run_dir: Path):
    return sorted(glob.glob(str(run_dir / "checkpoints" / "step-*")))


def read_marker(run_dir: Path):
    try:
        return json.loads((run_dir / "PREEMPTED.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # absent, or caught mid-write
        return None


def lines_in_order(text: str, patterns: list[str]) -> None:
    """Each regex matches a line after the previous one's match."""
    pos = 0
    for pattern in patterns:
        m = re.compile(pattern, re.M).search(text, pos)
        assert m, f"expected a line matching {pattern!r} after offset {pos} in the job output:\n{text[-8000:]}"
        pos = m.end()


def banners(text: str) -> list[str]:
    return re.findall(r"^\[slurm-harness [\d:]+\] job .*SLURM_RESTART_COUNT=([^,]+),", text, re.M)


def preempt_after_first_checkpoint(cluster, job_id, run_dir, out_file, scancel_args):
    """Wait for training to have made progress, signal, and time the save (signal -> marker)."""
    t_submit = time.monotonic()
    wait_for("the first checkpoint", lambda: first_checkpoint(run_dir), START_TIMEOUT_S, out_file, cluster, job_id)
    t_signal = time.monotonic()
    cluster.cmd("scancel", *scancel_args)
    # The resumed run deletes the marker when it starts (~7-11 s later): poll often enough to see it.
    marker = wait_for("PREEMPTED.json", lambda: read_marker(run_dir), 120, out_file, cluster, job_id)
    t_marker = time.monotonic()
    print(f"\n[test_slurm] job {job_id}: first checkpoint {t_signal - t_submit:.1f} s after submission; "
          f"PREEMPTED.json {t_marker - t_signal:.2f} s after `scancel {' '.join(scancel_args)}` "
          f"(harness: {marker['seconds_from_signal_to_saved']:.3f} s from signal to saved), step {marker['step']}")
    return marker, t_signal


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    ours = (run_dir / "final" / "model.safetensors").read_bytes()
    theirs = (reference_dir / "final" / "model.safetensors").read_bytes()
    assert ours == theirs, "final weights differ from the uninterrupted run"
    ours_m, theirs_m = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference_dir))
    assert ours_m["steps"] == theirs_m["steps"] == STEPS and ours_m["world_size"] == 2
    assert ours_m["val_loss"] == theirs_m["val_loss"]


# --------------------------------------------------------------------------------------------
# On the cluster
# --------------------------------------------------------------------------------------------


def test_usr1_to_the_batch_shell_saves_requeues_resumes_and_matches_an_uninterrupted_run(cluster, reference,
                                                                                          tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    started = time.monotonic()
    job = cluster.sbatch(out, [RECIPE, f"run.output_dir={run_dir}", *OVERRIDES])
    marker, t_signal = preempt_after_first_checkpoint(cluster, job, run_dir, out, ["-s", "USR1", "-b", job])
    assert marker["signal"] == "SIGUSR1" and 0 < marker["step"] < STEPS, marker
    saved_step = marker["step"]

    info = wait_for_end(cluster, job, out, FINISH_TIMEOUT_S)
    took = time.monotonic() - started
    text = _read(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", \
        f"{info}\n--- job output\n{text[-6000:]}"
    # Two runs appended to one file (--open-mode=append): the first, then restart 1.
    assert banners(text) == ["unset (first run)", "1"], text[-8000:]
    step = f"step-{saved_step:06d}"
    lines_in_order(text, [
        rf"^\[slurm-harness .*\] job {job} .*SLURM_RESTART_COUNT=unset \(first run\), at most 3 requeues",
        r"^\[slurm-harness .*\] got SIGUSR1: forwarding SIGUSR1 to the launcher",
        rf"^\[harness\] preempted by SIGUSR1: saved .*{step}; exiting with code 75",
        r"^\[slurm-harness .*\] launcher exited with code 1 after",
        rf"^\[slurm-harness .*\] checkpoint saved on a preemption signal: signal=SIGUSR1 step={saved_step} ",
        rf"^\[slurm-harness .*\] requeueing: scontrol requeue {job} \(restart 1 of at most 3\)",
        rf"^\[slurm-harness .*\] job {job} .*SLURM_RESTART_COUNT=1,",
        rf"^\[harness\] resumed from .*{step}: .* step {saved_step},",
        rf"^\[harness\] done: {EPOCHS} epochs, {STEPS} steps",
        r"^\[slurm-harness .*\] training finished \(exit 0\)",
    ])
    assert "signal went to the job steps" not in text
    assert not (run_dir / "PREEMPTED.json").exists(), "the resumed run must delete the marker"
    # The requeue itself: from the save to the second run's banner (the requeued job's restart).
    times = re.findall(r"^\[slurm-harness (\d\d):(\d\d):(\d\d)\] (?:requeueing|job )", text, re.M)
    secs = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in times]
    print(f"[test_slurm] job {job}: requeue -> restarted in {secs[-1] - secs[-2]} s; "
          f"submission -> COMPLETED {took:.1f} s")
    assert_same_weights(run_dir, reference())


def test_usr1_to_the_job_steps_of_an_array_task_saves_and_requeues_only_that_task(cluster, reference, tmp_path):
    # The batch shell is not signalled at all: the ranks get SIGUSR1 from slurmstepd, the launcher
    # (started with SIGUSR1 ignored) survives, and the script finds the marker once srun returns.
    # run.output_dir's %a is expanded by the script to the array task id.
    out_pattern = tmp_path / "job-%A_%a.out"
    job = cluster.sbatch(out_pattern, [RECIPE, f"run.output_dir={tmp_path}/task-%a", *OVERRIDES],
                         sbatch_opts=("--array=3",))
    task = f"{job}_3"
    run_dir, out = tmp_path / "task-3", tmp_path / f"job-{job}_3.out"
    marker, _ = preempt_after_first_checkpoint(cluster, task, run_dir, out, ["-s", "USR1", task])
    assert marker["signal"] == "SIGUSR1" and 0 < marker["step"] < STEPS, marker

    info = wait_for_end(cluster, task, out, FINISH_TIMEOUT_S)
    text = _read(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", \
        f"{info}\n--- job output\n{text[-6000:]}"
    assert info.get("ArrayJobId") == job and info.get("ArrayTaskId") == "3", info
    assert banners(text) == ["unset (first run)", "1"], text[-8000:]
    lines_in_order(text, [
        rf"^\[slurm-harness .*\] job \d+ \(array {job}_3\)",
        rf"run folder {re.escape(str(run_dir))};",
        r"^\[harness\] preempted by SIGUSR1: saved",
        rf"^\[slurm-harness .*\] checkpoint saved on a preemption signal: signal=SIGUSR1 step={marker['step']} ",
        r"^\[slurm-harness .*\] \(the signal went to the job steps, not to this batch shell\)",
        rf"^\[slurm-harness .*\] requeueing: scontrol requeue {job}_3 \(restart 1 of at most 3\)",
        rf"^\[slurm-harness .*\] job \d+ \(array {job}_3\) .*SLURM_RESTART_COUNT=1,",
        rf"^\[harness\] resumed from .*step-{marker['step']:06d}",
        r"^\[slurm-harness .*\] training finished \(exit 0\)",
    ])
    assert "got SIGUSR1" not in text, "the batch shell was not meant to receive the signal"
    assert_same_weights(run_dir, reference())


def test_requeue_cap_reached_stops_requeueing_says_so_and_the_checkpoint_resumes(cluster, reference, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = dict(cluster.env, HARNESS_MAX_REQUEUES="0")
    overrides = [f"run.output_dir={run_dir}", *OVERRIDES]
    job = cluster.sbatch(out, [RECIPE, *overrides], env=env)
    marker, _ = preempt_after_first_checkpoint(cluster, job, run_dir, out, ["-s", "USR1", "-b", job])

    info = wait_for_end(cluster, job, out, FINISH_TIMEOUT_S)
    text = _read(out)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "75:0", \
        f"{info}\n--- job output\n{text[-6000:]}"
    assert banners(text) == ["unset (first run)"], text[-8000:]
    lines_in_order(text, [
        r"at most 0 requeues \(HARNESS_MAX_REQUEUES\)",
        r"^\[slurm-harness .*\] got SIGUSR1: forwarding",
        rf"^\[slurm-harness .*\] checkpoint saved on a preemption signal: signal=SIGUSR1 step={marker['step']} ",
        r"^\[slurm-harness .*\] NOT requeueing: requeue cap reached \(this job has restarted 0 time\(s\), "
        r"HARNESS_MAX_REQUEUES=0\)\. The checkpoint is kept: submit the same command again",
    ])
    assert "requeueing: scontrol requeue" not in text
    # The checkpoint and the marker stay for the next submission...
    assert read_marker(run_dir) == marker
    assert (Path(marker["checkpoint"]) / "model.safetensors").is_file()
    # ... which resumes from it (here run directly) and ends where an uninterrupted run ends.
    proc = run_harness(RECIPE, overrides, nproc=2, timeout=600)
    assert f"resumed from {marker['checkpoint']}" in proc.stdout + proc.stderr
    assert not (run_dir / "PREEMPTED.json").exists()
    assert_same_weights(run_dir, reference())


def test_plain_scancel_ends_the_job_and_no_requeue_brings_it_back(cluster, tmp_path):
    # `scancel JOBID` SIGTERMs the batch shell and every process of the job. The ranks catch
    # SIGTERM and may manage to save before srun SIGKILLs them, but the job must stay cancelled.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(out, [RECIPE, f"run.output_dir={run_dir}", *OVERRIDES])
    wait_for("the first checkpoint", lambda: first_checkpoint(run_dir), START_TIMEOUT_S, out, cluster, job)
    cluster.cmd("scancel", job)
    info = wait_for_end(cluster, job, out, FINISH_TIMEOUT_S)
    text = _read(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n--- job output\n{text[-6000:]}"
    assert banners(text) == ["unset (first run)"], text[-8000:]
    assert re.search(r"^\[slurm-harness .*\] got SIGTERM: forwarding", text, re.M), text[-6000:]
    assert "requeueing: scontrol requeue" not in text
    ending = [line for line in text.splitlines() if "NOT requeueing" in line or "checkpoint saved" in line]
    print(f"\n[test_slurm] job {job} after plain scancel: {ending or 'batch shell killed before deciding'}")


# --------------------------------------------------------------------------------------------
# Without SLURM: the scripts' key lines, and the shared library against a fake scontrol
# --------------------------------------------------------------------------------------------


def _sbatch_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_batch_script_has_the_preemption_lines(name):
    text = (SLURM_DIR / name).read_text()
    sbatch = _sbatch_lines(text)
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --requeue" in sbatch
    assert "#SBATCH --open-mode=append" in sbatch
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", line) for line in sbatch), sbatch
    assert any(re.fullmatch(r"#SBATCH --time=\S+", line) for line in sbatch), "--signal needs a time limit"
    assert "EDIT" in text
    # The common logic is sourced, not copied.
    assert "source slurm/lib/preempt.sh" in text and "harness_slurm_start" in text
    assert 'harness_slurm_launch "$run_dir"' in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("scontrol requeue" in line or line.lstrip().startswith("trap ") for line in code)
    # The project dir comes from the submission directory.
    assert 'PROJECT_DIR=${HARNESS_PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}' in text
    # Launched through srun with the forwarded signal ignored by whatever srun starts.
    assert any(line.lstrip().startswith("srun ") for line in code) and "--kill-on-bad-exit=0" in text
    assert "bash -c 'trap \"\" USR1" in text
    assert 'harness train "$recipe" "${overrides[@]}"' in text or 'harness train "$@"' in text
    proc = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cpu_script_runs_two_cpu_ranks_and_asks_for_no_gpu():
    text = (SLURM_DIR / "cpu.sbatch").read_text()
    assert not any("gres" in line or "gpu" in line for line in _sbatch_lines(text))
    assert "accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml" in text
    assert "--num_processes 2" in text and '--main_process_port "$port"' in text
    assert 'harness_slurm_args "$@"' in text


def test_gpu_scripts_ask_for_gpus_and_map_slurm_to_the_launcher():
    for name in GPU_SCRIPTS:
        assert "#SBATCH --gres=gpu:4" in _sbatch_lines((SLURM_DIR / name).read_text()), name
    single = (SLURM_DIR / "single_node.sbatch").read_text()
    assert "#SBATCH --nodes=1" in single and "#SBATCH --ntasks=1" in single
    assert "accelerate launch --config_file recipes/accelerate/gpu_ddp.yaml" in single
    assert '--num_processes "$num_gpus"' in single and "SLURM_GPUS_ON_NODE" in single

    multi = (SLURM_DIR / "multi_node.sbatch").read_text()
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in multi
    assert "MASTER_PORT=$(harness_slurm_port)" in multi
    assert "#SBATCH --ntasks-per-node=1" in multi
    assert '--machine_rank "$SLURM_NODEID"' in multi and '--num_machines "$SLURM_NNODES"' in multi
    assert '--main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"' in multi
    assert "HARNESS_LAUNCH_CONFIG=${HARNESS_LAUNCH_CONFIG:-recipes/accelerate/gpu_ddp.yaml}" in multi
    assert 'accelerate launch --config_file "$HARNESS_LAUNCH_CONFIG"' in multi
    assert "recipes/accelerate/fsdp_gpu.yaml" in multi and (ROOT / "recipes/accelerate/fsdp_gpu.yaml").is_file()

    per_task = (SLURM_DIR / "multi_node_per_task.sbatch").read_text()
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in per_task
    assert "export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in per_task
    assert 'exec python -m harness train "$@"' in per_task
    assert "accelerate launch" not in per_task.split("#SBATCH --output")[1]


def test_shared_library_key_lines():
    lib = LIB.read_text()
    # Traps on USR1 and TERM; the launcher runs in the background and is waited for.
    assert "trap '_hs_on_signal USR1' USR1" in lib and "trap '_hs_on_signal TERM' TERM" in lib
    assert '"$@" &\n    _hs_launcher_pid=$!' in lib
    assert 'wait "$_hs_launcher_pid"' in lib
    # SIGUSR1, not SIGTERM, to srun (srun turns SIGTERM into SIGKILL for the step).
    assert 'kill -s USR1 "$_hs_launcher_pid"' in lib
    # Requeue only after the marker is there (tested by running the library below), then exit at
    # once; arrays requeue only their task.
    assert 'if scontrol requeue "$target"; then\n        exit 0' in lib
    assert "printf '%s_%s\\n' \"$SLURM_ARRAY_JOB_ID\" \"$SLURM_ARRAY_TASK_ID\"" in lib
    assert "max=${HARNESS_MAX_REQUEUES:-3}" in lib and "NOT requeueing: requeue cap reached" in lib
    assert "SLURM_RESTART_COUNT" in lib
    assert 'port() { printf \'%s\\n\' "$((20000 + ${SLURM_JOB_ID' in lib
    proc = subprocess.run(["bash", "-n", str(LIB)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# A stand-in for srun + launcher + ranks: on SIGUSR1 "saves" (writes the marker) and exits 1, as
# accelerate launch does when its ranks exit 75. Its behaviour is chosen by FAKE_MODE.
FAKE_LAUNCHER = textwrap.dedent("""\
    import json, os, signal, sys, time
    run_dir, mode = sys.argv[1], os.environ["FAKE_MODE"]
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(os.path.join(run_dir, "ready"), "w").close()
    if mode == "fail":
        sys.exit(3)
    if mode == "finish":
        sys.exit(0)
    if mode == "exit75":  # the ranks saved because their launcher died: exit 75, no marker
        sys.exit(75)
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # the save: the batch shell must keep waiting through it
    with open(os.path.join(run_dir, "PREEMPTED.json"), "w") as f:
        json.dump({"signal": "SIGUSR1", "checkpoint": run_dir + "/checkpoints/step-000012", "step": 12,
                   "seconds_from_signal_to_saved": 0.5}, f, indent=2)
    sys.exit(1)
""")


def run_library(tmp_path: Path, mode: str, slurm_env: dict, send: signal.Signals | None = None,
                stale_marker: bool = False):
    """Source the library in bash with a fake scontrol on PATH and SLURM_* set by hand."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n'
        '[[ $1 == show ]] && echo "JobId=$4 JobName=x JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None"\n'
        'exit 0\n')
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    if stale_marker:
        (run_dir / "PREEMPTED.json").write_text('{"signal": "SIGUSR1", "step": 3}\n')
    script = (f"set -uo pipefail\nsource {LIB}\nharness_slurm_start\n"
              f"harness_slurm_launch {run_dir} {sys.executable} {tmp_path / 'launcher.py'} {run_dir}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HARNESS_"))}
    env.update(slurm_env, FAKE_MODE=mode, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if send is not None:
        deadline = time.monotonic() + 30
        while not (run_dir / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, send)
    out, _ = proc.communicate(timeout=60)
    calls = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, out, [c for c in calls if c.startswith("requeue")]


def test_library_requeues_only_the_array_task_after_the_save(tmp_path):
    rc, out, calls = run_library(tmp_path, "save", {"SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "41",
                                                   "SLURM_ARRAY_TASK_ID": "3"}, send=signal.SIGUSR1)
    assert rc == 0, out
    assert calls == ["requeue 41_3"], (calls, out)
    lines_in_order(out, [
        r"job 42 \(array 41_3\) .*SLURM_RESTART_COUNT=unset \(first run\), at most 3 requeues",
        r"got SIGUSR1: forwarding SIGUSR1 to the launcher \(pid \d+\)",
        # The trap interrupted `wait` (status 138); the script waited again for the real code.
        r"launcher exited with code 1 after \d+ s, \d+ s after SIGUSR1",
        r"checkpoint saved on a preemption signal: signal=SIGUSR1 step=12 .*seconds_from_signal_to_saved=0.5",
        r"requeueing: scontrol requeue 41_3 \(restart 1 of at most 3\)",
    ])
    assert "138" not in out


def test_library_stops_at_the_requeue_cap_with_exit_75(tmp_path):
    rc, out, calls = run_library(tmp_path, "save", {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2",
                                                   "HARNESS_MAX_REQUEUES": "2"}, send=signal.SIGUSR1)
    assert rc == 75, out
    assert calls == [], out
    assert "SLURM_RESTART_COUNT=2, at most 2 requeues" in out
    assert ("NOT requeueing: requeue cap reached (this job has restarted 2 time(s), HARNESS_MAX_REQUEUES=2)"
            in out)


def test_library_never_requeues_a_failed_run_even_with_a_stale_marker(tmp_path):
    rc, out, calls = run_library(tmp_path, "fail", {"SLURM_JOB_ID": "42"}, stale_marker=True)
    assert rc == 3, out
    assert calls == [], out
    assert "launcher failed with exit code 3: NOT requeueing" in out


def test_library_never_requeues_exit_75_without_a_marker(tmp_path):
    rc, out, calls = run_library(tmp_path, "exit75", {"SLURM_JOB_ID": "42"})
    assert rc == 75 and calls == [], out
    assert "exit code 75 without" in out and "NOT requeueing" in out


def test_library_exits_0_when_training_finishes(tmp_path):
    rc, out, calls = run_library(tmp_path, "finish", {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert rc == 0 and calls == [], out
    assert "training finished (exit 0)" in out


def test_library_does_not_requeue_after_sigterm_to_the_batch_shell(tmp_path):
    # `scancel JOBID`, the time limit and preemption all SIGTERM the batch shell: the ranks save,
    # but the job must not come back.
    rc, out, calls = run_library(tmp_path, "save", {"SLURM_JOB_ID": "42"}, send=signal.SIGTERM)
    assert rc == 75, out
    assert calls == [], out
    lines_in_order(out, [
        r"got SIGTERM: forwarding SIGUSR1 to the launcher",
        r"checkpoint saved on a preemption signal: signal=SIGUSR1 step=12",
        r"NOT requeueing: this batch shell got SIGTERM, i.e. SLURM is ending the job",
    ])


def test_library_does_not_requeue_a_job_slurm_is_ending(tmp_path):
    rc, out, calls = run_library(tmp_path, "save", {"SLURM_JOB_ID": "42", "FAKE_JOB_STATE": "COMPLETING"},
                                 send=signal.SIGUSR1)
    assert rc == 75 and calls == [], out
    assert "NOT requeueing: the job is COMPLETING (SLURM is ending it" in out


def test_library_takes_recipe_and_overrides_from_arguments_or_environment(tmp_path):
    show = 'harness_slurm_args "$@"; printf "<%s>" "$recipe" "${overrides[@]}"'
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HARNESS_"))}
    env.update(SLURM_JOB_ID="42", SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID="3")

    def run(*args, **extra):
        return subprocess.run(["bash", "-c", f"source {LIB}; {show}", "job", *args], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=30)

    # %a, %A, %j are expanded inside the job, so each array task gets its own run folder and seed.
    proc = run("r.yaml", "run.output_dir=runs/s-%A_%a", "run.seed=%a", "x.y=%j")
    assert proc.stdout == "<r.yaml><run.output_dir=runs/s-41_3><run.seed=3><x.y=42>", proc
    proc = run(HARNESS_RECIPE="e.yaml", HARNESS_OVERRIDES="a=1  b=%a")
    assert proc.stdout == "<e.yaml><a=1><b=3>", proc
    proc = run()
    assert proc.returncode == 2 and "usage: sbatch SCRIPT RECIPE" in proc.stdout, proc
