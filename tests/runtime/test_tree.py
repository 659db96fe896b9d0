"""Draft trees: hand-built trees, the EAGLE-2 builder with scripted drafters, tree configs."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import draft_one
from prism_spec.drafters.base import SingleSequenceDrafter
from prism_spec.runtime.tree import TREE_PRESETS, DraftTree, TreeConfig, ancestor_mask, chain


def t(values):
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------- hand-built trees
#
#            0 (10)
#          /        \
#      1 (11)       2 (12)
#      /    \          \
#   3 (13)  4 (14)    5 (15)
#             |
#           6 (16)
HAND = DraftTree(
    tokens=t([10, 11, 12, 13, 14, 15, 16]),
    parents=t([-1, 0, 0, 1, 1, 2, 4]),
    depths=t([0, 1, 1, 2, 2, 2, 3]),
)
HAND_ANCESTORS = [{0}, {0, 1}, {0, 2}, {0, 1, 3}, {0, 1, 4}, {0, 2, 5}, {0, 1, 4, 6}]


def mask_from_sets(sets):
    n = len(sets)
    return torch.tensor([[j in sets[i] for j in range(n)] for i in range(n)])


def test_hand_tree_ancestor_mask():
    expected = mask_from_sets(HAND_ANCESTORS)
    assert HAND.ancestor_mask().dtype == torch.bool
    assert torch.equal(HAND.ancestor_mask(), expected)
    assert torch.equal(ancestor_mask(HAND.parents, HAND.depths), expected)


def test_hand_tree_positions_paths_children():
    assert HAND.size == 7
    assert HAND.positions(100).tolist() == [100, 101, 101, 102, 102, 102, 103]
    assert HAND.positions(0).tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert HAND.leaf_paths() == [[0, 1, 3], [0, 2, 5], [0, 1, 4, 6]]
    assert HAND.children() == [[1, 2], [3, 4], [5], [], [6], [], []]


def test_tree_not_sorted_by_depth():
    # Parents before children, but depths interleaved: 0 -> 1 -> 2 and 0 -> 3 -> 4.
    tree = DraftTree(tokens=t([1, 2, 3, 4, 5]), parents=t([-1, 0, 1, 0, 3]), depths=t([0, 1, 2, 1, 2]))
    expected = mask_from_sets([{0}, {0, 1}, {0, 1, 2}, {0, 3}, {0, 3, 4}])
    assert torch.equal(tree.ancestor_mask(), expected)
    assert tree.leaf_paths() == [[0, 1, 2], [0, 3, 4]]
    assert tree.children() == [[1, 3], [2], [], [4], []]
    assert tree.positions(7).tolist() == [7, 8, 9, 8, 9]


def test_chain_tree_mask_is_causal():
    n = 6
    tree = DraftTree(tokens=torch.arange(n), parents=torch.arange(n) - 1, depths=torch.arange(n))
    assert torch.equal(tree.ancestor_mask(), torch.ones(n, n, dtype=torch.bool).tril())
    assert tree.leaf_paths() == [list(range(n))]


def test_root_only():
    tree = DraftTree.root_only(42)
    assert tree.tokens.tolist() == [42]
    assert tree.parents.tolist() == [-1]
    assert tree.depths.tolist() == [0]
    assert torch.equal(tree.ancestor_mask(), torch.ones(1, 1, dtype=torch.bool))
    assert tree.positions(9).tolist() == [9]
    assert tree.leaf_paths() == [[0]]
    assert tree.children() == [[]]


# --------------------------------------------------------------------------- tree configs


def test_tree_config_parse():
    assert TreeConfig.parse("paper") == TreeConfig(depth=5, top_k=10, total_tokens=60)
    assert TreeConfig.parse("cpu") == TREE_PRESETS["cpu"]
    assert TreeConfig.parse("serving") == TreeConfig(depth=5, top_k=4, total_tokens=16)
    assert TreeConfig.parse("chain:4") == TreeConfig(depth=3, top_k=1, total_tokens=5)
    assert TreeConfig.parse("chain:1") == TreeConfig(depth=0, top_k=1, total_tokens=2)
    assert TreeConfig.parse("30/4/6") == TreeConfig(depth=4, top_k=6, total_tokens=30)
    assert chain(3) == TreeConfig(depth=2, top_k=1, total_tokens=4)
    assert TreeConfig(depth=5).max_depth == 6


@pytest.mark.parametrize("spec", ["bogus", "", "60/5", "60/5/10/1", "a/b/c", "chain:0", "chain:x", "0/1/1", "10/-1/2"])
def test_tree_config_parse_rejects(spec):
    with pytest.raises(ValueError):
        TreeConfig.parse(spec)


def test_tree_config_parse_message():
    with pytest.raises(ValueError, match="bad tree spec 'bogus'"):
        TreeConfig.parse("bogus")


@pytest.mark.parametrize("kwargs", [dict(depth=-1), dict(top_k=0), dict(total_tokens=0), dict(top_k=-3)])
def test_tree_config_rejects_bad_shapes(kwargs):
    with pytest.raises(ValueError, match="invalid tree shape"):
        TreeConfig(**kwargs)


def test_chain_rejects_empty():
    with pytest.raises(ValueError):
        chain(0)


# --------------------------------------------------------------------------- the builder

V = 8


def log_probs(spec: dict[int, float]) -> torch.Tensor:
    """Logits whose softmax gives ``spec`` and spreads the remaining mass evenly."""
    rest = (1.0 - sum(spec.values())) / (V - len(spec))
    return torch.tensor([math.log(spec.get(i, rest)) for i in range(V)])


class ScriptedDrafter(SingleSequenceDrafter):
    """Next-token logits depend only on the token being expanded; records every expand call."""

    def __init__(self, table: dict[int, dict[int, float]]):
        self.table = table
        self.calls = []

    def begin_one(self, prompt_ids, first_token, features):  # pragma: no cover - not used here
        raise NotImplementedError

    def extend_one(self, tokens, features):  # pragma: no cover - not used here
        raise NotImplementedError

    def expand_one(self, tokens, parent_slots, tree_mask, depth):
        self.calls.append(
            dict(tokens=tokens.tolist(), parent_slots=parent_slots.tolist(), tree_mask=tree_mask.clone(), depth=depth)
        )
        return torch.stack([log_probs(self.table[int(x)]) for x in tokens])

    def end_round(self):
        pass


ROOT = 99
ROOT_LOGITS = log_probs({3: 0.6, 5: 0.3})
TABLE = {
    3: {1: 0.7, 2: 0.2},  # cumulative 0.42, 0.12
    5: {4: 0.9, 6: 0.05},  # 0.27, 0.015
    1: {7: 0.5, 0: 0.4},  # 0.21, 0.168
    4: {2: 0.8, 3: 0.1},  # 0.216, 0.027
}


def test_draft_tree_scripted():
    drafter = ScriptedDrafter(TABLE)
    tree = draft_one(drafter, ROOT, ROOT_LOGITS, TreeConfig(depth=2, top_k=2, total_tokens=6))
    # Candidates by cumulative probability: 3 (.6), 1 (.42), 5 (.3), 4 (.27), 2 under 4 (.216) |
    # 7 (.21), 0 (.168), 2 under 3 (.12), 3 under 4 (.027), 6 (.015).
    assert tree.tokens.tolist() == [ROOT, 3, 5, 1, 4, 2]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    # Expansion 1: the two first-level nodes, both children of the root.
    # Expansion 2: the two best depth-2 candidates, 1 (child of slot 0) and 4 (child of slot 1).
    assert [c["depth"] for c in drafter.calls] == [1, 2]
    assert drafter.calls[0]["tokens"] == [3, 5]
    assert drafter.calls[0]["parent_slots"] == [-1, -1]
    assert torch.equal(drafter.calls[0]["tree_mask"], torch.eye(2, dtype=torch.bool))
    assert drafter.calls[1]["tokens"] == [1, 4]
    assert drafter.calls[1]["parent_slots"] == [0, 1]
    assert torch.equal(drafter.calls[1]["tree_mask"], torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool))


def test_draft_tree_scripted_takes_every_candidate_when_budget_allows():
    drafter = ScriptedDrafter(TABLE)
    tree = draft_one(drafter, ROOT, ROOT_LOGITS, TreeConfig(depth=2, top_k=2, total_tokens=100))
    # 2 + 4 + 4 candidates, by depth, score order within a depth.
    assert tree.tokens.tolist() == [ROOT, 3, 5, 1, 4, 2, 6, 2, 7, 0, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 1, 2, 4, 3, 3, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


def test_draft_tree_root_only_and_first_level_only():
    drafter = ScriptedDrafter(TABLE)
    tree = draft_one(drafter, ROOT, ROOT_LOGITS, TreeConfig(depth=2, top_k=2, total_tokens=1))
    assert tree.tokens.tolist() == [ROOT] and tree.parents.tolist() == [-1] and tree.depths.tolist() == [0]
    tree = draft_one(drafter, ROOT, ROOT_LOGITS, TreeConfig(depth=0, top_k=3, total_tokens=10))
    assert drafter.calls == []
    assert tree.tokens[:3].tolist() == [ROOT, 3, 5]  # then one of the even-rest tokens
    assert tree.parents.tolist() == [-1, 0, 0, 0]
    assert tree.depths.tolist() == [0, 1, 1, 1]


def test_draft_tree_chain_follows_top1():
    drafter = ScriptedDrafter(TABLE)
    tree = draft_one(drafter, ROOT, ROOT_LOGITS, chain(3))
    assert tree.tokens.tolist() == [ROOT, 3, 1, 7]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert [c["tokens"] for c in drafter.calls] == [[3], [1]]
    assert [c["parent_slots"] for c in drafter.calls] == [[-1], [0]]
    assert torch.equal(drafter.calls[1]["tree_mask"], torch.ones(1, 2, dtype=torch.bool))


class RecordingRandomDrafter(SingleSequenceDrafter):
    def __init__(self, vocab: int, seed: int, offset: int = 0):
        self.vocab, self.offset = vocab, offset
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def begin_one(self, prompt_ids, first_token, features):  # pragma: no cover - not used here
        raise NotImplementedError

    def extend_one(self, tokens, features):  # pragma: no cover - not used here
        raise NotImplementedError

    def expand_one(self, tokens, parent_slots, tree_mask, depth):
        logits = 3 * torch.randn(tokens.numel(), self.vocab, generator=self.gen)
        self.calls.append((tokens.clone(), parent_slots.clone(), tree_mask.clone(), depth, logits))
        return logits

    def end_round(self):
        pass

    def to_target_ids(self, draft_ids):
        return draft_ids + self.offset


def reference_tree(root_logits, calls, cfg, offset=0):
    """An independent EAGLE-2 reference keyed by token paths: the expected frontier of each
    expansion and the expected set of chosen nodes (path -> cumulative score)."""
    k = min(cfg.top_k, root_logits.numel())
    logp = torch.log_softmax(root_logits.float(), -1)
    top = logp.topk(k)
    cands = {(int(tok) + offset,): s for s, tok in zip(top.values, top.indices)}
    level = dict(cands)
    slots: list[tuple] = []
    expected_frontiers = []
    for tokens, _, _, _, logits in calls:
        frontier = sorted(level, key=lambda p: -float(level[p]))[:k]
        expected_frontiers.append(frontier)
        slots.extend(frontier)
        level = {}
        child_logp = torch.log_softmax(logits.float(), -1)
        for row, path in enumerate(frontier):
            top = child_logp[row].topk(k)
            for s, tok in zip(top.values, top.indices):
                level[path + (int(tok) + offset,)] = cands[path] + s
        cands.update(level)
    budget = cfg.total_tokens - 1
    chosen = sorted(cands, key=lambda p: (-float(cands[p]), len(p)))[:budget]
    return expected_frontiers, slots, set(chosen)


@pytest.mark.parametrize(
    "cfg",
    [
        TreeConfig(depth=3, top_k=3, total_tokens=10),
        TreeConfig(depth=5, top_k=10, total_tokens=60),
        TreeConfig(depth=4, top_k=3, total_tokens=8),
        TreeConfig(depth=2, top_k=4, total_tokens=200),
        TreeConfig(depth=3, top_k=1, total_tokens=4),
        TreeConfig(depth=6, top_k=2, total_tokens=5),
    ],
    ids=str,
)
@pytest.mark.parametrize("seed", range(4))
def test_draft_tree_matches_reference(cfg, seed):
    vocab, offset = 50, (1000 if seed % 2 else 0)
    drafter = RecordingRandomDrafter(vocab, seed, offset)
    root_logits = 3 * torch.randn(vocab, generator=torch.Generator().manual_seed(100 + seed))
    tree = draft_one(drafter, 7, root_logits, cfg)

    # Shape: root first, parents before children, depths consistent, budget respected.
    n = tree.size
    assert n == min(cfg.total_tokens, 1 + cfg.top_k + cfg.depth * cfg.top_k**2)
    assert tree.tokens[0] == 7 and tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i
        assert tree.depths[i] == tree.depths[p] + 1
    assert tree.depths.tolist() == sorted(tree.depths.tolist())
    assert int(tree.depths.max()) <= cfg.max_depth
    if offset:
        assert bool((tree.tokens[1:] >= offset).all())
    # Siblings are distinct tokens.
    for kids in tree.children():
        toks = tree.tokens[kids].tolist()
        assert len(set(toks)) == len(toks)

    # The expansions and the chosen nodes match an independent reference.
    assert len(drafter.calls) == cfg.depth
    frontiers, slots, chosen = reference_tree(root_logits, drafter.calls, cfg, offset)
    slot_of = {path: i for i, path in enumerate(slots)}
    for d, ((tokens, parent_slots, tree_mask, depth, _), frontier) in enumerate(zip(drafter.calls, frontiers)):
        assert depth == d + 1
        assert tokens.tolist() == [path[-1] for path in frontier]
        assert parent_slots.tolist() == [slot_of.get(path[:-1], -1) for path in frontier]
        first = slot_of[frontier[0]]
        assert tree_mask.shape == (len(frontier), first + len(frontier))
        for row, path in enumerate(frontier):
            visible = {slot_of[path[:j]] for j in range(1, len(path) + 1)}
            assert tree_mask[row].nonzero().flatten().tolist() == sorted(visible)
    paths = []
    for i in range(1, n):
        anc = tree.ancestor_mask()[i].nonzero().flatten().tolist()
        paths.append(tuple(tree.tokens[anc[1:]].tolist()))
    assert len(set(paths)) == len(paths)
    assert set(paths) == chosen
