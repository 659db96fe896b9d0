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

from ..devices import profiled

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

    def fitting(self, room: int) -> "TreeConfig":
        """This shape cut to at most ``room`` nodes (near the end of the context)."""
        if self.total_tokens <= room:
            return self
        return TreeConfig(min(self.depth, room - 1), self.top_k, room)

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


@dataclass
class DraftTreeBatch:
    """One tree per sequence, all of the same size: [B, n] tensors."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    @classmethod
    def roots_only(cls, roots: torch.Tensor) -> "DraftTreeBatch":
        zeros = torch.zeros_like(roots)[:, None]
        return cls(roots[:, None], zeros - 1, zeros, zeros.float())

    def row(self, b: int) -> DraftTree:
        tree = DraftTree(self.tokens[b], self.parents[b], self.depths[b], self.scores[b])
        if "_ancestors" in self.__dict__:  # computed once for the verify forward: share it
            tree.__dict__["_ancestors"] = self.__dict__["_ancestors"][b]
        return tree

    def ancestor_mask(self) -> torch.Tensor:
        """[B, n, n] bool, row by row as :func:`ancestor_mask` (computed once)."""
        if "_ancestors" not in self.__dict__:
            self.__dict__["_ancestors"] = self._ancestor_mask()
        return self.__dict__["_ancestors"]

    def _ancestor_mask(self) -> torch.Tensor:
        batch, n = self.parents.shape
        if n == 1:  # roots only (vanilla decoding)
            return torch.ones(batch, 1, 1, dtype=torch.bool, device=self.parents.device)
        mask = torch.eye(n, dtype=torch.bool, device=self.parents.device).expand(batch, n, n).clone()
        parent_rows = self.parents.clamp(min=0)[..., None].expand(batch, n, n)
        for d in range(1, int(self.depths.max()) + 1):
            level = (self.depths == d)[..., None]
            mask = torch.where(level, mask | mask.gather(1, parent_rows), mask)
        return mask


def draft_tree(
    drafter: "Drafter", roots: torch.Tensor, root_logits: torch.Tensor, cfg: TreeConfig
) -> DraftTreeBatch:
    """Build an EAGLE-2 dynamic tree per sequence with ``drafter``.

    ``root_logits`` [B, V] is the drafter's distribution for the token after each root. Each
    expansion runs the drafter once over the current frontier (top_k nodes by cumulative
    log-probability); every child proposed stays a candidate, and the best
    ``total_tokens - 1`` candidates form the tree. Every row has the same number of
    candidates, so every tree has the same size.
    """
    device = root_logits.device
    batch = root_logits.shape[0]
    k = min(cfg.top_k, root_logits.shape[-1])
    budget = cfg.total_tokens - 1
    if budget == 0:
        return DraftTreeBatch.roots_only(roots)

    def full(shape, value):
        return torch.full(shape, value, dtype=torch.long, device=device)

    logp = torch.log_softmax(root_logits.float(), dim=-1)
    scores, tokens = logp.topk(k, dim=-1)  # [B, k]
    # Candidate store, flat per row: token, cumulative score, parent candidate (-1 = root),
    # depth (the same for every row).
    cand_tokens, cand_scores = [drafter.to_target_ids(tokens)], [scores]
    cand_parents, cand_depths = [full((batch, k), -1)], [full((k,), 1)]
    n_cands = k

    frontier = torch.arange(k, device=device).expand(batch, k)  # candidates to expand
    frontier_parent_slot = full((batch, k), -1)  # expansion slot of each frontier node's parent
    slot_mask = torch.zeros(batch, 0, 0, dtype=torch.bool, device=device)  # ancestry among slots
    for depth in range(1, cfg.depth + 1):
        n_slots = slot_mask.shape[1]
        # Rows for the new slots: the parent's row plus the new slot itself.
        new_rows = torch.zeros(batch, k, n_slots + k, dtype=torch.bool, device=device)
        if n_slots:
            parent_rows = slot_mask.gather(1, frontier_parent_slot.clamp(min=0)[..., None].expand(batch, k, n_slots))
            new_rows[..., :n_slots] = parent_rows & (frontier_parent_slot >= 0)[..., None]
        new_rows[..., n_slots:] = torch.eye(k, dtype=torch.bool, device=device)
        padding = torch.zeros(batch, n_slots, k, dtype=torch.bool, device=device)
        slot_mask = torch.cat([torch.cat([slot_mask, padding], 2), new_rows], 1)
        all_tokens, all_scores = torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1)
        with profiled("drafter_expand"):
            logits = drafter.expand(all_tokens.gather(1, frontier), frontier_parent_slot, new_rows, depth)
        child_logp, child_idx = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [B, k, k]
        cum = all_scores.gather(1, frontier)[..., None] + child_logp
        cand_tokens.append(drafter.to_target_ids(child_idx).flatten(1))
        cand_scores.append(cum.flatten(1))
        cand_parents.append(frontier.repeat_interleave(k, dim=1))
        cand_depths.append(full((k * k,), depth + 1))
        # This step's slots are n_slots .. n_slots + k - 1, in frontier order.
        best = cum.flatten(1).topk(k, dim=-1).indices
        frontier_parent_slot = n_slots + best // k
        frontier = n_cands + best
        n_cands += k * k

    all_tokens, all_scores = torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1)
    all_parents, all_depths = torch.cat(cand_parents, 1), torch.cat(cand_depths)
    # Order by score, shallower first on ties: a child never outscores its parent, so every
    # prefix of this order is ancestor-closed.
    by_depth = all_depths.argsort(stable=True)
    order = by_depth[all_scores[:, by_depth].argsort(dim=1, descending=True, stable=True)]
    chosen = order[:, : min(budget, n_cands)]
    # Parents before children: sort the chosen set by depth (stable keeps score order).
    chosen = chosen.gather(1, all_depths[chosen].argsort(dim=1, stable=True))
    n = chosen.shape[1]
    tree_index = full((batch, n_cands), -1)
    tree_index.scatter_(1, chosen, torch.arange(1, n + 1, device=device).expand(batch, n))
    parent_cand = all_parents.gather(1, chosen)
    parents = torch.where(parent_cand >= 0, tree_index.gather(1, parent_cand.clamp(min=0)), 0)
    zero = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return DraftTreeBatch(
        tokens=torch.cat([roots[:, None].to(device), all_tokens.gather(1, chosen)], 1),
        parents=torch.cat([zero - 1, parents], 1),
        depths=torch.cat([zero, all_depths[chosen]], 1),
        scores=torch.cat([zero.float(), all_scores.gather(1, chosen)], 1),
    )
