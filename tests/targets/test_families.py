"""The family matrix: every supported transformers family decodes losslessly (float64, T=0)
with standard and feature drafters, single and batched, dynamic and static cache; a feature
drafter trains a step and round-trips through a checkpoint; T>0 draws from the target's
distribution on non-Llama families; unsupported models are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from helpers import FAMILIES, FAMILY_COMMON, chi_square_pvalue, forward_one, tiny_family
from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, StandardDrafter, prism_config
from prism_spec.drafters.checkpoint import load_drafter, save_feature_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, SamplingConfig, TreeConfig, generate, generate_batch
from prism_spec.runtime.verify import target_probs
from prism_spec.targets import Target, UnsupportedTargetError, load_target
from prism_spec.train.features import capture_batch
from prism_spec.train.objectives import ObjectiveConfig, compute_loss

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 24
TREE = TreeConfig(depth=3, top_k=3, total_tokens=8)
PROMPTS = [
    [5, 17, 33, 2, 9, 41, 60, 11, 3, 7, 21, 19],
    [5, 17, 33, 2, 9, 41, 60],
    [8, 8, 30, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
]


def greedy() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)


def options(static_cache: bool = False) -> DecodeOptions:
    return DecodeOptions(TREE, static_cache=static_cache)


def prism_drafter(target, seed=0) -> FeatureDrafter:
    torch.manual_seed(seed)  # untrained weights
    return FeatureDrafter(FeatureDrafterModel(prism_config(target), target))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    target = tiny_family(name)
    vanilla = [generate(target, p, None, greedy(), options()).token_ids for p in PROMPTS]
    return name, target, vanilla


def test_vanilla_equals_the_models_own_greedy_decoding(family):
    _, target, vanilla = family
    for prompt, ours in zip(PROMPTS, vanilla):
        ids = torch.tensor([prompt])
        reference = target.model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)
        assert ours == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("drafter_kind", ["standard", "prism"])
def test_speculative_greedy_equals_vanilla(family, drafter_kind):
    _, target, vanilla = family
    drafter = StandardDrafter.from_target_layers(target, 1) if drafter_kind == "standard" else prism_drafter(target)
    assert generate(target, PROMPTS[0], drafter, greedy(), options()).token_ids == vanilla[0]
    assert [r.token_ids for r in generate_batch(target, PROMPTS, drafter, greedy(), options())] == vanilla
    assert [r.token_ids for r in generate_batch(target, PROMPTS, None, greedy(), options())] == vanilla


def test_static_cache_equals_vanilla(family):
    _, target, vanilla = family
    drafter = prism_drafter(target)
    results = generate_batch(target, PROMPTS, drafter, greedy(), options(static_cache=True))
    assert [r.token_ids for r in results] == vanilla


def test_feature_drafter_trains_a_step_and_round_trips(family, tmp_path):
    name, target, vanilla = family
    torch.manual_seed(1)
    model = FeatureDrafterModel(prism_config(target), target)
    expected_layer = "target" if target.family.native_drafter_layer else "llama"
    assert model.config.drafter_layer == expected_layer
    ids = torch.tensor([PROMPTS[0], PROMPTS[2][:12]])
    attention = torch.ones_like(ids)
    loss_mask = attention.clone()
    loss_mask[:, :4] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
             "hidden": capture_batch(target, ids, attention)["hidden"]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss, _ = compute_loss(model.train(), batch, ObjectiveConfig(objective="tuning", aligned_steps=2))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    model.eval()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_feature_drafter(model, tmp_path / name)
    loaded = load_drafter(tmp_path / name, target)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert generate(target, PROMPTS[1], loaded, greedy(), options()).token_ids == vanilla[1]


# ------------------------------------------------------------- T > 0 on non-Llama families
V = 8
PROMPT = [1, 5, 2, 7, 3]
N_SAMPLES = 1500
T1 = SamplingConfig(temperature=1.0)


def exact_two_token_distribution(target, cfg) -> np.ndarray:
    def probs(ids):
        out = forward_one(target, torch.tensor(ids), torch.arange(len(ids)), target.new_cache())
        return target_probs(out.logits[-1], cfg)

    first = probs(PROMPT)
    joint = first[:, None] * torch.stack([probs(PROMPT + [x]) for x in range(V)])
    return joint.numpy()


@pytest.mark.parametrize("name", ["gemma2", "qwen2-sliding"])
def test_sampling_matches_the_target_distribution(name):
    target = tiny_family(name, vocab_size=V)
    drafter = StandardDrafter.from_target_layers(target, 1)
    observed = np.zeros((V, V))
    tree = DecodeOptions(TreeConfig(depth=1, top_k=3, total_tokens=6))
    for seed in range(N_SAMPLES):
        config = GenerationConfig(max_new_tokens=2, stop_on_eos=False, seed=seed, sampling=T1)
        tokens = generate(target, PROMPT, drafter, config, tree).token_ids
        observed[tokens[0], tokens[1]] += 1
    p = chi_square_pvalue(observed, exact_two_token_distribution(target, T1), N_SAMPLES)
    assert p > 0.001, p


def test_soft_capped_logits_are_the_models_own():
    target = tiny_family("gemma2")
    assert target.family.logit_softcap
    ids = torch.tensor(PROMPTS[0])
    ours = forward_one(target, ids, torch.arange(len(ids)), target.new_cache()).logits
    torch.testing.assert_close(ours, target.model(input_ids=ids[None]).logits[0].float(), rtol=0, atol=1e-12)


def test_a_forward_the_runtime_does_not_know_is_refused(monkeypatch):
    target = tiny_family("gemma2")
    monkeypatch.setattr(type(target.family), "scale_logits", lambda self, logits: logits)  # soft-capping forgotten
    with pytest.raises(UnsupportedTargetError, match="gemma2.*differs from the model's own"):
        target.check_against_model()


# ------------------------------------------------------------- unsupported models
UNSUPPORTED = {
    "t5": lambda: transformers.T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16),
    "mamba": lambda: transformers.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1),
    "jamba": lambda: transformers.JambaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              num_experts=2, attn_layer_period=2, attn_layer_offset=1),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_are_refused_by_name(name, tmp_path):
    config = UNSUPPORTED[name]()
    with pytest.raises(UnsupportedTargetError, match=config.model_type):
        Target(transformers.AutoModelForCausalLM.from_config(config) if name != "t5"
               else transformers.T5ForConditionalGeneration(config), None)
    config.save_pretrained(tmp_path)  # no weights: load_target refuses on the config alone
    with pytest.raises(UnsupportedTargetError, match=config.model_type):
        load_target(str(tmp_path))


def test_unknown_layer_types_are_refused():
    config = transformers.Qwen2Config(**FAMILY_COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedTargetError, match="linear_attention"):
        Target(model, None)

