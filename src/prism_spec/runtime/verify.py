"""Sampling settings and the two lossless acceptance rules.

Both rules take the tree and the target's logits at every tree node and return the accepted
root-to-node path (node indices, root first) and the bonus token sampled after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import DraftTree


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, then top-k, then top-p."""
    logits = logits.double() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class NodeLogits:
    """One tree's target logits, computed per node on first use: both acceptance rules only
    look at the nodes on the path they walk (about AL of them), so on a CPU the LM head's
    vocabulary-wide product for every other node is never paid. Indexing by node gives [V]."""

    def __init__(self, target, features: torch.Tensor):
        self.target, self.features = target, features  # [n, h]: the tree nodes' last hidden states
        self._rows: dict[int, torch.Tensor] = {}

    def __getitem__(self, node: int) -> torch.Tensor:
        row = self._rows.get(node)
        if row is None:
            row = self._rows[node] = self.target.logits(self.features[node : node + 1])[0]
        return row


def verify_greedy(tree: DraftTree, logits) -> tuple[list[int], int]:
    """Longest path whose every node equals the target's argmax at its parent: walk from the
    root, following the child that holds the argmax (siblings are distinct tokens, so there
    is at most one). ``logits[node]`` gives a node's logits: a [n, V] tensor or NodeLogits."""
    tokens = tree.tokens.tolist()
    children = tree.children()
    node, path = 0, [0]
    while True:
        best = int(logits[node].argmax())
        follow = next((c for c in children[node] if tokens[c] == best), None)
        if follow is None:
            return path, best
        node = follow
        path.append(node)


def verify_sampling(
    tree: DraftTree, logits, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Multi-candidate recursive rejection sampling for deterministic (top-k) drafts.

    At the current node, try its children in tree order: accept child x with probability
    p(x) under the residual distribution; on rejection zero p(x) and renormalise. If every
    child fails (or there is none) the bonus is drawn from the residual. The committed token
    at each depth is therefore distributed exactly as p, whatever the drafter proposed.
    """
    tokens = tree.tokens.tolist()
    children = tree.children()
    node, path = 0, [0]
    while True:
        # Only the nodes on the walked path need their distribution.
        p = target_probs(logits[node], cfg).cpu()
        mass = 1.0  # residual probability left after the rejections so far
        next_node = None
        for child in children[node]:
            x = tokens[child]
            px = float(p[x])
            if float(torch.rand((), generator=generator, dtype=torch.float64)) * mass < px:
                next_node = child
                break
            mass -= px
            p[x] = 0.0
        if next_node is None:
            # Unnormalised residual; multinomial normalises. A token of probability 1 is
            # always accepted, so some mass is left here.
            return path, int(torch.multinomial(p, 1, generator=generator))
        node = next_node
        path.append(node)
