"""How well the autotuner's calibration prompts stand for the benchmarks: the acceptance
length each tree shape would reach, replayed from wide-tree rounds (as ``--tree auto`` does)
on the built-in calibration prompts and on the benchmarks' first turns.

    python benchmarks/calibration_replay.py [--drafter auto] [--shapes 4/0/3,10/1/6] \\
        [--per-bench 5] [--builtin-first 4] [--json out.json]

Greedy generations with the calibration tree record which drafted nodes the target confirms;
``runtime.autotune.simulate`` replays each round on the sub-tree a shape would have built.
Acceptance does not depend on timing, so this can run beside other work. ``--builtin-first
N`` also replays the first N built-in prompts alone (4: the set the earlier calibration runs used).
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from common import write_rows
from prism_spec.bench.datasets import BENCHMARKS, conversation_prompt, load_benchmark
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime.autotune import CALIBRATION_PROMPTS, collect_traces, simulate
from prism_spec.runtime.tree import TreeConfig
from prism_spec.targets import load_target


def replayed_al(traces, shapes: dict[str, TreeConfig]) -> dict[str, float]:
    return {name: statistics.mean(simulate(t, s.depth, s.top_k, (s.total_tokens,))[s.total_tokens] for t in traces)
            for name, s in shapes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default="4/0/3,6/0/6,6/1/3,10/1/6,10/2/4")
    parser.add_argument("--per-bench", type=int, default=5, help="first turns per benchmark")
    parser.add_argument("--builtin-first", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", dtype=args.dtype)
    drafter = resolve_drafter(args.drafter, target).drafter
    shapes = {spec: TreeConfig.parse(spec) for spec in args.shapes.split(",")}
    sets = {}
    builtin, _ = collect_traces(target, drafter, CALIBRATION_PROMPTS)
    sets[f"built-in ({len(CALIBRATION_PROMPTS)} prompts)"] = builtin
    if args.builtin_first:
        first, _ = collect_traces(target, drafter, CALIBRATION_PROMPTS[: args.builtin_first])
        sets[f"built-in, first {args.builtin_first}"] = first
    every = []
    for bench in BENCHMARKS:
        prompts = [conversation_prompt(target, q.turns[:1], []) for q in load_benchmark(bench, limit=args.per_bench).questions]
        traces, _ = collect_traces(target, drafter, prompts, max_new_tokens=64)
        sets[bench] = traces
        every += traces
    sets["all benchmarks"] = every
    print(f"\n# replayed AL per shape ({args.dtype}, drafter {args.drafter}, {datetime.date.today()})\n")
    print("| prompts | rounds | " + " | ".join(shapes) + " |\n|---|--:|" + "--:|" * len(shapes))
    rows = []
    for name, traces in sets.items():
        al = replayed_al(traces, shapes)
        rows.append({"prompts": name, "rounds": len(traces), "al": al})
        print(f"| {name} | {len(traces)} | " + " | ".join(f"{al[s]:.3f}" for s in shapes) + " |")
    write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
