"""scripts/paired_al.py: the paired AL difference of two methods in a bench folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "paired_al.py"


def _run(method, qid, accepted, rounds):
    return {"method": method, "bench": "gsm8k", "question_id": qid, "temperature": 0.0, "error": None,
            "turns": [{"accepted_total": accepted, "rounds": rounds}]}


def test_paired_difference_by_hand(tmp_path):
    runs = [_run("a", 1, 4, 4), _run("b", 1, 8, 4),   # AL 2.0 -> 3.0
            _run("a", 2, 2, 2), _run("b", 2, 1, 2),   # AL 2.0 -> 1.5
            _run("a", 3, 0, 1)]                       # only one method: left out
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "a", "b"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # diffs +1.0 and -0.5: mean +0.25, stdev 1.0607, se 0.75
    assert out.stdout.strip() == ("2 prompts: mean AL 2.000 (a) vs 2.250 (b); paired difference +0.250 ± 0.750 "
                                  "(standard error); 1 better, 1 worse")


def test_not_a_bench_folder(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "a", "b"], capture_output=True, text=True)
    assert out.returncode == 2 and "not a prism bench folder" in out.stderr
