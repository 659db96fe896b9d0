"""Training-data readers: many public file layouts -> one list of conversations.

A *conversation* is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
A conversation with assistant turns trains the drafter on those (original) responses; one with
no assistant turn is *prompt-only* and is meant for response regeneration by the target
(:mod:`prism_spec.train.regenerate`), which fills a reply after every user turn not followed
by one.

Supported formats (auto-detected per file from its first recognisable record, or forced with
``fmt=``):

``sharegpt``
    ``{"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant"|"chatgpt"|"bard"|…,
    "value": str}]}``, also ``{"messages": [{"role": …, "content": …}]}`` (OpenAI / UltraChat),
    JSON array or JSONL. Consecutive turns of one speaker are merged, leading assistant turns
    are dropped, a conversation is cut before its first empty turn.
``turns``
    EAGLE / FastChat question files: ``{"turns": [str, …], "reference": [str, …]}``; references
    (or ``answers`` / ``choices[0].turns``) become the assistant replies to the matching turns.
``alpaca``
    ``{"instruction", "input", "output" | "response"}`` (also ``system`` and ``history``) and the
    Self-Instruct layout ``{"instruction", "instances": [{"input", "output"}]}``.
``prompts``
    one prompt per record from ``prompt`` / ``question`` / ``problem`` / ``text`` /
    ``instruction`` / ``query`` (SVAMP-style ``Body`` + ``Question`` is joined), with an optional
    answer from ``answer`` / ``answers`` / ``completion`` / ``solution`` / ``code`` / ``output`` /
    ``response`` / ``target`` (a list of strings is joined with ", ", a number is printed).
    MBPP-style ``test_list`` asserts are appended to the prompt so the answer's function name is
    determined.
``text``
    a ``.txt`` file, one prompt per non-blank line.

Hugging Face hub datasets load through :func:`load_hf_dataset` (``datasets`` is imported only
then). Record-level problems (bad JSON line, missing field, wrong type, empty text, …) are
skipped and counted in :class:`SkipStats`; they never raise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

Message = dict[str, str]
Conversation = list[Message]
T = TypeVar("T")

FORMATS = ("sharegpt", "turns", "alpaca", "prompts", "text")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")

USER_ROLES = frozenset({"human", "user", "prompter", "question"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model", "bot", "claude", "gpt-4", "answer"})
SYSTEM_ROLES = frozenset({"system"})

PROMPT_KEYS = ("prompt", "question", "problem", "text", "instruction", "query")
ANSWER_KEYS = ("answer", "answers", "completion", "solution", "code", "output", "response", "target")
_END_MARKERS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end|>")


class RecordError(Exception):
    """A record that cannot become a conversation; ``reason`` is the SkipStats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


# --------------------------------------------------------------------------- text helpers
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THOUGHT_BLOCK = re.compile(r"<\|begin_of_thought\|>.*?<\|end_of_thought\|>", re.DOTALL)
_SOLUTION_TAGS = re.compile(r"<\|(?:begin|end)_of_solution\|>")


