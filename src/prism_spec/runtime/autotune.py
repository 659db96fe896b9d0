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
(verify(n) + draft cost + measured per-round overhead). Nodes the calibration tree did not
verify count as rejected, so estimates for shapes larger than the calibration tree are
pessimistic; the grid stays inside it.

That cost model ranks the grid; the final pick times real rounds. The model's parts are
measured apart from each other, and inside a round they cost differently: a drafter step
right after the target's forward finds its weights evicted from the CPU caches, and tree
building and acceptance scale with the shape while the overhead above is one number for the
wide calibration tree. On a 2-core CPU the model preferred one-drafter-step trees that ran
6-8 % slower than a 4-node tree without drafter steps, interleaved in one process
(``benchmarks/tree_ab.py``, docs/performance.md). So the best few shapes of the ranking (and
the best of each depth) decode a few calibration prompts, interleaved with vanilla decoding,
and their measured time per round replaces the modelled one; every other shape's modelled
time is corrected by the mean error of the timed shapes of its depth. Expected tokens/s =
replayed acceptance length / that round time; the vanilla rounds give the expected speedup.
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

from ..devices import median_seconds
from ..targets.default import cache_dir
from .decode import DecodeOptions, GenerationConfig, generate
from .tree import DraftTree, TreeConfig
from .verify import argmax_rows

CALIBRATION_TREE = TreeConfig(depth=6, top_k=6, total_tokens=48)
# A long document to summarise: long contexts make verification dearer and drafts less
# predictable, and a calibration of short chat prompts alone picked trees too deep for them.
_REPORT = (
    "The town council of Millbrook met on Tuesday evening to discuss the future of the old "
    "railway depot, a brick building that has stood empty since the freight line closed in 1998. "
    "Three proposals were presented. The first, from a local arts group, would turn the depot into "
    "studios and a small gallery, funded by a mix of grants and rent from the artists. The second, "
    "from a regional supermarket chain, would demolish the building and put up a store with a car "
    "park of about two hundred spaces; the company said it would create sixty jobs. The third, "
    "prepared by the council's own planning office, would keep the outer walls, add a glass roof and "
    "use the space as a covered market on weekends and a community hall during the week. Residents "
    "who spoke at the meeting were divided. Several shop owners on Main Street warned that a large "
    "supermarket would draw customers away from the centre, while others argued that the town needs "
    "the jobs and that the depot is too damaged to save. An engineer hired by the council reported "
    "that the roof must be replaced within two years whatever happens, at a cost of around four "
    "hundred thousand pounds, but that the walls and foundations are sound. The council's finance "
    "officer noted that the planning office's proposal is the most expensive up front but could pay "
    "for itself within twelve years from market fees and hall bookings. No decision was taken. The "
    "council will hold a public consultation over the next six weeks and vote in March."
)
CALIBRATION_PROMPTS = (  # the kinds of requests the benchmarks cover, none of their questions
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
    "Summarize the plot of Romeo and Juliet in a short paragraph.",
    "Summarize the following article in three sentences.\n\n" + _REPORT,
    "Who wrote the novel Pride and Prejudice, and when was it first published?",
    "Give three tips for staying focused while studying at home.",
    "What does this SQL query return? SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
)
# Calibration prompts whose rounds are timed for the shortlisted shapes: a short explanation,
# code, and the long article.
TIMING_PROMPTS = (0, 1, 4)
# Bumped when the tuning method changes what it picks, so cached picks are tuned again.
AUTOTUNE_METHOD = 3
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
    vanilla_tokens_per_s: float  # vanilla decoding's rounds, timed beside the candidates'
    verify_ms: dict[int, float]
    extend_ms: float
    expand_ms: dict[int, float]
    overhead_ms: float
    rounds: int
    top: list[dict] = field(default_factory=list)  # the best shapes after timing ("timed": measured)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = asdict(self.best)
        return d


