"""Learning-rate schedules: every kind in torch.optim.lr_scheduler, chosen by name, plus a warmup.

The loop talks to one object, :class:`LRSchedule`, at three points: after each optimizer step,
after each epoch, and after each validation. The schedule is never handed to
``accelerator.prepare``: Accelerate's wrapper steps it once per process, which makes the LR
depend on the world size. Everything here is counted in global optimizer steps and epochs, so
the LR series is the same on 1 rank or 8.

The linear warmup is our own rather than ``SequentialLR`` because SequentialLR cannot chain
ReduceLROnPlateau (it has no ``last_epoch``-driven ``get_lr``). The warmup scales the main
schedule's current LR; the main schedule starts counting when the warmup ends.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim import lr_scheduler as torch_sched

from harness.contracts import ConfigError
from harness.schedule_kinds import ScheduleConfig, _check_saved_factors, lookup
from harness.values import from_json_safe, to_json_safe


# --------------------------------------------------------------------------------------------
# The schedule the loop drives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Horizon:
    """How long the run is planned to be, in global optimizer steps."""

    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def main_schedule_length(cfg: ScheduleConfig, horizon: Horizon) -> int:
    """How many times the main schedule will step after warmup, in its interval's units."""
    if cfg.interval == "step":
        return max(1, horizon.total_steps - cfg.warmup_steps)
    # Epoch-interval schedules step at each epoch end reached once the warmup is over.
    warm_epochs = 0 if cfg.warmup_steps == 0 else (cfg.warmup_steps - 1) // horizon.steps_per_epoch
    return max(1, horizon.epochs - warm_epochs)


class LRSchedule:
    """One main torch scheduler, an optional linear warmup, and where in the loop each steps."""

    def __init__(self, optimizer, cfg: ScheduleConfig, horizon: Horizon, group_names: list[str]):
        self.optimizer = optimizer
        self.interval = cfg.interval
        self.kind = cfg.name
        self.warmup_steps = cfg.warmup_steps
        self.warmup_start_factor = cfg.warmup_start_factor
        self.group_names = list(group_names)
        self.is_plateau = cfg.name == "plateau"
        self.monitor = cfg.options.monitor if self.is_plateau else None
        self.steps_done = 0  # optimizer steps seen, warmup included
        try:
            self.main = lookup("schedule", cfg.name).build(optimizer, cfg.options,
                                                          main_schedule_length(cfg, horizon))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"schedule ({cfg.name}): {exc}") from None
        self.state_dict()  # state that JSON cannot hold fails here, before any training, not at the first save
        self._apply_warmup()

    # The loop calls these three, in this order within an epoch.

    def after_optimizer_step(self) -> None:
        self.steps_done += 1
        if self.in_warmup_or_ending():
            self._apply_warmup()
            return
        if self.interval == "step" and not self.is_plateau:
            self.main.step()

    def after_epoch(self) -> None:
        if self.interval == "epoch" and not self.is_plateau and self.warmup_over():
            self.main.step()

    def after_validation(self, val_loss: Optional[float], monitored: Optional[float]) -> None:
        """Plateau steps exactly once per validation, on the monitored value reduced over all ranks."""
        if self.is_plateau and self.warmup_over() and monitored is not None:
            self.main.step(monitored)

    # Warmup: scale the main schedule's own current LRs.

    def warmup_over(self) -> bool:
        return self.steps_done >= self.warmup_steps

    def in_warmup_or_ending(self) -> bool:
        return self.warmup_steps > 0 and self.steps_done <= self.warmup_steps

    def warmup_factor(self) -> float:
        if self.steps_done >= self.warmup_steps:
            return 1.0
        progress = self.steps_done / self.warmup_steps
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress

    def _apply_warmup(self) -> None:
        if self.warmup_steps == 0:
            return
        factor = self.warmup_factor()
        for group, lr in zip(self.optimizer.param_groups, self.main_lrs()):
            group["lr"] = lr * factor

    def main_lrs(self) -> list[float]:
        return list(self.main.get_last_lr())

    def lrs(self) -> dict[str, float]:
        """The LR each named param group will use at its next optimizer step."""
        return {name: g["lr"] for name, g in zip(self.group_names, self.optimizer.param_groups)}

    def state_dict(self) -> dict:
        """Plain JSON data (no pickles), see to_json_safe; a TypeError names any value that is not."""
        try:
            main = to_json_safe(self.main.state_dict(), "main")
        except TypeError as exc:
            raise TypeError(f"schedule {self.kind!r} ({type(self.main).__name__}): cannot write its state to "
                            f"scheduler.json: {exc}") from None
        return {"kind": self.kind, "steps_done": self.steps_done, "main": main}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} schedule, the recipe asks for {self.kind!r}")
        self.steps_done = int(state["steps_done"])
        main = from_json_safe(state["main"])
        _check_saved_factors(self.main, main)
        self.main.load_state_dict(main)
        for group, lr in zip(self.optimizer.param_groups, self.main_lrs()):
            group["lr"] = lr
        self._apply_warmup()


