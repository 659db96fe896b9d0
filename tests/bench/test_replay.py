"""Acceptance replayed from the target's continuation equals the decode loop's: round by round at T=0, in distribution at T>0."""

from __future__ import annotations

import pytest
import torch

from helpers import NoisyDrafter, RandomDrafter, feature_drafter, tiny_llama
from prism_spec.bench.replay import replay_acceptance, vanilla_continuation
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.runtime.verify import SamplingConfig
from prism_spec.targets import default_feature_layers

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 24
SHAPES = {"chain4": TreeConfig.parse("chain:4"), "small": TreeConfig(depth=3, top_k=3, total_tokens=10),
          "paper": TreeConfig.parse("paper")}


DRAFTERS = {
    "random": lambda t: RandomDrafter(t.vocab_size, seed=1),
    "noisy-target": lambda t: NoisyDrafter(StandardDrafter.from_target_layers(t, t.num_layers), scale=0.3, seed=2),
    "oracle": lambda t: StandardDrafter.from_target_layers(t, t.num_layers),
    "prism-untrained": lambda t: feature_drafter(t),
    "prism-layer-input": lambda t: feature_drafter(
        t, num_modules=3, input_layers=list(default_feature_layers(t.num_layers))),
}


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=4, seed=0)


@pytest.fixture(scope="module")
def prompts(target):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, target.vocab_size, (n,), generator=gen).tolist() for n in (1, 3, 8, 17, 40)]


@pytest.fixture(scope="module")
def continuations(target, prompts):
    return [vanilla_continuation(target, p, MAX_NEW, lookahead=8) for p in prompts]


def test_the_continuation_is_vanilla_greedy_plus_a_lookahead(target, prompts, continuations):
    for prompt, cont in zip(prompts, continuations):
        vanilla = generate(target, prompt, None, GenerationConfig(max_new_tokens=MAX_NEW + 8, stop_on_eos=False))
        assert cont.committed == MAX_NEW and cont.tokens == vanilla.token_ids


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_replayed_acceptance_equals_the_decode_loops(target, prompts, continuations, name, shape):
    total = 0
    for prompt, cont in zip(prompts, continuations):
        decoded = generate(target, prompt, DRAFTERS[name](target), GenerationConfig(max_new_tokens=MAX_NEW),
                           DecodeOptions(SHAPES[shape]))
        replayed = replay_acceptance(target, DRAFTERS[name](target), prompt, cont, SHAPES[shape])
        assert replayed == decoded.accepted, f"prompt of {len(prompt)} tokens"
        total += sum(replayed)
    if name == "oracle":
        assert total > 0


def test_an_eos_inside_a_round_ends_the_replay_where_decoding_ends(target, prompts, monkeypatch):
    prompt = prompts[2]
    full = generate(target, prompt, None, GenerationConfig(max_new_tokens=MAX_NEW)).token_ids
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    monkeypatch.setattr(target.config, "eos_token_id", full[k])
    cont = vanilla_continuation(target, prompt, MAX_NEW, lookahead=8)
    assert cont.committed == k + 1 and cont.tokens[: k + 1] == full[: k + 1] and len(cont.tokens) == k + 9
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    for shape in SHAPES.values():
        decoded = generate(target, prompt, oracle, GenerationConfig(max_new_tokens=MAX_NEW), DecodeOptions(shape))
        assert decoded.finish_reason == "eos"
        assert replay_acceptance(target, oracle, prompt, cont, shape) == decoded.accepted


def test_a_short_lookahead_is_refused(target, prompts):
    cont = vanilla_continuation(target, prompts[0], MAX_NEW, lookahead=2)
    with pytest.raises(ValueError, match="lookahead"):
        replay_acceptance(target, RandomDrafter(target.vocab_size), prompts[0], cont, SHAPES["paper"])


