"""The interrupted run of ``harness verify-resume`` (harness/verify.py): ``harness train`` that,
once step K is wholly done, puts everything logged so far on disk, says so in a file and waits
for its parent's SIGKILL."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

from harness import faults
from harness.cli import end_process, main
from harness.trainer import flush_step_logs
from harness.verify import EXIT_NEVER_KILLED, PAUSE_LIMIT_S


def install_pause_hook(step: int, ready_dir: Path) -> None:
    """After optimizer step ``step``, put everything logged so far on disk and wait to be killed."""

    def pause_before_the_next_step(trainer) -> None:
        # Step ``step`` is wholly done here: its validation and its checkpoint (committed, also a
        # background one: waited for), and the epoch's end if it was the epoch's last step.
        if trainer.state.step == step:
            trainer.store.wait_for_background(trainer.accelerator)
            flush_step_logs(trainer, close_window=False)  # LR points past the checkpoint: on disk
            trainer.trackers.flush()
            rank = trainer.accelerator.process_index
            (Path(ready_dir) / f"rank-{rank}").write_text(f"{os.getpid()} {step}\n")
            # Wait for the parent's SIGKILL; give up after a while, so a parent that died itself
            # does not leave ranks sleeping forever.
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while time.monotonic() < deadline:
                time.sleep(1)
            os._exit(EXIT_NEVER_KILLED)

    faults.before_each_step(pause_before_the_next_step)


def paused_training_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.verify_child",
                                     description="harness train, pausing after one step (used by verify-resume)")
    parser.add_argument("--pause-at-step", type=int, required=True)
    parser.add_argument("--ready-dir", type=Path, required=True)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    install_pause_hook(args.pause_at_step, args.ready_dir)
    return main(["train", args.recipe, *args.overrides])


if __name__ == "__main__":
    end_process(paused_training_main())
