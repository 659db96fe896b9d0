"""What the ``prism`` command and its subcommand modules share: the error a command reports
as ``error: <message>``, subcommand parsers, the target option group and loading the target it
names, atomic JSON-lines output and status lines.

:mod:`prism_spec.cli` registers every subcommand; subcommands that live with the code they
drive (:mod:`prism_spec.train.corpus_cli`) build on this module rather than on the entry point
that imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from .options import device, dtype, threads


class CLIError(Exception):
    """A user error found while running a command; printed as ``error: <message>``."""


def add_subparser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """Every subcommand parser: no option abbreviations, so a mistyped option is an error and
    adding an option later cannot break a command line that used an abbreviation."""
    return subparsers.add_parser(name, allow_abbrev=False, **kwargs)


# ====================================================================== the target
def add_target_options(parser: argparse.ArgumentParser) -> None:
    from .targets import DEFAULT_TARGET
    from .targets.hf import ENGINES

    group = parser.add_argument_group("target")
    group.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"hub id or local folder of a transformers causal LM, or a .gguf file (default: {DEFAULT_TARGET}, "
        "the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--engine", choices=ENGINES, default="auto",
        help="what runs the target: torch (transformers) or llama.cpp (GGUF weights, CPU; needs the llamacpp "
        "extra); auto: llama.cpp for .gguf targets, torch otherwise (default: auto)",
    )
    group.add_argument("--dtype", type=dtype, default="float32", help="weight dtype (default: float32)")
    group.add_argument("--device", type=device, default="cpu",
                       help="cpu, cuda, cuda:N or auto (a GPU when there is one) (default: cpu)")
    group.add_argument(
        "--threads", type=threads, default=None, metavar="N",
        help="torch CPU threads (default: torch's choice, one per core); 1 is much faster when other "
        "processes keep the cores busy",
    )
    group.add_argument(
        "--no-packed-weights", dest="packed_weights", action="store_false",
        help="on a CPU, keep plain nn.Linear layers instead of oneDNN-prepacked weights (the default "
        "for float32/bfloat16: faster small products, about twice the linear layers' memory)",
    )
    group.add_argument(
        "--static-cache", action="store_true",
        help="preallocated KV cache written in place (fixed addresses; needed by --compile)",
    )
    group.add_argument(
        "--compile", action="store_true",
        help="torch.compile decode and verify forwards (CUDA graphs on GPUs); implies --static-cache",
    )
    group.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay the target's decode and verify forwards and a feature drafter's steps as captured "
        "CUDA graphs (no compile step; CUDA devices only); implies --static-cache",
    )


def load_target_from_args(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    from .targets import DEFAULT_TARGET, load_target
    from .targets.hf import resolve_engine

    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter stderr
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.target != DEFAULT_TARGET and _looks_like_path(args.target) and not Path(args.target).exists():
        raise FileNotFoundError(f"target folder {args.target!r} not found")
    engine = resolve_engine(args.target, getattr(args, "engine", "auto"))
    if engine == "llama.cpp":
        print_status(f"engine: llama.cpp ({'GGUF target' if args.target.lower().endswith('.gguf') else '--engine llama.cpp'}, "
                     f"the target's own quantised weights)")
    target = load_target(args.target, dtype=args.dtype, device=args.device, engine=engine, threads=args.threads,
                         pack_weights=None if getattr(args, "packed_weights", True) else False)
    if getattr(args, "compile", False):
        target.compile_decoder()
    if getattr(args, "cuda_graphs", False):
        target.use_cuda_graphs()
    return target


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


# ====================================================================== output
def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    """Write JSON lines to ``path`` through a temporary file in the same folder + os.replace."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise CLIError(f"output folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def print_status(message: str) -> None:
    """A progress or status line for the user: on stderr, so stdout keeps only the output."""
    print(message, file=sys.stderr, flush=True)
