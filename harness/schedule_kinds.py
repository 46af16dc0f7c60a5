"""Schedule kinds by name: every kind in torch.optim.lr_scheduler, each with its options (the
recipe keys beside ``schedule.name``) and its builder in one place, and the ``schedule`` section.
harness/schedules.py drives the one that a recipe names."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from torch.optim import lr_scheduler as torch_sched

from harness.contracts import ConfigError
from harness.values import parse_dataclass, require


@dataclass(frozen=True)
class Kind:
    """A schedule kind: its own recipe keys (a dataclass) and its builder, by name."""

    options: type
    build: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    summary: str = ""


@dataclass
class ScheduleConfig:
    """The recipe's ``schedule`` section: the kind, when it steps, a warmup; ``options`` are the kind's own keys."""

    name: str = "none"
    # When the scheduler steps: after every optimizer step or after every epoch.
    # ReduceLROnPlateau always steps once per validation.
    interval: Literal["epoch", "step"] = "epoch"
    # Linear warmup over this many optimizer steps, from warmup_start_factor * lr to lr;
    # the main schedule starts counting when the warmup ends. Composes with every kind.
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    # torch's own argument, accepted so recipes written from torch's documentation load: the
    # harness logs every LR change anyway (console per epoch, TensorBoard per step).
    verbose: bool = False
    options: Any = None

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0.0 <= self.warmup_start_factor <= 1.0, "schedule.warmup_start_factor",
               self.warmup_start_factor, "a number in [0, 1]")


def canonical_name(section: str, name: Any) -> str:
    wanted = str(name).lower()
    for canonical, kind in SCHEDULES.items():
        if wanted == canonical.lower() or wanted in (a.lower() for a in kind.aliases):
            return canonical
    raise ConfigError(f"{section}.name: unknown {section} {name!r}. Valid names: {', '.join(sorted(SCHEDULES))}")


def options_class(section: str, name: Any) -> type:
    return SCHEDULES[canonical_name(section, name)].options


def lookup(section: str, name: str) -> Kind:
    return SCHEDULES[canonical_name(section, name)]


# --------------------------------------------------------------------------------------------
# Options of each kind (the recipe keys beside ``schedule.name``)
# --------------------------------------------------------------------------------------------


@dataclass
class NoOptions:
    pass


@dataclass
class StepOptions:
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class MultiStepOptions:
    milestones: list[int] = field(default_factory=lambda: [30, 60])
    gamma: float = 0.1


@dataclass
class ExponentialOptions:
    gamma: float = 0.95


@dataclass
class CosineOptions:
    # null: the whole planned run after warmup, in the schedule's interval units.
    T_max: Optional[int] = None
    eta_min: float = 0.0


@dataclass
class CosineRestartsOptions:
    T_0: int = 10
    T_mult: int = 1
    eta_min: float = 0.0


@dataclass
class LinearOptions:
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5


@dataclass
class PolynomialOptions:
    total_iters: Optional[int] = None
    power: float = 1.0


@dataclass
class LambdaOptions:
    # A named factor (linear_decay, constant, inverse_sqrt, cosine_decay) or your own
    # function as "package.module:function", called as f(t, **factor_kwargs) -> float.
    factor: str = "linear_decay"
    factor_kwargs: dict[str, float] = field(default_factory=dict)
    # Horizon of the named factors; null: the planned run after warmup.
    total: Optional[int] = None
    min_factor: float = 0.0


@dataclass
class ConstantOptions:
    """torch's ConstantLR: the LR times ``factor`` for the first ``total_iters`` steps, then the LR."""

    factor: float = 1.0 / 3
    total_iters: int = 5


@dataclass
class MultiplicativeOptions:
    # MultiplicativeLR: each step multiplies the LR by factor(t): a named factor or your own
    # "package.module:function", called as f(t, **factor_kwargs) -> float.
    factor: str = "constant"
    factor_kwargs: dict[str, float] = field(default_factory=dict)
    total: Optional[int] = None
    min_factor: float = 0.0


