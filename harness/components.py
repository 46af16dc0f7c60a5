"""Components by name: a registered short name (``mlp``, ``bce``, ``step``) or an import path
(``mymodels:GCN``, ``torch.nn:BCELoss``), built with the recipe's keys as keyword arguments.

The built-in components register themselves where they are defined (``@register("model", "mlp")``
in harness/builtin/models.py); nothing here imports them: harness.config does, so they are
registered before any recipe is read. A user's component needs no registration: its import path is
resolved from the recipe's folder, then the working directory, then the installed packages.

Arguments are checked against the callable's signature before any process starts: an unknown
key (with a did-you-mean), a missing required argument, a value of the wrong type where the
parameter is annotated. Some arguments are the harness's to give (the optimizer of a scheduler,
the number of input features of a model): ``provided`` names them.

Exceptions raised inside a user's own module are re-raised as :class:`UserCodeError`, which the
command line prints as the user's file and line, not the harness's internals.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import inspect
import sys
import traceback
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from harness.contracts import ConfigError
from harness.values import coerce_lenient

SECTIONS = ("data", "model", "loss", "metric", "optim", "schedule")


@dataclass(frozen=True)
class Entry:
    """A short name for a component: what it builds, and a line for listings."""

    name: str
    target: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    summary: str = ""


_REGISTRY: dict[str, dict[str, Entry]] = {section: {} for section in SECTIONS}


def register(section: str, name: str, aliases: Iterable[str] = (), summary: str = ""):
    """Decorator: ``@register("model", "mlp")`` makes ``model.name: mlp`` build the decorated callable."""
    if section not in _REGISTRY:
        raise ValueError(f"unknown component section {section!r}; one of {', '.join(SECTIONS)}")

    def decorate(target):
        add(section, name, target, aliases, summary)
        return target

    return decorate


def add(section: str, name: str, target: Callable, aliases: Iterable[str] = (), summary: str = "") -> None:
    _REGISTRY[section][name] = Entry(name, target, tuple(aliases), summary)


def entries(section: str) -> dict[str, Entry]:
    return _REGISTRY[section]


def is_import_path(name: str) -> bool:
    return ":" in str(name)


def lookup(section: str, name: Any) -> Entry:
    """The registered entry for ``name`` (case-insensitive, aliases too), or a ConfigError."""
    table = entries(section)
    wanted = str(name).lower()
    for entry in table.values():
        if wanted == entry.name.lower() or wanted in (a.lower() for a in entry.aliases):
            return entry
    names = sorted(table)
    close = difflib.get_close_matches(wanted, [n.lower() for n in names], n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{section}.name: unknown {section} {name!r}.{hint} Valid names: {', '.join(names)}; "
                      f"or your own as 'module:attribute' (e.g. mymodule:My{section.title()})")


# --------------------------------------------------------------------------------------------
# Import paths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a component came from, for checkpoints: its import path and a hash of its source."""

    target: str
    file: Optional[str] = None
    sha256: Optional[str] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextmanager
def search_path(folders: Iterable[Path]):
    """Import from these folders first (the recipe's folder, the working directory)."""
    added = [str(Path(f).resolve()) for f in folders if f is not None]
    added = [f for i, f in enumerate(added) if f not in added[:i]]
    saved = list(sys.path)
    sys.path[:0] = [f for f in added if f not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_target(path: str, where: str, folders: Iterable[Path] = ()) -> Callable:
    """``package.module:attr.sub`` -> the object. Errors name the recipe key and what was tried."""
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}: {path!r} is not an import path; expected 'module:attribute', "
                          "e.g. mymodels:GCN (mymodels.py beside the recipe)")
    folders = list(folders)
    with search_path(folders):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                looked = ", ".join(str(Path(f).resolve()) for f in folders)
                raise ConfigError(f"{where}: cannot import module {module_name!r} for {path!r}: no {exc.name}.py "
                                  f"(or package) in {looked or 'the working directory'} or the installed "
                                  "packages") from None
            raise UserCodeError(f"importing {module_name!r} for {where}", exc) from exc
        except ConfigError:
            raise
        except Exception as exc:  # the user's module itself failed: show their file and line
            raise UserCodeError(f"importing {module_name!r} for {where}", exc) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            available = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, available, n=1, cutoff=0.6)
            hint = f" Did you mean {module_name}:{close[0]}?" if close else ""
            raise ConfigError(f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                              f"{attribute!r}.{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {path!r} is a {type(target).__name__}, not a class or function")
    return target


def origin_of(target: Any, name: str) -> Origin:
    """The import path and source hash of a class or function (or of an object's class)."""
    obj = target if inspect.isclass(target) or inspect.isroutine(target) else type(target)
    try:
        file = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        file = None
    digest = None
    if file and Path(file).is_file():
        digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    path = name if is_import_path(name) else f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
    return Origin(path, str(Path(file).resolve()) if file else None, digest)


