"""README claims about single options, each proven on one process: the DataLoader settings and
`harness.data.item_generator()`, `data.shuffle`/`drop_last`, `run.deterministic`, `train.device`,
a fixed `preemption.check_every_steps`, `preemption.graceful_interrupt: false`, a DataLoader
worker killed by SIGKILL (what the OOM killer sends), the progress bar on a terminal, `train.fsdp_wrap`,
and the data factory's error branches."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from harness import data as hdata
from harness import items as hitems
from harness import commands, sharding
from harness.checkpoint import verify
from harness.contracts import ConfigError
from tests.conftest import (ROOT, assert_bitwise_equal, harness_command, read_json, run_harness,
                            subprocess_env, weights)

PROJECT = textwrap.dedent('''
    import os
    import signal

    import torch

    import harness.data


    class Noisy(torch.utils.data.Dataset):
        """Augmented with harness.data.item_generator(); notes which process loaded it, and whether
        deterministic algorithms were on, in files under $OPTIONS_TRACE."""

        def __init__(self, n, seed, name):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 8, generator=g)
            self.y = (self.x[:, :4].sum(1) > 0).long()
            self.name = name

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            trace = os.environ.get("OPTIONS_TRACE")
            if trace:
                where = "worker" if torch.utils.data.get_worker_info() is not None else "main"
                with open(os.path.join(trace, f"{self.name}-{where}-{os.getpid()}"), "a") as f:
                    f.write(f"{int(torch.are_deterministic_algorithms_enabled())}\\n")
            noise = torch.randn(8, generator=harness.data.item_generator())
            return self.x[i] + 0.3 * noise, self.y[i]


    def table(n: int = 300):
        return {"train": Noisy(n, 0, "train"), "val": Noisy(60, 1, "val"), "task": "multiclass", "num_classes": 2}


    class Doomed(Noisy):
        def __getitem__(self, i):
            if i == 40 and torch.utils.data.get_worker_info() is not None:
                os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
            return super().__getitem__(i)


    def doomed():
        return {"train": Doomed(300, 0, "train"), "val": Noisy(60, 1, "val"), "task": "multiclass",
                "num_classes": 2}
''')

RECIPE = textwrap.dedent('''
    data: {name: project:table, batch_size: 32}
    model: {name: mlp, hidden: [16], dropout: 0.1}
    schedule: {name: cosine, interval: step}
    train: {epochs: 3, log_every_steps: 5}
''')
BREAST_CANCER = ROOT / "recipes/breast_cancer_mlp.yaml"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("options")
    (folder / "project.py").write_text(PROJECT)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def traced(folder: Path, tmp_path: Path, name: str, overrides=()) -> tuple[Path, Path]:
    """Runs the recipe on one process with the dataset's trace in <tmp>/<name>-trace."""
    run_dir, trace = tmp_path / name, tmp_path / f"{name}-trace"
    trace.mkdir()
    run_harness(folder / "recipe.yaml", [f"run.output_dir={run_dir}", *overrides], nproc=1, launcher="python",
                env=subprocess_env(OPTIONS_TRACE=str(trace), HARNESS_TRACE_SAMPLES=str(tmp_path / f"{name}-steps")))
    return run_dir, trace


def loader_pids(trace: Path, split: str, where: str = "worker") -> set[str]:
    return {path.name.split("-")[2] for path in trace.glob(f"{split}-{where}-*")}


def test_loader_settings_and_item_generator_train_bitwise_like_loading_in_the_process(folder, tmp_path):
    inline, inline_trace = traced(folder, tmp_path, "inline", ["data.num_workers=0"])
    kept, kept_trace = traced(folder, tmp_path, "kept", ["data.num_workers=2", "data.pin_memory=true",
                                                          "data.persistent_workers=true", "data.prefetch_factor=4"])
    fresh, fresh_trace = traced(folder, tmp_path, "fresh", ["data.num_workers=2"])
    assert_bitwise_equal(weights(inline), weights(kept))
    assert_bitwise_equal(weights(inline), weights(fresh))
    assert not loader_pids(inline_trace, "train") and len(loader_pids(inline_trace, "train", "main")) == 1, \
        "num_workers 0 loads in the training process"
    # 3 epochs: persistent_workers keeps the same 2 loader processes, without it each epoch starts 2.
    assert len(loader_pids(kept_trace, "train")) == 2
    assert len(loader_pids(fresh_trace, "train")) == 6


def test_item_generator_is_seeded_per_sample_and_epoch_and_refused_outside_loading():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3, generator=hdata.item_generator())

    items = hitems._SeededItems(Draw(), "train", run_seed=7, reference=None, in_worker_safe=False)
    assert torch.equal(items[(2, 0)], items[(2, 0)])
    assert not torch.equal(items[(2, 0)], items[(2, 1)]), "another epoch, another draw"
    assert not torch.equal(items[(2, 0)], items[(3, 0)]), "another sample, another draw"
    other_seed = hitems._SeededItems(Draw(), "train", run_seed=8, reference=None, in_worker_safe=False)
    assert not torch.equal(items[(2, 0)], other_seed[(2, 0)])
    with pytest.raises(RuntimeError, match="meant for a Dataset's __getitem__"):
        hdata.item_generator()


