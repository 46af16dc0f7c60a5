"""run.log_with: every tracker (jsonl, an MLflow file store, W&B offline) gets the same series as
TensorBoard, and a run SIGKILLed and resumed logs no step twice and continues the same tracker run;
a tracker that cannot start stops the run before training; train.profile writes a trace of the
optimizer steps it was asked for.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest

from harness.tracking import read_scalars
from tests.conftest import ROOT, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes" / "breast_cancer_mlp.yaml"  # 15 steps an epoch on 1 process
# log_every_steps 1: each step writes ~110 bytes, so the 90 steps between the checkpoint at 200
# and the kill at 290 overflow the file's buffer: the killed process leaves points past 200.
LOGGED = ["train.epochs=20", "train.log_every_steps=1", "checkpoint.every_steps=100", "checkpoint.every_epochs=null",
          "run.log_with=[tensorboard,jsonl,mlflow,wandb]",
          'optim.param_groups=[{name: first_layer, params: ["layers.0.*"], lr: 3e-4}]']  # a named group's LR too
KILL_AT_STEP = 290
PROFILE = ["train.profile.wait=2", "train.profile.warmup=1", "train.profile.active=3"]
# MLflow's default here: the run folder's own file store; W&B offline, its files in the run folder.
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""}


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
    # The straight run is profiled too (train.profile changes nothing a step computes).
    first = run_harness(RECIPE, [f"run.output_dir={straight}", *LOGGED, *PROFILE], nproc=1, launcher="python",
                        env=subprocess_env(**ENV))
    killed = run_harness(RECIPE, [f"run.output_dir={resumed}", *LOGGED], nproc=1, launcher="python", check=False,
                         env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT_STEP), **ENV))
    assert killed.returncode != 0
    steps_left_by_the_killed_process = max(r["step"] for r in records(resumed))
    run_harness(RECIPE, [f"run.output_dir={resumed}", *LOGGED], nproc=1, launcher="python", env=subprocess_env(**ENV))
    return {"straight": straight, "resumed": resumed, "killed_last_step": steps_left_by_the_killed_process,
            "straight_output": first.stdout + first.stderr}


def test_jsonl_holds_the_same_series_as_tensorboard(runs):
    jsonl, tensorboard = series(runs["straight"]), read_scalars(runs["straight"])
    assert set(jsonl) == set(tensorboard)
    assert {"lr/default", "lr/first_layer", "train/loss", "train/loss_epoch", "val/loss", "val/accuracy",
            "test/loss", "perf/samples_per_s", "lr_epoch/default", "lr_epoch/first_layer"} <= set(jsonl)
    assert jsonl["lr/first_layer"][0] == (1, pytest.approx(3e-4)) and jsonl["lr/default"][0] == (1, pytest.approx(1e-3))
    for tag, points in tensorboard.items():
        # TensorBoard stores float32; the JSON records keep the float64 values.
        assert [s for s, _ in points] == [s for s, _ in jsonl[tag]], tag
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(points, jsonl[tag])), tag
    assert len(jsonl["lr/default"]) == 300
    params = next(r["params"] for r in records(runs["straight"]) if "params" in r)
    assert params["optim.lr"] == 0.001 and params["run.log_with"] == "['tensorboard', 'jsonl', 'mlflow', 'wandb']"


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


def mlflow_series(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    from mlflow.tracking import MlflowClient

    ids = read_json(run_dir / "trackers.json")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    out = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(ids["mlflow"], key),
                                                    key=lambda m: (m.step, m.timestamp))]
           for key in run.data.metrics}
    return out, {"status": run.info.status, "params": run.data.params}


def wandb_records(path: Path):
    """The records of a W&B offline run file (LevelDB's log format: 32 KiB blocks of chunks with a
    7-byte header: CRC, length, kind) after the file's own 7-byte header."""
    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def wandb_run(run_dir: Path):
    """(the offline folders of the run in trackers.json, each record of their files parsed): one
    folder per process; `wandb sync` uploads them into the one run."""
    from wandb.proto import wandb_internal_pb2

    run_id = read_json(run_dir / "trackers.json")["wandb"]
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))

    def parsed():
        for folder in folders:
            for raw in wandb_records(folder / f"run-{run_id}.wandb"):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                yield record

    return folders, parsed()


def wandb_series(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    out: dict[str, list] = {}
    folders, records = wandb_run(run_dir)
    for record in records:
        if record.WhichOneof("record_type") == "history":
            # A key with a "/" is stored as its parts (nested_key).
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    out.setdefault(key, []).append((record.history.step.num, value))
    return out, [f.name for f in folders]


def wandb_config(run_dir: Path) -> dict:
    """The run config the W&B offline files hold (the last value of each key)."""
    config = {}
    for record in wandb_run(run_dir)[1]:
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.key] = json.loads(item.value_json)
    return config


