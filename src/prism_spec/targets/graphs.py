"""CUDA-graph replay of small forwards on a static KV cache (the target's decode steps and
tree verification, a feature drafter's steps).

At batch 1 a GPU spends most of a small forward launching kernels from Python; a captured
CUDA graph replays the whole forward as one launch. A graph needs fixed shapes and fixed
tensor addresses, which transformers' ``StaticCache`` provides: its key/value buffers never
move and its write position (``cumulative_length``) is a device tensor that the forward
advances in place, so a replay writes the new entries where an eager forward would.

One graph is captured per (caller's key, input shapes, cache buffers), lazily, at the cost of
two eager warm-up calls; the runtime keeps tree sizes fixed and rounds static cache sizes up,
so a generation captures a handful of graphs. A call the graph cannot capture (a model whose
forward synchronises with the host, say) falls back to eager for that shape, with one
warning. Used by :meth:`Target.use_cuda_graphs` and
:meth:`~prism_spec.drafters.feature.FeatureDrafter.use_static_cache`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .kv_cache import filled_layers

Outputs = tuple  # of tensors (or None)


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]  # static copies the graph reads
    outputs: Outputs  # written by each replay


class CudaGraphRunner:
    """``runner(fn, inputs, cache, key)`` returns ``fn(*inputs)`` (a tuple of tensors or None),
    replayed from a captured graph when it can. ``fn`` may read ``cache`` and advance its write
    position, nothing else mutable; ``key`` names everything else ``fn`` depends on (which
    module, which hidden layers), since the graph keeps the first capture's ``fn``."""

    def __init__(self, max_graphs: int = 16):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.uncapturable: set[tuple] = set()
        self.pool = None  # one memory pool shared by every graph (they never run concurrently)
        self.captures = 0

    @staticmethod
    def _key(key, inputs: Sequence[torch.Tensor], layers) -> tuple:
        # Every address a graph bakes in: keep_rows() swaps in new buffers, and a new cache may
        # get some of a freed one's addresses from the allocator (a graph replayed against a
        # half-matching cache would write through stale write positions).
        return (key, tuple((tuple(t.shape), t.dtype) for t in inputs),
                tuple(t.data_ptr() for layer in layers for t in (layer.keys, layer.values, layer.cumulative_length)))

    def _capture(self, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor], layers) -> _Captured:
        device = inputs[0].device
        saved = [layer.cumulative_length.clone() for layer in layers]

        def restore():  # warm-ups advanced the write position; the real replay starts where it was
            for layer, position in zip(layers, saved):
                layer.cumulative_length.copy_(position)

        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels pick their algorithms and workspaces outside the capture
                fn(*static)
                restore()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*static)
        self.pool = graph.pool()
        restore()  # nothing ran during capture, but keep the invariant explicit
        self.captures += 1
        return _Captured(graph, static, tuple(outputs))

    def __call__(self, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor], cache, key=()) -> Outputs:
        layers = filled_layers(cache)  # a StaticCache allocates a layer at its first write
        if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
            return tuple(fn(*inputs))  # not allocated yet (or not a StaticCache): eager
        full_key = self._key(key, inputs, layers)
        if full_key in self.uncapturable:
            return tuple(fn(*inputs))
        entry = self.graphs.get(full_key)
        if entry is None:
            try:
                entry = self._capture(fn, inputs, layers)
            except Exception as exc:  # noqa: BLE001 - any capture failure means "run this shape eagerly"
                self.uncapturable.add(full_key)
                warnings.warn(f"CUDA graph capture failed for {full_key[:2]} ({type(exc).__name__}: {exc}); "
                              "running that shape eagerly", stacklevel=3)
                torch.cuda.synchronize(inputs[0].device)
                return tuple(fn(*inputs))
            self.graphs[full_key] = entry
            while len(self.graphs) > self.max_graphs:  # e.g. many cache sizes in a long-running server
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(full_key)
        for static, value in zip(entry.inputs, inputs):
            static.copy_(value)
        entry.graph.replay()
        # The outputs live in the graph's pool and the next replay overwrites them.
        return tuple(None if t is None else t.clone() for t in entry.outputs)