def test_the_store_computes_a_continuation_once_and_survives_a_torn_line(target, prompts, tmp_path):
    from prism_spec.bench.replay import ContinuationStore

    path = tmp_path / "store.jsonl"
    store = ContinuationStore(path, target, lookahead=8)
    first = store.get(prompts[1], MAX_NEW)
    assert store.get(prompts[1], MAX_NEW) == first and store.computed == 1
    with open(path, "a") as f:
        f.write('{"key": "cut sho')  # a crash in the middle of a line
    again = ContinuationStore(path, target, lookahead=8)
    assert again.get(prompts[1], MAX_NEW) == first and again.computed == 0
    assert again.get(prompts[1], MAX_NEW - 1) != first and again.computed == 1  # other settings, other key
    reread = ContinuationStore(path, target, lookahead=8)  # the line after the cut one reads back
    assert reread.get(prompts[1], MAX_NEW - 1) == again.get(prompts[1], MAX_NEW - 1) and reread.computed == 0
    deeper = ContinuationStore(path, target, lookahead=12)  # not enough lookahead stored: computed again
    assert deeper.get(prompts[1], MAX_NEW).tokens[: len(first.tokens)] == first.tokens and deeper.computed == 1


def _mean_and_variance_of_mean(xs):
    mean = sum(xs) / len(xs)
    return mean, sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)


def test_sampled_replay_draws_acceptance_from_the_decode_loops_distribution(target):
    """At T > 0 a replay walks the trees along a vanilla *sample*: decoding commits a sample of
    the target and accepts exactly the drafts that spell it (see the module's docstring), so
    the accepted counts of the two agree in distribution. Fixed seeds: decoded and replayed
    draws independent; the same statistic tells a replay at another temperature apart."""
    prompt, n, max_new = [5, 17, 3, 40, 2, 9, 11, 60], 60, 12
    shape = SHAPES["small"]
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)

    def decoded(temperature):
        cfg = lambda seed: GenerationConfig(max_new_tokens=max_new, sampling=SamplingConfig(temperature), seed=seed)
        return [sum(generate(target, prompt, oracle, cfg(seed), DecodeOptions(shape)).accepted) for seed in range(n)]

    def replayed(temperature):
        conts = [vanilla_continuation(target, prompt, max_new, 8, SamplingConfig(temperature), seed=1000 + seed)
                 for seed in range(n)]
        return [sum(replay_acceptance(target, oracle, prompt, c, shape)) for c in conts]

    (m_dec, v_dec), (m_rep, v_rep) = map(_mean_and_variance_of_mean, (decoded(1.0), replayed(1.0)))
    assert abs(m_dec - m_rep) < 4 * (v_dec + v_rep) ** 0.5, (m_dec, m_rep)
    m_cold, v_cold = _mean_and_variance_of_mean(replayed(0.5))  # the wrong temperature's samples
    assert abs(m_dec - m_cold) > 6 * (v_dec + v_cold) ** 0.5, (m_dec, m_cold)
    with pytest.raises(ValueError, match="seed"):
        vanilla_continuation(target, prompt, max_new, 8, SamplingConfig(1.0))


def test_the_store_keeps_sampled_continuations_apart_and_draws_them_again_alike(target, prompts, tmp_path):
    from prism_spec.bench.replay import ContinuationStore

    path = tmp_path / "store.jsonl"
    greedy = ContinuationStore(path, target, lookahead=8).get(prompts[3], MAX_NEW)
    hot = ContinuationStore(path, target, lookahead=8, sampling=SamplingConfig(1.0), seed=0)
    sampled = [hot.get(p, MAX_NEW) for p in prompts]
    assert hot.computed == len(prompts) and sampled[3] != greedy
    assert len({tuple(c.tokens) for c in sampled}) == len(prompts)
    again = ContinuationStore(path, target, lookahead=8, sampling=SamplingConfig(1.0), seed=0)
    assert [again.get(p, MAX_NEW) for p in prompts] == sampled and again.computed == 0
    fresh = ContinuationStore(None, target, lookahead=8, sampling=SamplingConfig(1.0), seed=0)
    assert fresh.get(prompts[3], MAX_NEW) == sampled[3]  # the same prompt and seed, the same sample
    other = ContinuationStore(path, target, lookahead=8, sampling=SamplingConfig(1.0), seed=1)
    assert other.get(prompts[3], MAX_NEW) != sampled[3] and other.computed == 1
    deeper = ContinuationStore(path, target, lookahead=12, sampling=SamplingConfig(1.0), seed=0)
    assert deeper.get(prompts[3], MAX_NEW).tokens[: len(sampled[3].tokens)] == sampled[3].tokens
