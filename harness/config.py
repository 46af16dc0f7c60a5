"""Recipes: YAML files plus dotted ``key=value`` overrides, validated into small typed sections.

Each concern (data, model, optim, schedule, train, checkpoint, ...) has its own dataclass and
each module is handed only its own section. Kind-specific options (the keys of one scheduler,
one model, one data set) sit flat beside ``name`` in the YAML and are validated against that
kind's options dataclass, so ``schedule.step_size=10`` works as an override and a typo in it is
reported with the closest valid key.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


import harness.builtin  # noqa: F401 - registers the shipped components before any recipe is read
from harness import components, schedule_kinds
from harness.schedule_kinds import ScheduleConfig
from harness.contracts import ConfigError  # noqa: F401 - re-exported: the name users and tests know
from harness.optimizers import UNSUPPORTED
from harness.values import _type_name, _unknown_key_message, coerce, parse_dataclass, require, type_checkable  # noqa: F401


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "run"
    # The run folder: resolved config, TensorBoard events and checkpoints all live here.
    output_dir: str = "runs/${run.name}"
    seed: int = 0
    # auto: the newest complete checkpoint in the run folder; never: start fresh; or a path.
    resume: str = "auto"
    # torch.use_deterministic_algorithms: bitwise-repeatable kernels where torch has them (slower on GPU).
    deterministic: bool = False
    # Resuming with a recipe that differs from the checkpoint's in a key that changes what a step
    # computes (LR, optimizer, schedule, model, data, batch size...): refuse (exit 3, the keys
    # listed) or allow (the new values apply from the resumed step on: the LR schedule is rebuilt
    # from the recipe and fast-forwarded to that step; recorded in changes.jsonl and TensorBoard).
    on_change: Literal["refuse", "allow"] = "refuse"
    # Start a NEW run from another run's weights: a checkpoint folder, or a run folder (its newest
    # complete checkpoint). This run's schedule and counters start fresh. Used only when this run
    # folder has no checkpoint yet; once it has, the run resumes from its own.
    init_from: Optional[str] = None
    # Where the logged series go (each gets them all: LR per group per step, losses, metrics,
    # samples/s, the recipe): tensorboard (<run>/tb), jsonl (<run>/log.jsonl, a record per point),
    # mlflow and wandb (sent at each checkpoint: harness/remote_trackers.py).
    log_with: list[Literal["tensorboard", "jsonl", "mlflow", "wandb"]] = field(
        default_factory=lambda: ["tensorboard"])
    # With init_from: take the optimizer state too (e.g. Adam's moments), under this recipe's LRs
    # and hyperparameters.
    init_optimizer: bool = False

    def __post_init__(self) -> None:
        require(len(set(self.log_with)) == len(self.log_with), "run.log_with", self.log_with, "each tracker once")


@dataclass
class DataConfig:
    name: str = "breast_cancer"
    # Global batch size: samples per optimizer step summed over all ranks and micro-batches.
    batch_size: int = 32
    val_batch_size: int = 256
    shuffle: bool = True
    drop_last: bool = False
    # How a torch Dataset returned by the factory is read (torch DataLoader settings). Workers
    # load this rank's share of the harness's global batches ahead of the training step.
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None
    # "module:function" collating a list of items into a batch; null: torch's default (PyG's for graphs).
    collate_fn: Optional[str] = None
    # The target's key in dict items.
    target_key: str = "y"
    # Node-level learning on one graph (a PyG Data with masks from the factory): a batch of seed
    # nodes is trained on its k-hop neighbourhood (every neighbour), or on sampled neighbours
    # (num_neighbors: [10, 5], per hop; -1: all), cut in the loader workers. Neither: the whole graph.
    hops: Optional[int] = None
    num_neighbors: Optional[list[int]] = None
    # The data factory's own arguments (the keys beside ``name``), checked against its signature.
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        require(self.val_batch_size >= 1, "data.val_batch_size", self.val_batch_size, "an integer >= 1")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        require(not self.persistent_workers or self.num_workers > 0, "data.persistent_workers",
                 self.persistent_workers, "false with data.num_workers: 0 (no workers to keep)")
        require(self.hops is None or self.hops >= 1, "data.hops", self.hops, "an integer >= 1 (or null)")
        require(self.num_neighbors is None or (len(self.num_neighbors) > 0 and all(
            isinstance(k, int) and (k >= 0 or k == -1) for k in self.num_neighbors)), "data.num_neighbors",
            self.num_neighbors, "a list of neighbours per hop, each an integer >= 0 or -1 for all (or null)")
        require(self.hops is None or self.num_neighbors is None, "data.hops", self.hops,
                 "null when data.num_neighbors is set (its length is the number of hops)")


@dataclass
class ModelConfig:
    # A registered model (mlp, gcn, gin) or your own class or factory as "module:attribute".
    # Its arguments sit beside ``name``; in_dim/out_dim (num_features, num_classes, in_channels,
    # out_channels) left out are filled in from the data.
    name: str = "mlp"
    options: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    # null: by the data's task: bce_with_logits (binary), cross_entropy (multiclass), mse
    # (regression). Or a registered loss (bce, mse, l1, ...), or your own "module:attribute".
    name: Optional[str] = None
    options: dict = field(default_factory=dict)


@dataclass
class ParamGroupConfig:
    """Parameters whose names match one of ``params`` (fnmatch globs) get their own LR."""

    name: str
    params: list[str]
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class OptimConfig:
    # Any torch.optim optimizer by its class name (Adam, AdamW, SGD, RMSprop, ...; any case), or your
    # own "module:attribute". Its arguments (betas, momentum, amsgrad, ...) sit beside ``name``.
    name: str = "adam"
    lr: float = 1e-3
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", self.lr, "a positive number")
        names = [g.name for g in self.param_groups]
        require(len(set(names)) == len(names), "optim.param_groups", names, "unique group names")
        require("default" not in names, "optim.param_groups", names,
                 "names other than 'default' (the group of all unmatched parameters)")


@dataclass
class EmaConfig:
    """train.ema: an exponential moving average of the weights (harness/ema.py), in float32."""

    decay: float = 0.999
    # Before this optimizer step the average is a copy of the weights; from it on it averages.
    start_step: int = 0
    every_steps: int = 1
    # Validation (and so ReduceLROnPlateau, keep_best, early stopping) and the test split on the
    # averaged weights instead of the training weights.
    evaluate: bool = False

    def __post_init__(self) -> None:
        require(0.0 < self.decay < 1.0, "train.ema.decay", self.decay, "a number between 0 and 1 (exclusive)")
        require(self.start_step >= 0, "train.ema.start_step", self.start_step, "an integer >= 0")
        require(self.every_steps >= 1, "train.ema.every_steps", self.every_steps, "an integer >= 1")


@dataclass
class ProfileConfig:
    """train.profile: torch.profiler over a window of optimizer steps, counted from the first step
    this process takes; traces in <run>/profile (Chrome trace JSON: Perfetto, chrome://tracing)."""

    wait: int = 5
    warmup: int = 2
    active: int = 5
    repeat: int = 1
    ranks: Literal["main", "all"] = "main"
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        for key in ("wait", "warmup", "repeat"):
            require(getattr(self, key) >= 0, f"train.profile.{key}", getattr(self, key), "an integer >= 0")
        require(self.active >= 1, "train.profile.active", self.active, "an integer >= 1")


@dataclass
class TrainConfig:
    epochs: int = 10
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = None
    # null: whatever `accelerate launch` was told; otherwise no | bf16 | fp16.
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    # auto: CUDA when there is one, else CPU processes over gloo.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every_steps: int = 10
    # Without a terminal (SLURM, CI), a plain progress line this often instead of a bar.
    progress_every_s: float = 30.0
    val_every_epochs: int = 1
    # Also validate every N optimizer steps inside epochs (long epochs); ReduceLROnPlateau steps
    # once per validation either way. null: at epoch ends only.
    val_every_steps: Optional[int] = None
    # Stop after this many optimizer steps in total (null: train all epochs). For smoke runs.
    max_steps: Optional[int] = None
    # Stop when checkpoint.monitor has not improved for this many validations (null: never).
    # Decided on values reduced over all ranks, so every rank stops at the same epoch.
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    # DDP: let parameters that get no gradient in a step (a layer forward() does not use) pass
    # instead of failing with "Expected to have finished reduction". Costs a graph traversal a step.
    find_unused_parameters: bool = False
    # A collective (gradient all-reduce, a barrier, a log reduction) that waits longer than this
    # fails on every waiting rank: a peer frozen (SIGSTOP, a hung node) or a network cut stops the
    # run in bounded time. Above the longest legitimate wait: a checkpoint save, a validation.
    collective_timeout_s: float = 600.0
    # ddp: a full copy of the model per rank; fsdp: FSDP2 shards parameters, gradients and optimizer
    # state over the ranks (harness/sharding.py); auto: fsdp when the Accelerate config asks for it.
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # FSDP units by module class name (e.g. [TransformerBlock]); null: the outermost modules that
    # own parameters (each Linear of an MLP, each GCNConv).
    fsdp_wrap: Optional[list[str]] = None
    # How the FSDP model gets its initial weights. every_rank: each rank builds the whole model on
    # its CPU (the same seed gives the same weights), then shards it. rank0: only rank 0 builds it
    # for real; the others build it on the meta device (no memory) and receive their shards from
    # rank 0 (host memory: one full copy per node instead of one per rank). Same weights either way.
    fsdp_init: Literal["every_rank", "rank0"] = "every_rank"
    # What the loss and metrics receive when the model returns more than a tensor: an index (0) of
    # a tuple, a key or attribute (logits) of a dict, dataclass or Hugging Face ModelOutput. null:
    # a lone tensor, else `logits`, else the only tensor of a tuple, list or dict (harness.data.select_output).
    model_output: Optional[Union[int, str]] = None
    # Recompute these blocks' activations in backward instead of keeping them (less memory, about
    # one more forward of compute): module class names, e.g. [Block]. Gradients are bitwise the same.
    activation_checkpointing: Optional[list[str]] = None
    # torch.compile: true (the whole model) or module class names (each such block compiled on its
    # own: regional compilation, much shorter compile times). Checkpoint keys stay the model's own.
    compile: Union[bool, list[str]] = False
    # torch.profiler over a few optimizer steps: {wait: 5, warmup: 2, active: 5}; null: off.
    profile: Optional[ProfileConfig] = None
    # An exponential moving average of the weights: {decay: 0.999, start_step: 0, every_steps: 1,
    # evaluate: false}; checkpointed, written to final/ema.safetensors. null: none.
    ema: Optional[EmaConfig] = None

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "an integer >= 1")
        require(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps, "an integer >= 1")
        require(self.collective_timeout_s > 0, "train.collective_timeout_s", self.collective_timeout_s, "a number > 0")
        require(self.val_every_epochs >= 1, "train.val_every_epochs", self.val_every_epochs, "an integer >= 1")
        require(self.val_every_steps is None or self.val_every_steps >= 1, "train.val_every_steps",
                 self.val_every_steps, "null or an integer >= 1")


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    every_epochs: Optional[int] = 1
    keep_last: int = 2
    keep_best: int = 0
    # What ranks checkpoints for keep_best and drives early stopping: val_loss, train_loss, or
    # val_<metric> for any metric of the run (val_metric: the first one).
    monitor: str = "val_loss"
    monitor_mode: Literal["min", "max"] = "min"
    # Write checkpoints on a background thread from an in-memory snapshot: training stalls only for
    # the copy. Costs one extra copy of the model and optimizer state in CPU memory. Preemption
    # saves are always synchronous.
    async_save: bool = False

    def __post_init__(self) -> None:
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")
        require(self.keep_best >= 0, "checkpoint.keep_best", self.keep_best, "an integer >= 0")
        for key in ("every_steps", "every_epochs"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"checkpoint.{key}", value, "null or an integer >= 1")


