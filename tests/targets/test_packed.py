"""Prepacked CPU linear layers: same results as F.linear, same parameters, safe fallbacks."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import tiny_llama
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets.packed import (
    Int8Linear,
    PackedLinear,
    int8_linear_available,
    pack_linears,
    packed_linear,
    packed_linear_available,
    unpack_linears,
)

needs_packed = pytest.mark.skipif(not packed_linear_available(torch.bfloat16), reason="no oneDNN packed linear")


def assert_decodes_like_vanilla(target, drafter):
    """Speculative decoding with ``drafter`` gives vanilla decoding's tokens on a random prompt."""
    prompt = torch.randint(0, 128, (10,))
    vanilla = generate(target, prompt, None, GenerationConfig(max_new_tokens=24))
    spec = generate(target, prompt, drafter, GenerationConfig(max_new_tokens=24),
                    DecodeOptions(TreeConfig.parse("8/2/2")))
    assert spec.token_ids == vanilla.token_ids


def _linear(out_f=48, in_f=32, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@needs_packed
@pytest.mark.parametrize("rows", [1, 3, 8, 50])
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_matches_f_linear(rows, bias):
    linear = _linear(bias=bias)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(2, rows, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = packed(x)
        assert packed._packed.tensor is not None  # the packed kernel ran
        # Same products, fp32 accumulation; a kernel may sum in another order (1 bf16 ulp).
        torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), atol=1e-3, rtol=1.6e-2)


@needs_packed
def test_float32_close_to_f_linear_and_2d_and_strided_inputs():
    linear = _linear(dtype=torch.float32)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(5, 64)[:, ::2]  # non-contiguous
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x[0:1]), F.linear(x[0:1], linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


@needs_packed
def test_built_directly_like_nn_linear():
    layer = PackedLinear(32, 16, dtype=torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-3, rtol=1.6e-2)
    assert layer._packed.tensor is not None and "weight" in layer.state_dict()


def test_float64_and_1d_inputs_use_f_linear():
    linear = _linear(dtype=torch.float64)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
        assert torch.equal(packed(x[0]), F.linear(x[0], linear.weight, linear.bias))
    assert packed._packed.tensor is None


@needs_packed
def test_autograd_falls_back_and_gradients_match():
    linear = _linear(dtype=torch.float32)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(4, 32, requires_grad=True)
    packed(x).square().sum().backward()
    grad_w, grad_x = linear.weight.grad.clone(), x.grad.clone()
    linear.weight.grad = None
    x.grad = None
    F.linear(x, linear.weight, linear.bias).square().sum().backward()
    assert torch.equal(grad_w, linear.weight.grad) and torch.equal(grad_x, x.grad)
    assert packed._packed.tensor is None  # never packed under autograd


@needs_packed
def test_repacks_after_in_place_update():
    linear = _linear(bias=False)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(1, 2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        before = packed(x)
        linear.weight.mul_(2)
        after = packed(x)
        torch.testing.assert_close(after, F.linear(x, linear.weight, linear.bias), atol=1e-3, rtol=1.6e-2)
        torch.testing.assert_close(after, 2 * before, atol=1e-3, rtol=1.6e-2)


@needs_packed
def test_autocast_uses_f_linear():
    linear = _linear(dtype=torch.float32)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, F.linear(x, linear.weight, linear.bias))
    assert packed._packed.tensor is None


@needs_packed
def test_copies_and_pickles_rebuild_the_packed_weight():
    packed = PackedLinear.from_linear(_linear())
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = packed(x)
        clone = copy.deepcopy(packed)
        assert clone._packed.tensor is None and torch.equal(clone(x), expected)
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x), expected)


@needs_packed
def test_packed_linear_over_existing_tensors():
    weight, bias = torch.randn(10, 32, dtype=torch.bfloat16), torch.randn(10, dtype=torch.bfloat16)
    head = packed_linear(weight, bias)
    assert head.weight.data_ptr() == weight.data_ptr() and not head.weight.requires_grad
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), F.linear(x, weight, bias), atol=1e-3, rtol=1.6e-2)


