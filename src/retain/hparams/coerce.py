"""Typed config values: YAML values converted to the declared field types, with help text per field."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any

from retain.errors import ConfigError

_FIELD_CACHE: dict[type, dict[str, Any]] = {}


def fields_of(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_CACHE:
        hints = typing.get_type_hints(cls)
        _FIELD_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _FIELD_CACHE[cls]


def field_help(cls: type) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field of a config dataclass."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows


# ---- type coercion -------------------------------------------------------------------------


class Mismatch(Exception):
    pass


class NonFinite(Mismatch):
    """A number that is NaN or infinite: no config value takes one."""


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _enum_with_str(member: Any, union_args: tuple) -> bool:
    """Whether `member` is the `str` of a union that also holds an enum (the enum's values are the strings)."""
    return member is str and any(_is_enum(a) for a in union_args)


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join(describe(a) for a in args if not _enum_with_str(a, args))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if _is_enum(tp):
        return " or ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field type, or raise Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise Mismatch
        # Exact-type members first, so `int | str` keeps 3 as 3. An enum beside str (transformers'
        # `optim: OptimizerNames | str`) takes only the enum's values.
        ordered = sorted(
            (a for a in args if a is not type(None) and not _enum_with_str(a, args)), key=lambda a: a is str
        )
        non_finite = False
        for arg in ordered:
            try:
                return coerce(value, arg)
            except NonFinite:
                non_finite = True
            except Mismatch:
                continue
        raise NonFinite if non_finite else Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise Mismatch
    if tp is int or tp is float:
        return _number(value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise Mismatch
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # `maxsamples_list: 100` reads as `maxsamples_list: '100'` does
        if not isinstance(value, list | tuple):
            raise Mismatch
        return [coerce(item, item_tp) for item in value]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise Mismatch
    if _is_enum(tp):
        try:
            return tp(value)
        except ValueError:
            raise Mismatch from None
    return value


def coerce_field(value: Any, tp: Any, key: str, source: str) -> Any:
    try:
        return coerce(value, tp)
    except NonFinite:
        raise ConfigError(f"must be a finite number, got {value!r}", source=source, field=key) from None
    except Mismatch:
        raise ConfigError(f"expected {describe(tp)}, got {value!r}", source=source, field=key) from None


def _number(value: Any, tp: type) -> int | float:
    """An int or float from a YAML number or a numeric string (booleans are not numbers)."""
    if isinstance(value, str):
        try:
            value = tp(value.strip())
        except ValueError:
            raise Mismatch from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Mismatch
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFinite
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise Mismatch
        return int(value)
    return float(value)
