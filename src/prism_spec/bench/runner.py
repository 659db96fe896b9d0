"""Run benchmark x method x temperature and append every run to ``runs.jsonl``.

Methods are interleaved per prompt: for each prompt, every method runs once, in an order
rotated by one position per prompt, so slow drift of the machine (thermal throttling, other
load) spreads evenly over the methods instead of landing on whichever ran last. At T > 0 each
(prompt, method, temperature, turn) gets its own fixed seed derived from ``--seed``, so a
rerun or a resumed bench draws the same samples.

Each run is one JSON line, appended and flushed as soon as it ends; ``--resume`` reads the
file back (dropping a truncated last line left by a crash), skips the keys already there and
continues. ``bench.json`` next to it records the settings (a resumed bench must use the same
ones) and the machine.
"""

from __future__ import annotations

import dataclasses

import datetime as _dt
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..drafters.resolve import apply_drafter_weights, wants_int8_weights
from ..options import TreeTooLargeError, check_tree_fits
from ..runtime.decode import PromptError
from ..runtime.tree import TreeConfig
from ..targets.default import DEFAULT_TARGET
from ..targets.hf import Target, resolve_engine
from ..targets.loader import load_target
from .datasets import BENCHMARKS, Benchmark, conversation_prompt, load_benchmarks
from .machine import machine_info
from .methods import LoadedMethod, MethodSpec, load_method, parse_methods
from .runs import META_FILE, RUNS_FILE, BenchError, append_run, read_runs, temperature_tag


@dataclass
class BenchConfig:
    target: str = DEFAULT_TARGET
    engine: str = "auto"  # targets.hf.resolve_engine: llama.cpp for .gguf targets
    dtype: str = "float32"
    device: str = "auto"
    benches: Sequence[str] = BENCHMARKS
    limit: int | None = None
    methods: Sequence[str | MethodSpec] = ("vanilla",)
    temperatures: Sequence[float] = (0.0,)
    tree: str = "paper"
    max_new_tokens: dict[str, int] | int | None = None  # see datasets.parse_max_new_tokens
    out: Path = Path("runs/bench")
    resume: bool = False
    seed: int = 0
    progress: bool = True
    warmup: bool = True
    command: str | None = None
    threads: int | None = None  # torch.set_num_threads before loading anything
    static_cache: bool = False  # DecodeOptions.static_cache for every method
    packed_weights: bool = True  # load_target's default CPU weight prepacking (False: plain nn.Linear)
    row_invariant: bool = False  # Target.make_row_invariant(): bit-identical verification
    drafter_weights: str = "auto"  # --drafter-weights: int8 feature drafters (auto: on the llama.cpp engine)
    compile: bool = False  # Target.compile_decoder() before the runs
    cuda_graphs: bool = False  # Target.use_cuda_graphs() before the runs
    extra_settings: dict = field(default_factory=dict)  # recorded in bench.json (sweeps)


# ----------------------------------------------------------------------------- keys, seeds
def run_key(bench: str, question_id, method: str, temperature: float) -> str:
    return f"{bench}|{question_id}|{method}|{temperature_tag(temperature)}"


def run_seed(base: int, bench: str, question_id, method: str, temperature: float, turn: int) -> int:
    """A fixed seed per (prompt, method, temperature, turn), stable across processes."""
    text = f"{base}|{bench}|{question_id}|{method}|{temperature_tag(temperature)}|{turn}"
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def rotated(items: Sequence, shift: int) -> list:
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def tree_tag(tree: TreeConfig) -> str:
    return f"{tree.total_tokens}/{tree.depth}/{tree.top_k}"


# ----------------------------------------------------------------------------- machine
def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------- the bench
def _settings(cfg: BenchConfig, benches: list[Benchmark], tree: TreeConfig) -> dict:
    engine = resolve_engine(cfg.target, cfg.engine)
    return {
        "target": cfg.target,
        **({"engine": engine} if engine != "torch" else {}),
        "dtype": cfg.dtype,
        "tree": tree_tag(tree),
        "seed": cfg.seed,
        "max_new_tokens": {b.name: b.max_new_tokens for b in benches},
        **({"static_cache": True} if cfg.static_cache else {}),
        **({"compile": True} if cfg.compile else {}),
        **({"cuda_graphs": True} if cfg.cuda_graphs else {}),
        **({} if cfg.packed_weights else {"packed_weights": False}),
        **({"row_invariant": True} if cfg.row_invariant else {}),
        **({"drafter_weights": "int8"} if wants_int8_weights(engine, cfg.drafter_weights) else {}),
        **cfg.extra_settings,
    }


