"""One option vocabulary: a flag that several ``prism`` commands take parses to the same value
in each, and a bad value exits 2 with a one-line error naming the flag, everywhere."""

from __future__ import annotations

import pytest

from prism_spec.cli import build_parser

# The commands each shared flag appears in (a command that deliberately lacks one is left out).
SHARED = {
    "--dtype": ["generate", "chat", "serve", "demo", "bench", "train", "corpus build"],
    "--device": ["generate", "chat", "serve", "demo", "bench"],
    "--engine": ["generate", "chat", "serve", "demo", "bench", "corpus build"],
    "--threads": ["generate", "chat", "serve", "demo", "bench", "corpus build"],
    "--tree": ["generate", "chat", "serve", "demo", "bench"],
}
GOOD = {"--dtype": ("bf16", "bf16"), "--device": ("cpu", "cpu"), "--engine": ("llama.cpp", "llama.cpp"),
        "--threads": ("3", 3), "--tree": ("8/3/4", "8/3/4")}
BAD = {"--dtype": "float7", "--device": "tpu", "--engine": "onnx", "--threads": "0", "--tree": "8/3"}
REQUIRED = {"train": ["--data", "x.jsonl"], "corpus build": ["--out", "c"]}


def _argv(command: str, *extra: str) -> list[str]:
    return [*command.split(), *REQUIRED.get(command, []), *extra]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _meaning(flag: str, value):
    """bench keeps a tree as written (its records show the spec); generate holds it parsed."""
    from prism_spec.runtime.tree import TreeConfig

    return TreeConfig.parse(value) if flag == "--tree" and isinstance(value, str) and value != "auto" else value


@pytest.mark.parametrize("flag,command", [(f, c) for f, commands in SHARED.items() for c in commands])
def test_a_shared_flag_parses_the_same_everywhere(flag, command, capsys):
    parser = build_parser()
    text, value = GOOD[flag]
    parsed = getattr(parser.parse_args(_argv(command, flag, text)), _dest(flag))
    assert _meaning(flag, parsed) == _meaning(flag, value)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(_argv(command, flag, BAD[flag]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and BAD[flag] in error
