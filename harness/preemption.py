"""Graceful stop on a signal, a Ctrl-C or the launcher's death: the loop acts at a safe point.

SLURM (``--signal=B:USR1@N``, ``scancel -s ...``), torchrun (forwards TERM/INT/HUP/QUIT to workers,
SIGKILLs them 30 s later) and Kubernetes all warn with a signal. Saving inside a handler could run
in the middle of an optimizer step, so the handler only sets a flag; the loop checks it at every
optimizer-step boundary and inside long validations, the ranks agree with one collective (any
rank asked = all stop), a checkpoint is saved, and the process exits with EXIT_PREEMPTED.

Two more requests take the same path:

* Ctrl-C (SIGINT): saves and exits with EXIT_INTERRUPTED; a second Ctrl-C aborts at once.
  torchrun and ``accelerate launch`` forward the terminal's SIGINT to every worker.
* The launcher's death: torchrun starts each worker in its own session, so a SIGKILLed launcher
  (OOM killer, watchdog, ``kill -9``) leaves its workers training on, racing a relaunch for the
  run folder. A thread notices that our parent changed and asks for a stop like a signal would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from harness.config import PreemptionConfig
from harness.distributed import any_rank, exit_now, flush_output

logger = logging.getLogger("harness")

# "Saved a checkpoint because of a signal; requeue me." (EX_TEMPFAIL from sysexits.h)
EXIT_PREEMPTED = 75
# Stopped by Ctrl-C: 128 + SIGINT, what a shell reports for a process that Ctrl-C ended.
EXIT_INTERRUPTED = 130
MARKER = "PREEMPTED.json"
# check_every_steps: auto never waits longer than this many steps between two agreements.
MAX_STEPS_BETWEEN_CHECKS = 1000
# What ``requested`` holds when the launcher went away (not a signal: no PREEMPTED.json, no requeue).
LAUNCHER_EXITED = "launcher exited"
# How often the watch thread looks for a new parent (the launcher died, we were reparented).
PARENT_POLL_S = 0.2
# A worker whose launcher died is still alive this long after (a peer rank hung inside a
# collective, or a save that cannot finish): it exits without a checkpoint. torchrun's own
# SIGTERM-to-SIGKILL window is the same 30 s.
LAUNCHER_EXIT_DEADLINE_S = 30.0


class Preempted(Exception):
    """Raised after the preemption checkpoint is committed, to unwind to the CLI.
    ``interrupted``: the stop was a Ctrl-C (exit EXIT_INTERRUPTED instead of EXIT_PREEMPTED)."""

    def __init__(self, signal_name: str, checkpoint: Path, interrupted: bool = False):
        super().__init__(f"stopped on {signal_name}; checkpoint {checkpoint}")
        self.signal_name, self.checkpoint, self.interrupted = signal_name, checkpoint, interrupted


class PreemptionWatcher:
    """Records stop requests (signals, Ctrl-C, the launcher's death) for the loop to act on.

    ``launcher_pid``: our parent when it is torchrun / ``accelerate launch`` (see
    harness.distributed.launcher_pid), watched from a thread; None for a shell or nohup, whose
    going away must not stop a run.
    """

    def __init__(self, cfg: PreemptionConfig, launcher_pid: Optional[int] = None):
        self.cfg = cfg
        self.launcher_pid = launcher_pid
        self.requested: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous = {}
        self._pending = None  # (work, tensor) of the in-flight non-blocking agreement
        self._next_check_step: Optional[int] = None  # agreed by all ranks (check_every_steps: auto)
        self._last_poll: Optional[tuple[int, float]] = None  # rank 0: (step, time) of its last poll
        # Ctrl-C: counted by the watch thread, which aborts at the second one even while the main
        # thread is stuck inside a collective (where a Python-level handler would never run).
        # Listed in preemption.signals, SIGINT is a plain preemption signal instead.
        self._handle_interrupt = "SIGINT" not in cfg.signals
        self._graceful_interrupt = getattr(cfg, "graceful_interrupt", True)
        self._interrupts = 0
        self._saved = False  # the stop checkpoint is committed (ignore_further was called)
        self._launcher_exited_at: Optional[float] = None
        self._wakeup: Optional[tuple[int, int, int]] = None  # (read fd, write fd, previous wakeup fd)
        self._stop_watching = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def install(self) -> "PreemptionWatcher":
        # Started with SIGINT ignored (`cmd &` in a script), we stay deaf to it, as Python itself does.
        self._handle_interrupt = self._handle_interrupt and signal.getsignal(signal.SIGINT) != signal.SIG_IGN
        if self._handle_interrupt:
            # The C-level handler writes the signal number to this pipe the moment SIGINT arrives.
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            try:
                previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            except ValueError:  # not the main thread: signal.signal below says so too
                os.close(read_fd)
                os.close(write_fd)
                raise
            self._wakeup = (read_fd, write_fd, previous)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        for name in self.cfg.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if self._wakeup is not None or self.launcher_pid is not None:
            self._thread = threading.Thread(target=self._watch, name="harness-watch", daemon=True)
            self._thread.start()
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._stop_thread()

    def ignore_further(self) -> None:
        """After the stop checkpoint: SIG_IGN for the preemption signals (kept by Python's
        teardown, unlike a handler). Ctrl-C keeps its handler and the watch thread, so a second
        one still aborts a slow teardown. Under a launcher, SIGTERM is ignored too when it is not
        one of the preemption signals: the first rank to exit makes the launcher SIGTERM the
        others, and a rank still unwinding would end with -15 instead of the exit code its saved
        stop earned."""
        self._saved = True
        for signum in self._previous:
            if signum != signal.SIGINT or not self._handle_interrupt:
                signal.signal(signum, signal.SIG_IGN)
        if self.launcher_pid is not None and signal.SIGTERM not in self._previous:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to ignore there
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._previous = {signum: h for signum, h in self._previous.items()
                          if signum == signal.SIGINT and self._handle_interrupt}

    def _stop_thread(self) -> None:
        self._stop_watching.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * PARENT_POLL_S)
            self._thread = None
        if self._wakeup is not None:
            read_fd, write_fd, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            self._wakeup = None

    def _on_signal(self, signum, frame) -> None:
        # Record only. A second signal while saving lands here too and changes nothing.
        self._record(signal.Signals(signum).name)

    def _on_interrupt(self, signum, frame) -> None:
        # Record only; the watch thread counts Ctrl-Cs and aborts on the one that means "now".
        if self._graceful_interrupt:
            self._record("SIGINT")

    def _record(self, name: str) -> None:
        if self.requested is None:
            self.requested = name
            self.received_at = time.monotonic()

    def _watch(self) -> None:
        """The watch thread: Ctrl-Cs (from the wakeup pipe) and the launcher's death (our parent
        pid changes when it dies: we are reparented)."""
        read_fd = self._wakeup[0] if self._wakeup is not None else None
        while not self._stop_watching.is_set():
            if read_fd is None:
                self._stop_watching.wait(PARENT_POLL_S)
            else:
                try:
                    readable = select.select([read_fd], [], [], PARENT_POLL_S)[0]
                    received = os.read(read_fd, 64) if readable else b""
                except OSError:  # closed by uninstall
                    return
                for signum in received:
                    if signum == signal.SIGINT:
                        self._count_interrupt()
                    elif signum == signal.SIGTERM and self._interrupts and self.launcher_pid is not None:
                        # torchrun's agent, interrupted again while it waits for its workers to
                        # stop, SIGTERMs them: that is how a second Ctrl-C reaches a worker.
                        self._abort("aborted by a second Ctrl-C (the launcher's SIGTERM)")
            if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
                self._on_launcher_exit()

    def _count_interrupt(self) -> None:
        self._interrupts += 1
        if self._saved:
            self._abort("interrupted by Ctrl-C (the checkpoint is saved)")
        elif not self._graceful_interrupt:
            self._abort("aborted by Ctrl-C without a checkpoint (preemption.graceful_interrupt is false)")
        elif self._interrupts == 1:
            logger.info("Ctrl-C: saving a checkpoint at the next step, then exiting "
                        "(Ctrl-C again to abort without saving)")
        else:
            self._abort("aborted by a second Ctrl-C")

    def _abort(self, message: str) -> None:
        self._exit_now(EXIT_INTERRUPTED, message)

    def _on_launcher_exit(self) -> None:
        now = time.monotonic()
        if self._launcher_exited_at is None:
            self._launcher_exited_at = now
            self._record(LAUNCHER_EXITED)
        elif now - self._launcher_exited_at > LAUNCHER_EXIT_DEADLINE_S:
            self._exit_now(1, f"the launcher (pid {self.launcher_pid}) exited "
                           f"{LAUNCHER_EXIT_DEADLINE_S:.0f} s ago and this rank could not stop at a step "
                           "boundary (another rank is gone or hung): exiting without a checkpoint")

    @staticmethod
    def _exit_now(code: int, message: str) -> None:
        """Exit from the watch thread, whatever the main thread is doing (a save in flight stays a
        .tmp folder, which a resume skips)."""
        flush_output()  # what the main thread printed comes before the message
        try:
            print(f"harness: {message}", file=sys.stderr, flush=True)
        finally:
            exit_now(code)

    @property
    def interrupted(self) -> bool:
        """The stop was asked for by Ctrl-C (not by SIGINT listed as a preemption signal)."""
        return self.requested == "SIGINT" and self._handle_interrupt

    def announce_stop(self, is_main: bool, step: int) -> None:
        """Before the stop checkpoint: say why, when the reason is not a signal the user sent."""
        if is_main and self.requested == LAUNCHER_EXITED:
            logger.warning("launcher (pid %d) exited: saving a checkpoint at step %d and exiting",
                           self.launcher_pid, step)

    def report_stop(self, run_dir: Path, checkpoint: Path, step: int) -> None:
        """Main rank, after the stop checkpoint is committed: the marker for batch scripts (for a
        signal) and the line that says how to go on."""
        if self.requested == LAUNCHER_EXITED:
            # Not a request to requeue (the launcher may have been OOM-killed): no marker.
            logger.warning("saved %s; exiting (run the same command again to resume)", checkpoint)
            return
        name = self.requested or "a signal to another rank"
        write_marker(run_dir, name, checkpoint, step, self.received_at,
                     EXIT_INTERRUPTED if self.interrupted else EXIT_PREEMPTED)
        if self.interrupted:
            logger.warning("interrupted (Ctrl-C): saved %s at step %d; exiting with code %d. "
                           "Run the same command again to resume", checkpoint, step, EXIT_INTERRUPTED)
        else:
            logger.warning("preempted by %s: saved %s; exiting with code %d (requeue to resume)",
                           name, checkpoint, EXIT_PREEMPTED)

    def due(self, step: int) -> bool:
        """Whether the loop polls after this optimizer step; the same answer on every rank."""
        every = self.cfg.check_every_steps
        if every != "auto":
            return step % every == 0
        return self._next_check_step is None or step >= self._next_check_step

    def poll(self, accelerator, step: int) -> bool:
        """Non-blocking agreement at an optimizer-step boundary: starts an all-reduce of this
        rank's flag and reads the one started at the previous poll. Every rank gets the same
        answer at the same step, one poll late, without waiting on a collective in the hot loop.

        With ``check_every_steps: auto`` the same all-reduce carries rank 0's proposal for the
        number of steps until the next poll (``check_interval_s`` over its measured step time),
        so the ranks agree on when to poll next without another collective: every ~0.2 s on
        2 ms steps is every ~100 steps, on 2 s steps every step."""
        if accelerator.num_processes == 1:
            self._next_check_step = step + 1
            return self.requested is not None
        import torch
        import torch.distributed as dist

        agreed, interval = False, 1
        if self._pending is not None:
            work, result = self._pending
            work.wait()
            agreed, interval = bool(result[0].item() > 0), max(1, int(result[1].item()))
        self._next_check_step = step + interval
        proposal = self._propose_interval(step) if accelerator.is_main_process else 0.0
        result = torch.tensor([1.0 if self.requested is not None else 0.0, proposal], device=accelerator.device)
        self._pending = (dist.all_reduce(result, async_op=True), result)
        return agreed

    def _propose_interval(self, step: int) -> float:
        now = time.monotonic()
        last, self._last_poll = self._last_poll, (step, now)
        if self.cfg.check_every_steps != "auto" or last is None or step <= last[0]:
            return 1.0
        seconds_per_step = (now - last[1]) / (step - last[0])
        return float(min(MAX_STEPS_BETWEEN_CHECKS, max(1, round(self.cfg.check_interval_s / max(seconds_per_step, 1e-9)))))

    def drain(self) -> None:
        """Finish the in-flight agreement before other collectives (all ranks call this together)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def should_stop(self, accelerator) -> bool:
        """All ranks call this at the same point; True everywhere if any rank got a signal."""

        return any_rank(accelerator, self.requested is not None)


def write_marker(run_dir: Path, signal_name: str, checkpoint: Path, step: int, received_at: Optional[float],
                 exit_code: int) -> None:
    """Tells a batch script (which cannot rely on the launcher's exit code: torchrun and accelerate
    launch report their own) that we saved on a signal, and the code every rank exits with."""
    payload = {"signal": signal_name, "exit_code": exit_code, "checkpoint": str(checkpoint), "step": step,
               "time": time.time(),
               "seconds_from_signal_to_saved": None if received_at is None else time.monotonic() - received_at}
    (Path(run_dir) / MARKER).write_text(json.dumps(payload, indent=2) + "\n")


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
