"""The inspection commands on real files: check, ckpt list/inspect, plot-lr, verify-resume.

One short real training run (breast cancer, 3 epochs of 15 steps, stopped at step 20 and resumed)
is shared by the ckpt and plot-lr tests; every command runs as users run it, as a process.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from harness.cli import build_parser, main
from harness.config import ConfigError
from harness.inspection import resume_points
from harness.verify import plan_interruption
from tests.conftest import ROOT, assert_bitwise_equal, harness_cli, read_json

RECIPE = ROOT / "recipes/breast_cancer_mlp.yaml"
# 455 training samples, batch 32 -> 15 steps per epoch; 3 epochs = 45 steps. A per-step exponential
# schedule and a second param group make every checkpoint's LRs distinct, non-round numbers.
RUN = ["train.epochs=3", "checkpoint.every_steps=10", "checkpoint.keep_last=10", "schedule.name=exponential",
       "schedule.interval=step", "schedule.gamma=0.97", 'optim.param_groups=[{name: first, params: ["layers.0.*"], lr: 1e-4}]']
STOP_STEP = 20  # the first process stops here (train.max_steps); the second resumes from it
# every_steps 10 (not at epoch ends) + every epoch end (15, 30, 45); keep_last 10 keeps them all
CHECKPOINT_STEPS = [10, 15, 20, 30, 40, 45]


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    harness_cli("train", RECIPE, f"run.output_dir={run_dir}", *RUN, f"train.max_steps={STOP_STEP}")
    second = harness_cli("train", RECIPE, f"run.output_dir={run_dir}", *RUN)
    assert f"step {STOP_STEP}, 160 samples into the epoch" in second.stdout
    return run_dir


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def lr_table(stdout: str) -> dict[int, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"^\s+(\d+)\s+(\d+)\s+((?:[0-9.e+-]+\s+)*[0-9.e+-]+)(?:\s{2}\D.*)?$", line)
        if match and "parameters" not in line:
            rows[int(match.group(1))] = [float(v) for v in match.group(3).split()]
    return rows


def test_check_prints_steps_rank_shares_and_the_planned_lr(tmp_path):
    png = tmp_path / "preview.png"
    out = harness_cli("check", RECIPE, "--world-size", "2", "--png", png).stdout
    assert "steps per epoch: 15" in out  # 455 train samples / batch 32
    assert "total steps: 750 (15 x 50 epochs)" in out
    assert "samples per rank per step: ranks 0-1: 16" in out
    assert "train samples per rank per epoch: rank 0: 228, rank 1: 227" in out
    assert "validation samples per rank: ranks 0-1: 57" in out
    assert re.search(r"default\s+4,097 parameters in 6 tensors", out)  # 30*64+64 + 64*32+32 + 32+1
    rows = lr_table(out)
    assert {1, 2, 3, 301, 601, 750} <= rows.keys(), rows.keys()
    for step, (lr,) in rows.items():  # StepLR(step_size=20 epochs, gamma=0.5) from 1e-3
        assert lr == pytest.approx(1e-3 * 0.5 ** (((step - 1) // 15) // 20), rel=1e-6), step
    assert "epoch 21 start (LR changes)" in out
    assert png_size(png) == (900, 450)


def check_in_process(capsys, *args) -> tuple[int, str, str]:
    """The variants below run in this process: the same main(), without a second torch import."""
    code = main(["check", str(RECIPE), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_param_groups_and_horizon_warnings(capsys):
    code, out, _ = check_in_process(capsys, "--no-png", "schedule.name=cosine", "schedule.interval=step",
                                    "schedule.T_max=300", "--world-size", "3",
                                    'optim.param_groups=[{name: first, params: ["layers.0.*"], lr: 1e-4}]')
    assert code == 0
    assert re.search(r"first\s+1,984 parameters in 2 tensors\s+lr 0.0001", out)
    assert re.search(r"default\s+2,113 parameters in 4 tensors\s+lr 0.001", out)
    assert "WARNING: schedule.T_max=300 but the planned run has 750 optimizer steps" in out
    assert "LR preview plot" not in out  # --no-png
    code, _, _ = check_in_process(capsys, "--no-png", "--strict", "schedule.name=cosine", "schedule.interval=step",
                                  "schedule.T_max=300")
    assert code == 2
    # OneCycleLR stepped past total_steps raises: check says so and exits 2, as training would fail.
    code, failing, _ = check_in_process(capsys, "--no-png", "schedule.name=onecycle", "schedule.interval=step",
                                        "schedule.total_steps=100")
    assert code == 2
    assert "OneCycleLR raises an error" in failing and "ERROR: schedule (onecycle)" in failing


def test_check_plateau_preview_is_flat_with_a_note(tmp_path, capsys):
    code, out, _ = check_in_process(capsys, "--png", tmp_path / "p.png", "schedule.name=plateau", "train.epochs=4")
    assert code == 0
    assert set(lr for row in lr_table(out).values() for lr in row) == {1e-3}
    assert "note: ReduceLROnPlateau lowers the LR" in out
    assert png_size(tmp_path / "p.png") == (900, 450)


def test_check_reports_config_errors_with_exit_2(capsys):
    code, _, err = check_in_process(capsys, "optim.lrr=0.1")
    assert code == 2 and "Did you mean 'optim.lr'?" in err


# --------------------------------------------------------------------------------------------
# ckpt list / inspect
# --------------------------------------------------------------------------------------------


def listed_steps(stdout: str) -> list[int]:
    return [int(line.split()[0]) for line in stdout.splitlines() if re.match(r"^\s+\d+\s", line)]


def test_ckpt_list_shows_every_checkpoint_verified(resumed_run):
    out = harness_cli("ckpt", "list", resumed_run).stdout
    assert listed_steps(out) == CHECKPOINT_STEPS
    rows = {int(line.split()[0]): line for line in out.splitlines() if re.match(r"^\s+\d+\s", line)}
    lrs = read_json(resumed_run / "checkpoints" / "step-000020" / "trainer.json")["lrs"]
    assert re.search(rf"^\s+20\s+1 \+160\s+every_steps\s+first={lrs[0]:.4g} default={lrs[1]:.4g}\s", rows[20])
    assert "epoch_end" in rows[30] and "2 +0" in rows[30]
    assert all(line.split()[-1] == "yes" or "run.resume=auto" in line for line in rows.values())
    assert "run.resume=auto takes this" in rows[45]


def test_ckpt_inspect_shows_the_saved_lrs_and_counters(resumed_run):
    folder = resumed_run / "checkpoints" / "step-000020"
    out = harness_cli("ckpt", "inspect", folder).stdout
    saved = read_json(folder / "trainer.json")
    shown = {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (first|default): (\S+)$", out, re.M)}
    assert shown == dict(zip(saved["group_names"], saved["lrs"]))  # exactly, not approximately
    assert shown["default"] == pytest.approx(1e-3 * 0.97 ** 20, rel=1e-12)  # the LR of step 21
    assert "step: 20" in out and "epoch: 1 completed" in out and "samples into epoch 2: 160" in out
    assert "world size: 1" in out and "reason: every_steps" in out and "versions: torch " in out
    assert re.search(r"model\.safetensors\s+[\d,]+ bytes", out)
    assert "manifest: verified (7 files" in out
    # Every file is named by the checkpoint part it belongs to (harness/parts.py).
    parts = dict(re.findall(r"^  (\S+)\s+[\d,]+ bytes  (\S+)", out, re.M))
    assert parts == {"MANIFEST.json": "the", "model.safetensors": "model", "optimizer.safetensors": "optimizer",
                     "optimizer.json": "optimizer", "trainer.json": "trainer", "scheduler.json": "scheduler",
                     "rng-rank-0.json": "rng", "rng-rank-0.safetensors": "rng"}


def test_ckpt_damaged_checkpoint_exits_3_naming_the_file(resumed_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(resumed_run / "checkpoints", copy / "checkpoints")
    model = copy / "checkpoints" / "step-000040" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])  # truncated
    (copy / "checkpoints" / ".tmp-step-000050").mkdir()  # a save interrupted by a crash
    assert main(["ckpt", "list", str(copy)]) == 3
    listing = capsys.readouterr().out
    rows = {int(line.split()[0]): line for line in listing.splitlines() if re.match(r"^\s+\d+\s", line)}
    assert "NO:" in rows[40] and "model.safetensors" in rows[40] and "truncated" in rows[40]
    assert "NO:" in rows[50] and "never committed" in rows[50]
    assert "run.resume=auto takes this" in rows[45]
    assert main(["ckpt", "inspect", str(model.parent)]) == 3
    inspected = capsys.readouterr().out
    assert "manifest: NOT verified" in inspected and "model.safetensors" in inspected


def test_ckpt_errors_on_missing_folders(tmp_path, capsys):
    assert main(["ckpt", "list", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert main(["ckpt", "list", str(tmp_path / "empty")]) == 3
    assert main(["ckpt", "inspect", str(tmp_path / "empty")]) == 2
    assert "is a run folder" in capsys.readouterr().err


def test_ckpt_export_writes_the_newest_checkpoints_weights_and_refuses_to_overwrite(resumed_run, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", str(resumed_run), str(out)]) == 0
    exported, final = load_file(out), load_file(resumed_run / "final" / "model.safetensors")
    assert_bitwise_equal(exported, final)
    assert f"wrote {out}" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["ckpt", "export", str(resumed_run), str(out)]) == 2  # exists: not overwritten
    assert "exists; not overwritten" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["ckpt", "export", str(tmp_path / "nothing"), str(tmp_path / "a.safetensors")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert main(["ckpt", "export", str(tmp_path / "empty"), str(tmp_path / "b.safetensors")]) == 3
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


# --------------------------------------------------------------------------------------------
# plot-lr
# --------------------------------------------------------------------------------------------


def test_plot_lr_writes_a_png_and_marks_the_resume(resumed_run):
    assert resume_points(resumed_run) == [STOP_STEP]
    out = harness_cli("plot-lr", resumed_run).stdout
    assert "lr/default, lr/first up to step 45" in out and "resumed from steps: 20" in out
    assert "train/loss" in out and "val/loss" in out
    assert png_size(resumed_run / "lr.png") == (1300, 450)


def test_plot_lr_without_tensorboard_files_exits_2(tmp_path, capsys):
    assert main(["plot-lr", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no TensorBoard folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# verify-resume
# --------------------------------------------------------------------------------------------


def test_interruption_plan_puts_the_kill_after_a_mid_epoch_checkpoint():
    plan = plan_interruption(steps_per_epoch=15, planned_steps=750)
    assert (plan.steps, plan.checkpoint_every, plan.kill_at, plan.resume_step) == (45, 20, 25, 20)
    assert plan.resume_step % 15 != 0  # mid-epoch
    plan = plan_interruption(steps_per_epoch=1, planned_steps=100)  # full-batch: one step per epoch
    assert (plan.steps, plan.checkpoint_every, plan.kill_at) == (20, 10, 15)
    plan = plan_interruption(steps_per_epoch=15, planned_steps=750, steps=20)
    assert plan.checkpoint_every < plan.kill_at < 2 * plan.checkpoint_every and plan.kill_at <= 20
    assert plan_interruption(15, 750, kill_at=12).resume_step <= 12
    with pytest.raises(ConfigError, match="--kill-at"):
        plan_interruption(15, 750, steps=30, checkpoint_every=20, kill_at=10)
    with pytest.raises(ConfigError, match="plans only"):
        plan_interruption(15, 45, steps=100)


# verify-resume itself runs in this process (its three runs are real processes), saving a start-up.
# On 1 process (the default) it passes in test_resume_holes.py::test_verify_resume_kills_after_*, on
# the same recipe, and in test_user_components.py on a user's recipe.


def test_verify_resume_on_two_ranks_kills_every_rank_and_passes(tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["verify-resume", str(RECIPE), "--nproc", "2", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "on 2 process(es): 45 steps (15 per epoch), checkpoint every 20 steps, SIGKILL after step 25: resumes " \
           "from step 20 (5 steps into epoch 2)" in out
    assert "final weights: 6 tensors, 4,097 values, bitwise equal" in out
    assert "resumed from" in out and "step 20, 160 samples into the epoch" in out
    assert "PASS" in out and "FAIL" not in out
    for run in ("uninterrupted", "interrupted"):
        assert read_json(work / run / "metrics.json")["world_size"] == 2
        assert read_json(work / run / "metrics.json")["steps"] == 45
    # Killed once both ranks had reported step 25 done: the launcher's whole tree, SIGKILLed.
    assert sorted(p.name for p in (work / "ready").iterdir()) == ["rank-0", "rank-1"]
    assert re.search(r"killed \(exit -9\) after [\d.]+ s; checkpoints on disk: step-000020\n", out), out
    # The killed run's LR points for steps 21-25 were flushed to disk before the kill (and purged on resume).
    assert len(list((work / "interrupted" / "tb").glob("events.out.tfevents.*"))) == 2


def test_verify_resume_reports_the_first_difference_of_a_broken_resume(tmp_path, capsys):
    # The changed seed is allowed explicitly: otherwise the resumed run refuses the changed recipe (exit 3).
    assert main(["verify-resume", str(RECIPE), "--workdir", str(tmp_path / "work"), "--break", "run.seed=1",
                 "--break", "run.on_change=allow"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "PASS" not in out
    # Another seed reorders the rest of epoch 2: the first train-loss window after the resume differs.
    assert re.search(r"first difference: loss series: train/loss at step 30: uninterrupted \S+, resumed \S+", out)
    assert re.search(r"final weights: first difference: tensor \S+: max abs diff \S+", out)


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["check"], ["ckpt"], ["ckpt", "list"], ["ckpt", "inspect"],
                                     ["plot-lr"], ["verify-resume"]])
def test_every_command_has_help_with_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: harness" in text and "examples:" in text and "exit codes" in text
    if not command:
        for code in ("0 ", "1 ", "2 ", "3 ", "75 "):
            assert f"\n  {code}" in text
    if command == ["verify-resume"]:
        assert "--break" in text and "Self-test" in text
