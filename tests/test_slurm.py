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

The other tests need no SLURM: every batch script run by bash on a node of stubs (srun, scontrol,
accelerate, python on PATH that record what a real node would be asked to run: each task's command
line and environment, the requeue), the shared shell library against a fake `scontrol` (wait/trap
exit codes, array requeue target, cap), and the #SBATCH lines (read by sbatch, so checked as text).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_same_weights, run_harness, subprocess_env
from tests.slurm_jobs import job_info, pick_ports, read_output

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


class Cluster:
    def __init__(self, env: dict, folder: Path, owned: bool):
        self.env, self.folder, self.owned = env, folder, owned

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        return job_info(self.env, job_id, check=True)

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
        env["HARNESS_SLURM_PORT"] = str(pick_ports())
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
                            f"--- job output\n{read_output(out_file)[-6000:]}")
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- job output\n{read_output(out_file)[-6000:]}")


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


def assert_finished_like(run_dir: Path, reference_dir: Path) -> None:
    """The same final weights, bitwise, and the same step count and final validation loss."""
    assert_same_weights(run_dir, reference_dir)
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
    text = read_output(out)
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
    assert_finished_like(run_dir, reference())


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
    text = read_output(out)
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
    assert_finished_like(run_dir, reference())


def test_requeue_cap_reached_stops_requeueing_says_so_and_the_checkpoint_resumes(cluster, reference, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = dict(cluster.env, HARNESS_MAX_REQUEUES="0")
    overrides = [f"run.output_dir={run_dir}", *OVERRIDES]
    job = cluster.sbatch(out, [RECIPE, *overrides], env=env)
    marker, _ = preempt_after_first_checkpoint(cluster, job, run_dir, out, ["-s", "USR1", "-b", job])

    info = wait_for_end(cluster, job, out, FINISH_TIMEOUT_S)
    text = read_output(out)
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
    assert_finished_like(run_dir, reference())


def test_plain_scancel_ends_the_job_and_no_requeue_brings_it_back(cluster, tmp_path):
    # `scancel JOBID` SIGTERMs the batch shell and every process of the job. The ranks catch
    # SIGTERM and may manage to save before srun SIGKILLs them, but the job must stay cancelled.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(out, [RECIPE, f"run.output_dir={run_dir}", *OVERRIDES])
    wait_for("the first checkpoint", lambda: first_checkpoint(run_dir), START_TIMEOUT_S, out, cluster, job)
    cluster.cmd("scancel", job)
    info = wait_for_end(cluster, job, out, FINISH_TIMEOUT_S)
    text = read_output(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n--- job output\n{text[-6000:]}"
    assert banners(text) == ["unset (first run)"], text[-8000:]
    assert re.search(r"^\[slurm-harness .*\] got SIGTERM: forwarding", text, re.M), text[-6000:]
    assert "requeueing: scontrol requeue" not in text
    ending = [line for line in text.splitlines() if "NOT requeueing" in line or "checkpoint saved" in line]
    print(f"\n[test_slurm] job {job} after plain scancel: {ending or 'batch shell killed before deciding'}")


# --------------------------------------------------------------------------------------------
# Without SLURM: the scripts run on stubs, the shared library against a fake scontrol
# --------------------------------------------------------------------------------------------


def _sbatch_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_batch_script_asks_sbatch_for_a_warning_a_requeue_and_one_log(name):
    """The #SBATCH lines are read by sbatch, not run: the only part of a script checked as text."""
    text = (SLURM_DIR / name).read_text()
    sbatch = _sbatch_lines(text)
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --requeue" in sbatch
    assert "#SBATCH --open-mode=append" in sbatch
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", line) for line in sbatch), sbatch
    assert any(re.fullmatch(r"#SBATCH --time=\S+", line) for line in sbatch), "--signal needs a time limit"
    gpus = [line for line in sbatch if "gres" in line or "gpu" in line]
    assert gpus == ([] if name == "cpu.sbatch" else ["#SBATCH --gres=gpu:4"]), gpus
    proc = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["bash", "-n", str(LIB)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# The batch scripts run for real by bash, on a "node" made of stubs on PATH: `srun` starts each
# task of its step as a real one would (SLURM_PROCID/LOCALID/NODEID set per task, the tasks laid
# out block-wise over the nodes) and passes SIGUSR1 on to them, `scontrol` answers `show hostnames`
# and `show job` and records a requeue, and `accelerate` / `python` (what the step's tasks exec)
# record their arguments, environment and whether SIGUSR1 is ignored. Task 0 then plays the ranks:
# it waits for the SIGUSR1 that the test sends the batch shell (what --signal=B:USR1@N does),
# writes PREEMPTED.json into the run folder the script resolved, and exits 1 as a launcher whose
# ranks exit 75 does; so every run also proves the warning reaches the step and the job requeues
# itself (only its array task). Each stub appends one JSON line to $STUB_LOG. The project folder
# is a copy of slurm/ and recipes/ without a .venv, so the script's `source .venv/bin/activate`
# cannot put the real launchers in front of the stubs; the run folder is resolved by the harness
# itself (HARNESS_PYTHON: this interpreter).
STUB_SRUN = r"""
import json, os, signal, subprocess, sys
args, opts, tasks = sys.argv[1:], {}, []
signal.signal(signal.SIGUSR1, lambda *_: [task.send_signal(signal.SIGUSR1) for task in tasks])  # as srun does
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"cmd": "srun", "opts": opts, "argv": args}) + "\n")
nodes = int(opts.get("nodes", os.environ.get("SLURM_NNODES", "1")))
per_node = int(opts.get("ntasks-per-node", os.environ.get("SLURM_NTASKS_PER_NODE", "0"))) or None
ntasks = int(opts.get("ntasks", os.environ.get("SLURM_NTASKS", "0"))) or nodes * (per_node or 1)
per_node = per_node or -(-ntasks // nodes)
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NODEID=str(rank // per_node), SLURM_STEP_NUM_TASKS=str(ntasks))
    tasks.append(subprocess.Popen(args, env=env))
codes = [task.wait() for task in tasks]
sys.exit(max(codes, key=abs))
"""
STUB_SCONTROL = r"""
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"cmd": "scontrol", "argv": sys.argv[1:]}) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("node-a\nnode-b")
elif sys.argv[1:3] == ["show", "job"]:
    print(f"JobId={os.environ.get('SLURM_JOB_ID')} JobState=RUNNING")
"""
STUB_LAUNCHED = r"""
import json, os, signal, sys, time
VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID",
        "SLURM_PROCID", "PYTHONUNBUFFERED")
record = {"cmd": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {k: os.environ[k] for k in VARS if k in os.environ},
          "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(record) + "\n")
if os.environ.get("SLURM_PROCID") != "0":
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open(os.environ["STUB_LOG"] + ".ready", "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.01)
run_dir = os.path.join(os.getcwd(), sys.argv[sys.argv.index("train") + 2].split("=", 1)[1])
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "PREEMPTED.json"), "w") as f:
    json.dump({"signal": "SIGUSR1", "exit_code": 75, "checkpoint": run_dir + "/checkpoints/step-000007", "step": 7},
              f, indent=2)
sys.exit(1)
"""


def start_batch_script(tmp_path: Path, name: str, slurm_env: dict):
    """``bash slurm/NAME recipes/breast_cancer_mlp.yaml run.output_dir=runs/stubbed train.epochs=%a``
    on the stub node; ``finish_batch_script`` sends the warning and collects what happened."""
    project, bin_dir, log = tmp_path / "project", tmp_path / "bin", tmp_path / "stubs.jsonl"
    shutil.copytree(SLURM_DIR, project / "slurm")
    shutil.copytree(ROOT / "recipes", project / "recipes")
    bin_dir.mkdir()
    for stub, source in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("accelerate", STUB_LAUNCHED),
                         ("python", STUB_LAUNCHED)):
        (bin_dir / stub).write_text(f"#!{sys.executable}\n{source}")
        (bin_dir / stub).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HARNESS_", "CUDA_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HARNESS_PROJECT_DIR=str(project), HARNESS_PYTHON=sys.executable,
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", STUB_LOG=str(log), **slurm_env)
    cmd = ["bash", str(project / "slurm" / name), "recipes/breast_cancer_mlp.yaml", "run.output_dir=runs/stubbed",
           "train.epochs=%a"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def finish_batch_script(proc: subprocess.Popen, log: Path):
    """SIGUSR1 to the batch shell once the step's task 0 runs; (exit code, output, the stubs' records
    in order)."""
    deadline = time.monotonic() + 120
    while not Path(f"{log}.ready").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the step's task 0 never started"
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, out, records


JOB = {"SLURM_JOB_ID": "123456", "SLURM_ARRAY_JOB_ID": "123450", "SLURM_ARRAY_TASK_ID": "3",
       "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "32"}
PORT = "23456"  # 20000 + job id % 10000: the same on every node and across requeues
# What every rank is asked to train: the arguments given to sbatch, %a expanded to the array task.
TRAIN = ["-m", "harness", "train", "recipes/breast_cancer_mlp.yaml", "run.output_dir=runs/stubbed", "train.epochs=3"]
STUB_CASES = {
    "cpu": ("cpu.sbatch", dict(JOB, SLURM_CPUS_PER_TASK="2", SLURM_NNODES="1")),
    "single 4": ("single_node.sbatch", dict(JOB, SLURM_NNODES="1", SLURM_GPUS_ON_NODE="4")),
    "single 2": ("single_node.sbatch", dict(JOB, SLURM_NNODES="1", CUDA_VISIBLE_DEVICES="0,1")),
    "single none": ("single_node.sbatch", dict(JOB, SLURM_NNODES="1")),
    "multi ddp": ("multi_node.sbatch", dict(JOB, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")),
    "multi fsdp": ("multi_node.sbatch", dict(JOB, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
                                             HARNESS_LAUNCH_CONFIG="recipes/accelerate/fsdp_gpu.yaml")),
    "per task": ("multi_node_per_task.sbatch", dict(JOB, SLURM_NNODES="2", SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4",
                                                    SLURM_CPUS_PER_TASK="8")),
}


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory) -> dict:
    """Every case of STUB_CASES run at once (each mostly waits for Python to start: side by side
    they take a third of the time): case -> (exit code, output, records)."""
    started = {case: start_batch_script(tmp_path_factory.mktemp("stubbed"), name, env)
               for case, (name, env) in STUB_CASES.items()}
    return {case: finish_batch_script(*run) for case, run in started.items()}


def launched(records: list[dict]) -> list[dict]:
    """What the step's tasks exec'd (the launchers or the ranks), in task order."""
    tasks = [r for r in records if r["cmd"] in ("accelerate", "python")]
    return sorted(tasks, key=lambda r: int(r["env"]["SLURM_PROCID"]))


def srun_options(records: list[dict]) -> dict:
    (srun,) = [r for r in records if r["cmd"] == "srun"]
    return srun["opts"]


def assert_preempted_and_requeued(rc: int, out: str, records: list[dict]) -> None:
    assert rc == 0, out
    lines_in_order(out, [r"got SIGUSR1: forwarding SIGUSR1 to the launcher",
                         r"checkpoint saved on a preemption signal: signal=SIGUSR1 step=7",
                         r"requeueing: scontrol requeue 123450_3 \(restart 1 of at most 3\)"])
    requeues = [r["argv"] for r in records if r["cmd"] == "scontrol" and r["argv"][0] == "requeue"]
    assert requeues == [["requeue", "123450_3"]], (requeues, out)


def test_cpu_script_runs_one_accelerate_launch_of_two_cpu_ranks(stubbed):
    rc, out, records = stubbed["cpu"]
    assert srun_options(records) == {"ntasks": "1", "cpus-per-task": "2", "kill-on-bad-exit": "0"}
    (launcher,) = launched(records)
    assert launcher["cmd"] == "accelerate" and launcher["usr1_ignored"], launcher
    assert launcher["argv"] == ["launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml", "--num_processes", "2",
                                "--main_process_port", PORT, *TRAIN]
    assert launcher["cwd"].endswith("/project")
    assert_preempted_and_requeued(rc, out, records)


@pytest.mark.parametrize("case, gpus", [("single 4", "4"), ("single 2", "2"), ("single none", None)])
def test_single_node_script_starts_one_rank_per_allocated_gpu(stubbed, case, gpus):
    rc, out, records = stubbed[case]
    if gpus is None:
        assert rc == 2 and "no GPUs allocated (ask with --gres=gpu:N)" in out and records == [], out
        return
    assert srun_options(records) == {"ntasks": "1", "cpus-per-task": "32", "kill-on-bad-exit": "0"}
    (launcher,) = launched(records)
    assert launcher["cmd"] == "accelerate" and launcher["usr1_ignored"], launcher
    assert launcher["argv"] == ["launch", "--config_file", "recipes/accelerate/gpu_ddp.yaml", "--num_processes", gpus,
                                "--main_process_port", PORT, *TRAIN]
    assert_preempted_and_requeued(rc, out, records)


@pytest.mark.parametrize("case, config", [("multi ddp", "recipes/accelerate/gpu_ddp.yaml"),
                                          ("multi fsdp", "recipes/accelerate/fsdp_gpu.yaml")])
def test_multi_node_script_runs_one_launcher_per_node_with_its_machine_rank(stubbed, case, config):
    rc, out, records = stubbed[case]
    assert ["show", "hostnames", "node-[a-b]"] in [r["argv"] for r in records if r["cmd"] == "scontrol"]
    assert srun_options(records) == {"nodes": "2", "ntasks-per-node": "1", "ntasks": "2", "cpus-per-task": "32",
                                     "kill-on-bad-exit": "0"}
    launchers = launched(records)
    assert [r["env"]["SLURM_NODEID"] for r in launchers] == ["0", "1"]
    assert (ROOT / config).is_file()
    for node, launcher in enumerate(launchers):
        assert launcher["cmd"] == "accelerate" and launcher["usr1_ignored"], launcher
        assert launcher["argv"] == ["launch", "--config_file", config, "--num_machines", "2",
                                    "--machine_rank", str(node), "--num_processes", "8", "--main_process_ip", "node-a",
                                    "--main_process_port", PORT, *TRAIN]
    assert_preempted_and_requeued(rc, out, records)


def test_multi_node_per_task_script_maps_slurm_tasks_to_torch_ranks(stubbed):
    rc, out, records = stubbed["per task"]
    assert srun_options(records) == {"cpus-per-task": "8", "kill-on-bad-exit": "0"}
    ranks = launched(records)
    assert [r["cmd"] for r in ranks] == ["python"] * 8 and all(r["usr1_ignored"] for r in ranks)
    assert all(r["argv"] == TRAIN for r in ranks), ranks[0]["argv"]
    assert [r["env"] for r in ranks] == [
        {"RANK": str(p), "WORLD_SIZE": "8", "LOCAL_RANK": str(p % 4), "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node-a",
         "MASTER_PORT": PORT, "SLURM_NODEID": str(p // 4), "SLURM_PROCID": str(p), "PYTHONUNBUFFERED": "1"}
        for p in range(8)]
    assert_preempted_and_requeued(rc, out, records)


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
