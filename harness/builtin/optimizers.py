"""Every torch.optim optimizer by its class name, in any case (Adam, adamw, RMSprop, SGD, ...).

Registered under the lower-case name (the name recipes and checkpoints have always used); the
recipe's keys beside ``optim.name`` are the class's own arguments, checked against its signature.
"""

from __future__ import annotations

import torch

from harness.components import add

for _name in dir(torch.optim):
    _cls = getattr(torch.optim, _name)
    if isinstance(_cls, type) and issubclass(_cls, torch.optim.Optimizer) and _cls is not torch.optim.Optimizer:
        add("optim", _name.lower(), _cls, aliases=(_name,), summary=f"torch.optim.{_name}")
