"""One tree-verify forward and one decode step of the default target, batched verification
against bit-identical verification (``--row-invariant``), interleaved in one process.

    python benchmarks/verify_latency.py [--dtype bfloat16] [--past 300] [--trees star4,chain4,paper60] \\
        [--repeats 40] [--threads 2] [--json out.json]

Two copies of the target (one per setting) prefill the same random ``--past``-token prefix; each
repeat then runs every tree's verify forward on both, the cache cut back to the prefix after
each call. Trees: ``star4`` (a root and three children, the shape of the CPU-tuned 4/0/3 tree),
``chain4`` (four nodes in a line) and ``paper60`` (60 nodes, five levels of 12). Reports the
median milliseconds. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from common import write_rows
from prism_spec.bench.machine import cpu_name
from prism_spec.targets import load_target

TREES = {  # parent of each node (-1: the root)
    "star4": [-1, 0, 0, 0],
    "chain4": [-1, 0, 1, 2],
    "paper60": [-1] + [0] * 11 + [1 + i % 11 for i in range(12)] + [12 + i for i in range(12)]
    + [24 + i for i in range(12)] + [36 + i for i in range(12)],
}


def tree_mask(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, n, n] ancestor-or-self mask, [1, n] depths) of a tree given by parents."""
    n = len(parents)
    mask, depth = torch.zeros(n, n, dtype=torch.bool), []
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
        depth.append(0 if p < 0 else depth[p] + 1)
    return mask[None], torch.tensor(depth)[None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--past", type=int, default=300)
    parser.add_argument("--trees", default="star4,chain4,paper60")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    settings = {"batched": False, "row-invariant": True}
    targets = {name: load_target(dtype=args.dtype, threads=args.threads, row_invariant=on) for name, on in settings.items()}
    attention = "compiled kernel" if targets["row-invariant"].attention_kernel is not None else "per-node SDPA"
    prefix = torch.randint(100, 20000, (1, args.past))
    shapes = [(name, *tree_mask(TREES[name])) for name in args.trees.split(",")]
    # A decode step as the runtime runs one (vanilla rounds): the root alone, with its tree mask,
    # so that row-invariant mode runs it through the same attention as verification.
    shapes.append(("decode step", *tree_mask([-1])))
    caches = {}
    with torch.inference_mode():
        for name, target in targets.items():
            caches[name] = target.new_cache()
            target.forward(prefix, torch.arange(args.past)[None], caches[name])
        rows = []
        for shape, mask, depth in shapes:
            n = depth.shape[-1]
            tokens = torch.randint(100, 20000, (1, n))
            times = {name: [] for name in targets}
            for _ in range(args.repeats):
                for name, target in targets.items():
                    start = time.perf_counter()
                    target.forward(tokens, args.past + depth, caches[name], tree_mask=mask)
                    times[name].append(time.perf_counter() - start)
                    caches[name].crop(-n)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            rows.append({"forward": shape, "tokens": n, "batched_ms": round(ms["batched"], 2),
                         "row_invariant_ms": round(ms["row-invariant"], 2),
                         "ratio": round(ms["row-invariant"] / ms["batched"], 3),
                         "row_invariant_attention": attention})
    print(f"\n# verify forward, batched vs --row-invariant: default target ({args.dtype}), {args.past}-token prefix, "
          f"median of {args.repeats}, {args.threads} threads, row-invariant attention: {attention}, {cpu_name()}, "
          f"{datetime.date.today()}\n")
    print("| forward | tokens | batched ms | row-invariant ms | ratio |\n|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['forward']} | {r['tokens']} | {r['batched_ms']:.1f} | {r['row_invariant_ms']:.1f} | {r['ratio']:.2f}x |")
    if args.json:
        write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
