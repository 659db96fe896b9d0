"""Tree autotuning: the replay of calibration rounds and the choice of shape."""

import torch

from helpers import tiny_llama
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime.autotune import RoundTrace, autotune_tree, choose_tree, resolve_tree, simulate
from prism_spec.runtime.tree import TreeConfig

# root 0; depth 1: node 1 (right), node 2 (wrong); depth 2: 3 and 4 under 1 (3 right), 5 under 2
# (matches the target but its parent was rejected); depth 3: node 6 under 3 (wrong).
TRACE = RoundTrace(
    parents=[-1, 0, 0, 1, 1, 2, 3],
    depths=[0, 1, 1, 2, 2, 2, 3],
    scores=[0.0, -0.1, -1.0, -0.3, -2.0, -1.2, -0.6],
    correct=[True, True, False, True, False, True, False],
)


def test_simulate_chain():
    # depth 1, top_k 1: candidates 1 then 3.
    assert simulate(TRACE, depth=1, top_k=1, totals=(2, 3, 4)) == {2: 2, 3: 3, 4: 3}


def test_simulate_single_level():
    assert simulate(TRACE, depth=0, top_k=2, totals=(2, 3)) == {2: 2, 3: 2}


def test_simulate_tree_rejected_parent_blocks_child():
    # Order by score: 1, 3, 6, 2, 5, 4. Node 5 is "correct" but sits under rejected node 2.
    assert simulate(TRACE, depth=2, top_k=2, totals=(2, 3, 4, 7)) == {2: 2, 3: 3, 4: 3, 7: 3}


def test_choose_tree_trades_acceptance_for_cost():
    traces = [TRACE] * 4
    verify = {2: 0.010, 3: 0.010, 4: 0.030}
    # Cheap drafting: the 3-node tree (2 accepted tokens + bonus... AL 3) wins at equal verify cost.
    ranked = choose_tree(traces, verify, 0.001, {1: 0.001, 2: 0.001}, 0.0, depths=(0, 1), top_ks=(1, 2), totals=(2, 3, 4))
    best = ranked[0]
    assert (best["depth"], best["top_k"], best["total_tokens"], best["al"]) == (1, 1, 3, 3.0)
    # Very expensive drafting steps: a single drafted level wins.
    ranked = choose_tree(traces, verify, 0.001, {1: 0.5, 2: 0.5}, 0.0, depths=(0, 1), top_ks=(1, 2), totals=(2, 3, 4))
    assert ranked[0]["depth"] == 0


def test_resolve_tree_passes_fixed_specs_through():
    assert resolve_tree("12/4/3", None, None) == TreeConfig(depth=4, top_k=3, total_tokens=12)


def test_autotune_end_to_end_prefers_deep_trees_for_an_oracle(one_thread):
    target = tiny_llama(layers=2)
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, target.vocab_size, (12,), generator=gen).tolist() for _ in range(2)]
    report = autotune_tree(target, oracle, prompts=prompts, max_new_tokens=24, progress=lambda *_: None)
    # An oracle is always right: the best shape drafts several levels and its expected AL is > 2.
    assert report.best.depth >= 1
    assert report.expected_acceptance_length > 2.0
    assert report.rounds > 0


def test_drafter_fingerprint_follows_the_weights(one_thread):
    from prism_spec.runtime.autotune import _cache_key, drafter_fingerprint

    target = tiny_llama(layers=2)
    drafter = StandardDrafter.from_target_layers(target, 1)
    before, key_before = drafter_fingerprint(drafter), _cache_key(target, drafter, "d")
    assert before == drafter_fingerprint(StandardDrafter.from_target_layers(target, 1)) and len(before) == 12
    with torch.no_grad():
        next(drafter.lm.model.parameters()).view(-1)[0] += 1.0
    # Retrained weights under the same name: another cache entry, so the tree is tuned again.
    assert drafter_fingerprint(drafter) != before
    assert _cache_key(target, drafter, "d") != key_before
    assert drafter_fingerprint(object()) == "-"
