"""Your own torch Dataset through DataLoader workers: exact resume, randomness independent of workers and ranks."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import assert_bitwise_equal, run_harness, subprocess_env, weights

DATASET = textwrap.dedent('''
    import torch
    from torch_geometric.data import Data


    class Augmented(torch.utils.data.Dataset):
        """Each item gets fresh random noise from the global RNG (an augmentation) and costs a
        little work, as decoding would."""

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 8, generator=g)
            self.y = (self.x[:, :4].sum(1) > 0).long()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            noise = torch.randn(8)  # seeded by the harness from (run seed, epoch, i)
            return self.x[i] + 0.3 * noise, self.y[i]


    def table(n: int = 300):
        return {"train": Augmented(n, 0), "val": Augmented(100, 1), "task": "multiclass", "num_classes": 2}


    class Graphs(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.graphs = []
            for _ in range(n):
                nodes = int(torch.randint(4, 9, (1,), generator=g))
                x = torch.randn(nodes, 3, generator=g)
                src = torch.arange(1, nodes)
                dst = torch.randint(0, nodes - 1, (nodes - 1,), generator=g).clamp(max=src - 1)
                edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
                self.graphs.append(Data(x=x, edge_index=edge_index, y=x.sum().view(1, 1)))

        def __len__(self):
            return len(self.graphs)

        def __getitem__(self, i):
            graph = self.graphs[i].clone()
            graph.x = graph.x + 0.05 * torch.randn_like(graph.x)  # augmentation
            return graph


    def graphs():
        return {"train": Graphs(200, 0), "val": Graphs(40, 1), "task": "regression"}


    class Broken(Augmented):
        def __getitem__(self, i):
            if i == 17:
                raise ValueError("corrupt record 17")
            return super().__getitem__(i)


    def broken():
        return {"train": Broken(100, 0), "val": Augmented(20, 1), "task": "multiclass", "num_classes": 2}


    class Ragged(Augmented):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x[:5] if i == 23 else x), y


    def ragged():
        return {"train": Ragged(100, 0), "val": Augmented(20, 1), "task": "multiclass", "num_classes": 2}


    def node_graph():
        """One graph of 600 nodes whose labels follow their neighbours', with train/val masks."""
        g = torch.Generator().manual_seed(3)
        y = torch.arange(600) % 3  # edges below mostly join nodes whose index is the same mod 3
        src = torch.randint(0, 600, (6000,), generator=g)
        dst = torch.where(torch.rand(6000, generator=g) < 0.8,
                          (y[src] + 3 * torch.randint(0, 199, (6000,), generator=g)) % 600, src.flip(0))
        x = torch.nn.functional.one_hot(y, 3).float() + 1.5 * torch.randn(600, 3, generator=g)
        mask = torch.rand(600, generator=g)
        return Data(x=x, y=y, edge_index=torch.stack([src, dst]), train_mask=mask < 0.6,
                    val_mask=(mask >= 0.6) & (mask < 0.8), test_mask=mask >= 0.8)


    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(8), torch.tensor(0)


    def stream():
        return {"train": Stream(), "val": Augmented(20, 1)}
''')

RECIPE = textwrap.dedent('''
    data: {name: userdata:table, batch_size: 32, num_workers: 2}
    model: {name: mlp, hidden: [16], dropout: 0.1}
    schedule: {name: cosine, interval: step}
    train: {epochs: 3, log_every_steps: 2}
    checkpoint: {every_steps: 4, keep_last: 10}
