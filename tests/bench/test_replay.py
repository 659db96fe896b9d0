"""T=0 acceptance replayed from the greedy continuation equals the decode loop's, round by round."""

from __future__ import annotations

import pytest
import torch

from helpers import NoisyDrafter, RandomDrafter, feature_drafter, tiny_llama
from prism_spec.bench.replay import greedy_continuation, replay_acceptance
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
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
    return [greedy_continuation(target, p, MAX_NEW, lookahead=8) for p in prompts]


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
    cont = greedy_continuation(target, prompt, MAX_NEW, lookahead=8)
    assert cont.committed == k + 1 and cont.tokens[: k + 1] == full[: k + 1] and len(cont.tokens) == k + 9
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    for shape in SHAPES.values():
        decoded = generate(target, prompt, oracle, GenerationConfig(max_new_tokens=MAX_NEW), DecodeOptions(shape))
        assert decoded.finish_reason == "eos"
        assert replay_acceptance(target, oracle, prompt, cont, shape) == decoded.accepted


def test_a_short_lookahead_is_refused(target, prompts):
    cont = greedy_continuation(target, prompts[0], MAX_NEW, lookahead=2)
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
