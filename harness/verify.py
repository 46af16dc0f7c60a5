"""``harness verify-resume``: prove on your own recipe that a SIGKILL and a resume change nothing.

Three short runs of the same recipe, each in its own folder under the work folder:

1. ``uninterrupted``: ``harness train`` straight through ``--steps`` optimizer steps.
2. ``interrupted``: the same command, stopped at a fixed step after a mid-epoch checkpoint and
   killed with SIGKILL (the launcher and every rank) -- no handler runs, nothing is saved;
3. then the same command again in that folder, which resumes from the newest checkpoint.

Then the final weights are compared bitwise and every logged series (LR, losses, metrics) point by
point; the first difference is reported.

Why the interrupted run pauses itself instead of being killed "when the checkpoint appears": a
small recipe runs hundreds of steps per second, so a watcher racing the trainer would kill it at
a different step each time, or after it finished. Run 2 is therefore started through this module
(``python -m harness.verify_child --pause-at-step K ...``), whose hook before each step (harness.faults): after
step K every rank writes its pending LR points and flushes TensorBoard -- the worst case for a
crash: points past the checkpoint are on disk and the resumed run must purge them -- writes a
ready file and sleeps. The parent then freezes (SIGSTOP) and SIGKILLs the whole process tree. The
resumed run (3) is a plain ``harness train``.

``--break KEY=VALUE`` applies an override to the resumed run only, so the runs really differ: a
self-test that verify-resume sees a difference (``--break run.seed=1`` reorders the rest of the
interrupted epoch, like a data order that is not reproducible across restarts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from harness.config import ConfigError, load_config
from harness.inspection import plan_run, read_run_scalars

# Series that are not a function of the training itself.
IGNORED_TAG_PREFIXES = ("perf/",)
PAUSE_LIMIT_S = 600
EXIT_NEVER_KILLED = 70  # a paused run that no parent killed (EX_SOFTWARE)
DEFAULT_LAUNCH_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_2proc.yaml"


# --------------------------------------------------------------------------------------------
# Where to checkpoint and where to kill
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interruption:
    steps: int  # the length of every run (train.max_steps)
    steps_per_epoch: int
    checkpoint_every: int  # checkpoint.every_steps; epoch-end checkpoints are switched off
    kill_at: int  # SIGKILL after this optimizer step

    @property
    def resume_step(self) -> int:
        """The newest checkpoint committed before the kill: the one the resume takes."""
        return (self.kill_at // self.checkpoint_every) * self.checkpoint_every

    def describe(self) -> str:
        position = self.resume_step % self.steps_per_epoch
        where = (f"{position} steps into epoch {self.resume_step // self.steps_per_epoch + 1}" if position
                 else "an epoch end")
        return (f"{self.steps} steps ({self.steps_per_epoch} per epoch), checkpoint every {self.checkpoint_every} "
                f"steps, SIGKILL after step {self.kill_at}: resumes from step {self.resume_step} ({where})")


def plan_interruption(steps_per_epoch: int, planned_steps: int, steps: Optional[int] = None,
                      checkpoint_every: Optional[int] = None, kill_at: Optional[int] = None) -> Interruption:
    """Defaults: about three epochs (at least 20 steps), a checkpoint a third into the epoch that
    holds the middle of the run, and the kill a few steps later, before that epoch ends: the
    resume starts mid-epoch and redoes steps the killed process had already logged."""
    spe = steps_per_epoch
    if steps is None:
        steps = min(planned_steps, max(3 * spe, 20))
    if steps < 2:
        raise ConfigError(f"--steps: got {steps}, need at least 2 optimizer steps to interrupt a run")
    if steps > planned_steps:
        raise ConfigError(f"--steps: got {steps}, the recipe plans only {planned_steps} steps")
    if checkpoint_every is None:
        if kill_at is not None:
            checkpoint_every = max(1, kill_at - max(1, kill_at // 4))
        elif spe >= 3:
            epoch_start = (steps // 2 // spe) * spe
            checkpoint_every = min(epoch_start + max(1, spe // 3), steps - 1)
        else:
            checkpoint_every = max(1, steps // 2)
    if kill_at is None:
        c = checkpoint_every
        if spe >= 3:
            # Inside the epoch that holds the checkpoint (its last step included): the resume then
            # starts mid-epoch and redoes steps the killed process had logged.
            last_step_of_epoch = (c // spe + 1) * spe if c % spe else c + spe
            kill_at = min(c + max(1, spe // 3), last_step_of_epoch)
        else:
            kill_at = c + max(1, steps // 4)
        # Within the run, and before the next checkpoint (2c), so the resume point is c.
        kill_at = max(c, min(kill_at, steps - 1, 2 * c - 1))
    if not 1 <= checkpoint_every <= kill_at < steps:
        raise ConfigError(f"need 1 <= --checkpoint-every ({checkpoint_every}) <= --kill-at ({kill_at}) < "
                          f"--steps ({steps}): the kill must come after a checkpoint and before the run's last step")
    return Interruption(steps, spe, checkpoint_every, kill_at)


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(nproc: int, launch_config: Path) -> list[str]:
    """``python`` for one process; ``accelerate launch --config_file ... --num_processes N`` else."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
            "--num_processes", str(nproc), "--main_process_port", str(_free_port())]


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the logs are read back, also after a SIGKILL
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