def _check_resume(meta: dict, settings: dict) -> None:
    old = meta.get("settings") or {}
    problems = []
    for key, value in settings.items():
        if key not in old:
            continue
        if key == "max_new_tokens":
            for b, n in value.items():
                if b in old[key] and old[key][b] != n:
                    problems.append(f"max_new_tokens[{b}] was {old[key][b]}, now {n}")
        elif old[key] != value:
            problems.append(f"{key} was {old[key]!r}, now {value!r}")
    if problems:
        raise BenchError("cannot resume with other settings: " + "; ".join(problems) + " (use another --out)")


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def run_one(
    method: LoadedMethod, bench: Benchmark, question, temperature: float, seed: int, tree: TreeConfig
) -> dict:
    """Every turn of one question with one method; answers feed the next turn's prompt."""
    target = method.target
    cuda = target.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(target.device)
        torch.cuda.reset_peak_memory_stats(target.device)
    turns, answers, error = [], [], None
    try:
        for i in range(len(question.turns)):
            prompt = conversation_prompt(target, question.turns[: i + 1], answers)
            s = run_seed(seed, bench.name, question.question_id, method.name, temperature, i)
            trace = method.run_turn(prompt, bench.max_new_tokens, temperature, s, tree)
            trace["seed"] = s if temperature > 0 else None
            turns.append(trace)
            answers.append((trace.get("text") or "").strip())
    except PromptError as e:
        error = f"PromptError: {e}"
    cuda_peak = int(torch.cuda.max_memory_allocated(target.device)) if cuda else None
    kv = max((t["kv_peak_bytes"] for t in turns), default=0)
    spec = method.spec
    uses_tree = not spec.is_vanilla and not spec.is_peer
    return {
        "key": run_key(bench.name, question.question_id, method.name, temperature),
        "bench": bench.name,
        "question_id": question.question_id,
        "category": question.category,
        "method": method.name,
        "kind": spec.kind,
        "spec": spec.spec_string(),
        "temperature": float(temperature),
        "tree": tree_tag(spec.tree or tree) if uses_tree else None,
        "max_new_tokens": bench.max_new_tokens,
        "turns": [] if error else turns,
        "weights_bytes": method.weights_bytes,
        "kv_peak_bytes": kv,
        "cuda_peak_bytes": cuda_peak,
        "peak_memory_bytes": cuda_peak if cuda else method.weights_bytes + kv,
        "peak_memory_source": "cuda.max_memory_allocated" if cuda else "weights+kv",
        "info": method.info,
        "error": error,
    }


def _warmup(methods: list[LoadedMethod], bench: Benchmark, tree: TreeConfig) -> None:
    """One short untimed generation per method: first-call costs (allocator, kernel selection,
    lazy imports) do not land on the first measured prompt."""
    target = methods[0].target
    prompt = conversation_prompt(target, bench.questions[0].turns[:1], [])
    for m in methods:
        try:
            m.run_turn(prompt, min(16, bench.max_new_tokens), 0.0, 0, tree)
        except PromptError:
            pass


