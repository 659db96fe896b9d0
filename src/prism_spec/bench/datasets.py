"""Benchmark questions: the six packaged EAGLE/HASS/PRISM benchmarks, or any JSONL of the same schema.

Every file is JSONL, one question per line: ``question_id``, ``category``, ``turns`` (the user
turns; MT-bench has two) and an optional ``reference``. Provenance and licences of the packaged
files are in ``prism_spec/data/bench/README.md``.

Multi-turn questions are asked the way MT-bench intends: the second user turn follows the
model's *own* first-turn answer, and the whole conversation is rendered with the target's chat
template (:func:`conversation_prompt`). ``max_new_tokens`` applies to each turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

#: The paper's six benchmarks, in the paper's column order.
BENCHMARKS: tuple[str, ...] = ("mt_bench", "humaneval", "gsm8k", "alpaca", "sum", "qa")

#: Column titles for tables and figures.
DISPLAY_NAMES = {
    "mt_bench": "MT-bench",
    "humaneval": "HumanEval",
    "gsm8k": "GSM8K",
    "alpaca": "Alpaca",
    "sum": "CNN/DM",
    "qa": "NQ",
}

#: The paper's generation budget per turn: 512 new tokens, 1024 for MT-bench.
DEFAULT_MAX_NEW_TOKENS = 512
PAPER_MAX_NEW_TOKENS = {"mt_bench": 1024}


class BenchmarkError(ValueError):
    """An unknown benchmark name, a missing file or a malformed question."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()


@dataclass
class Benchmark:
    name: str  # a packaged name, or the file's stem
    path: Path
    questions: list[Question]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # per turn
    packaged: bool = True

    @property
    def display_name(self) -> str:
        return DISPLAY_NAMES.get(self.name, self.name)

    @property
    def num_turns(self) -> int:
        return sum(len(q.turns) for q in self.questions)


def packaged_path(name: str) -> Path:
    """Path of a packaged benchmark file (``mt_bench``, ``humaneval``, ...)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)} or give a .jsonl path")
    return Path(str(resources.files("prism_spec") / "data" / "bench" / f"{name}.jsonl"))


def parse_questions(lines: Iterable[str], source: str = "<questions>") -> list[Question]:
    questions, seen = [], set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{source}:{lineno}: not valid JSON ({e})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise BenchmarkError(f"{source}:{lineno}: `turns` must be a non-empty list of non-empty strings")
        if "question_id" not in row:
            raise BenchmarkError(f"{source}:{lineno}: missing `question_id`")
        qid = row["question_id"]
        if qid in seen:
            raise BenchmarkError(f"{source}:{lineno}: duplicate question_id {qid!r}")
        seen.add(qid)
        ref = row.get("reference") or ()
        questions.append(
            Question(qid, str(row.get("category") or ""), tuple(turns), tuple(ref) if isinstance(ref, list) else (str(ref),))
        )
    if not questions:
        raise BenchmarkError(f"{source}: no questions")
    return questions


def parse_max_new_tokens(specs: Sequence[str] | None) -> dict[str, int]:
    """``--max-new-tokens`` values: ``N`` (every benchmark) or ``NAME=N`` (one benchmark).

    Returns overrides keyed by benchmark name, ``"*"`` for the global one. Unset: the paper's
    budget (512, MT-bench 1024).
    """
    out: dict[str, int] = {}
    for spec in specs or ():
        name, _, value = str(spec).rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise BenchmarkError(f"bad --max-new-tokens {spec!r}: use N or BENCH=N") from None
        if n <= 0:
            raise BenchmarkError(f"--max-new-tokens must be > 0, got {spec!r}")
        out[name or "*"] = n
    return out


def max_new_tokens_for(name: str, overrides: dict[str, int] | None = None) -> int:
    overrides = overrides or {}
    if name in overrides:
        return overrides[name]
    if "*" in overrides:
        return overrides["*"]
    return PAPER_MAX_NEW_TOKENS.get(name, DEFAULT_MAX_NEW_TOKENS)


def load_benchmark(
    name_or_path: str | Path, limit: int | None = None, max_new_tokens: dict[str, int] | int | None = None
) -> Benchmark:
    """A packaged benchmark by name, or a JSONL file of the same schema by path.

    ``limit`` keeps the first N questions (file order). ``max_new_tokens`` is an int (every
    benchmark) or the dict :func:`parse_max_new_tokens` returns.
    """
    spec = str(name_or_path)
    if spec in BENCHMARKS:
        path, name, packaged = packaged_path(spec), spec, True
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BenchmarkError(
                f"benchmark {spec!r} is neither a packaged name ({', '.join(BENCHMARKS)}) nor an existing file"
            )
        name, packaged = path.stem, False
    questions = parse_questions(path.read_text(encoding="utf-8").splitlines(), str(path))
    if limit is not None:
        if limit <= 0:
            raise BenchmarkError(f"--limit must be > 0, got {limit}")
        questions = questions[:limit]
    overrides = {"*": max_new_tokens} if isinstance(max_new_tokens, int) else max_new_tokens
    return Benchmark(name, path, questions, max_new_tokens_for(name, overrides), packaged)


def load_benchmarks(
    specs: Sequence[str] | None = None, limit: int | None = None, max_new_tokens: dict[str, int] | int | None = None
) -> list[Benchmark]:
    """Several benchmarks (default: the six packaged ones); names must be unique."""
    benches = [load_benchmark(s, limit, max_new_tokens) for s in (specs or BENCHMARKS)]
    names = [b.name for b in benches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchmarkError(f"benchmark names must be unique, got {', '.join(dupes)} more than once")
    return benches


def conversation_prompt(target, user_turns: Sequence[str], answers: Sequence[str]) -> list[int]:
    """Token ids for the next answer: user turn 1, own answer 1, ..., user turn n.

    Rendered with ``target.render_chat`` (the tokenizer's chat template, or plain
    concatenation for base models without one).
    """
    if len(answers) != len(user_turns) - 1:
        raise ValueError("need exactly one answer per earlier user turn")
    messages: list[dict] = []
    for i, turn in enumerate(user_turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return target.render_chat(messages, add_generation_prompt=True)
