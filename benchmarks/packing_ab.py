"""Prepacked against plain linear layers, vanilla and speculative decoding, interleaved in one
process so that drifting machine load hits every configuration alike.

    python benchmarks/packing_ab.py [--dtype bfloat16] [--tree 4/0/3] [--prompts 4] \
        [--max-new-tokens 64] [--repeats 3] [--json out.json]

Two copies of the default target (one packed, one plain) and of the packaged drafter; every
repeat runs each MT-bench prompt through the four configurations in turn. Reports tokens/s
(new tokens / total generate time, prefill included) summed over all runs, the speedup of
speculative over vanilla decoding within each setting, and whether the outputs agree.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from prism_spec.bench.datasets import conversation_prompt, load_benchmark
from prism_spec.bench.runner import _cpu_name
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import GenerationConfig, TreeConfig, generate
from prism_spec.targets import load_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--tree", default="4/0/3")
    parser.add_argument("--prompts", type=int, default=4, help="first-turn MT-bench questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setups = {}
    for name, pack in (("plain", False), ("packed", True)):
        target = load_target("smollm2-135m", dtype=args.dtype, pack_weights=pack)
        assert target.packed_weights == pack, "this torch build cannot pack linear layers"
        setups[name] = (target, resolve_drafter(args.drafter, target).drafter)
    first = setups["plain"][0]
    prompts = [conversation_prompt(first, q.turns[:1], []) for q in load_benchmark("mt_bench").questions[: args.prompts]]
    tree = TreeConfig.parse(args.tree)
    configs = [(s, m) for s in setups for m in ("vanilla", "speculative")]
    seconds = dict.fromkeys(configs, 0.0)
    tokens = dict.fromkeys(configs, 0)
    rounds, accepted = dict.fromkeys(setups, 0), dict.fromkeys(setups, 0)
    outputs: dict = {}
    for s, m in configs:  # warm-up
        target, drafter = setups[s]
        generate(target, prompts[0], drafter if m == "speculative" else None,
                 GenerationConfig(max_new_tokens=8, tree=tree))
    for _ in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for s, m in configs:
                target, drafter = setups[s]
                cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, tree=tree)
                start = time.perf_counter()
                result = generate(target, prompt, drafter if m == "speculative" else None, cfg)
                seconds[s, m] += time.perf_counter() - start
                tokens[s, m] += len(result.token_ids)
                outputs[s, m, i] = result.token_ids
                if m == "speculative":
                    rounds[s] += result.rounds
                    accepted[s] += sum(result.accepted)
    rate = {c: tokens[c] / seconds[c] for c in configs}
    print(f"\n# packed vs plain linear layers: default target ({args.dtype}), drafter {args.drafter}, tree "
          f"{args.tree}, {args.prompts} MT-bench prompts x {args.max_new_tokens} tokens x {args.repeats} repeats, "
          f"{args.threads} threads, {_cpu_name()}, {datetime.date.today()}\n")
    print("| weights | vanilla tok/s | speculative tok/s | AL | speculative / vanilla | spec = vanilla outputs |")
    print("|---|--:|--:|--:|--:|--:|")
    rows = []
    for s in setups:
        same = sum(outputs[s, "vanilla", i] == outputs[s, "speculative", i] for i in range(len(prompts)))
        al = (accepted[s] + rounds[s]) / max(rounds[s], 1)
        row = {"weights": s, "vanilla_tokens_per_s": rate[s, "vanilla"], "speculative_tokens_per_s":
               rate[s, "speculative"], "acceptance_length": al, "speedup": rate[s, "speculative"] / rate[s, "vanilla"],
               "identical_outputs": f"{same}/{len(prompts)}"}
        rows.append(row)
        print(f"| {s} | {row['vanilla_tokens_per_s']:.1f} | {row['speculative_tokens_per_s']:.1f} | {al:.2f} | "
              f"{row['speedup']:.2f}x | {row['identical_outputs']} |")
    print(f"\npacked / plain: vanilla {rate['packed', 'vanilla'] / rate['plain', 'vanilla']:.2f}x, speculative "
          f"{rate['packed', 'speculative'] / rate['plain', 'speculative']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "cpu": _cpu_name(), "torch": torch.__version__,
                                               "date": str(datetime.date.today()), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
