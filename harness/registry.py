"""Schedule kinds by name, and the options each one takes (see harness/schedules.py).

Models, data sets, losses, metrics and optimizers are components (harness/components.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from harness.contracts import ConfigError


@dataclass(frozen=True)
class Kind:
    options: type  # dataclass of the kind's own recipe keys
    build: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    summary: str = ""


def kinds(section: str) -> dict[str, Kind]:
    if section == "schedule":
        from harness.schedules import SCHEDULES

        return SCHEDULES
    raise KeyError(section)


def canonical_name(section: str, name: Any) -> str:
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
