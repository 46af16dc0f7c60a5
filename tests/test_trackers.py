"""run.log_with: every tracker gets the same series as TensorBoard, and a run SIGKILLed and resumed
logs no step twice (the points its killed process wrote after its last checkpoint are dropped);
train.profile writes a trace of the optimizer steps it was asked for.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from harness.tracking import read_scalars
from tests.conftest import ROOT, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes" / "breast_cancer_mlp.yaml"  # 15 steps an epoch on 1 process
# log_every_steps 1: each step writes ~110 bytes, so the 90 steps between the checkpoint at 200
# and the kill at 290 overflow the file's buffer: the killed process leaves points past 200.
LOGGED = ["train.epochs=20", "train.log_every_steps=1", "checkpoint.every_steps=100", "checkpoint.every_epochs=null",
          "run.log_with=[tensorboard,jsonl]"]
KILL_AT_STEP = 290


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for record in records(run_dir):
        for tag, value in record.items():
            if tag not in ("step", "params") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(tag, []).append((record["step"], value))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trackers")
    straight, resumed = base / "straight", base / "resumed"
    run_harness(RECIPE, [f"run.output_dir={straight}", *LOGGED], nproc=1, launcher="python")
    killed = run_harness(RECIPE, [f"run.output_dir={resumed}", *LOGGED], nproc=1, launcher="python", check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT_STEP)))
    assert killed.returncode != 0
    steps_left_by_the_killed_process = max(r["step"] for r in records(resumed))
    run_harness(RECIPE, [f"run.output_dir={resumed}", *LOGGED], nproc=1, launcher="python")
    return {"straight": straight, "resumed": resumed, "killed_last_step": steps_left_by_the_killed_process}


def test_jsonl_holds_the_same_series_as_tensorboard(runs):
    jsonl, tensorboard = series(runs["straight"]), read_scalars(runs["straight"])
    assert set(jsonl) == set(tensorboard)
    assert {"lr/default", "train/loss", "train/loss_epoch", "val/loss", "val/accuracy", "test/loss",
            "perf/samples_per_s", "lr_epoch/default"} <= set(jsonl)
    for tag, points in tensorboard.items():
        # TensorBoard stores float32; the JSON records keep the float64 values.
        assert [s for s, _ in points] == [s for s, _ in jsonl[tag]], tag
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(points, jsonl[tag])), tag
    assert len(jsonl["lr/default"]) == 300
    params = next(r["params"] for r in records(runs["straight"]) if "params" in r)
    assert params["optim.lr"] == 0.001 and params["run.log_with"] == "['tensorboard', 'jsonl']"


def test_a_resumed_run_logs_no_step_twice_in_jsonl(runs):
    assert runs["killed_last_step"] > 200, "the killed process left no point past its checkpoint to drop"
    resumed = records(runs["resumed"])
    counts = Counter((r["step"], tag) for r in resumed for tag in r if tag != "step")
    assert [key for key, n in counts.items() if n > 1] == []
    straight, again = series(runs["straight"]), series(runs["resumed"])
    assert set(straight) == set(again)
    for tag in straight:
        if tag != "perf/samples_per_s":  # a clock
            assert straight[tag] == again[tag], tag
    assert read_json(runs["straight"] / "metrics.json") == read_json(runs["resumed"] / "metrics.json")


def test_only_the_trackers_asked_for_write(tmp_path):
    run_dir = tmp_path / "run"
    run_harness(RECIPE, [f"run.output_dir={run_dir}", "train.epochs=1", "run.log_with=[jsonl]"], nproc=1,
                launcher="python")
    assert (run_dir / "log.jsonl").is_file() and not (run_dir / "tb").exists()
    bad = run_harness(RECIPE, [f"run.output_dir={tmp_path / 'bad'}", "run.log_with=[tensorbord]"], nproc=1,
                      launcher="python", check=False)
    assert bad.returncode == 2 and "run.log_with[0]" in bad.stderr and "'tensorboard'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_the_profiler_traces_the_steps_it_was_asked_for(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(RECIPE, [f"run.output_dir={run_dir}", "train.epochs=1", "train.profile.wait=2",
                                "train.profile.warmup=1", "train.profile.active=3"], nproc=1, launcher="python")
    assert f"profiling optimizer steps 4-6 of this process into {run_dir / 'profile'}" in proc.stdout + proc.stderr
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    # torch numbers the profiler's steps from 0: steps 4-6 of the run.
    assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == ["ProfilerStep#3", "ProfilerStep#4",
                                                                              "ProfilerStep#5"]
    assert {"aten::addmm", "Optimizer.step#Adam.step"} <= names
