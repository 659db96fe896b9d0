"""Acceptance length of drafters on the six benchmarks, replayed (no decoding).

The target's continuation of every benchmark turn (greedy at T=0; at ``--temperature T`` a
sample drawn from ``--seed``) is computed once and kept in ``--store`` (rerun to resume or to
add drafters: stored continuations are reused); each drafter's acceptance is then replayed
from them (prism_spec.bench.replay, docs/bench.md). The same prompts and pooling as ``prism
bench``; AL only.

    python benchmarks/replay_al.py --method packaged=auto --method hass=results/smollm2-135m/drafters/hass \\
        [--questions 20] [--max-new-tokens 128] [--tree paper] [--temperature 1 --seed 0] \\
        [--store runs/replay-store.jsonl] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from common import write_rows
from prism_spec.bench.datasets import load_benchmarks
from prism_spec.bench.replay import ContinuationStore, replay_benchmarks
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import SamplingConfig, TreeConfig
from prism_spec.targets import load_target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--method", action="append", required=True, metavar="NAME=DRAFTER",
                        help="a drafter as --drafter takes it (a folder, auto, ...), named")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="paper")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy continuations; above 0: sampled ones, AL with the decode loop's distribution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled continuations (each prompt its own)")
    parser.add_argument("--store", default=None, help="JSONL file of continuations (created, appended to)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype=args.dtype)
    drafters = {}
    for spec in args.method:
        name, sep, source = spec.partition("=")
        if not sep:
            parser.error(f"--method wants NAME=DRAFTER, got {spec!r}")
        drafters[name] = resolve_drafter(source, target).drafter
    tree = TreeConfig.parse(args.tree)
    store = ContinuationStore(args.store, target, lookahead=max(16, tree.max_depth + 1),
                              sampling=SamplingConfig(temperature=args.temperature), seed=args.seed)
    benches = load_benchmarks(limit=args.questions, max_new_tokens=args.max_new_tokens)
    results = replay_benchmarks(target, drafters, benches, tree, store)
    rows = []
    for name, r in results.items():
        rows.append({"method": name, "mean_acceptance_length": round(r["mean"], 4), "rounds": r["rounds"],
                     **{b: round(v, 4) for b, v in r["per_benchmark"].items()}})
        per = "  ".join(f"{b} {v:.2f}" for b, v in r["per_benchmark"].items())
        print(f"{name:<12} mean AL {r['mean']:.3f}  ({per})")
    print(f"{store.computed} continuations computed, {len(store.items) - store.computed} reused")
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)


if __name__ == "__main__":
    main()
