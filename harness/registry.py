"""Names a recipe may use for data sets, models and schedules, and the options each one takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Kind:
    options: type  # dataclass of the kind's own recipe keys
    build: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    summary: str = ""


def kinds(section: str) -> dict[str, Kind]:
    # Imported on demand so that reading a recipe never imports torch_geometric.
    if section == "schedule":
        from harness.schedules import SCHEDULES

        return SCHEDULES
    if section == "model":
        from harness.models import MODELS

        return MODELS
    if section == "data":
        from harness.datasets import DATASETS

        return DATASETS
    raise KeyError(section)


def canonical_name(section: str, name: Any) -> str:
    from harness.config import ConfigError

    table = kinds(section)
    wanted = str(name).lower()
    for canonical, kind in table.items():
        if wanted == canonical.lower() or wanted in (a.lower() for a in kind.aliases):
            return canonical
    valid = ", ".join(sorted(table))
    raise ConfigError(f"{section}.name: unknown {section} {name!r}. Valid names: {valid}")


def options_class(section: str, name: Any) -> type:
    return kinds(section)[canonical_name(section, name)].options


def lookup(section: str, name: str) -> Kind:
    return kinds(section)[canonical_name(section, name)]
