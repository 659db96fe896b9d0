"""Draft trees: the EAGLE-2 dynamic tree builder and the tensors verification needs.

A tree is stored flat, parents before children: node 0 is the root (the last committed
token, not yet in the target's cache), every other node is a drafted token with the index of
its parent. From that we derive the ancestor mask, depth-based position ids and
root-to-leaf paths. All functions are pure over tensors and unit-tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..drafters.base import Drafter


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 tree shape: ``depth`` expansion steps after the first level, ``top_k``
    branching, ``total_tokens`` nodes verified per round including the root."""

    depth: int = 5
    top_k: int = 10
    total_tokens: int = 60

    def __post_init__(self):
        if self.depth < 0 or self.top_k < 1 or self.total_tokens < 1:
            raise ValueError(f"invalid tree shape {self}: need depth >= 0, top_k >= 1, total_tokens >= 1")

    @property
    def max_depth(self) -> int:
        """Deepest drafted level (the first level counts as depth 1)."""
        return self.depth + 1

    @classmethod
    def parse(cls, spec: str) -> "TreeConfig":
        """``paper``, ``cpu``, ``chain:N`` or ``total/depth/top_k`` such as ``60/5/10``."""
        if spec in TREE_PRESETS:
            return TREE_PRESETS[spec]
        if spec.startswith("chain:"):
            return chain(int(spec.split(":", 1)[1]))
        try:
            total, depth, top_k = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(
                f"bad tree spec {spec!r}: use one of {sorted(TREE_PRESETS)}, chain:N or TOTAL/DEPTH/TOP_K"
            ) from None
        return cls(depth=depth, top_k=top_k, total_tokens=total)


def chain(n_draft: int) -> TreeConfig:
    """Top-1 path of ``n_draft`` drafted tokens."""
    if n_draft < 1:
        raise ValueError("a chain needs at least one drafted token")
    return TreeConfig(depth=n_draft - 1, top_k=1, total_tokens=n_draft + 1)


