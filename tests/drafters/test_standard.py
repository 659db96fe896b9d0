"""The standard drafter: a truncated copy of the target with its own KV cache."""

from __future__ import annotations

import pytest
import torch

from helpers import begin_one, draft_one, expand_one, extend_one, forward_one, record_expand, tiny_llama
from prism_spec.drafters import DrafterMismatchError, StandardDrafter
from prism_spec.runtime.tree import TreeConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([3, 91, 14, 15, 92, 65, 35, 89])
TREE = TreeConfig(depth=3, top_k=3, total_tokens=14)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=4, seed=21)


def causal_logits(lm, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ``lm`` (a Target) over ``tokens`` from an empty cache."""
    return forward_one(lm, tokens, torch.arange(tokens.numel()), lm.new_cache()).logits[-1]


def slot_paths(calls) -> list[list[int]]:
    """Token path (after the root) of every expanded slot, in slot order."""
    paths: list[list[int]] = []
    for tokens, parent_slots, _, _ in calls:
        paths.extend((paths[p] if p >= 0 else []) + [tok] for tok, p in zip(tokens, parent_slots))
    return paths


def chain_expand(drafter, path: list[int]) -> torch.Tensor:
    """Expand ``path`` one node at a time as a chain; return the last node's logits."""
    for i, tok in enumerate(path):
        logits = expand_one(
            drafter, torch.tensor([tok]), torch.tensor([i - 1]), torch.ones(1, i + 1, dtype=torch.bool), i + 1
        )
    drafter.end_round()
    return logits[0]


def test_from_target_layers_bounds(target):
    for n in (0, -1, target.num_layers + 1):
        with pytest.raises(ValueError, match="num_layers"):
            StandardDrafter.from_target_layers(target, n)


def test_from_target_layers_shares_weights(target):
    drafter = StandardDrafter.from_target_layers(target, 2)
    assert drafter.lm.num_layers == 2
    assert drafter.lm.vocab_size == target.vocab_size
    assert drafter.lm.dtype == target.dtype
    assert drafter.lm.embed_tokens.weight.data_ptr() == target.embed_tokens.weight.data_ptr()
    assert drafter.lm.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    for mine, theirs in zip(drafter.lm.decoder.layers, target.decoder.layers):
        for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
            assert a.data_ptr() == b.data_ptr(), name
    assert target.num_layers == 4  # the target itself is untouched


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_truncated_copy_computes_the_first_layers(target, num_layers):
    drafter = StandardDrafter.from_target_layers(target, num_layers)
    tokens = torch.cat([PROMPT, torch.tensor([7])])
    got = begin_one(drafter, PROMPT, 7, None)
    hidden = target.model.model(tokens[None], output_hidden_states=True).hidden_states[num_layers][0, -1]
    if num_layers < target.num_layers:  # the last entry of hidden_states is already normed
        hidden = target.model.model.norm(hidden)
    expected = target.lm_head(hidden).float()
    assert torch.allclose(got, expected, atol=1e-9, rtol=0)
    if num_layers == target.num_layers:
        assert torch.allclose(got, causal_logits(target, tokens), atol=1e-9, rtol=0)


def test_check_target_vocabulary(target):
    drafter = StandardDrafter.from_target_layers(target, 1)
    drafter.check_target(target)  # its own target: fine
    drafter.check_target(tiny_llama(layers=2, hidden_size=48, seed=1))  # hidden size may differ
    with pytest.raises(DrafterMismatchError, match="vocabulary of 96 tokens.*has 80"):
        drafter.check_target(tiny_llama(vocab_size=80, layers=1, seed=1))


@pytest.mark.parametrize("num_layers", [2, 4])
def test_rounds_match_causal_runs(target, num_layers):
    """begin / expand / end_round / extend over several rounds: every logit the drafter returns
    equals a fresh causal run of its model over the same committed tokens (plus tree path)."""
    drafter = StandardDrafter.from_target_layers(target, num_layers)
    committed = torch.cat([PROMPT, torch.tensor([7])])
    root_logits = begin_one(drafter, PROMPT, 7, None)
    assert torch.allclose(root_logits, causal_logits(drafter.lm, committed), atol=1e-9, rtol=0)
    for round_ in range(3):
        calls = record_expand(drafter)
        tree = draft_one(drafter, int(committed[-1]), root_logits, TREE)
        drafter.end_round()
        del drafter.expand
        assert drafter.kv.cache.get_seq_length() == committed.numel() == int(drafter.kv.lengths[0])
        assert len(calls) == TREE.depth
        paths = slot_paths(calls)
        logits = torch.cat([out for *_, out in calls])
        for path, row in zip(paths, logits):
            seq = torch.cat([committed, torch.tensor(path)])
            assert torch.allclose(row, causal_logits(drafter.lm, seq), atol=1e-9, rtol=0)
            assert torch.allclose(row, chain_expand(drafter, path), atol=1e-9, rtol=0)
        assert drafter.kv.cache.get_seq_length() == committed.numel()
        # Commit a tree path plus a bonus token, as the decode loop would.
        leaf = tree.leaf_paths()[round_]
        new = torch.cat([tree.tokens[leaf[1:]], torch.tensor([round_ + 1])])
        committed = torch.cat([committed, new])
        root_logits = extend_one(drafter, new, None)
        assert torch.allclose(root_logits, causal_logits(drafter.lm, committed), atol=1e-9, rtol=0)
        assert int(drafter.kv.lengths[0]) == committed.numel()


def test_begin_resets(target):
    drafter = StandardDrafter.from_target_layers(target, 2)
    first = begin_one(drafter, PROMPT, 7, None)
    extend_one(drafter, torch.tensor([1, 2, 3]), None)
    again = begin_one(drafter, PROMPT, 7, None)
    assert torch.equal(first, again)
    assert int(drafter.kv.lengths[0]) == PROMPT.numel() + 1
