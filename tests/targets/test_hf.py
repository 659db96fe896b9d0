"""The target wrapper: tree forwards against per-path forwards, cache compaction, masks, facts."""

from __future__ import annotations

import pytest
import torch

from helpers import RandomDrafter, draft_one, forward_one, tiny_llama
from prism_spec.runtime.tree import DraftTree, TreeConfig
from prism_spec.targets.hf import default_feature_layers, parse_dtype
from prism_spec.targets.kv_cache import compact_cache, keep_in_cache, truncate_cache
from prism_spec.targets.masks import attention_mask_4d

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([5, 17, 3, 44, 9, 81, 2, 60, 33])
P = PROMPT.numel()
LAYERS = (1, 2, 3)  # hidden_states indices for layer_features


def t(values):
    return torch.tensor(values, dtype=torch.long)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=3, seed=11)


def prefilled(target, tokens=PROMPT):
    cache = target.new_cache()
    out = forward_one(target, tokens, torch.arange(tokens.numel()), cache, feature_layers=LAYERS)
    return cache, out


# A hand-built tree with repeated tokens on different branches (same token, different context).
#            0 (7)
#        /     |     \
#     1 (11)  2 (12)  3 (11)
#     /   \     |
#  4 (7) 5 (13) 6 (7)
#    |
#  7 (40)
HAND = DraftTree(
    tokens=t([7, 11, 12, 11, 7, 13, 7, 40]),
    parents=t([-1, 0, 0, 0, 1, 1, 2, 4]),
    depths=t([0, 1, 1, 1, 2, 2, 2, 3]),
)


def drafted_tree(target, seed=0):
    drafter = RandomDrafter(target.vocab_size, seed=seed)
    root_logits = torch.randn(target.vocab_size, generator=torch.Generator().manual_seed(seed))
    return draft_one(drafter, 7, root_logits, TreeConfig(depth=4, top_k=4, total_tokens=30))


def path_forward(target, path_tokens):
    cache, _ = prefilled(target)
    out = forward_one(target, path_tokens, torch.arange(P, P + path_tokens.numel()), cache, feature_layers=LAYERS)
    return cache, out


@pytest.mark.parametrize("which", ["hand", "drafted"])
def test_tree_forward_equals_per_path_forward(target, which):
    tree = HAND if which == "hand" else drafted_tree(target)
    assert tree.size > 7
    cache, _ = prefilled(target)
    out = forward_one(target, tree.tokens, tree.positions(P), cache, tree.ancestor_mask(), feature_layers=LAYERS)
    assert out.logits.shape == (tree.size, target.vocab_size)
    assert cache.get_seq_length() == P + tree.size
    checked = set()
    for path in tree.leaf_paths():
        _, ref = path_forward(target, tree.tokens[path])
        assert torch.allclose(out.logits[path], ref.logits, atol=1e-9, rtol=0)
        assert torch.allclose(out.features[path], ref.features, atol=1e-9, rtol=0)
        assert torch.allclose(out.layer_features[path], ref.layer_features, atol=1e-9, rtol=0)
        checked.update(path)
    assert checked == set(range(tree.size))


def test_tree_forward_on_top_of_a_previous_round(target):
    """A second tree forward after keep_in_cache sees exactly the committed sequence."""
    cache, _ = prefilled(target)
    forward_one(target, HAND.tokens, HAND.positions(P), cache, HAND.ancestor_mask())
    kept = [0, 1, 4, 7]
    keep_in_cache(cache, P, t(kept))
    committed = torch.cat([PROMPT, HAND.tokens[kept]])
    tree = drafted_tree(target, seed=3)
    root_pos = committed.numel()
    out = forward_one(target, tree.tokens, tree.positions(root_pos), cache, tree.ancestor_mask())
    for path in tree.leaf_paths()[:8]:
        seq = torch.cat([committed, tree.tokens[path]])
        ref = forward_one(target, seq, torch.arange(seq.numel()), target.new_cache())
        assert torch.allclose(out.logits[path], ref.logits[root_pos:], atol=1e-9, rtol=0)


