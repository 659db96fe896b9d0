"""Where a decode round's time goes: drafting per step, tree building, verify, acceptance,
cache compaction and the drafter's catch-up, for vanilla and speculative decoding (batch 1).

    python benchmarks/profile_round.py [--drafter auto] [--dtype float32] [--tree cpu] \\
        [--prompts 4] [--max-new-tokens 64] [--threads 2] [--json out.json]

The decode loop labels its phases with ``torch.profiler.record_function`` while a profiler
records (``prism_spec.devices.profiled``); this script runs ``torch.profiler`` over whole generations and reports each
label's time per round. The profiler itself slows every op a little, so the tokens/s and the
speedup come from a second, unprofiled pass over the same prompts (ratios within one run).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from prism_spec.bench.datasets import conversation_prompt, load_benchmark
from prism_spec.bench.machine import cpu_name
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.runtime.autotune import timed_calls
from prism_spec.targets import load_target

# Labels set in runtime/decode.py and runtime/tree.py; "drafter_expand" runs inside "draft_tree".
LABELS = ("draft_tree", "drafter_expand", "verify_forward", "accept", "cache_commit", "drafter_extend")


def chat_prompts(target, count: int) -> list[list[int]]:
    questions = load_benchmark("mt_bench").questions[:count]
    return [conversation_prompt(target, q.turns[:1], []) for q in questions]


def run(target, drafter, prompts, cfg, options):
    results = [generate(target, p, drafter, cfg, options) for p in prompts]
    tokens = sum(len(r.token_ids) for r in results)
    rounds = sum(r.rounds for r in results)
    accepted = sum(sum(r.accepted) for r in results)
    return results, tokens, rounds, accepted


def _tree_mask(input_ids, positions, cache, tree_mask=None, *args, **kwargs):
    return tree_mask


def profile_method(target, drafter, prompts, cfg, options) -> dict:
    run(target, drafter, prompts[:1], cfg, options)  # warm-up
    # The profiler slows every op: time the decode/verify forwards (they carry a tree mask,
    # prefill does not) in this unprofiled pass instead.
    verify_s = [0.0]
    start = time.perf_counter()
    with timed_calls(target, ["forward"], verify_s, when=lambda *a, **k: _tree_mask(*a, **k) is not None):
        results, tokens, rounds, accepted = run(target, drafter, prompts, cfg, options)
    wall = time.perf_counter() - start
    round_s = sum(r.total_s - r.prefill_s for r in results) / rounds
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pstart = time.perf_counter()
        presults, *_ = run(target, drafter, prompts, cfg, options)
        pwall = time.perf_counter() - pstart - sum(r.prefill_s for r in presults)  # rounds only
    events = {e.key: e for e in prof.key_averages()}
    ms = {label: events[label].cpu_time_total / 1e3 / rounds if label in events else 0.0 for label in LABELS}
    phases = {
        "draft: drafter steps": ms["drafter_expand"],
        "draft: tree building": ms["draft_tree"] - ms["drafter_expand"],
        "verify: target forward": ms["verify_forward"],
        "accept (sampling / argmax)": ms["accept"],
        "cache compaction": ms["cache_commit"],
        "drafter catch-up (extend)": ms["drafter_extend"],
    }
    round_ms = pwall * 1e3 / rounds
    phases["other (loop, commit, stop checks, profiler)"] = round_ms - sum(phases.values())
    ops = sorted(
        (e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    return {
        "tokens": tokens,
        "rounds": rounds,
        "acceptance_length": (accepted + rounds) / rounds,
        "tokens_per_s": tokens / wall,
        "unprofiled_round_ms": round_s * 1e3,
        "unprofiled_verify_ms": verify_s[0] / rounds * 1e3,
        "profiled_round_ms": round_ms,
        "phases_ms_per_round": phases,
        "expand_calls_per_round": (events["drafter_expand"].count / rounds) if "drafter_expand" in events else 0.0,
        "top_ops_self_ms_per_round": {e.key: e.self_cpu_time_total / 1e3 / rounds for e in ops[:8]},
    }


def acceptance_needed(vanilla_round_ms: float, spec_round_ms: float, speedups=(1.0, 1.5, 2.0)) -> dict[float, float]:
    """Acceptance length at which speculative decoding reaches each speedup, given the two
    measured round costs: tokens/s = AL / round time, so AL = speedup x spec round / vanilla round."""
    return {s: s * spec_round_ms / vanilla_round_ms for s in speedups}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tree", default="cpu")
    parser.add_argument("--prompts", type=int, default=4, help="first-turn MT-bench questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--static-cache", action="store_true", help="preallocated KV cache (both methods)")
    parser.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                        help="plain nn.Linear instead of prepacked CPU weights (target and drafter)")
    parser.add_argument("--compile", action="store_true", help="torch.compile decode/verify forwards (implies --static-cache)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype=args.dtype, pack_weights=None if args.packed_weights else False)
    if args.compile:
        target.compile_decoder()
    static = args.static_cache or args.compile
    drafter = resolve_drafter(args.drafter, target).drafter
    prompts = chat_prompts(target, args.prompts)
    tree = TreeConfig.parse(args.tree)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    vanilla = profile_method(target, None, prompts, cfg, DecodeOptions(static_cache=static))
    spec = profile_method(target, drafter, prompts, cfg, DecodeOptions(tree, static_cache=static))

    print(f"\n{args.target} ({args.dtype}), drafter {args.drafter}, tree {args.tree} ({tree.total_tokens}/"
          f"{tree.depth}/{tree.top_k}), {args.prompts} MT-bench prompts x {args.max_new_tokens} tokens, "
          f"{args.threads} threads, {'static' if static else 'dynamic'} KV cache{', compiled' if args.compile else ''}, "
          f"{'prepacked' if target.packed_weights else 'plain nn.Linear'} weights, "
          f"{cpu_name()}, {datetime.date.today()}\n")
    print("| phase | vanilla ms/round | speculative ms/round |\n|---|--:|--:|")
    for phase in spec["phases_ms_per_round"]:
        print(f"| {phase} | {vanilla['phases_ms_per_round'][phase]:.2f} | {spec['phases_ms_per_round'][phase]:.2f} |")
    print(f"| **round (profiled)** | {vanilla['profiled_round_ms']:.2f} | {spec['profiled_round_ms']:.2f} |")
    print(f"\ndrafter steps per round: {spec['expand_calls_per_round']:.1f}; acceptance length "
          f"{spec['acceptance_length']:.2f}")
    speedup = spec["tokens_per_s"] / vanilla["tokens_per_s"]
    print(f"unprofiled: vanilla {vanilla['tokens_per_s']:.1f} tok/s, speculative {spec['tokens_per_s']:.1f} tok/s, "
          f"speedup {speedup:.2f}x")
    print("unprofiled ms per round (verify = the target's forward, timed around it):")
    for name, m in (("vanilla", vanilla), ("speculative", spec)):
        print(f"  {name:12s} round {m['unprofiled_round_ms']:6.2f}  verify {m['unprofiled_verify_ms']:6.2f}  "
              f"rest {m['unprofiled_round_ms'] - m['unprofiled_verify_ms']:6.2f}")
    needed = acceptance_needed(vanilla["unprofiled_round_ms"], spec["unprofiled_round_ms"])
    print("acceptance length this tree needs at these round costs (AL = speedup x speculative round / "
          "vanilla round): " + ", ".join(f"{s:g}x: {al:.2f}" for s, al in needed.items())
          + f" (measured: {spec['acceptance_length']:.2f})")
    print("\nheaviest ops in the speculative run (self ms per round):")
    for op, value in spec["top_ops_self_ms_per_round"].items():
        print(f"  {op:32s} {value:7.2f}")
    if args.json:
        record = {
            "settings": vars(args), "machine": {"cpu": cpu_name(), "platform": platform.platform(),
                                                "torch": torch.__version__},
            "date": str(datetime.date.today()), "vanilla": vanilla, "speculative": spec, "speedup": speedup,
            "acceptance_needed": {f"{s:g}x": al for s, al in needed.items()},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
