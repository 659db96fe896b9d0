"""The canonical summary of a target's current drafters, from one `prism bench` folder.

    python scripts/bench_summary.py BENCH_DIR OUT_JSON [--command "how BENCH_DIR was made"]

Keeps the bench's per method x temperature rows (mean_acceptance_length, mean_speedup,
t0_outputs_differing_from_vanilla, ...) and adds what a reader needs to trust them: the
settings, every machine and command that wrote runs into the folder, the questions per
benchmark each row saw, and the SHA-256 of each drafter's weights. Written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from prism_spec.bench.methods import MethodSpec

REQUIRED = ("method", "kind", "temperature", "mean_acceptance_length", "mean_speedup",
            "t0_outputs_differing_from_vanilla")


def weights_sha256(arg: str) -> str | None:
    """SHA-256 of a drafter's weights (a folder's model.safetensors, or the file itself)."""
    path = Path(arg)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def drafters(sessions: list[dict]) -> dict[str, dict]:
    """method name -> {spec, sha256} for every method with an argument (KIND[@LABEL]=ARG)."""
    out = {}
    for session in sessions:
        for spec in map(MethodSpec.parse, session.get("methods", [])):
            if spec.arg:
                out[spec.name] = {"spec": spec.spec_string(), "sha256": weights_sha256(spec.arg)}
    return out


def questions_per_benchmark(runs_file: Path) -> dict[tuple[str, float], dict[str, int]]:
    """(method, temperature) -> {benchmark: finished questions}."""
    counts: dict[tuple[str, float], Counter] = defaultdict(Counter)
    for line in runs_file.read_text().splitlines():
        run = json.loads(line)
        if not run.get("error"):
            counts[(run["method"], float(run["temperature"]))][run["bench"]] += 1
    return {key: dict(c) for key, c in counts.items()}


def build(bench_dir: Path, command: str | None) -> dict:
    summary = json.loads((bench_dir / "summary.json").read_text())
    bench = json.loads((bench_dir / "bench.json").read_text())
    sessions = bench.get("sessions", [])
    per_row = questions_per_benchmark(bench_dir / "runs.jsonl")
    rows = []
    for row in summary["rows"]:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"row {row.get('method')!r} lacks {missing}: not a prism bench summary?")
        counts = per_row.get((row["method"], float(row["temperature"])), {})
        rows.append({**row, "questions_per_benchmark": counts})
    machines = []
    for session in sessions:
        machine = {k: v for k, v in session.get("machine", {}).items() if k != "date"}
        if machine not in machines:
            machines.append(machine)
    return {
        "command": command,
        "source": str(bench_dir),
        "generated": summary.get("generated"),
        "settings": summary.get("settings"),
        "machines": machines,
        "bench_commands": [{"command": s.get("command"), "started": s.get("started")} for s in sessions],
        "drafters": drafters(sessions),
        "rows": rows,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--command", help="the command that produced BENCH_DIR (kept in the summary)")
    args = p.parse_args(argv)
    for name in ("summary.json", "bench.json", "runs.jsonl"):
        if not (args.bench_dir / name).is_file():
            p.error(f"{args.bench_dir / name} does not exist (not a finished prism bench folder?)")
    try:
        result = build(args.bench_dir, args.command)
    except (ValueError, KeyError) as exc:  # bad JSON and bad method specs are ValueErrors
        p.error(f"{args.bench_dir}: {exc}")
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    for row in result["rows"]:
        diff = row["t0_outputs_differing_from_vanilla"]
        print(f"{row['method']:>12} T={row['temperature']:g}  AL {row['mean_acceptance_length']:.2f}  "
              f"speedup {row['mean_speedup']:.2f}x" + ("" if diff is None else f"  T=0 outputs differing {diff}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
