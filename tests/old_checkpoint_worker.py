"""Loads a checkpoint written by an older harness the way a resume does, and reports whether the
state it restored equals what the old files hold, read independently (safetensors and JSON, no
harness code); then saves that restored state again with today's code.

  python tests/old_checkpoint_worker.py RUN_DIR NEW_RUN_DIR OVERRIDES...

RUN_DIR/checkpoints holds the old checkpoint; NEW_RUN_DIR/checkpoints receives today's save of the
same state. Prints one JSON line: {"mismatches": [...], "step": N, "saved": PATH}.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "breast_cancer_mlp.yaml"


def main(run_dir: Path, new_run_dir: Path, overrides: list[str]) -> None:
    from harness.checkpoint import CheckpointStore
    from harness.config import load_config
    from harness.loop import build_trainer
    from harness.snapshot import save_checkpoint

    (old,) = sorted((run_dir / "checkpoints").glob("step-*"))
    trainer = build_trainer(load_config(RECIPE, [f"run.output_dir={run_dir}", *overrides]))
    mismatches = []

    def expect(what: str, same: bool) -> None:
        if not same:
            mismatches.append(what)

    # Weights.
    weights = load_file(old / "model.safetensors")
    own = trainer.raw_model.state_dict()
    expect("model keys", set(own) == set(weights))
    for name, tensor in weights.items():
        expect(f"model {name}", name in own and torch.equal(own[name], tensor))
    # Optimizer moments and step counts (tensors "<param index>/<name>"), and its groups.
    moments = load_file(old / "optimizer.safetensors")
    state = trainer.optimizer.state_dict()
    for key, tensor in moments.items():
        index, name = key.split("/")
        expect(f"optimizer {key}", torch.equal(state["state"][int(index)][name], tensor))
    expect("optimizer state size", sum(len(s) for s in state["state"].values()) == len(moments))
    groups = json.loads((old / "optimizer.json").read_text())["param_groups"]
    for saved, group in zip(groups, state["param_groups"]):
        for key, value in saved.items():
            now = group[key]
            expect(f"optimizer group {key}", (list(now) if isinstance(now, tuple) else now) == value)
    # Schedule: torch's scheduler state and the harness's count of schedule steps.
    schedule = json.loads((old / "scheduler.json").read_text())
    now = trainer.schedule.state_dict()
    expect("schedule steps_done", now["steps_done"] == schedule["steps_done"])
    for key, value in schedule["main"].items():
        expect(f"scheduler {key}", now["main"].get(key) == value)
    expect("LRs", [g["lr"] for g in trainer.optimizer.param_groups] == json.loads(
        (old / "trainer.json").read_text())["lrs"])
    # Counters, data position, best metric, history, partial log sums.
    counters = json.loads((old / "trainer.json").read_text())["state"]
    for key, value in counters.items():
        expect(f"trainer state {key}", getattr(trainer.state, key) == value)
    # RNG: torch's, Python's and numpy's generators are where the old run left them.
    rng, rng_tensors = json.loads((old / "rng-rank-0.json").read_text()), load_file(old / "rng-rank-0.safetensors")
    expect("torch RNG", torch.equal(torch.get_rng_state(), rng_tensors["torch_cpu"]))
    version, internal, gauss = random.getstate()
    expect("python RNG", [version, list(internal), gauss] == rng["python"])
    np_state = np.random.get_state()
    expect("numpy RNG", [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                         float(np_state[4])] == rng["numpy"])
    # The same state, saved by today's code.
    trainer.store = CheckpointStore(new_run_dir, keep_last=10)
    saved = save_checkpoint(trainer, trainer.store, "every_steps")
    print(json.dumps({"mismatches": mismatches, "step": trainer.state.step, "saved": str(saved)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
