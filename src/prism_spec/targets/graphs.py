"""CUDA-graph replay of the target's small forwards (decode steps and tree verification).

At batch 1 a GPU spends most of a small forward launching kernels from Python; a captured
CUDA graph replays the whole decoder as one launch. A graph needs fixed shapes and fixed
tensor addresses, which transformers' ``StaticCache`` provides: its key/value buffers never
move and its write position (``cumulative_length``) is a device tensor that the forward
advances in place, so a replay writes the new entries where an eager forward would.

One graph is captured per (new tokens, mask width, batch, feature layers, cache buffers),
lazily, at the cost of two eager warm-up forwards; the runtime keeps the tree size fixed and
rounds the static cache size up, so a generation captures two or three graphs. A forward the
graph cannot capture (a model whose forward synchronises with the host, say) falls back to
eager for that shape, with one warning. Only :meth:`Target.forward_batch` uses this, and only
on a ``StaticCache`` (see :meth:`Target.use_cuda_graphs`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor  # last hidden state, written by each replay
    layer_features: torch.Tensor | None


class CudaGraphDecoder:
    """Call like the decoder's forward on a StaticCache; returns (last hidden state, the
    concatenated ``feature_layers`` hidden states or None), both fresh tensors."""

    def __init__(self, decoder: torch.nn.Module, cache_kw: str, max_graphs: int = 16):
        self.decoder = decoder
        self.cache_kw = cache_kw
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.uncapturable: set[tuple] = set()
        self.pool = None  # one memory pool shared by every graph (they never run concurrently)
        self.captures = 0

    @staticmethod
    def _layers(cache) -> list:
        return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]

    def _key(self, input_ids, mask, cache, feature_layers) -> tuple:
        layers = self._layers(cache)
        # Every address the graph bakes in: keep_rows() swaps in new buffers, and a new cache
        # may get some of a freed one's addresses from the allocator (a graph replayed against
        # a half-matching cache would write through stale write positions).
        return (tuple(input_ids.shape), tuple(mask.shape), mask.dtype, tuple(feature_layers or ()),
                tuple(t.data_ptr() for layer in layers for t in (layer.keys, layer.values, layer.cumulative_length)))

    def _eager(self, input_ids, position_ids, mask, cache, feature_layers):
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                           output_hidden_states=bool(feature_layers), **{self.cache_kw: cache})
        layer_features = None
        if feature_layers:
            layer_features = torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1)
        return out.last_hidden_state, layer_features

    def _capture(self, input_ids, position_ids, mask, cache, feature_layers) -> _Captured:
        layers = self._layers(cache)
        saved = [layer.cumulative_length.clone() for layer in layers]

        def restore():  # warm-ups advanced the write position; the real replay starts where it was
            for layer, position in zip(layers, saved):
                layer.cumulative_length.copy_(position)

        static_ids, static_pos, static_mask = input_ids.clone(), position_ids.clone(), mask.clone()
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels pick their algorithms and workspaces outside the capture
                self._eager(static_ids, static_pos, static_mask, cache, feature_layers)
                restore()
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden, layer_features = self._eager(static_ids, static_pos, static_mask, cache, feature_layers)
        self.pool = graph.pool()
        restore()  # nothing ran during capture, but keep the invariant explicit
        self.captures += 1
        return _Captured(graph, static_ids, static_pos, static_mask, hidden, layer_features)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache,
                 feature_layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = self._layers(cache)
        if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
            return self._eager(input_ids, position_ids, mask, cache, feature_layers)  # not allocated yet
        key = self._key(input_ids, mask, cache, feature_layers)
        if key in self.uncapturable:
            return self._eager(input_ids, position_ids, mask, cache, feature_layers)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(input_ids, position_ids, mask, cache, feature_layers)
            except Exception as exc:  # noqa: BLE001 - any capture failure means "run this shape eagerly"
                self.uncapturable.add(key)
                warnings.warn(f"CUDA graph capture failed for {key[:2]} ({type(exc).__name__}: {exc}); "
                              "running that shape eagerly", stacklevel=3)
                torch.cuda.synchronize(input_ids.device)
                return self._eager(input_ids, position_ids, mask, cache, feature_layers)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:  # e.g. many cache sizes in a long-running server
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        entry.input_ids.copy_(input_ids)
        entry.position_ids.copy_(position_ids)
        entry.mask.copy_(mask)
        entry.graph.replay()
        # The outputs live in the graph's pool and the next replay overwrites them.
        features = None if entry.layer_features is None else entry.layer_features.clone()
        return entry.hidden.clone(), features
