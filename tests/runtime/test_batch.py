"""Batched speculative decoding: every row is lossless on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import chi_square_pvalue, forward_one, tiny_llama
from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, StandardDrafter, prism_config
from prism_spec.runtime import (
    DecodeOptions,
    GenerationConfig,
    PromptError,
    SamplingConfig,
    TreeConfig,
    generate,
    generate_batch,
    stream_generate_batch,
)
from prism_spec.runtime.verify import target_probs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=3, seed=3)


def ragged_prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=gen)
    return [torch.randint(0, 96, (int(m),), generator=gen) for m in lengths]


DRAFTERS = {
    "vanilla": lambda t: None,
    "first-layer": lambda t: StandardDrafter.from_target_layers(t, 1),
    "oracle": lambda t: StandardDrafter.from_target_layers(t, t.num_layers),
    "prism-untrained": lambda t: FeatureDrafter(FeatureDrafterModel(prism_config(t), t)),
    "prism3-layers": lambda t: FeatureDrafter(
        FeatureDrafterModel(prism_config(t, num_modules=3, input_layers=[1, 2, 3]), t)
    ),
}


@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("tree", ["chain:3", "12/4/3"])
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_each_row_equals_its_own_greedy_output(target, name, tree, batch):
    prompts = ragged_prompts(batch, seed=batch)
    # Ragged budgets too: rows leave the batch at different rounds.
    configs = [GenerationConfig(max_new_tokens=8 + 7 * i) for i in range(batch)]
    drafter = DRAFTERS[name](target)
    results = generate_batch(target, prompts, drafter, configs, DecodeOptions(TreeConfig.parse(tree)))
    for prompt, config, result in zip(prompts, configs, results):
        alone = generate(target, prompt, None, config)
        assert result.token_ids == alone.token_ids
        assert result.finish_reason == alone.finish_reason
    if name == "oracle":
        assert min(r.acceptance_length for r in results) > 2.5


def test_rows_stop_on_their_own_eos_and_context(target, monkeypatch):
    prompts = ragged_prompts(3, seed=11)
    vanilla = [generate(target, p, None, GenerationConfig(max_new_tokens=12)).token_ids for p in prompts]
    eos = vanilla[1][3]  # row 1 meets it at its 4th token (other rows may too: that is fine)
    monkeypatch.setattr(type(target), "eos_token_ids", property(lambda self: {eos}))
    drafter = StandardDrafter.from_target_layers(target, 1)
    config = GenerationConfig(max_new_tokens=12)
    results = generate_batch(target, prompts, drafter, config, DecodeOptions(TreeConfig.parse("8/3/2")))
    for prompt, result in zip(prompts, results):
        alone = generate(target, prompt, None, config)
        assert result.token_ids == alone.token_ids and result.finish_reason == alone.finish_reason
    assert results[1].finish_reason == "eos" and results[1].token_ids[-1] == eos


def test_context_limit_per_row():
    small = tiny_llama(layers=2, seed=5, max_positions=48)
    prompts = [torch.arange(1, 40) % 96, torch.arange(5, 15)]
    drafter = StandardDrafter.from_target_layers(small, 2)
    config = GenerationConfig(max_new_tokens=30)
    results = generate_batch(small, prompts, drafter, config, DecodeOptions(TreeConfig.parse("chain:4")))
    for prompt, result in zip(prompts, results):
        alone = generate(small, prompt, None, config)
        assert result.token_ids == alone.token_ids and result.finish_reason == alone.finish_reason
    assert results[0].finish_reason == "context"


def test_stream_events_rebuild_each_row(target):
    prompts = ragged_prompts(3, seed=2)
    seen = {i: [] for i in range(3)}
    final = None
    for item in stream_generate_batch(target, prompts, StandardDrafter.from_target_layers(target, 1),
                                      GenerationConfig(max_new_tokens=10), DecodeOptions(TreeConfig.parse("8/3/2"))):
        if isinstance(item, list):
            final = item
        else:
            seen[item[0]].extend(item[1])
    assert [seen[i] for i in range(3)] == [r.token_ids for r in final]


def test_bad_batches(target):
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        generate_batch(target, [[1, 2], []], None)
    with pytest.raises(ValueError, match="2 generation configs for 3 prompts"):
        generate_batch(target, [[1], [2], [3]], None, [GenerationConfig(), GenerationConfig()])


def test_batched_sampling_matches_target_distribution():
    """T=1, 2-token continuations of one prompt, 8 rows per batch (each its own seed)."""
    vocab, prompt, n, rows = 8, [1, 5, 2, 7, 3], 2000, 8
    target = tiny_llama(vocab_size=vocab, layers=2, seed=0)
    cfg = SamplingConfig(temperature=1.0)
    p1 = target_probs(forward_one(target, torch.tensor(prompt), torch.arange(5), target.new_cache()).logits[-1], cfg)
    second = []
    for x1 in range(vocab):
        ids = torch.tensor(prompt + [x1])
        second.append(target_probs(forward_one(target, ids, torch.arange(6), target.new_cache()).logits[-1], cfg))
    exact = (p1[:, None] * torch.stack(second)).numpy()
    drafter = StandardDrafter.from_target_layers(target, 1)
    observed, accepted = np.zeros((vocab, vocab)), 0
    options = DecodeOptions(TreeConfig(depth=1, top_k=3, total_tokens=6))
    for call in range(n // rows):
        configs = [GenerationConfig(max_new_tokens=2, stop_on_eos=False, seed=call * rows + r, sampling=cfg)
                   for r in range(rows)]
        for result in generate_batch(target, [prompt] * rows, drafter, configs, options):
            observed[result.token_ids[0], result.token_ids[1]] += 1
            accepted += sum(result.accepted)
    assert accepted / n > 0.3  # drafts really are accepted
    p = chi_square_pvalue(observed, exact, n)
    print(f"batched chi-square p = {p:.3g} (N = {n})")
    assert p > 0.001, p
