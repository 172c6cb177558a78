"""A plugin's typed options from the user's `<slot>.options.<plugin>` mapping: unknown keys and wrong types are
errors that name the key; the defaults live in the plugin's own Options dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from qvl_pipeline.errors import ConfigError


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` checked against the annotation `kind` (int, float, bool, str, X | None, Literal)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(kind)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in (a for a in arms if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_options(options_type: type, raw: Mapping[str, Any] | None, where: str) -> Any:
    """An instance of the plugin's Options dataclass from `raw`; errors name `where.<key>` and the fix."""
    raw = dict(raw or {})
    if not dataclasses.is_dataclass(options_type):
        raise ConfigError(f"{where}: the plugin's Options is not a dataclass",
                          "a plugin declares its options as a dataclass (see plugins/README.md)")
    hints = typing.get_type_hints(options_type)
    known = {f.name for f in dataclasses.fields(options_type) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        listing = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{where}: unknown option(s) {unknown}; this plugin's options are: {listing}",
                          f"check the spelling ({where}.<option>=value)")
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in raw.items()}
    try:
        return options_type(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}", f"set a valid value with {where}.<option>=value") from exc


def options_as_dict(options: Any) -> dict[str, Any]:
    """A plugin's options as plain data (for the plan)."""
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
