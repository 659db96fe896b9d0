"""Metric definitions, as pure functions on decode traces.

A *turn trace* is the dict the runner stores for one generation (one user turn)::

    {"new_tokens": int,            # tokens generated (EOS included when hit)
     "token_ids": [int, ...],
     "accepted": [int, ...] | None,   # drafted tokens accepted, one entry per verify round
     "exhausted": [bool, ...] | None, # per round: the last accepted node had no children
     "tree_sizes": [int, ...] | None, # nodes verified per round, the root included
     "rounds": int,                # verify forwards (== len(accepted) when it is known)
     "accepted_total": int,        # sum(accepted)
     "prefill_s", "draft_s", "verify_s": float | None, "total_s": float}

A *run* (one prompt x method x temperature) holds a list of turn traces under ``"turns"``
(two for MT-bench, one elsewhere). Every aggregate below is a micro average: sums over all
rounds / tokens / seconds of all turns of all prompts, then one division.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence


def iter_turns(runs: Iterable[Mapping]) -> Iterable[Mapping]:
    """Turn traces of run records (runs that failed carry no turns)."""
    for run in runs:
        yield from run.get("turns") or ()


def rounds_accepted(turn: Mapping) -> tuple[int, int]:
    """(verify rounds, drafted tokens accepted) of one turn trace: from its per-round
    ``accepted`` list, or for peers without one from ``rounds`` / ``accepted_total``."""
    accepted = turn.get("accepted")
    if accepted is not None:
        return len(accepted), int(sum(accepted))
    return int(turn.get("rounds") or 0), int(turn.get("accepted_total") or 0)


def acceptance_length(turns: Iterable[Mapping]) -> float | None:
    """Mean tokens committed per verify round (micro average), ``None`` without rounds.

    AL = sum over rounds of (accepted + 1) / number of rounds, pooled over every round of
    every turn given (a benchmark: all its prompts). The ``+ 1`` is the bonus token the target
    produces itself in every round. The first generated token, which the prefill forward
    produces for every method alike, belongs to no round and is excluded. Vanilla decoding
    accepts nothing, so its AL is exactly 1.0.

    For transformers' ``generate`` peers (no per-round trace) a round is one target forward
    and accepted_total = new tokens - forwards, so AL = new tokens / target forwards.
    """
    rounds = accepted = 0
    for turn in turns:
        r, a = rounds_accepted(turn)
        rounds += r
        accepted += a
    return (accepted + rounds) / rounds if rounds else None


def step_acceptance_rates(turns: Iterable[Mapping], max_step: int | None = None) -> list[dict]:
    """Per-draft-step conditional acceptance rate (paper Fig. 1).

    Step j (1-based) is the j-th drafted token along the accepted path. A round *reached*
    step j when its first j-1 drafted tokens were accepted and the tree had a node to offer at
    depth j: ``accepted >= j - 1`` and not (``accepted == j - 1`` and the round was
    ``exhausted``). Among the rounds that reached step j, the rate is the fraction with
    ``accepted >= j``. Rounds whose trace has no per-round lists (transformers peers) are
    skipped. Returns ``[{"step", "reached", "accepted", "rate"}]`` for steps 1..max_step
    (default: the deepest step any round reached); ``rate`` is None where nothing reached it.
    """
    pairs: list[tuple[int, bool]] = []
    for turn in turns:
        accepted, exhausted = turn.get("accepted"), turn.get("exhausted")
        if accepted is None or exhausted is None:
            continue
        if len(accepted) != len(exhausted):
            raise ValueError("accepted and exhausted must have one entry per round")
        pairs.extend((int(a), bool(e)) for a, e in zip(accepted, exhausted))
    if max_step is None:
        max_step = max((a + (0 if e else 1) for a, e in pairs), default=0)
    out = []
    for j in range(1, max_step + 1):
        reached = sum(1 for a, e in pairs if a >= j - 1 and not (a == j - 1 and e))
        ok = sum(1 for a, _ in pairs if a >= j)
        out.append({"step": j, "reached": reached, "accepted": ok, "rate": ok / reached if reached else None})
    return out


def total_new_tokens(turns: Iterable[Mapping]) -> int:
    return sum(int(t["new_tokens"]) for t in turns)


def tokens_per_second(turns: Iterable[Mapping]) -> float | None:
    """Total new tokens / total wall time of the generate calls (prefill included)."""
    tokens = seconds = 0.0
    for t in turns:
        tokens += t["new_tokens"]
        seconds += t["total_s"]
    return tokens / seconds if seconds > 0 else None


def speedup(method_tps: float | None, vanilla_tps: float | None) -> float | None:
    """Method tokens/s over vanilla tokens/s (same benchmark, same run)."""
    if not method_tps or not vanilla_tps:
        return None
    return method_tps / vanilla_tps


def drafting_share(turns: Iterable[Mapping]) -> float | None:
    """Share of the wall time spent building draft trees: sum(draft_s) / sum(total_s).
    ``None`` when any turn has no draft timing (transformers peers)."""
    draft = total = 0.0
    for t in turns:
        if t.get("draft_s") is None:
            return None
        draft += t["draft_s"]
        total += t["total_s"]
    return draft / total if total > 0 else None


def mean(values: Iterable[float | None]) -> float | None:
    """Plain mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- memory
