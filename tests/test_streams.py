"""Your own IterableDataset (a stream with state_dict/load_state_dict): exact resume at the same
world size through loader workers, a clear error on another, refusals that say what to add."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from harness.contracts import ConfigError
from harness.data import LoaderSettings, as_task_data
from harness.streams import shard_of_stream
from harness.tracking import read_scalars
from tests.conftest import assert_bitwise_equal, read_json, run_harness, subprocess_env, weights

STREAMS = textwrap.dedent('''
    import torch
    from harness.streams import shard_of_stream


    class Records(torch.utils.data.IterableDataset):
        """n records read in a shuffled order per epoch, split over ranks and loader workers, each
        with random noise (an augmentation) drawn from the record and the epoch."""

        def __init__(self, n, seed, claimed=None):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 8, generator=g)
            self.y = (self.x[:, :4].sum(1) > 0).long()
            self.claimed = claimed or n
            self.position, self.epoch = 0, 0

        def __len__(self):
            return self.claimed

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            index, count = shard_of_stream()
            order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + self.epoch))
            while self.position < len(self.x):
                self.position += 1
                if (self.position - 1) % count != index:
                    continue
                i = int(order[self.position - 1])
                g = torch.Generator().manual_seed(i * 1000 + self.epoch)
                yield self.x[i] + 0.3 * torch.randn(8, generator=g), self.y[i]

        def state_dict(self):
            return {"position": self.position, "epoch": self.epoch}

        def load_state_dict(self, state):
            self.position, self.epoch = state["position"], state["epoch"]


    def records():
        return {"train": Records(320, 0), "val": Records(100, 1), "task": "multiclass", "num_classes": 2}


    class Augmented(Records):
        """Noise drawn from the global torch RNG: the loader worker's, which the harness seeds per item."""

        def __iter__(self):
            for x, y in super().__iter__():
                yield x + 0.2 * torch.randn(8), y


    def augmented():
        return {"train": Augmented(320, 0), "val": Records(100, 1), "task": "multiclass", "num_classes": 2}


    def shorter_than_claimed():
        # len() says 320, the stream has 250: each epoch ends after 7 steps, not 10.
        return {"train": Records(250, 0, claimed=320), "val": Records(100, 1), "task": "multiclass",
                "num_classes": 2}
''')

RECIPE = textwrap.dedent('''
    data: {name: streamdata:records, batch_size: 32, num_workers: 2}
    model: {name: mlp, hidden: [16], dropout: 0.1}
    schedule: {name: cosine, interval: step}
    train: {epochs: 3, log_every_steps: 2}
    checkpoint: {every_steps: 4, keep_last: 10}
