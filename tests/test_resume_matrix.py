"""Every schedule kind resumes exactly, with and without warmup: weights bit for bit, the LR of
every param group at every step, and the logged losses, as if the run had never stopped.

The 1-rank matrix runs in one process (tests/resume_matrix_worker.py: starting Python with torch
costs more than a run); each test reads back its case's run folders. A 2-rank subset is killed
with SIGKILL mid-epoch under a real `accelerate launch` and resumed by the same command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.schedule_kinds import SCHEDULES
from harness.tracking import read_scalars
from tests.conftest import (BIN, CPU_2PROC, ROOT, assert_same_weights, free_port, read_json, run_harness,
                            subprocess_env)
from tests.resume_matrix_worker import (DATA_CASES, RECIPE, STOP_AT_STEP, TOTAL_STEPS, TWO_GROUPS, TWO_RANK_CASES,
                                        TWO_RANK_EVERY_STEPS, TWO_RANK_KILL_AT_STEP, USER_FACTOR_MODULE,
                                        USER_STREAM_MODULE, WARMUPS,
                                        all_cases, case_names, data_case_names, two_rank_overrides)

WORKER = ROOT / "tests" / "resume_matrix_worker.py"
# A user's own LambdaLR factor (schedule.factor=matrix_lr_factors:wave): it rises and falls, so a
# resume that restarted its count, or lost the function, shows in the LR series.
USER_FACTOR_SOURCE = '''
import math


def wave(t, period=9):
    return 0.6 + 0.4 * math.cos(2 * math.pi * t / period) * 0.5 ** (t // period)
'''


# A user's own stream (an IterableDataset with state_dict), for the data axis's stream case.
USER_STREAM_SOURCE = '''
import torch
from harness.streams import shard_of_stream


class Records(torch.utils.data.IterableDataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 30, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).float()
        self.position, self.epoch = 0, 0

    def __len__(self):
        return len(self.x)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        index, count = shard_of_stream()
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + self.epoch))
        while self.position < len(self.x):
            self.position += 1
            if (self.position - 1) % count == index:
                i = int(order[self.position - 1])
                yield self.x[i], self.y[i]

    def state_dict(self):
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.position, self.epoch = state["position"], state["epoch"]


def records():
    return {"train": Records(320, 0), "val": Records(64, 1), "task": "binary"}
'''


@pytest.fixture(scope="module")
def factor_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user_code")
    (folder / f"{USER_FACTOR_MODULE}.py").write_text(USER_FACTOR_SOURCE)
    (folder / f"{USER_STREAM_MODULE}.py").write_text(USER_STREAM_SOURCE)
    return folder


def env_with_user_code(factor_folder: Path, **extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(factor_folder), os.environ.get("PYTHONPATH")) if p)
    return subprocess_env(PYTHONPATH=path, **extra)


def run_worker(command: list[str], env: dict) -> None:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, factor_folder) -> Path:
    out = tmp_path_factory.mktemp("matrix")
    run_worker([sys.executable, str(WORKER), str(out)], env_with_user_code(factor_folder))
    return out


def case_runs(matrix: Path, case: str) -> tuple[Path, Path]:
    error = matrix / case / "error.txt"
    if error.exists():
        pytest.fail(error.read_text())
    return matrix / case / "straight", matrix / case / "stopped"


def logged(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Every logged point of the tags under ``prefixes``; a step logged twice would show twice."""
    scalars = read_scalars(run_dir, keep_duplicates=True)
    return {tag: points for tag, points in scalars.items() if tag.startswith(prefixes)}


def assert_same_series(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected)
    for tag in expected:
        assert got[tag] == expected[tag], f"{tag}: first difference at step " + str(next(
            (a[0] for a, b in zip(expected[tag], got[tag]) if a != b), min(len(expected[tag]), len(got[tag]))))


def group_tags(case: str) -> set[str]:
    _, overrides = all_cases()[case.rpartition("-warmup")[0]]
    return {"lr/first_layer", "lr/default"} if TWO_GROUPS in overrides else {"lr/default"}


def test_the_matrix_covers_every_schedule_kind_with_and_without_warmup():
    assert {kind for kind, _ in all_cases().values()} >= set(SCHEDULES)
    assert all(f"{case}-warmup{w}" in case_names() for case in all_cases() for w in WARMUPS)
    assert 0 in WARMUPS and any(w > 0 for w in WARMUPS)


