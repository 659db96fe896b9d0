"""A campaign's evaluation: acceptance length of each finished level's drafters on the six
benchmarks (decoded with ``prism bench``, or T=0 replayed from greedy continuations), and the
learning curves drawn from them. The state and training side live in the package itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import METHODS, machine_label, read_state, update_state


def level_drafters(state: dict, level: str) -> dict[str, str]:
    """The drafters (paths inside the campaign folder) of a finished level: its archive, or,
    for a campaign state older than the archives, the working copies while it is the last."""
    entry = state["levels"].get(level)
    if entry is None:
        raise ValueError(f"level {level} is not finished (levels done: {sorted(state['levels'], key=int)})")
    if "drafters" in entry:
        return entry["drafters"]
    if int(level) != len(state["levels"]) - 1 or _next_level_started(state):
        raise ValueError(f"level {level}'s drafters were not kept (an older campaign state); "
                         "only the last level can be evaluated, before the next one trains")
    return {m: state["drafters"][m] for m in METHODS}


def level_examples(state: dict, level: str) -> int:
    """Examples each method trained on up to a finished level (older states lack the field)."""
    entry = state["levels"][level]
    return entry.get("examples", entry["steps"] * state["config"]["batch_size"])


def _level_to_evaluate(state: dict, level: int | None) -> tuple[str, dict[str, str]]:
    """(the level, its drafters): ``level``, or the last finished one."""
    if not state["levels"]:
        raise ValueError("no finished level to evaluate yet")
    level = str(len(state["levels"]) - 1 if level is None else level)
    return level, level_drafters(state, level)


def _next_level_started(state: dict) -> bool:
    return any(s["level"] == len(state["levels"]) for s in state["segments"])


def evaluate_level(folder: str | os.PathLike, questions: int = 20, max_new_tokens: int = 128,
                   tree: str = "paper", temperatures: tuple[float, ...] = (0.0,), dtype: str = "float32",
                   device: str = "auto", threads: int | None = None, resume: bool = True,
                   level: int | None = None, vanilla: bool = True) -> dict:
    """Acceptance length of a finished level's drafters (default: the last level) and vanilla
    decoding (for the T=0 identity check) on the six benchmarks with ``prism bench``; stored in
    the level's entry under ``bench[key]`` (each tree and question count has its own, see
    :func:`bench_key`) and in ``bench-L<level>-<key>/`` inside the campaign folder. Every level
    keeps its drafters, so any level can be evaluated later (e.g. all of them on a lent GPU).

    ``vanilla=False`` skips vanilla decoding (a quarter of the runs) for a sampled-only curve
    point: AL without speedups. A T=0 evaluation always decodes vanilla, since checking its
    outputs against vanilla's is what it is for (replay gives T=0 AL cheaply)."""
    from ...bench.cli import main as bench_main

    if not vanilla and 0.0 in temperatures:
        raise ValueError("a T=0 evaluation decodes vanilla too, to check the outputs are identical; "
                         "for T=0 acceptance without it, replay it (--replay)")
    folder = Path(folder)
    state = read_state(folder)
    level, drafters = _level_to_evaluate(state, level)
    out = _bench_folder(folder, level, bench_key(tree, dtype, questions, temperatures=temperatures))
    args = ["--target", state["config"]["target"]] + (["--method", "vanilla"] if vanilla else [])
    for method in METHODS:
        args += ["--method", f"{method}={folder / drafters[method]}"]
    for t in temperatures:
        args += ["--temperature", str(t)]
    args += ["--limit", str(questions), "--max-new-tokens", str(max_new_tokens), "--tree", tree,
             "--dtype", dtype, "--device", device, "--out", str(out)]
    if threads:
        args += ["--threads", str(threads)]
    if resume and (out / "bench.json").exists():
        args.append("--resume")
    code = bench_main(args)
    if code != 0:
        raise RuntimeError(f"prism bench exited with {code}")
    summary = json.loads((out / "summary.json").read_text())
    entry = {
        "settings": {"questions_per_benchmark": questions, "max_new_tokens": max_new_tokens, "tree": tree,
                     "dtype": dtype, "machine": summary.get("machine", {}), "folder": out.name},
        "rows": [{k: row.get(k) for k in ("method", "temperature", "mean_acceptance_length", "mean_speedup",
                                          "t0_outputs_differing_from_vanilla", "t0_outputs_compared", "runs")}
                 for row in summary["rows"]],
    }
    _store_bench(folder, level, entry)
    return entry


