"""Paired per-prompt comparison of two methods' acceptance length in one `prism bench` folder.

    python scripts/paired_al.py BENCH_DIR METHOD_A METHOD_B

For every prompt both methods decoded at the same temperature, AL = 1 + accepted draft tokens
per round (all turns together); prints the mean of B - A, its standard error, and how many
prompts got better or worse. Mean ALs differing by less than about two standard errors are
within noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def prompt_als(runs_file: Path, method: str) -> dict[tuple, float]:
    als = {}
    for line in runs_file.read_text().splitlines():
        run = json.loads(line)
        if run["method"] != method or run.get("error"):
            continue
        rounds = sum(t["rounds"] for t in run["turns"])
        if rounds:
            accepted = sum(t["accepted_total"] for t in run["turns"])
            als[(run["bench"], run["question_id"], run["temperature"])] = 1 + accepted / rounds
    return als


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_dir", type=Path)
    p.add_argument("method_a")
    p.add_argument("method_b")
    args = p.parse_args(argv)
    runs_file = args.bench_dir / "runs.jsonl"
    if not runs_file.is_file():
        p.error(f"{runs_file} does not exist (not a prism bench folder?)")
    a, b = prompt_als(runs_file, args.method_a), prompt_als(runs_file, args.method_b)
    shared = sorted(a.keys() & b.keys())
    if len(shared) < 2:
        p.error(f"{len(shared)} prompt(s) decoded by both {args.method_a!r} and {args.method_b!r}: need at least 2")
    diffs = [b[k] - a[k] for k in shared]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    print(f"{len(shared)} prompts: mean AL {statistics.mean(a[k] for k in shared):.3f} ({args.method_a}) "
          f"vs {statistics.mean(b[k] for k in shared):.3f} ({args.method_b}); "
          f"paired difference {statistics.mean(diffs):+.3f} ± {se:.3f} (standard error); "
          f"{sum(d > 0 for d in diffs)} better, {sum(d < 0 for d in diffs)} worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
