"""Metric definitions on hand-made decode traces, checked against hand-computed values."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from prism_spec.bench import metrics as M


def turn(accepted, exhausted, new_tokens=10, total_s=1.0, draft_s=0.0, tree_sizes=None):
    return {
        "accepted": accepted,
        "exhausted": exhausted,
        "rounds": len(accepted),
        "accepted_total": sum(accepted),
        "new_tokens": new_tokens,
        "total_s": total_s,
        "draft_s": draft_s,
        "tree_sizes": tree_sizes,
    }


# Two prompts of one benchmark. Rounds (accepted, exhausted):
#   A: (2, F) (0, F) (3, T)      B: (1, T) (4, F)
A = turn([2, 0, 3], [False, False, True])
B = turn([1, 4], [True, False])


def test_acceptance_length_is_a_micro_average_over_rounds():
    # (sum of accepted + one bonus per round) / rounds = (5 + 5 + 5) / 5
    assert M.acceptance_length([A, B]) == pytest.approx(3.0)
    # Not the mean of per-prompt ALs ((8/3 + 7/2) / 2 = 3.083...).
    assert M.acceptance_length([A, B]) != pytest.approx((8 / 3 + 7 / 2) / 2)
    assert M.acceptance_length([A]) == pytest.approx(8 / 3)


def test_vanilla_acceptance_length_is_one_and_has_no_steps():
    vanilla = turn([0, 0, 0, 0], [True] * 4)
    assert M.acceptance_length([vanilla]) == 1.0
    assert M.step_acceptance_rates([vanilla]) == []


def test_acceptance_length_without_rounds_is_none():
    assert M.acceptance_length([]) is None
    assert M.acceptance_length([turn([], [])]) is None


def test_hf_trace_uses_rounds_and_accepted_total():
    # transformers peers: 4 target forwards, 10 new tokens -> accepted_total 6 -> AL 10 / 4.
    hf = {"accepted": None, "exhausted": None, "rounds": 4, "accepted_total": 6, "new_tokens": 10, "total_s": 1.0}
    assert M.acceptance_length([hf]) == pytest.approx(2.5)
    assert M.acceptance_length([hf, A]) == pytest.approx((6 + 4 + 5 + 3) / 7)
    assert M.step_acceptance_rates([hf]) == []  # no per-round trace


def test_step_acceptance_rates_by_hand():
    rates = M.step_acceptance_rates([A, B])
    # step j reached: accepted >= j-1 and not (accepted == j-1 and exhausted); accepted: >= j
    expected = [
        (1, 5, 4),  # every round reached step 1; (0,F) rejected it
        (2, 3, 3),  # (0,F) stopped before; (1,T) had no depth-2 child -> not reached
        (3, 3, 2),  # (2,F) (3,T) (4,F) reached; (2,F) rejected
        (4, 1, 1),  # (3,T) exhausted at 3 -> only (4,F)
        (5, 1, 0),  # (4,F) reached step 5 and was rejected there
    ]
    assert [(r["step"], r["reached"], r["accepted"]) for r in rates] == expected
    assert [r["rate"] for r in rates] == pytest.approx([0.8, 1.0, 2 / 3, 1.0, 0.0])


def test_step_acceptance_exhausted_tree_is_not_a_rejection():
    # A chain of 2 drafted tokens, both accepted every time: the tree simply ends.
    full = turn([2, 2, 2], [True, True, True])
    rates = M.step_acceptance_rates([full])
    assert [(r["step"], r["reached"], r["rate"]) for r in rates] == [(1, 3, 1.0), (2, 3, 1.0)]
    # A fixed max_step pads with unreached steps.
    padded = M.step_acceptance_rates([full], max_step=3)
    assert padded[-1] == {"step": 3, "reached": 0, "accepted": 0, "rate": None}


def test_step_acceptance_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        M.step_acceptance_rates([{"accepted": [1, 2], "exhausted": [True]}])


def test_tokens_per_second_speedup_and_drafting_share():
    t1 = turn([1], [False], new_tokens=10, total_s=2.0, draft_s=0.5)
    t2 = turn([1], [False], new_tokens=30, total_s=3.0, draft_s=1.0)
    assert M.tokens_per_second([t1, t2]) == pytest.approx(8.0)  # 40 tokens / 5 s, not mean(5, 10)
    assert M.drafting_share([t1, t2]) == pytest.approx(0.3)  # 1.5 s / 5 s
    assert M.speedup(8.0, 4.0) == pytest.approx(2.0)
    assert M.speedup(8.0, None) is None
    assert M.tokens_per_second([turn([], [], new_tokens=0, total_s=0.0)]) is None
    hf = dict(t1, draft_s=None)
    assert M.drafting_share([hf, t2]) is None
    assert M.total_new_tokens([t1, t2]) == 40


def test_mean_skips_missing_values():
    assert M.mean([1.0, None, 3.0]) == 2.0
    assert M.mean([None]) is None


def test_iter_turns_flattens_runs():
    runs = [{"turns": [A, B]}, {"turns": []}, {"error": "PromptError: x"}]
    assert list(M.iter_turns(runs)) == [A, B]


def test_kv_bytes_per_token():
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    # K and V x 3 layers x 2 KV heads x head_dim 8 x 4 bytes
    assert M.kv_bytes_per_token(cfg, dtype_bytes=4) == 2 * 3 * 2 * 8 * 4
    assert M.kv_bytes_per_token(cfg, num_layers=1, dtype_bytes=2) == 2 * 1 * 2 * 8 * 2


def test_peak_kv_cache_replay_by_hand():
    # prompt 10; round 0: tree of 5, 2 accepted; round 1: tree of 3, 0 accepted.
    # target 100 B/token; drafter 10 B/token, holds the root (offset 1), 6 tree entries.
    # start: 10*100 + 11*10 = 1110
    # r0: drafting 1000 + 110 + 60 = 1170; verifying (10+5)*100 + 110 = 1610; committed -> 13
    # r1: drafting 1300 + 140 + 60 = 1500; verifying (13+3)*100 + 140 = 1740; committed -> 14
    # final: 1400 + 150 = 1550
    assert M.peak_kv_cache_bytes(10, [2, 0], [5, 3], 100, 10, 1, 6) == 1740
    # Vanilla: one root per round; peak = (prompt + rounds) entries.
    assert M.peak_kv_cache_bytes(10, [0, 0, 0], [1, 1, 1], 100) == 1300
    # A drafter whose tree entries dominate.
    assert M.peak_kv_cache_bytes(4, [0], [2], 1, 100, 0, 50) == 4 + 4 * 100 + 50 * 100
    with pytest.raises(ValueError):
        M.peak_kv_cache_bytes(4, [0, 1], [2], 1)


def test_kv_cache_bound():
    assert M.kv_cache_bound_bytes(10, 20, 5, 100, 10) == 35 * 110


def test_count_differences():
    ref = {"a": [[1, 2], [3]], "b": [[1]], "c": [[9]]}
    out = {"a": [[1, 2], [3]], "b": [[2]], "d": [[0]]}
    assert M.count_differences(out, ref) == 1  # only a and b are compared; b differs
    assert M.count_differences({"a": (1, 2)}, {"a": [1, 2]}) == 0
