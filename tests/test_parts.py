"""The checkpoint parts, in process (harness/parts.py): what a checkpoint holds is one ordered list.
A part added to it is saved, listed in the manifest, named by `ckpt inspect` and loaded on resume,
with no other change; the shipped parts bring back the model, the optimizer and the counters."""

from __future__ import annotations

import torch

from harness import checkpoint as ckpt
from harness import parts
from harness.config import load_config
from harness.inspection import format_checkpoint, read_checkpoint
from harness.loop import build_trainer
from harness.resume import restore
from harness.snapshot import save_checkpoint
from tests.conftest import ROOT, assert_bitwise_equal


def test_a_part_added_to_the_list_is_saved_inspected_and_loaded_and_the_others_come_back(tmp_path):
    cfg = load_config(ROOT / "recipes/breast_cancer_mlp.yaml", [f"run.output_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    loaded = []

    def save(s: parts.Saving) -> parts.Files:
        return parts.Files(run={"counter.json": ckpt.json_text({"step": s.trainer.state.step})}) \
            if s.writes_run_files else parts.Files()

    def load(r: parts.Loading) -> None:
        loaded.append(ckpt._read_json(r.folder / "counter.json"))

    counter = parts.Part("counter", r"counter\.json", save, load)
    parts.PARTS.append(counter)
    try:
        trainer.state.step, trainer.state.epoch = 7, 0
        for group in trainer.optimizer.param_groups:  # optimizer state to save: one Adam step
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        trainer.optimizer.step()
        weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        moments = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
        folder = save_checkpoint(trainer, trainer.store, "every_steps")
        assert "counter.json" in ckpt.verify(folder)["files"], "in the manifest, committed with the rest"
        shown = "\n".join(format_checkpoint(read_checkpoint(folder)))
        assert any(line.split()[0] == "counter.json" and line.split()[-1] == "counter" for line in shown.splitlines()
                   if line.startswith("  "))

        with torch.no_grad():
            for p in trainer.raw_model.parameters():
                p.add_(1.0)
        trainer.optimizer.state.clear()
        trainer.state.step = 0
        restore(trainer, folder)
        assert loaded == [{"step": 7}]
        assert trainer.state.step == 7
        assert_bitwise_equal(trainer.raw_model.state_dict(), weights)
        assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    finally:
        parts.PARTS.remove(counter)
    assert parts.part_of("counter.json") is None and parts.part_of("trainer.json") == "trainer"
