"""Linear layers on oneDNN-prepacked weights, for CPU decoding.

On a CPU, ``F.linear`` in bfloat16 or float32 reorders the weight into oneDNN's blocked layout
on every call. Decoding one token (or verifying a small tree) multiplies a handful of rows by
each weight, so that per-call reorder costs about as much as the product itself
(``benchmarks/linear_packing.py``, 2-vCPU AMD EPYC, torch 2.13: a 1536 x 576 bf16 projection
91 us through ``F.linear`` and 43 us prepacked, SmolLM2's 49k x 576 head 2.3 ms and 0.59 ms, in
float32 that head on 3 rows 21.5 ms and 4.0 ms; docs/performance.md). :class:`PackedLinear`
reorders once, with the same oneDNN kernel inductor uses when it freezes a CPU graph.

A PackedLinear keeps the original ``weight``/``bias`` parameters (state dicts, tied embeddings
and code that reads ``.weight`` are unchanged; the packed copy is extra memory, about the size
of the weights), repacks when the weight changes in place, and falls back to ``F.linear``
whenever the packed kernel does not apply: autograd, autocast, ``torch.compile`` tracing, a
CUDA or float64/float16 tensor, or a torch build without the op. In bfloat16 its outputs
matched ``F.linear`` bit for bit at every shape measured; in float32 they differ in the last
bits (summation order), like any change of BLAS kernel. Lossless decoding compares a method
against vanilla decoding in the same runtime, so both see the same kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def packed_linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build runs oneDNN's prepacked linear for ``dtype`` on the CPU
    (checked once with a tiny product against ``F.linear``)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        with torch.inference_mode(False), torch.no_grad():
            # A private generator: the check must not move the global RNG (seeded inits).
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(8, 16, generator=gen).to(dtype), torch.randn(3, 16, generator=gen).to(dtype)
            y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, 1), None, "none", [], "")
            return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False


class _PackedWeight:
    """The packed copy and the weight version it was made from. Copies and pickles start
    empty (an opaque oneDNN tensor does not deep-copy; it is rebuilt on first use)."""

    __slots__ = ("key", "tensor")

    def __init__(self):
        self.key, self.tensor = None, None

    def __deepcopy__(self, memo):
        return _PackedWeight()

    def __reduce__(self):
        return (_PackedWeight, ())


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose CPU inference forward uses
    a weight prepacked once for oneDNN. Build it like an ``nn.Linear`` or, over an existing
    layer's parameters, with :meth:`from_linear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = _PackedWeight()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        return cls._over(linear.weight, linear.bias)

    @classmethod
    def _over(cls, weight: nn.Parameter, bias: nn.Parameter | None) -> "PackedLinear":
        # The same Parameter objects: tied embeddings and optimizers keep working.
        packed = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        packed.register_parameter("weight", weight)
        packed.register_parameter("bias", bias)
        return packed

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        # Called for every product on the decode path: per-call checks only, in cheapest-first
        # order; what depends on the weight alone is decided once per weight version (_pack).
        weight = self.weight
        if (
            x.dtype != weight.dtype
            or x.dim() < 2
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()  # inductor lowers (and packs) plain linears itself
        ):
            return None
        cache = self._packed
        key = (weight.data_ptr(), weight._version)  # a move or cast gives new storage
        if cache.key != key:
            cache.tensor, cache.key = self._pack(weight), key
        return cache.tensor

    @property
    def packable(self) -> bool:
        """Whether inference forwards of this layer's weight run (or will run) packed."""
        weight, bias = self.weight, self.bias
        return (
            weight.device.type == "cpu"
            and (bias is None or bias.dtype == weight.dtype)
            and packed_linear_available(weight.dtype)
        )

    def _pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of ``weight``, or None where the packed kernel does not apply."""
        if not self.packable:
            return None
        # A normal tensor even when first built under inference_mode, so the cache also
        # serves later no_grad calls.
        with torch.inference_mode(False), torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, self.bias, "none", [], "")


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """A PackedLinear over existing tensors (e.g. a slice of a head), not trainable."""
    return PackedLinear._over(nn.Parameter(weight, requires_grad=False),
                              None if bias is None else nn.Parameter(bias, requires_grad=False))


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct ``nn.Linear`` weights under ``module`` (what packing copies)."""
    seen, total = set(), 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.weight.data_ptr() not in seen:
            seen.add(sub.weight.data_ptr())
            total += sub.weight.numel() * sub.weight.element_size()
    return total


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (psutil, which accelerate brings), or None."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - accelerate depends on psutil
        return None
    return int(psutil.virtual_memory().available)


def _swap_children(module: nn.Module, kind: type, make) -> int:
    """Replace every child of exactly type ``kind`` under ``module`` by ``make(child)``."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def pack_linears(module: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` under ``module`` for a :class:`PackedLinear` over the same
    parameters; returns how many were swapped (0 on a build without the packed op). Call it on
    CPU models used for inference; it is idempotent."""
    if not any(packed_linear_available(d) for d in PACKABLE_DTYPES):
        return 0
    return _swap_children(module, nn.Linear, PackedLinear.from_linear)


def _plain_linear(packed: PackedLinear) -> nn.Linear:
    linear = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
    linear.register_parameter("weight", packed.weight)
    linear.register_parameter("bias", packed.bias)
    return linear


def unpack_linears(module: nn.Module) -> int:
    """Undo :func:`pack_linears` (plain ``nn.Linear`` modules over the same parameters)."""
    return _swap_children(module, PackedLinear, _plain_linear)