TREE_PRESETS = {
    # What the paper uses for acceptance-length measurements.
    "paper": TreeConfig(depth=5, top_k=10, total_tokens=60),
    # The paper's end-to-end serving shape.
    "serving": TreeConfig(depth=5, top_k=4, total_tokens=16),
    # Small trees: on a CPU the verify forward costs grow quickly with the number of nodes.
    "cpu": TreeConfig(depth=4, top_k=3, total_tokens=8),
}


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [n] long, node 0 = root
    parents: torch.Tensor  # [n] long, -1 for the root; parents[i] < i
    depths: torch.Tensor  # [n] long, 0 for the root
    scores: torch.Tensor | None = None  # [n] cumulative drafter log-probability (root 0)

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @classmethod
    def root_only(cls, token: int, device="cpu") -> "DraftTree":
        return cls(
            torch.tensor([token], device=device),
            torch.tensor([-1], device=device),
            torch.zeros(1, dtype=torch.long, device=device),
        )

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: entry (i, j) is True when j is i or an ancestor of i (computed once)."""
        if "_ancestors" not in self.__dict__:
            self.__dict__["_ancestors"] = ancestor_mask(self.parents, self.depths)
        return self.__dict__["_ancestors"]

    def positions(self, root_position: int) -> torch.Tensor:
        return self.depths + root_position

    def leaf_paths(self) -> list[list[int]]:
        """Root-to-leaf node index paths (for tests and debugging)."""
        is_parent = torch.zeros(self.size, dtype=torch.bool)
        is_parent[self.parents[self.parents >= 0].cpu()] = True
        anc = self.ancestor_mask().cpu()
        return [anc[i].nonzero().flatten().tolist() for i in range(self.size) if not is_parent[i]]

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                kids[p].append(i)
        return kids


def ancestor_mask(parents: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    # One vectorised step per level: a node sees what its parent sees, plus itself.
    for d in range(1, int(depths.max()) + 1 if n else 0):
        nodes = (depths == d).nonzero().flatten()
        mask[nodes] |= mask[parents[nodes]]
    return mask


def draft_tree(drafter: "Drafter", root_token: int, root_logits: torch.Tensor, cfg: TreeConfig) -> DraftTree:
    """Build an EAGLE-2 dynamic tree with ``drafter``.

    ``root_logits`` is the drafter's distribution for the token after the root. Each
    expansion runs the drafter once over the current frontier (top_k nodes by cumulative
    log-probability); every child proposed stays a candidate, and the best
    ``total_tokens - 1`` candidates form the tree.
    """
    device = root_logits.device
    k = min(cfg.top_k, root_logits.shape[-1])
    budget = cfg.total_tokens - 1
    if budget == 0:
        return DraftTree.root_only(root_token, device)

    logp = torch.log_softmax(root_logits.float(), dim=-1)
    scores, tokens = logp.topk(k)
    tokens = drafter.to_target_ids(tokens)
    # Candidate store, flat: token, cumulative score, parent candidate (-1 = root), depth.
    cand_tokens, cand_scores = [tokens], [scores]
    cand_parents = [torch.full((k,), -1, dtype=torch.long, device=device)]
    cand_depths = [torch.ones(k, dtype=torch.long, device=device)]
    n_cands = k

    frontier = torch.arange(k, device=device)  # candidate indices of the nodes to expand
    frontier_parent_slot = torch.full((k,), -1, dtype=torch.long, device=device)
    slot_mask = torch.zeros(0, 0, dtype=torch.bool, device=device)  # ancestry among expanded nodes
    for depth in range(1, cfg.depth + 1):
        n_slots = slot_mask.shape[0]
        # Rows for the new slots: the parent's row plus the new slot itself.
        new_rows = torch.zeros(k, n_slots + k, dtype=torch.bool, device=device)
        has_parent = frontier_parent_slot >= 0
        if n_slots:
            new_rows[has_parent, :n_slots] = slot_mask[frontier_parent_slot[has_parent]]
        new_rows[:, n_slots:] = torch.eye(k, dtype=torch.bool, device=device)
        slot_mask = torch.cat(
            [torch.cat([slot_mask, torch.zeros(n_slots, k, dtype=torch.bool, device=device)], 1), new_rows], 0
        )
        all_tokens = torch.cat(cand_tokens)
        all_scores = torch.cat(cand_scores)
        logits = drafter.expand(all_tokens[frontier], frontier_parent_slot, new_rows, depth)
        child_logp, child_idx = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [k, k]
        cum = all_scores[frontier][:, None] + child_logp
        cand_tokens.append(drafter.to_target_ids(child_idx).flatten())
        cand_scores.append(cum.flatten())
        cand_parents.append(frontier.repeat_interleave(k))
        cand_depths.append(torch.full((k * k,), depth + 1, dtype=torch.long, device=device))
        # Slots of this step are n_slots .. n_slots + k - 1, in frontier order.
        best = cum.flatten().topk(k).indices
        frontier_parent_slot = n_slots + best // k
        frontier = n_cands + best
        n_cands += k * k

    all_tokens = torch.cat(cand_tokens)
    all_scores = torch.cat(cand_scores)
    all_parents = torch.cat(cand_parents)
    all_depths = torch.cat(cand_depths)
    # Order by score, shallower first on ties: a child never outscores its parent, so every
    # prefix of this order is ancestor-closed.
    order = all_depths.argsort(stable=True)
    order = order[all_scores[order].argsort(descending=True, stable=True)]
    chosen = order[: min(budget, order.numel())]
    # Parents before children: sort the chosen set by depth (stable keeps score order).
    chosen = chosen[all_depths[chosen].argsort(stable=True)]
    tree_index = torch.full((all_tokens.numel(),), -1, dtype=torch.long, device=device)
    tree_index[chosen] = torch.arange(1, chosen.numel() + 1, device=device)
    parent_cand = all_parents[chosen]
    parents = torch.where(parent_cand >= 0, tree_index[parent_cand.clamp(min=0)], torch.zeros_like(parent_cand))
    return DraftTree(
        tokens=torch.cat([torch.tensor([root_token], device=device), all_tokens[chosen]]),
        parents=torch.cat([torch.tensor([-1], device=device), parents]),
        depths=torch.cat([torch.zeros(1, dtype=torch.long, device=device), all_depths[chosen]]),
        scores=torch.cat([torch.zeros(1, device=device), all_scores[chosen]]),
    )