def kv_bytes_per_token(config, num_layers: int | None = None, dtype_bytes: int = 4) -> int:
    """Bytes one position takes in a KV cache: K and V, every layer, every KV head."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    layers = int(num_layers if num_layers is not None else config.num_hidden_layers)
    return 2 * layers * kv_heads * int(head_dim) * int(dtype_bytes)


def peak_kv_cache_bytes(
    prompt_len: int,
    accepted: Sequence[int],
    tree_sizes: Sequence[int],
    target_bytes_per_token: int,
    drafter_bytes_per_token: int = 0,
    drafter_offset: int = 0,
    drafter_tree_tokens: int = 0,
) -> int:
    """Peak logical KV-cache size of one generate call, target and drafter together.

    Replays the decode loop's cache lengths. After prefill the target holds ``prompt_len``
    entries. Before round r it holds R_r = prompt_len + sum_{i<r}(accepted_i + 1) (the root is
    not in it); drafting grows the drafter's cache by ``drafter_tree_tokens`` (depth x top_k
    expansion entries) on top of its committed R_r + ``drafter_offset`` (a standard drafter
    also holds the root: offset 1; feature drafters 0); the verify forward then adds the
    tree's ``tree_sizes[r]`` nodes to the target before compaction. The peak is the largest
    of those moments, in bytes. Transient copies made while a cache grows or is compacted,
    and activations, are not counted.
    """
    if len(accepted) != len(tree_sizes):
        raise ValueError("accepted and tree_sizes must have one entry per round")
    t_bpt, d_bpt = target_bytes_per_token, drafter_bytes_per_token
    committed = prompt_len
    peak = committed * t_bpt + ((committed + drafter_offset) * d_bpt if d_bpt else 0)
    for a, size in zip(accepted, tree_sizes):
        drafter_committed = (committed + drafter_offset) * d_bpt if d_bpt else 0
        drafting = committed * t_bpt + drafter_committed + (drafter_tree_tokens * d_bpt if d_bpt else 0)
        verifying = (committed + size) * t_bpt + drafter_committed
        peak = max(peak, drafting, verifying)
        committed += a + 1
    final = committed * t_bpt + ((committed + drafter_offset) * d_bpt if d_bpt else 0)
    return max(peak, final)


def kv_cache_bound_bytes(
    prompt_len: int, new_tokens: int, lookahead: int, target_bytes_per_token: int, drafter_bytes_per_token: int = 0
) -> int:
    """Upper bound for loops we cannot replay (transformers' assisted generation): both caches
    hold at most prompt + new tokens + the candidates of one round."""
    return (prompt_len + new_tokens + lookahead) * (target_bytes_per_token + drafter_bytes_per_token)


# ----------------------------------------------------------------------------- losslessness
def count_differences(outputs: Mapping[object, Sequence], reference: Mapping[object, Sequence]) -> int:
    """How many keys (prompts) whose token ids differ from the reference's (vanilla at T=0).

    Values are the token id lists of each turn (a list of lists) or one flat list; only keys
    present in both mappings are compared.
    """
    return sum(1 for key in outputs.keys() & reference.keys() if _norm(outputs[key]) != _norm(reference[key]))


def _norm(ids) -> list:
    return [list(x) if isinstance(x, (list, tuple)) else x for x in ids]
