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

Row-invariant attention (:func:`row_invariant_attention`, used by tree verification when a
target's ``row_invariant_verify`` is on): a forward over several new tokens gives each token
the attention a one-token decode step would compute for it, bit for bit in any dtype. Each
query row attends, in its own one-token call to transformers' ``sdpa`` function, over exactly
the keys its mask row shows (the prefix and its ancestors in the tree), in cache order: the
same kernel, shapes and reduction order as the decode step that vanilla decoding runs. The
rest of a layer (linear layers, norms, rotary embeddings) is computed row by row already.

:func:`attention_backends` picks the SDPA kernels that the runtime's, the drafters' and
training's forwards may use on CUDA (cuDNN attention left out).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

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


_ROW_INVARIANT = contextvars.ContextVar("prism_row_invariant_attention", default=False)


@contextlib.contextmanager
def row_invariant_attention(enabled: bool = True):
    """Within the block, forwards on :data:`GROUPED_SDPA` models over several new tokens give
    every token the attention of a one-token step (see the module docstring)."""
    token = _ROW_INVARIANT.set(enabled)
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


def visible_key_runs(attention_mask: torch.Tensor, kv_len: int) -> list[list[torch.Tensor | int]]:
    """Per batch row b and query i of an additive mask [B, 1, n, >= kv_len]: the key indices
    the query sees, as an int ``c`` when they are exactly ``0..c-1`` (a slice, no copy) and as
    an index tensor otherwise."""
    visible = attention_mask[:, 0, :, :kv_len] == 0
    counts = visible.sum(-1)
    prefix_like = visible.cumsum(-1).eq(torch.arange(1, kv_len + 1, device=visible.device)).sum(-1) == counts
    runs = []
    for b in range(visible.shape[0]):
        row = []
        for i in range(visible.shape[1]):
            c = int(counts[b, i])
            row.append(c if bool(prefix_like[b, i]) else visible[b, i].nonzero().flatten())
        runs.append(row)
    return runs


def row_invariant_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Each query row in its own one-token call over the keys its mask row shows."""
    batch, _, n, _ = query.shape
    outputs = []
    for b, row in enumerate(visible_key_runs(attention_mask, key.shape[-2])):
        for i, keys in enumerate(row):
            if isinstance(keys, int):
                k, v = key[b : b + 1, :, :keys], value[b : b + 1, :, :keys]
            else:
                k, v = key[b : b + 1].index_select(2, keys), value[b : b + 1].index_select(2, keys)
            # The decode step's own mask: every key visible (zeros, in the mask's dtype).
            mask = attention_mask.new_zeros((1, 1, 1, k.shape[-2]))
            out, _ = sdpa_attention_forward(
                module, query[b : b + 1, :, i : i + 1], k, v, mask, dropout=dropout, scaling=scaling, **kwargs
            )
            outputs.append(out)  # [1, 1, heads, d]
    return torch.cat(outputs, dim=1).reshape(batch, n, *outputs[0].shape[2:]), None


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [b, heads, n, d], key/value
    [b, kv_heads, kv_len, d]; returns ([b, n, heads, d], None)."""
    if (
        _ROW_INVARIANT.get()
        and query.shape[2] > 1
        and isinstance(attention_mask, torch.Tensor)
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
