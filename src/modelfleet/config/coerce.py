"""Dataclass construction from plain data: unknown keys and wrongly typed values raise a
``ConfigError`` naming the dotted key (``train.lr: must be a number, got 'fast'``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from modelfleet.errors import ConfigError


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError("<key>: <msg>") unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def build(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"{prefix}{k}: unknown key; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field's type hint."""
    if dataclasses.is_dataclass(tp):
        return build(tp, v, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        check(v in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        if len(args) == 1:  # ``X | None``: X's own error names the inner key
            return _coerce(args[0], v, key)
        errors = []
        for a in args:  # the first member type the value fits (``int | list[int]``)
            try:
                return _coerce(a, v, key)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        check(isinstance(v, (list, tuple)), key, f"must be a list, got {v!r}")
        return [_coerce(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        check(isinstance(v, Mapping), key, f"must be a mapping, got {v!r}")
        return dict(v)
    if tp is bool:
        check(isinstance(v, bool), key, f"must be true or false, got {v!r}")
        return v
    if tp is int:
        check(isinstance(v, int) and not isinstance(v, bool), key, f"must be an integer, got {v!r}")
        return v
    if tp is float:
        check(isinstance(v, (int, float)) and not isinstance(v, bool), key, f"must be a number, got {v!r}")
        return float(v)
    if tp is str:
        check(isinstance(v, str), key, f"must be a string, got {v!r}")
        return v
    return v