def test_mlflow_and_wandb_get_the_same_series_and_a_resumed_run_logs_no_step_twice_in_either(runs, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the run folder's file store
    run_dir = runs["resumed"]
    expected = series(run_dir)
    mlflow, run = mlflow_series(run_dir)
    wandb, folders = wandb_series(run_dir)
    assert len(folders) == 2  # the killed process's and the resumed one's, under one run id
    assert run["status"] == "FINISHED" and run["params"]["optim.lr"] == "0.001"
    assert set(mlflow) == set(expected) and set(wandb) == set(expected)
    for tag, points in expected.items():
        assert mlflow[tag] == points, tag  # every step once, the same values
        # W&B's own service writes its offline file through a buffer that a SIGKILL loses (its last
        # ~32 KiB of records: steps the killed process had sent at its checkpoint). What it holds is
        # each step at most once with the right value, and everything the resumed process sent.
        steps = [s for s, _ in wandb[tag]]
        assert len(steps) == len(set(steps)) and set(wandb[tag]) <= set(points), tag
        assert [p for p in points if p[0] > 200] == [p for p in wandb[tag] if p[0] > 200], tag
    assert [s for s, _ in mlflow["lr/default"]] == list(range(1, 301))
    assert [s for s, _ in mlflow["lr/first_layer"]] == list(range(1, 301))
    assert {"lr/default", "lr/first_layer", "perf/samples_per_s", "val/loss", "test/loss"} <= set(wandb)
    # The resolved recipe as parameters: MLflow's params, W&B's run config.
    assert wandb_config(run_dir)["optim.lr"] == 0.001 and run["params"]["data.batch_size"] == "32"


def test_a_tracker_that_cannot_start_stops_the_run_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(RECIPE, [f"run.output_dir={run_dir}", "run.log_with=[tensorboard,mlflow]"], nproc=1,
                       launcher="python", check=False, env=subprocess_env(MLFLOW_TRACKING_URI="file:///proc/no/mlruns"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.log_with: mlflow could not start, nothing was trained: MLflow at file:///proc/no/mlruns" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints").exists()


def test_wandb_missing_or_refusing_to_start_stops_the_run_before_training(tmp_path):
    blocked = tmp_path / "no_wandb"
    blocked.mkdir()
    (blocked / "wandb.py").write_text("raise ImportError('No module named wandb (hidden by this test)')\n")
    for name, env, expected in (
            ("missing", {"PYTHONPATH": f"{blocked}:{ROOT}"},
             "run.log_with: wandb could not start, nothing was trained: wandb is not installed (No module named wandb"),
            ("refusing", {"WANDB_MODE": "offlin"},
             "run.log_with: wandb could not start, nothing was trained: W&B: ")):
        run_dir = tmp_path / name
        proc = run_harness(RECIPE, [f"run.output_dir={run_dir}", "run.log_with=[tensorboard,wandb]"], nproc=1,
                           launcher="python", check=False, env=subprocess_env(**env))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (run_dir / "checkpoints").exists()


def test_only_the_trackers_asked_for_write(tmp_path):
    run_dir = tmp_path / "run"
    run_harness(RECIPE, [f"run.output_dir={run_dir}", "train.epochs=1", "run.log_with=[jsonl]"], nproc=1,
                launcher="python")
    assert (run_dir / "log.jsonl").is_file() and not (run_dir / "tb").exists()
    bad = run_harness(RECIPE, [f"run.output_dir={tmp_path / 'bad'}", "run.log_with=[tensorbord]"], nproc=1,
                      launcher="python", check=False)
    assert bad.returncode == 2 and "run.log_with[0]" in bad.stderr and "'tensorboard'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def traced(trace: Path) -> Counter:
    """How many times each named span (a Chrome trace's complete events) was recorded."""
    return Counter(event.get("name") for event in json.loads(trace.read_text())["traceEvents"] if event.get("ph") == "X")


def test_the_profiler_traces_the_steps_it_was_asked_for(runs):
    run_dir = runs["straight"]
    assert f"profiling optimizer steps 4-6 of this process into {run_dir / 'profile'}" in runs["straight_output"]
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    names = traced(traces[0])
    # torch numbers the profiler's steps from 0: steps 4-6 of the run.
    assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == ["ProfilerStep#3", "ProfilerStep#4",
                                                                              "ProfilerStep#5"]
    assert {"aten::addmm", "Optimizer.step#Adam.step"} <= names.keys()


def test_the_profiler_counts_optimizer_steps_on_the_main_rank_or_on_every_rank(tmp_path):
    # Two micro-batches an optimizer step: the window is steps 4-6 all the same, each holding two
    # forwards (the MLP's three layers: three aten::addmm a forward) and one optimizer step.
    common = ["train.epochs=1", "train.grad_accum_steps=2", "data.batch_size=16", *PROFILE]
    for ranks, profiled in (("main", ["rank0"]), ("all", ["rank0", "rank1"])):
        run_dir = tmp_path / ranks
        run_harness(RECIPE, [f"run.output_dir={run_dir}", *common, f"train.profile.ranks={ranks}"], nproc=2)
        traces = sorted((run_dir / "profile").glob("*.pt.trace.json"))
        assert [trace.name.split(".")[0] for trace in traces] == profiled
        for trace in traces:
            names = traced(trace)
            assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == [
                "ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"], trace.name
            assert names["Optimizer.step#Adam.step"] == 3 and names["aten::addmm"] == 3 * 2 * 3, trace.name
