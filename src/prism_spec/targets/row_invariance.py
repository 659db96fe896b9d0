"""Linear layers whose result for a row does not depend on how many rows the product has.

Verifying a tree multiplies several rows by each weight, a decode step one row. Whether a
row's bits are the same in both depends on the CPU kernel: oneDNN picks its blocking of the
reduction dimension K from the row count, so for some K an M-row product rounds a row
differently from a one-row product. Measured on the 2-vCPU AMD EPYC VM (Zen 4, bf16
instructions, torch 2.13, 2026-12-06): bfloat16 products with K <= 1024 were invariant at
every M from 2 to 64, K = 1536 and 2048 were not (``benchmarks/row_invariance.py``). There the
odd one out is the one-row product (a matrix-vector kernel): every M >= 2 rounded each row
alike, so a one-row product computed as two rows (:class:`MinRowsLinear`: the row twice, at
about the cost of one, since a small product's cost is reading the weight) matches them all.

:class:`SplitKLinear` computes a product as a sum of products over K-chunks that are
invariant, accumulated in float32 in a fixed order and rounded once; :func:`make_linears_row_invariant`
probes each distinct weight shape of a model on this machine and changes only the shapes
that need it, trying the cheapest change first (two-row minimum, then K-splits). Vanilla
decoding and verification then run the same arithmetic on every row, so a verified token gets
the bits its decode step would have (with the attention of
``attention.row_invariant_attention``). A changed product rounds a one-row product (or partial
sums) differently from the plain layer: outputs are identical between vanilla and speculative
decoding *in this mode*, not to decoding without it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedLinear, packed_linear


class RowInvarianceUnavailable(ValueError):
    """No split of some linear layer is row-invariant with this machine's kernels (float32
    products on the CPUs measured): bit-identical verification cannot be had here."""


#: Row counts probed: every tree size up to 16, then larger trees (the paper tree has 60 nodes).
PROBE_ROWS = tuple(range(2, 17)) + (24, 32, 48, 61, 64)


class SplitKLinear(nn.Module):
    """``x @ weight.T + bias`` as ``chunks`` products over near-equal slices of K, summed in
    order in float32 (float64 stays float64) and cast back once. Keeps the original ``weight``
    and ``bias`` parameters (state dicts and code reading ``.weight`` are unchanged). The chunks
    are contiguous copies, prepacked for oneDNN when the layer was: derived state, made once
    (the target's weights are frozen) and kept out of the state dict."""

    def __init__(self, linear: nn.Linear, chunks: int):
        super().__init__()
        k = linear.in_features
        if not 2 <= chunks <= k:
            raise ValueError(f"chunks must be in 2..{k} (the layer's in_features), got {chunks}")
        self.in_features, self.out_features, self.chunks = k, linear.out_features, chunks
        self.weight, self.bias = linear.weight, linear.bias
        edges = [i * k // chunks for i in range(chunks + 1)]
        self.bounds = list(zip(edges[:-1], edges[1:]))
        with torch.no_grad():
            slices = [self.weight[:, a:b].detach().contiguous() for a, b in self.bounds]
        if isinstance(linear, PackedLinear):
            self._products = [packed_linear(w) for w in slices]
        else:
            self._products = [functools.partial(F.linear, weight=w) for w in slices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        total = None
        for (a, b), product in zip(self.bounds, self._products):
            y = product(x[..., a:b]).to(acc)
            total = y if total is None else total + y
        if self.bias is not None:
            total = total + self.bias.to(acc)
        return total.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, chunks={self.chunks}"


class MinRowsLinear(nn.Module):
    """A linear layer that never multiplies fewer than ``min_rows`` rows: a smaller input is
    padded with copies of its last row and the padding's outputs dropped. Wraps ``layer``
    (its ``weight``/``bias`` are the layer's: state dicts are unchanged)."""

    def __init__(self, layer: nn.Module, min_rows: int = 2):
        super().__init__()
        if min_rows < 2:
            raise ValueError(f"min_rows must be at least 2, got {min_rows}")
        self.layer, self.min_rows = layer, min_rows
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows == 0 or rows >= self.min_rows:
            return self.layer(x)
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat[-1:].expand(self.min_rows - rows, -1)])
        return self.layer(padded)[:rows].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"min_rows={self.min_rows}"


def rows_invariant(layer: nn.Module, in_features: int, dtype: torch.dtype, rows=PROBE_ROWS,
                   trials: int = 2, seed: int = 0) -> bool:
    """Whether ``layer`` gives every row of an M-row input the bits of a one-row input, for
    every M in ``rows`` (``trials`` random inputs each). A probe, not a proof: a summation
    order that differs shows up in some element of a random product with high probability."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in rows:
            for _ in range(trials):
                x = torch.randn(1, m, in_features, generator=gen).to(dtype)
                together = layer(x)[0]
                alone = torch.cat([layer(x[:, i : i + 1])[0] for i in range(m)])
                if not torch.equal(together, alone):
                    return False
    return True


def row_invariant_candidates(layer: nn.Linear, max_chunks: int):
    """``(description, build)`` for each way to compute ``layer``, cheapest first: as it is,
    with a two-row minimum, then split into 2..max_chunks K-chunks (each also with the
    minimum). ``build()`` makes the module (a split copies the weight: only when asked)."""
    yield "unchanged", lambda: layer
    yield "min 2 rows", lambda: MinRowsLinear(layer)
    for chunks in range(2, min(max_chunks, layer.in_features) + 1):
        yield f"{chunks} K-chunks", functools.partial(SplitKLinear, layer, chunks)
        yield f"{chunks} K-chunks, min 2 rows", lambda c=chunks: MinRowsLinear(SplitKLinear(layer, c))


def make_linears_row_invariant(model: nn.Module, max_chunks: int = 8, rows=PROBE_ROWS) -> dict[str, str]:
    """Probe every distinct (out, in) linear shape under ``model`` and swap each layer of a shape
    that is not row-invariant for the first of :func:`row_invariant_candidates` that is.
    Returns ``{"OUTxIN": description}`` ("unchanged": left as it was). Raises
    :class:`RowInvarianceUnavailable` (swapping nothing) when no candidate is invariant."""
    layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, nn.Linear) and not isinstance(parent, MinRowsLinear)]  # (already done)
    plan: dict[tuple[int, int], str] = {}
    for _, _, layer in layers:
        shape = (layer.out_features, layer.in_features)
        if shape in plan:
            continue
        dtype = layer.weight.dtype
        for description, build in row_invariant_candidates(layer, max_chunks):
            if rows_invariant(build(), layer.in_features, dtype, rows):
                plan[shape] = description
                break
        else:
            raise RowInvarianceUnavailable(
                f"--row-invariant: no split of a {shape[0]}x{shape[1]} {dtype} linear layer into up to "
                f"{max_chunks} K-chunks, with or without a two-row minimum, is row-invariant on this machine: "
                "bit-identical verification is not available here (bfloat16 is where it usually is; docs/families.md)")
    for parent, name, layer in layers:
        description = plan[(layer.out_features, layer.in_features)]
        if description != "unchanged":
            setattr(parent, name, dict(row_invariant_candidates(layer, max_chunks))[description]())
    return {f"{out}x{k}": description for (out, k), description in plan.items()}