def test_no_shuffle_drop_last_deterministic_and_device_cpu(folder, tmp_path):
    run_dir, trace = traced(folder, tmp_path, "ordered", ["data.shuffle=false", "data.drop_last=true",
                                                           "run.deterministic=true", "train.device=cpu",
                                                           "train.epochs=2"])
    steps = [json.loads(line) for line in (tmp_path / "ordered-steps.rank0").read_text().splitlines()]
    # 300 samples, batches of 32: 9 full batches an epoch (the last 12 samples dropped), in order.
    assert read_json(run_dir / "metrics.json")["steps"] == 18
    for epoch in (0, 1):
        order = [i for record in steps if record["epoch"] == epoch for i in record["indices"]]
        assert order == list(range(288))
    flags = {line for path in trace.glob("train-*") for line in path.read_text().split()}
    assert flags == {"1"}, "torch.use_deterministic_algorithms was on while training"


def test_train_device_cuda_without_a_gpu_is_a_clear_error(folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", "train.device=cuda"], nproc=1,
                       launcher="python", check=False)
    assert proc.returncode == 2 and "train.device: 'cuda' asked for, but torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dataloader_worker_killed_by_sigkill_is_called_that(folder, tmp_path):
    recipe = folder / "doomed.yaml"
    recipe.write_text(RECIPE.replace("project:table", "project:doomed") + "checkpoint: {every_steps: 3}\n")
    proc = run_harness(recipe, [f"run.output_dir={tmp_path / 'run'}", "data.num_workers=2"], nproc=1,
                       launcher="python", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # torch words it "killed by signal: Killed" or, when its watchdog notices first, "exited unexpectedly".
    said = next((line for line in proc.stderr.splitlines()
                 if line.startswith("harness: data error: DataLoader worker (pid")), proc.stderr[-3000:])
    assert ("was killed with SIGKILL, most likely by the out-of-memory killer" in said
            or "died without an error of its own; SIGKILL from the out-of-memory killer is the usual cause" in said)
    assert said.endswith("Lower data.num_workers or data.prefetch_factor, or the memory an item takes."), said
    # No traceback of ours (under load the stdlib's multiprocessing may print one from a thread of its
    # own while the surviving worker is torn down).
    assert not re.search(r'File "[^"]*/harness/\w+\.py"', proc.stderr), proc.stderr[-3000:]


def popen(run_dir: Path, overrides=(), recipe=BREAST_CANCER, **kwargs) -> subprocess.Popen:
    cmd = harness_command(recipe, [f"run.output_dir={run_dir}", "train.epochs=300", "checkpoint.every_steps=30",
                                   "train.log_every_steps=10", *overrides], 1, "python")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(HARNESS_TEST_SAVE_FILE_DELAY_S="0.02"),
                            start_new_session=True, **kwargs)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


