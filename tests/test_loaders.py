"""Users' own data: a CSV table (`data.name: csv`) and a TU-format graph folder (`data.name: tu_folder`).

Each test writes the files a user would have into tmp_path, a recipe beside them, and trains
through the real command line (`python -m harness train recipe.yaml`), then reads the run's
metrics.json. Mistakes in the data are reported as ConfigErrors that name the file and the key
or column, and through the command line exit with code 2, no traceback and no run folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.config import ConfigError, load_config
from harness.builtin.datasets import csv_table, tu_folder
from tests.conftest import read_json, run_harness

ROWS = 400
FEATURES = ["x1", "x2", "x3", "x4", "x5"]
# Columns on very different scales, so a missing or mis-fitted standardisation shows.
FEATURE_MEANS = np.array([100.0, -50.0, 0.0, 3.0, 0.001])
FEATURE_SCALES = np.array([20.0, 5.0, 1.0, 0.01, 0.0001])
CSV_EPOCHS = 20


# --------------------------------------------------------------------------------------------
# Files as users have them
# --------------------------------------------------------------------------------------------


def write_table(path: Path, task: str, rows: int = ROWS, seed: int = 0) -> dict:
    """A learnable table: 5 numeric features and a `label` column from a linear rule plus a little noise.

    binary: "yes"/"no"; multiclass: "cat"/"dog"/"fox" (argmax of three linear scores);
    regression: a number. Returns the target values as written.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, len(FEATURES)))
    x = FEATURE_MEANS + FEATURE_SCALES * z
    if task == "binary":
        score = z @ np.array([1.5, -2.0, 1.0, 0.5, 0.0]) + 0.2 * rng.standard_normal(rows)
        labels = np.where(score > 0, "yes", "no")
    elif task == "multiclass":
        weights = np.array([[2.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, -1.0, 0.0], [-2.0, -2.0, 1.0, 0.0, 0.0]])
        scores = z @ weights.T + 0.2 * rng.standard_normal((rows, 3))
        labels = np.array(["cat", "dog", "fox"])[scores.argmax(axis=1)]
    else:
        labels = 3.0 * z @ np.array([1.0, -0.5, 0.8, 0.3, 0.0]) + 10.0 + 0.1 * rng.standard_normal(rows)
    write_csv(path, FEATURES + ["label"], [[*(f"{v:.6g}" for v in row), str(t)] for row, t in zip(x, labels)])
    return {"labels": labels, "features": x}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_recipe(folder: Path, data: dict, model: dict, epochs: int, lr: float = 0.01) -> Path:
    recipe = {
        "run": {"name": "loaders", "seed": 0},
        "data": data,
        "model": model,
        "optim": {"name": "adam", "lr": lr},
        "train": {"epochs": epochs, "log_every_steps": 5},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def csv_recipe(folder: Path, csv_path: Path, task: str) -> Path:
    return write_recipe(folder, {"name": "csv", "path": str(csv_path), "target": "label", "task": task,
                                 "batch_size": 32},
                        {"name": "mlp", "hidden": [32, 16]}, epochs=CSV_EPOCHS)


def train_cli(recipe: Path, run_dir: Path, check: bool = True):
    """`python -m harness train recipe run.output_dir=...`, one process."""
    return run_harness(recipe, [f"run.output_dir={run_dir}"], nproc=1, launcher="python", check=check)


def write_tu(folder: Path, prefix: str, graphs: int = 120, seed: int = 0) -> Path:
    """PyG TUDataset raw text files for two learnable classes of tree-shaped graphs.

    Node labels are 1, 2, 3. Class "1" graphs have mostly label-2 nodes, class "-1" graphs
    hardly any. Graph labels are -1 / 1 as in MUTAG; node and graph ids are 1-based; every edge
    is written in both directions.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    edges, indicator, node_labels, graph_labels = [], [], [], []
    offset = 0
    for g in range(graphs):
        positive = g % 2 == 1
        n = int(rng.integers(8, 15))
        p2 = 0.6 if positive else 0.05
        node_labels += rng.choice([1, 2, 3], size=n, p=[(1 - p2) / 2, p2, (1 - p2) / 2]).tolist()
        for i in range(1, n):
            j = int(rng.integers(0, i))
            a, b = offset + i + 1, offset + j + 1
            edges += [(a, b), (b, a)]
        indicator += [g + 1] * n
        graph_labels.append(1 if positive else -1)
        offset += n
    (folder / f"{prefix}_A.txt").write_text("".join(f"{a}, {b}\n" for a, b in edges))
    (folder / f"{prefix}_graph_indicator.txt").write_text("".join(f"{v}\n" for v in indicator))
    (folder / f"{prefix}_node_labels.txt").write_text("".join(f"{v}\n" for v in node_labels))
    (folder / f"{prefix}_graph_labels.txt").write_text("".join(f"{v}\n" for v in graph_labels))
    return folder


# --------------------------------------------------------------------------------------------
# CSV: training through the command line
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary_csv_run(tmp_path_factory) -> dict:
    """The binary yes/no table trained once in one process; shared with the 2-rank comparison."""
    folder = tmp_path_factory.mktemp("binary_csv")
    csv_path = folder / "customers.csv"
    write_table(csv_path, "binary")
    recipe = csv_recipe(folder, csv_path, "binary")
    run_dir = folder / "run"
    train_cli(recipe, run_dir)
    return {"recipe": recipe, "csv": csv_path, "run_dir": run_dir, "metrics": read_json(run_dir / "metrics.json")}


def test_csv_binary_table_with_yes_no_labels_trains_well_above_chance(binary_csv_run):
    metrics = binary_csv_run["metrics"]
    assert metrics["world_size"] == 1 and metrics["epochs"] == CSV_EPOCHS
    # 400 rows: 80 test, 32 val, 288 train -> 9 steps of 32 per epoch.
    assert metrics["steps"] == CSV_EPOCHS * 9
    assert metrics["test_accuracy"] >= 0.9, metrics
    assert metrics["val_accuracy"] >= 0.8, metrics  # only 32 rows
    resolved = yaml.safe_load((binary_csv_run["run_dir"] / "config.yaml").read_text())
    assert resolved["data"]["name"] == "csv" and resolved["data"]["path"] == str(binary_csv_run["csv"])


def test_csv_multiclass_table_with_string_classes_trains_well_above_chance(tmp_path):
    csv_path = tmp_path / "animals.csv"
    labels = write_table(csv_path, "multiclass")["labels"]
    assert min(np.mean(labels == c) for c in ("cat", "dog", "fox")) > 0.15, "every class is common"
    run_dir = tmp_path / "run"
    train_cli(csv_recipe(tmp_path, csv_path, "multiclass"), run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["test_accuracy"] >= 0.8, metrics  # chance: about 1/3


def test_csv_regression_table_gets_a_test_mae_well_below_the_targets_spread(tmp_path):
    csv_path = tmp_path / "prices.csv"
    target = write_table(csv_path, "regression")["labels"]
    run_dir = tmp_path / "run"
    train_cli(csv_recipe(tmp_path, csv_path, "regression"), run_dir)
    metrics = read_json(run_dir / "metrics.json")
    # Predicting the mean would give an MAE of about 0.8 std; the rule's noise is 0.1.
    assert metrics["test_mae"] < 0.2 * target.std(), (metrics, target.std())


def test_csv_two_ranks_give_the_same_val_loss_as_one_process(binary_csv_run, tmp_path):
    run_dir = tmp_path / "run2"
    run_harness(binary_csv_run["recipe"], [f"run.output_dir={run_dir}"], nproc=2)
    two, one = read_json(run_dir / "metrics.json"), binary_csv_run["metrics"]
    assert two["world_size"] == 2 and two["steps"] == one["steps"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# CSV: what the loader builds
# --------------------------------------------------------------------------------------------


def test_csv_standardisation_is_fitted_on_the_training_part_only(tmp_path):
    csv_path = tmp_path / "table.csv"
    write_table(csv_path, "binary")
    scaled = csv_table(path=str(csv_path), target="label")
    raw = csv_table(path=str(csv_path), target="label", standardize=False)
    raw_train = raw.train.features.double().numpy()
    train = scaled.train.features.double().numpy()
    # The training part alone has mean 0 and standard deviation 1 in every column...
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-4)
    # ...and val and test are transformed with the training part's mean and std, not their own.
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    for part in ("val", "test"):
        got = getattr(scaled, part).features.double().numpy()
        expected = (getattr(raw, part).features.double().numpy() - mean) / std
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert np.abs(got.mean(axis=0)).max() > 1e-3, f"{part} was not standardised on itself"
    # Raw features are the file's values, on their own scales.
    assert np.all(np.abs(raw_train.mean(axis=0) - FEATURE_MEANS) < FEATURE_SCALES)
    np.testing.assert_allclose(raw_train.std(axis=0), FEATURE_SCALES, rtol=0.2)


def test_csv_splits_and_labels_follow_the_file(tmp_path):
    csv_path = tmp_path / "table.csv"
    labels = write_table(csv_path, "binary")["labels"]
    task = csv_table(path=str(csv_path), target="label")
    assert (task.spec.kind, task.spec.in_dim, task.spec.out_dim) == ("binary", 5, 1)
    assert (len(task.train), len(task.val), len(task.test)) == (288, 32, 80)
    # String classes are sorted: "no" is 0, "yes" is 1.
    ones = sum(float(getattr(task, p).targets.sum()) for p in ("train", "val", "test"))
    assert ones == np.sum(labels == "yes")
    # data.features picks columns; the target is never one of them.
    two = csv_table(path=str(csv_path), target="label", features=["x2", "x4"])
    assert two.spec.in_dim == 2
    multi_path = tmp_path / "multi.csv"
    write_table(multi_path, "multiclass")
    multi = csv_table(path=str(multi_path), target="label", task="multiclass")
    assert multi.spec.out_dim == 3 and set(multi.train.targets.tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------------------------
# CSV: mistakes are ConfigErrors naming the file and the key or column
# --------------------------------------------------------------------------------------------


def _rows(n: int, labels=("yes", "no")) -> list[list[str]]:
    return [[str(i), str(2 * i), str(i % 3), "1.5", "0", labels[i % len(labels)]] for i in range(n)]


def _bad_value_table(path: Path) -> Path:
    rows = _rows(40)
    rows[5][2] = "n/a"  # data row 6 is line 7 of the file (line 1 is the header)
    return write_csv(path, FEATURES + ["label"], rows)


CSV_ERRORS = {
    "missing_file": (lambda p: p.with_name("absent.csv"), {},
                     ["data.path", "CSV file not found", "absent.csv"]),
    "missing_target_column": (lambda p: write_csv(p, FEATURES + ["label"], _rows(40)), {"target": "outcome"},
                              ["'outcome'", "data.target", "Columns: x1, x2, x3, x4, x5, label"]),
    "missing_feature_column": (lambda p: write_csv(p, FEATURES + ["label"], _rows(40)), {"features": ["x1", "x9"]},
                               ["'x9'", "data.features", "Columns: x1, x2, x3, x4, x5, label"]),
    "non_numeric_feature": (_bad_value_table, {}, ["line 7", "column 'x3'", "'n/a' is not a finite number"]),
    "binary_with_three_classes": (lambda p: write_csv(p, FEATURES + ["label"], _rows(40, ("a", "b", "c"))), {},
                                  ["column 'label'", "3 classes", "['a', 'b', 'c']", "task: multiclass"]),
    "too_few_rows": (lambda p: write_csv(p, FEATURES + ["label"], _rows(5)), {}, ["only 5 rows", "at least 10"]),
    "header_only": (lambda p: write_csv(p, FEATURES + ["label"], []), {}, ["only 0 rows"]),
    "ragged_row": (lambda p: write_csv(p, FEATURES + ["label"], _rows(40)[:3] + [["1", "2"]] + _rows(40)[4:]), {},
                   ["line 5 has 2 fields, the header has 6"]),
    "non_numeric_regression_target": (lambda p: write_csv(p, FEATURES + ["label"], _rows(40)),
                                      {"task": "regression"}, ["column 'label'", "must be numbers"]),
}


@pytest.mark.parametrize("case", CSV_ERRORS)
def test_csv_mistakes_are_config_errors_naming_file_and_column(case, tmp_path):
    make, options, fragments = CSV_ERRORS[case]
    path = make(tmp_path / "table.csv")
    with pytest.raises(ConfigError) as err:
        csv_table(path=str(path), **{"target": "label", **options})
    message = str(err.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_config_error_through_the_cli_exits_2_with_no_traceback_and_no_run_folder(tmp_path):
    csv_path = write_csv(tmp_path / "table.csv", FEATURES + ["label"], _rows(40))
    recipe = write_recipe(tmp_path, {"name": "csv", "path": str(csv_path), "target": "outcome"},
                          {"name": "mlp"}, epochs=1)
    run_dir = tmp_path / "run"
    proc = train_cli(recipe, run_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "harness: config error:" in proc.stderr
    assert str(csv_path) in proc.stderr and "'outcome'" in proc.stderr and "Columns: x1" in proc.stderr
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------
# TU-format graph folders
# --------------------------------------------------------------------------------------------


def tu_recipe(folder: Path, root: Path, prefix: str, **data) -> Path:
    return write_recipe(folder, {"name": "tu_folder", "root": str(root), "prefix": prefix, "batch_size": 16,
                                 "train_fraction": 0.6, "val_fraction": 0.2, **data},
                        {"name": "gin", "hidden": 32, "layers": 2}, epochs=15)


def test_tu_folder_trains_gin_well_above_chance(tmp_path):
    root = write_tu(tmp_path / "graphs", "TOY")
    run_dir = tmp_path / "run"
    proc = train_cli(tu_recipe(tmp_path, root, "TOY"), run_dir)
    metrics = read_json(run_dir / "metrics.json")
    # 120 graphs: 72 train, 24 val, 24 test; two balanced classes, chance 0.5.
    assert metrics["steps"] == 15 * 5
    assert metrics["val_accuracy"] >= 0.85 and metrics["test_accuracy"] >= 0.85, metrics
    assert "TU data set TOY" in proc.stdout and "120 graphs" in proc.stdout
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["name"] == "tu_folder" and resolved["data"]["prefix"] == "TOY"


def test_tu_folder_reads_labels_and_shapes_from_the_files(tmp_path):
    root = write_tu(tmp_path / "graphs", "TOY")
    task = tu_folder(root=str(root), prefix="TOY")
    assert (task.spec.kind, task.spec.graph, task.spec.in_dim, task.spec.out_dim) == ("multiclass", "graph", 3, 2)
    assert (len(task.train), len(task.val), len(task.test)) == (96, 12, 12)
    graphs = task.train.graphs + task.val.graphs + task.test.graphs
    assert sorted({int(g.y) for g in graphs}) == [0, 1], "graph labels -1/1 become classes 0/1"
    assert sum(g.num_nodes for g in graphs) == len((root / "TOY_graph_indicator.txt").read_text().split())
    assert all(g.x.sum(dim=1).eq(1).all() for g in graphs), "node labels are one-hot node features"


def test_tu_folder_data_prefix_is_its_own_key_beside_data_name(tmp_path):
    # data.name is the data set kind, so the TU files' prefix has a key of its own.
    cfg = load_config(tu_recipe(tmp_path, tmp_path / "graphs", "TOY"), ["data.prefix=OTHER"])
    assert cfg.data.name == "tu_folder" and cfg.data.options["prefix"] == "OTHER"
    with pytest.raises(ConfigError, match=r"data\.root and data\.prefix"):
        tu_folder(root=str(tmp_path))


@pytest.mark.parametrize("removed", [["graph_labels"], ["A", "graph_indicator"]])
def test_tu_folder_missing_files_are_named(removed, tmp_path):
    root = write_tu(tmp_path / "graphs", "TOY", graphs=10)
    for part in removed:
        (root / f"TOY_{part}.txt").unlink()
    with pytest.raises(ConfigError) as err:
        tu_folder(root=str(root), prefix="TOY")
    message = str(err.value)
    assert "data.root: missing TU files" in message
    for part in ("A", "graph_indicator", "graph_labels"):
        assert (str(root / f"TOY_{part}.txt") in message) == (part in removed), message


def test_tu_folder_wrong_prefix_through_the_cli_names_the_files_it_looked_for(tmp_path):
    root = write_tu(tmp_path / "graphs", "TOY", graphs=10)
    run_dir = tmp_path / "run"
    proc = train_cli(tu_recipe(tmp_path, root, "TOYS"), run_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(root / "TOYS_A.txt") in proc.stderr and str(root / "TOYS_graph_labels.txt") in proc.stderr
    assert not run_dir.exists()


def test_bundled_breast_cancer_is_cached_as_plain_arrays_and_a_damaged_cache_is_recomputed(tmp_path, monkeypatch):
    import torch

    from harness.builtin import datasets

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    computed = []
    original = datasets._split_arrays
    monkeypatch.setattr(datasets, "_split_arrays", lambda *a: computed.append(1) or original(*a))
    first = datasets.breast_cancer()
    (cached,) = tmp_path.glob("breast_cancer-*.npz")
    second = datasets.breast_cancer()
    assert len(computed) == 1, "the second load reads the cache"
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert torch.equal(a.features, b.features) and torch.equal(a.targets, b.targets)
    other = datasets.breast_cancer(random_state=3)  # other arguments: another entry
    assert len(computed) == 2 and len(list(tmp_path.glob("breast_cancer-*.npz"))) == 2
    assert not torch.equal(other.train.features, first.train.features)
    cached.write_bytes(cached.read_bytes()[:200])  # truncated: recomputed, same arrays
    third = datasets.breast_cancer()
    assert len(computed) == 3 and torch.equal(third.train.features, first.train.features)


def test_the_bundled_breast_cancer_table_holds_out_a_validation_part_unless_val_size_is_0(tmp_path, monkeypatch):
    import torch

    from harness.builtin import datasets

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    held_out = datasets.breast_cancer()
    sizes = [len(held_out.train), len(held_out.val), len(held_out.test)]
    assert sizes == [409, 46, 114] and "46 val" in held_out.description
    rows = torch.cat([held_out.train.features, held_out.val.features, held_out.test.features])
    assert len(torch.unique(rows, dim=0)) == 569, "three disjoint parts"
    article = datasets.breast_cancer(val_size=0.0)  # the seed recipe: validates on the test part
    assert torch.equal(article.val.features, article.test.features) and len(article.train) == 455