def measure_verify_latency(target, ns=TOTALS, prefix_len: int = 300, repeats: int = 5) -> dict[int, float]:
    """Seconds for one target forward over n new tokens (causal) after ``prefix_len``."""
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, target.vocab_size, (prefix_len,), generator=gen).to(target.device)
    kv = target.new_kv(1)  # the engine's own cache (transformers or llama.cpp)
    target.forward(prefix[None], torch.arange(prefix_len, device=target.device)[None], kv.cache, None, kv.lengths)
    kv.commit([torch.arange(prefix_len, device=target.device)])
    out = {}
    for n in ns:
        tokens = torch.randint(0, target.vocab_size, (n,), generator=gen).to(target.device)
        positions = torch.arange(prefix_len, prefix_len + n, device=target.device)

        def run():
            target.forward(tokens[None], positions[None], kv.cache, None, kv.lengths)
            kv.rollback()

        out[n] = median_seconds(run, repeats, target.device)
    return out


def measure_draft_cost(target, drafter, top_ks=TOP_KS, repeats: int = 5) -> tuple[float, dict[int, float]]:
    """(seconds of one extend with 3 committed tokens, {k: seconds of one expand of k nodes})."""
    prompt = torch.arange(1, 200, device=target.device) % target.vocab_size
    kv = target.new_kv(1)
    layers = drafter.feature_layers if isinstance(drafter.feature_layers, tuple) else None
    out = target.forward(prompt[None], torch.arange(prompt.numel(), device=target.device)[None], kv.cache, None,
                               kv.lengths, feature_layers=layers)
    feats = None if drafter.feature_layers is None else (out.layer_features if layers else out.features)[0]
    drafter.begin([prompt[:-3]], [int(prompt[-3])], [None if feats is None else feats[:-3]])
    tokens3 = prompt[-2:].clone()

    def extend():
        drafter.extend([tokens3], [None if feats is None else feats[-3:-1]])
        drafter.end_round()

    extend_s = median_seconds(extend, repeats, target.device)
    expand = {}
    for k in top_ks:
        tokens = prompt[None, :k].clone()
        parents = torch.full((1, k), -1, dtype=torch.long, device=target.device)
        mask = torch.eye(k, dtype=torch.bool, device=target.device)[None]

        def run():
            drafter.expand(tokens, parents, mask, 1)
            drafter.end_round()

        expand[k] = median_seconds(run, repeats, target.device)
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
        argmax = argmax_rows(logits)
        correct = (t.tokens == argmax[t.parents.clamp(min=0)]).tolist()
        correct[0] = True
        traces.append(RoundTrace(t.parents.tolist(), t.depths.tolist(), t.scores.tolist(), correct))
        outside_models[0] += time.perf_counter() - start

    overheads = []
    for prompt in prompts:
        ids = target.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        outside_models[0] = 0.0
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, on_round=record)
        with timed_calls(target, ["forward"], outside_models), \
                timed_calls(drafter, ["extend", "expand"], outside_models):
            res = generate(target, ids, drafter, cfg, DecodeOptions(tree))
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


def _same_tree_key(r: dict) -> tuple[int, int, int]:
    # Without drafter steps the tree is the root's best total - 1 children whatever top_k is.
    top_k = min(r["top_k"], r["total_tokens"] - 1) if r["depth"] == 0 else r["top_k"]
    return r["depth"], top_k, r["total_tokens"]


def shortlist(ranked: list[dict], n_best: int = 5) -> list[dict]:
    """The ``n_best`` best-ranked distinct trees plus the best of every other depth."""
    distinct, seen = [], set()
    for r in ranked:
        if _same_tree_key(r) not in seen:
            seen.add(_same_tree_key(r))
            distinct.append(r)
    picked = distinct[:n_best]
    for depth in sorted({r["depth"] for r in distinct}):
        if not any(r["depth"] == depth for r in picked):
            picked.append(next(r for r in distinct if r["depth"] == depth))
    return picked


