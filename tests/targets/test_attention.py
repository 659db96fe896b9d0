"""Grouped-query SDPA with the query groups folded into the query length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import forward_one, tiny_llama
from prism_spec.targets.attention import GROUPED_SDPA, folds_query_groups, grouped_sdpa_attention, use_grouped_sdpa
from prism_spec.targets.hf import cache_kwarg
from prism_spec.targets.kv_cache import truncate_cache
from prism_spec.targets.masks import batch_attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def repeat_kv_reference(query, key, value, mask, scaling):
    """What transformers' sdpa does for several new tokens: copy K/V per query head."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[..., : key.shape[-2]], scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_folded_groups_equal_repeated_kv(n):
    gen = torch.Generator().manual_seed(n)
    batch, kv_heads, groups, dim, past = 2, 2, 3, 16, 11
    query = torch.randn(batch, kv_heads * groups, n, dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, past + n, dim, generator=gen, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, past + n, dim, generator=gen, dtype=torch.float64)
    # Ragged rows (row 1 has 4 committed entries fewer) and a branching tree for the new tokens.
    tree = torch.ones(n, n, dtype=torch.bool).tril()
    tree[n - 1, : n - 1] = False
    tree[n - 1, 0] = True
    mask = batch_attention_mask(torch.tensor([past, past - 4]), past, n, tree[None], torch.float64, "cpu")
    mask = torch.cat([mask, torch.zeros(*mask.shape[:-1], 3, dtype=mask.dtype)], -1)  # wider than the keys
    module = SimpleNamespace(num_key_value_groups=groups)
    assert folds_query_groups(module, query, mask, 0.0, {})
    out, weights = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (batch, n, kv_heads * groups, dim) and out.is_contiguous()
    torch.testing.assert_close(out, repeat_kv_reference(query, key, value, mask, 0.3), rtol=0, atol=1e-13)


def test_only_masked_multi_token_grouped_cpu_calls_are_folded():
    module = SimpleNamespace(num_key_value_groups=3)
    query = torch.zeros(1, 6, 4, 8)
    mask = torch.zeros(1, 1, 4, 10)
    assert folds_query_groups(module, query, mask, 0.0, {})
    assert not folds_query_groups(module, query[:, :, :1], mask[:, :, :1], 0.0, {})  # transformers folds n = 1
    assert not folds_query_groups(module, query, None, 0.0, {})  # causal prefill: flash with is_causal
    assert not folds_query_groups(SimpleNamespace(num_key_value_groups=1), query, mask, 0.0, {})
    assert not folds_query_groups(module, query, mask.expand(1, 6, 4, 10), 0.0, {})  # per-head masks
    assert not folds_query_groups(module, query, mask[:, :, :1], 0.0, {})  # one row broadcast over queries
    assert not folds_query_groups(module, query, mask, 0.1, {})
    assert not folds_query_groups(module, query, mask, 0.0, {"softcap": 30.0})
    assert not folds_query_groups(module, query, mask, 0.0, {"position_bias": torch.zeros(1, 6, 4, 10)})
    assert not folds_query_groups(module, query.to("meta"), mask.to("meta"), 0.0, {})


def test_target_tree_forward_is_unchanged():
    target = tiny_llama(layers=2, seed=3)
    model = target.model
    prompt = torch.tensor([5, 17, 3, 44, 9, 81, 2])
    tokens = torch.tensor([7, 11, 12, 13, 40])
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)
    depths = torch.tensor([0, 1, 1, 2, 2])
    logits = {}
    for impl in ("sdpa", GROUPED_SDPA):
        model.set_attn_implementation(impl)
        cache = target.new_cache()
        forward_one(target, prompt, torch.arange(prompt.numel()), cache)
        logits[impl] = forward_one(target, tokens, prompt.numel() + depths, cache, tree).logits
        truncate_cache(cache, prompt.numel())
    torch.testing.assert_close(logits[GROUPED_SDPA], logits["sdpa"], rtol=0, atol=1e-12)


def test_use_grouped_sdpa_switches_only_sdpa_models():
    target = tiny_llama(layers=1, seed=4)
    target.model.set_attn_implementation("sdpa")
    assert use_grouped_sdpa(target.model)
    assert target.model.config._attn_implementation == GROUPED_SDPA
    assert not use_grouped_sdpa(target.model)  # already switched
    target.model.set_attn_implementation("eager")
    assert not use_grouped_sdpa(target.model)
    assert target.model.config._attn_implementation == "eager"


