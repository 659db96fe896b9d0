"""scripts/bench_summary.py: a bench folder's rows with their provenance, written atomically."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_summary.py"


def _row(method, kind, temperature, al, speedup, differing):
    return {"method": method, "kind": kind, "temperature": temperature, "benchmarks": ["gsm8k", "qa"],
            "mean_acceptance_length": al, "mean_tokens_per_s": 10.0 * speedup, "mean_speedup": speedup,
            "t0_outputs_differing_from_vanilla": differing, "t0_outputs_compared": None, "runs": 3, "errors": 0}


def _bench_folder(tmp_path: Path) -> tuple[Path, Path]:
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "model.safetensors").write_bytes(b"weights")
    bench = tmp_path / "bench"
    bench.mkdir()
    machine = {"cpu": "Test CPU", "cpu_count": 2, "date": "2026-12-06T00:00:00+00:00"}
    sessions = [{"command": f"prism bench ... --limit {n}", "started": f"2026-12-06T0{n}:00:00+00:00",
                 "machine": {**machine, "date": f"2026-12-06T0{n}:00:00+00:00"},
                 "methods": ["vanilla", f"prism@packaged={drafter}"]} for n in (1, 2)]
    (bench / "bench.json").write_text(json.dumps({"settings": {}, "sessions": sessions}))
    (bench / "summary.json").write_text(json.dumps({
        "generated": "2026-12-06T03:00:00+00:00", "settings": {"tree": "60/5/10", "dtype": "float32"},
        "rows": [_row("vanilla", "vanilla", 0.0, 1.0, 1.0, None), _row("packaged", "prism", 0.0, 2.5, 1.4, 0)]}))
    runs = [{"method": m, "bench": b, "question_id": q, "temperature": 0.0, "error": None}
            for m in ("vanilla", "packaged") for b, q in (("gsm8k", 1), ("gsm8k", 2), ("qa", 1))]
    runs.append({"method": "packaged", "bench": "qa", "question_id": 2, "temperature": 0.0, "error": "boom"})
    (bench / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    return bench, drafter


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_rows_and_provenance(tmp_path):
    bench, drafter = _bench_folder(tmp_path)
    out = _run(bench, tmp_path / "summary.json", "--command", "bash reproduce.sh summary")
    assert out.returncode == 0, out.stderr
    assert "packaged T=0  AL 2.50  speedup 1.40x  T=0 outputs differing 0" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == "bash reproduce.sh summary"
    assert summary["settings"] == {"tree": "60/5/10", "dtype": "float32"}
    assert summary["machines"] == [{"cpu": "Test CPU", "cpu_count": 2}]  # one machine, dates dropped
    assert [c["command"] for c in summary["bench_commands"]] == ["prism bench ... --limit 1", "prism bench ... --limit 2"]
    assert summary["drafters"] == {"packaged": {"spec": f"prism@packaged={drafter}",
                                                "sha256": hashlib.sha256(b"weights").hexdigest()}}
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["packaged"]["mean_acceptance_length"] == 2.5
    assert rows["packaged"]["questions_per_benchmark"] == {"gsm8k": 2, "qa": 1}  # the failed run is not counted
    assert not (tmp_path / "summary.json.tmp").exists()


def test_refuses_an_unfinished_folder(tmp_path):
    bench, _ = _bench_folder(tmp_path)
    (bench / "summary.json").unlink()
    out = _run(bench, tmp_path / "summary.json")
    assert out.returncode == 2 and "not a finished prism bench folder" in out.stderr
    assert not (tmp_path / "summary.json").exists()


def test_refuses_rows_without_the_required_fields(tmp_path):
    bench, _ = _bench_folder(tmp_path)
    (bench / "summary.json").write_text(json.dumps({"rows": [{"method": "x", "temperature": 0.0}]}))
    out = _run(bench, tmp_path / "summary.json")
    assert out.returncode == 2 and "lacks" in out.stderr and "mean_acceptance_length" in out.stderr
    assert not (tmp_path / "summary.json").exists()
