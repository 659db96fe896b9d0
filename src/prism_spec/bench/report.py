"""Turn a bench's ``runs.jsonl`` into tables and JSON, and draw its figures (:mod:`.figures`).

Outputs, next to the runs file:

* ``runs.csv`` -- one row per run (prompt x method x temperature), per-run metrics;
* ``results.json`` -- every run, the per-(method, temperature, benchmark) aggregates, the
  machine and the command lines;
* ``table.md`` -- the paper's main-table layout: rows method x temperature, per benchmark the
  acceptance length (AL; N/A for vanilla) and tokens/s, then a block of speedups;
* ``summary.json`` -- per method and temperature: the mean over benchmarks of AL, tokens/s and
  speedup, and the count of T=0 outputs that differ from vanilla;
* ``step_acceptance.png`` -- per-draft-step conditional acceptance rate (paper Fig. 1);
* ``tree_sweep.png`` / ``scaling.png`` when the runs come from ``prism bench tree-sweep`` /
  ``prism bench scaling`` (paper Figs. 8 and 4).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from . import metrics as M
from .datasets import BENCHMARKS, DISPLAY_NAMES
from .machine import machine_info
from .figures import (plot_batch_sweep, plot_scaling, plot_step_acceptance, plot_tree_sweep, scaling_points,
                      tree_sweep_points)
from .runs import META_FILE, RUNS_FILE, finished_runs, method_order, read_runs, temperatures

CSV_COLUMNS = [
    "key", "bench", "question_id", "category", "method", "kind", "temperature", "tree", "max_new_tokens",
    "turns", "new_tokens", "rounds", "accepted_total", "acceptance_length", "total_s", "prefill_s", "draft_s",
    "verify_s", "tokens_per_s", "drafting_share", "weights_bytes", "kv_peak_bytes", "cuda_peak_bytes",
    "peak_memory_bytes", "finish_reasons", "differs_from_vanilla", "order", "error",
]
SUMMARY_ROW_KEYS = [
    "method", "kind", "temperature", "benchmarks", "mean_acceptance_length", "mean_tokens_per_s", "mean_speedup",
    "t0_outputs_differing_from_vanilla", "t0_outputs_compared", "runs", "errors",
]
AGGREGATE_KEYS = [
    "method", "kind", "temperature", "bench", "runs", "errors", "new_tokens", "total_s", "rounds",
    "acceptance_length", "al_source", "tokens_per_s", "speedup", "speedup_prompts", "drafting_share",
    "weights_bytes", "kv_peak_bytes", "peak_memory_bytes", "peak_memory_source", "differs_from_vanilla",
    "compared_with_vanilla", "step_acceptance", "trees",
]


# ----------------------------------------------------------------------------- loading
def load_runs(out_dir: str | Path) -> tuple[list[dict], dict]:
    """Runs (the last record of each key wins) and ``bench.json`` of a bench folder."""
    out_dir = Path(out_dir)
    runs_path = out_dir / RUNS_FILE if out_dir.is_dir() else out_dir
    folder = runs_path.parent
    by_key: dict[str, dict] = {}
    for record in read_runs(runs_path):
        by_key[record["key"]] = record
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return list(by_key.values()), meta


def _bench_order(runs: Sequence[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["bench"] for r in runs))
    return [b for b in BENCHMARKS if b in seen] + [b for b in seen if b not in BENCHMARKS]


def _turn_ids(run: dict) -> list[list[int]]:
    return [list(t["token_ids"]) for t in run.get("turns") or ()]


# ----------------------------------------------------------------------------- per run
def vanilla_differences(runs: Sequence[dict]) -> dict[str, bool | None]:
    """Per run key: does this T=0 run's output differ from vanilla's on the same prompt?
    None where there is nothing to compare (T > 0, vanilla itself, no vanilla run, errors)."""
    vanilla = {
        (r["bench"], r["question_id"]): _turn_ids(r)
        for r in finished_runs(runs)
        if r["kind"] == "vanilla" and float(r["temperature"]) == 0
    }
    out: dict[str, bool | None] = {}
    for r in runs:
        ref = vanilla.get((r["bench"], r["question_id"]))
        if r["kind"] == "vanilla" or float(r["temperature"]) != 0 or r.get("error") or ref is None:
            out[r["key"]] = None
        else:
            out[r["key"]] = M.count_differences({0: _turn_ids(r)}, {0: ref}) == 1
    return out


def run_row(run: dict, differs: bool | None = None) -> dict:
    turns = run.get("turns") or []
    has = bool(turns)
    rounds = sum(M.rounds_accepted(t)[0] for t in turns)
    accepted = sum(M.rounds_accepted(t)[1] for t in turns)

    def total(key):
        vals = [t.get(key) for t in turns]
        return None if not has or any(v is None for v in vals) else sum(vals)

    return {
        "key": run["key"],
        "bench": run["bench"],
        "question_id": run["question_id"],
        "category": run.get("category", ""),
        "method": run["method"],
        "kind": run["kind"],
        "temperature": run["temperature"],
        "tree": run.get("tree"),
        "max_new_tokens": run.get("max_new_tokens"),
        "turns": len(turns),
        "new_tokens": M.total_new_tokens(turns) if has else None,
        "rounds": rounds if has else None,
        "accepted_total": accepted if has else None,
        "acceptance_length": M.acceptance_length(turns) if has else None,
        "total_s": total("total_s"),
        "prefill_s": total("prefill_s"),
        "draft_s": total("draft_s"),
        "verify_s": total("verify_s"),
        "tokens_per_s": M.tokens_per_second(turns) if has else None,
        "drafting_share": M.drafting_share(turns) if has else None,
        "weights_bytes": run.get("weights_bytes"),
        "kv_peak_bytes": run.get("kv_peak_bytes"),
        "cuda_peak_bytes": run.get("cuda_peak_bytes"),
        "peak_memory_bytes": run.get("peak_memory_bytes"),
        "finish_reasons": ";".join(t.get("finish_reason", "") for t in turns),
        "differs_from_vanilla": differs,
        "order": run.get("order"),
        "error": run.get("error"),
    }


# ----------------------------------------------------------------------------- aggregates
def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per (method, temperature, benchmark) with the definitions of :mod:`metrics`.

    The speedup divides the method's tokens/s by vanilla's over the prompts both completed
    (same benchmark, same temperature, same bench run)."""
    differs = vanilla_differences(runs)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], float(r["temperature"]), r["bench"])].append(r)
    vanilla_by_prompt = {
        (float(r["temperature"]), r["bench"], r["question_id"]): r for r in finished_runs(runs) if r["kind"] == "vanilla"
    }
    rows = []
    for method in method_order(runs):
        for temp in temperatures(runs):
            for bench in _bench_order(runs):
                group = groups.get((method, temp, bench))
                if not group:
                    continue
                ok = finished_runs(group)
                turns = list(M.iter_turns(ok))
                tps = M.tokens_per_second(turns) if turns else None
                pairs = [(r, vanilla_by_prompt.get((temp, bench, r["question_id"]))) for r in ok]
                pairs = [(r, v) for r, v in pairs if v is not None]
                sp = None
                if pairs:
                    sp = M.speedup(
                        M.tokens_per_second(list(M.iter_turns(r for r, _ in pairs))),
                        M.tokens_per_second(list(M.iter_turns(v for _, v in pairs))),
                    )
                flags = [differs[r["key"]] for r in group if differs.get(r["key"]) is not None]
                compare = temp == 0 and group[0]["kind"] != "vanilla"
                sources = sorted({t.get("al_source", "decode") for t in turns})
                rows.append({
                    "method": method,
                    "kind": group[0]["kind"],
                    "temperature": temp,
                    "bench": bench,
                    "runs": len(ok),
                    "errors": len(group) - len(ok),
                    "new_tokens": M.total_new_tokens(turns),
                    "total_s": sum(t["total_s"] for t in turns),
                    "rounds": sum(M.rounds_accepted(t)[0] for t in turns),
                    "acceptance_length": M.acceptance_length(turns),
                    "al_source": ",".join(sources) or None,
                    "tokens_per_s": tps,
                    "speedup": sp,
                    "speedup_prompts": len(pairs),
                    "drafting_share": M.drafting_share(turns) if turns else None,
                    "weights_bytes": max((r.get("weights_bytes") or 0 for r in ok), default=None),
                    "kv_peak_bytes": max((r.get("kv_peak_bytes") or 0 for r in ok), default=None),
                    "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0 for r in ok), default=None),
                    "peak_memory_source": ok[0].get("peak_memory_source") if ok else None,
                    "differs_from_vanilla": sum(flags) if compare else None,
                    "compared_with_vanilla": len(flags) if compare else None,
                    "step_acceptance": M.step_acceptance_rates(turns),
                    # the shape each run used (--tree auto tunes one per drafter)
                    "trees": sorted({r["tree"] for r in group if r.get("tree") and r["kind"] != "vanilla"}),
                })
    return rows


