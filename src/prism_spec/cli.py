"""The ``prism`` command line: the top-level parser and ``main``.

    prism demo       vanilla vs speculative decoding on one prompt, side by side
    prism generate   generate for prompts from arguments, a file or stdin; one JSON line per prompt
    prism chat       interactive multi-turn chat with streaming speculative decoding
    prism serve      OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) with batching
    prism corpus     build the target's own answer corpus (token ids, sharded, resumable)
    prism train      train a drafter (EAGLE-2 / HASS / PRISM / stacked / standard)
    prism bench      measure methods on the benchmarks (tables, JSON, figures)

Each subcommand lives in its own module, as an ``add_<command>_parser(subparsers)`` whose
parser sets ``func=run_<command>``: demo in :mod:`prism_spec.demo_cli`, generate and chat in
:mod:`prism_spec.generate_cli`, serve in :mod:`prism_spec.serve_cli`, and corpus, train and
bench with the code they drive (:mod:`prism_spec.train.corpus_cli`,
:mod:`prism_spec.train.cli`, :mod:`prism_spec.bench.cli`). ``SUBCOMMANDS`` lists them all, in
``prism --help`` order, for ``build_parser``. What the subcommand modules share (``CLIError``,
``add_subparser``, the target, drafter and sampling options, loading the target, atomic
JSON-lines output, status lines) is in :mod:`prism_spec.cli_common`; argparse value types are
in :mod:`prism_spec.options`.

Argument mistakes are argparse errors (usage + message, exit 2); user errors found while
running (empty prompt, missing file, mismatched drafter, bad config) print
``error: <message>`` to stderr and exit 2, without a traceback (set PRISM_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .cli_common import CLIError
from .demo_cli import add_demo_parser
from .generate_cli import add_chat_parser, add_generate_parser
from .serve_cli import add_serve_parser

EXIT_USER_ERROR = 2


# ====================================================================== subcommands
# demo, generate, chat and serve are imported at the top: their modules import nothing heavy
# until a command runs. `prism corpus`, `prism train` and `prism bench` live with the code they
# drive (train/corpus_cli.py, train/cli.py, bench/cli.py; train and bench also run on their own
# as `python -m prism_spec.train` / `python -m prism_spec.bench`); the wrappers below import
# each only when the parser is built. To add a subcommand: an add_<name>_parser(subparsers)
# (its parser created with cli_common.add_subparser, setting func=run_<name>, reusing the
# cli_common add_*_options helpers) plus run_<name>(args) -> exit code, in a module of their
# own, and add_<name>_parser appended to SUBCOMMANDS below. Every subcommand in SUBCOMMANDS is
# registered and listed by `prism --help`.

def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from .train.cli import add_train_parser as add

    return add(subparsers)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from .bench.cli import add_bench_parser as add

    return add(subparsers)


def add_corpus_parser(subparsers) -> argparse.ArgumentParser:
    from .train.corpus_cli import add_corpus_parser as add

    return add(subparsers)


#: Registration order is the order in `prism --help`.
SUBCOMMANDS: list[Callable] = [
    add_demo_parser,
    add_generate_parser,
    add_chat_parser,
    add_serve_parser,
    add_corpus_parser,
    add_train_parser,
    add_bench_parser,
]


# ====================================================================== entry point
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="prism", description="Lossless speculative decoding with PRISM and its baselines.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"prism-spec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_subparsers={})
    for add in SUBCOMMANDS:
        sub = add(subparsers)
        parser.get_default("_subparsers")[sub.prog.split()[-1]] = sub
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .drafters.base import DrafterMismatchError
    from .runtime import PromptError

    # PromptError and DrafterMismatchError are ValueErrors; listed for the reader.
    return (CLIError, PromptError, DrafterMismatchError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse errors: usage + message on stderr, exit 2. Unknown options are reported by
    # the subcommand's parser, so the usage shown is the subcommand's.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser.get_default("_subparsers").get(args.command, parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "cuda_graphs", False) and not str(getattr(args, "device", "cuda")).startswith(("cuda", "auto")):
        sub = parser.get_default("_subparsers").get(args.command, parser)
        sub.error(f"--cuda-graphs needs a CUDA device (--device cuda or cuda:N), got --device {args.device}")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if os.environ.get("PRISM_DEBUG"):  # full traceback for bug reports
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