def resolve(section: str, name: Any, folders: Iterable[Path] = ()) -> Callable:
    """A short name from the registry, or an import path."""
    if is_import_path(name):
        return import_target(str(name), f"{section}.name", folders)
    return lookup(section, name).target


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def signature_of(target: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None  # builtins without a signature: accept any keys


def type_hints(target: Callable) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - annotations that do not evaluate: no type checks
        return {}


def check_arguments(target: Callable, kwargs: dict, where: str, provided: Iterable[str] = (),
                    refused: Optional[dict[str, str]] = None) -> dict:
    """Validate ``kwargs`` for ``target`` (unknown, missing, types); returns them coerced.

    ``provided``: names the harness fills in itself (an error if the recipe gives them, unless the
    parameter is also optional data the recipe may set). ``refused``: name -> why it cannot be set.
    """
    refused = refused or {}
    for key in kwargs:
        if key in refused:
            raise ConfigError(f"{where}.{key}: cannot be set here: {refused[key]}")
    signature = signature_of(target)
    if signature is None:
        return dict(kwargs)
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [n for n, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    settable = [n for n in named if n not in refused and n not in provided]
    if not takes_any:
        for key in kwargs:
            if key not in named:
                close = difflib.get_close_matches(key, settable, n=1, cutoff=0.6)
                hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
                raise ConfigError(f"unknown key '{where}.{key}': {_describe_target(target)} takes no argument "
                                  f"{key!r}.{hint} Valid keys: {', '.join(settable) or '(none)'}")
    provided = set(provided)
    for name in named:
        parameter = parameters[name]
        if parameter.default is inspect.Parameter.empty and name not in kwargs and name not in provided:
            raise ConfigError(f"{where}.{name}: missing; {_describe_target(target)} requires it")
    hints = type_hints(target)
    out = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        out[key] = value if hint is None else coerce_lenient(value, hint, f"{where}.{key}")
    return out


def leading_parameters(target: Callable, count: int) -> tuple[str, ...]:
    """The names of a function's first ``count`` positional parameters (a loss's outputs, targets)."""
    signature = signature_of(target)
    if signature is None:
        return ()
    positional = [n for n, p in signature.parameters.items()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple(positional[:count])


def _describe_target(target: Callable) -> str:
    module = getattr(target, "__module__", "")
    name = getattr(target, "__qualname__", repr(target))
    return f"{module}.{name}" if module else name


def defaults_of(target: Callable, skip: Iterable[str] = ()) -> dict:
    """The signature's defaults that are plain data, for the resolved recipe (config.yaml)."""
    signature = signature_of(target)
    if signature is None:
        return {}
    skip = set(skip)
    hints = type_hints(target)
    out = {}
    for name, parameter in signature.parameters.items():
        if name in skip or parameter.default is inspect.Parameter.empty:
            continue
        if parameter.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        if _plain(parameter.default):
            value = list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
            if hints.get(name) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # weight_decay: float = 0 -> 0.0, as a recipe would say it
            out[name] = value
    return out


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# --------------------------------------------------------------------------------------------
# Errors in the user's own code
# --------------------------------------------------------------------------------------------


_HARNESS_DIR = str(Path(__file__).resolve().parent)


class UserCodeError(RuntimeError):
    """An exception raised inside a user's component; ``str()`` shows the user's frames only."""

    def __init__(self, doing: str, error: BaseException, while_training: bool = False):
        self.doing, self.error, self.while_training = doing, error, while_training
        super().__init__(self.describe())

    def user_frames(self) -> list[traceback.FrameSummary]:
        frames = traceback.extract_tb(self.error.__traceback__)
        return [f for f in frames if _is_user_file(f.filename)]

    def describe(self) -> str:
        frames = self.user_frames()
        lines = [f"error in your code while {self.doing}: {type(self.error).__name__}: {self.error}"]
        if frames:
            where = frames[-1]
            lines[0] = (f"error in your code while {self.doing}: {where.filename}, line {where.lineno}, in "
                        f"{where.name}: {type(self.error).__name__}: {self.error}")
            lines.append("Traceback (your code only, most recent call last):")
            lines += [line.rstrip("\n") for line in traceback.format_list(frames)]
        return "\n".join(lines)


def user_frames(error: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(error.__traceback__) if _is_user_file(f.filename)]


def _is_user_file(filename: str) -> bool:
    resolved = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    if resolved.startswith(_HARNESS_DIR):
        return False
    return not any(part in resolved for part in ("site-packages", "dist-packages", "/lib/python3", "<frozen"))


@contextmanager
def user_code(doing: str, while_training: bool = False):
    """Wrap a call into a user's component: its exception becomes a UserCodeError (the command
    line exits 2 for one raised while building, 1 for one raised while training)."""
    try:
        yield
    except (ConfigError, UserCodeError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the user's frames
        if not any(_is_user_file(f.filename) for f in traceback.extract_tb(exc.__traceback__)):
            raise  # not the user's code: a harness or library error keeps its own traceback
        raise UserCodeError(doing, exc, while_training) from exc


def build(target: Callable, kwargs: dict, doing: str):
    with user_code(doing):
        return target(**kwargs)


@dataclass
class Spec:
    """A component section as validated: its name, the resolved callable and its arguments."""

    name: str
    target: Callable = field(repr=False)
    kwargs: dict = field(default_factory=dict)
    origin: Optional[Origin] = None
