"""Held-out accuracy per aligned draft step, from drafters' training logs, as a markdown table.

    python scripts/train_log_table.py results/smollm2-135m/drafters/{eagle2,hass,prism}

Each folder needs the ``train_log.jsonl`` that ``prism train`` writes; the row is the last
held-out evaluation (``--all-evals``: every one), with its stage, step and wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def evals(folder: Path) -> list[dict]:
    log = folder / "train_log.jsonl"
    if not log.exists():
        raise SystemExit(f"{folder}: no train_log.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "eval"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--all-evals", action="store_true")
    args = parser.parse_args(argv)
    table = []
    for folder in args.folders:
        found = evals(folder)
        if not found:
            raise SystemExit(f"{folder}: the log has no held-out evaluation")
        for r in found if args.all_evals else found[-1:]:
            acc = {int(k.removeprefix("acc_step")): v for k, v in r["metrics"].items() if k.startswith("acc_step")}
            table.append((folder.name, r.get("stage_name", "?"), r.get("global_step", r.get("step")),
                          r.get("elapsed"), acc))
    steps = max(max(acc) for *_, acc in table)
    print("| drafter | stage | step | minutes | " + " | ".join(f"step {i}" for i in range(1, steps + 1)) + " |")
    print("|---|---|--:|--:|" + "--:|" * steps)
    for name, stage, step, elapsed, acc in table:
        minutes = f"{elapsed / 60:.0f}" if elapsed is not None else "?"
        cells = " | ".join(f"{acc[i]:.3f}" if i in acc else "–" for i in range(1, steps + 1))
        print(f"| {name} | {stage} | {step} | {minutes} | {cells} |")


if __name__ == "__main__":
    main()