''')
# 300 samples / 32 -> 10 steps per epoch, 30 in all; killed at step 14 (mid epoch 2), resumed from 12.
KILL_AT = 14


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("userdata")
    (folder / "userdata.py").write_text(DATASET)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def trace(prefix: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(prefix.parent.glob(prefix.name + ".rank*"))
            for line in path.read_text().splitlines()]


def test_zero_and_two_workers_train_bitwise_alike_with_random_augmentation(folder, tmp_path):
    zero, two = tmp_path / "zero", tmp_path / "two"
    run_harness(folder / "recipe.yaml", [f"run.output_dir={zero}", "data.num_workers=0"], nproc=1, launcher="python")
    run_harness(folder / "recipe.yaml", [f"run.output_dir={two}", "data.num_workers=2"], nproc=1, launcher="python")
    assert_bitwise_equal(weights(zero), weights(two))


def test_two_ranks_with_workers_killed_mid_epoch_resume_bitwise_and_see_each_sample_once(folder, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    recipe = folder / "recipe.yaml"
    run_harness(recipe, [f"run.output_dir={straight}"], nproc=2)
    before, after = tmp_path / "before", tmp_path / "after"
    proc = run_harness(recipe, [f"run.output_dir={killed}"], nproc=2, check=False,
                       env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(KILL_AT), HARNESS_TRACE_SAMPLES=str(before)))
    assert proc.returncode != 0
    run_harness(recipe, [f"run.output_dir={killed}"], nproc=2, env=subprocess_env(HARNESS_TRACE_SAMPLES=str(after)))
    assert_bitwise_equal(weights(straight), weights(killed))
    # Epoch 1 (steps 11-20): steps 11-12 before the checkpoint the resume took, 13-20 after it.
    seen = [i for record in trace(before) if record["epoch"] == 1 and record["step"] <= 12 for i in record["indices"]]
    seen += [i for record in trace(after) if record["epoch"] == 1 for i in record["indices"]]
    assert sorted(seen) == list(range(300)), "every sample of the interrupted epoch exactly once, across ranks"


def killed_and_resumed_like_straight(recipe, tmp_path, kill_at: int, resumed_from: int, straight_settings=(),
                                     settings=()):
    """One process: a straight run, and one SIGKILLed at step ``kill_at`` then rerun, which must
    resume from checkpoint ``resumed_from`` and end bitwise equal. Returns the straight run's
    folder and its process."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_harness(recipe, [f"run.output_dir={straight}", *(straight_settings or settings)], nproc=1,
                        launcher="python")
    run_harness(recipe, [f"run.output_dir={killed}", *settings], nproc=1, launcher="python", check=False,
                env=subprocess_env(HARNESS_TEST_KILL_AT_STEP=str(kill_at)))
    proc = run_harness(recipe, [f"run.output_dir={killed}", *settings], nproc=1, launcher="python")
    assert "resumed from" in proc.stdout and f"step-{resumed_from:06d}" in proc.stdout
    assert_bitwise_equal(weights(straight), weights(killed))
    return straight, first


def test_graph_level_data_from_a_dataset_of_pyg_graphs_resumes_mid_epoch_exactly(folder, tmp_path):
    recipe = folder / "graphs.yaml"
    recipe.write_text("data: {name: userdata:graphs, batch_size: 16, num_workers: 2}\n"
                      "model: {name: gin, hidden: 16, layers: 2}\n"
                      "train: {epochs: 2}\ncheckpoint: {every_steps: 5}\n")
    killed_and_resumed_like_straight(recipe, tmp_path, kill_at=17, resumed_from=15)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_that_fails_to_load_names_its_index_and_the_datasets_own_traceback(folder, tmp_path, workers):
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", "data.name=userdata:broken",
                                                f"data.num_workers={workers}"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 1
    assert "sample 17 of the train split" in proc.stderr and "corrupt record 17" in proc.stderr
    assert "userdata.py" in proc.stderr, "the dataset's own file and line"


def test_an_item_of_another_shape_names_its_index_and_what_was_expected(folder, tmp_path):
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", "data.name=userdata:ragged",
                                                "data.num_workers=0"], nproc=1, launcher="python", check=False)
    assert proc.returncode == 1
    assert "sample 23 of the train split" in proc.stderr and "(5,)" in proc.stderr and "(8,)" in proc.stderr


def test_an_iterable_dataset_without_state_is_refused_saying_what_to_give(folder, tmp_path):
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", "data.name=userdata:stream"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 2 and "IterableDataset" in proc.stderr and "__getitem__" in proc.stderr


def test_more_workers_than_cores_warn(folder, tmp_path):
    cores = len(os.sched_getaffinity(0))
    proc = run_harness(folder / "recipe.yaml", [f"run.output_dir={tmp_path / 'run'}", f"data.num_workers={cores + 1}",
                                                "train.epochs=1"], nproc=1, launcher="python")
    assert f"data.num_workers={cores + 1} is more than the {cores} CPU cores" in proc.stdout + proc.stderr


def test_node_mini_batches_with_k_hop_neighbourhoods_cut_in_workers_resume_mid_epoch_exactly(tmp_path):
    from tests.conftest import ROOT

    recipe = ROOT / "recipes/gcn_plateau.yaml"
    settings = ["data.subgraph_hops=3", "data.num_workers=2", "data.batch_size=64", "train.epochs=2",
                "checkpoint.every_steps=5"]
    killed_and_resumed_like_straight(recipe, tmp_path, kill_at=17, resumed_from=15, settings=settings)


def test_your_graph_in_sampled_neighbourhoods_same_with_0_or_2_workers_and_resumed_mid_epoch(folder, tmp_path):
    recipe = folder / "nodes.yaml"
    recipe.write_text("data: {name: userdata:node_graph, batch_size: 40, num_neighbors: [6, 4]}\n"
                      "model: {name: gcn, hidden: [16], dropout: 0.2}\n"
                      "optim: {lr: 0.02}\ntrain: {epochs: 3}\ncheckpoint: {every_steps: 5}\n")
    # Straight with no workers, killed and resumed with 2: bitwise equal proves both.
    straight, proc = killed_and_resumed_like_straight(recipe, tmp_path, kill_at=12, resumed_from=10,
                                                      straight_settings=["data.num_workers=0"],
                                                      settings=["data.num_workers=2"])
    assert "batches of sampled neighbours [6, 4]" in proc.stdout
    assert json.loads((straight / "metrics.json").read_text())["val_accuracy"] > 0.6, "it learns from neighbours"
