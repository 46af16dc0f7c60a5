"""Independent LR references: the stock torch scheduler stepped alone on a dummy optimizer."""

from __future__ import annotations

import math

import torch


def stock_series(make_scheduler, group_lrs: list[float], steps_per_epoch: int, epochs: int, interval: str,
                 val_losses: list[float] | None = None) -> list[list[float]]:
    """LR of each group at each optimizer step, with the scheduler stepped the textbook way."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)])
    scheduler = make_scheduler(optimizer)
    series = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            series.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            if interval == "step":
                scheduler.step()
        if val_losses is not None:
            scheduler.step(val_losses[epoch])
        elif interval == "epoch":
            scheduler.step()
    return series


def warmup_cosine_closed_form(base: float, step: int, warmup: int, start_factor: float, total: int,
                              eta_min: float) -> float:
    if step < warmup:
        return base * (start_factor + (1 - start_factor) * step / warmup)
    t = step - warmup
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / (total - warmup))) / 2