@pytest.mark.parametrize("case", case_names())
def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights_and_the_same_lr_at_every_step(matrix, case):
    straight, stopped = case_runs(matrix, case)
    assert len(list((stopped / "tb").glob("events.out.tfevents.*"))) == 2, "stopped once, resumed once"
    assert read_json(stopped / "metrics.json")["steps"] == TOTAL_STEPS
    assert_same_weights(straight, stopped)
    expected = logged(straight, ("lr/", "lr_epoch/"))
    assert {tag for tag in expected if tag.startswith("lr/")} == group_tags(case)
    for tag in group_tags(case):
        assert [step for step, _ in expected[tag]] == list(range(1, TOTAL_STEPS + 1))
    assert_same_series(expected, logged(stopped, ("lr/", "lr_epoch/")))
    if not case.startswith("none-"):
        after_stop = {lr for step, lr in expected["lr/default"] if step > STOP_AT_STEP}
        assert len(after_stop) > 1, f"{case}: the LR never moves after the stop; give it options in CASES that do"


@pytest.mark.parametrize("case", case_names())
def test_a_run_stopped_mid_epoch_resumes_to_the_same_logged_losses(matrix, case):
    straight, stopped = case_runs(matrix, case)
    assert_same_series(logged(straight, ("train/loss", "val/")), logged(stopped, ("train/loss", "val/")))
    # The stopped process ended with its own test evaluation (at the stop); the last one is the run's.
    for tag in ("test/loss", "test/accuracy"):
        assert read_scalars(stopped)[tag][-1] == read_scalars(straight)[tag][-1]


@pytest.mark.parametrize("case", data_case_names())
def test_every_kind_of_data_with_dropout_stopped_mid_epoch_resumes_bitwise(matrix, case):
    """Graph lists (with and without loader workers), node batches, tensors through loader workers,
    a stream through loader workers: the resumed run draws dropout masks from the restored RNG
    exactly as the straight run does."""
    straight, stopped = case_runs(matrix, case)
    _, _, total, _ = DATA_CASES[case.removeprefix("data-")]
    assert read_json(stopped / "metrics.json")["steps"] == total
    assert_same_weights(straight, stopped)
    prefixes = ("lr/", "train/loss", "val/")
    expected = logged(straight, prefixes)
    assert len(expected["train/loss"]) > 2
    assert_same_series(expected, logged(stopped, prefixes))


# --------------------------------------------------------------------------------------------
# 2 ranks, SIGKILL mid-epoch, real `accelerate launch`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_straight(tmp_path_factory, factor_folder) -> Path:
    """The uninterrupted 2-rank runs, all in one launch."""
    out = tmp_path_factory.mktemp("two_ranks")
    run_worker([str(BIN / "accelerate"), "launch", "--config_file", str(CPU_2PROC), "--num_processes", "2",
                "--main_process_port", str(free_port()), str(WORKER), str(out), "--two-ranks"],
               env_with_user_code(factor_folder))
    return out


@pytest.mark.parametrize("case", TWO_RANK_CASES)
def test_two_ranks_killed_mid_epoch_resume_to_the_same_weights_lrs_and_losses(two_rank_straight, factor_folder,
                                                                             case, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = two_rank_overrides(case, run_dir)
    kill = env_with_user_code(factor_folder, HARNESS_TEST_KILL_AT_STEP=str(TWO_RANK_KILL_AT_STEP))
    proc = run_harness(RECIPE, overrides, nproc=2, env=kill, check=False)
    assert proc.returncode != 0 and not (run_dir / "final").exists()
    last = TWO_RANK_KILL_AT_STEP - TWO_RANK_KILL_AT_STEP % TWO_RANK_EVERY_STEPS
    saved = read_json(run_dir / "checkpoints" / f"step-{last:06d}" / "scheduler.json")
    if case == "lambda_user":
        assert {entry["factor"] for entry in saved["main"]["lr_lambdas"]} == {f"{USER_FACTOR_MODULE}:wave"}
    resumed = run_harness(RECIPE, overrides, nproc=2, env=env_with_user_code(factor_folder))
    assert "resumed from" in resumed.stdout and f"step {last}," in resumed.stdout
    straight = two_rank_straight / case / "straight"
    assert_same_weights(straight, run_dir)
    prefixes = ("lr/", "lr_epoch/", "train/loss", "val/")
    expected = logged(straight, prefixes)
    assert len(expected["lr/default"]) == TOTAL_STEPS
    assert_same_series(expected, logged(run_dir, prefixes))
