"""Why bf16 speculative output can differ from bf16 vanilla output: which parts of a forward
give a token different bits when it is computed with other tokens (tree verification) than
alone (a decode step), on this machine's kernels.

    python benchmarks/row_invariance.py [--prompts 2] [--max-new-tokens 64] [--json out.json]

1. Linear layers at the default target's shapes: the share of output elements of one M-row
   product that differ from M one-row products, whether a row's result depends on the other
   rows at a fixed M, and the time of an M-row product relative to one row (median of 20).
2. End to end on the default target in bf16 (packaged drafter, tree 4/0/3, first turns of
   ``--prompts`` questions per benchmark): prompts whose speculative output differs from
   vanilla, with today's verification and with ``Target.row_invariant_verify`` (every node's
   attention computed as its one-token step computes it).
Run it on an otherwise idle machine (the times in part 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import write_rows
from prism_spec.bench.datasets import BENCHMARKS, conversation_prompt, load_benchmark
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets import load_target
from prism_spec.targets.packed import packed_linear

SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # SmolLM2-135M: q/o, gate/up, down, head
ROWS = (2, 4, 8, 16)


def median_seconds(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_rows() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for k, out in SHAPES:
            weight = torch.randn(out, k, generator=gen).to(dtype)
            for kind in ("plain", "packed"):
                linear = (lambda x, w=weight: F.linear(x, w)) if kind == "plain" else packed_linear(weight, None)
                one = torch.randn(1, 1, k, generator=gen).to(dtype)
                t1 = median_seconds(lambda: linear(one), 5 if out > 10000 else 20)
                for m in ROWS:
                    x = torch.randn(1, m, k, generator=gen).to(dtype)
                    together = linear(x)[0]
                    alone = torch.cat([linear(x[:, i : i + 1])[0] for i in range(m)])
                    other = torch.randn(1, m, k, generator=gen).to(dtype)
                    other[0, m - 1] = x[0, 0]  # the same row, elsewhere, among other rows
                    rows.append({
                        "dtype": str(dtype).removeprefix("torch."), "shape": f"{k}x{out}", "weights": kind, "rows": m,
                        "elements_differing_from_one_row_products": round(float((together != alone).float().mean()), 5),
                        "row_result_independent_of_other_rows": bool(torch.equal(linear(other)[0, m - 1], together[0])),
                        "time_vs_one_row": round(median_seconds(lambda: linear(x), 5 if out > 10000 else 20) / t1, 2),
                    })
    return rows


def end_to_end(prompts_per_benchmark: int, max_new_tokens: int) -> list[dict]:
    target = load_target(dtype="bfloat16")
    drafter = resolve_drafter("auto", target).drafter
    prompts = [conversation_prompt(target, q.turns[:1], [])
               for name in BENCHMARKS for q in load_benchmark(name).questions[:prompts_per_benchmark]]
    config, options = GenerationConfig(max_new_tokens=max_new_tokens), DecodeOptions(TreeConfig.parse("4/0/3"))
    vanilla = [generate(target, p, None, config, options).token_ids for p in prompts]
    rows = []
    for row_invariant in (False, True):
        target.row_invariant_verify = row_invariant
        differing = sum(generate(target, p, drafter, config, options).token_ids != v for p, v in zip(prompts, vanilla))
        rows.append({"verify": "row-invariant attention" if row_invariant else "batched (today)",
                     "prompts": len(prompts), "outputs_differing_from_vanilla": differing})
    target.row_invariant_verify = False
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="questions per benchmark for part 2 (0: skip it)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    linear = linear_rows()
    print("dtype     shape       weights rows  differing  independent  time/1-row")
    for r in linear:
        print(f"{r['dtype']:9s} {r['shape']:11s} {r['weights']:7s} {r['rows']:4d}  "
              f"{r['elements_differing_from_one_row_products']:9.5f}  {str(r['row_result_independent_of_other_rows']):11s}  "
              f"{r['time_vs_one_row']:.2f}")
    e2e = end_to_end(args.prompts, args.max_new_tokens) if args.prompts else []
    for r in e2e:
        print(f"bf16 end to end, {r['verify']}: {r['outputs_differing_from_vanilla']} of {r['prompts']} outputs differ")
    write_rows(args.json, vars(args), linear + e2e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
