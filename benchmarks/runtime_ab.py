"""Two runtime settings A/B, vanilla and speculative decoding, interleaved in one process so
that drifting machine load hits every configuration alike.

    python benchmarks/runtime_ab.py [--compare packing|attention|exact|exact-attention|drafter-int8] [--bench mt_bench] \\
        [--dtype bfloat16] [--tree 4/0/3] [--prompts 4] [--max-new-tokens 64] [--repeats 3] [--json out.json]

``--compare packing``: prepacked against plain linear layers (docs/performance.md, "Prepacked
CPU weights"). ``--compare attention``: transformers' ``sdpa`` against ``prism_sdpa``, the
same kernel with grouped query heads folded instead of the KV cache copied
(``targets/attention.py``). ``--compare exact``: today's verification against bit-identical
verification (``--row-invariant``, ``Target.make_row_invariant``; vanilla decoding runs in the
same mode, since it is the reference its outputs must equal). ``--compare exact-attention``:
both row-invariant, the attention as one SDPA call per verified node against the compiled
kernel (``targets/attention_kernel.py``). ``--compare drafter-int8``: the
drafter on its float weights against int8 weights (``--drafter-weights int8``); vanilla decoding
is the same in both. Two copies of the default target (one per setting) and of the
packaged drafter; every repeat runs each prompt (first turns of ``--bench``) through the four
configurations in turn. Reports tokens/s (new tokens / total generate time, prefill
included) summed over all runs, the speedup of speculative over vanilla decoding within each
setting, and whether the outputs agree. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from common import write_rows
from prism_spec.bench.datasets import conversation_prompt, load_benchmark
from prism_spec.bench.machine import cpu_name
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets import load_target
from prism_spec.targets.attention_kernel import unavailable_reason


def load_packing(setting: str, dtype: str):
    target = load_target("smollm2-135m", dtype=dtype, pack_weights=setting == "packed")
    assert target.packed_weights == (setting == "packed"), "this torch build cannot pack linear layers"
    return target


def load_attention(setting: str, dtype: str):
    target = load_target("smollm2-135m", dtype=dtype)
    target.model.set_attn_implementation(setting)  # before the drafter, whose layers copy it
    return target


def load_exact(setting: str, dtype: str):
    return load_target("smollm2-135m", dtype=dtype, row_invariant=setting == "row-invariant")


def load_kernel_attention(setting: str, dtype: str):
    target = load_target("smollm2-135m", dtype=dtype, row_invariant=True)
    if setting == "per-node-sdpa":
        target.attention_kernel = None
    assert target.attention_kernel is not None or setting == "per-node-sdpa", unavailable_reason()
    return target


def load_default(setting: str, dtype: str):
    return load_target("smollm2-135m", dtype=dtype)


COMPARISONS = {  # --compare: (the two settings, baseline first; loader; what the table's first column is)
    "packing": (("plain", "packed"), load_packing, "weights"),
    "attention": (("sdpa", "prism_sdpa"), load_attention, "attention"),
    "exact": (("batched", "row-invariant"), load_exact, "verification"),
    "exact-attention": (("per-node-sdpa", "kernel"), load_kernel_attention, "row-invariant attention"),
    "drafter-int8": (("float", "int8"), load_default, "drafter weights"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="packing")
    parser.add_argument("--bench", default="mt_bench", help="benchmark whose first turns are the prompts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--tree", default="4/0/3")
    parser.add_argument("--prompts", type=int, default=4, help="questions of --bench (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings, load, column = COMPARISONS[args.compare]
    setups = {}
    for name in settings:
        target = load(name, args.dtype)
        weights = name if args.compare == "drafter-int8" else "float"
        setups[name] = (target, resolve_drafter(args.drafter, target, weights).drafter)
    first = setups[settings[0]][0]
    questions = load_benchmark(args.bench).questions[: args.prompts]
    prompts = [conversation_prompt(first, q.turns[:1], []) for q in questions]
    options = DecodeOptions(TreeConfig.parse(args.tree))
    configs = [(s, m) for s in setups for m in ("vanilla", "speculative")]
    seconds = dict.fromkeys(configs, 0.0)
    tokens = dict.fromkeys(configs, 0)
    rounds, accepted = dict.fromkeys(setups, 0), dict.fromkeys(setups, 0)
    outputs: dict = {}
    for s, m in configs:  # warm-up
        target, drafter = setups[s]
        generate(target, prompts[0], drafter if m == "speculative" else None, GenerationConfig(max_new_tokens=8),
                 options)
    for _ in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for s, m in configs:
                target, drafter = setups[s]
                cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
                start = time.perf_counter()
                result = generate(target, prompt, drafter if m == "speculative" else None, cfg, options)
                seconds[s, m] += time.perf_counter() - start
                tokens[s, m] += len(result.token_ids)
                outputs[s, m, i] = result.token_ids
                if m == "speculative":
                    rounds[s] += result.rounds
                    accepted[s] += sum(result.accepted)
    rate = {c: tokens[c] / seconds[c] for c in configs}
    lengths = [len(p) for p in prompts]
    print(f"\n# {settings[1]} vs {settings[0]}: default target ({args.dtype}), drafter {args.drafter}, tree "
          f"{args.tree}, {len(prompts)} {args.bench} prompts ({min(lengths)}-{max(lengths)} tokens) x "
          f"{args.max_new_tokens} tokens x {args.repeats} repeats, {args.threads} threads, {cpu_name()}, "
          f"{datetime.date.today()}\n")
    print(f"| {column} | vanilla tok/s | speculative tok/s | AL | speculative / vanilla | spec = vanilla outputs |")
    print("|---|--:|--:|--:|--:|--:|")
    rows = []
    for s in setups:
        same = sum(outputs[s, "vanilla", i] == outputs[s, "speculative", i] for i in range(len(prompts)))
        al = (accepted[s] + rounds[s]) / max(rounds[s], 1)
        row = {column: s, "vanilla_tokens_per_s": rate[s, "vanilla"], "speculative_tokens_per_s":
               rate[s, "speculative"], "acceptance_length": al, "speedup": rate[s, "speculative"] / rate[s, "vanilla"],
               "identical_outputs": f"{same}/{len(prompts)}"}
        rows.append(row)
        print(f"| {s} | {row['vanilla_tokens_per_s']:.1f} | {row['speculative_tokens_per_s']:.1f} | {al:.2f} | "
              f"{row['speedup']:.2f}x | {row['identical_outputs']} |")
    base, new = settings
    print(f"\n{new} / {base}: vanilla {rate[new, 'vanilla'] / rate[base, 'vanilla']:.2f}x, speculative "
          f"{rate[new, 'speculative'] / rate[base, 'speculative']:.2f}x")
    write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
