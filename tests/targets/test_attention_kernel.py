"""The compiled row-invariant attention kernel: a query's bits depend only on the keys it sees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_spec.targets import attention_kernel
from prism_spec.targets.attention_kernel import attention_plan, load_kernel, unavailable_reason
from prism_spec.targets.masks import batch_attention_mask


@pytest.fixture(scope="module")
def kernel():
    module = load_kernel()
    if module is None:  # no C++ compiler or ninja here: the per-node SDPA fallback is tested elsewhere
        pytest.skip(f"row-invariant attention kernel unavailable: {unavailable_reason()}")
    return module


def tree_mask(past: int, lengths: list[int], parents: list[int]) -> torch.Tensor:
    """The runtime's additive mask for rows with ``lengths`` committed entries (of ``past``) and a
    tree of ``parents`` (-1: root) on top."""
    n = len(parents)
    ancestors = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            ancestors[i] |= ancestors[parent]
    return batch_attention_mask(torch.tensor(lengths), past, n, ancestors[None].expand(len(lengths), n, n),
                                torch.float32, "cpu")


def random_qkv(batch, heads, kv_heads, n, kv_len, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    return make(batch, heads, n, dim), make(batch, kv_heads, kv_len, dim), make(batch, kv_heads, kv_len, dim)


def test_plan_of_a_tree_mask():
    # Row 0: 5 committed entries; row 1: 3 (entries 3-4 are another row's, masked). Tree: 0 <- 1, 0 <- 2.
    mask = tree_mask(5, [5, 3], [-1, 0, 0])
    shared, offsets, index = attention_plan(mask, 2, 3, 8)
    # Tree entries sit at 5-7. Row 0's root and node 1 see one contiguous run of keys.
    assert shared.tolist() == [6, 7, 6, 3, 3, 3]
    assert offsets.tolist() == [0, 0, 0, 1, 2, 4, 6]
    assert index.tolist() == [7, 5, 5, 6, 5, 7]
    assert [t.tolist() for t in attention_plan(None, 1, 2, 4)] == [[4, 4], [0, 0, 0], []]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [16, 64, 128, 40])  # vector code for 64 and 128 (AVX-512), scalar for 40
def test_each_query_gets_the_bits_it_gets_alone(kernel, dtype, dim):
    """Every node of a batched tree equals the same query computed alone over its keys gathered
    into a contiguous cache (as a decode step sees them once the path is committed)."""
    past, parents = 37, [-1, 0, 0, 1, 3, 2]
    lengths = [37, 30]
    n = len(parents)
    query, key, value = random_qkv(2, 6, 2, n, past + n, dim, dtype)
    mask = tree_mask(past, lengths, parents)
    out = kernel.row_invariant_attention(query, key, value, *attention_plan(mask, 2, n, past + n), 0.17)
    assert out.shape == (2, n, 6, dim) and out.dtype == dtype
    visible = mask[:, 0] == 0
    for b in range(2):
        for i in range(n):
            keys = visible[b, i].nonzero().flatten()
            alone = kernel.row_invariant_attention(
                query[b : b + 1, :, i : i + 1].contiguous(), key[b : b + 1, :, keys].contiguous(),
                value[b : b + 1, :, keys].contiguous(), *attention_plan(None, 1, 1, len(keys)), 0.17)
            assert torch.equal(alone[0, 0], out[b, i]), (b, i)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_matches_attention_over_visible_keys(kernel, dtype, atol):
    past, parents = 20, [-1, 0, 1, 0]
    n = len(parents)
    query, key, value = random_qkv(2, 8, 2, n, past + n, 64, dtype, seed=3)
    mask = tree_mask(past, [20, 14], parents)
    out = kernel.row_invariant_attention(query, key, value, *attention_plan(mask, 2, n, past + n), 0.125)
    reference = F.scaled_dot_product_attention(
        query.double(), key.double().repeat_interleave(4, 1), value.double().repeat_interleave(4, 1),
        attn_mask=mask.double(), scale=0.125).transpose(1, 2)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=atol)


def test_independent_of_thread_count(kernel):
    query, key, value = random_qkv(1, 9, 3, 4, 300, 64, torch.bfloat16, seed=5)
    plan = attention_plan(tree_mask(296, [296], [-1, 0, 0, 0]), 1, 4, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.row_invariant_attention(query, key, value, *plan, 0.125)
        torch.set_num_threads(2)
        two = kernel.row_invariant_attention(query, key, value, *plan, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_rejects_what_it_cannot_compute(kernel):
    query, key, value = random_qkv(1, 4, 2, 1, 5, 16, torch.float32)
    plan = attention_plan(None, 1, 1, 5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        kernel.row_invariant_attention(query.double(), key.double(), value.double(), *plan, 0.25)
    with pytest.raises(RuntimeError, match="one plan entry per query"):
        kernel.row_invariant_attention(query, key, value, *attention_plan(None, 1, 2, 5), 0.25)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("PRISM_SPEC_ATTENTION_KERNEL", "0")
    assert load_kernel() is None
    assert "PRISM_SPEC_ATTENTION_KERNEL=0" in unavailable_reason()


def test_failed_build_falls_back_with_the_reason(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\nfoo.cpp:1: error: no compiler here\nmore")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    attention_kernel._build.cache_clear()
    try:
        assert load_kernel() is None
        assert unavailable_reason() == "RuntimeError: foo.cpp:1: error: no compiler here"
    finally:
        attention_kernel._build.cache_clear()
        attention_kernel._reason = None


def test_a_query_that_sees_no_key_gets_zeros(kernel):
    query, key, value = random_qkv(1, 4, 2, 2, 6, 64, torch.bfloat16)
    mask = torch.zeros(1, 1, 2, 6)
    mask[0, 0, 1] = float("-inf")  # the second query (a padding row) sees nothing
    out = kernel.row_invariant_attention(query, key, value, *attention_plan(mask, 1, 2, 6), 0.125)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and out[0, 0].abs().sum() > 0