def measure_round_s(target, drafter, shapes: Sequence[TreeConfig | None], prompts, max_new_tokens: int = 32,
                    repeats: int = 2, static_cache: bool = False) -> list[float]:
    """Seconds per decode round (tree drafting, verification, acceptance, cache updates) of
    real greedy generations with each shape (None: vanilla decoding, one token per round),
    in the runtime decoding will use (``static_cache``; CUDA graphs if the target has them
    on); the shapes take turns on every prompt so that drifting machine load hits them
    alike. One short warm-up generation per shape first."""
    spent = [0.0] * len(shapes)
    rounds = [0] * len(shapes)
    ids = [target.encode_prompt(p) if isinstance(p, str) else p for p in prompts]  # token ids pass through

    def run(prompt, shape, new_tokens):
        options = DecodeOptions(static_cache=static_cache) if shape is None else DecodeOptions(shape, static_cache)
        return generate(target, prompt, None if shape is None else drafter, GenerationConfig(max_new_tokens=new_tokens),
                        options)

    for shape in shapes:
        run(ids[0], shape, 4)
    for _ in range(repeats):
        for prompt in ids:
            for i, shape in enumerate(shapes):
                res = run(prompt, shape, max_new_tokens)
                spent[i] += res.draft_s + res.verify_s
                rounds[i] += res.rounds
    return [t / max(n, 1) for t, n in zip(spent, rounds)]


def rerank_measured(ranked: list[dict], measured: list[dict], round_s: Sequence[float]) -> list[dict]:
    """Every shape of ``ranked`` with a corrected round time, best first: its measured time if
    it was timed, else its modelled time plus the mean (measured - modelled) of the timed
    shapes of its depth (the model's error is mostly per drafter step; the shortlist times
    every depth). Expected tokens/s = replayed AL / that round time."""
    errors: dict[int, list[float]] = {}
    timed = {}
    for cand, seconds in zip(measured, round_s):
        errors.setdefault(cand["depth"], []).append(seconds * 1e3 - cand["round_ms"])
        timed[_same_tree_key(cand)] = seconds * 1e3
    out = []
    for r in ranked:
        offset = statistics.mean(errors[r["depth"]]) if r["depth"] in errors else 0.0
        round_ms = timed.get(_same_tree_key(r), r["round_ms"] + offset)
        out.append({**r, "model_tokens_per_s": r["tokens_per_s"], "model_round_ms": r["round_ms"],
                    "round_ms": round_ms, "timed": _same_tree_key(r) in timed,
                    "tokens_per_s": r["al"] / round_ms * 1e3 if round_ms > 0 else 0.0})
    out.sort(key=lambda r: -r["tokens_per_s"])
    return out


