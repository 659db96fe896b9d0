"""``prism bench``: the one entry point for measuring.

    prism bench --method vanilla --method prism=results/x/prism [options]   run + report
    prism bench report --out DIR                                            report only
    prism bench tree-sweep --method prism=DIR --depths 3,5,7 ...            paper Fig. 8
    prism bench scaling --drafter 25=DIR --drafter 50=DIR ...               paper Fig. 4
    prism bench batch-sweep --batch-sizes 1,2,4 ...                         paper Fig. 7

Wire it into a parent CLI with ``add_bench_parser(subparsers)``; the parser it adds sets
``func``, so ``args.func(args)`` runs the chosen command and returns an exit code.
``python -m prism_spec.bench`` runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path

from ..options import DRAFTER_WEIGHTS, device, dtype, seed, threads, tree_shape
from ..targets.hf import ENGINES
from ..targets.default import DEFAULT_TARGET
from .datasets import BENCHMARKS, BenchmarkError, parse_max_new_tokens

DESCRIPTION = (
    "Measure speculative decoding: benchmarks x methods x temperatures, methods interleaved per prompt; "
    "writes runs.jsonl (resumable), runs.csv, results.json, table.md, summary.json and figures."
)

def method_help() -> str:
    """The --method help: every method kind, the registered drafter kinds included."""
    from .methods import method_kinds

    kinds = " | ".join(f"{name}{'=ARG' if info.needs_arg else ''}" for name, info in method_kinds().items())
    return f"KIND[@LABEL][=ARG], repeatable: {kinds} (see docs/bench.md)"


def _add_common(p: argparse.ArgumentParser, sub: bool) -> None:
    """Options every bench command takes. In subcommand parsers they default to SUPPRESS so
    that options given before the subcommand name are not overwritten by defaults."""

    def d(value):
        return argparse.SUPPRESS if sub else value

    g = p.add_argument_group("bench options")
    g.add_argument("--target", default=d(DEFAULT_TARGET), help=f"hub id or folder of the target (default {DEFAULT_TARGET})")
    g.add_argument("--engine", choices=ENGINES, default=d("auto"),
                   help="what runs the target: torch, llama.cpp (GGUF, CPU) or auto: llama.cpp for .gguf targets (default auto)")
    g.add_argument("--dtype", type=dtype, default=d("float32"), help="target dtype: float32, bfloat16, float16, float64 (default float32)")
    g.add_argument("--device", type=device, default=d("auto"),
                   help="cpu, cuda, cuda:N or auto (a GPU when there is one) (default auto)")
    g.add_argument("--bench", action="append", default=d(None), metavar="NAME|PATH",
                   help=f"repeatable; packaged {', '.join(BENCHMARKS)} or a JSONL file of the same schema (default: all six)")
    g.add_argument("--limit", type=int, default=d(None), help="first N questions of each benchmark")
    g.add_argument("--method", action="append", default=d(None), metavar="SPEC", help=method_help())
    g.add_argument("--temperature", action="append", type=float, default=d(None), metavar="T",
                   help="repeatable (default 0 = greedy); T > 0 samples with a fixed seed per (prompt, method)")
    g.add_argument("--tree", type=tree_shape, default=d("paper"), help="tree shape: paper, serving, cpu, chain:N, TOTAL/DEPTH/TOP_K, or auto (tuned per drafter on "
                   "this machine, cached; see docs/performance.md) (default paper)")
    g.add_argument("--max-new-tokens", action="append", default=d(None), metavar="N|BENCH=N",
                   help="per turn; N for every benchmark or BENCH=N for one, repeatable (default: paper, 512 and mt_bench 1024)")
    g.add_argument("--out", default=d(None), help="output folder (default runs/bench-DATE)")
    g.add_argument("--resume", action="store_true", default=d(False), help="continue the bench in --out, skipping finished runs")
    g.add_argument("--seed", type=seed, default=d(0), help="base seed for sampled runs (default 0)")
    g.add_argument("--threads", type=threads, default=d(None), help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-packed-weights", dest="packed_weights", action="store_false", default=d(True),
                   help="on a CPU, plain nn.Linear layers instead of oneDNN-prepacked weights (see prism generate --help)")
    g.add_argument("--row-invariant", action="store_true", default=d(False),
                   help="bit-identical verification, vanilla runs in the same mode (see prism generate --help)")
    g.add_argument("--drafter-weights", choices=DRAFTER_WEIGHTS, default=d("auto"),
                   help="feature drafters on int8 weights (int8), as loaded (float) or auto: int8 on the llama.cpp "
                        "engine (see prism generate --help) (default auto)")
    g.add_argument("--static-cache", action="store_true", default=d(False),
                   help="preallocated target KV cache written in place (see prism generate --help)")
    g.add_argument("--compile", action="store_true", default=d(False),
                   help="torch.compile the target's decode/verify forwards (CUDA graphs on GPUs); implies --static-cache")
    g.add_argument("--cuda-graphs", action="store_true", default=d(False),
                   help="replay the target's decode/verify forwards and feature drafters' steps as captured CUDA graphs "
                        "(CUDA only); implies --static-cache")
    g.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bar")
    g.add_argument("--no-warmup", action="store_true", default=d(False), help="skip the untimed warm-up generation per method")


def configure_bench_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(p, sub=False)
    p.set_defaults(func=run_command, bench_command=None)
    subs = p.add_subparsers(dest="bench_command", metavar="{report,tree-sweep,scaling,batch-sweep}")

    r = subs.add_parser("report", help="rewrite the tables, JSON and figures of a bench folder",
                        description="Rewrite runs.csv, results.json, table.md, summary.json and the figures from runs.jsonl.")
    r.add_argument("--out", required=True, help="the bench folder (holds runs.jsonl)")
    r.set_defaults(func=report_command)

    t = subs.add_parser("tree-sweep", help="AL and tokens/s against tree depth, top_k and total_tokens (paper Fig. 8)",
                        description="One drafter (--method) at several tree shapes, each axis varied alone around --tree; "
                                    "vanilla runs alongside for speedups.")
    _add_common(t, sub=True)
    t.add_argument("--depths", default="3,5,7", help="comma list (default 3,5,7)")
    t.add_argument("--top-ks", default="4,8,10", help="comma list (default 4,8,10)")
    t.add_argument("--totals", default="16,32,60", help="comma list of total_tokens (default 16,32,60)")
    t.add_argument("--no-vanilla", action="store_true", help="do not run vanilla alongside")
    t.set_defaults(func=tree_sweep_command)

    s = subs.add_parser("scaling", help="AL against the drafter's training-data fraction (paper Fig. 4)",
                        description="Drafters trained on growing data, one --drafter [KIND:]FRACTION=DIR each.")
    _add_common(s, sub=True)
    s.add_argument("--drafter", action="append", required=True, metavar="[KIND:]FRACTION=DIR",
                   help="repeatable, e.g. prism:25=runs/p25 eagle2:25=runs/e25")
    s.add_argument("--kind", default="prism", help="method kind when --drafter names none (default prism)")
    s.set_defaults(func=scaling_command)

    b = subs.add_parser("batch-sweep", help="tokens/s against batch size (paper Fig. 7), greedy, batched decoding")
    _add_common(b, sub=True)
    b.add_argument("--batch-sizes", default="1,2,4,8", help="comma list (default 1,2,4,8)")
    b.set_defaults(func=batch_sweep_command)
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a parent CLI's subparsers; returns the new parser."""
    p = subparsers.add_parser("bench", help="measure methods on the benchmarks (tables, JSON, figures)",
                              description=DESCRIPTION)
    return configure_bench_parser(p)


