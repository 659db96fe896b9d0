"""Typed dataclasses from plain data (what JSON, TOML, YAML and ``--set`` give) and back.

:func:`from_dict` builds a dataclass from a (partial) mapping, checking every value against its
field's annotation (``int``, ``float``, ``bool``, ``str``, ``Literal``, unions / optionals, lists,
fixed-length tuples, nested dataclasses) and converting where that is lossless (``"3"`` ->
``3``, ``2.0`` -> ``2``, one item -> a one-item list). Any mismatch or unknown key raises
:class:`~prism_spec.train.errors.ConfigError` naming the dotted key (``stages.0.lr``) and what
was expected. :func:`to_plain` turns ``dataclasses.asdict`` output into JSON-ready data.

A ``list[<dataclass>]`` field declared with ``field(metadata=table_list(...))`` is a *table
list*: a non-empty list whose items are named ``<field>.<i>`` and which config layers may
address item by item (:mod:`prism_spec.train.overrides`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

from .errors import ConfigError

#: The field-metadata key of a table list (see :func:`table_list`).
TABLE_LIST = "table_list"


@dataclass(frozen=True)
class TableList:
    """What a table list field declares: ``noun`` names one item in messages ("stage"), and
    ``example`` is a field assignment that messages suggest for an item ("lr=1e-4")."""

    noun: str
    example: str


def table_list(noun: str, example: str) -> dict:
    """Field metadata that makes a ``list[<dataclass>]`` field a table list: items addressed by
    index or by their ``name`` in overrides and merges, never empty."""
    return {TABLE_LIST: TableList(noun, example)}


def table_lists(cls) -> dict[str, TableList]:
    """The table list fields of dataclass ``cls``: field name -> its declaration."""
    return {f.name: f.metadata[TABLE_LIST] for f in dataclasses.fields(cls) if TABLE_LIST in f.metadata}


def unknown_key_message(where: str, cls) -> str:
    """The message for a key that dataclass ``cls`` has no field for, listing its fields."""
    valid = [f.name for f in dataclasses.fields(cls)]
    return f"unknown config key {where!r}; valid keys here: {', '.join(valid)}"


def type_name(tp) -> str:
    """Annotation ``tp`` as messages spell it ("int", "list of float", "'a' | 'b'")."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = type_name(args[0]) if args else "any"
        return f"list of {inner}" + (f" (length {len(args)})" if origin is tuple else "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp``; returns the value in its field type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            if origin is list and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]  # a single item where a list is expected (e.g. --set data.paths=a.jsonl)
            else:
                raise bad
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls, data: Mapping, where: str = ""):
    """Build dataclass ``cls`` from a (partial) mapping with full type checking."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table/mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    tables = table_lists(cls)
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(unknown_key_message(path, cls))
        if key in tables:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path} must be a non-empty list of {tables[key].noun} tables")
            item = typing.get_args(hints[key])[0]
            kwargs[key] = [_coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_plain(obj):
    """``dataclasses.asdict`` output as JSON-ready data (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