''')


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("streams")
    (folder / "streamdata.py").write_text(STREAMS)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def test_two_ranks_with_workers_killed_mid_epoch_resume_bitwise_and_refuse_another_world_size(folder, tmp_path):
    recipe = folder / "recipe.yaml"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_harness(recipe, [f"run.output_dir={straight}"], nproc=2)
    proc = run_harness(recipe, [f"run.output_dir={killed}"], nproc=2, check=False,
                       env=subprocess_env(HARNESS_TEST_KILL_AT_STEP="14"))
    assert proc.returncode != 0
    newest = killed / "checkpoints" / "step-000012"
    assert (newest / "stream-rank-0.json").is_file() and (newest / "stream-rank-1.json").is_file()
    # Another world size mid-epoch: each rank's stream position cannot be re-split.
    other = run_harness(recipe, [f"run.output_dir={killed}"], nproc=1, launcher="python", check=False)
    assert other.returncode == 3, other.stderr
    assert "read by 2 rank(s); this run has 1" in other.stderr and "resume with 2 rank(s)" in other.stderr
    # Another number of loader workers: refused too, each worker's copy of the stream saved its own position.
    workers = run_harness(recipe, [f"run.output_dir={killed}", "data.num_workers=0"], nproc=2, check=False)
    assert workers.returncode != 0 and "data.num_workers=2" in workers.stderr, workers.stderr[-3000:]
    assert "exitcode  : 3 " in workers.stderr, "exit 3: an unusable checkpoint (the launcher reports 1)"
    resumed = run_harness(recipe, [f"run.output_dir={killed}"], nproc=2)
    assert "resumed from" in resumed.stdout and "step-000012" in resumed.stdout
    assert_bitwise_equal(weights(straight), weights(killed))


def test_at_an_epoch_boundary_a_stream_resumes_on_other_ranks_and_workers(folder, tmp_path):
    recipe, run_dir = folder / "recipe.yaml", tmp_path / "run"
    # 1 rank, 2 workers, stopped by max_steps at the end of epoch 1 (10 steps of 32).
    run_harness(recipe, [f"run.output_dir={run_dir}", "train.max_steps=10"], nproc=1, launcher="python")
    assert read_json(run_dir / "metrics.json")["steps"] == 10
    resumed = run_harness(recipe, [f"run.output_dir={run_dir}", "data.num_workers=0"], nproc=2)
    assert "resumed from" in resumed.stdout and "World size changed" in resumed.stderr + resumed.stdout
    summary = read_json(run_dir / "metrics.json")
    assert summary["steps"] == 30 and summary["world_size"] == 2 and summary["epochs"] == 3


def test_a_stream_shorter_than_its_len_ends_each_epoch_early(folder, tmp_path):
    recipe = folder / "recipe.yaml"
    short = tmp_path / "short"
    proc = run_harness(recipe, [f"run.output_dir={short}", "data.name=streamdata:shorter_than_claimed"],
                       nproc=1, launcher="python")
    # Each of the 2 workers batches its own 125 records: 3 full batches each, 6 steps per epoch.
    assert "epoch 3/3 step 18 " in proc.stdout, proc.stdout
    assert "the train stream ran out after 6 of 10 steps" in proc.stdout


def test_batch_size_must_divide_over_ranks_and_accumulation(folder, tmp_path):
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", "train.grad_accum_steps=3"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 2 and "data.batch_size: 32 does not divide" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


class _NoState(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), torch.tensor(0)


class _NoLength(_NoState):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _Opaque(_NoLength):
    def __len__(self):
        return 10

    def state_dict(self):
        return {"file": open(__file__)}


@pytest.mark.parametrize("dataset, expected", [
    (_NoState(), "without state_dict and load_state_dict"),
    (_NoLength(), "without __len__"),
    (_Opaque(), "_Opaque.state_dict(): "),
])
def test_streams_that_cannot_resume_are_refused_saying_what_to_add(dataset, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        as_task_data({"train": dataset, "val": dataset}, "data", 0, LoaderSettings())


# --------------------------------------------------------------------------------------------
# Exact resume of what streams change: the workers' RNG, epochs shorter than planned
# --------------------------------------------------------------------------------------------


def verify_resume(capsys, work, recipe, *args) -> str:
    from harness.cli import main

    code = main(["verify-resume", str(recipe), "--workdir", str(work), "--keep", *args])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out, out[-4000:]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_an_augmentation_from_the_global_rng_in_loader_workers_resumes_bitwise(folder, tmp_path, capsys, workers):
    verify_resume(capsys, tmp_path / "work", folder / "recipe.yaml", "data.name=streamdata:augmented",
                  f"data.num_workers={workers}", "--steps", "30", "--checkpoint-every", "14", "--kill-at", "17")


class _Noise(torch.utils.data.IterableDataset):
    """Nothing but noise from the global RNG (in a loader worker: the worker's), in the same order every epoch."""

    def __init__(self):
        self.position = 0

    def __len__(self):
        return 64

    def __iter__(self):
        index, count = shard_of_stream()
        while self.position < 64:
            self.position += 1
            if (self.position - 1) % count == index:
                yield torch.randn(4), torch.tensor(0)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_an_augmentation_from_the_global_rng_differs_between_epochs_and_not_between_reads():
    def epoch_batches(epoch: int) -> torch.Tensor:
        task = as_task_data({"train": _Noise(), "val": _Noise(), "task": "multiclass", "num_classes": 2}, run_seed=0,
                            settings=LoaderSettings(num_workers=2))
        task.train.configure(8, 1, 1)
        return torch.cat([batch.inputs for batch in task.train.batches(range(8), epoch=epoch) if batch is not None])

    first, again, second = epoch_batches(0), epoch_batches(0), epoch_batches(1)
    assert first.shape == (64, 4) and torch.equal(first, again)
    assert not torch.isclose(first, second).any(), "epoch 1 drew the same noise as epoch 0"
    assert len(torch.unique(first, dim=0)) == 64, "each item its own noise (workers not seeded alike)"


def test_a_stream_shorter_than_planned_with_workers_and_plateau_resumes_after_an_lr_cut(folder, tmp_path, capsys):
    # 6 steps per epoch, not the 10 that len() plans; a 50% cut at each epoch whose loss does not drop 30%.
    verify_resume(capsys, tmp_path / "work", folder / "recipe.yaml", "data.name=streamdata:shorter_than_claimed",
                  "schedule.name=plateau", "schedule.monitor=train_loss", "schedule.patience=0",
                  "schedule.threshold=0.3", "schedule.factor=0.5", "optim.lr=0.01",
                  "--steps", "18", "--checkpoint-every", "13", "--kill-at", "16")
    lrs = read_scalars(tmp_path / "work/uninterrupted")["lr/default"]
    assert lrs[-1][1] < 0.01, "the plateau cut the LR before the checkpoint"