@dataclass
class PreemptionConfig:
    # Signals that ask for a checkpoint-and-exit (code 75). torchrun forwards only TERM/INT/HUP/QUIT.
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # How often the ranks agree whether any was signalled (one tiny non-blocking collective):
    # "auto" about every check_interval_s seconds, whatever the step time; or every N steps.
    check_every_steps: Union[int, Literal["auto"]] = "auto"
    check_interval_s: float = 0.2
    # Inside validation, check every N batches.
    check_every_val_batches: int = 20
    # Ctrl-C (SIGINT) saves a checkpoint at the next step and exits 130; a second Ctrl-C aborts at
    # once. false: the first Ctrl-C aborts without saving. Ignored when SIGINT is listed in signals.
    graceful_interrupt: bool = True

    def __post_init__(self) -> None:
        self.signals = parse_signal_names(self.signals)
        require(self.check_every_steps == "auto" or self.check_every_steps >= 1, "preemption.check_every_steps",
                 self.check_every_steps, "'auto' or an integer >= 1")
        require(self.check_interval_s > 0, "preemption.check_interval_s", self.check_interval_s, "a number > 0")
        require(self.check_every_val_batches >= 1, "preemption.check_every_val_batches",
                 self.check_every_val_batches, "an integer >= 1")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Names (accuracy, f1, mae, mse) or import paths, or {name: ..., key: value}; null: by the task.
    # Each is reported as val_<name>, test_<name>, and can be monitored by that name.
    metrics: Optional[list[Any]] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)

    # Where import paths resolve from first: the recipe's folder (then the working directory).
    # Not a recipe key.
    recipe_dir: Optional[str] = field(default=None, compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def import_folders(self) -> list[Path]:
        return [Path(self.recipe_dir) if self.recipe_dir else Path.cwd(), Path.cwd()]


# Sections whose extra keys are the arguments of the component named by ``name``.
_KIND_SECTIONS = ("data", "model", "loss", "optim", "schedule")
_COMPONENT_SECTIONS = ("data", "model", "loss", "optim")
# Arguments the harness gives a component itself (from the data, or its own objects).
PROVIDED = {
    "data": ("seed", "num_workers", "num_neighbors"),
    "model": ("in_dim", "out_dim", "num_features", "num_classes", "in_channels", "out_channels"),
    "loss": (),
    "optim": ("params",),
}
REFUSED = {
    "loss": {"reduction": "the harness needs one loss value per sample (reduction='none') to form exact means "
                          "over ranks and micro-batches; it sets it"},
    "optim": {"params": "parameters come from the model; use optim.param_groups for groups with their own LR"},
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe, apply ``key=value`` overrides, validate every section (kind options too)."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        recipes = sorted(Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
        if recipes:
            hint = " Recipes here: " + ", ".join(str(r) for r in recipes)
        raise ConfigError(f"recipe file not found: {path}.{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, data, model, ...), got {type(raw).__name__}")
    original_kinds = {s: (raw.get(s) or {}).get("name") for s in _KIND_SECTIONS if isinstance(raw.get(s), dict)}
    for item in overrides:
        apply_override(raw, item)
    _drop_options_of_replaced_kinds(raw, original_kinds, overrides, [path.resolve().parent, Path.cwd()])
    try:
        return config_from_dict(raw, recipe_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _drop_options_of_replaced_kinds(raw: dict, original_kinds: dict, overrides, folders) -> None:
    """``schedule.name=cosine`` on a StepLR recipe: the recipe's step_size/gamma belong to the old
    kind, so they go. Keys the new kind also takes, and keys given as overrides, stay (and a
    typo among them is still reported)."""
    overridden = {item.partition("=")[0].strip() for item in overrides}
    for section, old_name in original_kinds.items():
        new_name = raw[section].get("name")
        if old_name is None or new_name is None or str(new_name).lower() == str(old_name).lower():
            continue
        try:
            old_keys, new_keys = _argument_names(section, old_name, folders), _argument_names(section, new_name, folders)
        except ConfigError:
            continue  # an unknown name is reported by validation
        for key in list(raw[section]):
            if key in old_keys and key not in new_keys and f"{section}.{key}" not in overridden:
                del raw[section][key]


def _argument_names(section: str, name, folders) -> set[str]:
    if section not in _COMPONENT_SECTIONS:
        return {f.name for f in dataclasses.fields(schedule_kinds.options_class(section, name))}
    signature = components.signature_of(components.resolve(section, name, folders))
    return set(signature.parameters) if signature is not None else set()


def apply_override(raw: dict, item: str) -> None:
    """``optim.lr=0.005`` sets raw['optim']['lr']; the value is read as YAML (lists, null, numbers)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.005")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, recipe_dir: Optional[Path] = None) -> Config:
    raw = dict(raw)
    sections = {}
    known = [f.name for f in dataclasses.fields(Config) if f.name != "recipe_dir"]
    for name in raw:
        if name not in known:
            raise ConfigError(_unknown_key_message(name, known, where="top level"))
    folders = [Path(recipe_dir) if recipe_dir else Path.cwd(), Path.cwd()]
    hints = typing.get_type_hints(Config)
    for name in known:
        if name == "metrics":
            sections[name] = _metrics_entries(raw.get("metrics"))
            continue
        section_raw = raw.get(name) or {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{name}: expected a section (mapping), got {section_raw!r}")
        cls = hints[name]
        if name in _COMPONENT_SECTIONS:
            sections[name] = _component_section(name, cls, section_raw, folders)
        elif name in _KIND_SECTIONS:
            sections[name] = _kind_section(name, cls, section_raw)
        else:
            sections[name] = parse_dataclass(cls, section_raw, name)
    cfg = Config(**sections, recipe_dir=str(recipe_dir) if recipe_dir else None)
    cfg.run.output_dir = cfg.run.output_dir.replace("${run.name}", cfg.run.name)
    return cfg


def _metrics_entries(value) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"metrics: got {value!r}, expected a list of names, e.g. [accuracy, f1]")
    for i, entry in enumerate(value):
        if isinstance(entry, dict) and "name" not in entry:
            raise ConfigError(f"metrics[{i}]: {entry!r} has no 'name'")
        if not isinstance(entry, (str, dict)):
            raise ConfigError(f"metrics[{i}]: got {entry!r}, expected a name or {{name: ..., key: value}}")
    return value


def _component_section(section: str, cls: type, section_raw: dict, folders):
    """``name`` plus the component's own arguments, checked against its signature now, before
    any process starts or anything is written."""
    common = {f.name for f in dataclasses.fields(cls)} - {"options"}
    base = {k: v for k, v in section_raw.items() if k in common}
    rest = {k: v for k, v in section_raw.items() if k not in common}
    parsed = parse_dataclass(cls, base, section)
    if parsed.name is None:  # loss: chosen by the data's task at build time
        if rest:
            raise ConfigError(f"{section}: arguments {sorted(rest)} given without {section}.name")
        return parsed
    target = components.resolve(section, parsed.name, folders)
    if not components.is_import_path(parsed.name):
        parsed.name = components.lookup(section, parsed.name).name
    if section == "optim":
        if parsed.name.lower() in UNSUPPORTED:
            raise ConfigError(f"optim.name: {parsed.name}: {UNSUPPORTED[parsed.name.lower()]}")
    provided = PROVIDED[section]
    if section == "loss" and components.is_import_path(parsed.name) and not isinstance(target, type):
        provided = components.leading_parameters(target, 2)  # a loss function's (outputs, targets)
    given = components.check_arguments(target, rest, section, provided=provided, refused=REFUSED.get(section))
    # Every argument in force, defaults included: config.yaml, the checkpoints' recipe and the
    # change check on resume show them all.
    skip = [*provided, *REFUSED.get(section, {}), *common]
    parsed.options = {**components.defaults_of(target, skip=skip), **given}
    return parsed


def _kind_section(section: str, cls: type, section_raw: dict):
    if "last_epoch" in section_raw:
        raise ConfigError(f"{section}.last_epoch: set by the harness itself when it resumes a run (from the "
                          "checkpoint's scheduler state, with the LR checked); remove it. To start a new run part-way "
                          "through another's schedule, resume that run, or use run.init_from for its weights")

    common = {f.name for f in dataclasses.fields(cls)} - {"options"}
    default_name = cls().name if section != "data" else DataConfig().name
    name = section_raw.get("name", default_name)
    options_cls = schedule_kinds.options_class(section, name)
    base = {k: v for k, v in section_raw.items() if k in common}
    rest = {k: v for k, v in section_raw.items() if k not in common}
    option_keys = [f.name for f in dataclasses.fields(options_cls)]
    for key in rest:
        if key not in option_keys:
            valid = sorted(common | set(option_keys))
            raise ConfigError(_unknown_key_message(f"{section}.{key}", valid,
                                                   where=f"{section} (kind {name!r})", prefix=section))
    parsed = parse_dataclass(cls, base, section)
    parsed.name = schedule_kinds.canonical_name(section, name)
    parsed.options = parse_dataclass(options_cls, rest, section)
    return parsed


def to_plain_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-able data (kind options flattened back beside ``name``)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "recipe_dir":
            continue
        section = getattr(cfg, f.name)
        if f.name == "metrics":
            out[f.name] = section
            continue
        data = dataclasses.asdict(section)
        if f.name in _KIND_SECTIONS:
            options = data.pop("options") or {}
            data.update(options)
        out[f.name] = data
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_plain_dict(cfg), sort_keys=False)


def parse_signal_names(names: list[str]) -> list[str]:
    out = []
    for name in names:
        canonical = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not isinstance(getattr(signal, canonical, None), signal.Signals):
            raise ConfigError(f"preemption.signals: unknown signal {name!r}, expected e.g. SIGTERM, SIGUSR1, SIGUSR2")
        if canonical in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"preemption.signals: {canonical} cannot be caught")
        out.append(canonical)
    return out