def test_a_fixed_check_every_steps_stops_on_a_multiple_of_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = popen(run_dir, ["preemption.check_every_steps=7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 75, out[-3000:]
    marker = read_json(run_dir / "PREEMPTED.json")
    # Signalled after the first checkpoint (the end of epoch 1, step 15, or step 30): the stop is the
    # next multiple of 7 the ranks agree at.
    assert marker["step"] % 7 == 0 and marker["step"] >= 21, marker
    assert verify(Path(marker["checkpoint"]))["step"] == marker["step"]


def test_graceful_interrupt_false_makes_the_first_ctrl_c_abort_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = popen(run_dir, ["preemption.graceful_interrupt=false"], stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(run_dir, proc)
    before = {p.name for p in (run_dir / "checkpoints").glob("step-*")}
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    out = finish(proc)
    assert proc.returncode == 130, out[-3000:]
    assert time.monotonic() - started < 10
    assert "aborted by Ctrl-C without a checkpoint (preemption.graceful_interrupt is false)" in out
    assert not (run_dir / "PREEMPTED.json").exists()
    after = {p.name for p in (run_dir / "checkpoints").glob("step-*")}
    # No stop checkpoint; at most a periodic save the abort let finish or removed unfinished.
    assert all(verify(run_dir / "checkpoints" / name) for name in after)
    assert len(after - before) <= 1


def on_a_terminal(cmd: list[str], columns: int) -> str:
    """Runs ``cmd`` with a pty as stdout and stderr, ``columns`` wide (0: a pty that reports no
    size); returns what it wrote."""
    primary, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 40 if columns else 0, columns, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=replica,
                            stderr=replica, start_new_session=True)
    os.close(replica)
    chunks = []
    while select.select([primary], [], [], 60)[0]:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("columns", [120, 0])
def test_a_terminal_gets_a_progress_bar_with_the_log_lines_above_it(tmp_path, columns):
    screen = on_a_terminal(harness_command(BREAST_CANCER, [f"run.output_dir={tmp_path / 'run'}", "train.epochs=3"],
                                           1, "python"), columns)
    assert "/45 [" in screen and "100%|" in screen and "step/s" in screen, screen[-2000:]
    assert "[harness] step" not in screen, "the bar, not the plain lines"
    # Each log line starts a line of its own: the bar is cleared before it and drawn again below it.
    shown = [line.rstrip("\r").split("\r")[-1] for line in screen.split("\n") if "[harness] epoch" in line]
    assert len(shown) == 3 and all(re.match(r"\[harness\] epoch \d/3 step", line) for line in shown), shown


def test_a_log_file_gets_a_plain_line_every_progress_every_s(tmp_path):
    plain = run_harness(BREAST_CANCER, [f"run.output_dir={tmp_path / 'file'}", "train.epochs=3",
                                        "train.progress_every_s=0"], nproc=1, launcher="python")
    assert "\r" not in plain.stdout and "%|" not in plain.stdout + plain.stderr
    lines = [line for line in plain.stdout.splitlines() if line.startswith("[harness] step ")]
    assert len(lines) == 45 and lines[-1].startswith("[harness] step 45/45 | epoch 3 | lr "), lines[-1:]


def test_fsdp_wrap_chooses_the_units_by_class_name():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Block(), Block(), torch.nn.Linear(4, 2))
    assert sharding.units(model, ["Block"]) == [model[1], model[2]]
    # Default: the outermost modules that hold parameters themselves (a Block holds none: its Linear).
    assert sharding.units(model, None) == [model[0], model[1].linear, model[2].linear, model[3]]
    with pytest.raises(ConfigError, match=r"train.fsdp_wrap: no module of class \['Blok'\] in the model; its "
                                          r"classes: Block, Linear, Sequential"):
        sharding.units(model, ["Blok"])


class Empty(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(3), torch.tensor(i % 2)


TABLE = (torch.randn(8, 3), torch.arange(8) % 2)
GRAPH = dict(x=torch.randn(6, 3), y=torch.arange(6) % 2, edge_index=torch.tensor([[0, 1], [1, 2]]),
             train_mask=torch.ones(6, dtype=torch.bool), val_mask=torch.ones(6, dtype=torch.bool))


@pytest.mark.parametrize("result, settings, message", [
    ({"train": Pairs()}, None, "the factory's dict lacks 'val'; expected keys train, val"),
    ({"train": TABLE}, None, r"the factory's dict lacks \['val'\]"),
    ({"train": TABLE, "val": TABLE}, hdata.LoaderSettings(hops=2), "data.hops / data.num_neighbors apply to "
                                                                    "node-level learning on one graph"),
    ({"train": TABLE, "val": TABLE, "task": "ranking"}, None, "task 'ranking': expected binary, multiclass or "
                                                              "regression"),
    (Data(**{k: v for k, v in GRAPH.items() if k != "y"}), None, "the graph has no 'y'"),
    (Data(**{k: v for k, v in GRAPH.items() if k != "val_mask"}), None, "the graph has no 'val_mask'"),
    ({"train": Empty(), "val": Pairs()}, None, "the train split is empty"),
    ([1, 2, 3], None, "the data factory returned a list; expected a harness.contracts.TaskData"),
])
def test_what_a_data_factory_returns_wrongly_is_named(result, settings, message):
    with pytest.raises(ConfigError, match=message):
        hdata.as_task_data(result, "data: project:factory", settings=settings)


def test_a_forward_that_needs_what_the_data_lacks_is_named():
    class NeedsEdges(torch.nn.Module):
        def forward(self, x, edge_attr):
            return x

    with pytest.raises(ConfigError, match=r"model: NeedsEdges.forward needs 'edge_attr', which this data does not "
                                          r"provide; a batch here has: x, edge_index"):
        hdata.call_model(NeedsEdges(), torch.zeros(2, 3), {"edge_index": torch.zeros(2, 1)})


@pytest.mark.parametrize("torch_says, we_say", [
    ("DataLoader worker (pid 123) is killed by signal: Killed. ", "was killed with SIGKILL, most likely by the "
                                                                  "out-of-memory killer"),
    ("DataLoader worker (pid(s) 123) exited unexpectedly", "died without an error of its own; SIGKILL from the "
                                                            "out-of-memory killer is the usual cause"),
])
def test_both_ways_torch_reports_a_killed_worker_are_explained(torch_says, we_say):
    said = commands.worker_death_message(RuntimeError(torch_says))
    assert said.startswith(torch_says) and we_say in said and "Lower data.num_workers" in said
    assert commands.worker_death_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert commands.worker_death_message(ValueError(torch_says)) is None