@dataclass
class SequentialOptions:
    """SequentialLR: the schedulers as recipe sections, switched at ``milestones`` (one fewer than
    schedulers; in the schedule's interval units). A horizon left null in one of them is its
    segment's length."""

    schedulers: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "linear", "start_factor": 0.1, "total_iters": 5}, {"name": "cosine"}])
    milestones: list[int] = field(default_factory=lambda: [5])


@dataclass
class ChainedOptions:
    """ChainedScheduler: every scheduler steps at once, their factors multiply."""

    schedulers: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "constant", "factor": 0.5, "total_iters": 5}, {"name": "exponential", "gamma": 0.95}])


@dataclass
class PlateauOptions:
    # val_loss, train_loss, val_<metric> of the run (val_metric: its first metric).
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: Union[float, list[float]] = 0.0
    eps: float = 1e-8


@dataclass
class OneCycleOptions:
    # null: each param group's own lr is its peak.
    max_lr: Optional[Union[float, list[float]]] = None
    # null: the planned run after warmup, in the schedule's interval units.
    total_steps: Optional[int] = None
    pct_start: float = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False


@dataclass
class CyclicOptions:
    max_lr: Union[float, list[float]] = 0.01
    # null: each param group's own lr is the bottom of the cycle.
    base_lr: Optional[Union[float, list[float]]] = None
    step_size_up: int = 2000
    step_size_down: Optional[int] = None
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0
    # Adam has no momentum to cycle; set true only with SGD(momentum).
    cycle_momentum: bool = False


# --------------------------------------------------------------------------------------------
# Named LambdaLR factors
# --------------------------------------------------------------------------------------------


def linear_decay(t: int, total: int) -> float:
    """The seeds' linear decay: lr = initial_lr * (1 - t / total)."""
    return 1.0 - t / total


def constant(t: int, total: int) -> float:
    return 1.0


def inverse_sqrt(t: int, total: int) -> float:
    return 1.0 / math.sqrt(max(1, t))