def assert_cache_equal(cache, ref, length):
    assert cache.get_seq_length() == ref.get_seq_length() == length
    assert len(cache.layers) == len(ref.layers)
    for layer, ref_layer in zip(cache.layers, ref.layers):
        assert layer.keys.shape == ref_layer.keys.shape
        assert torch.allclose(layer.keys, ref_layer.keys, atol=1e-12, rtol=0)
        assert torch.allclose(layer.values, ref_layer.values, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kept",
    [[0], [0, 1], [0, 1, 4], [0, 1, 4, 7], [0, 2, 6], [0, 3], [0, 1, 5]],
    ids=lambda k: "-".join(map(str, k)),
)
def test_keep_in_cache_matches_causal_run(target, kept):
    cache, _ = prefilled(target)
    out = forward_one(target, HAND.tokens, HAND.positions(P), cache, HAND.ancestor_mask())
    keep_in_cache(cache, P, t(kept))
    ref_cache, ref_out = path_forward(target, HAND.tokens[kept])
    assert_cache_equal(cache, ref_cache, P + len(kept))
    assert torch.allclose(out.logits[kept], ref_out.logits, atol=1e-9, rtol=0)
    # Decoding goes on identically from both caches.
    nxt = t([int(out.logits[kept[-1]].argmax())])
    pos = torch.tensor([P + len(kept)])
    a = forward_one(target, nxt, pos, cache)
    b = forward_one(target, nxt, pos, ref_cache)
    assert torch.allclose(a.logits, b.logits, atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_compact_cache_moves_each_rows_kept_entries_after_its_prefix(seed):
    """Ragged rows: row b keeps its first lengths[b] entries, then the entries region + keep[b]
    in order; the cache ends after the longest row. Checked against an explicit gather."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    batch, heads, dim, region, new = 3, 2, 4, 7, 6
    lengths = torch.tensor([7, 4, 5])
    keep = [torch.tensor(sorted(torch.randperm(new, generator=gen)[: int(n)].tolist()))
            for n in torch.randint(1, new + 1, (batch,), generator=gen)]
    if seed == 0:
        keep[0] = torch.arange(3)  # already in place: nothing to move for row 0
    cache = DynamicCache()
    keys = torch.randn(batch, heads, region + new, dim, generator=gen)
    values = torch.randn(batch, heads, region + new, dim, generator=gen)
    cache.update(keys.clone(), values.clone(), 0)
    new_lengths = compact_cache(cache, lengths, region, keep)
    assert new_lengths.tolist() == [int(n) + k.numel() for n, k in zip(lengths, keep)]
    layer = cache.layers[0]
    assert layer.keys.shape[2] == int(new_lengths.max())
    for b in range(batch):
        order = torch.cat([torch.arange(int(lengths[b])), region + keep[b]])
        assert torch.equal(layer.keys[b, :, : order.numel()], keys[b, :, order])
        assert torch.equal(layer.values[b, :, : order.numel()], values[b, :, order])


def test_truncate_cache(target):
    cache, _ = prefilled(target)
    ref, _ = prefilled(target, PROMPT[:4])
    truncate_cache(cache, 4)
    assert_cache_equal(cache, ref, 4)
    truncate_cache(cache, 10)  # longer than the cache: no-op
    assert cache.get_seq_length() == 4


def test_chunked_prefill_equals_one_pass(target):
    cache, full = prefilled(target)
    chunked = target.new_cache()
    a = forward_one(target, PROMPT[:4], torch.arange(4), chunked)
    b = forward_one(target, PROMPT[4:], torch.arange(4, P), chunked)
    assert torch.allclose(torch.cat([a.logits, b.logits]), full.logits, atol=1e-9, rtol=0)
    assert_cache_equal(chunked, cache, P)


def test_forward_outputs(target):
    _, out = prefilled(target)
    assert out.logits.dtype == torch.float32
    assert out.features.shape == (P, target.hidden_size)
    assert out.layer_features.shape == (P, len(LAYERS) * target.hidden_size)
    assert torch.allclose(out.logits, target.lm_head(out.features).float())
    full = target.model(PROMPT[None], output_hidden_states=True)
    assert torch.allclose(out.logits, full.logits[0].float(), atol=1e-6)
    expected = torch.cat([full.hidden_states[i][0] for i in LAYERS], dim=-1)
    assert torch.allclose(out.layer_features, expected, atol=1e-9)
    assert forward_one(target, PROMPT, torch.arange(P), target.new_cache()).layer_features is None


# --------------------------------------------------------------------------- masks


def test_attention_mask_causal():
    mask = attention_mask_4d(3, 2, None, torch.float64, "cpu")
    assert mask.shape == (1, 1, 2, 5)
    visible = mask[0, 0] == 0
    assert visible.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert mask[0, 0, 0, 4] == torch.finfo(torch.float64).min


def test_attention_mask_tree():
    tree_mask = HAND.ancestor_mask()
    mask = attention_mask_4d(5, HAND.size, tree_mask, torch.float32, "cpu")
    assert mask.shape == (1, 1, HAND.size, 5 + HAND.size)
    visible = mask[0, 0] == 0
    assert bool(visible[:, :5].all())
    assert torch.equal(visible[:, 5:], tree_mask)
    assert bool((mask[0, 0][~visible] == torch.finfo(torch.float32).min).all())


def test_attention_mask_with_earlier_tree_entries():
    # Drafters pass a mask over the last t entries, t > n_new: earlier expansions of this round.
    tree_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    mask = attention_mask_4d(6, 2, tree_mask, torch.float32, "cpu")
    visible = mask[0, 0] == 0
    assert visible.shape == (2, 8)
    assert bool(visible[:, :4].all())
    assert torch.equal(visible[:, 4:], tree_mask)


# --------------------------------------------------------------------------- facts


def test_target_facts(target, monkeypatch):
    assert target.vocab_size == 96
    assert target.hidden_size == 32
    assert target.num_layers == 3
    assert target.max_context == 256
    assert target.dtype == torch.float64
    assert target.device.type == "cpu"
    assert target.tokenizer is None
    assert target.eos_token_ids == set()
    monkeypatch.setattr(target.config, "eos_token_id", 5)
    assert target.eos_token_ids == {5}
    monkeypatch.setattr(target.config, "eos_token_id", [5, 9])
    assert target.eos_token_ids == {5, 9}
    monkeypatch.setattr(target.model.generation_config, "eos_token_id", 3)
    assert target.eos_token_ids == {3, 5, 9}
    assert not any(p.requires_grad for p in target.model.parameters())


def test_default_feature_layers():
    assert default_feature_layers(32) == (3, 17, 30)
    assert default_feature_layers(30) == (3, 16, 28)
    assert all(1 <= i <= 4 for i in default_feature_layers(4))


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float64") is torch.float64
    assert parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


def test_attention_backends_leave_cudnn_out_on_cuda_only():
    import contextlib

    from prism_spec.targets.attention import attention_backends

    assert isinstance(attention_backends("cpu"), contextlib.nullcontext)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends("cuda"):  # only sets backend flags: runs without a GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
