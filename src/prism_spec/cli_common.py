"""What the ``prism`` subcommand modules share: the error a command reports as
``error: <message>``, subcommand parsers, the option groups (target, drafter and tree,
sampling) and what they turn into (the loaded target, the generation config, the resolved
tree), atomic JSON-lines output and status lines.

:mod:`prism_spec.cli` registers every subcommand; the subcommand modules
(:mod:`prism_spec.demo_cli`, :mod:`prism_spec.generate_cli`, :mod:`prism_spec.serve_cli`,
:mod:`prism_spec.train.corpus_cli`) build on this module rather than on the entry point that
imports them. Argparse value types are in :mod:`prism_spec.options`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .options import (
    DRAFTER_WEIGHTS,
    TreeTooLargeError,
    check_tree_fits,
    device,
    dtype,
    non_negative_int,
    positive_int,
    seed,
    temperature,
    threads,
    top_p,
    tree_config,
)


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
        "--row-invariant", action="store_true",
        help="bit-identical verification: every verified token computed as its decode step computes it, so "
        "speculative output equals vanilla output also in bfloat16, where this machine's kernels allow it "
        "(an error where they do not; docs/families.md). On a CPU, decode steps and verification run their "
        "attention through a C++ kernel compiled on first use (about 40 s, cached). On the llama.cpp "
        "engine: a q8_0 KV cache, with "
        "which speculative output equals llama.cpp's plain greedy output at any context length "
        "(docs/llamacpp.md)",
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
        kv = ", q8_0 KV cache (--row-invariant)" if getattr(args, "row_invariant", False) else ""
        print_status(f"engine: llama.cpp ({'GGUF target' if args.target.lower().endswith('.gguf') else '--engine llama.cpp'}, "
                     f"the target's own quantised weights{kv})")
    target = load_target(args.target, dtype=args.dtype, device=args.device, engine=engine, threads=args.threads,
                         pack_weights=None if getattr(args, "packed_weights", True) else False,
                         row_invariant=getattr(args, "row_invariant", False))
    if getattr(args, "compile", False):
        target.compile_decoder()
    if getattr(args, "cuda_graphs", False):
        target.use_cuda_graphs()
    return target


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


# ====================================================================== drafter, sampling and tree
def add_drafter_options(parser: argparse.ArgumentParser, default: str = "auto", tree: str = "cpu") -> None:
    group = parser.add_argument_group("drafter")
    group.add_argument(
        "--drafter",
        default=default,
        metavar="SPEC",
        help="auto (best available for the target), layers:N (the target's first N layers, untrained), "
        f"none (vanilla decoding) or a drafter checkpoint path (default: {default})",
    )
    group.add_argument(
        "--tree",
        type=tree_config,
        default=tree,
        metavar="SPEC",
        help="draft tree: paper, serving, cpu, chain:N, TOTAL/DEPTH/TOPK, or auto (measured on this "
        f"machine for this drafter, cached) (default: {tree})",
    )
    group.add_argument(
        "--drafter-weights", choices=DRAFTER_WEIGHTS, default="auto",
        help="float: as loaded; int8: the drafter's own layers and head on int8 weights (CPU; cheaper draft "
        "steps, drafts may differ slightly, output stays lossless); auto: int8 on the llama.cpp engine, "
        "float otherwise (default: auto)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
        help=f"tokens to generate at most (default: {max_new_tokens})",
    )
    group.add_argument(
        "--temperature", type=temperature, default=0.0, metavar="T", help="0 = greedy (default: 0)"
    )
    group.add_argument("--top-p", type=top_p, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    group.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="0 disables (default: 0)")
    group.add_argument("--seed", type=seed, default=None, metavar="S", help="random seed for sampling")


def generation_config(args: argparse.Namespace, stop_strings: Sequence[str] = ()):
    from .runtime import GenerationConfig, SamplingConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        stop_strings=tuple(stop_strings),
        seed=args.seed,
    )


def load_decoding_setup(args: argparse.Namespace, drafter_spec: str):
    """What every decoding command starts with: the target from the flags, the drafter from
    ``drafter_spec`` and the DecodeOptions the flags ask for."""
    from .drafters.resolve import resolve_drafter

    target = load_target_from_args(args)
    resolved = resolve_drafter(drafter_spec, target, getattr(args, "drafter_weights", "auto"))
    return target, resolved, decode_options(args, target, resolved)


def decode_options(args: argparse.Namespace, target, resolved):
    """The DecodeOptions the flags ask for: the tree (see resolve_tree_from_args) and the
    cache mode."""
    from .runtime import DecodeOptions

    return DecodeOptions(resolve_tree_from_args(args, target, resolved), wants_static_cache(args))


def wants_static_cache(args: argparse.Namespace) -> bool:
    """--static-cache, or a runtime that needs one (--compile, --cuda-graphs)."""
    return any(getattr(args, flag, False) for flag in ("static_cache", "compile", "cuda_graphs"))


def resolve_tree_from_args(args: argparse.Namespace, target, resolved):
    """The tree shape: the parsed --tree, or for ``auto`` the autotuned one (cached on disk). A
    given tree must fit in the target's context beside a prompt: a larger one is refused here,
    the first moment the context is known, rather than decoding at a crawl."""
    if args.tree != "auto":
        try:
            check_tree_fits(args.tree, target.max_context)
        except TreeTooLargeError as exc:
            raise CLIError(str(exc)) from None
        return args.tree
    from .runtime.autotune import resolve_tree

    return resolve_tree("auto", target, resolved.drafter, resolved.label, progress=print_status,
                        static_cache=wants_static_cache(args))


def tree_label(tree) -> str:
    """The shape as ``--tree`` takes it (TOTAL/DEPTH/TOPK), spelled out."""
    levels = f"{tree.max_depth} drafted level{'s' * (tree.max_depth > 1)}"
    return f"{tree.total_tokens}/{tree.depth}/{tree.top_k} ({tree.total_tokens} nodes with the root, {levels}, top-k {tree.top_k})"



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
