"""Additive attention masks for new tokens on top of a KV cache: ragged batches (each row sees
its own committed entries), draft trees (each node sees its ancestors), sliding windows, and
static caches whose keys span the whole preallocated buffer."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import StaticCache


def batch_attention_mask(
    lengths: torch.Tensor | None,
    past_len: int,
    n_new: int,
    tree_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Additive 4D mask [B, 1, n_new, past_len + n_new] for new tokens on top of a cache.

    The cache holds a committed region followed by this round's tree entries. ``tree_mask``
    (bool, [B, n_new, t]) says which of the last ``t`` entries (the tree entries, the new ones
    included) each new token may see; without it the new tokens are causal among themselves.
    In the committed region row b sees its first ``lengths[b]`` entries (rows are ragged: the
    rest is padding); ``lengths=None`` means all of it.

    ``window`` (sliding-window attention): a token at position p also sees only keys at
    positions above ``p - window``, as transformers' sliding masks do. Committed entry i sits
    at position i and the new tokens at ``positions`` [B, n_new]."""
    if tree_mask is None:
        tree_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()[None]
    batch = tree_mask.shape[0] if lengths is None else lengths.shape[0]
    t = tree_mask.shape[-1]
    tree_mask = tree_mask.to(device).expand(batch, n_new, t)
    region = past_len + n_new - t
    if lengths is None:
        committed = torch.ones(batch, region, dtype=torch.bool, device=device)
    else:
        committed = torch.arange(region, device=device)[None, :] < lengths.to(device)[:, None]
    visible = torch.cat([committed[:, None, :].expand(batch, n_new, region), tree_mask], dim=-1)
    if window is not None:
        if positions is None:
            raise ValueError("a sliding-window mask needs the new tokens' positions")
        positions = positions.to(device).expand(batch, n_new)
        # Tree entries written by earlier forwards (a drafter's previous tree levels) lie within
        # the tree's depth of every query and stay visible: exact while the window is longer
        # than the tree is deep. A target's verify writes the whole tree at once (t == n_new).
        committed_positions = torch.arange(region, device=device).expand(batch, n_new, region)
        earlier_positions = positions[:, :, None].expand(batch, n_new, t - n_new)  # seen as the query's own
        new_positions = positions[:, None, :].expand(batch, n_new, n_new)
        key_positions = torch.cat([committed_positions, earlier_positions, new_positions], dim=-1)
        visible = visible & (positions[:, :, None] - key_positions < window)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def attention_mask_4d(
    past_len: int, n_new: int, tree_mask: torch.Tensor | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """One sequence: [1, 1, n_new, past_len + n_new]; ``tree_mask`` is [n_new, t] (see
    :func:`batch_attention_mask`; the whole committed region is visible)."""
    return batch_attention_mask(None, past_len, n_new, None if tree_mask is None else tree_mask[None], dtype, device)


def pad_ragged(rows: Sequence[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or [m, h]) tensors to one batch; returns (padded, lengths)."""
    counts = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    width = int(counts.max())
    padded = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), pad_value)
    for i, r in enumerate(rows):
        padded[i, : r.shape[0]] = r
    return padded, counts


def fit_mask_to_cache(mask: torch.Tensor, cache, dtype: torch.dtype) -> torch.Tensor:
    """On a StaticCache the keys span the whole buffer: widen the additive mask to it, the
    unwritten tail hidden. Other caches: the mask as it is."""
    if not isinstance(cache, StaticCache):
        return mask
    width = int(cache.get_max_length())
    if mask.shape[-1] > width:
        raise ValueError(f"static KV cache of {width} entries cannot take {mask.shape[-1]}")
    return torch.nn.functional.pad(mask, (0, width - mask.shape[-1]), value=torch.finfo(dtype).min)
