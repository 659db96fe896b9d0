"""prism bench: inputs, output schemas, resume, and an end-to-end mini bench on a tiny Llama."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import warnings

import pytest
from helpers import require_llama_cpp, tiny_chat_target
import torch

from prism_spec.bench import report as R
from prism_spec.bench.cli import build_parser, main
from prism_spec.bench.datasets import (
    BENCHMARKS,
    BenchmarkError,
    conversation_prompt,
    load_benchmark,
    load_benchmarks,
    parse_max_new_tokens,
)
from prism_spec.bench.methods import MethodError, MethodSpec, parse_methods
from prism_spec.bench.runner import (
    RUNS_FILE,
    BenchConfig,
    BenchError,
    parse_scaling_drafters,
    read_runs,
    rotated,
    run_batch_sweep,
    run_bench,
    run_key,
    run_seed,
    tree_sweep_specs,
)
from prism_spec.runtime.tree import TreeConfig


# ============================================================================ inputs
def test_packaged_benchmarks_load():
    for name in BENCHMARKS:
        bench = load_benchmark(name)
        assert len(bench.questions) == 80
        assert {len(q.turns) for q in bench.questions} == ({2} if name == "mt_bench" else {1})
    assert load_benchmark("mt_bench").max_new_tokens == 1024  # the paper's budgets
    assert load_benchmark("gsm8k").max_new_tokens == 512
    assert len(load_benchmark("qa", limit=3).questions) == 3
    readme = Path(load_benchmark("qa").path).parent / "README.md"
    assert "SafeAILab/EAGLE" in readme.read_text()


def test_custom_benchmark_file_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": 1, "category": "x", "turns": ["hi", "again"]}\n\n{"question_id": 2, "turns": ["yo"]}')
    bench = load_benchmark(str(path), max_new_tokens={"mine": 7, "*": 3})
    assert bench.name == "mine" and len(bench.questions) == 2 and bench.max_new_tokens == 7
    assert bench.questions[0].turns == ("hi", "again")
    with pytest.raises(BenchmarkError):
        load_benchmark("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(BenchmarkError):
        load_benchmark(str(bad))
    with pytest.raises(BenchmarkError):
        load_benchmarks(["qa", "qa"])


def test_max_new_tokens_specs():
    assert parse_max_new_tokens(None) == {}
    assert parse_max_new_tokens(["64", "mt_bench=128"]) == {"*": 64, "mt_bench": 128}
    benches = {b.name: b.max_new_tokens for b in load_benchmarks(None, 1, parse_max_new_tokens(["64", "mt_bench=128"]))}
    assert benches == {"mt_bench": 128, "humaneval": 64, "gsm8k": 64, "alpaca": 64, "sum": 64, "qa": 64}
    for bad in (["x"], ["0"], ["qa=-1"]):
        with pytest.raises(BenchmarkError):
            parse_max_new_tokens(bad)


class FakeTarget:
    """Just what the runner needs from a target: a tokenizer flag, render_chat and a device."""

    tokenizer = object()
    device = torch.device("cpu")

    def __init__(self):
        self.rendered = []

    def render_chat(self, messages, add_generation_prompt=True):
        self.rendered.append([(m["role"], m["content"]) for m in messages])
        return list(range(1, 2 + sum(len(m["content"]) for m in messages)))


def test_second_turn_follows_the_models_own_answer():
    t = FakeTarget()
    conversation_prompt(t, ["q1", "q2"], ["my answer"])
    assert t.rendered[-1] == [("user", "q1"), ("assistant", "my answer"), ("user", "q2")]
    with pytest.raises(ValueError):
        conversation_prompt(t, ["q1", "q2"], [])


def test_method_specs():
    specs = parse_methods(["vanilla", "prism=results/x/prism", "standard=layers:4", "hf-assisted=layers:4",
                           "hf-lookup", "prism*@multi=dir", "eagle2=e", "hass=h"])
    assert [s.name for s in specs] == ["vanilla", "prism", "standard", "hf-assisted", "hf-lookup", "multi", "eagle2", "hass"]
    assert specs[1].arg == "results/x/prism" and specs[5].kind == "prism*"
    assert specs[3].is_peer and specs[4].is_peer and not specs[1].is_peer
    assert MethodSpec.parse("prism@p25=a=b").arg == "a=b"
    for bad in ("prism", "nope=x", "vanilla=x", "standard="):
        with pytest.raises(MethodError):
            MethodSpec.parse(bad)
    with pytest.raises(MethodError, match="label"):
        parse_methods(["prism=a", "prism=b"])


def test_keys_seeds_rotation():
    assert run_key("qa", 3, "prism", 0.0) == "qa|3|prism|T=0"
    assert run_key("qa", 3, "prism", 1.0) == "qa|3|prism|T=1"
    s = run_seed(0, "qa", 3, "prism", 1.0, 0)
    assert s == run_seed(0, "qa", 3, "prism", 1.0, 0)  # stable across processes (crc32)
    assert len({s, run_seed(0, "qa", 3, "eagle2", 1.0, 0), run_seed(0, "qa", 4, "prism", 1.0, 0),
                run_seed(1, "qa", 3, "prism", 1.0, 0), run_seed(0, "qa", 3, "prism", 1.0, 1)}) == 5
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_cli_parses_options_before_and_after_subcommands():
    p = build_parser()
    a = p.parse_args(["--limit", "2", "--method", "vanilla", "--method", "standard=layers:4", "--max-new-tokens", "64"])
    assert a.bench_command is None and a.limit == 2 and a.method == ["vanilla", "standard=layers:4"]
    assert a.tree == "paper" and a.temperature is None and a.func.__name__ == "run_command"
    a = p.parse_args(["--limit", "2", "tree-sweep", "--method", "prism=d", "--depths", "2,3"])
    assert a.limit == 2 and a.method == ["prism=d"] and a.depths == "2,3" and a.func.__name__ == "tree_sweep_command"
    a = p.parse_args(["scaling", "--drafter", "25=a", "--drafter", "eagle2:50=b", "--temperature", "1"])
    assert a.drafter == ["25=a", "eagle2:50=b"] and a.temperature == [1.0] and a.target == "smollm2-135m"


def test_add_bench_parser_under_a_parent_cli():
    import argparse

    from prism_spec.bench.cli import add_bench_parser

    parent = argparse.ArgumentParser(prog="prism")
    subs = parent.add_subparsers(dest="command")
    sub = add_bench_parser(subs)
    assert sub.prog.split()[-1] == "bench"
    args = parent.parse_args(["bench", "--method", "vanilla", "report", "--out", "x"])
    assert args.command == "bench" and args.func.__name__ == "report_command" and args.out == "x"


def test_sweep_specs():
    specs = tree_sweep_specs("prism=d", TreeConfig(5, 10, 60), depths=[3, 5], top_ks=[4], totals=[16])
    assert [s.name for s in specs] == ["prism@60/5/10", "prism@60/3/10", "prism@60/5/4", "prism@16/5/10"]
    assert specs[0].tree == TreeConfig(5, 10, 60) and dict(specs[0].extra)["tree_sweep_axes"] == ["base", "depth"]
    with pytest.raises(BenchError):
        tree_sweep_specs("vanilla", TreeConfig())
    specs = parse_scaling_drafters(["25=a", "eagle2:50=b"])
    assert [(s.kind, s.name, dict(s.extra)["data_fraction"]) for s in specs] == [("prism", "prism@25", 25.0),
                                                                                ("eagle2", "eagle2@50", 50.0)]
    with pytest.raises(BenchError):
        parse_scaling_drafters(["a"])


def test_batch_sweep_rejects_bad_sizes_and_hf_peers(tmp_path):
    with pytest.raises(BenchError, match="batch sizes must be >= 1"):
        run_batch_sweep(BenchConfig(out=tmp_path), [0, 2])
    with pytest.raises(BenchError, match="hf-"):
        run_batch_sweep(BenchConfig(out=tmp_path, methods=["vanilla", "hf-lookup"]), [1])


# ============================================================================ synthetic runs
def _turn(ids, accepted, exhausted, total_s, draft_s=0.0, prompt_len=5):
    return {
        "prompt_len": prompt_len, "new_tokens": len(ids), "token_ids": list(ids), "text": "x",
        "finish_reason": "length", "accepted": accepted, "exhausted": exhausted, "tree_sizes": [4] * len(accepted),
        "tree_depths": [2] * len(accepted), "rounds": len(accepted), "accepted_total": sum(accepted),
        "al_source": "decode", "prefill_s": 0.1, "draft_s": draft_s, "verify_s": total_s - 0.1 - draft_s,
        "total_s": total_s, "kv_peak_bytes": 1000, "kv_method": "replay",
    }


def _run(bench, qid, method, kind, temp, turns, error=None, info=None):
    return {
        "key": run_key(bench, qid, method, temp), "bench": bench, "question_id": qid, "category": "c",
        "method": method, "kind": kind, "spec": kind, "temperature": float(temp),
        "tree": None if kind == "vanilla" else "8/4/3", "max_new_tokens": 10, "turns": [] if error else turns,
        "weights_bytes": 2**20, "kv_peak_bytes": 1000, "cuda_peak_bytes": None, "peak_memory_bytes": 2**20 + 1000,
        "peak_memory_source": "weights+kv", "info": info or {"kind": kind}, "error": error, "order": 0,
    }


def synthetic_runs():
    v = lambda n: ([0] * (n - 1), [True] * (n - 1))  # noqa: E731 -- vanilla: n tokens, n-1 rounds
    ids1, ids2 = list(range(10)), list(range(10, 20))
    return [
        # MT-bench q1, two turns. vanilla 20 tokens / 2 s; prism same tokens in 1 s -> 2x.
        _run("mt_bench", 1, "vanilla", "vanilla", 0, [_turn(ids1, *v(10), 1.0), _turn(ids2, *v(10), 1.0)]),
        _run("mt_bench", 1, "prism", "prism", 0, [
            _turn(ids1, [2, 3, 1], [False, True, False], 0.5, 0.1),
            _turn(ids2, [4, 1, 0], [True, False, False], 0.5, 0.1),
        ]),
        # GSM8K q1: prism's output differs from vanilla's (a lossless bug would show here).
        _run("gsm8k", 1, "vanilla", "vanilla", 0, [_turn(ids1, *v(10), 2.0)]),
        _run("gsm8k", 1, "prism", "prism", 0, [_turn(ids2, [8], [True], 0.5, 0.1)]),
        # GSM8K q2: prism failed (prompt too long): excluded everywhere.
        _run("gsm8k", 2, "vanilla", "vanilla", 0, [_turn(ids1, *v(10), 1.0)]),
        _run("gsm8k", 2, "prism", "prism", 0, [], error="PromptError: too long"),
        # T=1: no losslessness comparison.
        _run("gsm8k", 1, "vanilla", "vanilla", 1, [_turn(ids1, *v(10), 1.0)]),
        _run("gsm8k", 1, "prism", "prism", 1, [_turn(ids2, [4, 4], [False, True], 0.25, 0.05)]),
    ]


def write_synthetic(folder: Path, runs=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / RUNS_FILE, "w") as f:
        for r in runs or synthetic_runs():
            f.write(json.dumps(r) + "\n")
    (folder / "bench.json").write_text(json.dumps({
        "settings": {"target": "t", "dtype": "float32", "tree": "8/4/3", "seed": 0,
                     "max_new_tokens": {"mt_bench": 10, "gsm8k": 10}},
        "machine": {"platform": "p", "cpu": "c", "gpu": None, "device": "cpu", "torch": "x", "transformers": "y",
                    "date": "d"},
        "sessions": [{"command": "prism bench --method vanilla --method prism=d"}],
    }))
    return folder


def test_aggregates_by_hand():
    agg = {(a["method"], a["temperature"], a["bench"]): a for a in R.aggregate(synthetic_runs())}
    a = agg[("prism", 0.0, "mt_bench")]
    assert a["acceptance_length"] == pytest.approx((6 + 5 + 6) / 6)  # (sum accepted + rounds) / rounds
    assert a["tokens_per_s"] == pytest.approx(20.0)
    assert a["speedup"] == pytest.approx(2.0)  # 20 tok/s vs vanilla's 10
    assert a["drafting_share"] == pytest.approx(0.2)
    assert a["differs_from_vanilla"] == 0 and a["compared_with_vanilla"] == 1
    # rounds (2,F) (3,T) (1,F) | (4,T) (1,F) (0,F): step 1 5/6, step 2 3/5, step 3 2/3, step 4 1/1;
    # nothing reaches step 5 ((4,T) ran out of tree).
    assert [s["rate"] for s in a["step_acceptance"]] == pytest.approx([5 / 6, 3 / 5, 2 / 3, 1.0])
    g = agg[("prism", 0.0, "gsm8k")]
    assert g["runs"] == 1 and g["errors"] == 1
    # Speedup over the prompts both finished (q1 only): 20 tok/s vs 5 tok/s.
    assert g["speedup"] == pytest.approx(4.0) and g["speedup_prompts"] == 1
    assert g["differs_from_vanilla"] == 1
    assert agg[("vanilla", 0.0, "gsm8k")]["acceptance_length"] == 1.0
    assert agg[("prism", 1.0, "gsm8k")]["differs_from_vanilla"] is None
    assert agg[("prism", 1.0, "gsm8k")]["speedup"] == pytest.approx(4.0)


def test_report_files_and_schemas(tmp_path):
    folder = write_synthetic(tmp_path / "bench")
    written = R.write_report(folder, command="prism bench report --out x")
    for name in ("runs.csv", "results.json", "summary.json", "table.md", "step_acceptance.png"):
        assert name in written and (folder / name).stat().st_size > 0

    with open(folder / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == R.CSV_COLUMNS
    assert len(rows) == 8
    by_key = {r["key"]: r for r in rows}
    assert by_key["gsm8k|1|prism|T=0"]["differs_from_vanilla"] == "True"
    assert by_key["mt_bench|1|prism|T=0"]["differs_from_vanilla"] == "False"
    assert by_key["gsm8k|2|prism|T=0"]["error"].startswith("PromptError")

    results = json.loads((folder / "results.json").read_text())
    assert set(results) >= {"machine", "settings", "sessions", "command_lines", "report_command", "aggregates", "runs"}
    assert set(results["machine"]) >= {"platform", "cpu", "gpu", "torch", "transformers", "date"}
    assert results["command_lines"] == ["prism bench --method vanilla --method prism=d"]
    assert len(results["runs"]) == 8
    assert all(set(a) == set(R.AGGREGATE_KEYS) for a in results["aggregates"])

    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) == {"generated", "settings", "machine", "rows"}
    rows = {(s["method"], s["temperature"]): s for s in summary["rows"]}
    assert all(list(s) == R.SUMMARY_ROW_KEYS for s in summary["rows"])
    p0 = rows[("prism", 0.0)]
    assert p0["mean_speedup"] == pytest.approx((2.0 + 4.0) / 2)
    assert p0["mean_acceptance_length"] == pytest.approx((17 / 6 + 9.0) / 2)
    assert p0["t0_outputs_differing_from_vanilla"] == 1 and p0["t0_outputs_compared"] == 2
    assert rows[("prism", 1.0)]["t0_outputs_differing_from_vanilla"] is None
    assert rows[("vanilla", 0.0)]["t0_outputs_differing_from_vanilla"] is None

    table = (folder / "table.md").read_text().splitlines()
    header = [c.strip() for c in next(line for line in table if line.startswith("| Method | T |")).strip("|").split("|")]
    assert header == R.table_columns(["mt_bench", "gsm8k"])
    assert header[:4] == ["Method", "T", "MT-bench AL", "MT-bench tok/s"] and header[-1] == "Mean ×"
    start = table.index("| " + " | ".join(header) + " |")
    body = []
    for line in table[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    assert [(r[0], r[1]) for r in body] == [("vanilla", "0"), ("prism", "0"), ("vanilla", "1"), ("prism", "1")]
    assert all(len(r) == len(header) for r in body)
    assert body[0][2] == "N/A" and body[0][header.index("Mean AL")] == "N/A"
    assert body[1][2] == "2.83" and body[1][header.index("MT-bench ×")] == "2.00×"
    assert body[1][header.index("Mean ×")] == "3.00×"
    assert "## Details" in "\n".join(table) and "1 / 2" in "\n".join(table)
    # The details name the tree each method ran with (--tree auto tunes one per drafter).
    detail_header = next(line for line in table if line.startswith("| Method | T | Tree |"))
    detail = [[c.strip() for c in line.strip("|").split("|")] for line in table[table.index(detail_header) + 2:]
              if line.startswith("|")][:4]
    assert [(r[0], r[2]) for r in detail] == [("vanilla", "–"), ("prism", "8/4/3"), ("vanilla", "–"), ("prism", "8/4/3")]
    assert {a["method"]: a["trees"] for a in results["aggregates"]} == {"vanilla": [], "prism": ["8/4/3"]}


def test_sweep_and_scaling_figures(tmp_path):
    runs = [_run("qa", 1, "vanilla", "vanilla", 0, [_turn(range(10), [0] * 9, [True] * 9, 1.0)])]
    for label, (total, depth, k), axes in [("p@60/5/10", (60, 5, 10), ["base"]), ("p@60/3/10", (60, 3, 10), ["depth"]),
                                           ("p@60/5/4", (60, 5, 4), ["top_k"]), ("p@16/5/10", (16, 5, 10), ["total_tokens"])]:
        info = {"tree_sweep_axes": axes, "tree_depth": depth, "tree_top_k": k, "tree_total_tokens": total}
        runs.append(_run("qa", 1, label, "prism", 0, [_turn(range(10), [2, 3], [False, True], 0.5)], info=info))
    for kind in ("prism", "eagle2"):
        for frac in (25, 50, 100):
            runs.append(_run("qa", 1, f"{kind}@{frac}", kind, 0, [_turn(range(10), [frac // 25], [False], 0.5)],
                             info={"data_fraction": float(frac)}))
    folder = write_synthetic(tmp_path / "sweep", runs)
    written = R.write_report(folder)
    for name in ("tree_sweep.png", "tree_sweep.json", "scaling.png", "scaling.json"):
        assert name in written and written[name].stat().st_size > 0
    pts = json.loads((folder / "scaling.json").read_text())
    assert sorted((p["kind"], p["data_fraction"], p["acceptance_length"]) for p in pts)[:2] == [
        ("eagle2", 25.0, 2.0), ("eagle2", 50.0, 3.0)]
    assert R.plot_batch_sweep(runs, tmp_path / "b.png") is None  # nothing batched yet


# ============================================================================ runs file, resume
def test_read_runs_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / RUNS_FILE
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "tur')
    assert [r["key"] for r in read_runs(path)] == ["a", "b"]
    assert path.read_text().endswith('"tur')  # untouched without repair
    assert [r["key"] for r in read_runs(path, repair=True)] == ["a", "b"]
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    path.write_text('{"key": "a"}\n{"key": "b"}')  # complete, newline missing
    assert [r["key"] for r in read_runs(path, repair=True)] == ["a", "b"]
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(BenchError):
        read_runs(path)


class FakeMethod:
    """A method that generates 3 fixed tokens and remembers what it was asked."""

    def __init__(self, spec, target, log):
        self.spec, self.target, self.log = spec, target, log
        self.name = spec.name
        self.weights_bytes = 100
        self.info = {"kind": spec.kind}

    def run_turn(self, prompt_ids, max_new_tokens, temperature, seed, tree):
        self.log.append((self.name, len(prompt_ids), temperature, seed))
        accepted = [0, 0] if self.spec.is_vanilla else [1]
        return _turn([7, 8, 9], accepted, [True] * len(accepted), 0.01)


def _fake_bench(tmp_path, log, **kw):
    cfg = BenchConfig(benches=["mt_bench", "qa"], limit=2, methods=["vanilla", "standard=layers:1", "hf-lookup"],
                      out=tmp_path / "fake", progress=False, warmup=False, max_new_tokens=4, **kw)
    target = FakeTarget()
    return run_bench(cfg, target=target, loader=lambda spec, t: FakeMethod(spec, t, log)), target


def test_interleaving_resume_and_seeds(tmp_path):
    log = []
    path, target = _fake_bench(tmp_path, log, temperatures=[0.0, 1.0])
    records = read_runs(path)
    assert len(records) == 2 * 2 * 2 * 3  # benches x questions x temperatures x methods
    # Methods interleaved per prompt, order rotated by one per prompt.
    firsts = [r["method"] for r in records if r["order"] == 0 and r["temperature"] == 0]
    assert firsts == ["vanilla", "standard", "hf-lookup", "vanilla"]
    assert [r["method"] for r in records[:3]] == ["vanilla", "standard", "hf-lookup"]
    # MT-bench: two turns, the second prompt renders the first answer ("x").
    mt = [r for r in records if r["bench"] == "mt_bench"]
    assert all(len(r["turns"]) == 2 for r in mt)
    assert ("assistant", "x") in target.rendered[1]
    # Seeds: fixed per (prompt, method, temperature, turn); recorded only when sampling.
    sampled = [r for r in records if r["temperature"] == 1.0]
    assert all(t["seed"] is not None for r in sampled for t in r["turns"])
    assert all(t["seed"] is None for r in records if r["temperature"] == 0 for t in r["turns"])
    assert len({t["seed"] for r in sampled for t in r["turns"]}) == sum(len(r["turns"]) for r in sampled)

    # Without --resume a second bench into the same folder refuses to mix runs.
    with pytest.raises(BenchError, match="--resume"):
        _fake_bench(tmp_path, [], temperatures=[0.0, 1.0])
    # Resume with nothing left: no generation at all.
    log2 = []
    _fake_bench(tmp_path, log2, temperatures=[0.0, 1.0], resume=True)
    assert log2 == [] and len(read_runs(path)) == 24

    # Crash mid-write: the last line is cut. Resume redoes exactly that run.
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    lost = json.loads(data[last_start:])["key"]
    path.write_bytes(data[: last_start + 40])
    log3 = []
    _fake_bench(tmp_path, log3, temperatures=[0.0, 1.0], resume=True)
    records = read_runs(path)
    assert len(records) == 24 and len({r["key"] for r in records}) == 24 and records[-1]["key"] == lost
    assert len(log3) == len(records[-1]["turns"])
    # Resume with a new temperature runs only the new keys; other settings must match.
    log4 = []
    _fake_bench(tmp_path, log4, temperatures=[0.0, 1.0, 0.5], resume=True)
    assert len(read_runs(path)) == 36 and {x[2] for x in log4} == {0.5}
    with pytest.raises(BenchError, match="tree"):
        _fake_bench(tmp_path, [], temperatures=[0.0], resume=True, tree="cpu")
    with pytest.raises(BenchError, match="standard"):  # same label, other drafter
        run_bench(BenchConfig(benches=["qa"], limit=1, methods=["standard=layers:2"], out=tmp_path / "fake",
                              resume=True, max_new_tokens=4, progress=False), target=FakeTarget(),
                  loader=lambda spec, t: FakeMethod(spec, t, []))
    meta = json.loads((tmp_path / "fake" / "bench.json").read_text())
    assert len(meta["sessions"]) == 4 and "machine" in meta


# ============================================================================ end to end
@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    """A tiny random Llama with the default target's tokenizer (long context: CNN/DM prompts)."""
    return tiny_chat_target(tmp_path_factory.mktemp("tiny-llama"), max_positions=4096)


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_mini_bench(tiny_target_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--target", str(tiny_target_dir), "--dtype", "float64", "--limit", "2", "--method", "vanilla",
            "--method", "standard=layers:1", "--max-new-tokens", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | T |" in printed and "bench took" in printed
    summary = {(s["method"], s["temperature"]): s for s in json.loads((out / "summary.json").read_text())["rows"]}
    std = summary[("standard", 0.0)]
    assert std["t0_outputs_differing_from_vanilla"] == 0 and std["t0_outputs_compared"] == 12
    assert len(std["benchmarks"]) == 6 and std["errors"] == 0
    assert summary[("vanilla", 0.0)]["mean_acceptance_length"] == 1.0
    assert std["mean_acceptance_length"] > 1.0
    assert (out / "step_acceptance.png").stat().st_size > 0
    for name in ("runs.csv", "results.json", "table.md"):
        assert (out / name).exists()
    records = read_runs(out / RUNS_FILE)
    assert len(records) == 24
    assert all(r["turns"] and all(t["new_tokens"] <= 8 for t in r["turns"]) for r in records)
    assert all(len(r["turns"]) == 2 for r in records if r["bench"] == "mt_bench")
    # --resume with everything done: no new runs, same report.
    assert main(argv + ["--resume"]) == 0
    assert len(read_runs(out / RUNS_FILE)) == 24


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_transformers_peers(tiny_target_dir, tmp_path):
    out = tmp_path / "hf"
    argv = ["--target", str(tiny_target_dir), "--dtype", "float64", "--limit", "1", "--bench", "mt_bench",
            "--bench", "qa", "--method", "vanilla", "--method", "hf-assisted=layers:1", "--method", "hf-lookup=3",
            "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--no-warmup"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    agg = {(a["method"], a["bench"]): a for a in results["aggregates"]}
    for m in ("hf-assisted", "hf-lookup"):
        for b in ("mt_bench", "qa"):
            a = agg[(m, b)]
            # No per-round trace: AL = new tokens / target forwards.
            assert a["al_source"] == "hf-forwards" and a["rounds"] > 0
            assert a["acceptance_length"] == pytest.approx(a["new_tokens"] / a["rounds"])
            assert a["drafting_share"] is None and a["step_acceptance"] == []
            assert a["differs_from_vanilla"] == 0  # float64: transformers' greedy == ours
    assert results["runs"][0]["info"]["target_weights_bytes"] > 0
    lookup = [r for r in results["runs"] if r["method"] == "hf-lookup"]
    assert all(r["info"]["prompt_lookup_num_tokens"] == 3 for r in lookup)


def test_llama_cpp_peer_needs_the_llama_cpp_engine(tiny_target_dir):
    from prism_spec.bench.methods import MethodError, load_method
    from prism_spec.targets import load_target

    with pytest.raises(MethodError, match="llama.cpp engine"):
        load_method("llama.cpp", load_target(str(tiny_target_dir), dtype="float64"))
    with pytest.raises(MethodError, match="takes no argument"):
        MethodSpec.parse("llama.cpp=3")


def test_end_to_end_llama_cpp_peer(tmp_path):
    """llama.cpp's own decoding is a method of a bench on the llama.cpp engine, measured in the
    same run; at T=0 prism-spec's vanilla decoding on the engine matches it, and its sampled
    runs are reproducible from the bench seed."""
    require_llama_cpp()
    out = tmp_path / "llama.cpp"
    argv = ["--engine", "llama.cpp", "--threads", "2", "--limit", "1", "--bench", "qa", "--method", "vanilla",
            "--method", "llama.cpp", "--temperature", "0", "--temperature", "1", "--max-new-tokens", "8",
            "--out", str(out), "--no-progress", "--no-warmup"]
    try:
        assert main(argv) == 0
    except RuntimeError as error:  # the default target's wheel is missing
        pytest.skip(str(error))
    results = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["temperature"]): r for r in results["runs"]}
    peer = runs[("llama.cpp", 0.0)]
    assert peer["info"]["gguf"].endswith(".gguf") and peer["turns"][0]["al_source"] == "one-token-steps"
    assert peer["turns"][0]["token_ids"] == runs[("vanilla", 0.0)]["turns"][0]["token_ids"]
    assert json.loads((out / "bench.json").read_text())["settings"]["engine"] == "llama.cpp"
    again = tmp_path / "again"
    assert main(argv[:argv.index("--method")] + ["--method", "llama.cpp", "--temperature", "1", "--max-new-tokens", "8",
                                                 "--out", str(again), "--no-progress", "--no-warmup"]) == 0
    rerun = json.loads((again / "results.json").read_text())["runs"][0]
    assert rerun["turns"][0]["token_ids"] == runs[("llama.cpp", 1.0)]["turns"][0]["token_ids"]


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_feature_drafters(tiny_target_dir, tmp_path):
    """eagle2 / prism / prism* folders load through the bench and stay lossless (untrained weights)."""
    from prism_spec.bench.methods import load_method
    from prism_spec.drafters import FeatureDrafterConfig, FeatureDrafterModel, prism_config, save_feature_drafter
    from prism_spec.targets import load_target

    target = load_target(str(tiny_target_dir), dtype="float64")
    configs = {
        "eagle": FeatureDrafterConfig.for_target(target, architecture="eagle"),
        "prism": prism_config(target, num_modules=2),
        "prism_multi": prism_config(target, num_modules=2, input_layers=[1, 2]),
        "stacked": FeatureDrafterConfig.for_target(target, architecture="stacked", layers_per_module=2),
    }
    dirs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        dirs[name] = save_feature_drafter(FeatureDrafterModel(cfg, target), tmp_path / name)
    with pytest.warns(UserWarning, match="architecture"):
        load_method(f"hass={dirs['prism']}", target)
    with pytest.warns(UserWarning, match="prism\\*"):
        load_method(f"prism={dirs['prism_multi']}", target)
    with pytest.raises(MethodError):
        load_method(f"prism={tmp_path / 'missing'}", target)
    with pytest.warns(UserWarning, match="architecture"):
        load_method(f"hass={dirs['stacked']}", target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_method(f"stacked={dirs['stacked']}", target)  # the stacked kind expects it

    out = tmp_path / "feat"
    argv = ["--target", str(tiny_target_dir), "--dtype", "float64", "--limit", "1", "--bench", "qa", "--bench",
            "mt_bench", "--method", "vanilla", "--method", f"eagle2={dirs['eagle']}", "--method", f"prism={dirs['prism']}",
            "--method", f"prism*={dirs['prism_multi']}", "--max-new-tokens", "6", "--tree", "cpu", "--out", str(out),
            "--no-progress", "--no-warmup"]
    assert main(argv) == 0
    rows = {s["method"]: s for s in json.loads((out / "summary.json").read_text())["rows"]}
    records = read_runs(out / RUNS_FILE)
    for m in ("eagle2", "prism", "prism*"):
        assert rows[m]["t0_outputs_differing_from_vanilla"] == 0 and rows[m]["t0_outputs_compared"] == 2
        # AL from the per-round trace by hand: per benchmark, (rounds + accepted) / rounds.
        per_bench = []
        for bench in ("qa", "mt_bench"):
            turns = [t for r in records if (r["method"], r["bench"]) == (m, bench) for t in r["turns"]]
            rounds = sum(len(t["accepted"]) for t in turns)
            per_bench.append((rounds + sum(sum(t["accepted"]) for t in turns)) / rounds)
        assert rows[m]["mean_acceptance_length"] == pytest.approx(sum(per_bench) / 2)
    runs = json.loads((out / "results.json").read_text())["runs"]
    prism = next(r for r in runs if r["method"] == "prism")
    assert prism["info"]["drafter_config"]["num_modules"] == 2 and prism["info"]["drafter_weights_bytes"] > 0


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_batch_sweep(tiny_target_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = ["batch-sweep", "--target", str(tiny_target_dir), "--dtype", "float64", "--limit", "1", "--method",
            "vanilla", "--method", "standard=layers:1", "--max-new-tokens", "6", "--batch-sizes", "1,4",
            "--out", str(out), "--no-progress", "--bench", "gsm8k", "--bench", "qa", "--bench", "alpaca",
            "--bench", "humaneval"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "batch_sweep.jsonl").read_text().splitlines()]
    assert {(r["method"], r["batch_size"]) for r in records} == {
        ("vanilla", 1), ("vanilla", 4), ("standard", 1), ("standard", 4)}
    by = {(r["method"], r["batch_size"]): r for r in records}
    # 4 prompts: four batches of one, or one batch of four; the same tokens either way.
    assert [t["batch"] for t in by[("standard", 1)]["turns"]] == [1, 1, 1, 1]
    assert [t["batch"] for t in by[("standard", 4)]["turns"]] == [4]
    assert sum(t["new_tokens"] for t in by[("vanilla", 1)]["turns"]) == by[("vanilla", 4)]["turns"][0]["new_tokens"]
    table = (out / "batch_sweep.md").read_text()
    assert "| vanilla |" in table and "B=4 tok/s" in table
    assert (out / "batch_sweep.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_bench_tree_auto_tunes_each_drafter(tiny_target_dir, tmp_path, capsys, monkeypatch):
    from prism_spec.runtime import autotune

    monkeypatch.setenv("PRISM_SPEC_CACHE", str(tmp_path / "cache"))
    # Two calibration prompts, one timed: the bench's wiring is under test here; the tuning
    # itself is tests/runtime/test_autotune.py's.
    monkeypatch.setattr(autotune, "CALIBRATION_PROMPTS", autotune.CALIBRATION_PROMPTS[:2])
    monkeypatch.setattr(autotune, "TIMING_PROMPTS", (0,))
    out = tmp_path / "auto"
    argv = ["--target", str(tiny_target_dir), "--dtype", "float64", "--limit", "1", "--bench", "qa",
            "--method", "vanilla", "--method", "standard=layers:1", "--max-new-tokens", "6", "--tree", "auto",
            "--out", str(out), "--no-progress", "--no-warmup"]
    assert main(argv) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    (spec_run,) = [r for r in runs if r["method"] == "standard"]
    assert spec_run["tree"] is not None and spec_run["tree"] != "auto"  # the tuned shape is recorded
    assert json.loads((out / "bench.json").read_text())["settings"]["tree"] == "auto"
    assert (tmp_path / "cache" / "autotune.json").exists()


class ShortTarget(FakeTarget):
    max_context = 64


def test_trees_that_cannot_fit_the_context_are_refused_before_loading(tmp_path):
    loaded = []

    def loader(spec, target):
        loaded.append(spec.name)
        return FakeMethod(spec, target, [])

    def bench(methods, tree, out):
        cfg = BenchConfig(benches=["qa"], limit=1, methods=methods, tree=tree, out=tmp_path / out, progress=False,
                          warmup=False, max_new_tokens=4)
        return run_bench(cfg, target=ShortTarget(), loader=loader)

    with pytest.raises(BenchError, match=r"^--tree 64/5/8: .*context of 64 positions"):
        bench(["vanilla", "standard=layers:1"], "64/5/8", "big")
    assert loaded == [] and not (tmp_path / "big" / "bench.json").exists()
    # A tree-sweep variant is named by the axis that made it too large.
    base = TreeConfig.parse("16/3/4")
    with pytest.raises(BenchError, match=r"^--totals 100/3/4: "):
        bench(tree_sweep_specs("standard=layers:1", base, totals=[8, 100]), "16/3/4", "sweep")
    assert loaded == []
    # Vanilla and transformers' peers draft no tree: the bench's tree is not theirs to fit.
    bench(["vanilla", "hf-lookup"], "64/5/8", "vanilla")
    assert loaded == ["vanilla", "hf-lookup"]
    with pytest.raises(BenchError, match=r"^--tree 64/5/8: "):
        run_batch_sweep(BenchConfig(benches=["qa"], limit=1, methods=["standard=layers:1"], tree="64/5/8",
                                    out=tmp_path / "batch", progress=False, max_new_tokens=4), [1],
                        target=ShortTarget(), loader=loader)


def test_bench_cuda_graphs_without_a_gpu_fails_before_writing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "bench"
    assert main(["--method", "vanilla", "--cuda-graphs", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()