def build_parser(prog: str = "prism bench") -> argparse.ArgumentParser:
    return configure_bench_parser(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


# ----------------------------------------------------------------------------- commands
def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BenchmarkError(f"{what} must be a comma list of integers, got {text!r}") from None


def _config(args, methods, command: str, **extra):
    from .runner import BenchConfig

    from ..runtime.tree import TreeConfig

    try:
        if args.tree != "auto":
            TreeConfig.parse(args.tree)
    except ValueError as e:
        raise BenchmarkError(str(e)) from None
    if args.cuda_graphs:  # before anything is loaded or written
        from .runner import resolve_device

        if not resolve_device(args.device).startswith("cuda"):
            raise BenchmarkError(f"--cuda-graphs needs a CUDA device (--device is {args.device}, "
                                 f"which resolves to {resolve_device(args.device)})")
    out = args.out or f"runs/bench-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not args.out:
        raise BenchmarkError("--resume needs the --out folder of the bench to continue")
    return BenchConfig(
        target=args.target,
        engine=args.engine,
        dtype=args.dtype,
        device=args.device,
        benches=args.bench or BENCHMARKS,
        limit=args.limit,
        methods=methods,
        temperatures=args.temperature or [0.0],
        tree=args.tree,
        max_new_tokens=parse_max_new_tokens(args.max_new_tokens),
        out=Path(out),
        resume=args.resume,
        seed=args.seed,
        progress=not args.no_progress,
        warmup=not args.no_warmup,
        command=command,
        threads=args.threads,
        static_cache=bool(args.static_cache or args.compile or args.cuda_graphs),
        compile=bool(args.compile),
        cuda_graphs=bool(args.cuda_graphs),
        packed_weights=bool(getattr(args, "packed_weights", True)),
        row_invariant=bool(getattr(args, "row_invariant", False)),
        drafter_weights=getattr(args, "drafter_weights", "auto"),
        extra_settings=extra,
    )


def _command_line(args=None) -> str:
    """The command as typed (``main`` records it; under a parent CLI, sys.argv)."""
    recorded = getattr(args, "command_line", None)
    return recorded or shlex.join(["prism"] + sys.argv[1:])


def _run_and_report(cfg) -> int:
    from .report import write_report
    from .runner import run_bench

    start = time.perf_counter()
    run_bench(cfg)
    elapsed = time.perf_counter() - start
    written = write_report(cfg.out, command=cfg.command)
    print(Path(written["table.md"]).read_text())
    for path in written.values():
        print(f"wrote {path}")
    print(f"bench took {elapsed:.1f} s")
    return 0


def _guard(fn):
    """Expected failures (bad specs, files, checkpoints) print one line and exit 2."""

    def wrapped(args) -> int:
        from ..drafters.base import DrafterMismatchError
        from ..drafters.checkpoint import CheckpointError
        from .methods import MethodError
        from .runs import BenchError

        try:
            return fn(args)
        except (BenchError, BenchmarkError, MethodError, CheckpointError, DrafterMismatchError,
                FileNotFoundError) as e:
            print(f"prism bench: error: {e}", file=sys.stderr)
            return 2

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_guard
def run_command(args) -> int:
    """``prism bench [options]``: run the bench, then write the report."""
    if not args.method:
        raise BenchmarkError("give at least one --method, e.g. --method vanilla --method standard=layers:4")
    return _run_and_report(_config(args, args.method, _command_line(args)))


@_guard
def report_command(args) -> int:
    from .report import write_report

    written = write_report(args.out, command=_command_line(args))
    print(Path(written["table.md"]).read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


@_guard
def tree_sweep_command(args) -> int:
    from ..runtime.tree import TreeConfig
    from .methods import MethodSpec
    from .runner import tree_sweep_specs

    try:
        base = TreeConfig.parse(args.tree)
    except ValueError as e:
        raise BenchmarkError(str(e)) from None

    drafters = [MethodSpec.parse(m) for m in args.method or []]
    drafters = [m for m in drafters if not m.is_vanilla]
    if len(drafters) != 1:
        raise BenchmarkError("tree-sweep takes exactly one drafter --method (vanilla is added unless --no-vanilla)")
    specs = tree_sweep_specs(
        drafters[0], base, _ints(args.depths, "--depths"), _ints(args.top_ks, "--top-ks"),
        _ints(args.totals, "--totals"),
    )
    methods = ([] if args.no_vanilla else [MethodSpec("vanilla")]) + specs
    return _run_and_report(_config(args, methods, _command_line(args), sweep="tree"))


@_guard
def scaling_command(args) -> int:
    from .runner import parse_scaling_drafters

    return _run_and_report(_config(args, parse_scaling_drafters(args.drafter, args.kind), _command_line(args), sweep="scaling"))


@_guard
def batch_sweep_command(args) -> int:
    from .runner import run_batch_sweep

    run_batch_sweep(_config(args, args.method or ["vanilla"], _command_line(args)), _ints(args.batch_sizes, "--batch-sizes"))
    return 0


def main(argv=None) -> int:
    parser = build_parser("python -m prism_spec.bench")
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "prism_spec.bench"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)
