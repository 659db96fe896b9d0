"""Training records -> conversations: one converter per public data layout.

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


Files are read (and their format detected) by :mod:`prism_spec.train.records`; a record that
cannot become a conversation raises :class:`RecordError`, which the readers count.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from typing import Any

Message = dict[str, str]
Conversation = list[Message]

FORMATS = ("sharegpt", "turns", "alpaca", "prompts", "text")

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
