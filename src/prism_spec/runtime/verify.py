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


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (the first index on ties, NaN counting as the largest), on the
    CPU through NumPy: torch's CPU argmax does not vectorise, and for the default target's
    49k-token rows NumPy's is 5-8x faster (``benchmarks/round_ops.py``)."""
    if logits.device.type != "cpu" or logits.requires_grad or not logits.dtype.is_floating_point:
        return logits.argmax(dim=-1)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # exact and order-preserving for bf16 / fp16
    return torch.as_tensor(logits.numpy().argmax(axis=-1))


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose every node equals the target's argmax at its parent."""
    if tree.size == 1:  # the root alone (vanilla decoding, prefill): its argmax is the token
        return [0], int(argmax_rows(logits[0]))
    return greedy_path(tree, argmax_rows(logits))


def greedy_path(tree: DraftTree, argmax: torch.Tensor) -> tuple[list[int], int]:
    """:func:`verify_greedy` given the target's greedy token after every node (``argmax`` [n]):
    the accepted path (node indices from the root) and the bonus token after it."""
    parents = tree.parents.clamp(min=0)
    correct = tree.tokens == argmax[parents]
    correct[0] = True
    anc = tree.ancestor_mask()
    on_good_path = ~(anc & ~correct[None, :]).any(dim=-1)
    # Siblings are distinct tokens, so at most one good node per depth: the deepest is unique.
    best = int(torch.where(on_good_path, tree.depths, -1).argmax())
    path = anc[best].nonzero().flatten().tolist()  # ancestors in index order = depth order
    return path, int(argmax[best])


def verify_sampling(
    tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
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