def cosine_decay(t: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


NAMED_FACTORS: dict[str, Callable[[int, int], float]] = {
    "linear_decay": linear_decay,
    "constant": constant,
    "inverse_sqrt": inverse_sqrt,
    "cosine_decay": cosine_decay,
}


class LambdaFactor:
    """The factor LambdaLR calls, held by name; clamps at min_factor.

    torch saves a callable object's ``__dict__`` as LambdaLR state, so only plain data lives there:
    the factor's name (or ``package.module:function``), its horizon and arguments. The function
    itself sits in a slot outside ``__dict__``, resolved from the name, and again whenever loaded
    state changes the name, so a checkpoint holds a name that is re-imported on resume.
    """

    __slots__ = ("__dict__", "_resolved")

    def __init__(self, factor: str, total: int, min_factor: float = 0.0, kwargs: Optional[dict] = None):
        self.factor, self.total, self.min_factor, self.kwargs = factor, total, min_factor, dict(kwargs or {})
        self._resolved = (factor, *resolve_factor(factor))

    def __call__(self, t: int) -> float:
        name, fn, named = self._resolved
        if name != self.factor:
            name, fn, named = self._resolved = (self.factor, *resolve_factor(self.factor))
        value = fn(t, self.total) if named else fn(t, **self.kwargs)
        return max(self.min_factor, float(value))


def resolve_factor(name: str) -> tuple[Callable, bool]:
    """(function, is a named factor) for a factor name or a ``package.module:function`` path."""
    if name in NAMED_FACTORS:
        return NAMED_FACTORS[name], True
    if ":" not in name:
        raise ConfigError(
            f"schedule.factor: unknown factor {name!r}. Named factors: {', '.join(NAMED_FACTORS)}; "
            "or give your own as 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"schedule.factor: cannot import module {module_name!r} for {name!r}: {exc} "
                          "(is the folder that holds it on PYTHONPATH, in every process?)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"schedule.factor: {module_name!r} has no function {attr!r} (for {name!r})")
    return fn, False


def _check_saved_factors(main, saved: dict) -> None:
    """Before torch copies saved factor state over the recipe's: the checkpoint's factor must be
    importable here and be the one the recipe names (torch would silently take the saved name)."""
    for own, entry in zip(getattr(main, "lr_lambdas", ()), saved.get("lr_lambdas") or ()):
        if not isinstance(own, LambdaFactor) or entry is None:
            continue
        if "factor" not in entry:
            # Written before factors were saved by name: its function was lost ("fn": null). Keep
            # the recipe's factor, take the saved horizon and arguments.
            entry.pop("fn", None)
            entry.pop("named", None)
            entry["factor"] = own.factor
        name = entry["factor"]
        try:
            resolve_factor(name)
        except ConfigError as exc:
            raise ValueError(f"the LambdaLR factor {name!r} this checkpoint was written with cannot be used "
                             f"here: {str(exc).removeprefix('schedule.factor: ')}") from None
        if name != own.factor:
            raise ValueError(f"the checkpoint's LambdaLR factor is {name!r}, the recipe asks for {own.factor!r}. "
                             f"Resume with schedule.factor={name}, or start a new run folder")


# --------------------------------------------------------------------------------------------
# Builders: (optimizer, options, horizon in interval units after warmup) -> torch scheduler
# --------------------------------------------------------------------------------------------


def _group_lrs(optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def _build_none(opt, o: NoOptions, horizon: int):
    return torch_sched.LambdaLR(opt, LambdaFactor("constant", horizon))


def _build_step(opt, o: StepOptions, horizon: int):
    return torch_sched.StepLR(opt, step_size=o.step_size, gamma=o.gamma)


def _build_multistep(opt, o: MultiStepOptions, horizon: int):
    return torch_sched.MultiStepLR(opt, milestones=o.milestones, gamma=o.gamma)


def _build_exponential(opt, o: ExponentialOptions, horizon: int):
    return torch_sched.ExponentialLR(opt, gamma=o.gamma)


def _build_cosine(opt, o: CosineOptions, horizon: int):
    return torch_sched.CosineAnnealingLR(opt, T_max=o.T_max or horizon, eta_min=o.eta_min)


def _build_cosine_restarts(opt, o: CosineRestartsOptions, horizon: int):
    return torch_sched.CosineAnnealingWarmRestarts(opt, T_0=o.T_0, T_mult=o.T_mult, eta_min=o.eta_min)


def _build_linear(opt, o: LinearOptions, horizon: int):
    return torch_sched.LinearLR(opt, start_factor=o.start_factor, end_factor=o.end_factor,
                                total_iters=o.total_iters)


def _build_polynomial(opt, o: PolynomialOptions, horizon: int):
    return torch_sched.PolynomialLR(opt, total_iters=o.total_iters or horizon, power=o.power)


def _build_lambda(opt, o: LambdaOptions, horizon: int):
    return torch_sched.LambdaLR(opt, LambdaFactor(o.factor, o.total or horizon, o.min_factor, o.factor_kwargs))


def _build_constant(opt, o: ConstantOptions, horizon: int):
    return torch_sched.ConstantLR(opt, factor=o.factor, total_iters=o.total_iters)


def _build_multiplicative(opt, o: MultiplicativeOptions, horizon: int):
    return torch_sched.MultiplicativeLR(opt, LambdaFactor(o.factor, o.total or horizon, o.min_factor,
                                                          o.factor_kwargs))


def sub_schedule_configs(o) -> list[tuple[str, Any]]:
    """(kind, options) of each scheduler inside a SequentialLR/ChainedScheduler, validated."""

    out = []
    for i, entry in enumerate(o.schedulers):
        where = f"schedule.schedulers[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: expected a section with a name, e.g. {{name: linear, total_iters: 5}}")
        kind = canonical_name("schedule", entry["name"])
        if kind in ("plateau", "sequential", "chained"):
            raise ConfigError(f"{where}: {kind} cannot be nested (torch steps it differently)")
        out.append((kind, parse_dataclass(options_class("schedule", kind),
                                          {k: v for k, v in entry.items() if k != "name"}, where)))
    return out


def _build_sequential(opt, o: SequentialOptions, horizon: int):
    subs = sub_schedule_configs(o)
    if len(o.milestones) != len(subs) - 1:
        raise ValueError(f"{len(subs)} schedulers need {len(subs) - 1} milestones, got {o.milestones}")
    bounds = [0, *o.milestones, horizon]
    built = [lookup("schedule", kind).build(opt, options, max(1, bounds[i + 1] - bounds[i]))
             for i, (kind, options) in enumerate(subs)]
    return torch_sched.SequentialLR(opt, built, milestones=o.milestones)


def _build_chained(opt, o: ChainedOptions, horizon: int):
    built = [lookup("schedule", kind).build(opt, options, horizon) for kind, options in sub_schedule_configs(o)]
    return torch_sched.ChainedScheduler(built, optimizer=opt)


def _build_plateau(opt, o: PlateauOptions, horizon: int):
    return torch_sched.ReduceLROnPlateau(
        opt, mode=o.mode, factor=o.factor, patience=o.patience, threshold=o.threshold,
        threshold_mode=o.threshold_mode, cooldown=o.cooldown, min_lr=o.min_lr, eps=o.eps,
    )


def _build_onecycle(opt, o: OneCycleOptions, horizon: int):
    max_lr = o.max_lr if o.max_lr is not None else _group_lrs(opt)
    return torch_sched.OneCycleLR(
        opt, max_lr=max_lr, total_steps=o.total_steps or horizon, pct_start=o.pct_start,
        anneal_strategy=o.anneal_strategy, cycle_momentum=o.cycle_momentum,
        base_momentum=o.base_momentum, max_momentum=o.max_momentum, div_factor=o.div_factor,
        final_div_factor=o.final_div_factor, three_phase=o.three_phase,
    )


def _build_cyclic(opt, o: CyclicOptions, horizon: int):
    base_lr = o.base_lr if o.base_lr is not None else _group_lrs(opt)
    return torch_sched.CyclicLR(
        opt, base_lr=base_lr, max_lr=o.max_lr, step_size_up=o.step_size_up,
        step_size_down=o.step_size_down, mode=o.mode, gamma=o.gamma, cycle_momentum=o.cycle_momentum,
    )


SCHEDULES: dict[str, Kind] = {
    "none": Kind(NoOptions, _build_none, (), "constant LR"),
    "constant": Kind(ConstantOptions, _build_constant, ("constantlr",), "ConstantLR"),
    "multiplicative": Kind(MultiplicativeOptions, _build_multiplicative, ("multiplicativelr",), "MultiplicativeLR"),
    "sequential": Kind(SequentialOptions, _build_sequential, ("sequentiallr",), "SequentialLR"),
    "chained": Kind(ChainedOptions, _build_chained, ("chainedscheduler",), "ChainedScheduler"),
    "step": Kind(StepOptions, _build_step, ("steplr",), "StepLR"),
    "multistep": Kind(MultiStepOptions, _build_multistep, ("multisteplr",), "MultiStepLR"),
    "exponential": Kind(ExponentialOptions, _build_exponential, ("exponentiallr",), "ExponentialLR"),
    "cosine": Kind(CosineOptions, _build_cosine, ("cosineannealinglr",), "CosineAnnealingLR"),
    "cosine_restarts": Kind(CosineRestartsOptions, _build_cosine_restarts,
                            ("cosineannealingwarmrestarts",), "CosineAnnealingWarmRestarts"),
    "linear": Kind(LinearOptions, _build_linear, ("linearlr",), "LinearLR"),
    "polynomial": Kind(PolynomialOptions, _build_polynomial, ("polynomiallr",), "PolynomialLR"),
    "lambda": Kind(LambdaOptions, _build_lambda, ("lambdalr",), "LambdaLR"),
    "plateau": Kind(PlateauOptions, _build_plateau, ("reducelronplateau",), "ReduceLROnPlateau"),
    "onecycle": Kind(OneCycleOptions, _build_onecycle, ("onecyclelr",), "OneCycleLR"),
    "cyclic": Kind(CyclicOptions, _build_cyclic, ("cycliclr",), "CyclicLR"),
}
