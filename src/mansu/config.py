"""What every config dataclass checks first: each field's type, so a bad value is a `MansuError` naming the
field rather than a `TypeError` deep inside a run. Range checks stay in each config's `__post_init__`."""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

from .errors import MansuError


def check_types(config: Any) -> None:
    """Raise a `MansuError` for the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise MansuError(f"{type(config).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")


def from_dict(cls: type, values: Any) -> Any:
    """`cls(**values)` for a nested config given as a dict, with unknown keys named in a `MansuError`."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise MansuError(f"expected a {cls.__name__} or a dict of its fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise MansuError(f"unknown {cls.__name__} field(s) {unknown}; it has {sorted(known)}")
    return cls(**values)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numbers.Integral: numpy's integers are fine too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float; NaN and infinity never are a setting
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple:  # tuple[X, ...]; a list is accepted and converted by the config
        (element, *_) = typing.get_args(hint)
        return isinstance(value, (tuple, list)) and all(_fits(v, element) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))  # a dict is converted by the config (see `from_dict`)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        return f"a list whose items are each {_describe(typing.get_args(hint)[0])}"
    names = {float: "a finite number", int: "an integer", str: "a string", bool: "True or False"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")