def _store_bench(folder: Path, level: str, entry: dict) -> None:
    """Into the state as it is now (a run training the next level may have written it since),
    under the entry's key; entries stored under an older form of their key are renamed."""
    def store(state: dict) -> None:
        benches = state["levels"][level].get("bench", {})
        benches = {entry_key(e): e for e in benches.values()}
        benches[entry_key(entry)] = entry
        state["levels"][level]["bench"] = dict(sorted(benches.items()))

    update_state(folder, store)


def bench_key(tree: str, dtype: str, questions: int, replay: bool = False,
              temperatures: tuple[float, ...] = (0.0,)) -> str:
    """A level's evaluations are kept per tree, question count, AL source (decoded or replayed),
    temperatures (other than T=0 alone) and dtype (other than the float32 of record): a
    20-question run never replaces a 5-question one, nor a T=1 run a T=0 one."""
    temps = sorted({float(t) for t in temperatures})
    return (tree + ("" if dtype == "float32" else f" {dtype}") + (" replay" if replay else "")
            + ("" if temps == [0.0] else " T=" + ",".join(f"{t:g}" for t in temps)) + f" {questions}q")


def entry_key(entry: dict) -> str:
    """The key an evaluation belongs under, from its own settings (and its rows' temperatures)."""
    s = entry["settings"]
    temps = tuple(r["temperature"] for r in entry["rows"]) or (0.0,)
    return bench_key(s["tree"], s["dtype"], s["questions_per_benchmark"], s.get("al_source") == "replay", temps)


def _bench_folder(folder: Path, level: str, key: str) -> Path:
    """Where ``prism bench`` writes a decoded evaluation: ``bench-L<level>-<key>`` with the key's
    separators made path-safe (``paper T=1 2q`` -> ``bench-L2-paper-T1-2q``)."""
    return folder / ("bench-L" + level + "-" + key.replace("/", "-").replace(" ", "-").replace("=", "").replace(",", "-"))


def replay_level(folder: str | os.PathLike, questions: int = 20, max_new_tokens: int = 128, tree: str = "paper",
                 dtype: str = "float32", device: str = "auto", threads: int | None = None,
                 level: int | None = None, temperature: float = 0.0) -> dict:
    """Acceptance of a finished level's drafters replayed from the target's own continuations
    (prism_spec.bench.replay) instead of decoding: greedy ones at T=0, seeded samples at T>0
    (acceptance then has the decode loop's distribution, and every drafter and level is
    measured on the same samples). The same prompts and pooling as ``prism bench``, a fraction
    of its time; the continuations (``replay-continuations-<dtype>[-T<t>].jsonl`` in the
    campaign folder) serve every later level. Stored beside the decoded evaluations as
    ``bench["<tree> replay [T=<t> ]<questions>q"]``."""
    import torch

    from ...bench.datasets import load_benchmarks
    from ...bench.replay import ContinuationStore, replay_benchmarks
    from ...bench.runner import resolve_device
    from ...drafters.checkpoint import load_drafter
    from ...runtime import SamplingConfig, TreeConfig
    from ...targets import load_target

    folder = Path(folder)
    state = read_state(folder)
    level, drafters = _level_to_evaluate(state, level)
    if threads:
        torch.set_num_threads(threads)
    target = load_target(state["config"]["target"], dtype=dtype, device=resolve_device(device))
    shape = TreeConfig.parse(tree)
    sampling = SamplingConfig(temperature=temperature)
    name = f"replay-continuations-{dtype}" + ("" if sampling.greedy else f"-T{temperature:g}") + ".jsonl"
    store = ContinuationStore(folder / name, target, lookahead=16, sampling=sampling, seed=0)
    if shape.max_depth + 1 > store.lookahead:
        raise ValueError(f"tree {tree} is deeper than the stored continuations' lookahead ({store.lookahead})")
    benches = load_benchmarks(limit=questions, max_new_tokens=max_new_tokens)
    results = replay_benchmarks(target, {m: load_drafter(folder / drafters[m], target) for m in METHODS},
                                benches, shape, store)
    entry = {
        "settings": {"questions_per_benchmark": questions, "max_new_tokens": max_new_tokens, "tree": tree,
                     "dtype": dtype, "al_source": "replay", "machine": machine_label()},
        "rows": [{"method": m, "temperature": float(temperature), "mean_acceptance_length": r["mean"],
                  "per_benchmark": r["per_benchmark"],
                  "mean_speedup": None, "t0_outputs_differing_from_vanilla": None, "rounds": r["rounds"]}
                 for m, r in results.items()],
    }
    _store_bench(folder, level, entry)
    return entry


