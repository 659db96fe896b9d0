"""Replayed T=0 acceptance (prism_spec.bench.replay) against the decode loop's, on the benchmarks.

For each turn of the first ``--questions`` questions of every benchmark (``prism bench``'s
prompts, MT-bench's second turn after the first answer), the drafter decodes the prompt for
real (the target verifying every tree) and the acceptance is replayed from the target's greedy
continuation. Reports both acceptance lengths per benchmark, the turns whose per-round accepted
counts differ (float rounding of the features can move a near-tie), and the time each took
(the replay's with and without computing the continuation, which later evaluations reuse).

    python benchmarks/replay_vs_decode.py [--drafter auto] [--questions 2] [--tree paper] \\
        [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_rows
from prism_spec.bench.datasets import conversation_prompt, load_benchmarks
from prism_spec.bench.metrics import acceptance_length
from prism_spec.bench.replay import replay_acceptance, vanilla_continuation
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets import load_target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="paper")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype=args.dtype)
    drafter = resolve_drafter(args.drafter, target).drafter
    tree = TreeConfig.parse(args.tree)
    rows = []
    totals = {"decode_s": 0.0, "continuation_s": 0.0, "replay_s": 0.0}
    for bench in load_benchmarks(limit=args.questions, max_new_tokens=args.max_new_tokens):
        decoded_turns, replayed_turns, differing = [], [], 0
        for question in bench.questions:
            answers = []
            for i in range(len(question.turns)):
                prompt = conversation_prompt(target, question.turns[: i + 1], answers)
                t0 = time.perf_counter()
                result = generate(target, prompt, drafter, GenerationConfig(max_new_tokens=bench.max_new_tokens),
                                  DecodeOptions(tree))
                t1 = time.perf_counter()
                cont = vanilla_continuation(target, prompt, bench.max_new_tokens, lookahead=tree.max_depth + 1)
                t2 = time.perf_counter()
                accepted = replay_acceptance(target, drafter, prompt, cont, tree)
                t3 = time.perf_counter()
                totals["decode_s"] += t1 - t0
                totals["continuation_s"] += t2 - t1
                totals["replay_s"] += t3 - t2
                decoded_turns.append({"accepted": result.accepted})
                replayed_turns.append({"accepted": accepted})
                differing += accepted != result.accepted
                answers.append((result.text or "").strip())
        row = {"benchmark": bench.name, "turns": len(decoded_turns),
               "decode_al": round(acceptance_length(decoded_turns), 4),
               "replay_al": round(acceptance_length(replayed_turns), 4), "turns_differing": differing}
        rows.append(row)
        print(f"{bench.name:<10} {row['turns']:>3} turns: AL decoded {row['decode_al']:.3f}, replayed "
              f"{row['replay_al']:.3f}; {differing} turns differ in some round", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("decode_al", "replay_al")}
    print(f"mean AL: decoded {mean['decode_al']:.3f}, replayed {mean['replay_al']:.3f}; time: decoding "
          f"{totals['decode_s']:.0f} s, replay {totals['replay_s']:.0f} s (+ {totals['continuation_s']:.0f} s "
          f"for the greedy continuations, shared by every drafter and reused later)")
    rows.append({"benchmark": "mean", **{k: round(v, 4) for k, v in mean.items()},
                 **{k: round(v, 1) for k, v in totals.items()}})
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)


if __name__ == "__main__":
    main()