def run_bench(
    cfg: BenchConfig,
    target: Target | None = None,
    loader: Callable[[MethodSpec, Target], LoadedMethod] = load_method,
) -> Path:
    """Run (or continue) a bench; returns the runs file path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, meta_path = out / RUNS_FILE, out / META_FILE
    benches = load_benchmarks(cfg.benches, cfg.limit, cfg.max_new_tokens)
    specs = parse_methods(cfg.methods)
    if not specs:
        raise BenchError("no methods given")
    temperatures = [float(t) for t in cfg.temperatures]
    if len(set(temperatures)) != len(temperatures) or any(t < 0 for t in temperatures):
        raise BenchError(f"temperatures must be distinct and >= 0, got {temperatures}")
    auto_tree = cfg.tree == "auto"  # tuned per drafter once the methods are loaded
    tree = TreeConfig.parse("cpu" if auto_tree else cfg.tree) if isinstance(cfg.tree, str) else cfg.tree
    settings = _settings(cfg, benches, tree)
    if auto_tree:
        settings["tree"] = "auto"

    existing = runs_path.exists() and runs_path.stat().st_size > 0
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if existing and not cfg.resume:
        raise BenchError(f"{runs_path} already holds runs: pass --resume to continue it, or choose another --out")
    done: set[str] = set()
    if cfg.resume:
        _check_resume(meta, settings)
        previous = read_runs(runs_path, repair=True)
        done = {r["key"] for r in previous}
        old_specs = {r["method"]: r.get("spec") for r in previous}
        for spec in specs:
            if old_specs.get(spec.name, spec.spec_string()) != spec.spec_string():
                raise BenchError(
                    f"method {spec.name!r} was {old_specs[spec.name]!r} in this bench, now {spec.spec_string()!r}: "
                    "give it another label or use another --out"
                )

    jobs = []  # (bench, question, temperature, method spec, position in the rotation)
    prompt_index = 0
    for bench in benches:
        for question in bench.questions:
            for temperature in temperatures:
                for pos, spec in enumerate(rotated(specs, prompt_index)):
                    if run_key(bench.name, question.question_id, spec.name, temperature) not in done:
                        jobs.append((bench, question, temperature, spec, pos))
            prompt_index += 1

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    session = {
        "command": cfg.command or " ".join(sys.argv),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "methods": [s.spec_string() for s in specs],
        "benches": [b.name for b in benches],
        "temperatures": temperatures,
        "limit": cfg.limit,
        "runs_skipped_as_done": len(done),
        "runs_planned": len(jobs),
    }
    meta = {
        "settings": {**meta.get("settings", {}), **settings,
                     "max_new_tokens": {**meta.get("settings", {}).get("max_new_tokens", {}),
                                        **settings["max_new_tokens"]}},
        "machine": session["machine"],
        "sessions": meta.get("sessions", []) + [session],
    }
    if not jobs:
        _write_meta(meta_path, meta)
        runs_path.touch()
        return runs_path

    if target is None:
        target = load_target(cfg.target, dtype=cfg.dtype, device=device, engine=cfg.engine, threads=cfg.threads,
                             pack_weights=None if cfg.packed_weights else False, row_invariant=cfg.row_invariant)
        if cfg.compile:
            target.compile_decoder()
        if cfg.cuda_graphs:
            target.use_cuda_graphs()
    if target.tokenizer is None:
        raise BenchError("benchmarks need a target with a tokenizer (prompts are chat-rendered text)")
    needed = {spec.name for *_, spec, _ in jobs}
    _check_trees_fit(target, [s for s in specs if s.name in needed], None if auto_tree else tree)
    loaded = {spec.name: loader(spec, target) for spec in specs if spec.name in needed}
    for method in loaded.values():
        method.static_cache = cfg.static_cache
        if getattr(method, "drafter", None) is not None and not method.spec.is_peer:
            method.info["int8_weights"] = apply_drafter_weights(method.drafter, target, cfg.drafter_weights,
                                                                method.spec.spec_string(), strict=False)
        if auto_tree and method.drafter is not None and method.spec.tree is None and not method.spec.is_peer:
            from ..runtime.autotune import resolve_tree

            say = print if cfg.progress else (lambda *_: None)
            chosen = resolve_tree("auto", target, method.drafter, method.spec.spec_string(), progress=say,
                                  static_cache=cfg.static_cache)
            method.spec = dataclasses.replace(method.spec, tree=chosen)
    # Written once everything loaded: a bad drafter path leaves no half-started bench behind.
    _write_meta(meta_path, meta)
    runs_path.touch()
    if cfg.warmup:
        _warmup(list(loaded.values()), benches[0], tree)

    progress = _progress(len(jobs), cfg.progress)
    try:
        with open(runs_path, "a", encoding="utf-8") as f:
            for bench, question, temperature, spec, pos in jobs:
                progress.set_postfix_str(f"{bench.name} #{question.question_id} {spec.name} {temperature_tag(temperature)}")
                record = run_one(loaded[spec.name], bench, question, temperature, cfg.seed, tree)
                record["order"] = pos
                record["time"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
                append_run(f, record)
                progress.update(1)
    finally:
        progress.close()
        meta["sessions"][-1]["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        _write_meta(meta_path, meta)
    return runs_path


def _check_trees_fit(target: Target, specs: Sequence[MethodSpec], tree: TreeConfig | None) -> None:
    """Refuse, before any drafter loads, a tree that cannot fit in the target's context beside a
    prompt (``tree``: the bench's --tree, None when auto-tuned; a method's own tree overrides it).
    Vanilla and transformers' peers draft no tree and are not checked."""
    max_context = getattr(target, "max_context", None)
    if max_context is None:
        return
    for spec in specs:
        if spec.is_vanilla or spec.is_peer:
            continue
        shape = spec.tree or tree
        if shape is None:
            continue
        swept = dict(spec.extra).get("tree_sweep_axes", ())
        flag = "--totals" if spec.tree is not None and "total_tokens" in swept else "--tree"
        try:
            check_tree_fits(shape, max_context, flag)
        except TreeTooLargeError as exc:
            raise BenchError(str(exc)) from None


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prism bench", unit="run", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------- sweeps
def tree_sweep_specs(
    spec: MethodSpec | str,
    base: TreeConfig,
    depths: Iterable[int] = (),
    top_ks: Iterable[int] = (),
    totals: Iterable[int] = (),
) -> list[MethodSpec]:
    """One drafter, one tree shape per variant: each axis varied alone around ``base``
    (paper Fig. 8). Labels are ``NAME@TOTAL/DEPTH/TOPK``; ``extra`` records the axis."""
    spec = MethodSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.is_vanilla or spec.is_peer:
        raise BenchError("a tree sweep needs a drafter method (standard, eagle2, hass, prism, prism*)")
    shapes: dict[TreeConfig, set[str]] = {base: {"base"}}
    for d in depths:
        shapes.setdefault(TreeConfig(d, base.top_k, base.total_tokens), set()).add("depth")
    for k in top_ks:
        shapes.setdefault(TreeConfig(base.depth, k, base.total_tokens), set()).add("top_k")
    for n in totals:
        shapes.setdefault(TreeConfig(base.depth, base.top_k, n), set()).add("total_tokens")
    out = []
    for shape, axes in shapes.items():
        extra = (("tree_sweep_axes", sorted(axes)), ("tree_depth", shape.depth), ("tree_top_k", shape.top_k),
                 ("tree_total_tokens", shape.total_tokens))
        out.append(MethodSpec(spec.kind, spec.arg, f"{spec.name}@{tree_tag(shape)}", shape, extra))
    return out


