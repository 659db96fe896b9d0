"""Why bf16 speculative output can differ from bf16 vanilla output: which parts of a forward
give a token different bits when it is computed with other tokens (tree verification) than
alone (a decode step), on this machine's kernels.

    python benchmarks/row_invariance.py [--prompts 2] [--max-new-tokens 64] [--trees 4/0/3,paper] \\
        [--modes today,attention,exact] [--skip-linear] [--batch-size 4] [--json out.json]

1. Linear layers at the default target's shapes: the share of output elements of one M-row
   product that differ from M one-row products, whether a row's result depends on the other
   rows at a fixed M, and the time of an M-row product relative to one row (median of 20).
2. End to end on the default target in bf16 (packaged drafter, ``--trees``, first turns of
   ``--prompts`` questions per benchmark): prompts whose speculative output differs from
   vanilla, per ``--modes``: today's verification, ``Target.row_invariant_verify`` (every
   node's attention computed as its one-token step computes it) and ``exact``
   (``Target.make_row_invariant``: that attention plus linear layers given a two-row minimum
   or split along K where this machine's kernels need it; vanilla runs in the same mode, and
   the vanilla outputs that changed from plain vanilla are counted). Differing prompts are
   listed with their first differing token. ``--batch-size N`` also decodes the prompts in
   batches of N: speculative against vanilla decoding of the same batches, and batched vanilla
   against each prompt alone.
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
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate, generate_batch
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


MODES = {  # --modes: how the speculative runs verify (vanilla runs in the same mode)
    "today": "batched (today)",
    "attention": "row-invariant attention",
    "exact": "row-invariant attention + row-invariant linears (--row-invariant)",
}


def end_to_end(prompts_per_benchmark: int, max_new_tokens: int, trees: list[str], modes: list[str],
               batch_size: int = 0) -> list[dict]:
    target = load_target(dtype="bfloat16")
    drafter = resolve_drafter("auto", target).drafter
    questions = [(name, q) for name in BENCHMARKS for q in load_benchmark(name).questions[:prompts_per_benchmark]]
    prompts = [conversation_prompt(target, q.turns[:1], []) for _, q in questions]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    plain = [generate(target, p, None, config).token_ids for p in prompts]
    vanilla, rows = plain, []
    for mode in modes:  # "exact" last: it changes the target's layers for good
        if mode == "exact":
            plan = target.make_row_invariant()
            vanilla = [generate(target, p, None, config).token_ids for p in prompts]
            rows.append({"verify": MODES[mode], "row_invariant_linears": plan, "prompts": len(prompts),
                         "attention": "compiled kernel" if target.attention_kernel is not None else "per-node SDPA",
                         "vanilla_outputs_differing_from_plain_vanilla": sum(a != b for a, b in zip(vanilla, plain))})
        target.row_invariant_verify = mode != "today"
        for tree in trees:
            options = DecodeOptions(TreeConfig.parse(tree))
            cases = []  # [benchmark, question id, index of the first token that differs]
            for (name, question), p, v in zip(questions, prompts, vanilla):
                out = generate(target, p, drafter, config, options).token_ids
                if out != v:
                    first = next((i for i, (a, b) in enumerate(zip(out, v)) if a != b), min(len(out), len(v)))
                    cases.append([name, str(question.question_id), first])
            differing = len(cases)
            rows.append({"verify": MODES[mode], "tree": tree, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                         "outputs_differing_from_vanilla": differing, "differing": cases})
            print(f"bf16 end to end, {MODES[mode]}, tree {tree}: {differing} of {len(prompts)} outputs differ", flush=True)
            if batch_size > 1:
                rows.append(batched(target, drafter, prompts, vanilla, config, options, batch_size, MODES[mode], tree))
    return rows


def batched(target, drafter, prompts, alone, config, options, batch_size: int, mode: str, tree: str) -> dict:
    """Prompts in consecutive batches of ``batch_size``: speculative against vanilla decoding of
    the same batches, and vanilla batched against each prompt alone."""
    speculative, vanilla = [], []
    for i in range(0, len(prompts), batch_size):
        speculative += [r.token_ids for r in generate_batch(target, prompts[i : i + batch_size], drafter, config, options)]
        vanilla += [r.token_ids for r in generate_batch(target, prompts[i : i + batch_size], None, config)]
    row = {"verify": mode, "tree": tree, "batch_size": batch_size, "prompts": len(prompts),
           "batched_speculative_differing_from_batched_vanilla": sum(a != b for a, b in zip(speculative, vanilla)),
           "batched_vanilla_differing_from_vanilla_alone": sum(a != b for a, b in zip(vanilla, alone))}
    print(f"bf16 batches of {batch_size}, {mode}, tree {tree}: speculative differs from vanilla of the same batch for "
          f"{row['batched_speculative_differing_from_batched_vanilla']} of {len(prompts)}; batched vanilla differs from "
          f"the prompt alone for {row['batched_vanilla_differing_from_vanilla_alone']}", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="questions per benchmark for part 2 (0: skip it)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trees", default="4/0/3", help="comma-separated trees for part 2 (e.g. 4/0/3,paper)")
    parser.add_argument("--modes", default="today,attention", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--skip-linear", action="store_true", help="part 2 only")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="part 2 also decodes the prompts in batches of this size (0: not)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: each of {', '.join(MODES)}")
    modes.sort(key=list(MODES).index)
    torch.set_num_threads(args.threads)
    linear = [] if args.skip_linear else linear_rows()
    if linear:
        print("dtype     shape       weights rows  differing  independent  time/1-row")
    for r in linear:
        print(f"{r['dtype']:9s} {r['shape']:11s} {r['weights']:7s} {r['rows']:4d}  "
              f"{r['elements_differing_from_one_row_products']:9.5f}  {str(r['row_result_independent_of_other_rows']):11s}  "
              f"{r['time_vs_one_row']:.2f}")
    e2e = (end_to_end(args.prompts, args.max_new_tokens, args.trees.split(","), modes, args.batch_size)
           if args.prompts else [])
    write_rows(args.json, vars(args), linear + e2e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
