"""Training objectives: alignment masks, train/inference consistency, losses, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prism_spec.drafters.feature import (
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterModel,
)
from prism_spec.drafters.standard import StandardDrafter
from prism_spec.targets.hf import Target
from prism_spec.train.losses import (
    TargetDistribution,
    smooth_l1_per_position,
    soft_cross_entropy,
    topk_cross_entropy,
)
from prism_spec.train.objectives import (
    ObjectiveConfig,
    alignment_mask,
    attach_target_head,
    compute_loss,
    copy_module0_into_others,
    draft_passes,
    pass_modules,
)
from helpers import begin_one, expand_one, forward_one

VOCAB, HIDDEN = 64, 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny ops, 1 thread


def llama(seed=0, layers=2, head_scale=4.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # sharper target distributions than the random init
    return model


@pytest.fixture(scope="module")
def target() -> Target:
    return Target(llama(0), None, name="tiny-llama")


def make_drafter(target, seed=1, **kwargs) -> FeatureDrafterModel:
    torch.manual_seed(seed)
    return FeatureDrafterModel(FeatureDrafterConfig.for_target(target, **kwargs), target)


DRAFTERS = {
    "eagle": {},
    "prism2": {"architecture": "prism", "num_modules": 2, "step_mapping": [0, 1]},
    "prism3": {"architecture": "prism", "num_modules": 3, "step_mapping": [0, 1, 2]},
    "stacked2": {"architecture": "stacked", "layers_per_module": 2},
    "prism2_stacked": {"architecture": "prism", "num_modules": 2, "step_mapping": [0, 1], "layers_per_module": 2},
    "prism_star": {"architecture": "prism", "num_modules": 2, "step_mapping": [0, 1], "input_layers": [0, 1, 2]},
}


def make_batch(target, lengths=(10, 7), seed=0, input_layers=None, loss_from=3) -> dict:
    """Right-padded batch with real target features; junk (not zeros) in padded slots."""
    g = torch.Generator().manual_seed(seed)
    B, n = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (B, n), generator=g)
    attn = torch.zeros(B, n, dtype=torch.long)
    hidden = torch.randn(B, n, HIDDEN, generator=g, dtype=torch.float64)
    layers = torch.randn(B, n, 3 * HIDDEN, generator=g, dtype=torch.float64) if input_layers else None
    for b, L in enumerate(lengths):
        attn[b, :L] = 1
        out = forward_one(target, ids[b, :L], torch.arange(L), target.new_cache(), feature_layers=input_layers)
        hidden[b, :L] = out.features
        if input_layers:
            layers[b, :L] = out.layer_features
    loss_mask = attn.clone()
    loss_mask[:, :loss_from] = 0  # a "prompt" without loss
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "hidden": hidden}
    if input_layers:
        batch["layers"] = layers
    return batch


def pass_features(model, batch, stage="tuning", steps=3, detach=False):
    raw = batch["layers"] if model.config.input_layers else batch["hidden"]
    modules = pass_modules(model, stage, steps)
    return draft_passes(
        model, batch["input_ids"], model.input_features(raw), batch["attention_mask"], steps, modules, detach
    )


# --------------------------------------------------------------------------- (a) masks
def _pattern(mask):
    return ["".join("x" if v == 0 else "." for v in row) for row in mask[0, 0]]


def test_alignment_mask_pass2_and_pass3_n5():
    assert _pattern(alignment_mask(5, 1, torch.float64)) == [
        "x....",
        "xx...",
        "xxx..",
        "xxxx.",
        "xxxxx",
    ]
    # keys: pass 1 positions 0..4 | pass 2 positions 0..4
    assert _pattern(alignment_mask(5, 2, torch.float64)) == [
        ".....x....",
        "x.....x...",
        "xx.....x..",
        "xxx.....x.",
        "xxxx.....x",
    ]
    # keys: pass 1 | pass 2 | pass 3
    assert _pattern(alignment_mask(5, 3, torch.float64)) == [
        "..........x....",
        ".....x.....x...",
        "x.....x.....x..",
        "xx.....x.....x.",
        "xxx.....x.....x",
    ]
    mask = alignment_mask(5, 3, torch.float32)
    assert mask.shape == (1, 1, 5, 15)
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}  # additive, not 0/1


def test_alignment_mask_key_padding():
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = alignment_mask(5, 2, torch.float64, key_padding=pad)
    assert mask.shape == (2, 1, 5, 10)
    assert _pattern(mask[:1]) == _pattern(alignment_mask(5, 2, torch.float64))
    assert _pattern(mask[1:]) == [
        ".....x....",
        "x.....x...",
        "xx.....x..",
        "xxx.....x.",  # padded keys (pass 1 position 3, pass 2 position 3) hidden; itself kept
        "xxx......x",
    ]


# --------------------------------------------------------------------------- (b) consistency
def inference_feature(model, ids, feats, i, j):
    """What FeatureDrafter computes for pass j at drafter position i: prefix t[0..i-j+2]
    consumed by begin (step 0), then j-1 chained expansions with the drafter's own features."""
    drafter = FeatureDrafter(model)
    P = i - j + 2  # committed prompt t[0..P-1], first generated token t[P]
    begin_one(drafter, ids[:P], int(ids[P]), feats[:P])
    feature = drafter.root_feature[0]  # batch row 0
    for d in range(1, j):
        tokens = ids[P + d : P + d + 1]
        expand_one(drafter, tokens, torch.tensor([d - 2]), torch.ones(1, d, dtype=torch.bool), d)
        feature = drafter.slot_features[-1][0, 0]
    return feature


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_training_passes_match_inference(target, name):
    kwargs = DRAFTERS[name]
    model = make_drafter(target, **kwargs).eval()
    batch = make_batch(target, lengths=(9, 6), input_layers=kwargs.get("input_layers"))
    steps = 3
    with torch.no_grad():
        outs = pass_features(model, batch, "tuning", steps)
    raw = batch["layers"] if model.config.input_layers else batch["hidden"]
    checked = 0
    for b in range(2):
        L = int(batch["attention_mask"][b].sum())
        ids, feats = batch["input_ids"][b, :L], raw[b, :L]
        for j in range(1, steps + 1):
            for i in range(j - 1, L - 1):  # every valid drafter position of the real part
                ref = inference_feature(model, ids, feats, i, j)
                got = outs[j - 1][b, i]
                torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)
                torch.testing.assert_close(model.logits(got), model.logits(ref), atol=1e-9, rtol=0)
                checked += 1
    assert checked == 3 * (8 + 5) - 3 * 2  # (L-1) - (j-1) positions per pass and sequence


