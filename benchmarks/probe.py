"""The harness CLI with a step clock: ``python -m benchmarks.probe train RECIPE [key=value ...]``.

Launched exactly like ``python -m harness`` (``accelerate launch ... -m benchmarks.probe train ...``).
Before handing over to ``harness.cli.main`` it registers torch's global optimizer-step hook; each
rank writes ``rank-<r>.json`` into ``$BENCH_PROBE_DIR`` with the wall-clock time of its first
optimizer step (written at once, so a later hang does not lose it), every step's perf_counter,
and a few start-up milestones (a worker restarted by torchrun's elastic agent writes
``rank-<r>-restart-<n>.json`` and ``first-step-rank-<r>-restart-<n>.json``). ``$BENCH_TWEAKS`` (comma-separated names from benchmarks.tweaks)
applies ablations to the built trainer. The ``import torch`` here only moves the import the
harness does anyway before its first step.
"""

from __future__ import annotations

import time

STARTED = time.time()

import os  # noqa: E402
import sys  # noqa: E402


def main() -> int:
    out_dir = os.environ.get("BENCH_PROBE_DIR")
    rank = os.environ.get("RANK", "0")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    name = rank if restart == "0" else f"{rank}-restart-{restart}"  # a restarted worker: files of its own
    from benchmarks.common import StepClock, write_json

    milestones = {"probe_started": STARTED}
    clock = StepClock()

    def first_step_written(optimizer, args, kwargs):
        if len(clock.perf) == 1 and out_dir:
            write_json(os.path.join(out_dir, f"first-step-rank-{name}.json"), {"first_step": clock.wall[0]})

    clock.install()
    milestones["torch_imported"] = time.time()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(first_step_written)  # runs after the clock's hook
    import harness.loop  # noqa: F401  (what train() needs, imported here to time it)
    from benchmarks.tweaks import apply_all, patched_train
    from harness.cli import main as harness_main

    milestones["harness_imported"] = time.time()
    tweak = apply_all(os.environ.get("BENCH_TWEAKS", "").split(","))

    def after_build(trainer):
        milestones["trainer_built"] = time.time()
        tweak(trainer)

    def record(rc):
        if out_dir:
            write_json(os.path.join(out_dir, f"rank-{name}.json"),
                       {"rank": int(rank), "restart": int(restart), "rc": rc, "milestones": milestones, "perf": clock.perf,
                        "tweaks_applied": tweak.applied,
                        "first_step": clock.wall[0] if clock.wall else None})

    def around_fit(fit, trainer):
        milestones["fit_started"] = time.time()
        try:
            return fit(trainer)
        finally:
            milestones["fit_returned"] = time.time()
            record(None)  # kept even if the teardown later hangs or aborts

    with patched_train(after_build, around_fit):
        rc = harness_main(sys.argv[1:])
    milestones["finished"] = time.time()
    record(rc)
    return rc


if __name__ == "__main__":
    from harness.cli import end_process

    end_process(main())
