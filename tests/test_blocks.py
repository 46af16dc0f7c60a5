"""train.activation_checkpointing and train.compile: the model's own parameter names and
checkpoint keys, activation checkpointing keeps fewer activations and trains bitwise the same
(DDP and FSDP2 on 2 ranks, dropout included); compiled whole under DDP (an MLP) and per block under FSDP2 (a GPT)
on 2 ranks trains like eager (float32 rounding apart); a compiled run SIGKILLed and resumed
compiled is bitwise the uninterrupted compiled run, and its checkpoint resumes uncompiled, as an
eager one resumes compiled.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from harness import blocks
from harness.builtin.models import Gpt
from harness.contracts import ConfigError
from tests.conftest import ROOT, assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

CHAR_LM = ROOT / "recipes" / "char_lm.yaml"
SMALL_LM = ["train.epochs=1", "train.max_steps=4", "data.max_chars=20000", "checkpoint.every_steps=1000"]
MLP = ROOT / "recipes" / "breast_cancer_mlp.yaml"


def saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Bytes autograd keeps from the forward for the backward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(idx)
    logits.sum().backward()
    return total


def gpt() -> Gpt:
    torch.manual_seed(0)
    return Gpt(in_dim=128, out_dim=64, dim=64, layers=4, heads=4, dropout=0.1)


def test_activation_checkpointing_keeps_a_fraction_of_the_activations_and_the_same_gradients():
    idx = torch.randint(0, 64, (8, 128), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = gpt(), gpt()
    names = list(checkpointed.state_dict())
    assert blocks.checkpoint_activations(checkpointed, ["_Block"]) == 4
    assert list(checkpointed.state_dict()) == names  # no wrapper prefixes
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    torch.manual_seed(2)
    full = saved_activation_bytes(plain, idx)
    torch.manual_seed(2)
    kept = saved_activation_bytes(checkpointed, idx)
    assert kept < full / 4, (kept, full)  # only the blocks' inputs and what lies outside them
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name  # dropout's masks replayed in the recomputation


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0):
        return self.linear(x).relu() * scale


def test_a_checkpointed_block_takes_keyword_arguments_and_its_input_need_not_require_grad():
    # What non-reentrant checkpointing gives and reentrant does not: keyword arguments, and
    # gradients for the block's weights when its input needs none (a block right after the data).
    torch.manual_seed(0)
    plain = torch.nn.Sequential(_Scaled())
    checkpointed = torch.nn.Sequential(_Scaled())
    checkpointed.load_state_dict(plain.state_dict())
    assert blocks.checkpoint_activations(checkpointed, ["_Scaled"]) == 1
    x = torch.randn(3, 4)
    for model in (plain, checkpointed):
        model[0](x, scale=2.0).sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert b.grad is not None and torch.equal(a.grad, b.grad)


def test_an_unknown_block_class_names_the_models_classes():
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: no module of class \['Block'\].*_Block"):
        blocks.checkpoint_activations(gpt(), ["Block"])
    with pytest.raises(ConfigError, match=r"train.compile: no module of class \['Layer'\].*Gpt"):
        blocks.compile_model(gpt(), ["Layer"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_trains_bitwise_the_same_on_two_ranks(strategy, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["train.activation_checkpointing=[_Block]"])):
        runs[name] = tmp_path / name
        proc = run_harness(CHAR_LM, [f"run.output_dir={runs[name]}", f"train.strategy={strategy}", *SMALL_LM, *extra])
        if extra:
            assert "activation checkpointing: 2 blocks (_Block)" in proc.stderr + proc.stdout
    assert_bitwise_equal(weights(runs["plain"]), weights(runs["checkpointed"]))
    assert read_json(runs["plain"] / "metrics.json") == read_json(runs["checkpointed"] / "metrics.json")


# The whole model under DDP (the MLP recipe: a short compile), each block on its own under FSDP2
# (the char-LM's GPT, its two blocks sharing one graph).
@pytest.mark.parametrize("recipe,common,setting,line", [
    (MLP, ["train.strategy=ddp", "train.epochs=1"], "true", "torch.compile: the whole model"),
    (CHAR_LM, ["train.strategy=fsdp", "model.dropout=0.0", "schedule.warmup_steps=0", *SMALL_LM], "[_Block]",
     "torch.compile: 2 blocks (_Block), each compiled on its own"),
], ids=["ddp-whole-mlp", "fsdp-per-block-gpt"])
def test_a_compiled_run_on_two_ranks_trains_like_the_eager_one(recipe, common, setting, line, tmp_path):
    # Without dropout: inductor draws its own random numbers, so only a model without them can be
    # compared with the eager run. Fused kernels add in another order: close, not bitwise.
    runs = {name: tmp_path / name for name in ("eager", "compiled")}
    run_harness(recipe, [f"run.output_dir={runs['eager']}", *common])
    proc = run_harness(recipe, [f"run.output_dir={runs['compiled']}", *common, f"train.compile={setting}"])
    assert line in proc.stderr + proc.stdout
    eager, compiled = weights(runs["eager"]), weights(runs["compiled"])
    assert not any("_orig_mod" in key for key in compiled)
    assert_close_training(eager, compiled)
    metrics = {name: read_json(folder / "metrics.json") for name, folder in runs.items()}
    assert metrics["compiled"]["val_loss"] == pytest.approx(metrics["eager"]["val_loss"], rel=1e-5)


def test_a_compiled_run_resumes_bitwise_compiled_and_also_uncompiled(tmp_path):
    compiled = ["train.compile=true", "train.epochs=2", "checkpoint.every_steps=10"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_harness(MLP, [f"run.output_dir={straight}", *compiled], nproc=1, launcher="python")
    assert "torch.compile: the whole model" in first.stderr + first.stdout
    proc = run_harness(MLP, [f"run.output_dir={killed}", *compiled], nproc=1, launcher="python", check=False,
                       env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="23"))
    assert proc.returncode != 0 and not (killed / "final").exists()
    uncompiled = tmp_path / "uncompiled"
    shutil.copytree(killed, uncompiled)
    # The checkpoint's keys are the model's own: no _orig_mod. prefix.
    saved = load_file(killed / "checkpoints" / "step-000020" / "model.safetensors")
    assert saved and not any("_orig_mod" in key for key in saved)
    run_harness(MLP, [f"run.output_dir={killed}", *compiled], nproc=1, launcher="python")
    assert_bitwise_equal(weights(straight), weights(killed))
    assert read_json(straight / "metrics.json") == read_json(killed / "metrics.json")
    # The same checkpoint resumed without compiling (train.compile is not compared on resume).
    resumed = run_harness(MLP, [f"run.output_dir={uncompiled}", "train.epochs=2", "checkpoint.every_steps=10"],
                          nproc=1, launcher="python")
    assert "step 20" in resumed.stdout and "torch.compile" not in resumed.stdout + resumed.stderr
    assert_close_training(weights(straight), weights(uncompiled))
    # And back: an eager run killed at the same step, resumed compiled.
    eager = tmp_path / "eager"
    proc = run_harness(MLP, [f"run.output_dir={eager}", "train.epochs=2", "checkpoint.every_steps=10"], nproc=1,
                       launcher="python", check=False, env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="23"))
    assert proc.returncode != 0 and not (eager / "final").exists()
    back = run_harness(MLP, [f"run.output_dir={eager}", *compiled], nproc=1, launcher="python")
    assert "step 20" in back.stdout and "torch.compile: the whole model" in back.stdout + back.stderr
    assert_close_training(weights(straight), weights(eager))


def assert_close_training(expected: dict, got: dict) -> None:
    """The same keys and weights within float32 rounding of another kernel order (the same run
    compiled and eager differ in the last bits only)."""
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-5), key