def learning_curves(state: dict) -> list[dict]:
    """One row per evaluated (level, evaluation, method, temperature): the budget (steps and
    examples per method) and the benchmark means, in level order."""
    rows = []
    for level in sorted(state["levels"], key=int):
        entry, examples = state["levels"][level], level_examples(state, level)
        for bench in entry.get("bench", {}).values():
            for row in bench["rows"]:
                if row["method"] not in METHODS:
                    continue
                rows.append({"level": int(level), "steps": entry["steps"], "examples": examples, "evaluation": entry_key(bench),
                             "method": row["method"], "temperature": row["temperature"],
                             "mean_acceptance_length": row["mean_acceptance_length"],
                             "t0_outputs_differing_from_vanilla": row.get("t0_outputs_differing_from_vanilla"),
                             "questions_per_benchmark": bench["settings"]["questions_per_benchmark"]})
    return rows


def heldout_curves(state: dict) -> list[dict]:
    """One row per (level, method, aligned step): held-out top-1 accuracy against the examples
    each method trained on (every finished level has it, evaluated or not)."""
    rows = []
    for level in sorted(state["levels"], key=int):
        entry, examples = state["levels"][level], level_examples(state, level)
        for method in METHODS:
            metrics = entry.get("heldout", {}).get(method, {})
            for step in (1, 2, 3):
                if f"acc_step{step}" in metrics:
                    rows.append({"level": int(level), "examples": examples, "method": method, "step": step,
                                 "accuracy": metrics[f"acc_step{step}"]})
    return rows


def plot_learning_curves(state: dict, out: str | os.PathLike) -> list[dict]:
    """The campaign's learning curves as an image: mean AL over the six benchmarks against the
    examples each method trained on, one panel per evaluation (tree, question count, AL source),
    one line per method and temperature, and a last panel of held-out top-1 accuracy per
    aligned step; returns the AL rows plotted."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("campaign plot needs matplotlib: pip install 'prism-spec[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = learning_curves(state)
    if not rows:
        raise ValueError("no evaluated level yet: run `campaign eval` after a level finishes")
    panels = sorted({r["evaluation"] for r in rows})  # tree, question count, AL source
    ncols = min(3, len(panels) + 1)  # a grid, not one ever wider row, as evaluations are added
    nrows = -(-(len(panels) + 1) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    axes = list(grid.flat)
    for spare in axes[len(panels) + 1:]:
        spare.axis("off")
    styles = {0.0: "-", 1.0: "--"}
    for ax, panel in zip(axes, panels):
        mine = [r for r in rows if r["evaluation"] == panel]
        for colour, method in enumerate(METHODS):  # one colour per method, one line style per T
            for t in sorted({r["temperature"] for r in mine}):
                pts = [(r["examples"], r["mean_acceptance_length"]) for r in mine
                       if r["method"] == method and r["temperature"] == t]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, styles.get(t, ":"), color=f"C{colour}", marker="o", label=f"{method} T={t:g}")
        source = "" if " replay" in panel else " (decoded)"
        _axes(ax, "mean acceptance length (6 benchmarks)", f"{state['config']['target']}: tree {panel}{source}")
    ax = axes[len(panels)]
    held = heldout_curves(state)
    for colour, method in enumerate(METHODS):
        for step, style in ((1, "-"), (2, "--"), (3, ":")):
            pts = [(r["examples"], r["accuracy"]) for r in held if r["method"] == method and r["step"] == step]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=f"C{colour}", marker="o", label=f"{method} step {step}")
    _axes(ax, "held-out top-1 accuracy", f"{state['config']['target']}: held-out split, per aligned step")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return rows


def _axes(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples per method (equal budget)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