def build_schedule(optimizer, cfg: ScheduleConfig, horizon: Horizon, group_names: list[str]) -> LRSchedule:
    return LRSchedule(optimizer, cfg, horizon, group_names)


def preview_lrs(optimizer_factory: Callable[[], torch.optim.Optimizer], cfg: ScheduleConfig,
                horizon: Horizon, group_names: list[str], val_losses: Optional[list[float]] = None):
    """The LR of each group at each optimizer step of the planned run, on a dummy optimizer.

    Plateau schedules need validation values; with none given the LR stays flat (the plan).
    """
    optimizer = optimizer_factory()
    schedule = LRSchedule(optimizer, cfg, horizon, group_names)
    series = {name: [] for name in group_names}
    with warnings.catch_warnings():
        # No optimizer.step() happens here, which torch would warn about at every scheduler step.
        warnings.simplefilter("ignore", UserWarning)
        for epoch in range(horizon.epochs):
            for _ in range(horizon.steps_per_epoch):
                for name, lr in schedule.lrs().items():
                    series[name].append(lr)
                schedule.after_optimizer_step()
            schedule.after_epoch()
            if val_losses is not None and epoch < len(val_losses):
                schedule.after_validation(val_losses[epoch], val_losses[epoch])
    return series


def replay_lrs(cfg: ScheduleConfig, horizon: Horizon, group_names: list[str], make_optimizer: Callable,
               steps_done: int, epochs_done: int, validations: list[tuple],
               max_steps: int = 2_000_000) -> Optional[list[float]]:
    """The LRs a fresh schedule reaches after ``steps_done`` steps and ``epochs_done`` epochs,
    fed the recorded validations (see :func:`advance`): an independent recomputation to check a
    resume against. None when the run is too long to replay cheaply."""
    if steps_done > max_steps:
        return None
    optimizer = make_optimizer()
    advance(LRSchedule(optimizer, cfg, horizon, group_names), horizon, steps_done, epochs_done, validations)
    return [g["lr"] for g in optimizer.param_groups]


# Kinds whose LR torch can compute from last_epoch alone (closed form, or get_lr a pure function of it).
_REBUILDABLE = {"none", "step", "multistep", "exponential", "cosine", "linear", "polynomial", "lambda", "onecycle",
                "cyclic", "constant"}


