"""Training-data files: raw records out of .json / .jsonl / .txt files (a truncated JSON array
is salvaged up to its last whole record), the format of a file, whole files and Hugging Face
datasets read into conversations (:mod:`prism_spec.train.conversations` converts each record),
and conversations written back as JSONL.

Record-level problems (bad JSON line, missing field, wrong type, empty text, …) are skipped
and counted in :class:`SkipStats`; they never raise. Hugging Face hub datasets load through
:func:`load_hf_dataset` (``datasets`` is imported only then).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .conversations import FORMATS, Conversation, RecordError, detect_format, has_assistant, record_to_conversation


@dataclass
class SkipStats:
    """What a reader did: records read, kept (``prompt_only`` of them without an answer),
    skipped by reason, and non-fatal repairs (``notes``). ``sources`` breaks a mix down per
    file. Always ``read == kept + total_skipped``."""

    read: int = 0
    kept: int = 0
    prompt_only: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    sources: dict[str, "SkipStats"] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def merge(self, other: "SkipStats", name: str | None = None) -> "SkipStats":
        self.read += other.read
        self.kept += other.kept
        self.prompt_only += other.prompt_only
        self.skipped.update(other.skipped)
        self.notes.update(other.notes)
        if name is not None:
            self.sources[name] = other
        else:
            self.sources.update(other.sources)
        return self

    def as_dict(self) -> dict:
        out = {
            "read": self.read,
            "kept": self.kept,
            "prompt_only": self.prompt_only,
            "skipped": dict(sorted(self.skipped.items())),
            "notes": dict(sorted(self.notes.items())),
        }
        if self.sources:
            out["sources"] = {k: v.as_dict() for k, v in self.sources.items()}
        return out

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"read {self.read}, kept {self.kept} ({self.prompt_only} prompt-only), "
            f"skipped {self.total_skipped} ({skipped})"
        )



# --------------------------------------------------------------------------- file readers
class _Bad:
    """A record the file layer could not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _iter_jsonl(text: str) -> Iterator[Any]:
    for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028 and friends
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            yield _Bad("invalid_json")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_json_array_salvage(text: str) -> Iterator[Any]:
    """Decode array elements one by one up to the first syntax error (a truncated file)."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0) + 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] == "]":
            if i >= len(text):
                yield _Bad("invalid_json")
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            yield _Bad("invalid_json")
            return
        yield obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            return
        else:
            yield _Bad("invalid_json")
            return


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Raw records of a .json (array, or an object holding one list), .jsonl or .txt file.

    Unparseable records come back as placeholders the readers count as ``invalid_json``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix.lower() == ".txt":
        for line in text.split("\n"):
            if line.strip():
                yield line.rstrip("\r")
        return
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
            if text.lstrip().startswith("["):
                yield from _iter_json_array_salvage(text)
                return
        if data is not None:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) == 1 and not detect_format(data):
                    data = lists[0]
                else:
                    data = [data]
            if isinstance(data, list):
                yield from data
            else:
                yield _Bad("not_an_object")
            return
    yield from _iter_jsonl(text)  # .jsonl, or a .json file that is really JSONL


def detect_file_format(path: str | os.PathLike, probe: int = 50) -> str | None:
    """The format of the first recognisable record among the first ``probe`` ones."""
    if Path(path).suffix.lower() == ".txt":
        return "text"
    for i, record in enumerate(iter_records(path)):
        if i >= probe:
            break
        fmt = detect_format(record) if not isinstance(record, _Bad) else None
        if fmt is not None and fmt != "text":
            return fmt
    return None


def read_records(
    records: Iterable[Any], fmt: str | None = None, strip_think: bool = False
) -> tuple[list[Conversation], SkipStats]:
    """Convert in-memory records (dicts, or strings for ``fmt="text"``); the format is
    detected from the first recognisable record when ``fmt`` is None."""
    stats = SkipStats()
    conversations: list[Conversation] = []
    for record in records:
        stats.read += 1
        if isinstance(record, _Bad):
            stats.skip(record.reason)
            continue
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                stats.skip("unknown_format")
                continue
        try:
            conv = record_to_conversation(record, fmt, strip_think, stats.notes)
        except RecordError as err:
            stats.skip(err.reason)
            continue
        stats.kept += 1
        stats.prompt_only += not has_assistant(conv)
        conversations.append(conv)
    return conversations, stats


def read_file(
    path: str | os.PathLike, fmt: str | None = None, strip_think: bool = False
) -> tuple[list[Conversation], SkipStats]:
    """Read one file. ``fmt`` overrides detection; an undetectable file raises ValueError."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    fmt = fmt or detect_file_format(path)
    if fmt is None:
        if not any(True for _ in iter_records(path)):
            return [], SkipStats()
        raise ValueError(f"cannot detect the format of {path}; pass fmt= one of {FORMATS}")
    return read_records(iter_records(path), fmt, strip_think)


def load_hf_dataset(
    name: str,
    split: str = "train",
    config: str | None = None,
    fmt: str | None = None,
    strip_think: bool = False,
    max_records: int | None = None,
    **load_kwargs,
) -> tuple[list[Conversation], SkipStats]:
    """A Hugging Face dataset (hub id, or a local folder/builder name) via
    ``datasets.load_dataset(name, config, split=split, **load_kwargs)``. Needs the optional
    ``datasets`` package and, for hub ids, hub access."""
    try:
        import datasets  # noqa: PLC0415 (optional and heavy)
    except ImportError as exc:
        raise ImportError("load_hf_dataset needs the `datasets` package: pip install datasets") from exc
    ds = datasets.load_dataset(name, config, split=split, **load_kwargs)

    def records():
        for i, record in enumerate(ds):
            if max_records is not None and i >= max_records:
                return
            yield record

    return read_records(records(), fmt, strip_think)



def write_conversations(path: str | os.PathLike, conversations: Iterable[Conversation]) -> int:
    """Write ``{"messages": [...]}`` JSONL (readable back as ``sharegpt``); returns the count."""
    n = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
