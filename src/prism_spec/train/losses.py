"""Per-position loss terms shared by the drafter objectives.

Every function works on rows that were already gathered at the masked positions ([N, ...]);
the objectives reduce them (sum / count). Logits are upcast to at least float32 before any
softmax, so bf16 / fp16 training stays stable; float64 stays float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..drafters.feature import draft_ids_for


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the type itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def smooth_l1_per_position(predicted: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """EAGLE's feature loss: SmoothL1 (Huber, beta 1) averaged over the hidden dimension -> [N]."""
    dtype = accumulation_dtype(predicted.dtype)
    return F.smooth_l1_loss(predicted.to(dtype), target.to(dtype), reduction="none", beta=beta).mean(-1)


def soft_cross_entropy(draft_log_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v) per row -> [N]. Equals KL(p || q) + H(p): same gradient as the KL."""
    return -(target_probs * draft_log_probs).sum(-1)


def topk_cross_entropy(draft_log_probs: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """HASS's top-K distillation term: -sum over the target's top-K tokens of p(v) log q(v) -> [N].

    ``topk_probs`` are the target's probabilities of its K most likely tokens, NOT renormalised
    over the K (the formula of the HASS paper / design notes): rows where the target is
    confident weigh more than rows where its mass is spread beyond the top K.
    """
    return -(topk_probs * draft_log_probs.gather(-1, topk_ids)).sum(-1)


@dataclass
class TargetDistribution:
    """The target's next-token distribution p at the masked rows, computed once per batch and
    reused by every aligned pass.

    When the drafter scores with the same frozen head (W, b) as the target (feature drafters),
    only ``p @ W`` (and ``p . b``) is kept instead of p itself: the soft CE is then
    ``logsumexp(z) - p . z`` with ``p . z = (p @ W) . x + p . b`` for draft logits z = W x + b,
    which needs no [N, V] product or copy per pass and frees p after the target side is done.

    Reduced draft vocabulary (``d2t``, EAGLE-3): p is the target distribution *restricted to
    the draft vocabulary and renormalised*, p_d(i) = softmax(z_target[d2t])_i, as EAGLE-3 trains
    it; the soft CE and top-K terms are then over the N draft ids. (Not renormalising would give
    the same per-row loss scaled by the target's mass inside the draft vocabulary.) ``argmax`` stays the target's
    full-vocabulary argmax, stored as a draft id (-1 when it is not in the draft vocabulary):
    the accuracy metric counts a row right only if d2t[drafter argmax] == target argmax.
    Unlike EAGLE-3, rows whose target argmax is outside the draft vocabulary are kept in the
    CE (their restricted distribution is still a valid teacher).
    """

    argmax: torch.Tensor | None  # [N] long (a draft id, -1 = none, with a reduced vocabulary); None: not wanted
    probs: torch.Tensor | None = None  # [N, V] (generic path: a drafter with its own head)
    head_proj: torch.Tensor | None = None  # [N, h] p @ W (shared-head path)
    head_bias: torch.Tensor | None = None  # [N] p . b, when the head has a bias
    topk_ids: torch.Tensor | None = None  # [N, K]
    topk_probs: torch.Tensor | None = None  # [N, K]

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls, logits: torch.Tensor, topk: int = 0, head: nn.Module | None = None, d2t: torch.Tensor | None = None,
        with_argmax: bool = True,
    ) -> TargetDistribution:
        """From the target's logits [N, V]; with ``head`` (an nn.Linear the drafter shares, or
        any object with ``weight`` [V or N, h] / ``bias``), keep p @ W instead of p. With ``d2t``
        (a sorted draft -> target id map [N]) p is restricted to those ids and renormalised,
        and ``head`` must be the drafter's head over the draft vocabulary (rows d2t).
        ``with_argmax=False``: no argmax (the loss does not need it; nor do the accuracy
        metrics of steps nobody logs), so ``logits`` may already be the draft rows alone."""
        logits = logits.detach().to(accumulation_dtype(logits.dtype))
        argmax = None
        if d2t is not None:
            d2t = d2t.to(logits.device)
            if with_argmax:
                argmax = draft_ids_for(logits.max(-1).indices, d2t)
            logits = logits[:, d2t]
        elif with_argmax:
            argmax = logits.max(-1).indices
        probs = torch.softmax(logits, dim=-1)
        ids = vals = None
        if topk > 0:
            vals, ids = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        if head is None:
            return cls(argmax, probs, None, None, ids, vals)
        proj = probs @ head.weight.detach().to(probs.dtype)
        bias = getattr(head, "bias", None)
        bias = probs @ bias.detach().to(probs.dtype) if bias is not None else None
        return cls(argmax, None, proj, bias, ids, vals)

    def select(self, rows: torch.Tensor) -> TargetDistribution:
        """The rows picked by a bool [N] or index tensor."""
        pick = lambda t: None if t is None else t[rows]
        return TargetDistribution(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def distillation_terms(
    draft_logits: torch.Tensor, target: TargetDistribution, draft_features: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-row soft CE, optional top-K CE and argmax agreement (``correct``, when the target
    distribution has its argmax) for draft logits [N, V].

    ``draft_features`` [N, h] (the head's input) is needed on the shared-head path."""
    z = draft_logits.to(accumulation_dtype(draft_logits.dtype))
    out = {} if target.argmax is None else {"correct": z.detach().max(-1).indices == target.argmax}
    if target.head_proj is not None:
        if draft_features is None:
            raise ValueError("this target distribution keeps p @ W: pass the draft features too")
        lse = torch.logsumexp(z, dim=-1)
        dot = (draft_features.to(target.head_proj.dtype) * target.head_proj).sum(-1)
        if target.head_bias is not None:
            dot = dot + target.head_bias
        out["ce"] = lse - dot
        if target.topk_ids is not None:
            log_q_top = z.gather(-1, target.topk_ids) - lse[:, None]
            out["topk"] = -(target.topk_probs * log_q_top).sum(-1)
        return out
    log_q = torch.log_softmax(z, dim=-1)
    out["ce"] = soft_cross_entropy(log_q, target.probs)
    if target.topk_ids is not None:
        out["topk"] = topk_cross_entropy(log_q, target.topk_ids, target.topk_probs)
    return out


def masked_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    """Sum over already-gathered rows divided by their count (0 when there are none, no NaN)."""
    return values.sum() / max(int(count), 1)
