"""SDPA for grouped-query attention over a few new tokens, without copying the KV cache.

transformers' ``sdpa`` attention gives a grouped-query model (SmolLM2, Llama-3, Qwen: several
query heads per key/value head) to ``scaled_dot_product_attention`` in one of three ways: with
``enable_gqa`` where the backend supports it (no mask, on CUDA), by folding the query heads of
a group into the query length when there is one new token, and otherwise by ``repeat_kv``,
which copies every layer's whole key and value cache ``groups`` times per forward. Tree
verification and drafter steps are the otherwise case: a few new tokens with a 4D mask. On a
CPU that copy grows with the context and outweighs the attention itself
(``benchmarks/gqa_attention.py``).

:func:`grouped_sdpa_attention` extends the fold to any number of new tokens: query row
``r * n + i`` of key/value head ``g`` is query ``i`` of head ``g * groups + r``, and the mask
row is repeated per group. Each (head, query) row sees the same numbers in the same kernel,
so the output is that of ``repeat_kv`` + SDPA: bit for bit at most sizes, up to the last bit
where the kernel blocks a short query length differently (n = 2-3 on the CPU measured). Only
the copy is gone. Registered with transformers' public ``AttentionInterface`` as ``prism_sdpa``
(with sdpa's mask builder in ``AttentionMaskInterface``);
anything else (one new token, no mask, bias or softcap, non-CPU devices) goes to transformers'
own ``sdpa`` function unchanged.

Row-invariant attention (:func:`row_invariant_attention`, used by tree verification and decode
steps when a target's ``row_invariant_verify`` is on): a forward over several new tokens gives
each token the attention a one-token decode step would compute for it, bit for bit in any
dtype. Two ways, chosen once per target:

- the compiled kernel (:mod:`.attention_kernel`, CPU, float32/bfloat16/float16): every query's
  attention is a fixed function of the keys its mask row shows, in cache order, whatever else
  is in the call; decode steps and prefill run through it too, so they agree by construction
  and a prompt's cache does not depend on its batch. One call per layer, at about the cost of
  the batched SDPA call it replaces.
- without it (no compiler, other dtypes or devices, soft-capped or biased attention): each
  query row attends as a one-token query, through transformers' ``sdpa`` function, in its own
  batch-1 call over exactly its keys (the prefix and its ancestors), gathered in cache order:
  the kernel, shapes and reduction order of a decode step over a dynamic cache. Decode steps
  in this mode take the same path (over a static cache's longer, masked buffer SDPA would
  round otherwise). The SDPA
  kernel's rounding depends on the key count and on the batch size, so nodes cannot share a
  call: a tree costs one attention call per node instead of one in all.

The rest of a layer is row-wise given ``row_invariance.make_linears_row_invariant``.

:func:`attention_backends` picks the SDPA kernels that the runtime's, the drafters' and
training's forwards may use on CUDA (cuDNN attention left out).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .attention_kernel import DTYPES as KERNEL_DTYPES
from .attention_kernel import attention_plan

GROUPED_SDPA = "prism_sdpa"


def folds_query_groups(module, query: torch.Tensor, attention_mask, dropout: float, kwargs) -> bool:
    """Whether :func:`grouped_sdpa_attention` folds this call (see the module docstring)."""
    return (
        query.device.type == "cpu"  # measured there; CUDA keeps transformers' own dispatch
        and getattr(module, "num_key_value_groups", 1) > 1
        and query.shape[2] > 1  # one token: transformers folds it already
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1  # one mask for every head
        and attention_mask.shape[2] == query.shape[2]  # a row per query (not broadcast over them)
        and not dropout
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


@dataclasses.dataclass
class _RowInvariantState:
    """What :func:`row_invariant_attention` sets for the forwards inside it."""

    kernel: object | None  # the compiled kernel module (attention_kernel.py), or None: per-node SDPA
    plans: dict = dataclasses.field(default_factory=dict)  # per-forward plans, keyed by the mask's id and shapes


_ROW_INVARIANT = contextvars.ContextVar("prism_row_invariant_attention", default=None)


@contextlib.contextmanager
def row_invariant_attention(enabled: bool = True, kernel=None):
    """Within the block, forwards on :data:`GROUPED_SDPA` models give every token the
    attention of a one-token step (see the module docstring). With ``kernel`` (the module of
    :func:`attention_kernel.load_kernel`) every forward in the block, one-token steps included,
    runs its attention through that kernel; without it, forwards over several tokens make one
    SDPA call per token over exactly the keys it sees (one-token forwards too: a static cache
    hands attention a longer, masked buffer, and SDPA's rounding depends on the key count)."""
    token = _ROW_INVARIANT.set(_RowInvariantState(kernel) if enabled else None)
    try:
        yield
    finally:
        _ROW_INVARIANT.reset(token)


def attention_backends(device) -> contextlib.AbstractContextManager:
    """SDPA backends for forwards whose shapes change every call (decode steps over a growing
    cache, drafter steps, padded training batches). On CUDA this leaves cuDNN attention out:
    recent torch builds try it first for masked attention on Hopper/Blackwell GPUs, and it
    builds a new execution plan for every new shape (reported at 10-1000 ms each), which at
    one new cache length per step swamps decoding. Flash, memory-efficient and math kernels
    remain. A no-op on other devices."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclasses.dataclass(frozen=True)
class _VisibleKeys:
    """The keys query ``query`` of batch row ``row`` sees: the first ``shared`` cache entries,
    then ``tail`` (indices in cache order; None when there are none)."""

    row: int
    query: int
    shared: int
    tail: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.shared + (0 if self.tail is None else len(self.tail))


def visible_keys(attention_mask: torch.Tensor, kv_len: int) -> list[_VisibleKeys]:
    """Per batch row b and query i (in that order) of an additive mask [B, 1, n, >= kv_len]:
    the keys the query sees (:class:`_VisibleKeys`), from the kernel's :func:`attention_plan`."""
    batch, _, n, _ = attention_mask.shape
    shared, offsets, index = attention_plan(attention_mask, batch, n, kv_len)
    index = index.to(attention_mask.device)  # gathers from the cache, on its device
    bounds = offsets.tolist()
    return [_VisibleKeys(k // n, k % n, c0, index[bounds[k] : bounds[k + 1]] if bounds[k + 1] > bounds[k] else None)
            for k, c0 in enumerate(shared.tolist())]


def _keys_of(cache: torch.Tensor, keys: _VisibleKeys) -> torch.Tensor:
    """[1, kv_heads, count, d]: the keys (or values) of ``cache`` [B, kv_heads, L, d] a query sees."""
    prefix = cache[keys.row : keys.row + 1, :, : keys.shared]  # a view
    if keys.tail is None:
        return prefix
    return torch.cat([prefix, cache[keys.row : keys.row + 1].index_select(2, keys.tail)], dim=2)


def row_invariant_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Each query row in its own one-token call (batch 1, as a decode step) over the keys its
    mask row shows, in cache order. Not batched: the CPU kernel's work split, and with it the
    rounding of long key sequences, depends on the batch size (measured: one-token queries
    batched over a tree's nodes differed from the same queries alone)."""
    batch, _, n, _ = query.shape
    plans = _ROW_INVARIANT.get().plans
    plan_key = (id(attention_mask), key.shape[-2])
    if plan_key not in plans:  # one plan per forward: every layer gets the same mask
        plans[plan_key] = (attention_mask, visible_keys(attention_mask, key.shape[-2]))
    outputs, masks = [], {}
    attend = _one_query_sdpa if _folds_one_query(module, dropout, kwargs) else functools.partial(
        sdpa_attention_forward, dropout=dropout, **kwargs)
    for keys in plans[plan_key][1]:
        count = keys.count
        if count not in masks:  # the decode step's own mask: every key visible (zeros, in the mask's dtype)
            masks[count] = attention_mask.new_zeros((1, 1, 1, count))
        out, _ = attend(module, query[keys.row : keys.row + 1, :, keys.query : keys.query + 1],
                        _keys_of(key, keys), _keys_of(value, keys), masks[count], scaling=scaling)
        outputs.append(out)  # [1, 1, heads, d]
    return torch.cat(outputs, dim=1).view(batch, n, *outputs[0].shape[2:]), None


def _folds_one_query(module, dropout: float, kwargs) -> bool:
    """Whether transformers' ``sdpa`` would run a one-token query of this call as
    :func:`_one_query_sdpa` does: grouped query heads folded into the query length, one mask
    for every head, nothing else."""
    return (
        getattr(module, "num_key_value_groups", 1) > 1
        and not dropout
        and all(kwargs.get(name) is None for name in ("softcap", "position_bias", "is_causal"))
        and not kwargs.get("output_attentions", False)
        and os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") != "1"
    )


def _one_query_sdpa(module, query, key, value, mask, scaling=None):
    """transformers' ``sdpa`` for one query token of a grouped-query model (the decode step's
    call: the group's heads folded into the query length, then one SDPA kernel call), without
    its per-call Python, which costs a quarter of the kernel at these sizes: row-invariant
    verification makes this call once per node and layer. ``tests/targets/test_attention.py``
    holds it to transformers' function bit for bit."""
    heads, dim = query.shape[1], query.shape[-1]
    groups = module.num_key_value_groups
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(1, heads // groups, groups, dim), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(1, heads, 1, value.shape[-1]).transpose(1, 2), None


def _kernel_handles(module, query, key, value, attention_mask, dropout: float, kwargs) -> bool:
    """Whether the compiled row-invariant kernel computes this call (plain softmax attention
    over a mask shared by the heads). The runtime's forwards always carry a 4D mask, so a
    decode step, a verification and a prefill of the same layer take the same path."""
    return (
        query.device.type == "cpu"
        and query.dtype in KERNEL_DTYPES
        and key.dtype == query.dtype
        and query.shape[1] % key.shape[1] == 0
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and (attention_mask is None and query.shape[2] == 1 or (  # (no mask over several tokens: causal)
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == query.shape[2]))
        and not dropout
        and all(kwargs.get(name) is None for name in ("softcap", "position_bias", "s_aux", "sinks"))
        and not kwargs.get("output_attentions", False)
    )


def kernel_attention(state: _RowInvariantState, query, key, value, attention_mask, scaling=None) -> torch.Tensor:
    """[b, n, heads, d] from the compiled kernel: each query over the keys its mask row shows,
    in cache order (attention_kernel.py)."""
    batch, _, n, dim = query.shape
    kv_len = key.shape[-2]
    plan_key = (id(attention_mask), kv_len, batch, n)
    if plan_key not in state.plans:  # one plan per forward (and mask): every layer shares it
        state.plans[plan_key] = (attention_mask, attention_plan(attention_mask, batch, n, kv_len))
    shared, offsets, index = state.plans[plan_key][1]
    scale = dim**-0.5 if scaling is None else float(scaling)
    return state.kernel.row_invariant_attention(query, key, value, shared, offsets, index, scale)


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [b, heads, n, d], key/value
    [b, kv_heads, kv_len, d]; returns ([b, n, heads, d], None)."""
    state = _ROW_INVARIANT.get()
    if state is not None:
        if state.kernel is not None and _kernel_handles(module, query, key, value, attention_mask, dropout, kwargs):
            return kernel_attention(state, query, key, value, attention_mask, scaling), None
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 4
            and attention_mask.shape[2] == query.shape[2]
            and not dropout
        ):
            return row_invariant_sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if not folds_query_groups(module, query, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, n, dim = query.shape
    groups = module.num_key_value_groups
    folded = query.reshape(batch, heads // groups, groups * n, dim)
    mask = attention_mask[..., : key.shape[-2]].repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, n, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
# transformers builds the masks of its own forwards (2D padding mask in, e.g. in generate) per
# implementation name, and hands an unregistered name its 2D mask untouched: register sdpa's.
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_sdpa(model) -> bool:
    """Switch a loaded transformers model from ``sdpa`` to :data:`GROUPED_SDPA`; False (and
    nothing changed) for models on another attention implementation or whose attention
    does not go through ``AttentionInterface``."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(GROUPED_SDPA)
    except (ValueError, NotImplementedError):
        return False
    return model.config._attn_implementation == GROUPED_SDPA
