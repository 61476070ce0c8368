"""Turn plain dicts (from YAML, JSON or `key=value` overrides) into frozen typed dataclasses.

The dataclass definitions in `spec.py` are the schema: field types, defaults and
`metadata={"min": ..., "max": ..., "choices": ...}` drive validation, so there is no
second copy of the schema to keep in sync. Errors name the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Literal, Union

from launcher.errors import ConfigError

MISSING = dataclasses.MISSING
# How NaN and infinity are spelled in overrides and YAML strings (`lr=nan`, `lr=inf`).
_NON_FINITE = ("nan", "inf", "infinity")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (cached: the CLI resolves them often)."""
    return typing.get_type_hints(cls)


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def closest(key: str, valid: list[str]) -> str | None:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return match[0] if match else None


def _unknown_key_error(key: str, valid: list[str], file: str | None, prefix: str) -> ConfigError:
    dotted = f"{prefix}{key}"
    near = closest(key, valid)
    hint = f"did you mean '{prefix}{near}'?" if near else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError("unknown key", file=file, key=dotted, hint=hint)


def describe(tp: Any) -> str:
    """Human name of a type for error messages ('an integer', 'a list of strings')."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert(tp: Any, value: Any, *, file: str | None, key: str) -> Any:
    """Check `value` against type `tp`; return it in its frozen form (lists become tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"expected {describe(tp)}, got {_show(value)} ({type(value).__name__})",
            file=file,
            key=key,
        )

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            # Only one real type: its own (more precise) error is the one to show.
            return convert(options[0], value, file=file, key=key)
        for arg in options:
            try:
                return convert(arg, value, file=file, key=key)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        near = closest(str(value), [str(a) for a in args])
        hint = f"did you mean {near!r}?" if near else None
        raise ConfigError(
            f"expected {describe(tp)}, got {_show(value)}", file=file, key=key, hint=hint
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, file=file, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad()
        item = args[0]
        return tuple(convert(item, v, file=file, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        key_tp, val_tp = args
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"keys must be strings, got {_show(k)}", file=file, key=key)
            out[k] = convert(val_tp, v, file=file, key=f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and value.bit_length() > 1000:  # float() would overflow
                raise ConfigError(
                    f"found an integer of {value.bit_length()} bits; expected a number",
                    file=file,
                    key=key,
                )
            if not math.isfinite(value):
                raise ConfigError(f"found {value!r}; expected a finite number", file=file, key=key)
            return float(value)
        if isinstance(value, str) and value.strip().lower().lstrip("+-.") in _NON_FINITE:
            raise ConfigError(f"found {value!r}; expected a finite number", file=file, key=key)
        raise bad()
    if tp is str:
        # Numbers are accepted for strings (YAML reads `partition: 4` as an int).
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"schema type not supported: {tp!r}")


def _check_bounds(f: dataclasses.Field, value: Any, *, file: str | None, key: str) -> None:
    if value is None:
        return
    lo = f.metadata.get("min")
    hi = f.metadata.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"must be >= {lo}, got {_show(value)}", file=file, key=key)
    if hi is not None and value > hi:
        raise ConfigError(f"must be <= {hi}, got {_show(value)}", file=file, key=key)
    pattern = f.metadata.get("pattern")
    if pattern is not None:
        import re

        if not re.fullmatch(pattern, value):
            what = f.metadata.get("pattern_help", f"a string matching {pattern}")
            raise ConfigError(f"expected {what}, got {_show(value)}", file=file, key=key)


def build(cls: type, data: dict[str, Any] | None, *, file: str | None = None, prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and bad values."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping, got {_show(data)}", file=file, key=prefix.rstrip(".") or None
        )
    fields = fields_of(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key_error(str(key), list(fields), file, prefix)
    kwargs = {}
    types_ = hints(cls)
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            value = convert(types_[name], data[name], file=file, key=key)
            _check_bounds(f, value, file=file, key=key)
            kwargs[name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(
                f"missing required key (expected {describe(types_[name])})", file=file, key=key
            )
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if check is not None:
        for rel_key, message in check():
            raise ConfigError(message, file=file, key=f"{prefix}{rel_key}")
    return obj


def type_at(cls: type, dotted: str, *, file: str | None = None) -> Any:
    """The schema type at a dotted key path, for typing `key=value` overrides."""
    tp: Any = cls
    walked = ""
    for part in dotted.split("."):
        base = _dataclass_in(tp)
        if base is None:
            tp = _without_none(tp)
            if typing.get_origin(tp) is dict or tp is Any:
                return typing.get_args(tp)[1] if typing.get_args(tp) else Any
            raise ConfigError("is not a section with keys", file=file, key=walked.rstrip("."))
        fields = fields_of(base)
        if part not in fields:
            raise _unknown_key_error(part, list(fields), file, walked)
        tp = hints(base)[part]
        walked += part + "."
    return tp


def _without_none(tp: Any) -> Any:
    """`X | None` -> X (for walking into optional sections)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _dataclass_in(tp: Any) -> type | None:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def to_dict(obj: Any) -> Any:
    """Plain-data form of a spec (tuples become lists) for YAML/JSON output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
