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
import warnings

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


def _frozen(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[nn.Parameter, nn.Parameter | None]:
    return nn.Parameter(weight, requires_grad=False), None if bias is None else nn.Parameter(bias, requires_grad=False)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """A PackedLinear over existing tensors (e.g. a slice of a head), not trainable."""
    return PackedLinear._over(*_frozen(weight, bias))


# ------------------------------------------------------------------ int8 weights (drafters)
@functools.lru_cache(maxsize=None)
def int8_linear_available() -> bool:
    """Whether this torch build runs dynamically quantised int8 products on the CPU (fbgemm's
    x86 kernels; checked once with a tiny product)."""
    if not any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm")):
        return False
    try:
        with torch.inference_mode(False), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(8, 32, generator=gen), torch.randn(3, 32, generator=gen)
            y = torch.ops.quantized.linear_dynamic(x, _int8_pack(w, None), True)
            return bool(torch.allclose(y, F.linear(x, w), atol=0.1, rtol=0.1))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _int8_pack(weight: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of ``weight`` quantised to int8 per output row (symmetric)."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantized-tensor API deprecated; torch 2.13 keeps it
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


class Int8Linear(PackedLinear):
    """A :class:`PackedLinear` whose packed copy is int8: weights quantised per output row,
    activations quantised per call (torch's dynamic quantisation, fbgemm kernels: SmolLM2's
    16k-row draft head on one row 0.34 ms against 2.9 ms in float32 and 1.1 ms prepacked, 2-vCPU
    AMD EPYC; docs/performance.md). Not exact: about 1-2% of the largest output. For drafters,
    whose proposals the target verifies, so decoding stays lossless. Same parameters, state
    dict and fallbacks as PackedLinear; bfloat16 inputs are computed in float32."""

    @property
    def packable(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype in PACKABLE_DTYPES and int8_linear_available()

    def _pack(self, weight: torch.Tensor):
        if not self.packable:
            return None
        with torch.inference_mode(False), torch.no_grad():
            return _int8_pack(weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        # reduce_range: 7-bit activations, as fbgemm needs on CPUs without VNNI (its 16-bit
        # intermediate sums saturate otherwise: 10% errors measured on the AMD EPYC VM).
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, True).to(x.dtype)


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """An Int8Linear over existing tensors (e.g. a slice of a head), not trainable."""
    return Int8Linear._over(*_frozen(weight, bias))


def int8_linears(module: nn.Module) -> int:
    """Swap every ``nn.Linear`` and :class:`PackedLinear` under ``module`` for an
    :class:`Int8Linear` over the same parameters; returns how many were swapped (0 where the
    kernels are missing). For inference of drafters on a CPU; idempotent."""
    if not int8_linear_available():
        return 0
    return sum(_swap_children(module, kind, Int8Linear.from_linear) for kind in (nn.Linear, PackedLinear))


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