def lrs_rebuilt_from_last_epoch(cfg: ScheduleConfig, horizon: Horizon, restored_groups: list[dict],
                                last_epoch: int, steps_done: int) -> Optional[list[float]]:
    """The other way torch restores a scheduler: construct it with ``last_epoch``.

    That constructor needs ``initial_lr`` in every param group, which only the restored optimizer
    has (so the optimizer is restored first). Chainable schedulers would then apply their last
    step a second time (the classic off-by-one after resume), so the LR is read from the closed
    form at ``last_epoch``. Returns None for kinds torch cannot rebuild this way (plateau, restarts).
    """
    if cfg.name not in _REBUILDABLE:
        return None
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in restored_groups]
    groups = []
    for p, g in zip(params, restored_groups):
        if "initial_lr" not in g:
            raise KeyError("initial_lr")
        # Everything the restored group carries (initial_lr, OneCycle's max_lr/min_lr, betas, ...).
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [p]})
    optimizer = _ScratchOptimizer.with_groups(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler = _build_with_last_epoch(lookup("schedule", cfg.name), optimizer, cfg,
                                           main_schedule_length(cfg, horizon), last_epoch - 1)
        scheduler.last_epoch = last_epoch
        closed = getattr(scheduler, "_get_closed_form_lr", None)
        scheduler._get_lr_called_within_step = True
        lrs = list(closed() if closed is not None else scheduler.get_lr())
    warm = LRSchedule.__new__(LRSchedule)
    warm.steps_done, warm.warmup_steps, warm.warmup_start_factor = steps_done, cfg.warmup_steps, cfg.warmup_start_factor
    factor = warm.warmup_factor() if cfg.warmup_steps else 1.0
    return [float(lr) * factor for lr in lrs]


def _build_with_last_epoch(kind, optimizer, cfg: ScheduleConfig, horizon: int, last_epoch: int):
    """Build the kind as usual, then again with last_epoch (torch has no setter for it)."""
    import inspect

    template = kind.build(_ScratchOptimizer.like(optimizer), cfg.options, horizon)
    cls = type(template)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in vars(template).items() if k in accepted and k not in ("optimizer", "last_epoch")}
    if cls is torch_sched.OneCycleLR:
        kwargs = {"max_lr": [g["max_lr"] for g in optimizer.param_groups] if "max_lr" in optimizer.param_groups[0]
                  else [g["initial_lr"] * cfg.options.div_factor for g in optimizer.param_groups],
                  "total_steps": template.total_steps, "pct_start": cfg.options.pct_start,
                  "anneal_strategy": cfg.options.anneal_strategy, "cycle_momentum": cfg.options.cycle_momentum,
                  "base_momentum": cfg.options.base_momentum, "max_momentum": cfg.options.max_momentum,
                  "div_factor": cfg.options.div_factor, "final_div_factor": cfg.options.final_div_factor,
                  "three_phase": cfg.options.three_phase}
    if cls is torch_sched.CyclicLR:
        o = cfg.options
        base = o.base_lr if o.base_lr is not None else [g["initial_lr"] for g in optimizer.param_groups]
        return cls(optimizer, base_lr=base, max_lr=o.max_lr, step_size_up=o.step_size_up,
                   step_size_down=o.step_size_down, mode=o.mode, gamma=o.gamma, cycle_momentum=o.cycle_momentum,
                   last_epoch=last_epoch)
    if cls is torch_sched.LambdaLR:
        kwargs = {"lr_lambda": template.lr_lambdas}
    return cls(optimizer, last_epoch=last_epoch, **kwargs)


class _ScratchOptimizer:
    @staticmethod
    def with_groups(groups):
        # Optimizer hyperparameters ride along in the groups; the class only needs to accept them.
        cls = torch.optim.Adam if "betas" in groups[0] else torch.optim.SGD
        accepted = {"params", "lr", "initial_lr", "max_lr", "min_lr", "betas", "momentum", "max_momentum",
                    "base_momentum", "weight_decay", "eps", "dampening", "nesterov"}
        return cls([{k: v for k, v in g.items() if k in accepted} for g in groups], lr=groups[0]["lr"])

    @staticmethod
    def like(optimizer):
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in optimizer.param_groups]
        return torch.optim.Adam([{"params": [p], "lr": g["initial_lr"]} for p, g in zip(params, optimizer.param_groups)])


def advance(schedule: "LRSchedule", horizon: Horizon, steps_done: int, epochs_done: int,
            validations: list[tuple]) -> None:
    """Step ``schedule`` as the loop would through ``epochs_done`` whole epochs and then up to
    ``steps_done`` optimizer steps, feeding the recorded validations to ReduceLROnPlateau where they
    happened. ``validations``: (step, at an epoch's end, val_loss, monitored value) in the order
    they ran; a None value did not feed the schedule. No optimizer step is taken."""
    pending = list(validations)

    def feed(step: int, epoch_end: bool) -> None:
        while pending and pending[0][0] == step and bool(pending[0][1]) == epoch_end:
            _, _, val_loss, monitored = pending.pop(0)
            if val_loss is not None or monitored is not None:
                schedule.after_validation(val_loss, monitored)

    # Where each epoch really ended (a stream that ran out, loader workers that each dropped a last
    # partial batch: fewer steps than planned); the plan where no record says.
    epoch_ends = [entry[0] for entry in validations if entry[1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns when no optimizer.step() happened
        step = 0
        for epoch in range(epochs_done):
            end = epoch_ends[epoch] if epoch < len(epoch_ends) else step + horizon.steps_per_epoch
            while step < end:
                schedule.after_optimizer_step()
                step += 1
                feed(step, False)
            schedule.after_epoch()
            feed(step, True)
        while step < steps_done:
            schedule.after_optimizer_step()
            step += 1
            feed(step, False)
