"""Feature-level drafters (EAGLE-2 / HASS / PRISM / stacked): configs, module routing, and
tree expansions checked against a step-by-step reference built from FeatureDrafterModel.step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import begin_one, draft_one, extend_one, forward_one, record_expand, tiny_llama
from prism_spec.drafters import (
    DrafterMismatchError,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterModel,
    prism_config,
)
from prism_spec.runtime.tree import TreeConfig
from prism_spec.targets.masks import attention_mask_4d

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([12, 40, 7, 7, 88, 3, 61, 25, 9])
FIRST = 50
TREE = TreeConfig(depth=4, top_k=3, total_tokens=16)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=4, seed=31)


def make_drafter(target, seed=0, **config) -> FeatureDrafter:
    torch.manual_seed(seed)
    cfg = config.pop("config", None) or prism_config(target, **config)
    return FeatureDrafter(FeatureDrafterModel(cfg, target))


def target_features(target, drafter, tokens):
    layers = drafter.feature_layers if isinstance(drafter.feature_layers, tuple) else None
    out = forward_one(target, tokens, torch.arange(tokens.numel()), target.new_cache(), feature_layers=layers)
    return out.layer_features if layers else out.features


@torch.no_grad()
def reference_logits(drafter, tokens, features, path=()):
    """Logits after consuming ``tokens`` (the drafter's inputs: committed tokens after the
    first) with ``features``, then the tree ``path`` one node at a time -- written directly
    against FeatureDrafterModel.step with plain causal masks."""
    model, cfg = drafter.model, drafter.config
    dtype = model.processing[0].fc.weight.dtype
    cache = DynamicCache()
    n = tokens.numel()
    out = model.step(
        cfg.module_for_step(0),
        tokens[None],
        model.input_features(features)[None],
        torch.arange(n)[None],
        attention_mask_4d(0, n, None, dtype, "cpu"),
        cache,
    )[0]
    feature = out[-1]
    for depth, tok in enumerate(path, start=1):
        out = model.step(
            cfg.module_for_step(depth),
            torch.tensor([[tok]]),
            feature[None, None],
            torch.tensor([[n - 1 + depth]]),
            attention_mask_4d(cache.get_seq_length(), 1, None, dtype, "cpu"),
            cache,
        )[0]
        feature = out[-1]
    return model.logits(feature).float()


def slot_paths(calls) -> list[list[int]]:
    paths: list[list[int]] = []
    for tokens, parent_slots, _, _ in calls:
        paths.extend((paths[p] if p >= 0 else []) + [tok] for tok, p in zip(tokens, parent_slots))
    return paths


# --------------------------------------------------------------------------- configs


def test_prism_config(target):
    cfg = prism_config(target, num_modules=3)
    assert cfg.architecture == "prism"
    assert cfg.step_mapping == [0, 1, 2]
    assert [cfg.module_for_step(s) for s in range(6)] == [0, 1, 2, 2, 2, 2]
    assert (cfg.vocab_size, cfg.hidden_size) == (target.vocab_size, target.hidden_size)
    assert cfg.target_model_type == "llama"
    assert FeatureDrafterConfig().step_mapping == [0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_modules=0),
        dict(layers_per_module=0),
        dict(step_mapping=[]),
        dict(num_modules=2, step_mapping=[0, 2]),
        dict(num_modules=2, step_mapping=[-1]),
    ],
)
def test_config_rejects(kwargs):
    with pytest.raises(ValueError):
        FeatureDrafterConfig(**kwargs)


def test_model_keeps_target_weights_out(target):
    drafter = make_drafter(target, num_modules=2)
    keys = list(drafter.model.state_dict())
    assert keys and not any("embed" in k or "lm_head" in k or k.startswith("target") for k in keys)
    target_ptrs = {p.data_ptr() for p in target.model.parameters()}
    assert not any(p.data_ptr() in target_ptrs for p in drafter.model.parameters())
    assert len(drafter.model.processing) == 2
    assert all(p.dtype == torch.float64 for p in drafter.model.parameters())
    assert drafter.feature_layers == "last"
    multi = make_drafter(target, input_layers=[1, 2, 4])
    assert multi.feature_layers == (1, 2, 4)
    assert multi.model.fuse.in_features == 3 * target.hidden_size


def test_check_target(target):
    drafter = make_drafter(target)
    drafter.check_target(target)
    with pytest.raises(DrafterMismatchError, match="vocabulary 96"):
        drafter.check_target(tiny_llama(vocab_size=90, layers=1, seed=2))
    with pytest.raises(DrafterMismatchError, match="hidden size 32"):
        drafter.check_target(tiny_llama(hidden_size=16, layers=1, seed=2))
    deep = make_drafter(target, input_layers=[1, 2, 4])
    deep.check_target(target)
    with pytest.raises(DrafterMismatchError, match="layer 4"):
        deep.check_target(tiny_llama(layers=3, seed=2))


# --------------------------------------------------------------------------- routing

VARIANTS = {
    "eagle": dict(config_fn=lambda t: FeatureDrafterConfig.for_target(t)),
    "prism-2": dict(num_modules=2),
    "prism-3": dict(num_modules=3),
    "prism-3-layer-input": dict(num_modules=3, input_layers=[1, 3, 4]),
    "prism-layer-input-normed": dict(num_modules=2, input_layers=[1, 3, 4], input_norm=True),
    "stacked-2x2": dict(config_fn=lambda t: FeatureDrafterConfig.for_target(t, architecture="stacked", layers_per_module=2)),
    "mapping-1-0": dict(config_fn=lambda t: FeatureDrafterConfig.for_target(t, num_modules=2, step_mapping=[1, 0])),
}


def build_variant(target, name) -> FeatureDrafter:
    kwargs = dict(VARIANTS[name])
    config_fn = kwargs.pop("config_fn", None)
    if config_fn:
        return make_drafter(target, config=config_fn(target))
    return make_drafter(target, **kwargs)


@pytest.mark.parametrize(
    "name, expected",
    [("eagle", [0, 0, 0, 0, 0]), ("prism-3", [0, 1, 2, 2, 2]), ("mapping-1-0", [1, 0, 0, 0, 0])],
)
def test_each_step_runs_its_mapped_module(target, name, expected):
    drafter = build_variant(target, name)
    used = []
    step = drafter.model.step

    def recording_step(module, *args, **kwargs):
        used.append(module)
        return step(module, *args, **kwargs)

    drafter.model.step = recording_step
    tokens = torch.cat([PROMPT, torch.tensor([FIRST])])
    root_logits = begin_one(drafter, PROMPT, FIRST, target_features(target, drafter, PROMPT))
    assert used == expected[:1]
    draft_one(drafter, FIRST, root_logits, TREE)
    assert used == expected  # begin, then one call per tree level (depth 1..4)
    drafter.end_round()
    new_feats = target_features(target, drafter, torch.cat([tokens, torch.tensor([5])]))[-2:]
    extend_one(drafter, torch.tensor([5, 6]), new_feats)
    assert used[-1] == expected[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rounds_match_reference(target, name):
    """begin / tree expansions / end_round / extend over several rounds agree with the
    step-by-step reference for every drafted node."""
    drafter = build_variant(target, name)
    committed = torch.cat([PROMPT, torch.tensor([FIRST])])
    feats = target_features(target, drafter, PROMPT)
    root_logits = begin_one(drafter, PROMPT, FIRST, feats)
    inputs = committed[1:]
    assert torch.allclose(root_logits, reference_logits(drafter, inputs, feats), atol=1e-9, rtol=0)
    for round_ in range(3):
        calls = record_expand(drafter)
        tree = draft_one(drafter, int(committed[-1]), root_logits, TREE)
        drafter.end_round()
        del drafter.expand
        assert drafter.kv.cache.get_seq_length() == int(drafter.kv.lengths[0]) == inputs.numel()
        assert len(calls) == TREE.depth
        for path, row in zip(slot_paths(calls), torch.cat([out for *_, out in calls])):
            expected = reference_logits(drafter, inputs, feats, path)
            assert torch.allclose(row, expected, atol=1e-9, rtol=0), path
        # Commit a path of the tree plus a bonus token; the target's features at the positions
        # just before each new token come along.
        leaf = tree.leaf_paths()[round_]
        new = torch.cat([tree.tokens[leaf[1:]], torch.tensor([round_ + 2])])
        committed = torch.cat([committed, new])
        all_feats = target_features(target, drafter, committed[:-1])
        new_feats = all_feats[-new.numel() :]
        root_logits = extend_one(drafter, new, new_feats)
        inputs, feats = committed[1:], all_feats
        assert int(drafter.kv.lengths[0]) == inputs.numel()
        assert torch.allclose(root_logits, reference_logits(drafter, inputs, feats), atol=1e-9, rtol=0)


def test_extend_equals_begin_over_the_whole_sequence(target):
    drafter = build_variant(target, "prism-3")
    tokens = torch.tensor([12, 40, 7, 7, 88, 3, 61, 25, 9, 50, 4, 4, 70])
    feats = target_features(target, drafter, tokens[:-1])
    begin_one(drafter, tokens[:5], int(tokens[5]), feats[:5])
    step_by_step = extend_one(drafter, tokens[6:], feats[5:])
    at_once = begin_one(drafter, tokens[:-1], int(tokens[-1]), feats)
    assert torch.allclose(step_by_step, at_once, atol=1e-9, rtol=0)


def test_features_matter(target):
    drafter = build_variant(target, "eagle")
    feats = target_features(target, drafter, PROMPT)
    a = begin_one(drafter, PROMPT, FIRST, feats)
    b = begin_one(drafter, PROMPT, FIRST, feats.flip(0))
    assert not torch.allclose(a, b)


def test_input_norm_divides_each_layer_by_its_rms(target):
    from prism_spec.drafters.feature import rms_normalize_layers

    h = target.hidden_size
    scales = torch.tensor([0.3, 1.0, 3e4], dtype=torch.float64)
    raw = torch.randn(2, 5, 3, h, dtype=torch.float64) * scales[:, None]
    normed = rms_normalize_layers(raw.flatten(-2), h).unflatten(-1, (3, h))
    # eps = 1e-6 against a mean square of ~0.1 at the smallest scale
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(2, 5, 3, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(normed[..., 1, :], raw[..., 1, :] / raw[..., 1, :].pow(2).mean(-1, keepdim=True).sqrt(),
                               rtol=1e-5, atol=1e-7)
    # float16 input: squares of 3e4 overflow float16, so the RMS is taken in float32.
    big = (raw.flatten(-2) / 10).clamp(-6e4, 6e4).half()  # finite in float16, squares are not
    assert torch.isfinite(big).all() and torch.isfinite(rms_normalize_layers(big, h)).all()
    plain = make_drafter(target, input_layers=[1, 2, 4]).model
    normed_model = make_drafter(target, input_layers=[1, 2, 4], input_norm=True).model
    normed_model.fuse.load_state_dict(plain.fuse.state_dict())
    x = raw.flatten(-2)
    torch.testing.assert_close(normed_model.input_features(x), plain.fuse(rms_normalize_layers(x, h)))
    torch.testing.assert_close(plain.input_features(x), plain.fuse(x))
