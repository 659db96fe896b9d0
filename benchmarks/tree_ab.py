"""Tree shapes side by side: vanilla and speculative decoding with each shape, interleaved in
one process so that drifting machine load hits every shape alike.

    python benchmarks/tree_ab.py --trees 4/0/3,6/1/3,10/1/6 [--drafter auto] [--dtype bfloat16] \\
        [--per-bench 3] [--max-new-tokens 64] [--repeats 2] [--json out.json]

Prompts: the first turns of the first ``--per-bench`` questions of each of the six
benchmarks. Every repeat runs each prompt through vanilla decoding and every shape in turn.
Reports tokens/s (new tokens / total generate time, prefill included), the speedup over
vanilla decoding, the acceptance length and the wall time per round. ``auto`` in ``--trees``
is the autotuned shape (cached). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from common import write_rows
from prism_spec.bench.datasets import BENCHMARKS, conversation_prompt, load_benchmark
from prism_spec.bench.machine import cpu_name
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, generate
from prism_spec.runtime.autotune import resolve_tree
from prism_spec.targets import load_target


def options(tree) -> DecodeOptions:
    """Vanilla decoding (tree None) ignores the tree."""
    return DecodeOptions(tree) if tree else DecodeOptions()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", required=True, help="comma-separated shapes (TOTAL/DEPTH/TOPK, presets, auto)")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--per-bench", type=int, default=3, help="questions per benchmark (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", dtype=args.dtype)
    resolved = resolve_drafter(args.drafter, target)
    shapes = {spec: resolve_tree(spec, target, resolved.drafter, resolved.label) for spec in args.trees.split(",")}
    prompts = [conversation_prompt(target, q.turns[:1], [])
               for bench in BENCHMARKS for q in load_benchmark(bench, limit=args.per_bench).questions]
    runs = {"vanilla": None, **shapes}
    seconds, tokens, rounds, accepted = ({name: 0 for name in runs} for _ in range(4))
    for name, tree in runs.items():  # warm-up
        generate(target, prompts[0], resolved.drafter if tree else None, GenerationConfig(max_new_tokens=8),
                 options(tree))
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, tree in runs.items():
                start = time.perf_counter()
                result = generate(target, prompt, resolved.drafter if tree else None,
                                  GenerationConfig(max_new_tokens=args.max_new_tokens), options(tree))
                seconds[name] += time.perf_counter() - start
                tokens[name] += len(result.token_ids)
                rounds[name] += result.rounds
                accepted[name] += sum(result.accepted)
    base = tokens["vanilla"] / seconds["vanilla"]
    print(f"\n# tree shapes: default target ({args.dtype}), drafter {resolved.label}, {len(prompts)} prompts "
          f"({args.per_bench} per benchmark) x {args.max_new_tokens} tokens x {args.repeats} repeats, "
          f"{args.threads} threads, {cpu_name()}, {datetime.date.today()}\n")
    print("| tree | shape (total/depth/top-k) | tok/s | speedup | AL | ms per round |\n|---|---|--:|--:|--:|--:|")
    rows = []
    for name, tree in runs.items():
        rate = tokens[name] / seconds[name]
        shape = f"{tree.total_tokens}/{tree.depth}/{tree.top_k}" if tree else "-"
        row = {"tree": name, "shape": shape, "tokens_per_s": rate, "speedup": rate / base,
               "acceptance_length": (accepted[name] + rounds[name]) / max(rounds[name], 1),
               "ms_per_round": 1e3 * seconds[name] / max(rounds[name], 1)}
        rows.append(row)
        print(f"| {name} | {shape} | {rate:.1f} | {row['speedup']:.3f}x | {row['acceptance_length']:.2f} | "
              f"{row['ms_per_round']:.2f} |")
    write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
