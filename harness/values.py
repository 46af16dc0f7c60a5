"""Recipe values to Python types: YAML's loose values checked and converted against an annotation.

A leaf module (no harness imports): config.py uses it for its sections, components.py for the
arguments of any component's signature.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections import Counter
import types
import typing
from typing import Any, Literal, Union

from harness.contracts import ConfigError


def type_checkable(hint: Any) -> bool:
    """Whether ``coerce`` understands ``hint`` (plain data types and their unions, lists, literals)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint in (bool, int, float, str) or hint is type(None):
        return True
    if origin in (Union, types.UnionType):
        return all(type_checkable(a) for a in args)
    if origin is Literal:
        return True
    if origin in (list, dict):
        return all(type_checkable(a) for a in args) if args else False
    return dataclasses.is_dataclass(hint)


def coerce_lenient(value: Any, hint: Any, path: str) -> Any:
    """``coerce`` where the annotation is plain data; for ``float | Tensor`` the plain part, for
    ``tuple[float, float]`` each element; values for other annotations pass unchecked."""
    if type_checkable(hint):
        return coerce(value, hint, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        plain = [a for a in args if type_checkable(a)]
        if value is None and type(None) in args:
            return None
        for arg in plain:
            try:
                return coerce(value, arg, path)
            except ConfigError:
                continue
        if plain and len(plain) == len([a for a in args if a is not type(None)]):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(hint)}")
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return [coerce_lenient(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: got {value!r}, expected {len(args)} values")
        return [coerce_lenient(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))] if args else value
    return value


def _unknown_key_message(key: str, valid: list[str], where: str, prefix: str = "") -> str:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}"


def parse_dataclass(cls: type, raw: dict, path: str):
    """Build ``cls`` from ``raw``: unknown keys, missing keys and wrong types are ConfigErrors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(f"{path}.{key}", names, where=path, prefix=path))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = coerce(raw[f.name], hints[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{f.name}: missing, expected {_type_name(hints[f.name])}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ messages name the key relative to the section; keep the full path.
        message = str(exc)
        if not message.startswith(path.split(".")[0]):
            message = f"{path}.{message}"
        raise ConfigError(message) from None


def coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML value to ``hint``; YAML 1.1 reads ``1e-3`` as a string, so numbers are parsed."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{path}: got {value!r}, expected one of {', '.join(repr(a) for a in args)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected a list of {_type_name(args[0])}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
        return {k: coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r}, expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{path}: got {value!r}, expected an integer")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-3", "5e-4": YAML 1.1 leaves these as strings
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r}, expected a string")
    raise ConfigError(f"{path}: unsupported type {hint!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """A recipe check: ``key: got <value>, expected <expected>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


# --------------------------------------------------------------------------------------------
# State as strict JSON (schedulers, stream positions)
# --------------------------------------------------------------------------------------------


def to_json_safe(value, where: str = "state"):
    """Scheduler state as strict JSON that from_json_safe restores exactly: Counters (MultiStepLR's
    milestones, int keys), tuples and inf/nan are tagged. Anything else JSON cannot hold (a function,
    an arbitrary object, a dict with non-string keys) is a TypeError naming its key path (``where``
    is the root's): written as null, it would break the resume instead of the save."""
    if isinstance(value, Counter):
        return {"__counter__": [[to_json_safe(k, f"{where} key"), to_json_safe(v, f"{where}[{k!r}]")]
                                for k, v in value.items()]}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} of type {_value_type_name(key)}; JSON keys are strings")
        return {k: to_json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [to_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    raise TypeError(
        f"{where} is {_value_type_name(value)}, which JSON cannot hold; it would be lost on resume. A scheduler's "
        "state must be numbers, strings, lists and dicts: torch saves a callable object by its __dict__, so "
        "keep a name or import path there to rebuild the function from (as LambdaFactor does), not the "
        "function or object itself")


def _value_type_name(value) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def from_json_safe(value):
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return Counter({from_json_safe(k): from_json_safe(v) for k, v in value["__counter__"]})
        if set(value) == {"__tuple__"}:
            return tuple(from_json_safe(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_safe(v) for v in value]
    return value
