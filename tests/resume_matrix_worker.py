"""The runs of tests/test_resume_matrix.py, many in one process: starting Python with torch
costs seconds, a run of these sizes a fraction of one. Each run goes through the CLI's own entry
point, and the worker writes nothing but run folders.

  python tests/resume_matrix_worker.py OUT_DIR
      1 rank. For every case (each schedule kind, plus a user's own LambdaLR factor) and each
      warmup length, OUT_DIR/<case>-warmup<N>/straight (uninterrupted) and .../stopped
      (train.max_steps stops it mid-epoch with a checkpoint, then the same command without
      max_steps resumes it); error.txt there when a run fails (the other cases still run). The
      same for each kind of data with dropout: OUT_DIR/data-<case>/{straight,stopped}.
  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/resume_matrix_worker.py OUT_DIR --two-ranks
      The uninterrupted runs of the 2-rank subset: OUT_DIR/<case>/straight.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "breast_cancer_mlp.yaml"
# 455 training samples, global batch 64 -> 8 steps per epoch; 5 epochs = 40 steps. Dropout
# exercises the RNG state; a log window of 3 steps is cut in two by the stop.
BASE = ["data.batch_size=64", "train.epochs=5", "train.log_every_steps=3", "model.dropout=0.2",
        "checkpoint.keep_last=2"]
TOTAL_STEPS = 40
STOP_AT_STEP = 19  # mid epoch 3, after two validations
WARMUPS = (0, 7)
# The first layer in its own param group with its own LR: two LR series to compare.
TWO_GROUPS = 'optim.param_groups=[{name: first_layer, params: ["layers.0.*"], lr: 3e-4}]'
USER_FACTOR_MODULE = "matrix_lr_factors"  # written by the test into a folder on PYTHONPATH
USER_STREAM_MODULE = "matrix_streams"  # likewise: a user's IterableDataset with state_dict

# case -> (schedule kind, overrides): options that make the LR move within a 40-step run.
CASES: dict[str, tuple[str, list[str]]] = {
    "none": ("none", []),
    "step": ("step", ["schedule.interval=step", "schedule.step_size=6", "schedule.gamma=0.7", TWO_GROUPS]),
    "multistep": ("multistep", ["schedule.milestones=[1, 3]", "schedule.gamma=0.5"]),
    "exponential": ("exponential", ["schedule.interval=step", "schedule.gamma=0.97"]),
    "cosine": ("cosine", ["schedule.interval=step", TWO_GROUPS]),
    "cosine_restarts": ("cosine_restarts", ["schedule.interval=step", "schedule.T_0=7", "schedule.T_mult=2"]),
    "linear": ("linear", ["schedule.start_factor=0.25", "schedule.total_iters=3", TWO_GROUPS]),
    "polynomial": ("polynomial", ["schedule.interval=step", "schedule.power=2.0"]),
    "lambda": ("lambda", ["schedule.interval=step", "schedule.factor=cosine_decay", TWO_GROUPS]),
    "lambda_user": ("lambda", ["schedule.interval=step", f"schedule.factor={USER_FACTOR_MODULE}:wave",
                               "schedule.factor_kwargs={period: 9}", TWO_GROUPS]),
    "plateau": ("plateau", ["schedule.patience=0", "schedule.factor=0.5", "schedule.threshold=0.05", "optim.lr=0.01",
                            TWO_GROUPS]),
    "onecycle": ("onecycle", ["schedule.interval=step", TWO_GROUPS]),
    "cyclic": ("cyclic", ["schedule.interval=step", "schedule.max_lr=0.005", "schedule.step_size_up=5"]),
    "constant": ("constant", ["schedule.interval=step", "schedule.factor=0.5", "schedule.total_iters=25"]),
    "multiplicative": ("multiplicative", ["schedule.interval=step", "schedule.factor=tests.lr_factors:multiplicative_095",
                                          TWO_GROUPS]),
    "sequential": ("sequential", ["schedule.interval=step"]),
    "chained": ("chained", ["schedule.interval=step"]),
}

# The data axis: every kind of data the harness batches, each with dropout (the training RNG must
# be restored and then drawn from exactly as the straight run draws) and a stop mid-epoch.
# case -> (recipe, overrides, total steps, stop step): 8, 8, 6, 8 and 10 steps per epoch.
DATA_CASES: dict[str, tuple[str, list[str], int, int]] = {
    "graphs": ("gnn_graphs.yaml", ["data.num_graphs=300", "data.batch_size=32", "train.epochs=3",
                                   "model.dropout=0.5", "schedule.warmup_steps=3"], 24, 11),
    "graphs_workers": ("gnn_graphs.yaml", ["data.num_graphs=300", "data.batch_size=32", "train.epochs=3",
                                           "model.dropout=0.5", "schedule.warmup_steps=3", "data.num_workers=2"], 24, 11),
    "node_batches": ("gcn_plateau.yaml", ["data.batch_size=128", "data.subgraph_hops=2", "train.epochs=3",
                                          "model.dropout=0.5"], 18, 8),
    "tensors_workers": ("breast_cancer_mlp.yaml", ["data.batch_size=64", "train.epochs=2", "model.dropout=0.5",
                                                   "data.num_workers=2"], 16, 11),
    "stream_workers": ("breast_cancer_mlp.yaml", [f"data.name={USER_STREAM_MODULE}:records", "data.batch_size=32",
                                                  "train.epochs=2", "model.dropout=0.5", "data.num_workers=2"], 20, 13),
}


DATA_BASE = ["train.log_every_steps=3"]  # a log window cut in two by the stop, as in BASE


def data_case_names() -> list[str]:
    return [f"data-{case}" for case in DATA_CASES]


# The 2-rank subset, killed with SIGKILL mid-epoch (case -> warmup steps): kinds whose resume
# tests/test_resume.py does not cover (it covers plateau and warmup + cosine).
TWO_RANK_CASES = {"lambda_user": 0, "onecycle": 0, "cyclic": 7}
TWO_RANK_EVERY_STEPS = 5
TWO_RANK_KILL_AT_STEP = 13  # mid epoch 2; the last checkpoint before it is the step-10 one


def all_cases() -> dict[str, tuple[str, list[str]]]:
    """CASES, plus each kind the harness offers that CASES does not name yet, with its defaults."""
    from harness.schedule_kinds import SCHEDULES

    covered = {kind for kind, _ in CASES.values()}
    return {**CASES, **{kind: (kind, []) for kind in SCHEDULES if kind not in covered}}


def case_names() -> list[str]:
    return [f"{case}-warmup{warmup}" for case in all_cases() for warmup in WARMUPS]


def overrides(case: str, warmup: int, run_dir: Path) -> list[str]:
    kind, extra = all_cases()[case]
    return [f"run.output_dir={run_dir}", *BASE, f"schedule.name={kind}", f"schedule.warmup_steps={warmup}", *extra]


def train(args: list[str], recipe: Path = RECIPE) -> None:
    from harness.cli import main

    code = main(["train", str(recipe), *args])
    if code != 0:
        raise RuntimeError(f"harness train exited {code}")


def main(out: Path) -> None:
    """The 1-rank matrix: straight and stopped-then-resumed runs of every case."""
    failed: dict[str, str] = {}

    def attempt(name: str, args: list[str], recipe: Path = RECIPE) -> None:
        if name in failed:
            return
        try:
            train(args, recipe)
        except BaseException:  # noqa: BLE001 - recorded for that case's test, the others go on
            failed[name] = traceback.format_exc()
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "error.txt").write_text(f"harness train {' '.join(args)}\n{failed[name]}")

    plan = [(case, warmup, out / f"{case}-warmup{warmup}") for case in all_cases() for warmup in WARMUPS]
    # Every stop first, every resume after: a resume never starts in the second its stop did (event
    # files are named by the second they are opened in, and TensorBoard reads them in name order).
    for case, warmup, folder in plan:
        attempt(folder.name, overrides(case, warmup, folder / "straight"))
        attempt(folder.name, [*overrides(case, warmup, folder / "stopped"), f"train.max_steps={STOP_AT_STEP}"])
    for case, (recipe, extra, _, stop) in DATA_CASES.items():
        folder = out / f"data-{case}"
        attempt(folder.name, [f"run.output_dir={folder / 'straight'}", *DATA_BASE, *extra], ROOT / "recipes" / recipe)
        attempt(folder.name, [f"run.output_dir={folder / 'stopped'}", *DATA_BASE, *extra, f"train.max_steps={stop}"],
                ROOT / "recipes" / recipe)
    for case, warmup, folder in plan:
        attempt(folder.name, overrides(case, warmup, folder / "stopped"))
    for case, (recipe, extra, _, _) in DATA_CASES.items():
        folder = out / f"data-{case}"
        attempt(folder.name, [f"run.output_dir={folder / 'stopped'}", *DATA_BASE, *extra], ROOT / "recipes" / recipe)


def two_rank_overrides(case: str, run_dir: Path) -> list[str]:
    warmup = TWO_RANK_CASES[case]
    return [*overrides(case, warmup, run_dir), f"checkpoint.every_steps={TWO_RANK_EVERY_STEPS}"]


def straight_on_two_ranks(out: Path) -> None:
    """Under `accelerate launch` with 2 processes: the uninterrupted run of each 2-rank case.

    train() leaves the process group at its end while Accelerate's state, a process-wide
    singleton, still says it is joined (and joining again on the launcher's port hangs): the
    runs before the last keep the group."""
    from harness import faults

    cases = list(TWO_RANK_CASES)
    try:
        for case in cases:
            faults.KEEP_PROCESS_GROUP = case != cases[-1]
            train(two_rank_overrides(case, out / case / "straight"))
    finally:
        faults.KEEP_PROCESS_GROUP = False


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[2:] == ["--two-ranks"]:
        straight_on_two_ranks(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
