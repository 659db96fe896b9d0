"""Row-invariant linear layers: the probe, the K-split product and Target.make_row_invariant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import tiny_llama
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate, generate_batch
from prism_spec.targets import row_invariance
from prism_spec.targets.attention_kernel import unavailable_reason
from prism_spec.targets.packed import PackedLinear, packed_linear_available
from prism_spec.targets.row_invariance import (
    MinRowsLinear,
    RowInvarianceUnavailable,
    SplitKLinear,
    make_linears_row_invariant,
    rows_invariant,
)


class _RowCountDependent(nn.Module):
    """A stand-in for a kernel whose rounding depends on the row count."""

    def forward(self, x):
        return x * (1.0 + 1e-2 * x.shape[-2])


class _RowWise(nn.Module):
    """Each row computed alone, whatever the row count."""

    def forward(self, x):
        return x * 3.0 - 1.0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [2, 3, 5, 7, 37])
def test_split_product_equals_the_layer(bias, chunks):
    torch.manual_seed(0)
    linear = nn.Linear(37, 11, bias=bias).double()
    split = SplitKLinear(linear, chunks)
    x = torch.randn(2, 4, 37, dtype=torch.float64)
    torch.testing.assert_close(split(x), linear(x), rtol=1e-12, atol=1e-12)
    assert split.weight is linear.weight and split.bias is linear.bias  # same parameters, same state dict
    assert len(split.bounds) == chunks and all(b > a for a, b in split.bounds)
    assert split.bounds[0][0] == 0 and split.bounds[-1][1] == 37
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(split.bounds, split.bounds[1:]))


def test_split_product_rounds_once_from_float32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    w, b = linear.weight.float(), linear.bias.float()
    partials = [x[:, :32].float() @ w[:, :32].T, x[:, 32:].float() @ w[:, 32:].T]
    expected = (partials[0].to(torch.bfloat16).float() + partials[1].to(torch.bfloat16).float() + b).to(torch.bfloat16)
    out = SplitKLinear(linear, 2)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2)


@pytest.mark.skipif(not packed_linear_available(torch.bfloat16), reason="no oneDNN packed linear")
def test_split_of_a_packed_layer_packs_its_chunks():
    linear = PackedLinear.from_linear(nn.Linear(64, 16).to(torch.bfloat16))
    split = SplitKLinear(linear, 2)
    assert all(isinstance(product, PackedLinear) for product in split._products)
    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(split(x).float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_split_refuses_a_chunk_count_outside_the_layer():
    with pytest.raises(ValueError, match="chunks must be in 2..4"):
        SplitKLinear(nn.Linear(4, 3), 5)


def test_probe_tells_row_count_dependence():
    assert not rows_invariant(_RowCountDependent(), 8, torch.float32, rows=(2, 3))
    assert rows_invariant(_RowWise(), 8, torch.float32, rows=(2, 3, 16))


def test_only_the_shapes_that_fail_are_changed_cheapest_first(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(5, 7))

    def probe(layer, in_features, dtype, rows):
        shape = (layer.out_features, in_features)
        if shape == (6, 8):  # only a K-split passes
            return isinstance(layer, SplitKLinear)
        if shape == (7, 5):  # a two-row minimum passes
            return isinstance(layer, MinRowsLinear)
        return True

    monkeypatch.setattr(row_invariance, "rows_invariant", probe)
    report = make_linears_row_invariant(model)
    assert report == {"6x8": "2 K-chunks", "8x6": "unchanged", "7x5": "min 2 rows"}
    assert [type(m).__name__ for m in model] == ["SplitKLinear", "Linear", "SplitKLinear", "MinRowsLinear"]
    assert make_linears_row_invariant(model) == {"8x6": "unchanged"}  # nothing left to change: not wrapped twice


@pytest.mark.parametrize("shape", [(1, 1, 9), (1, 9), (9,), (2, 3, 9), (1, 4, 9)])
def test_min_rows_product_equals_the_layer(shape):
    torch.manual_seed(0)
    linear = nn.Linear(9, 5).double()
    wrapped = MinRowsLinear(linear, min_rows=3)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), linear(x), rtol=1e-12, atol=1e-12)  # (a padded product may round otherwise)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias


def test_min_rows_pads_small_products():
    calls = []

    class Recorder(nn.Linear):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return super().forward(x)

    wrapped = MinRowsLinear(Recorder(4, 2))
    wrapped(torch.randn(1, 1, 4))
    wrapped(torch.randn(1, 3, 4))
    assert calls == [(2, 4), (1, 3, 4)]
    with pytest.raises(ValueError, match="min_rows"):
        MinRowsLinear(nn.Linear(4, 2), min_rows=1)


def test_refuses_when_no_split_is_invariant(monkeypatch):
    monkeypatch.setattr(row_invariance, "rows_invariant", lambda *a, **k: False)
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(RowInvarianceUnavailable, match="bit-identical verification is not available"):
        make_linears_row_invariant(model, max_chunks=3)
    assert type(model[0]) is nn.Linear  # nothing swapped


def row_invariant_tiny_llama(seed: int, attention: str):
    """A bf16 tiny Llama in row-invariant mode, or a skip where this machine's kernels refuse it.
    ``attention``: "kernel" (the compiled kernel for every decode step and verification) or
    "per-node" (one SDPA call per verified node, the fallback without a compiler)."""
    target = tiny_llama(hidden_size=64, dtype=torch.bfloat16, seed=seed)
    try:
        target.make_row_invariant()
    except RowInvarianceUnavailable as exc:
        pytest.skip(f"this machine's kernels: {exc}")
    if attention == "per-node":
        target.attention_kernel = None
    elif target.attention_kernel is None:
        pytest.skip(f"row-invariant attention kernel unavailable: {unavailable_reason()}")
    return target


@pytest.mark.parametrize("attention", ["kernel", "per-node"])
def test_speculative_equals_vanilla_in_row_invariant_mode(attention):
    """bf16, where the mode is available on CPUs with bf16 instructions (float32 products are
    not row-invariant on the CPUs measured: the refusal is tested above). Without the mode, 3
    of these 18 decodes differed from vanilla on the AMD EPYC VM."""
    config = GenerationConfig(max_new_tokens=24)
    for seed in range(3):
        target = row_invariant_tiny_llama(seed, attention)
        assert target.row_invariant_verify
        drafter = resolve_drafter("layers:1", target).drafter
        for prompt in ([5, 17, 3, 9], [40, 2, 2, 71, 8, 30], list(range(1, 13))):
            vanilla = {static: generate(target, prompt, None, config, DecodeOptions(static_cache=static)).token_ids
                       for static in (False, True)}
            if attention == "kernel":
                # A static cache hands attention its whole preallocated buffer: the kernel reads a
                # query's visible keys only, so the cache kind cannot change a bit (SDPA over the
                # masked buffer can).
                assert vanilla[True] == vanilla[False], (seed, prompt)
            for tree, static in (("8/3/3", False), ("chain:3", False), ("8/3/3", True)):
                options = DecodeOptions(TreeConfig.parse(tree), static_cache=static)
                out = generate(target, prompt, drafter, config, options).token_ids
                assert out == vanilla[static], (seed, prompt, tree, static)


@pytest.mark.parametrize("attention", ["kernel", "per-node"])
def test_batched_speculative_equals_single_vanilla_in_row_invariant_mode(attention):
    """Rows of a batch (different prompt lengths, so left padding and rows that accept
    different counts) each give the tokens of their prompt decoded alone by vanilla decoding:
    every verified node attends over its own row's keys only, and the linear layers do not
    round a row by the batch's row count. With the kernel the prefill's attention runs through
    it too, so a prompt's cache does not depend on its batch; with per-node SDPA the batched
    prefill stays SDPA, which on this tiny model rounds as a prompt's own prefill does (on the
    default target it did not: docs/families.md)."""
    config = GenerationConfig(max_new_tokens=24)
    prompts = [[5, 17, 3, 9], [40, 2, 2, 71, 8, 30], list(range(1, 13)), [7, 7, 7]]
    for seed in range(2):
        target = row_invariant_tiny_llama(seed, attention)
        drafter = resolve_drafter("layers:1", target).drafter
        alone = [generate(target, prompt, None, config).token_ids for prompt in prompts]
        for tree in ("8/3/3", "chain:3"):
            batched = generate_batch(target, prompts, drafter, config, DecodeOptions(TreeConfig.parse(tree)))
            assert [result.token_ids for result in batched] == alone, (seed, tree)



@pytest.mark.parametrize("name", ["qwen2-sliding", "gemma3", "gpt2", "llama"])
def test_row_invariant_kernel_verifies_with_the_bits_of_decode_steps(name):
    """Every node of a verified tree gets, bit for bit, the logits of the decode steps that reach
    it one token at a time, and (to rounding) the logits of the model without the mode: through
    sliding windows shorter than the context (Qwen2), one mask per layer type (Gemma 3's local
    and global layers), multi-head attention with learned positions (GPT-2). bf16, compiled
    kernel. (With the mode off, the short prompt's Qwen2 tree differed from its steps.)"""
    from helpers import forward_one, tiny_family

    plain = tiny_family(name, dtype=torch.bfloat16)
    target = tiny_family(name, dtype=torch.bfloat16)
    try:
        target.make_row_invariant()
    except RowInvarianceUnavailable as exc:
        pytest.skip(f"this machine's kernels: {exc}")
    if target.attention_kernel is None:
        pytest.skip(f"row-invariant attention kernel unavailable: {unavailable_reason()}")
    parents, tokens = [-1, 0, 0, 1, 3], torch.tensor([12, 40, 7, 23, 5])
    ancestors = torch.eye(len(parents), dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            ancestors[i] |= ancestors[parent]
    depths = ancestors.sum(-1) - 1
    one = torch.ones(1, 1, dtype=torch.bool)
    # Longer than Qwen2's window; the second long enough for SDPA to split the keys into blocks.
    for prompt in (torch.tensor([5, 17, 33, 2, 9, 41, 60, 11, 3, 7, 21, 19, 4, 8]),
                   torch.randint(1, 90, (200,), generator=torch.Generator().manual_seed(0))):

        def prefilled(model):
            cache = model.new_cache()
            forward_one(model, prompt, torch.arange(len(prompt)), cache)
            return cache

        def verify(model):
            return forward_one(model, tokens, len(prompt) + depths, prefilled(model), ancestors).logits

        tree = verify(target)
        torch.testing.assert_close(tree, verify(plain), rtol=0, atol=0.05 * float(tree.abs().max()))
        for node in range(len(parents)):
            cache = prefilled(target)
            for depth, i in enumerate(ancestors[node].nonzero().flatten().tolist()):  # its path, root first
                step = forward_one(target, tokens[i : i + 1], torch.tensor([len(prompt) + depth]), cache, one).logits
            assert torch.equal(step[0], tree[node]), (name, len(prompt), node)