def run_to_end(command: list[str], log: Path, timeout: float) -> int:
    """Run to completion; on a timeout or Ctrl-C, kill the whole tree (ranks included). -1: timed out."""
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(),
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            handle.write(f"\n[verify-resume] killed after the --timeout of {timeout:g} s\n")
            return -1
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


def proc_stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every live process, from /proc/<pid>/stat."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        yield int(entry.name), state, int(ppid), int(pgrp)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc. torchrun/accelerate start each rank in its own
    session, so killing the launcher's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for pid, _, ppid, _ in proc_stats():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGSTOP every process first so none reacts (no launcher tears the ranks down gracefully),
    then SIGKILL them all."""
    tree = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass


def run_and_kill(command: list[str], log: Path, ready_dir: Path, nproc: int, timeout: float) -> tuple[bool, int]:
    """Start the paused-training command, SIGKILL its process tree once every rank reports ready.
    Returns (killed, exit code)."""
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(),
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if len(list(ready_dir.glob("rank-*"))) >= nproc:
                    kill_tree(proc.pid)
                    return True, proc.wait()
                if proc.poll() is not None:
                    return False, proc.returncode
                time.sleep(0.02)
            kill_tree(proc.pid)
            return False, proc.wait()
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    what: str
    checked: str  # what was compared, for the report
    difference: Optional[str] = None  # the first difference, None when equal
    step: Optional[int] = None  # the optimizer step of a series' first difference


def compare_weights(reference: Path, other: Path) -> Comparison:
    from safetensors.torch import load_file

    for path in (reference, other):
        if not path.is_file():
            return Comparison("final weights", "", f"{path}: missing (the run did not finish)")
    a, b = load_file(str(reference)), load_file(str(other))
    if a.keys() != b.keys():
        return Comparison("final weights", "", f"tensor names differ: only uninterrupted {sorted(a.keys() - b.keys())}, "
                                               f"only resumed {sorted(b.keys() - a.keys())}")
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return Comparison("final weights", "", f"tensor {name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        # Bitwise: torch.equal would call -0.0 and 0.0 equal and NaN unequal to itself.
        if not torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            diff = (x.double() - y.double()).abs().max().item()
            return Comparison("final weights", "", f"tensor {name}: max abs diff {diff:.6g}")
    numel = sum(t.numel() for t in a.values())
    return Comparison("final weights", f"{len(a)} tensors, {numel:,} values, bitwise equal")


def compare_series(what: str, tags: list[str], reference: dict, other: dict) -> Comparison:
    """Point by point; the first difference is the earliest step over all ``tags``."""
    first: Optional[tuple[int, str, str]] = None
    points = 0
    for tag in tags:
        a, b = dict(reference.get(tag, [])), dict(other.get(tag, []))
        points += len(a)
        for step in sorted(a.keys() | b.keys()):
            if step in a and step in b and a[step] == b[step]:
                continue
            if step not in b:
                detail = f"{tag} at step {step}: uninterrupted {a[step]!r}, resumed has no point"
            elif step not in a:
                detail = f"{tag} at step {step}: uninterrupted has no point, resumed {b[step]!r}"
            else:
                detail = f"{tag} at step {step}: uninterrupted {a[step]!r}, resumed {b[step]!r}"
            if first is None or (step, tag) < first[:2]:
                first = (step, tag, detail)
            break
    checked = f"{', '.join(tags)}: {points} points, equal" if tags else "nothing logged"
    return Comparison(what, checked, first[2] if first else None, first[0] if first else None)


def compare_runs(reference_dir: Path, resumed_dir: Path) -> list[Comparison]:
    a, b = read_run_scalars(reference_dir), read_run_scalars(resumed_dir)
    tags = sorted(t for t in a.keys() | b.keys() if not t.startswith(IGNORED_TAG_PREFIXES))
    lr_tags = [t for t in tags if t.startswith(("lr/", "lr_epoch/"))]
    loss_tags = [t for t in tags if t.endswith(("/loss", "/loss_epoch"))]
    other_tags = [t for t in tags if t not in lr_tags and t not in loss_tags]
    return [compare_weights(reference_dir / "final" / "model.safetensors", resumed_dir / "final" / "model.safetensors"),
            compare_series("LR series", lr_tags, a, b),
            compare_series("loss series", loss_tags, a, b),
            compare_series("other series", other_tags, a, b)]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class VerifyOptions:
    recipe: str
    overrides: list[str]
    steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    kill_at: Optional[int] = None
    nproc: int = 1
    launch_config: Path = DEFAULT_LAUNCH_CONFIG
    workdir: Optional[Path] = None
    keep: bool = False
    break_overrides: list[str] = field(default_factory=list)
    timeout: float = 900.0


def _say(text: str) -> None:
    print(text, flush=True)


def verify_resume(opts: VerifyOptions) -> bool:
    """Runs the three runs and compares them; True when identical. ConfigError for unusable input."""

    if opts.nproc < 1:
        raise ConfigError(f"--nproc: got {opts.nproc}, expected an integer >= 1")
    if opts.nproc > 1 and not Path(opts.launch_config).is_file():
        raise ConfigError(f"--launch-config: {opts.launch_config}: no such accelerate config file")
    cfg = load_config(opts.recipe, opts.overrides)
    try:
        load_config(opts.recipe, [*opts.overrides, *opts.break_overrides])  # a typo in --break fails now
    except ConfigError as exc:
        raise ConfigError(f"--break {' '.join(opts.break_overrides)}: {exc}") from None
    plan = plan_run(opts.recipe, cfg, opts.nproc, preview=False)
    planned = plan.stop_step
    interruption = plan_interruption(plan.steps_per_epoch, planned, opts.steps, opts.checkpoint_every, opts.kill_at)

    temporary = opts.workdir is None
    work = Path(tempfile.mkdtemp(prefix="harness-verify-resume-")) if temporary else Path(opts.workdir)
    if work.exists() and any(work.iterdir()):
        raise ConfigError(f"--workdir: {work} is not empty; give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    shared = [*opts.overrides, f"train.max_steps={interruption.steps}",
              f"checkpoint.every_steps={interruption.checkpoint_every}",
              # Only the step checkpoints: the resume point is then known in advance.
              "checkpoint.every_epochs=null", "run.resume=auto"]
    straight, interrupted, ready = work / "uninterrupted", work / "interrupted", work / "ready"
    ready.mkdir()
    prefix = launch_prefix(opts.nproc, Path(opts.launch_config))
    train = [*prefix, "-m", "harness", "train", opts.recipe]

    _say(f"verify-resume {opts.recipe} on {opts.nproc} process(es): {interruption.describe()}")
    _say(f"work folder {work}")
    started = time.perf_counter()
    _say("[1/3] uninterrupted run ...")
    code = run_to_end([*train, *shared, f"run.output_dir={straight}"], work / "uninterrupted.log", opts.timeout)
    if code != 0:
        _say(f"FAIL: the uninterrupted run exited with {code}; log {work / 'uninterrupted.log'}:\n"
             f"{_tail(work / 'uninterrupted.log')}")
        return False
    _say(f"      done in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    _say(f"[2/3] interrupted run: SIGKILL after step {interruption.kill_at} ...")
    paused = [*prefix, "-m", "harness.verify_child", "--pause-at-step", str(interruption.kill_at), "--ready-dir",
              str(ready), opts.recipe, *shared, f"run.output_dir={interrupted}"]
    killed, code = run_and_kill(paused, work / "interrupted.log", ready, opts.nproc, opts.timeout)
    if not killed:
        _say(f"FAIL: the interrupted run ended by itself (exit {code}) before reaching step {interruption.kill_at}; "
             f"log {work / 'interrupted.log'}:\n{_tail(work / 'interrupted.log')}")
        return False
    committed = sorted(p.name for p in (interrupted / "checkpoints").glob("step-*"))
    _say(f"      killed (exit {code}) after {time.perf_counter() - started:.1f} s; checkpoints on disk: "
         f"{', '.join(committed) or 'none'}")

    started = time.perf_counter()
    broken = f" with --break {' '.join(opts.break_overrides)}" if opts.break_overrides else ""
    _say(f"[3/3] resumed run (the same command again{broken}) ...")
    log = work / "resumed.log"
    code = run_to_end([*train, *shared, f"run.output_dir={interrupted}", *opts.break_overrides], log, opts.timeout)
    resumed_line = next((line for line in log.read_text(errors="replace").splitlines() if "resumed from" in line), None)
    if code != 0:
        _say(f"FAIL: the resumed run exited with {code}; log {log}:\n{_tail(log)}")
        return False
    if resumed_line is None:
        _say(f"FAIL: the second run did not resume from a checkpoint; log {log}")
        return False
    _say(f"      {resumed_line.strip().removeprefix('[harness] ')} ({time.perf_counter() - started:.1f} s)")

    results = compare_runs(straight, interrupted)
    for result in results:
        if result.difference is None:
            _say(f"{result.what}: {result.checked}")
        else:
            _say(f"{result.what}: first difference: {result.difference}")
    failed = [r for r in results if r.difference is not None]
    if failed:
        # The earliest logged difference says where the runs parted; the weights only that they did.
        series = sorted((r for r in failed if r.step is not None), key=lambda r: r.step)
        first = series[0] if series else failed[0]
        _say(f"FAIL: the killed-and-resumed run differs from the uninterrupted one; first difference: "
             f"{first.what}: {first.difference}. Runs kept in {work}")
        return False
    _say("PASS: the killed-and-resumed run matches the uninterrupted one (weights bitwise, every series)")
    if temporary and not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        _say(f"runs kept in {work}")
    return True
