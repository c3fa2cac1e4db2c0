"""Frozen-dataclass configs: validation that names the field, and CLI overrides.

Each stage module owns its config dataclass; this module only holds what they
share: ``check`` for ``__post_init__`` validation, ``override`` for
``section.field=value`` strings from the command line, and ``describe`` for
``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections.abc import Iterator, Sequence


class ConfigError(ValueError):
    """An invalid config; the message names the field."""


def check(ok: bool, field: str, value, requirement: str) -> None:
    """Raises ConfigError ``"<field>=<value>: <requirement>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field}={value!r}: {requirement}")


def override(config, assignments: Sequence[str]):
    """Returns ``config`` with ``a.b.c=value`` assignments applied.

    Values are Python literals (``0.9``, ``(1, 2)``, ``True``); anything else is
    taken as a string, and for a field holding a tuple of strings, as a list of bare
    words (``stages=[prune,cluster]`` or ``stages=prune,cluster``). A field holding
    a tuple of dataclasses takes a list of dicts, one per item
    (``rules=[{"pattern": "Dense_0/kernel", "clusters": 64}, {"pattern": "kernel$"}]``).
    Unknown fields raise ConfigError naming them.
    """
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep:
            raise ConfigError(f"override {assignment!r}: expected field=value")
        config = _replace_path(config, path.strip().split("."), _parse(raw.strip()), path)
    return config


def _parse(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _replace_path(config, names: list[str], value, full: str):
    name, rest = names[0], names[1:]
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise ConfigError(f"unknown config field {full!r}: {type(config).__name__} has "
                          f"{sorted(fields)}")
    if rest:
        child = getattr(config, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"unknown config field {full!r}: {name} has no sub-fields")
        value = _replace_path(child, rest, value, full)
    else:
        value = _coerce(config, fields[name], value, full)
    if rest:
        return dataclasses.replace(config, **{name: value})
    try:
        return dataclasses.replace(config, **{name: value})
    except ConfigError as err:  # "epochs=-1: ..." -> "train.epochs=-1: ..."
        raise ConfigError(f"{full[:len(full) - len(name)]}{err}") from None


def _coerce(config, field: dataclasses.Field, value, full: str):
    """Ints for float fields, lists (or bare words, for strings) for tuples; rejects
    other type mismatches."""
    hint = typing.get_type_hints(type(config)).get(field.name)
    current = getattr(config, field.name)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (isinstance(current, tuple) and isinstance(value, (list, tuple)) and value
            and all(isinstance(item, dict) for item in value)):
        return _records(hint, value, full)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if (isinstance(value, str) and typing.get_origin(hint) is tuple
            and typing.get_args(hint)[:1] == (str,)):
        # Bare words need no quotes in a shell: "[prune, cluster]" -> ("prune", "cluster")
        return tuple(word.strip() for word in value.strip("[]()").split(","))
    mismatch = current is not None and value is not None and not isinstance(value, type(current))
    if mismatch and not (isinstance(current, float) and isinstance(value, int)):
        raise ConfigError(f"{full}={value!r}: expected {type(current).__name__}")
    return value


def _records(hint, records, full: str) -> tuple:
    """``tuple[Item, ...]`` of dataclass items built from dicts of their fields."""
    item = next(iter(typing.get_args(hint)), None)
    if not dataclasses.is_dataclass(item):
        raise ConfigError(f"{full}: takes no {{field: value}} items")
    names = sorted(f.name for f in dataclasses.fields(item))
    built = []
    for record in records:
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise ConfigError(f"{full}: unknown field {unknown[0]!r}; {item.__name__} has "
                              f"{names}")
        try:
            built.append(item(**record))
        except (TypeError, ValueError) as err:  # a missing field, or the item's own check
            raise ConfigError(f"{full}: {err}") from None
    return tuple(built)


def describe(config, prefix: str = "") -> Iterator[str]:
    """Lines ``field = value`` for every leaf field, for ``--help``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from describe(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name} = {value!r}"


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