def strip_think_blocks(text: str) -> str:
    """Remove ``<think>…</think>`` reasoning (also OpenThoughts' begin/end_of_thought markers).

    A dangling ``</think>`` (the opening tag was in the prompt) drops everything before it; an
    unclosed ``<think>`` drops everything after it. The result is whitespace-stripped."""
    text = _THINK_BLOCK.sub("", text)
    text = _THOUGHT_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    text = _SOLUTION_TAGS.sub("", text)
    return text.strip()


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _strip_end_markers(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def _format_number(value: float | int) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _text(value: Any, what: str) -> str:
    """A string field (OpenAI-style content part lists are joined)."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            value = "".join(parts)
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{what} is {type(value).__name__}, not str")
    return _clean(value)


def _get(record: dict, *names: str) -> Any:
    """The value of the first of ``names`` present (case-insensitive), else None."""
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    lower = {k.lower(): k for k in record if isinstance(k, str)}
    for name in names:
        key = lower.get(name)
        if key is not None and record[key] is not None:
            return record[key]
    return None


def _answer_text(value: Any, what: str) -> str:
    if isinstance(value, bool):
        raise RecordError("wrong_type", f"{what} is bool")
    if isinstance(value, (int, float)):
        return _format_number(value)
    if isinstance(value, list):
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise RecordError("wrong_type", f"{what} is a list of non-strings")
        parts = [_clean(v) if isinstance(v, str) else _format_number(v) for v in value]
        return ", ".join(p for p in parts if p)
    return _strip_end_markers(_text(value, what))


# --------------------------------------------------------------------------- conversations
def has_assistant(conversation: Conversation) -> bool:
    return any(m["role"] == "assistant" for m in conversation)


def needs_response(conversation: Conversation) -> bool:
    """True when some user turn is not followed by an assistant reply."""
    return any(
        m["role"] == "user" and (i + 1 == len(conversation) or conversation[i + 1]["role"] != "assistant")
        for i, m in enumerate(conversation)
    )


def conversation_key(conversation: Conversation) -> str:
    """A stable content hash (sha256 hex) of a conversation."""
    blob = json.dumps([[m["role"], m["content"]] for m in conversation], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _finalize(
    turns: list[tuple[str, str]], strip_think: bool, notes: Counter, merge_same_role: bool = True
) -> Conversation:
    """Roles checked and normalised, think blocks stripped, structure repaired."""
    messages: Conversation = []
    for raw_role, text in turns:
        role = raw_role.strip().lower() if isinstance(raw_role, str) else raw_role
        if not isinstance(role, str):
            raise RecordError("wrong_type", "role is not a string")
        if role in USER_ROLES:
            role = "user"
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        elif role in SYSTEM_ROLES:
            role = "system"
        else:
            raise RecordError("unknown_role", repr(raw_role))
        if role == "assistant" and strip_think:
            stripped = strip_think_blocks(text)
            if stripped != text:
                notes["think_stripped"] += 1
            text = stripped
        has_user = any(m["role"] == "user" for m in messages)
        if not text:
            if role == "system" or (role == "assistant" and not has_user):
                notes[f"dropped_empty_{role}"] += 1
                continue
            if not has_user:
                raise RecordError("empty_text", f"empty {role} turn")
            notes["cut_at_empty_turn"] += 1  # keep the conversation up to the empty turn
            break
        if role == "system" and any(m["role"] != "system" for m in messages):
            raise RecordError("system_not_first")
        if role == "assistant" and not has_user:
            notes["dropped_leading_assistant"] += 1
            continue
        if messages and messages[-1]["role"] == role and (merge_same_role or role != "user"):
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + text}
            notes["merged_same_role"] += 1
            continue
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("no_user_turn")
    return messages


def _conv_sharegpt(record: dict, strip_think: bool, notes: Counter) -> Conversation:
    turns_raw = _get(record, "conversations", "conversation", "messages")
    if turns_raw is None:
        raise RecordError("missing_field", "conversations")
    if not isinstance(turns_raw, list):
        raise RecordError("wrong_type", "conversations is not a list")
    turns: list[tuple[str, str]] = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        turns.append(("system", _clean(system)))
    for turn in turns_raw:
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", "a turn is not an object")
        role = _get(turn, "from", "role")
        value = turn["value"] if "value" in turn else turn.get("content")
        if role is None or value is None:
            raise RecordError("missing_field", "turn from/value")
        turns.append((role, _text(value, "turn value")))
    return _finalize(turns, strip_think, notes)


def _conv_turns(record: dict, strip_think: bool, notes: Counter) -> Conversation:
    raw = _get(record, "turns")
    if raw is None:
        raise RecordError("missing_field", "turns")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RecordError("wrong_type", "turns is not a non-empty list")
    users = [_text(t.get("content", t.get("value")) if isinstance(t, dict) else t, "turn") for t in raw]
    answers = _get(record, "reference", "references", "answers")
    if answers is None:
        choices = record.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            answers = choices[0].get("turns")
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and not isinstance(answers, list):
        raise RecordError("wrong_type", "reference is not a list")
    answers = [_answer_text(a, "reference") for a in (answers or [])]
    turns: list[tuple[str, str]] = []
    for i, user in enumerate(users):
        turns.append(("user", user))
        if i < len(answers) and answers[i]:
            turns.append(("assistant", answers[i]))
    # Unanswered user turns stay separate: regeneration fills a reply after each.
    return _finalize(turns, strip_think, notes, merge_same_role=False)


def _conv_alpaca(record: dict, strip_think: bool, notes: Counter) -> Conversation:
    instruction = _get(record, "instruction")
    if instruction is None:
        raise RecordError("missing_field", "instruction")
    instruction = _text(instruction, "instruction")
    sep = "\n\n"
    inp = _get(record, "input")
    answer = _get(record, "output", "response")
    instances = _get(record, "instances")
    if instances is not None and inp is None and answer is None:  # Self-Instruct
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise RecordError("wrong_type", "instances is not a list of objects")
        inp, answer, sep = instances[0].get("input"), instances[0].get("output"), "\n"
    inp = _text(inp, "input") if inp is not None else ""
    prompt = instruction + (sep + inp if inp else "") if instruction else inp
    turns: list[tuple[str, str]] = []
    system = _get(record, "system")
    if isinstance(system, str) and system.strip():
        turns.append(("system", _clean(system)))
    history = _get(record, "history")
    if isinstance(history, list):
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError("wrong_type", "history entry is not a [prompt, answer] pair")
            turns += [("user", _text(pair[0], "history")), ("assistant", _answer_text(pair[1], "history"))]
    turns.append(("user", prompt))
    if answer is not None:
        answer = _answer_text(answer, "output")
        if answer:
            turns.append(("assistant", answer))
    return _finalize(turns, strip_think, notes)


def _conv_prompts(record: dict, strip_think: bool, notes: Counter) -> Conversation:
    body, question = _get(record, "body"), _get(record, "question")
    if isinstance(body, str) and isinstance(question, str):  # SVAMP
        prompt = (_clean(body) + " " + _clean(question)).strip()
    else:
        value = _get(record, *PROMPT_KEYS)
        if value is None:
            raise RecordError("missing_field", "prompt")
        prompt = _text(value, "prompt")
        if isinstance(_get(record, "input"), str) and _get(record, "instruction") is value:
            prompt = (prompt + "\n\n" + _clean(record["input"])).strip()
    tests = _get(record, "test_list")
    if prompt and isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        prompt += "\nYour code should pass these tests:\n" + "\n".join(_clean(t) for t in tests)
    turns: list[tuple[str, str]] = [("user", prompt)]
    answer = _get(record, *ANSWER_KEYS)
    if answer is not None:
        answer = _answer_text(answer, "answer")
        if answer:
            turns.append(("assistant", answer))
    return _finalize(turns, strip_think, notes)


_CONVERTERS = {
    "sharegpt": _conv_sharegpt,
    "turns": _conv_turns,
    "alpaca": _conv_alpaca,
    "prompts": _conv_prompts,
}


def detect_format(record: Any) -> str | None:
    """The format a single record looks like, or None."""
    if isinstance(record, str):
        return "text"
    if not isinstance(record, dict):
        return None
    if isinstance(_get(record, "conversations", "conversation", "messages"), list):
        return "sharegpt"
    if isinstance(_get(record, "turns"), list):
        return "turns"
    if _get(record, "instruction") is not None and (
        _get(record, "output", "response", "instances") is not None or "input" in record
    ):
        return "alpaca"
    if _get(record, *PROMPT_KEYS, "body") is not None:
        return "prompts"
    return None


def record_to_conversation(
    record: Any, fmt: str, strip_think: bool = False, notes: Counter | None = None
) -> Conversation:
    """One record -> one conversation; raises :class:`RecordError` (never anything else)."""
    notes = Counter() if notes is None else notes
    if fmt == "text":
        if not isinstance(record, str):
            raise RecordError("wrong_type", "text record is not a string")
        return _finalize([("user", _clean(record))], strip_think, notes)
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if not isinstance(record, dict):
        raise RecordError("not_an_object")
    try:
        return _CONVERTERS[fmt](record, strip_think, notes)
    except RecordError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise RecordError("wrong_type", str(exc)) from exc


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
