"""``--tree auto``: pick depth / top_k / total_tokens for this hardware and this drafter.

Three measurements, then an argmax:

1. the target's verify latency for n tree nodes on top of a prefix (its curve is flat for
   small n on a GPU and rises on a CPU);
2. the drafter's cost: one ``extend`` per round plus one ``expand`` of ``top_k`` nodes per
   tree level;
3. acceptance statistics: a few greedy generations with a *wide* calibration tree, keeping
   for every round which drafted nodes the target confirmed (node token == target argmax at
   its parent). The same generations give the per-round overhead (tree building, acceptance,
   cache bookkeeping): their wall time minus the time inside the target's forwards and the
   drafter's calls, timed around those calls (the time spent recording the traces excluded).

For each candidate shape we replay every calibration round on the sub-tree that EAGLE-2 would
have built with that shape (children of rank < top_k of the top_k best nodes per level, at
most ``depth + 1`` levels, the best ``total_tokens - 1`` by cumulative score) and count the
tokens it would have committed. Expected tokens/s = mean committed tokens per round /
(verify(n) + draft cost + measured per-round overhead). The shape with the best estimate wins.
Nodes the calibration tree did not verify count as rejected, so estimates for shapes larger
than the calibration tree are pessimistic; the grid stays inside it.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..targets.default import cache_dir
from .decode import GenerationConfig, generate
from .tree import DraftTree, TreeConfig

CALIBRATION_TREE = TreeConfig(depth=6, top_k=6, total_tokens=48)
CALIBRATION_PROMPTS = (
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
    "Summarize the plot of Romeo and Juliet in a short paragraph.",
)
DEPTHS = (0, 1, 2, 3, 4, 5)
TOP_KS = (1, 2, 3, 4, 6)
TOTALS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48)


@dataclass
class RoundTrace:
    parents: list[int]
    depths: list[int]
    scores: list[float]
    correct: list[bool]  # node token == target argmax at its parent (root: True)


@dataclass
class AutotuneReport:
    best: TreeConfig
    expected_tokens_per_s: float
    expected_acceptance_length: float
    verify_ms: dict[int, float]
    extend_ms: float
    expand_ms: dict[int, float]
    overhead_ms: float
    rounds: int
    top: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = asdict(self.best)
        return d


def _timed(fn, repeats: int, device=None) -> float:
    """Median seconds of ``fn()``; on a GPU each sample waits for the queued kernels."""
    def sync():
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_verify_latency(target, ns=TOTALS, prefix_len: int = 300, repeats: int = 5) -> dict[int, float]:
    """Seconds for one target forward over n new tokens (causal) after ``prefix_len``."""
    from ..targets.hf import truncate_cache

    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, target.vocab_size, (prefix_len,), generator=gen).to(target.device)
    cache = target.new_cache()
    target.forward(prefix, torch.arange(prefix_len, device=target.device), cache)
    out = {}
    for n in ns:
        tokens = torch.randint(0, target.vocab_size, (n,), generator=gen).to(target.device)
        positions = torch.arange(prefix_len, prefix_len + n, device=target.device)

        def run():
            target.forward(tokens, positions, cache)
            truncate_cache(cache, prefix_len)

        out[n] = _timed(run, repeats, target.device)
    return out


def measure_draft_cost(target, drafter, top_ks=TOP_KS, repeats: int = 5) -> tuple[float, dict[int, float]]:
    """(seconds of one extend with 3 committed tokens, {k: seconds of one expand of k nodes})."""
    prompt = torch.arange(1, 200, device=target.device) % target.vocab_size
    cache = target.new_cache()
    layers = drafter.feature_layers if isinstance(drafter.feature_layers, tuple) else None
    out = target.forward(prompt, torch.arange(prompt.numel(), device=target.device), cache, feature_layers=layers)
    feats = None if drafter.feature_layers is None else (out.layer_features if layers else out.features)
    drafter.begin(prompt[:-3], int(prompt[-3]), None if feats is None else feats[:-3])
    tokens3 = prompt[-2:].clone()

    def extend():
        drafter.extend(tokens3, None if feats is None else feats[-3:-1])
        drafter.end_round()

    extend_s = _timed(extend, repeats, target.device)
    expand = {}
    for k in top_ks:
        tokens = prompt[:k].clone()
        parents = torch.full((k,), -1, dtype=torch.long, device=target.device)
        mask = torch.eye(k, dtype=torch.bool, device=target.device)

        def run():
            drafter.expand(tokens, parents, mask, 1)
            drafter.end_round()

        expand[k] = _timed(run, repeats, target.device)
    return extend_s, expand


@contextmanager
def timed_calls(obj, names: Sequence[str], total: list[float], when=None):
    """Add the wall time of ``obj.<name>(...)`` calls to ``total[0]`` while the block runs
    (only calls for which ``when(*args, **kwargs)`` is true, if given). No device sync: on a
    GPU, time only code that synchronises by itself."""
    for name in names:
        original = getattr(obj, name)

        def timed(*args, _original=original, **kwargs):
            if when is not None and not when(*args, **kwargs):
                return _original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start

        setattr(obj, name, timed)
    try:
        yield
    finally:
        for name in names:
            delattr(obj, name)  # back to the class's method


def collect_traces(target, drafter, prompts=CALIBRATION_PROMPTS, max_new_tokens: int = 96,
                   tree: TreeConfig = CALIBRATION_TREE) -> tuple[list[RoundTrace], float]:
    """Greedy generations with a wide tree; returns per-round traces and the mean time per
    round spent outside the target's and the drafter's forwards (tree building, acceptance,
    cache bookkeeping), measured directly. Recording the traces is not counted: normal
    decoding does not pay it."""
    traces: list[RoundTrace] = []
    outside_models = [0.0]  # recording + target forwards + drafter calls, subtracted below

    def record(t: DraftTree, logits: torch.Tensor):
        start = time.perf_counter()
        argmax = logits.argmax(-1)
        correct = (t.tokens == argmax[t.parents.clamp(min=0)]).tolist()
        correct[0] = True
        traces.append(RoundTrace(t.parents.tolist(), t.depths.tolist(), t.scores.tolist(), correct))
        outside_models[0] += time.perf_counter() - start

    overheads = []
    for prompt in prompts:
        ids = target.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        outside_models[0] = 0.0
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, tree=tree, on_round=record)
        with timed_calls(target, ["forward_batch"], outside_models), \
                timed_calls(drafter, ["extend_batch", "expand_batch"], outside_models):
            res = generate(target, ids, drafter, cfg)
        if res.rounds:
            # The prefill's target forward and the drafter's first extend fall outside the rounds.
            overheads.append(max(0.0, res.total_s - outside_models[0]) / res.rounds)
    return traces, statistics.mean(overheads) if overheads else 0.0


def simulate(trace: RoundTrace, depth: int, top_k: int, totals=TOTALS) -> dict[int, int]:
    """Tokens committed (accepted + bonus) in this round for each total_tokens, had EAGLE-2
    built the tree with (depth, top_k)."""
    n = len(trace.parents)
    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        kids[trace.parents[i]].append(i)
    for k in kids:
        k.sort(key=lambda i: -trace.scores[i])
    # Levels: the root's top_k children; then the children (rank < top_k) of the level's
    # top_k nodes by score. All children stay candidates, as in the builder.
    candidates: list[int] = []
    frontier = [0]
    for level in range(depth + 1):
        children = [c for p in frontier for c in kids[p][:top_k]]
        candidates.extend(children)
        frontier = sorted(children, key=lambda i: -trace.scores[i])[:top_k]
        if not frontier:
            break
    order = sorted(candidates, key=lambda i: (-trace.scores[i], trace.depths[i]))
    committed = {}
    chosen: set[int] = {0}
    good_depth = {0: 0}  # node -> depth, for nodes on an all-correct path
    best = 0
    taken = 0
    for total in sorted(totals):
        while taken < min(total - 1, len(order)):
            node = order[taken]
            taken += 1
            if trace.parents[node] in chosen:  # ancestor-closed (guards against score ties)
                chosen.add(node)
                if trace.correct[node] and trace.parents[node] in good_depth:
                    good_depth[node] = trace.depths[node]
                    best = max(best, trace.depths[node])
        committed[total] = best + 1
    return committed


def choose_tree(traces, verify_s, extend_s, expand_s, overhead_s, depths=DEPTHS, top_ks=TOP_KS, totals=TOTALS):
    results = []
    for depth in depths:
        for k in top_ks:
            sims = [simulate(t, depth, k, totals) for t in traces]
            for total in totals:
                if total - 1 > k + depth * k * k:  # more nodes than the shape can propose
                    continue
                al = statistics.mean(s[total] for s in sims) if sims else 1.0
                cost = verify_s[total] + extend_s + depth * expand_s[k] + overhead_s
                results.append({"depth": depth, "top_k": k, "total_tokens": total, "al": al,
                                "tokens_per_s": al / cost, "round_ms": cost * 1e3})
    results.sort(key=lambda r: -r["tokens_per_s"])
    return results


def autotune_tree(target, drafter, prompts=CALIBRATION_PROMPTS, max_new_tokens: int = 96, progress=print) -> AutotuneReport:
    progress("[autotune] timing the target's verify forward ...")
    verify_s = measure_verify_latency(target)
    progress("[autotune] timing the drafter ...")
    extend_s, expand_s = measure_draft_cost(target, drafter)
    progress(f"[autotune] calibration generations ({len(prompts)} prompts, tree {CALIBRATION_TREE}) ...")
    # Tree building, acceptance and cache bookkeeping per round, measured around the model calls.
    traces, overhead_s = collect_traces(target, drafter, prompts, max_new_tokens)
    ranked = choose_tree(traces, verify_s, extend_s, expand_s, overhead_s)
    best = ranked[0]
    return AutotuneReport(
        best=TreeConfig(best["depth"], best["top_k"], best["total_tokens"]),
        expected_tokens_per_s=best["tokens_per_s"],
        expected_acceptance_length=best["al"],
        verify_ms={n: s * 1e3 for n, s in verify_s.items()},
        extend_ms=extend_s * 1e3,
        expand_ms={k: s * 1e3 for k, s in expand_s.items()},
        overhead_ms=overhead_s * 1e3,
        rounds=len(traces),
        top=ranked[:10],
    )


def drafter_fingerprint(drafter) -> str:
    """A short hash of the drafter's weights (the state dict of its ``model``, or of its
    small LM's for the standard drafter), so a drafter retrained into the same folder, or a
    new packaged drafter, is tuned again instead of reusing the tree cached under its name.
    "-" for drafters without one."""
    model = getattr(drafter, "model", None)
    if not isinstance(model, torch.nn.Module):
        model = getattr(getattr(drafter, "lm", None), "model", None)
    if not isinstance(model, torch.nn.Module):
        return "-"
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def _cache_key(target, drafter, drafter_label: str) -> str:
    # Prepacked CPU weights change every cost the tuner measured: a separate entry.
    packed = "packed" if getattr(target, "packed_weights", False) else "plain"
    return "|".join([str(target.name), drafter_label, drafter_fingerprint(drafter), str(target.dtype),
                     str(target.device), str(torch.get_num_threads()), packed])


def resolve_tree(spec: str, target, drafter, drafter_label: str = "", progress=print, use_cache: bool = True) -> TreeConfig:
    """``TreeConfig.parse(spec)``, or for ``auto`` the autotuned shape (cached on disk per
    target, drafter and its weights, dtype, device, thread count and weight packing)."""
    if spec != "auto":
        return TreeConfig.parse(spec)
    if drafter is None:
        return TreeConfig.parse("cpu")  # vanilla: the tree is unused
    path = Path(cache_dir()) / "autotune.json"
    key = _cache_key(target, drafter, drafter_label or type(drafter).__name__)
    table = {}
    if use_cache and path.exists():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            table = {}
        if key in table:
            return TreeConfig(**table[key]["best"])
    report = autotune_tree(target, drafter, progress=progress)
    progress(f"[autotune] chose {report.best} (expected AL {report.expected_acceptance_length:.2f}, "
             f"{report.expected_tokens_per_s:.1f} tokens/s)")
    table[key] = report.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return report.best
