"""Recipes and overrides: every shipped recipe validates; every mistake gets an actionable message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, dump_config, load_config
from tests.conftest import ROOT, run_harness

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe: Path):
    cfg = load_config(recipe)
    raw = yaml.safe_load(recipe.read_text())
    for section in ("data", "model", "schedule"):
        given, loaded = raw.get(section) or {}, getattr(cfg, section)
        assert loaded.name == given.get("name", loaded.name)
        # The component's own options hold what the recipe gave (its defaults fill the rest).
        options = loaded.options if isinstance(loaded.options, dict) else vars(loaded.options)
        for key, value in given.items():
            if key in options:
                # YAML reads 1e-4 as a string; the harness reads it as the number.
                wanted = float(value) if isinstance(options[key], float) and isinstance(value, str) else value
                assert options[key] == wanted, (section, key, options[key], value)


@pytest.mark.parametrize("recipe", RECIPES + sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_recipe_starts_with_the_command_that_launches_it(recipe: Path):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file recipes/accelerate/"), first
    assert str(recipe.relative_to(ROOT)) in first or "accelerate" in recipe.parts


def test_yaml_scientific_notation_without_dot_is_read_as_a_number(tmp_path):
    # YAML 1.1 reads 1e-3 as the string "1e-3".
    recipe = write_recipe(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 5e-4\n")
    assert yaml.safe_load(recipe.read_text())["optim"]["lr"] == "1e-3"
    cfg = load_config(recipe)
    assert cfg.optim.lr == pytest.approx(0.001) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.options["weight_decay"] == pytest.approx(5e-4)


def test_overrides_are_typed_and_reach_kind_options():
    cfg = load_config(ROOT / "recipes/breast_cancer_mlp.yaml",
                      ["optim.lr=0.005", "schedule.step_size=7", "model.hidden=[16, 8]", "train.max_grad_norm=null"])
    assert cfg.optim.lr == 0.005
    assert cfg.schedule.options.step_size == 7
    assert cfg.model.options["hidden"] == [16, 8]
    assert cfg.train.max_grad_norm is None


def test_switching_kind_by_override_drops_the_old_kinds_keys_but_checks_new_ones():
    cfg = load_config(ROOT / "recipes/gcn_plateau.yaml", ["schedule.name=cosine", "schedule.T_max=30"])
    assert cfg.schedule.name == "cosine" and cfg.schedule.options.T_max == 30
    with pytest.raises(ConfigError, match=r"unknown key 'schedule\.patience' in schedule \(kind 'cosine'\)"):
        load_config(ROOT / "recipes/gcn_plateau.yaml", ["schedule.name=cosine", "schedule.patience=3"])


def test_unknown_key_suggests_the_closest(tmp_path):
    recipe = write_recipe(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    message = str(err.value)
    assert str(recipe) in message and "optim.learning_rate" in message and "Valid keys" in message
    with pytest.raises(ConfigError, match="Did you mean 'train.epochs'"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="Did you mean 'schedule.gamma'"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["schedule.gama=0.3"])
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*top level"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["optimizer.lr=0.1"])


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError, match=r"train\.epochs: got 'many', expected an integer"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"optim\.lr: got 'fast', expected a number"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"schedule\.interval: got 'batch', expected one of 'epoch', 'step'"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["schedule.interval=batch"])
    with pytest.raises(ConfigError, match=r"optim\.lr: got -0\.1, expected a positive number"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["optim.lr=-0.1"])


@pytest.mark.parametrize("section,bad,listed", [
    ("schedule", "cosine_annealing", "cosine, cosine_restarts, cyclic, exponential"),
    ("model", "resnet", "gcn, gin, gpt, hf_gpt2, mlp"),
    ("data", "mnist", "breast_cancer, csv, molecules, multilabel, python_source_chars, sbm_nodes, tu_folder"),
])
def test_unknown_kind_lists_the_valid_names(section, bad, listed):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", [f"{section}.name={bad}"])
    assert f"unknown {section} {bad!r}" in str(err.value) and listed in str(err.value)


def test_torch_class_names_are_accepted_as_schedule_names():
    cfg = load_config(ROOT / "recipes/gcn_plateau.yaml", ["schedule.name=ReduceLROnPlateau"])
    assert cfg.schedule.name == "plateau"


def test_missing_recipe_file_is_named():
    with pytest.raises(ConfigError, match="recipe file not found: recipes/nope.yaml"):
        load_config("recipes/nope.yaml")


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(ROOT / "recipes/breast_cancer_mlp.yaml", ["optim.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "recipes/gnn_graphs.yaml", ["optim.lr=0.002"])
    dumped = write_recipe(tmp_path, dump_config(cfg))
    again = load_config(dumped)
    assert again == cfg


def test_cli_reports_config_errors_with_exit_code_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_harness(ROOT / "recipes/breast_cancer_mlp.yaml", [f"run.output_dir={run_dir}", "optim.lrr=0.1"],
                       nproc=1, launcher="python", check=False)
    assert proc.returncode == 2
    assert "unknown key 'optim.lrr'" in proc.stderr and "Did you mean 'optim.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_resolved_config_is_written_into_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_harness(ROOT / "recipes/breast_cancer_mlp.yaml",
                [f"run.output_dir={run_dir}", "train.epochs=1", "optim.lr=2e-3"], nproc=1, launcher="python")
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["optim"]["lr"] == 0.002 and written["train"]["epochs"] == 1
    assert written["schedule"]["step_size"] == 20  # kind options flattened back beside name
    assert load_config(run_dir / "config.yaml").optim.lr == 0.002
