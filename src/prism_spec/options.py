"""Argparse value types shared by every ``prism`` command, so that a flag parses and fails
the same way everywhere (a bad value exits 2 with a one-line error naming the flag)."""

from __future__ import annotations

import argparse
from typing import Callable

#: ``--drafter-weights`` (see :func:`prism_spec.drafters.resolve.resolve_drafter`).
DRAFTER_WEIGHTS = ("auto", "float", "int8")


def _number(kind: type, text: str, what: str):
    """``text`` as a ``kind`` (int or float); an argparse error saying ``expected <what>`` when
    it is not one."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive(kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` (int or float) greater than 0."""
    what = "a positive integer" if kind is int else "a positive number"

    def parse(text: str):
        value = _number(kind, text, what)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


#: An argparse type: a positive integer (counts, lengths, sizes, ports).
positive_int = positive(int)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (``--top-k``, where 0 disables)."""
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def temperature(text: str) -> float:
    """An argparse type: a sampling temperature, a finite number >= 0 (0 = greedy)."""
    value = _number(float, text, "a number >= 0")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"temperature must be a finite number >= 0, got {text}")
    return value


def top_p(text: str) -> float:
    """An argparse type: a nucleus-sampling mass in (0, 1]."""
    value = _number(float, text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"top-p must be in (0, 1], got {text}")
    return value


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one),
    refused at parse time when the machine lacks the device."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda, cuda:N or auto)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here (use cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def non_empty(text: str) -> str:
    """An argparse type: any non-empty string."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def seed(text: str) -> int:
    """An argparse type: a sampling seed, an integer that torch's generator takes (64 bits,
    signed or unsigned)."""
    from .runtime.decode import SEED_MAX, SEED_MIN

    value = _number(int, text, "an integer")
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [{SEED_MIN}, {SEED_MAX}] (64 bits), got {value}")
    return value


#: Training seeds go to numpy (accelerate's set_seed), which takes 0..2**32-1.
TRAINING_SEED_MAX = 2**32 - 1


def training_seed(text: str) -> int:
    """An argparse type: a training seed, an integer numpy's seeding takes ([0, 2**32-1])."""
    value = _number(int, text, "an integer")
    if not 0 <= value <= TRAINING_SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {TRAINING_SEED_MAX}] (32 bits), got {value}")
    return value


class TreeTooLargeError(ValueError):
    """A ``--tree`` that cannot fit in the target's context beside a prompt (found once the
    target is loaded). The message names the flag, so every command prints it as is."""


def check_tree_fits(tree, max_context: int, flag: str = "--tree") -> None:
    """Refuse a draft tree of ``max_context`` nodes or more: it leaves no room for a prompt
    (and decodes at a crawl long before that). ``flag`` is the option the tree came from."""
    if tree.total_tokens >= max_context:
        raise TreeTooLargeError(
            f"{flag} {tree.total_tokens}/{tree.depth}/{tree.top_k}: a tree of {tree.total_tokens} nodes does not "
            f"fit in the target's context of {max_context} positions beside a prompt; use a smaller tree")


def dtype(text: str) -> str:
    """An argparse type: a dtype name torch and the targets take (float32, bfloat16, float16,
    float64 and their short forms fp32, bf16, fp16), kept as written."""
    from .targets.hf import parse_dtype

    try:
        parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def tree_shape(text: str) -> str:
    """An argparse type: a draft-tree shape (paper, serving, cpu, chain:N, TOTAL/DEPTH/TOP_K)
    or auto, checked at parse time and kept as written."""
    from .runtime.tree import TreeConfig

    if text != "auto":
        try:
            TreeConfig.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def tree_config(text: str):
    """An argparse type: a draft-tree shape parsed to a TreeConfig, or ``auto`` kept as written
    (resolved once the drafter is loaded, by runtime.autotune). The decoding commands take
    it; bench keeps the spec as written (:func:`tree_shape`)."""
    from .runtime.tree import TreeConfig

    if text == "auto":
        return text
    try:
        return TreeConfig.parse(text)
    except ValueError as exc:
        message = str(exc)
        if "invalid literal" in message:
            message = f"bad tree spec {text!r}: chain:N needs an integer N"
        if not message.startswith(("bad tree spec", "invalid tree shape", "a chain")):
            message = f"bad tree spec {text!r}: {message}"
        if "paper" not in message:
            message += " (use paper, serving, cpu, chain:N or TOTAL/DEPTH/TOPK)"
        raise argparse.ArgumentTypeError(message) from None


#: ``--threads``: torch (and llama.cpp) CPU threads, a positive integer everywhere.
threads = positive(int)
