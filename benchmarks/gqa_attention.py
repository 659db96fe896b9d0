"""The target's forward over n new tokens with a tree mask, after a prefix of L tokens:
transformers' ``sdpa`` attention (``repeat_kv`` copies the KV cache per query group) against
``prism_sdpa`` (query groups folded into the query length, ``targets/attention.py``).

    python benchmarks/gqa_attention.py [--dtype bfloat16] [--threads 2] [--json out.json]

The two implementations alternate cell by cell in one process (median of ``--repeats`` calls
after warm-ups), so drifting machine load hits both alike; each cell also checks that their
logits agree (the same kernel on the same numbers: identical at most sizes, last-bit
differences where the kernel blocks a short query length differently). Run it on an otherwise
idle machine.
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
from prism_spec.targets.attention import GROUPED_SDPA
from prism_spec.targets.kv_cache import truncate_cache


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefixes", default="100,300,700,1200,2000", help="comma-separated prefix lengths L")
    parser.add_argument("--sizes", default="2,4,8,16,32", help="comma-separated new-token counts n")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype=args.dtype)
    model = target.model
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    print(f"# {args.target} ({args.dtype}, {groups} query heads per KV head), one forward over n new tokens "
          f"with a causal tree mask after L cached tokens; {args.threads} threads, {cpu_name()}, "
          f"torch {torch.__version__}, {datetime.date.today()}\n")
    print("| L | n | sdpa ms | prism_sdpa ms | ratio | max abs logit diff |\n|--:|--:|--:|--:|--:|--:|")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for prefix_len in (int(x) for x in args.prefixes.split(",")):
        prefix = torch.randint(0, target.vocab_size, (prefix_len,), generator=gen)
        model.set_attn_implementation("sdpa")
        cache = target.new_cache()
        target.forward(prefix[None], torch.arange(prefix_len)[None], cache)
        for n in (int(x) for x in args.sizes.split(",")):
            tokens = torch.randint(0, target.vocab_size, (n,), generator=gen)
            positions = torch.arange(prefix_len, prefix_len + n)
            tree = torch.ones(n, n, dtype=torch.bool).tril()

            def run():
                out = target.forward(tokens[None], positions[None], cache, tree[None])
                truncate_cache(cache, prefix_len)
                return out.logits

            times, logits = {}, {}
            for impl in ("sdpa", GROUPED_SDPA):
                model.set_attn_implementation(impl)
                logits[impl] = run()
                times[impl] = median_ms(run, args.repeats)
            diff = (logits["sdpa"] - logits[GROUPED_SDPA]).abs().max().item()
            row = {"prefix": prefix_len, "n": n, "sdpa_ms": times["sdpa"], "grouped_ms": times[GROUPED_SDPA],
                   "max_abs_logit_diff": diff}
            rows.append(row)
            print(f"| {prefix_len} | {n} | {row['sdpa_ms']:.1f} | {row['grouped_ms']:.1f} | "
                  f"{row['sdpa_ms'] / row['grouped_ms']:.2f}x | {diff:.3g} |", flush=True)
    write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
