"""Checkpoint and resume: exact after a stop or a SIGKILL, safe against bad files, any world size."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.builtin.models import Mlp
from harness.tracking import read_scalars
from tests.conftest import assert_bitwise_equal, weights, ROOT, read_json, run_harness, subprocess_env

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 455 samples, global batch 64 -> 8 steps per epoch; 4 epochs = 32 steps. Dropout exercises RNG state.
BASE = ["data.batch_size=64", "train.epochs=4", "train.log_every_steps=3", "checkpoint.every_steps=5",
        "checkpoint.keep_last=3", "model.dropout=0.2"]
SCHEDULES = {
    "plateau": ["schedule.name=plateau", "schedule.patience=0", "schedule.factor=0.5", "schedule.threshold=0.05",
                "optim.lr=0.01"],
    "warmup_cosine": ["schedule.name=cosine", "schedule.interval=step", "schedule.warmup_steps=6"],
}
KILL_STEP = 13  # mid epoch 2 (steps 9-16); the last step-interval checkpoint before it is step 10


def run(run_dir: Path, extra=(), nproc=1, env=None, check=True):
    # One rank runs as plain `python -m harness` so the tests see the harness's own exit code.
    return run_harness(RECIPE, [f"run.output_dir={run_dir}", *BASE, *extra], nproc=nproc, env=env, check=check,
                       launcher="python" if nproc == 1 else "accelerate")


def series(run_dir: Path) -> dict:
    scalars = read_scalars(run_dir, keep_duplicates=True)
    out = {tag: scalars[tag] for tag in ("lr/default", "train/loss", "val/loss", "train/loss_epoch")}
    for tag, points in out.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated points after resume"
    return out


# 2 ranks: one rank is covered by tests/test_resume_matrix.py (every schedule kind, warmup 0 and 7,
# stopped mid-epoch) and by the SIGKILL tests of test_datasets.py, test_streams.py, test_fsdp.py.
@pytest.mark.parametrize("nproc", [2])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_resume_is_exact_after_a_stop_and_after_a_sigkill(tmp_path, schedule, nproc):
    extra = SCHEDULES[schedule]
    straight, stopped, killed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "killed"
    run(straight, extra, nproc)
    # (b) stopped at an epoch boundary, then resumed by running the same command again
    run(stopped, [*extra, "train.max_steps=16"], nproc)
    assert read_json(stopped / "metrics.json")["steps"] == 16
    run(stopped, extra, nproc)
    # (c) SIGKILL in the middle of epoch 2, after the step-10 checkpoint, then resumed
    proc = run(killed, extra, nproc, env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_STEP)), check=False)
    assert proc.returncode != 0 and not (killed / "final").exists()
    assert (killed / "checkpoints" / "step-000010").is_dir()
    resumed = run(killed, extra, nproc)
    assert "resumed from" in resumed.stdout and "step 10, 128 samples into the epoch" in resumed.stdout
    reference = weights(straight)
    assert_bitwise_equal(reference, weights(stopped))
    assert_bitwise_equal(reference, weights(killed))
    expected = series(straight)
    assert len(expected["lr/default"]) == 32
    for other in (stopped, killed):
        got = series(other)
        for tag in expected:
            assert got[tag] == expected[tag], tag


def test_crash_at_any_point_inside_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    straight = tmp_path / "straight"
    run(straight)
    reference = weights(straight)
    # A save of one rank writes 8 files (manifest last). Crash inside the 2nd save (end of epoch 1, step 8)
    # after each of them: the 8th is the manifest, before the folder is renamed.
    assert len(list(max((straight / "checkpoints").glob("step-*")).iterdir())) == 8
    for files in range(1, 9):
        run_dir = tmp_path / f"crash{files}"
        proc = run(run_dir, env=subprocess_env(HARNESS_TEST_KILL_AFTER_FILES=f"2:{files}"), check=False)
        assert proc.returncode != 0
        committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        assert committed == ["step-000005"], committed
        assert list((run_dir / "checkpoints").glob(".tmp-step-000008-*"))
        resumed = run(run_dir)
        assert "resumed from" in resumed.stdout and "step-000005" in resumed.stdout
        assert_bitwise_equal(reference, weights(run_dir))
        assert not list((run_dir / "checkpoints").glob(".tmp-*")), "stale temporary folder pruned"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "RUN.lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(run_dir, ["train.epochs=2"])
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def rewrite_manifest_entry(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def damage_checkpoint(newest: Path, damage: str) -> None:
    target = newest / "optimizer.safetensors"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "missing_file":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "missing_file", "hash_mismatch"])
def test_each_kind_of_damage_makes_the_store_fall_back_to_the_previous_checkpoint(trained, tmp_path, damage, caplog):
    from harness.checkpoint import CheckpointError, CheckpointStore, verify

    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "step-000016"
    damage_checkpoint(newest, damage)
    before = snapshot(newest)
    assert CheckpointStore(run_dir).latest_complete().path.name == "step-000015"
    assert "skipping damaged checkpoint" in caplog.text and "optimizer.safetensors" in caplog.text
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify(newest)
    assert snapshot(newest) == before, "the damaged checkpoint was not touched"


def test_run_resume_given_a_path_resumes_from_that_checkpoint_into_another_folder(trained, tmp_path):
    """``run.resume: <path>``: an older checkpoint of another run folder, resumed into a new one,
    trains the rest of the run bitwise like the run it came from."""
    oldest = min((trained / "checkpoints").glob("step-*"))
    step = int(oldest.name.removeprefix("step-"))
    assert step < 16
    fresh = tmp_path / "fresh"
    resumed = run(fresh, ["train.epochs=2", f"run.resume={oldest}"])
    assert f"resumed from {oldest}:" in resumed.stdout and f"step {step}," in resumed.stdout, resumed.stdout[-2000:]
    assert_bitwise_equal(weights(trained), weights(fresh))
    assert min(int(p.name.removeprefix("step-")) for p in (fresh / "checkpoints").glob("step-*")) > step


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_left_alone(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "step-000016"
    damage_checkpoint(newest, "truncated")
    before = snapshot(newest)
    proc = run(run_dir, ["train.epochs=3"])
    assert "skipping damaged checkpoint" in proc.stdout + proc.stderr
    assert "optimizer.safetensors" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step-000015" in proc.stdout
    assert snapshot(newest) == before, "the damaged checkpoint was not touched"
    # An explicit resume from the damaged one is refused, naming the file.
    bad = run(run_dir, [f"run.resume={newest}"], check=False)
    assert bad.returncode == 3 and "optimizer.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_a_checkpoint_from_a_recipe_with_other_shapes_is_refused_and_nothing_changes(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = snapshot(run_dir)
    proc = run(run_dir, ["model.hidden=[16, 8]"], check=False)
    assert proc.returncode == 3 and "model.hidden: [64, 32] -> [16, 8]" in proc.stderr
    # Even with the change allowed, weights of other shapes are refused.
    proc = run(run_dir, ["model.hidden=[16, 8]", "run.on_change=allow"], check=False)
    assert proc.returncode == 3
    assert "model.safetensors" in proc.stderr and "shape" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def test_a_planted_pickle_payload_is_never_executed(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "step-000016"
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (newest / "model.safetensors").write_bytes(pickle.dumps({"weight": Payload()}))
    rewrite_manifest_entry(newest, "model.safetensors")  # the manifest vouches for it: only the loader stands guard
    before = snapshot(run_dir)
    proc = run(run_dir, ["train.epochs=3"], check=False)
    assert proc.returncode == 3
    assert "model.safetensors" in proc.stderr and "not a readable safetensors file" in proc.stderr
    assert not marker.exists(), "code from the checkpoint ran"
    assert snapshot(run_dir) == before


def test_resume_never_refuses_a_run_folder_that_has_checkpoints(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = snapshot(run_dir)
    proc = run(run_dir, ["run.resume=never"], check=False)
    assert proc.returncode == 3 and "run.resume is 'never'" in proc.stderr
    assert snapshot(run_dir) == before


def test_checkpoint_weights_load_into_a_plain_model_with_safetensors_alone(trained):
    state = load_file(trained / "checkpoints" / "step-000016" / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    model = Mlp(30, 1, hidden=[64, 32], dropout=0.2)
    model.load_state_dict(state, strict=True)
    optimizer_meta = json.loads((trained / "checkpoints" / "step-000016" / "optimizer.json").read_text())
    assert optimizer_meta["param_groups"][0]["initial_lr"] == 0.001
    scheduler = json.loads((trained / "checkpoints" / "step-000016" / "scheduler.json").read_text())
    assert scheduler["main"]["last_epoch"] == 2 and scheduler["steps_done"] == 16


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_schedule_and_sees_each_sample_once(tmp_path, before, after):
    extra = [*SCHEDULES["warmup_cosine"], "model.dropout=0.0"]  # dropout streams are per rank
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    run(straight, extra, nproc=1)
    trace = tmp_path / "trace"
    run(changed, extra, nproc=before, check=False,
        env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_STEP), HARNESS_TRACE_SAMPLES=f"{trace}-before"))
    proc = run(changed, extra, nproc=after, env=subprocess_env(HARNESS_TRACE_SAMPLES=f"{trace}-after"))
    assert "World size changed" in proc.stdout + proc.stderr
    assert series(changed)["lr/default"] == series(straight)["lr/default"]
    # Epoch 1 (steps 9-16) was interrupted at step 13; the committed part is steps 9-10.
    seen = []
    for path in tmp_path.glob("trace-before.rank*"):
        seen += [i for line in path.read_text().splitlines() for rec in [json.loads(line)]
                 if rec["epoch"] == 1 and rec["step"] <= 10 for i in rec["indices"]]
    for path in tmp_path.glob("trace-after.rank*"):
        seen += [i for line in path.read_text().splitlines() for rec in [json.loads(line)]
                 if rec["epoch"] == 1 for i in rec["indices"]]
    assert sorted(seen) == list(range(455)), "every training sample of the interrupted epoch exactly once"
    final = read_json(changed / "metrics.json")
    assert final["world_size"] == after and final["steps"] == 32
    assert final["val_loss"] == pytest.approx(read_json(straight / "metrics.json")["val_loss"], rel=1e-3)


def test_a_schedule_state_that_disagrees_with_the_recipe_stops_the_resume(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "step-000016"
    scheduler = json.loads((newest / "scheduler.json").read_text())
    scheduler["main"]["_last_lr"] = [0.5]
    (newest / "scheduler.json").write_text(json.dumps(scheduler))
    rewrite_manifest_entry(newest, "scheduler.json")
    before = snapshot(run_dir)
    proc = run(run_dir, ["train.epochs=3"], check=False)
    assert proc.returncode == 3 and "LR check after resume failed" in proc.stderr
    assert "[0.5]" in proc.stderr and "0.001" in proc.stderr
    assert snapshot(run_dir) == before
