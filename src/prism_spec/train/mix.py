"""The training mix: data sources (files, folders, ``hf:`` datasets) read in order into one
list of conversations, optionally deduplicated; seeded, nested subsets of it and the
held-out split.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from .conversations import Conversation, conversation_key, has_assistant
from .records import SkipStats, load_hf_dataset, read_file

T = TypeVar("T")

DATA_SUFFIXES = (".json", ".jsonl", ".txt")


# --------------------------------------------------------------------------- mixes
def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf:name[:config][@split]`` -> (name, config, split)."""
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    return name, (config or None), split


def expand_sources(paths: Iterable[Any]) -> list[tuple[str, str | None, bool]]:
    """(path or hf spec, format override, came from a folder) for every source."""
    out: list[tuple[str, str | None, bool]] = []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for item in paths:
        fmt = None
        if isinstance(item, tuple):
            item, fmt = item
        item = os.fspath(item)
        if item.startswith("hf:"):
            out.append((item, fmt, False))
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in DATA_SUFFIXES and not f.name.startswith(".")
            )
            out += [(str(f), fmt, True) for f in files]
        elif p.exists():
            out.append((str(p), fmt, False))
        else:
            raise FileNotFoundError(f"training data source not found: {item}")
    return out


def load_training_mix(
    paths: Any,
    fmt: str | None = None,
    strip_think: bool = False,
    dedupe: bool = False,
) -> tuple[list[Conversation], SkipStats]:
    """Read every source and concatenate, in order.

    ``paths``: files, folders (their .json/.jsonl/.txt files, recursively, sorted), ``hf:`` specs
    (``hf:name[:config][@split]``), or ``(source, fmt)`` tuples to force one source's format;
    ``fmt`` forces all the others. ``dedupe`` drops exact repeats (counted as ``duplicate``).
    The returned stats hold per-source stats in ``stats.sources``."""
    total = SkipStats()
    conversations: list[Conversation] = []
    seen: set[str] = set()
    for source, own_fmt, from_folder in expand_sources(paths):
        use_fmt = own_fmt or fmt
        if source.startswith("hf:"):
            name, config, split = _parse_hf(source)
            convs, stats = load_hf_dataset(name, split=split, config=config, fmt=use_fmt, strip_think=strip_think)
        else:
            try:
                convs, stats = read_file(source, use_fmt, strip_think)
            except ValueError as err:
                if not from_folder or use_fmt is not None:
                    raise
                warnings.warn(f"skipping {source}: {err}", stacklevel=2)
                stats = SkipStats()
                stats.notes["undetectable_file"] += 1
                total.merge(stats, source)
                continue
        if dedupe:
            unique = []
            for conv in convs:
                key = conversation_key(conv)
                if key in seen:
                    stats.kept -= 1
                    stats.prompt_only -= not has_assistant(conv)
                    stats.skip("duplicate")
                    continue
                seen.add(key)
                unique.append(conv)
            convs = unique
        conversations += convs
        total.merge(stats, source)
    return conversations, total



# --------------------------------------------------------------------------- sampling
def _ranking(items: Sequence[Any], salt: str) -> list[int]:
    """Indices ordered by a content hash: deterministic, platform-independent, and the same
    for the same items whatever their order (ties broken by position)."""

    def key(i: int):
        item = items[i]
        if isinstance(item, list) and all(isinstance(m, dict) and "role" in m for m in item):
            blob = conversation_key(item)
        elif isinstance(getattr(item, "key", None), str):  # a corpus example: its prompt's key
            blob = item.key
        else:
            blob = json.dumps(item, sort_keys=True, ensure_ascii=False, default=repr)
        return hashlib.sha256(f"{salt}\x00{blob}".encode("utf-8")).hexdigest(), i

    return sorted(range(len(items)), key=key)


def _count(n: int, amount: float | int, what: str) -> int:
    if isinstance(amount, bool):
        raise TypeError(f"{what} must be a fraction or a count")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"{what} fraction must be within [0, 1], got {amount}")
        return int(round(amount * n))
    if amount < 0:
        raise ValueError(f"{what} count must be >= 0, got {amount}")
    return min(int(amount), n)


def sample(items: Sequence[T], fraction: float | int, seed: int = 0) -> list[T]:
    """A deterministic subset (original order kept) of ``round(fraction * len)`` items, or
    ``fraction`` items when it is an int. Subsets are nested for one seed: the 25% sample lies
    inside the 50% one, which lies inside 100%, so data-scaling runs differ only in data size."""
    k = _count(len(items), fraction, "sample")
    chosen = sorted(_ranking(items, f"sample:{seed}")[:k])
    return [items[i] for i in chosen]


def split_heldout(items: Sequence[T], heldout: float | int = 0.02, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held-out): a deterministic held-out set of ``heldout`` (fraction or count)
    items, original order kept. Split first, then :func:`sample` the train part, so every
    data-scaling run is evaluated on the same held-out items."""
    k = _count(len(items), heldout, "heldout")
    held = set(_ranking(items, f"heldout:{seed}")[:k])
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [items[i] for i in sorted(held)]
