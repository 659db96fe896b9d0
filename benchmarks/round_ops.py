"""The small per-round operations of the decode loop, timed against the alternatives they
replaced: the argmax over the target's vocabulary (torch against ``argmax_rows``, NumPy's) and
the profiler labels (``record_function`` against ``devices.profiled`` with no profiler on).
On a fast engine (llama.cpp: ~8 ms a decode step of the default target) each of these is a
visible share of a vanilla round.

    python benchmarks/round_ops.py [--vocab 49152] [--threads 2] [--repeats 200] [--json out.json]

Median microseconds per call, the variants interleaved; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from prism_spec.bench.machine import cpu_name
from prism_spec.devices import profiled
from prism_spec.runtime.verify import argmax_rows


def interleaved_us(variants: dict, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each variant, calls interleaved (one warm-up each)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


def labels(enter) -> None:
    for label in ("draft_tree", "verify_forward", "accept"):  # a round's three labels
        with enter(label):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=49152, help="row width (the default target's vocabulary)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 4, 60):  # vanilla's one row, a 4-node tree, the paper tree
            logits = torch.randn(n, args.vocab).to(dtype)
            assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
            times = interleaved_us({"torch": lambda: logits.argmax(dim=-1), "argmax_rows": lambda: argmax_rows(logits)},
                                   args.repeats)
            rows.append({"op": f"argmax [{n}, {args.vocab}] {str(dtype).removeprefix('torch.')}", **times})
    times = interleaved_us({"torch": lambda: labels(record_function), "argmax_rows": lambda: labels(profiled)},
                           args.repeats)
    rows.append({"op": "3 labels: record_function / profiled (no profiler)", **times})

    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; median us per call")
    print(f"{'op':52s} {'before':>9s} {'after':>9s} {'ratio':>7s}")
    for row in rows:
        print(f"{row['op']:52s} {row['torch']:9.1f} {row['argmax_rows']:9.1f} {row['torch'] / row['argmax_rows']:6.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/round_ops.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
            "machine": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "columns": {"torch": "before (torch argmax / record_function)", "argmax_rows": "after (argmax_rows / profiled)"},
            "rows": rows,
        }, indent=1))


if __name__ == "__main__":
    main()
