"""The decode loop's KV caches and what is done to them between rounds.

A round writes a draft tree's entries after the committed ones; acceptance keeps the accepted
nodes (moved down to follow the committed entries) and drops the rest. :class:`RaggedCache`
does this on a growing transformers ``DynamicCache`` for a batch of ragged sequences,
:class:`StaticKV` in place on a preallocated ``StaticCache`` (from a :class:`StaticCachePool`),
which CUDA graphs and ``torch.compile`` need. The attention masks that hide padding and stale
entries are :mod:`.masks`'.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache, StaticCache


def filled_layers(cache) -> list:
    """The cache's layers that hold key/value tensors (layers not written yet have none)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cache entry from position ``length`` on."""
    for layer in filled_layers(cache):
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def move_kept_entries(
    layers: Sequence, lengths: torch.Tensor, region: int, keep: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per row b copy the entries ``region + keep[b]`` (``keep[b]`` sorted: the accepted tree
    nodes, or the real tokens of a padded extend) down to positions ``lengths[b]..``, in place
    in each layer's ``keys`` / ``values``; returns the new lengths. Only entries not already in
    place move (a chain accepted along first children moves nothing), so a round costs what it
    accepted, not the length of the cache. Entries past a row's new length are left as they
    are: padding, hidden by :func:`.masks.batch_attention_mask`."""
    device = lengths.device
    counts = torch.tensor([k.numel() for k in keep], device=device)
    rows = torch.repeat_interleave(torch.arange(len(keep), device=device), counts)
    src = region + torch.cat([k.to(device) for k in keep])
    dst = torch.cat([lengths[b] + torch.arange(k.numel(), device=device) for b, k in enumerate(keep)])
    moved = src != dst
    if bool(moved.any()):
        rows, src, dst = rows[moved], src[moved], dst[moved]
        # src >= dst everywhere (keep is sorted and region >= lengths): the right-hand side is
        # gathered into a new tensor before the write, so overlapping moves are safe.
        with torch.inference_mode():  # cache tensors are made under inference mode
            for layer in layers:
                layer.keys[rows, :, dst] = layer.keys[rows, :, src]
                layer.values[rows, :, dst] = layer.values[rows, :, src]
    return lengths + counts


def compact_cache(
    cache: DynamicCache, lengths: torch.Tensor, region: int, keep: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per row b keep its first ``lengths[b]`` entries plus the entries ``region + keep[b]``
    (``keep[b]`` sorted), moved down to follow them, and cut the cache after the longest row;
    returns the new lengths. Rows shorter than the longest end in padding (masked out by
    ``batch_attention_mask``)."""
    new_lengths = move_kept_entries(filled_layers(cache), lengths, region, keep)
    truncate_cache(cache, int(new_lengths.max()))
    return new_lengths


def keep_in_cache(cache: DynamicCache, prefix_len: int, keep: torch.Tensor) -> None:
    """One sequence: keep the first ``prefix_len`` entries plus the tree entries ``keep``."""
    compact_cache(cache, torch.tensor([prefix_len], device=keep.device), prefix_len, [keep])


def select_cache_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only the batch rows ``rows`` (finished sequences leave the batch)."""
    for layer in filled_layers(cache):
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))


class RaggedCache:
    """A KV cache over a batch of ragged sequences.

    Slots ``[0, region)`` hold the committed entries (row b: its first ``lengths[b]``, the rest
    padding); a round's tree entries go after them, are masked per row by
    :func:`.masks.batch_attention_mask`, and are either kept (``commit``) or dropped (``rollback``).
    """

    def __init__(self, cache: DynamicCache, batch: int, device, capacity: int | None = None):
        self.cache = cache
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.region = 0
        self.capacity = capacity  # most entries it can hold (None: the model's context)

    def commit(self, keep: Sequence[torch.Tensor]) -> None:
        """Per row, keep the new entries at indices ``keep[b]`` (counted from ``region``)."""
        self.lengths = compact_cache(self.cache, self.lengths, self.region, keep)
        self.region = int(self.lengths.max())

    def rollback(self) -> None:
        """Drop every entry written since the last commit."""
        truncate_cache(self.cache, self.region)

    def release(self) -> None:
        """The generation is over (nothing to hand back: the cache is simply dropped)."""

    def keep_rows(self, rows: torch.Tensor) -> None:
        select_cache_rows(self.cache, rows)
        self.lengths = self.lengths[rows.to(self.lengths.device)]
        self.region = int(self.lengths.max())
        truncate_cache(self.cache, self.region)


class StaticCachePool:
    """StaticCaches for one model config. With ``reuse`` on (CUDA graphs turn it on), a
    released cache is kept for the next generation of the same size, write positions reset,
    so the graphs captured on its buffers replay instead of being captured again. One
    generation at a time per pool, then (the serving engine decodes on one thread)."""

    def __init__(self, config, max_kept: int = 4):
        self.config = config
        self.reuse = False
        self.max_kept = max_kept
        self.free: dict[tuple[int, int], StaticCache] = {}

    def acquire(self, batch: int, capacity: int) -> StaticCache:
        cache = self.free.pop((batch, capacity), None)
        if cache is None:
            return StaticCache(config=self.config, max_cache_len=capacity)
        with torch.inference_mode():
            for layer in filled_layers(cache):
                layer.cumulative_length.zero_()  # stale entries stay, hidden by the mask
        return cache

    def release(self, cache: StaticCache, batch: int, capacity: int) -> None:
        if not self.reuse:
            return
        layers = filled_layers(cache)
        if layers and all(layer.keys.shape[0] == batch for layer in layers):  # keep_rows shrinks them
            if len(self.free) >= self.max_kept:  # bound the memory held
                self.free.pop(next(iter(self.free)))
            self.free[(batch, capacity)] = cache


class StaticKV:
    """:class:`RaggedCache`'s contract on a preallocated transformers ``StaticCache``.

    The key/value buffers never move or grow: a forward writes its entries in place after the
    current region, acceptance copies the kept tree entries down inside the buffer, and
    dropping entries only resets the write position. Fixed tensor addresses are what CUDA
    graphs and ``torch.compile`` need, and no per-step ``torch.cat`` of the whole cache is
    paid. Entries past a row's length are stale and hidden by the attention mask.
    """

    def __init__(self, pool: StaticCachePool, batch: int, capacity: int, device):
        self.pool, self.batch = pool, batch
        self.cache = pool.acquire(batch, capacity)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.region = 0
        self.capacity = capacity

    def _set_write_position(self, n: int) -> None:
        for layer in self.cache.layers:
            if not hasattr(layer, "cumulative_length"):
                raise RuntimeError("this transformers version's StaticCache has no write position to reset")
            layer.cumulative_length.fill_(n)

    def commit(self, keep: Sequence[torch.Tensor]) -> None:
        self.lengths = move_kept_entries(filled_layers(self.cache), self.lengths, self.region, keep)
        self.region = int(self.lengths.max())
        with torch.inference_mode():  # the buffers were made under inference mode
            self._set_write_position(self.region)

    @torch.inference_mode()
    def rollback(self) -> None:
        self._set_write_position(self.region)

    def release(self) -> None:
        """The generation is over: the pool may keep the buffers for the next one."""
        self.pool.release(self.cache, self.batch, self.capacity)

    @torch.inference_mode()
    def keep_rows(self, rows: torch.Tensor) -> None:
        # New, smaller buffers: a compiled graph sees new addresses (it re-captures once).
        for layer in filled_layers(self.cache):
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
        self.lengths = self.lengths[rows.to(self.lengths.device)]
        self.region = int(self.lengths.max())
        self._set_write_position(self.region)
