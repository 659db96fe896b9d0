"""Tree autotuning: the replay of calibration rounds and the choice of shape."""

import json

import pytest
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


def test_autotune_end_to_end_prefers_deep_trees_for_an_oracle(one_thread, monkeypatch):
    target = tiny_llama(layers=2)
    from prism_spec.runtime import autotune

    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, target.vocab_size, (12,), generator=gen).tolist() for _ in range(2)]
    # Real rounds are timed, but every shape (and vanilla) is then said to cost 10 ms a round:
    # on tiny models the timings are noise, and the pick must follow the replayed acceptance.
    real = autotune.measure_round_s

    def equal_costs(*args, **kwargs):
        measured = real(*args, **kwargs)
        assert len(measured) == len(args[2]) and all(t > 0 for t in measured)
        return [0.01] * len(measured)

    monkeypatch.setattr(autotune, "measure_round_s", equal_costs)
    report = autotune_tree(target, oracle, prompts=prompts, max_new_tokens=24, progress=lambda *_: None)
    # An oracle is always right: the best shape drafts several levels and its expected AL is > 2.
    assert report.best.depth >= 1
    assert report.expected_acceptance_length > 2.0
    assert report.rounds > 0
    # The pick is the best of the shortlist by measured round time.
    best = report.top[0]
    assert (best["depth"], best["top_k"], best["total_tokens"]) == (report.best.depth, report.best.top_k,
                                                                  report.best.total_tokens)
    assert all(c["round_ms"] > 0 and "model_round_ms" in c for c in report.top)
    assert report.top == sorted(report.top, key=lambda c: -c["tokens_per_s"])
    assert report.vanilla_tokens_per_s == pytest.approx(100.0)


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


def test_calibration_set_is_part_of_the_cache_key(one_thread, monkeypatch):
    from prism_spec.runtime import autotune

    target = tiny_llama(layers=2)
    drafter = StandardDrafter.from_target_layers(target, 1)
    key = autotune._cache_key(target, drafter, "d")
    assert autotune.calibration_id() in key
    monkeypatch.setattr(autotune, "CALIBRATION_PROMPTS", autotune.CALIBRATION_PROMPTS[:-1])
    assert autotune._cache_key(target, drafter, "d") != key


def _cand(depth, top_k, total, al, tokens_per_s):
    return {"depth": depth, "top_k": top_k, "total_tokens": total, "al": al, "tokens_per_s": tokens_per_s,
            "round_ms": al / tokens_per_s * 1e3}


def test_shortlist_keeps_distinct_trees_and_every_depth():
    from prism_spec.runtime.autotune import shortlist

    ranked = [_cand(1, 4, 6, 1.6, 60.0), _cand(0, 4, 4, 1.5, 59.0), _cand(0, 6, 4, 1.5, 59.0),
              _cand(1, 2, 6, 1.55, 58.0), _cand(0, 6, 6, 1.55, 57.0), _cand(2, 4, 8, 1.7, 50.0), _cand(2, 2, 8, 1.6, 45.0)]
    picked = [(c["depth"], c["top_k"], c["total_tokens"]) for c in shortlist(ranked, n_best=3)]
    # 0/6/4 is the tree 0/4/4 builds (the root's 3 best children): timed once.
    assert picked == [(1, 4, 6), (0, 4, 4), (1, 2, 6), (2, 4, 8)]


def test_measured_round_times_decide_between_close_shapes():
    from prism_spec.runtime.autotune import rerank_measured

    # The model prefers the deeper shapes by 2 %; in real rounds their drafter step costs more.
    ranked = [_cand(1, 3, 6, 1.60, 60.0), _cand(1, 3, 8, 1.62, 59.9), _cand(0, 3, 4, 1.48, 58.8),
              _cand(0, 2, 3, 1.40, 58.0)]
    timed = [ranked[0], ranked[2]]
    out = rerank_measured(ranked, timed, [0.0270, 0.0229])
    best = out[0]
    assert (best["depth"], best["total_tokens"], best["timed"]) == (0, 4, True)
    assert abs(best["tokens_per_s"] - 1.48 / 0.0229) < 1e-9 and best["model_tokens_per_s"] == 58.8
    by_shape = {(r["depth"], r["total_tokens"]): r for r in out}
    # Untimed shapes take their depth's error: 1/3/8 is modelled at 1.62/59.9 s = 27.05 ms, and
    # the timed depth-1 shape ran 27.0 - 26.67 ms = +0.33 ms slower than modelled.
    untimed = by_shape[1, 8]
    assert not untimed["timed"]
    assert abs(untimed["round_ms"] - (1.62 / 59.9 * 1e3 + (27.0 - 1.60 / 60.0 * 1e3))) < 1e-9
    depth0 = by_shape[0, 3]
    assert abs(depth0["round_ms"] - (1.40 / 58.0 * 1e3 + (22.9 - 1.48 / 58.8 * 1e3))) < 1e-9
    assert [r["tokens_per_s"] for r in out] == sorted((r["tokens_per_s"] for r in out), reverse=True)