def autotune_tree(target, drafter, prompts=None, max_new_tokens: int = 96, progress=print,
                  timing_prompts: Sequence[int] | None = None, static_cache: bool = False) -> AutotuneReport:
    """Tune the tree shape (module docstring); ``prompts`` (text or token ids) default to
    :data:`CALIBRATION_PROMPTS`, ``timing_prompts`` (their indices) to :data:`TIMING_PROMPTS`;
    rounds are timed with ``static_cache`` as decoding will run."""
    prompts = CALIBRATION_PROMPTS if prompts is None else prompts
    timing_prompts = TIMING_PROMPTS if timing_prompts is None else timing_prompts
    progress("[autotune] timing the target's verify forward ...")
    verify_s = measure_verify_latency(target)
    progress("[autotune] timing the drafter ...")
    extend_s, expand_s = measure_draft_cost(target, drafter)
    # Prompts that leave room for a few rounds in the target's context (the long article does
    # not fit small test models).
    encoded = [target.encode_prompt(p) if isinstance(p, str) else p for p in prompts]
    fitting = [(i, ids) for i, ids in enumerate(encoded)
               if len(ids) + CALIBRATION_TREE.total_tokens + 16 <= target.max_context]
    if not fitting:
        raise ValueError(f"no calibration prompt fits the target's context of {target.max_context} tokens")
    calibration = [ids for _, ids in fitting]
    progress(f"[autotune] calibration generations ({len(calibration)} prompts, tree {CALIBRATION_TREE}) ...")
    # Tree building, acceptance and cache bookkeeping per round, measured around the model calls.
    traces, overhead_s = collect_traces(target, drafter, calibration, max_new_tokens)
    modelled = choose_tree(traces, verify_s, extend_s, expand_s, overhead_s)
    candidates = shortlist(modelled)
    shapes = [TreeConfig(c["depth"], c["top_k"], c["total_tokens"]) for c in candidates]
    timing = [ids for i, ids in fitting if i in timing_prompts] or calibration[:1]
    progress(f"[autotune] timing the rounds of {len(shapes)} candidate shapes and of vanilla decoding ...")
    *round_s, vanilla_s = measure_round_s(target, drafter, [*shapes, None], timing, static_cache=static_cache)
    ranked = rerank_measured(modelled, candidates, round_s)
    best = ranked[0]
    return AutotuneReport(
        best=TreeConfig(best["depth"], best["top_k"], best["total_tokens"]),
        expected_tokens_per_s=best["tokens_per_s"],
        expected_acceptance_length=best["al"],
        vanilla_tokens_per_s=1.0 / vanilla_s if vanilla_s > 0 else 0.0,
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


def calibration_id() -> str:
    """A short hash of the calibration set and tuning method, so a change tunes again."""
    spec = [AUTOTUNE_METHOD, list(CALIBRATION_PROMPTS), asdict(CALIBRATION_TREE), list(TIMING_PROMPTS)]
    return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:8]


def _cache_key(target, drafter, drafter_label: str, static_cache: bool = False) -> str:
    # Prepacked CPU weights, the static cache and CUDA graphs change the costs: separate entries.
    packed = "packed" if getattr(target, "packed_weights", False) else "plain"
    runtime = ("static" if static_cache else "dynamic") + ("+graphs" if getattr(target, "uses_cuda_graphs", False) else "")
    return "|".join([str(target.name), getattr(target, "engine", "torch"), drafter_label, drafter_fingerprint(drafter), str(target.dtype),
                     str(target.device), str(torch.get_num_threads()), packed, runtime, calibration_id()])


def resolve_tree(spec: str, target, drafter, drafter_label: str = "", progress=print, use_cache: bool = True,
                 static_cache: bool = False) -> TreeConfig:
    """``TreeConfig.parse(spec)``, or for ``auto`` the autotuned shape (cached on disk per
    target, drafter and its weights, dtype, device, thread count, weight packing, runtime
    (``static_cache``, CUDA graphs) and calibration set)."""
    if spec != "auto":
        return TreeConfig.parse(spec)
    if drafter is None:
        return TreeConfig.parse("cpu")  # vanilla: the tree is unused
    path = Path(cache_dir()) / "autotune.json"
    key = _cache_key(target, drafter, drafter_label or type(drafter).__name__, static_cache)
    table = {}
    if use_cache and path.exists():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            table = {}
        if key in table:
            return TreeConfig(**table[key]["best"])
    report = autotune_tree(target, drafter, progress=progress, static_cache=static_cache)
    speedup = report.expected_tokens_per_s / report.vanilla_tokens_per_s if report.vanilla_tokens_per_s else 0.0
    progress(f"[autotune] chose {report.best} (expected AL {report.expected_acceptance_length:.2f}, "
             f"{report.expected_tokens_per_s:.1f} tokens/s, {speedup:.2f}x vanilla decoding's "
             f"{report.vanilla_tokens_per_s:.1f} in the same timing)")
    if speedup < 1.0:
        progress("[autotune] no tree shape beats vanilla decoding at this drafter's acceptance and these costs: "
                 "expect a slowdown (on a CPU bfloat16 makes verifying a few tokens cheaper; a better-trained "
                 "drafter accepts more)")
    table[key] = report.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return report.best