def parse_scaling_drafters(items: Sequence[str], default_kind: str = "prism") -> list[MethodSpec]:
    """``[KIND:]FRACTION=PATH`` items (paper Fig. 4): one drafter per training-data fraction."""
    out = []
    for item in items:
        head, sep, path = item.partition("=")
        if not sep or not path:
            raise BenchError(f"bad --drafter {item!r}: use [KIND:]FRACTION=PATH, e.g. prism:25=runs/p25")
        kind, _, frac = head.rpartition(":")
        kind = kind or default_kind
        try:
            fraction = float(frac)
        except ValueError:
            raise BenchError(f"bad data fraction in --drafter {item!r}") from None
        label = f"{kind}@{fraction:g}"
        out.append(MethodSpec(kind, path, label, None, (("data_fraction", fraction),)))
    return out


def run_batch_sweep(
    cfg: BenchConfig,
    batch_sizes: Sequence[int],
    target: Target | None = None,
    loader: Callable[[MethodSpec, Target], LoadedMethod] = load_method,
) -> Path:
    """Tokens/s of each method at each batch size (paper Fig. 7), greedy.

    The first turn of every benchmark question is decoded in batches of B (the same batches
    for every method; methods interleaved per batch). One record per (method, B) holds one
    turn trace per batch whose ``total_s`` is the batch's wall time, so tokens/s is what the
    batch delivered. Writes ``batch_sweep.jsonl``, ``batch_sweep.md`` and ``batch_sweep.png``.
    """
    from ..runtime.decode import DecodeOptions, GenerationConfig, generate_batch
    from .figures import plot_batch_sweep

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise BenchError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    specs = parse_methods(cfg.methods)
    if any(spec.is_peer for spec in specs):
        raise BenchError("the batch sweep runs this runtime's methods; drop the peers (hf-*, llama.cpp)")
    benches = load_benchmarks(cfg.benches, cfg.limit, cfg.max_new_tokens)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if target is None:
        target = load_target(cfg.target, dtype=cfg.dtype, device=device, engine=cfg.engine, threads=cfg.threads,
                             pack_weights=None if cfg.packed_weights else False)
    jobs = [(conversation_prompt(target, q.turns[:1], []), b.max_new_tokens) for b in benches for q in b.questions]
    if not jobs:
        raise BenchError("no prompts: check --bench and --limit")
    if cfg.tree == "auto":
        raise BenchError("the batch-size sweep needs a fixed --tree (auto tunes batch-1 decoding)")
    tree = TreeConfig.parse(cfg.tree) if isinstance(cfg.tree, str) else cfg.tree
    _check_trees_fit(target, specs, tree)
    loaded = {spec.name: loader(spec, target) for spec in specs}
    turns: dict[tuple[str, int], list[dict]] = {(s.name, b): [] for s in specs for b in batch_sizes}
    total = sum(len(range(0, len(jobs), b)) for b in batch_sizes) * len(specs)
    progress = _progress(total, cfg.progress)
    try:
        for size in batch_sizes:
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                for spec in rotated(specs, start // size):
                    method = loaded[spec.name]
                    configs = [GenerationConfig(max_new_tokens=n) for _, n in chunk]
                    t0 = time.perf_counter()
                    results = generate_batch(target, [ids for ids, _ in chunk], method.drafter, configs,
                                             DecodeOptions(spec.tree or tree))
                    wall = time.perf_counter() - t0
                    turns[(spec.name, size)].append({
                        "batch": len(chunk),
                        "new_tokens": sum(len(r.token_ids) for r in results),
                        "accepted": [a for r in results for a in r.accepted],
                        "exhausted": [e for r in results for e in r.exhausted],
                        "rounds": sum(r.rounds for r in results),
                        "accepted_total": sum(sum(r.accepted) for r in results),
                        "draft_s": max(r.draft_s for r in results),
                        "total_s": wall,
                    })
                    progress.update(1)
    finally:
        progress.close()
    records = [{"method": name, "batch_size": size, "bench": "all", "turns": t} for (name, size), t in turns.items()]
    with open(out / "batch_sweep.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out / "batch_sweep.md").write_text(batch_sweep_table(records, cfg, device))
    plot_batch_sweep(records, out / "batch_sweep.png")
    return out / "batch_sweep.jsonl"


def batch_sweep_table(records: list[dict], cfg: BenchConfig, device) -> str:
    from . import metrics as M

    sizes = sorted({r["batch_size"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    tps = {(r["method"], r["batch_size"]): M.tokens_per_second(r["turns"]) for r in records}
    al = {(r["method"], r["batch_size"]): M.acceptance_length(r["turns"]) for r in records}
    vanilla = next((m for m in methods if m == "vanilla"), None)
    lines = [
        f"Batch-size sweep, {cfg.target}, greedy, tree {cfg.tree}, {machine_info(device).get('cpu', '')}, "
        f"{_dt.date.today()}",
        "",
        "| method | " + " | ".join(f"B={b} tok/s | AL | x" for b in sizes) + " |",
        "|---|" + "---|---|---|" * len(sizes),
    ]
    for m in methods:
        cells = []
        for b in sizes:
            speed = tps[(m, b)] or 0.0
            ratio = speed / tps[(vanilla, b)] if vanilla and tps.get((vanilla, b)) else None
            cells += [f"{speed:.1f}", f"{al[(m, b)]:.2f}" if al[(m, b)] else "N/A",
                      f"{ratio:.2f}x" if ratio else "N/A"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