def test_transformers_own_forward_and_generate_are_unchanged():
    """transformers builds its masks per implementation name (2D padding mask in): with the
    fold registered, its forward over several tokens on a cache and its greedy generate
    match sdpa's."""
    target = tiny_llama(layers=2, seed=5)
    model = target.model
    ids = torch.tensor([[5, 17, 3, 44, 9, 81, 2, 60, 33, 12]])
    results = {}
    for impl in ("sdpa", GROUPED_SDPA):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            first = model(ids[:, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), use_cache=True)
            more = model(ids[:, 6:], attention_mask=torch.ones(1, 10, dtype=torch.long), use_cache=True,
                         **{cache_kwarg(model): first.past_key_values}).logits
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                       pad_token_id=0)
        results[impl] = more, generated
    torch.testing.assert_close(results[GROUPED_SDPA][0], results["sdpa"][0], rtol=0, atol=1e-12)
    assert torch.equal(results[GROUPED_SDPA][1], results["sdpa"][1])



@pytest.mark.parametrize("ragged", [True, False], ids=["ragged-rows", "equal-rows"])
@pytest.mark.parametrize("parents", [[-1, 0, 0, 1, 2, 3], [-1, 0, 1, 0, 3, 2]], ids=["by-depth", "depth-first"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_invariant_attention_is_each_nodes_one_token_attention(dtype, parents, ragged):
    """Under row_invariant_attention, every node of a verified tree gets bit for bit the
    attention a decode step computes over a cache holding just its prefix and its path
    (transformers' sdpa with one query token, as vanilla decoding runs it): batch rows of
    different or equal lengths (nodes of one depth grouped within a row or across rows),
    trees listed by depth or not (outputs put back in order)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prism_spec.targets.attention import row_invariant_attention

    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, past = 2, 3, 3, 64, 300
    n = len(parents)  # node 0 is the root
    tree = torch.eye(n, dtype=torch.bool)
    for node, parent in enumerate(parents):
        while parent >= 0:
            tree[node, parent], parent = True, parents[parent]
    lengths = torch.tensor([past, past - 37 if ragged else past])
    query = torch.randn(batch, kv_heads * groups, n, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, past + n, dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, past + n, dim, generator=gen).to(dtype)
    mask = batch_attention_mask(lengths, past, n, tree[None].expand(batch, n, n), dtype, "cpu")
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    with row_invariant_attention():
        verified, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5)
    for b in range(batch):
        for node in range(n):
            path = [past + j for j in range(n) if tree[node, j]]
            keys = torch.cat([key[b : b + 1, :, : lengths[b]], key[b : b + 1, :, path]], dim=2)
            values = torch.cat([value[b : b + 1, :, : lengths[b]], value[b : b + 1, :, path]], dim=2)
            step_mask = torch.zeros(1, 1, 1, keys.shape[2], dtype=dtype)
            step, _ = sdpa_attention_forward(module, query[b : b + 1, :, node : node + 1], keys, values, step_mask,
                                             scaling=dim**-0.5)
            assert torch.equal(step[0, 0], verified[b, node]), (b, node)


def test_row_invariant_attention_calls_the_kernel_one_query_at_a_time(monkeypatch):
    """Batch 1 and one query per call, as a decode step: batching one-token queries over a
    tree's nodes changed the CPU kernel's work split and, over long key sequences, its rounding
    (a real prompt whose output differed from vanilla; docs/families.md)."""
    from prism_spec.targets.attention import row_invariant_attention

    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        shapes.append((tuple(query.shape[:3]), key.shape[0], tuple(attn_mask.shape)))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    n, past = 4, 20
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    mask = batch_attention_mask(None, past, n, tree[None], torch.float32, "cpu")
    query, key, value = torch.randn(1, 6, n, 8), torch.randn(1, 3, past + n, 8), torch.randn(1, 3, past + n, 8)
    with row_invariant_attention():
        grouped_sdpa_attention(SimpleNamespace(num_key_value_groups=2, is_causal=True), query, key, value, mask)
    counts = [past + int(tree[i].sum()) for i in range(n)]
    # (transformers' one-token fold: the 2 query heads of each of the 3 key/value heads as the query length)
    assert shapes == [((1, 3, 2), 1, (1, 1, 1, c)) for c in counts]