def test_hass_uses_module0_for_every_pass(target):
    model = make_drafter(target, **DRAFTERS["prism2"])
    assert pass_modules(model, "hass", 3) == [0, 0, 0]
    assert pass_modules(model, "tuning", 3) == [0, 1, 1]
    assert pass_modules(make_drafter(target, **DRAFTERS["prism3"]), "tuning", 4) == [0, 1, 2, 2]


# --------------------------------------------------------------------------- (c) losses
def test_loss_terms_by_hand():
    pred = torch.tensor([[0.5, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    tgt = torch.zeros(2, 2, dtype=torch.float64)
    # SmoothL1 (beta 1): 0.5 d^2 below 1, |d| - 0.5 above; mean over the hidden dim.
    torch.testing.assert_close(smooth_l1_per_position(pred, tgt), torch.tensor([(0.125 + 1.5) / 2, (2.5 + 0) / 2], dtype=torch.float64))
    p = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64)
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    ce = -(0.25 * math.log(0.5) + 0.75 * math.log(0.25))
    assert soft_cross_entropy(log_q, p).item() == pytest.approx(ce, abs=1e-12)
    dist = TargetDistribution.from_logits(torch.log(p.clamp_min(1e-300)), topk=1)
    assert dist.topk_ids.tolist() == [[1]]
    assert topk_cross_entropy(log_q, dist.topk_ids, dist.topk_probs).item() == pytest.approx(-0.75 * math.log(0.25), abs=1e-12)


def _smooth_l1_by_hand(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


@pytest.mark.parametrize(
    "name, stage", [("prism2", "eagle"), ("prism2", "hass"), ("prism2", "tuning"), ("prism_star", "hass")]
)
def test_compute_loss_matches_explicit_loop(target, name, stage):
    model = make_drafter(target, **DRAFTERS[name]).eval()
    batch = make_batch(target, input_layers=DRAFTERS[name].get("input_layers"))
    cfg = ObjectiveConfig(objective=stage, aligned_steps=3, topk_weight=0.5, topk=3, step_weights=[1.0, 0.7, 0.5])
    loss, metrics = compute_loss(model, batch, cfg)
    steps = cfg.num_passes()
    with torch.no_grad():
        outs = pass_features(model, batch, stage, steps, detach=stage == "hass")
    hidden, lm, am = batch["hidden"], batch["loss_mask"], batch["attention_mask"]
    n = hidden.shape[1]
    expected = 0.0
    for j in range(1, steps + 1):
        feats, ces, tks, hits = [], [], [], []
        for b in range(hidden.shape[0]):
            for i in range(j - 1, n - 2):
                if not (lm[b, i + 2] and am[b, i + 2]):
                    continue
                pred, tgt = outs[j - 1][b, i], hidden[b, i + 1]  # always the last hidden state
                p = torch.softmax(model.logits(tgt), -1)
                log_q = torch.log_softmax(model.logits(pred), -1)
                feats.append(_smooth_l1_by_hand(pred, tgt))
                ces.append(-(p * log_q).sum())
                top = p.topk(3).indices
                tks.append(-(p[top] * log_q[top]).sum())
                hits.append(float(model.logits(pred).argmax() == p.argmax()))
        f, c, t = (torch.stack(v).mean().item() for v in (feats, ces, tks))
        assert metrics[f"feature_loss_step{j}"] == pytest.approx(f, rel=1e-10)
        assert metrics[f"ce_loss_step{j}"] == pytest.approx(c, rel=1e-10)
        assert metrics[f"topk_loss_step{j}"] == pytest.approx(t, rel=1e-10)
        assert metrics[f"count_step{j}"] == len(hits)
        assert metrics[f"acc_step{j}"] == pytest.approx(sum(hits) / len(hits))
        w = cfg.step_weights[j - 1]
        expected += w * (0.1 * c + 0.5 * t + (1.0 * f if stage != "tuning" else 0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-10)
    # lengths 10 and 7, loss from position 3: drafted tokens 3..9 and 3..6 -> 7 + 4 rows.
    assert metrics["count_step1"] == 7 + 4


def test_masked_positions_do_not_change_the_loss(target):
    model = make_drafter(target, **DRAFTERS["prism2"]).eval()
    cfg = ObjectiveConfig(objective="tuning", topk_weight=1.0)
    batch = make_batch(target, lengths=(10, 7))
    loss, _metrics = compute_loss(model, batch, cfg)
    # Padded slots: other hidden / token values change nothing.
    other = {k: v.clone() for k, v in batch.items()}
    other["hidden"][1, 7:] += 5.0
    other["input_ids"][1, 7:] = (other["input_ids"][1, 7:] + 1) % VOCAB
    assert compute_loss(model, other, cfg)[0].item() == loss.item()
    # A sequence without loss rows contributes nothing: equals the other sequence alone.
    muted = {k: v.clone() for k, v in batch.items()}
    muted["loss_mask"][1] = 0
    alone = {k: v[:1].clone() for k, v in batch.items()}
    torch.testing.assert_close(compute_loss(model, muted, cfg)[0], compute_loss(model, alone, cfg)[0], atol=1e-12, rtol=0)
    # Padding a sequence (extra junk columns) does not change its loss either.
    padded = make_batch(target, lengths=(7, 10))
    short = {k: v[:1, :7].clone() for k, v in padded.items()}
    full = {k: v[:1].clone() for k, v in padded.items()}
    torch.testing.assert_close(compute_loss(model, short, cfg)[0], compute_loss(model, full, cfg)[0], atol=1e-12, rtol=0)


def test_no_loss_rows_gives_zero_loss_and_backward_works(target):
    model = make_drafter(target)
    batch = make_batch(target)
    batch["loss_mask"].zero_()
    loss, metrics = compute_loss(model, batch, ObjectiveConfig(objective="hass", topk_weight=1.0))
    loss.backward()
    assert loss.item() == 0.0 and metrics["count_step1"] == 0 and metrics["acc_step1"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_runs(dtype):
    low = Target(llama(0).to(dtype), None, name="tiny-low")
    model = make_drafter(low, **DRAFTERS["prism2"]).train()
    batch = make_batch(Target(llama(0), None), input_layers=None)  # float64 features, cast inside
    loss, metrics = compute_loss(model, batch, ObjectiveConfig(objective="tuning", topk_weight=1.0), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(math.isfinite(v) for v in metrics.values())
    assert model.processing[1].fc.weight.grad.dtype == dtype


def test_float32_drafter_on_bf16_target():
    """The training loop keeps the drafter in float32 whatever the target's dtype."""
    low = Target(llama(0).to(torch.bfloat16), None, name="tiny-bf16")
    model = make_drafter(low, **DRAFTERS["prism2"]).float().train()
    batch = make_batch(Target(llama(0), None))
    loss, _metrics = compute_loss(model, batch, ObjectiveConfig(objective="hass", topk_weight=1.0))
    loss.backward()
    assert math.isfinite(loss.item()) and model.processing[0].fc.weight.grad.dtype == torch.float32


def test_tuning_trains_module1_only_through_later_passes(target):
    model = make_drafter(target, **DRAFTERS["prism2"]).eval()
    copy_module0_into_others(model)
    batch = make_batch(target)
    loss, _ = compute_loss(model, batch, ObjectiveConfig(objective="tuning", aligned_steps=1))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.processing[1].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.processing[0].parameters())
    model.zero_grad(set_to_none=True)
    # Only pass 2's loss: module 1 runs pass 2, module 0 gets gradient through the prefix KV and
    # the fed-back pass-1 prediction (nothing is detached in tuning).
    loss, _ = compute_loss(model, batch, ObjectiveConfig(objective="tuning", aligned_steps=2, step_weights=[0.0, 1.0]))
    loss.backward()
    assert all(p.grad is not None for p in model.processing[1].parameters())
    assert model.processing[1].fc.weight.grad.any()
    assert model.processing[0].fc.weight.grad.any()


def test_hass_detaches_cross_step_inputs(target):
    model = make_drafter(target).eval()
    batch = make_batch(target)
    valid = torch.arange(batch["input_ids"].shape[1] - 1) >= 1
    for detach in (True, False):
        feats = batch["hidden"].clone().requires_grad_(True)
        outs = draft_passes(model, batch["input_ids"], feats, batch["attention_mask"], 2, [0, 0], detach)
        outs[0].retain_grad()
        outs[1][:, valid].sum().backward()
        if detach:  # pass 2 sees neither pass 1's outputs nor (through its KV) the input features
            assert outs[0].grad is None and feats.grad is None
        else:
            assert outs[0].grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    # Same through compute_loss: a loss on pass 2 only gives the input features no gradient in
    # hass (the targets are constants), and some in tuning.
    for stage, expect in (("hass", False), ("tuning", True)):
        b = dict(batch, hidden=batch["hidden"].clone().requires_grad_(True))
        loss, _ = compute_loss(model, b, ObjectiveConfig(objective=stage, aligned_steps=2, step_weights=[0.0, 1.0]))
        loss.backward()
        has = b["hidden"].grad is not None and bool(b["hidden"].grad.abs().sum() > 0)
        assert has == expect, stage


def test_noise_only_in_training_and_reproducible(target):
    model = make_drafter(target)
    batch = make_batch(target)
    cfg = ObjectiveConfig(objective="eagle")
    clean = compute_loss(model.eval(), batch, cfg)[0].item()
    assert compute_loss(model.eval(), batch, cfg, torch.Generator().manual_seed(0))[0].item() == clean
    model.train()
    a = compute_loss(model, batch, cfg, torch.Generator().manual_seed(0))[0].item()
    b = compute_loss(model, batch, cfg, torch.Generator().manual_seed(0))[0].item()
    c = compute_loss(model, batch, cfg, torch.Generator().manual_seed(1))[0].item()
    assert a == b and a != c and a != clean
    assert compute_loss(model, batch, ObjectiveConfig(objective="eagle", noise_std=0.0))[0].item() == clean
    star = make_drafter(target, **DRAFTERS["prism_star"]).train()
    sbatch = make_batch(target, input_layers=[0, 1, 2])
    x = compute_loss(star, sbatch, cfg, torch.Generator().manual_seed(0))[0].item()
    y = compute_loss(star, sbatch, cfg, torch.Generator().manual_seed(1))[0].item()
    assert x == y  # PRISM* (multi-layer input): no noise


# --------------------------------------------------------------------------- (d) copy
def test_copy_module0_into_others(target):
    model = make_drafter(target, **DRAFTERS["prism3"])
    s0 = model.processing[0].state_dict()
    assert not torch.equal(model.processing[1].fc.weight, model.processing[0].fc.weight)
    copy_module0_into_others(model)
    for block in model.processing[1:]:
        for k, v in block.state_dict().items():
            assert torch.equal(v, s0[k]) and v.data_ptr() != s0[k].data_ptr()
    with torch.no_grad():
        model.processing[0].fc.weight.add_(1.0)
    assert not torch.equal(model.processing[1].fc.weight, model.processing[0].fc.weight)


# --------------------------------------------------------------------------- (e) training
def _sgd_losses(params, step, n_steps=6, lr=0.05):
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(n_steps):
        opt.zero_grad()
        loss, _metrics = step()
        assert math.isfinite(loss.item())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("eagle", ObjectiveConfig(objective="eagle")),
        ("eagle", ObjectiveConfig(objective="hass")),
        ("eagle", ObjectiveConfig(objective="hass", topk_weight=1.0)),
        ("prism2", ObjectiveConfig(objective="tuning")),
        ("stacked2", ObjectiveConfig(objective="hass")),
        ("prism_star", ObjectiveConfig(objective="tuning")),
    ],
)
def test_sgd_reduces_loss(target, name, cfg):
    kwargs = DRAFTERS[name]
    model = make_drafter(target, **kwargs).train()
    if cfg.objective == "tuning":
        copy_module0_into_others(model)
    batch = make_batch(target, input_layers=kwargs.get("input_layers"))
    gen = torch.Generator()

    def step():
        gen.manual_seed(0)  # the same noise every step: a fixed objective
        return compute_loss(model, batch, cfg, gen)

    losses = _sgd_losses(model.parameters(), step, lr=0.5 if cfg.objective == "tuning" else 0.05)
    assert losses[-1] < losses[0], losses


def test_standard_objective(target):
    lm = llama(seed=3, layers=1, head_scale=1.0)
    drafter = StandardDrafter(lm)
    for p in lm.parameters():
        p.requires_grad_(True)
    batch = make_batch(target)
    cfg = ObjectiveConfig(objective="standard")
    with pytest.raises(ValueError, match="target's LM head"):
        compute_loss(drafter, batch, cfg)
    attach_target_head(lm, target.lm_head)
    assert "target_head" not in dict(lm.named_modules()) and not any("target_head" in k for k in lm.state_dict())
    loss, metrics = compute_loss(drafter, batch, cfg)
    # By hand: position i drafts t[i+1]; target distribution softmax(head(hidden[i])).
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ces, kls = [], []
    for b in range(2):
        for i in range(batch["input_ids"].shape[1] - 1):
            if batch["loss_mask"][b, i + 1] and batch["attention_mask"][b, i + 1]:
                p = torch.softmax(target.lm_head(batch["hidden"][b, i]), -1)
                log_q = torch.log_softmax(logits[b, i], -1)
                ces.append(-(p * log_q).sum())
                kls.append((p * (p.log() - log_q)).sum())
    assert loss.item() == pytest.approx(torch.stack(ces).mean().item(), rel=1e-10)
    assert metrics["kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-8)
    assert metrics["count_step1"] == len(ces) and "acc_step1" in metrics
    losses = _sgd_losses(lm.parameters(), lambda: compute_loss(drafter, batch, cfg), lr=0.5)
    assert losses[-1] < losses[0], losses
