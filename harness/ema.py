"""An exponential moving average of the model's parameters (``train.ema``), kept in float32.

After optimizer step ``s`` (counted from 1): before ``start_step`` the average is a copy of the
weights; from it on, every ``every_steps`` steps, ``ema <- ema + (1 - decay) * (weights - ema)``
(torch.lerp). It is a function of the step and the weights alone, so a resumed run continues it
exactly. Under FSDP2 each rank holds the rows of its own parameter shards, like the parameters.

``train.ema.evaluate``: validation and the test split run on the averaged weights (swapped into
the model for the evaluation and swapped back bitwise before anything else happens).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harness import sharding


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, start_step: int, every_steps: int):
        self.decay, self.start_step, self.every_steps = decay, start_step, every_steps
        # named_parameters() lists a tied parameter once; the averages are float32, sharded like it.
        self.params = dict(model.named_parameters())
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self._swapped: list[torch.Tensor] | None = None

    @classmethod
    def from_config(cls, model: torch.nn.Module, ema) -> "EMA | None":
        """The average train.ema asks for (None when it is null)."""
        return None if ema is None else cls(model, ema.decay, ema.start_step, ema.every_steps)

    def _locals(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shadow = [sharding.local(s) for s in self.shadow.values()]
        weights = [sharding.local(p.detach()) for p in self.params.values()]
        return shadow, [w if w.dtype == torch.float32 else w.float() for w in weights]

    @torch.no_grad()
    def reset_to_weights(self) -> None:
        shadow, weights = self._locals()
        torch._foreach_copy_(shadow, weights)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step < self.start_step:
            self.reset_to_weights()
        elif (step - self.start_step) % self.every_steps == 0:
            shadow, weights = self._locals()
            torch._foreach_lerp_(shadow, weights, 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (DTensors under FSDP2)."""
        return self.shadow

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averages in place of the parameters (buffers as they
        are): loadable into the model as it stands. A tied parameter's names share one tensor."""
        by_id = {id(p): self.shadow[name] for name, p in self.params.items()}
        return {key: by_id.get(id(value), value.detach()) for key, value in model.state_dict(keep_vars=True).items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the model's parameters for the duration (for an evaluation)."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    @torch.no_grad()
    def swap_in(self) -> None:
        weights = [sharding.local(p.detach()) for p in self.params.values()]
        self._swapped = [w.clone() for w in weights]
        torch._foreach_copy_(weights, [sharding.local(s) for s in self.shadow.values()])

    @torch.no_grad()
    def swap_out(self) -> None:
        """The training weights back, bitwise (idempotent)."""
        if self._swapped is None:
            return
        torch._foreach_copy_([sharding.local(p.detach()) for p in self.params.values()], self._swapped)
        self._swapped = None
