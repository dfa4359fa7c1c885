"""Plain data (YAML, JSON, overrides) into frozen, typed dataclasses, one field at a time: a value
of the wrong type or an unknown key is one ConfigError naming the dotted key and what is allowed.

Hand-written rather than pydantic: the whole job is these ~80 lines, and every message would have to
be rebuilt from pydantic's errors anyway (its lax mode also turns "3" into 3 and 1 into True).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A user-facing configuration problem: the message names the key and what is allowed."""


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + describe(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, str(tp)
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int in Python, not here


# Scalar types: which plain values each accepts, and how they are converted.
_SCALARS = {
    type(None): (lambda v: v is None, lambda v: v),
    bool: (lambda v: isinstance(v, bool), lambda v: v),
    int: (lambda v: _number(v) and isinstance(v, int), lambda v: v),
    float: (_number, float),
    str: (lambda v: isinstance(v, str), lambda v: v),
    dict: (lambda v: isinstance(v, dict), dict),
}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and the allowed values."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}; expected {describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(typing.get_args(tp)[0], v, key) for v in value)
    accepts, convert = _SCALARS.get(tp, (None, None))
    if accepts is not None and accepts(value):
        return convert(value)
    raise bad


def build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be numbers too
    if unknown:
        key = str(unknown[0])
        key = key if key.isprintable() and key.strip() == key and key else repr(unknown[0])  # '\n' stays on one line
        raise ConfigError(f"{prefix}{key}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, value, key = hints[name], data[name], prefix + name
        kwargs[name] = build(tp, value, key + ".") if dataclasses.is_dataclass(tp) else _coerce(tp, value, key)
    return cls(**kwargs)


def set_dotted(data: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    """data[a][b][c] = value for path [a, b, c], making missing sections; a value in the way is a
    ConfigError naming `where` (the override or key being applied)."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value
