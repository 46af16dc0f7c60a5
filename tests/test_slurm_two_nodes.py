"""slurm/multi_node.sbatch and slurm/multi_node_per_task.sbatch submitted for real with --nodes 2,
to a two-node SLURM cluster on this machine: scripts/slurm_local.sh with HARNESS_SLURM_NODES=2
(node1 and node2, each slurmd in a network namespace of its own with its own host name, joined to
slurmctld by a bridge; a job's processes on a node run inside that node's namespace, so the ranks
of the two nodes talk over the bridge as over a network).

Each script trains 2 ranks, one per node (CPU ranks: `--gres=none` and HARNESS_PROCS_PER_NODE=1 /
the CPU launch config for multi_node.sbatch), is preempted with `scancel -s USR1 -b` after its
first checkpoint, requeues itself, resumes and finishes, with the final weights bitwise those of
an uninterrupted 2-rank run. Both jobs run at once. Needs root (network namespaces); skipped with
the reason where the cluster cannot be started, failed under CI=true.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_same_weights, run_harness, subprocess_env
from tests.slurm_jobs import job_info, pick_ports, read_output

pytestmark = pytest.mark.slurm

SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
RECIPE = "recipes/breast_cancer_mlp.yaml"
EPOCHS = 60
STEPS = EPOCHS * 15
OVERRIDES = [f"train.epochs={EPOCHS}", "train.log_every_steps=15"]
TIMEOUT_S = 300
# What a user of CPU-only nodes passes; the scripts' GPU lines are overridden on the command line.
CPU_OPTIONS = {
    "multi_node.sbatch": ["--nodes=2", "--gres=none", "--cpus-per-task=1",
                          "--export=ALL,HARNESS_PROCS_PER_NODE=1,HARNESS_LAUNCH_CONFIG=recipes/accelerate/cpu_2proc.yaml"],
    "multi_node_per_task.sbatch": ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1"],
}


@pytest.fixture(scope="module")
def cluster():
    folder = tempfile.mkdtemp(prefix="hs2-", dir="/tmp")
    env = subprocess_env(HARNESS_SLURM_DIR=folder, HARNESS_SLURM_PORT=str(pick_ports()), HARNESS_SLURM_NODES="2",
                         HARNESS_SLURM_CPUS="2", SLURM_CONF=str(Path(folder) / "slurm.conf"))
    for key in ("HARNESS_MAX_REQUEUES", "HARNESS_RECIPE", "HARNESS_OVERRIDES"):
        env.pop(key, None)
    up = subprocess.run(["bash", str(SLURM_LOCAL), "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        reason = f"a two-node SLURM cluster could not be started: {(up.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(reason + "\n" + up.stderr[-4000:], pytrace=False)
        pytest.skip(reason)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "down"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(what: str, predicate, env: dict, job_id: str, out: Path, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        state = job_info(env, job_id).get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            value = predicate()  # it may have come true as the job ended
            if value:
                return value
            pytest.fail(f"job {job_id} ended ({state}) while waiting for {what}\n{read_output(out)[-6000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} of job {job_id}\n{read_output(out)[-6000:]}")


def submit_preempt_finish(env: dict, script: str, folder: Path) -> tuple[dict, str, Path]:
    """Submit ``script`` on 2 nodes, SIGUSR1 its batch shell after the first checkpoint, wait for
    the end: (scontrol's record, the job output, the run folder)."""
    folder.mkdir(parents=True)
    run_dir, out = folder / "run", folder / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--job-name=two-nodes-{script}",
                           *CPU_OPTIONS[script], f"slurm/{script}", RECIPE, f"run.output_dir={run_dir}", *OVERRIDES],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    wait_for("the first checkpoint", lambda: glob.glob(str(run_dir / "checkpoints" / "step-*")), env, job, out)
    subprocess.run(["scancel", "-s", "USR1", "-b", job], env=env, check=True, timeout=60)
    def completed():
        info = job_info(env, job)
        return info if info.get("JobState") == "COMPLETED" else None

    info = wait_for("the end", completed, env, job, out)
    return info, read_output(out), run_dir


def test_both_multi_node_scripts_train_on_two_nodes_are_preempted_requeued_and_finish_bitwise(cluster, tmp_path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        reference_dir = tmp_path / "reference"
        reference = pool.submit(run_harness, RECIPE, [f"run.output_dir={reference_dir}", *OVERRIDES], nproc=2,
                                timeout=600)
        jobs = {script: pool.submit(submit_preempt_finish, cluster, script, tmp_path / script.split(".")[0])
                for script in CPU_OPTIONS}
        reference.result()
        results = {script: future.result() for script, future in jobs.items()}
    for script, (info, text, run_dir) in results.items():
        assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", (script, info, text[-6000:])
        assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", (script, info)
        saved = re.search(r"checkpoint saved on a preemption signal: signal=SIGUSR1 step=(\d+)", text)
        assert saved and 0 < int(saved.group(1)) < STEPS, (script, text[-6000:])
        assert re.search(rf"resumed from \S+step-{int(saved.group(1)):06d}: .* step {saved.group(1)},", text), \
            (script, text[-6000:])
        assert f"done: {EPOCHS} epochs, {STEPS} steps" in text, (script, text[-6000:])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
        assert_same_weights(run_dir, reference_dir)