def test_calibration_skips_prompts_the_context_cannot_hold(one_thread):
    target = tiny_llama(layers=1)  # 256 positions
    drafter = StandardDrafter.from_target_layers(target, 1)
    long_prompt, short_prompt = list(range(1, 240)), [5, 17, 3, 44, 9, 81]
    report = autotune_tree(target, drafter, prompts=[long_prompt, short_prompt], max_new_tokens=8,
                           progress=lambda *_: None, timing_prompts=(0,))
    assert report.rounds > 0
    with pytest.raises(ValueError, match="no calibration prompt fits"):
        autotune_tree(target, drafter, prompts=[long_prompt], max_new_tokens=8, progress=lambda *_: None)


def test_resolve_tree_says_when_no_shape_beats_vanilla(one_thread, tmp_path, monkeypatch):
    from prism_spec.runtime import autotune

    monkeypatch.setattr(autotune, "CALIBRATION_PROMPTS", ([5, 17, 3, 44, 9, 81, 2], [60, 33, 12, 7, 1]))
    target = tiny_llama(layers=2)
    drafter = StandardDrafter.from_target_layers(target, 1)
    for vanilla_s, slower in ((0.001, True), (1.0, False)):
        # Candidates' rounds take 20 ms; vanilla's 1 ms (nothing can win) or 1 s.
        monkeypatch.setattr(autotune, "measure_round_s",
                            lambda t, d, shapes, prompts, **kw: [vanilla_s if s is None else 0.02 for s in shapes])
        monkeypatch.setenv("PRISM_SPEC_CACHE", str(tmp_path / str(vanilla_s)))
        said = []
        tree = autotune.resolve_tree("auto", target, drafter, "stand-in", progress=said.append)
        chose = next(line for line in said if f"chose {tree}" in line)
        (entry,) = json.loads((tmp_path / str(vanilla_s) / "autotune.json").read_text()).values()
        speedup = entry["expected_tokens_per_s"] / entry["vanilla_tokens_per_s"]
        assert f"{speedup:.2f}x vanilla decoding's {1 / vanilla_s:.1f}" in chose
        assert (speedup < 1) == slower
        assert any("no tree shape beats vanilla decoding" in line for line in said) == slower


def test_static_cache_rounds_are_tuned_separately(one_thread, tmp_path, monkeypatch):
    from prism_spec.runtime import autotune

    monkeypatch.setenv("PRISM_SPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "CALIBRATION_PROMPTS", ([5, 17, 3, 44, 9, 81, 2], [60, 33, 12, 7, 1]))
    target = tiny_llama(layers=2)
    drafter = StandardDrafter.from_target_layers(target, 1)
    assert autotune._cache_key(target, drafter, "d", static_cache=True) != autotune._cache_key(target, drafter, "d")
    configs = []
    real = autotune.generate

    def spy(target, prompt, drafter, cfg, options):
        configs.append((cfg, options, drafter))
        return real(target, prompt, drafter, cfg, options)

    monkeypatch.setattr(autotune, "generate", spy)
    autotune.resolve_tree("auto", target, drafter, "d", progress=lambda *_: None, static_cache=True)
    # Calibration traces (recorded per round) use the growing cache: acceptance does not
    # depend on it. The timed rounds, vanilla's included, run on the static cache.
    calibration = [options for cfg, options, _ in configs if cfg.on_round is not None]
    timing = [(options, d) for cfg, options, d in configs if cfg.on_round is None]
    assert calibration and not any(options.static_cache for options in calibration)
    assert timing and all(options.static_cache for options, _ in timing)
    assert any(d is None for _, d in timing) and any(d is drafter for _, d in timing)
    assert len(json.loads((tmp_path / "autotune.json").read_text())) == 1
