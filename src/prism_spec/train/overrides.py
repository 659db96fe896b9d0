"""Layering partial config dicts: deep merges and dotted ``key=value`` overrides.

Both work on plain (partial) dicts, checked against a dataclass *schema* (for training, the
:class:`~prism_spec.train.config.TrainConfig` tree) so that a mistyped key fails at once with the
valid ones. Mappings merge key by key and lists are replaced, except a table list of the schema
(:func:`prism_spec.train.schema.table_list`: the stages), whose items are also addressed one by
one, by index or by name: ``stages.1.lr=1e-5``, ``stages.tuning.lr=1e-5``, or
``{"stages": {"tuning": {"lr": 1e-5}}}`` in a merged file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from typing import Any, Mapping

from .errors import ConfigError
from .schema import TableList, table_lists, type_name, unknown_key_message


def merge(base: dict, update: Mapping, schema=None, path: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``.

    Mappings merge key by key; lists are replaced -- except a table list of dataclass ``schema``
    (``stages``), which may also be given as a mapping from item index (or name) to a partial
    item: ``{"1": {"lr": 1e-5}}``.
    """
    out = copy.deepcopy(base)
    tables = table_lists(schema) if schema is not None else {}
    hints = typing.get_type_hints(schema) if schema is not None else {}
    for key, value in update.items():
        key = str(key)
        where = f"{path}.{key}" if path else key
        if key in tables and isinstance(value, Mapping):
            items = list(out.get(key) or [{}])
            item_schema = typing.get_args(hints[key])[0]
            for k, partial in value.items():
                index = _table_index(items, str(k), where, tables[key])
                if not isinstance(partial, Mapping):
                    raise ConfigError(f"{where}.{k} must be a table of {tables[key].noun} fields")
                items[index] = merge(items[index], partial, item_schema, f"{where}.{index}")
            out[key] = items
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            sub = hints.get(key)
            out[key] = merge(out[key], value, sub if dataclasses.is_dataclass(sub) else None, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _table_index(items: list, key: str, path: str, table: TableList) -> int:
    """The index of the item of table list ``path`` that ``key`` (an index or a name) names."""
    plural = path.rpartition(".")[2]
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"{path}.{key}: there are {len(items)} {plural} (0..{len(items) - 1})")
        return index % len(items)
    for i, s in enumerate(items):
        if isinstance(s, Mapping) and s.get("name") == key:
            return i
    names = [s.get("name") for s in items if isinstance(s, Mapping)]
    raise ConfigError(f"{path}.{key}: no {table.noun} named {key!r}; {plural} are {names} (or use an index)")


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", value); the value is JSON when it parses, else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. stages.0.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        low = raw.lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        elif "," in raw and not raw.startswith(("[", "{")):
            value = [_scalar(v.strip()) for v in raw.split(",") if v.strip()]
        else:
            value = raw
    return key, value


def _scalar(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_override(data: dict, key: str, value: Any, schema) -> dict:
    """Set dotted ``key`` in the (partial) dict ``data`` of dataclass ``schema``; the items of a
    table list are named by index or by name.

    Keys are checked against the schema so a typo fails here with the valid keys.
    """
    parts = key.split(".")
    out = copy.deepcopy(data)
    node: Any = out
    cls: Any = schema
    table: TableList | None = None  # when ``node`` is a table list: its declaration
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):  # a table list (stages)
            index = _table_index(node, part, ".".join(parts[:depth]), table)
            if last:
                raise ConfigError(f"{where}: set a field of the {table.noun} (e.g. {where}.{table.example})")
            node = node[index]
            continue
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(unknown_key_message(where, cls))
        if last:
            node[part] = value
            break
        hint = typing.get_type_hints(cls)[part]
        tables = table_lists(cls)
        if part in tables:
            if not isinstance(node.get(part), list):
                node[part] = [dataclasses.asdict(s) for s in getattr(cls(), part)]
            node = node[part]
            table, cls = tables[part], typing.get_args(hint)[0]
            continue
        if not (dataclasses.is_dataclass(hint)):
            raise ConfigError(f"{where} is a {type_name(hint)}, it has no field {parts[depth + 1]!r}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where} must be a table")
        cls = hint
    return out
