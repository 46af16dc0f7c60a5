"""PNG plots: the planned LR of a recipe (``harness check``) and a run's logged LR and losses
(``harness plot-lr``).

Figures are built on matplotlib's object API with the Agg canvas: no pyplot, no global state, no
display needed, and the pixel size is exactly ``FIGSIZE x DPI`` (no tight bounding box), so a
caller can rely on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.inspection import read_run_scalars, resume_points

DPI = 100
PREVIEW_FIGSIZE = (9.0, 4.5)  # 900 x 450 pixels
RUN_FIGSIZE = (13.0, 4.5)  # 1300 x 450 pixels: LR on the left, losses on the right


class PlotError(RuntimeError):
    """Nothing to plot, or no way to plot it; the message names the folder or the missing package."""


def _new_figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is needed for PNG output: pip install 'matplotlib>=3.7' "
                        "(or the harness's 'plot' extra)") from None
    figure = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def plot_lr_preview(series: dict[str, list[float]], steps_per_epoch: int, path: Path | str, title: str,
                    warmup_steps: int = 0, stop_step: Optional[int] = None) -> Path:
    """The planned LR of each param group against the optimizer step (from 1)."""
    figure = _new_figure(PREVIEW_FIGSIZE)
    ax = figure.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, drawstyle="steps-post", label=f"lr/{name}")
    total = max((len(v) for v in series.values()), default=0)
    epochs = total // max(steps_per_epoch, 1)
    if 1 < epochs <= 60 and steps_per_epoch > 1:
        # Epoch boundaries explain the shape of epoch-interval schedules; too many would be noise.
        for epoch in range(1, epochs):
            ax.axvline(epoch * steps_per_epoch + 0.5, color="0.85", linewidth=0.6, zorder=0)
    if warmup_steps:
        ax.axvline(warmup_steps + 0.5, color="tab:orange", linestyle=":", label=f"warmup ends ({warmup_steps})")
    if stop_step is not None and stop_step < total:
        ax.axvline(stop_step + 0.5, color="tab:red", linestyle="--", label=f"train.max_steps ({stop_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def run_folder(path: Path | str) -> Path:
    """A run folder, also when given its ``tb/`` (the folder a TensorBoard user passes as logdir)."""
    path = Path(path)
    if path.name == "tb" and not (path / "tb").is_dir() and (path.parent / "config.yaml").is_file():
        return path.parent
    return path


def plot_run(run_dir: Path | str, out: Path | str, log_lr: bool = False) -> dict:
    """LR of every param group (left) and train/val loss (right) against the optimizer step, from
    the run's TensorBoard files, with a dashed line at every resume point. Returns what was drawn."""

    run_dir = run_folder(run_dir)
    try:
        scalars = read_run_scalars(run_dir)
    except FileNotFoundError as exc:
        raise PlotError(f"{exc} (is {run_dir} a run folder?)") from None
    lr_tags = sorted(tag for tag in scalars if tag.startswith("lr/"))
    if not lr_tags:
        raise PlotError(f"{run_dir / 'tb'}: no lr/<group> series logged yet")
    resumes = resume_points(run_dir)
    figure = _new_figure(RUN_FIGSIZE)
    lr_ax, loss_ax = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for tag in lr_tags:
        steps, values = zip(*scalars[tag])
        lr_ax.plot(steps, values, drawstyle="steps-post", label=tag)
    loss_tags = [t for t in ("train/loss", "train/loss_epoch", "val/loss") if t in scalars]
    styles = {"train/loss": {}, "train/loss_epoch": {"linestyle": "--"}, "val/loss": {"marker": "o", "markersize": 3}}
    for tag in loss_tags:
        steps, values = zip(*scalars[tag])
        loss_ax.plot(steps, values, label=tag, **styles[tag])
    for ax in (lr_ax, loss_ax):
        for i, step in enumerate(resumes):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1,
                       label="resumed from a checkpoint" if i == 0 else None)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    lr_ax.set_ylabel("learning rate")
    if log_lr:
        lr_ax.set_yscale("log")
    else:
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.set_title(f"{run_dir.name}: learning rate per param group", fontsize=10)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss" if loss_tags else "loss (none logged yet)", fontsize=10)
    lr_ax.legend(fontsize=8)
    if loss_tags or resumes:
        loss_ax.legend(fontsize=8)
    figure.tight_layout()
    path = _save(figure, out)
    last_step = max(step for tag in lr_tags for step, _ in scalars[tag])
    return {"path": path, "lr_tags": lr_tags, "loss_tags": loss_tags, "resumes": resumes, "last_step": last_step}