def summarize(aggregates: Sequence[dict]) -> list[dict]:
    """Per (method, temperature): plain means over benchmarks of AL, tokens/s and speedup, and
    the T=0 outputs differing from vanilla, summed over benchmarks."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for a in aggregates:
        by[(a["method"], a["temperature"])].append(a)
    rows = []
    for (method, temp), group in by.items():
        compare = temp == 0 and group[0]["kind"] != "vanilla"
        rows.append({
            "method": method,
            "kind": group[0]["kind"],
            "temperature": temp,
            "benchmarks": [a["bench"] for a in group],
            "mean_acceptance_length": M.mean(a["acceptance_length"] for a in group),
            "mean_tokens_per_s": M.mean(a["tokens_per_s"] for a in group),
            "mean_speedup": M.mean(a["speedup"] for a in group),
            "t0_outputs_differing_from_vanilla": sum(a["differs_from_vanilla"] or 0 for a in group) if compare else None,
            "t0_outputs_compared": sum(a["compared_with_vanilla"] or 0 for a in group) if compare else None,
            "runs": sum(a["runs"] for a in group),
            "errors": sum(a["errors"] for a in group),
        })
    return rows


# ----------------------------------------------------------------------------- formatting
def _f(value, digits: int, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _mib(n) -> str:
    if n is None:
        return "–"
    mib = n / 2**20
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.2f}" if mib >= 0.01 else f"{mib:.4f}"


def table_columns(benches: Sequence[str]) -> list[str]:
    cols = ["Method", "T"]
    for b in benches:
        name = DISPLAY_NAMES.get(b, b)
        cols += [f"{name} AL", f"{name} tok/s"]
    cols += ["Mean AL", "Mean tok/s"]
    cols += [f"{DISPLAY_NAMES.get(b, b)} ×" for b in benches] + ["Mean ×"]
    return cols


def markdown_table(aggregates: Sequence[dict], summary: Sequence[dict], meta: dict | None = None) -> str:
    benches = list(dict.fromkeys(a["bench"] for a in aggregates))
    benches = [b for b in BENCHMARKS if b in benches] + [b for b in benches if b not in BENCHMARKS]
    cell = {(a["method"], a["temperature"], a["bench"]): a for a in aggregates}
    cols = table_columns(benches)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + [":-:"] + ["--:"] * (len(cols) - 2)) + "|"]
    srows = sorted(summary, key=lambda s: (s["temperature"], 0 if s["kind"] == "vanilla" else 1))
    for s in srows:
        method, temp = s["method"], s["temperature"]
        vanilla = s["kind"] == "vanilla"
        row = [method, f"{temp:g}"]
        for b in benches:
            a = cell.get((method, temp, b))
            al = None if a is None else a["acceptance_length"]
            row += ["N/A" if vanilla else _f(al, 2), _f(None if a is None else a["tokens_per_s"], 1)]
        row += ["N/A" if vanilla else _f(s["mean_acceptance_length"], 2), _f(s["mean_tokens_per_s"], 1)]
        for b in benches:
            a = cell.get((method, temp, b))
            row.append(_f(None if a is None else a["speedup"], 2, "×"))
        row.append(_f(s["mean_speedup"], 2, "×"))
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)

    detail = [
        "| Method | T | Tree | Runs | New tokens | Drafting share | Weights MiB | Peak KV MiB | Peak memory MiB | "
        "T=0 outputs ≠ vanilla |",
        "|---|:-:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in srows:
        group = [a for a in aggregates if a["method"] == s["method"] and a["temperature"] == s["temperature"]]
        share = M.mean(a["drafting_share"] for a in group) if all(a["drafting_share"] is not None for a in group) else None
        diff = s["t0_outputs_differing_from_vanilla"]
        diff_s = "–" if diff is None else f"{diff} / {s['t0_outputs_compared']}"
        trees = sorted({t for a in group for t in a.get("trees", ())})
        detail.append("| " + " | ".join([
            s["method"], f"{s['temperature']:g}", ", ".join(trees) or "–", str(s["runs"]) + (f" ({s['errors']} failed)" if s["errors"] else ""),
            str(sum(a["new_tokens"] for a in group)),
            "–" if share is None else f"{100 * share:.0f}%",
            _mib(max((a["weights_bytes"] or 0 for a in group), default=None)),
            _mib(max((a["kv_peak_bytes"] or 0 for a in group), default=None)),
            _mib(max((a["peak_memory_bytes"] or 0 for a in group), default=None)),
            diff_s,
        ]) + " |")

    meta = meta or {}
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    hf = sorted({a["method"] for a in aggregates if a["al_source"] and "hf-forwards" in a["al_source"]})
    notes = [
        "AL: tokens committed per verify round, bonus token included, the first token (from prefill) "
        "excluded; micro average over every round of the benchmark. Vanilla is 1 by definition (N/A).",
        "tok/s: new tokens / wall time of the generate calls (prefill included), summed over the benchmark. "
        "×: tok/s over vanilla's on the same prompts in the same bench run; Mean: plain mean over the benchmarks.",
    ]
    if hf:
        notes.append(f"{', '.join(hf)}: transformers' own generate loop; AL = new tokens / target forwards "
                     "(first forward included), no per-round trace, no drafting share, KV peak is an upper bound.")
    mem_src = {a["peak_memory_source"] for a in aggregates if a["peak_memory_source"]}
    if "weights+kv" in mem_src:
        notes.append("Peak memory (CPU): bytes of the target's and drafter's weights + the peak logical KV-cache "
                     "size replayed from the decode trace (activations and transient copies not counted).")
    if "cuda.max_memory_allocated" in mem_src:
        notes.append("Peak memory (CUDA): torch.cuda.max_memory_allocated, reset before each run.")
    head = [
        "# prism bench",
        "",
        f"Target `{settings.get('target', '?')}` "
        f"({'llama.cpp engine, GGUF weights' if settings.get('engine') == 'llama.cpp' else settings.get('dtype', '?')}), tree "
        f"`{settings.get('tree', '?')}` (total/depth/top_k), max new tokens per turn "
        f"{_mnt(settings.get('max_new_tokens'))}; {machine.get('device', '?')}"
        f"{' ' + machine['gpu'] if machine.get('gpu') else ''}, {machine.get('cpu', '?')}, {machine.get('date', '')}.",
        "",
        table,
        "",
        "## Details",
        "",
        "\n".join(detail),
        "",
        "## Notes",
        "",
        *[f"* {n}" for n in notes],
        "",
    ]
    return "\n".join(head)


def _mnt(d) -> str:
    if not isinstance(d, dict) or not d:
        return "?"
    values = set(d.values())
    if len(values) == 1:
        return str(values.pop())
    return ", ".join(f"{DISPLAY_NAMES.get(k, k)} {v}" for k, v in d.items())


# ----------------------------------------------------------------------------- figures
def write_report(out_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write every output for the bench in ``out_dir``; returns name -> path."""
    out_dir = Path(out_dir)
    runs, meta = load_runs(out_dir)
    if not runs:
        raise FileNotFoundError(f"no runs in {out_dir / RUNS_FILE}")
    differs = vanilla_differences(runs)
    aggregates = aggregate(runs)
    summary = summarize(aggregates)
    written: dict[str, Path] = {}

    path = out_dir / "runs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in runs:
            w.writerow(run_row(r, differs.get(r["key"])))
    written["runs.csv"] = path

    machine = meta.get("machine") or machine_info()
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    report_cmd = command or " ".join(sys.argv)
    path = out_dir / "results.json"
    path.write_text(json.dumps({
        "generated": generated,
        "machine": machine,
        "settings": meta.get("settings", {}),
        "sessions": meta.get("sessions", []),
        "command_lines": [s.get("command") for s in meta.get("sessions", [])],
        "report_command": report_cmd,
        "aggregates": aggregates,
        "runs": runs,
    }, indent=1 if len(runs) <= 1000 else None) + "\n")  # big benches: compact
    written["results.json"] = path

    path = out_dir / "summary.json"
    path.write_text(json.dumps({
        "generated": generated,
        "settings": meta.get("settings", {}),
        "machine": machine,
        "rows": summary,
    }, indent=2) + "\n")
    written["summary.json"] = path

    path = out_dir / "table.md"
    path.write_text(markdown_table(aggregates, summary, {**meta, "machine": machine}))
    written["table.md"] = path

    fig = plot_step_acceptance(runs, out_dir / "step_acceptance.png")
    if fig:
        written["step_acceptance.png"] = fig
    pts = tree_sweep_points(summary, runs)
    if pts:
        vanilla_tps = {s["temperature"]: s["mean_tokens_per_s"] for s in summary if s["kind"] == "vanilla"}
        (out_dir / "tree_sweep.json").write_text(json.dumps(pts, indent=1) + "\n")
        written["tree_sweep.json"] = out_dir / "tree_sweep.json"
        fig = plot_tree_sweep(pts, out_dir / "tree_sweep.png", vanilla_tps)
        if fig:
            written["tree_sweep.png"] = fig
    pts = scaling_points(summary, runs)
    if pts:
        (out_dir / "scaling.json").write_text(json.dumps(pts, indent=1) + "\n")
        written["scaling.json"] = out_dir / "scaling.json"
        fig = plot_scaling(pts, out_dir / "scaling.png")
        if fig:
            written["scaling.png"] = fig
    fig = plot_batch_sweep(runs, out_dir / "batch_sweep.png")
    if fig:
        written["batch_sweep.png"] = fig
    return written