@needs_packed
def test_pack_linears_keeps_parameters_state_dict_and_ties():
    target = tiny_llama(dtype=torch.float32)
    model = target.model
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 does
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == linears > 0
    assert pack_linears(model) == 0  # idempotent
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert all(params[k] is p for k, p in model.named_parameters(remove_duplicate=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert unpack_linears(model) == linears
    assert all(type(m) is not PackedLinear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight


@needs_packed
def test_packed_target_logits_and_lossless_decoding():
    """A packed target gives the unpacked one's logits (float32 rounding aside), and
    speculative decoding on it stays token-identical to vanilla decoding on it."""
    plain = tiny_llama(dtype=torch.float32, layers=2, hidden_size=64, vocab_size=128)
    packed = tiny_llama(dtype=torch.float32, layers=2, hidden_size=64, vocab_size=128)
    assert packed.pack_weights() > 0 and packed.packed_weights and not plain.packed_weights
    ids = torch.randint(0, 128, (1, 12))
    positions = torch.arange(12)[None]
    out_plain = plain.forward(ids, positions, plain.new_cache())
    out_packed = packed.forward(ids, positions, packed.new_cache())
    torch.testing.assert_close(out_packed.logits, out_plain.logits, atol=1e-4, rtol=1e-4)

    from prism_spec.drafters.standard import StandardDrafter

    drafter = StandardDrafter.from_target_layers(packed, 1)
    assert drafter.pack_weights() > 0
    prompt = torch.randint(0, 128, (10,))
    vanilla = generate(packed, prompt, None, GenerationConfig(max_new_tokens=24))
    spec = generate(packed, prompt, drafter, GenerationConfig(max_new_tokens=24),
                    DecodeOptions(TreeConfig.parse("8/2/2")))
    assert spec.token_ids == vanilla.token_ids


def test_pack_weights_is_a_no_op_off_the_cpu_and_reversible():
    target = tiny_llama(dtype=torch.float32)
    packed = target.pack_weights() if packed_linear_available(torch.float32) else 0
    if packed_linear_available(torch.float32):
        assert packed > 0 and target.packed_weights
    assert target.pack_weights(False) == packed and not target.packed_weights  # every packed layer restored
    assert type(target.lm_head) is nn.Linear


@needs_packed
def test_packed_feature_drafter_drafts_like_the_plain_one():
    """A packed reduced-vocabulary PRISM drafter gives the plain one's logits (float32
    rounding aside) and decodes losslessly on a packed target."""
    from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, prism_config

    target = tiny_llama(dtype=torch.float32, layers=2, hidden_size=64, vocab_size=128)
    d2t = torch.arange(0, 128, 2)
    torch.manual_seed(0)
    model = FeatureDrafterModel(prism_config(target, draft_vocab_size=64), target, d2t)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        plain_logits = model.logits(x)
        drafter = FeatureDrafter(model)
        assert drafter.pack_weights() > 0 and model.packed
        assert isinstance(model.processing[0].fc, PackedLinear)
        torch.testing.assert_close(model.logits(x), plain_logits, atol=1e-4, rtol=1e-4)
        assert model._head_cache[3] is not None  # the draft head is packed too
    target.pack_weights()
    assert_decodes_like_vanilla(target, drafter)


@needs_packed
def test_bench_memory_counts_packed_copies_once():
    from prism_spec.bench.methods import _unique_param_bytes

    target = tiny_llama(dtype=torch.float32)
    model = target.model
    model.lm_head.weight = model.model.embed_tokens.weight
    plain = _unique_param_bytes([model])
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    target.pack_weights()
    assert _unique_param_bytes([model]) == plain + linear_bytes
    # float64 layers never run packed: swapped or not, they hold no packed copy to count.
    exact = tiny_llama(dtype=torch.float64)
    before = _unique_param_bytes([exact.model])
    exact.pack_weights()
    assert _unique_param_bytes([exact.model]) == before


def test_availability_check_leaves_the_global_rng_alone():
    packed_linear_available.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    packed_linear_available(torch.bfloat16)
    packed_linear_available(torch.float32)
    assert torch.equal(torch.rand(4), expected)


@needs_packed
def test_load_target_packs_by_default_only_when_memory_allows(tmp_path, monkeypatch):
    from helpers import tiny_chat_target
    from prism_spec.targets import hf, load_target
    from prism_spec.targets.packed import linear_weight_bytes

    folder = tiny_chat_target(tmp_path)
    target = load_target(folder, dtype="float32")
    assert target.packed_weights  # the CPU default, plenty of memory
    need = linear_weight_bytes(load_target(folder, dtype="float32", pack_weights=False).model)
    assert need > 0
    monkeypatch.setattr(hf, "available_memory_bytes", lambda: need)  # the copy would take all of it
    with pytest.warns(UserWarning, match="not prepacking"):
        assert not load_target(folder, dtype="float32").packed_weights
    assert load_target(folder, dtype="float32", pack_weights=True).packed_weights  # forced
    assert not load_target(folder, dtype="float64").packed_weights  # nothing to gain in float64


def test_linear_weight_bytes_counts_tied_weights_once():
    from prism_spec.targets.packed import linear_weight_bytes

    target = tiny_llama(dtype=torch.float32)
    model = target.model
    untied = linear_weight_bytes(model)
    model.lm_head.weight = nn.Parameter(torch.zeros_like(model.lm_head.weight))
    assert linear_weight_bytes(model) == untied
    shared = nn.Sequential(model.lm_head, model.lm_head)
    assert linear_weight_bytes(shared) == model.lm_head.weight.numel() * 4


# ------------------------------------------------------------------ int8 weights (drafters)
needs_int8 = pytest.mark.skipif(not int8_linear_available(), reason="no fbgemm quantized kernels")


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_f_linear(rows, dtype):
    """int8 weights (per output row) and 7-bit activations: within a few percent of the
    largest output, in the input's dtype; the parameters and state dict are the layer's."""
    linear = _linear(out_f=256, in_f=128, dtype=dtype)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight is linear.weight and layer.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(rows, 128).to(dtype)
    with torch.inference_mode():
        out, reference = layer(x), F.linear(x, linear.weight, linear.bias)
    assert out.dtype == dtype and out.shape == reference.shape
    error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
    assert 0 < error < 0.04  # quantised (not the float product), but close


@needs_int8
def test_int8_linear_falls_back_for_autograd_and_float64_and_requantizes_after_updates():
    linear = _linear(dtype=torch.float32)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(4, 32, requires_grad=True)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight, linear.bias))  # autograd: exact product
    layer64 = Int8Linear.from_linear(_linear(dtype=torch.float64))
    x64 = torch.randn(2, 32, dtype=torch.float64)
    torch.testing.assert_close(layer64(x64), F.linear(x64, layer64.weight, layer64.bias))
    with torch.inference_mode():
        before = layer(x.detach())
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        after = layer(x.detach())
    assert not torch.allclose(before, after)  # the in-place update was seen


@needs_int8
def test_int8_feature_drafter_is_cheaper_in_kind_and_decodes_losslessly():
    """A reduced-vocabulary PRISM drafter on int8 weights: every linear layer and the draft head
    swapped (parameters and state dict unchanged), logits close to the float ones, and
    speculative decoding with it equals vanilla decoding."""
    from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, prism_config

    target = tiny_llama(dtype=torch.float32, layers=2, hidden_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = FeatureDrafterModel(prism_config(target, draft_vocab_size=64), target, torch.arange(0, 128, 2))
    keys = set(model.state_dict())
    x = torch.randn(3, 64)
    drafter = FeatureDrafter(model)
    with torch.inference_mode():
        float_logits = model.logits(x)
        layers = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert drafter.use_int8_weights() == layers + 1 and model.int8
        assert all(isinstance(m, Int8Linear) for m in model.modules() if isinstance(m, nn.Linear))
        int8_logits = model.logits(x)
        assert isinstance(model._head_cache[3], Int8Linear)
    assert set(model.state_dict()) == keys
    assert 0 < float((int8_logits - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())
    assert model.derived_weight_bytes() == 64 * 64 * 4 + 64 * 64  # the float slice and its int8 copy
    assert_decodes_like_vanilla(target, drafter)


@needs_int8
def test_int8_full_vocabulary_head_is_a_quantised_copy_of_the_targets():
    """Without a reduced vocabulary the int8 head is built over the target's own head weight
    (shared, not copied in float) and the target's head itself stays float."""
    from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, prism_config

    target = tiny_llama(dtype=torch.float32, layers=2, hidden_size=64, vocab_size=128)
    model = FeatureDrafterModel(prism_config(target), target)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        float_logits = model.logits(x)
        FeatureDrafter(model).use_int8_weights()
        int8_logits = model.logits(x)
    head = model._head_cache[3]
    assert isinstance(head, Int8Linear) and head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    assert type(target.lm_head) is not Int8Linear
    assert 0 < float((int8_logits - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())
    assert model.derived_weight_bytes() == 128 * 64  # the int8 copy only
