"""Reduced draft vocabulary (EAGLE-3 style): the d2t map, drafting, lossless decoding,
checkpoints, building the vocabulary from data and the reduced training loss."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import forward_one, tiny_llama
from prism_spec.drafters import (
    CheckpointError,
    Drafter,
    FeatureDrafter,
    FeatureDrafterModel,
    StandardDrafter,
    load_drafter,
    prism_config,
    save_feature_drafter,
)
from prism_spec.drafters.feature import check_d2t, draft_ids_for
from prism_spec.train.vocab import build_draft_vocab, count_tokens
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.train.losses import TargetDistribution, distillation_terms
from prism_spec.train.objectives import ObjectiveConfig, compute_loss, draft_passes, pass_modules

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
MAX_NEW = 24


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab_size=VOCAB, layers=3, seed=0)


def odd_ids(n: int) -> torch.Tensor:
    """A d2t whose draft ids all differ from their target ids: 1, 3, 5, ..."""
    return torch.arange(1, 2 * n, 2)


def reduced_model(target, d2t, seed=0, **kwargs) -> FeatureDrafterModel:
    torch.manual_seed(seed)
    config = prism_config(target, draft_vocab_size=int(d2t.numel()), **kwargs)
    return FeatureDrafterModel(config, target, d2t)


# --------------------------------------------------------------------------- the d2t map
def test_logits_are_the_d2t_rows_of_the_target_head(target):
    d2t = odd_ids(40)
    model = reduced_model(target, d2t)
    assert model.d2t.dtype == torch.long and model.d2t.tolist() == d2t.tolist()
    assert "d2t" in model.state_dict()
    x = torch.randn(5, target.hidden_size, dtype=torch.float64)
    logits = model.logits(x)
    assert logits.shape == (5, 40)
    torch.testing.assert_close(logits, target.lm_head(x)[:, d2t], rtol=1e-12, atol=1e-12)
    # Draft id i <-> target id d2t[i], both ways.
    drafter = FeatureDrafter(model)
    assert drafter.to_target_ids(torch.tensor([0, 1, 39])).tolist() == [1, 3, 79]
    assert drafter.to_target_ids(torch.tensor([[2, 5]])).tolist() == [[5, 11]]
    assert draft_ids_for(torch.tensor([1, 3, 79, 0, 2, 95]), d2t).tolist() == [0, 1, 39, -1, -1, -1]
    # A full-vocabulary drafter has no map and the identity.
    full = FeatureDrafterModel(prism_config(target), target)
    assert full.d2t is None and "d2t" not in full.state_dict()
    assert FeatureDrafter(full).to_target_ids(torch.tensor([7])).tolist() == [7]


def test_sliced_head_is_cached_and_refreshed(target):
    model = reduced_model(target, odd_ids(10))
    w1, _ = model.draft_head()
    assert model.draft_head()[0] is w1  # cached
    model.set_draft_vocab(odd_ids(10) + 1)  # in-place update of the buffer -> new slice
    w2, _ = model.draft_head()
    assert w2 is not w1
    torch.testing.assert_close(w2, target.lm_head.weight[odd_ids(10) + 1], rtol=0, atol=0)
    other = tiny_llama(vocab_size=VOCAB, layers=1, seed=3)
    model.__dict__["target_head"] = other.lm_head  # another head (storage) -> new slice
    torch.testing.assert_close(model.draft_head()[0], other.lm_head.weight[odd_ids(10) + 1], rtol=0, atol=0)
    # dtype / device moves keep the map an exact long tensor.
    model.float()
    assert model.d2t.dtype == torch.long
    model.to(torch.bfloat16)
    assert model.d2t.dtype == torch.long and model.d2t.tolist() == (odd_ids(10) + 1).tolist()


def test_slice_built_under_inference_mode_still_trains(target):
    model = reduced_model(target, odd_ids(30))
    with torch.inference_mode():
        model.logits(torch.randn(2, target.hidden_size, dtype=torch.float64))
    x = torch.randn(3, target.hidden_size, dtype=torch.float64, requires_grad=True)
    model.logits(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([3, 1, 5]), "sorted"),
        (torch.tensor([1, 1, 5]), "sorted"),
        (torch.tensor([1, 3, VOCAB]), "range|lie in"),
        (torch.tensor([-2, 3, 5]), "lie in"),
        (torch.tensor([1, 3]), "entries"),
        (torch.tensor([1.0, 3.0, 5.0]), "integer"),
    ],
)
def test_set_draft_vocab_rejects_bad_maps(target, bad, message):
    model = reduced_model(target, torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match=message):
        model.set_draft_vocab(bad)


def test_config_and_unset_map(target):
    with pytest.raises(ValueError, match="draft_vocab_size"):
        prism_config(target, draft_vocab_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        prism_config(target, draft_vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        FeatureDrafterModel(prism_config(target), target, d2t=odd_ids(4))
    unset = FeatureDrafterModel(prism_config(target, draft_vocab_size=8), target)
    with pytest.raises(RuntimeError, match="not set"):
        unset.logits(torch.zeros(1, target.hidden_size, dtype=torch.float64))
    with pytest.raises(ValueError, match="not set"):
        FeatureDrafter(unset)


# --------------------------------------------------------------------------- drafting and decoding
@pytest.fixture(scope="module")
def prompts(target):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 6, 11, 19, 30)]


@pytest.fixture(scope="module")
def vanilla(target, prompts):
    return [generate(target, p, None, GenerationConfig(max_new_tokens=MAX_NEW)).token_ids for p in prompts]


def test_draft_tree_proposes_only_draft_vocabulary_ids(target, prompts, monkeypatch):
    d2t = odd_ids(30)
    drafter = FeatureDrafter(reduced_model(target, d2t, num_modules=2))
    trees = []
    config = GenerationConfig(max_new_tokens=12, on_round=lambda tree, logits: trees.append(tree))
    for p in prompts[:3]:
        generate(target, p, drafter, config, DecodeOptions(TreeConfig.parse("paper")))
    drafted = torch.cat([t.tokens[1:] for t in trees])
    assert drafted.numel() > 100
    allowed = set(d2t.tolist())
    assert set(drafted.tolist()) <= allowed
    assert len(set(drafted.tolist())) > 10  # not a degenerate constant proposal


class ReducedOracle(Drafter):
    """The target itself (all layers) restricted to a draft vocabulary: proposes the target's
    greedy token whenever it is in ``d2t``, so a wrong id mapping would show as no acceptance."""

    def __init__(self, target, d2t):
        self.inner = StandardDrafter.from_target_layers(target, target.num_layers)
        self.d2t = d2t

    def begin(self, prompts, first_tokens, features):
        return self.inner.begin(prompts, first_tokens, features)[..., self.d2t]

    def extend(self, tokens, features):
        return self.inner.extend(tokens, features)[..., self.d2t]

    def expand(self, tokens, parent_slots, tree_mask, depth):
        return self.inner.expand(tokens, parent_slots, tree_mask, depth)[..., self.d2t]

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)

    def end_round(self):
        self.inner.end_round()

    def to_target_ids(self, draft_ids):
        return self.d2t[draft_ids]


@pytest.mark.parametrize("shape", ["chain:4", "6/2/2", "paper"])
def test_greedy_with_reduced_vocabulary_equals_vanilla(target, prompts, vanilla, shape):
    config, options = GenerationConfig(max_new_tokens=MAX_NEW), DecodeOptions(TreeConfig.parse(shape))
    produced = sorted({t for out in vanilla for t in out})
    # The oracle's vocabulary misses a third of the tokens greedy decoding produces (those
    # are never drafted but still committed as bonus tokens) and holds unrelated ones.
    d2t = torch.tensor(sorted(set(produced[::3] + produced[1::3]) | {0, 2, 4, 90, 95}))
    drafters = {
        "feature-untrained": FeatureDrafter(reduced_model(target, odd_ids(24), num_modules=2)),
        "reduced-oracle": ReducedOracle(target, d2t),
    }
    for name, drafter in drafters.items():
        committed = rounds = 0
        for prompt, expected in zip(prompts, vanilla):
            result = generate(target, prompt, drafter, config, options)
            assert result.token_ids == expected, f"{name}: prompt of {len(prompt)} tokens diverged"
            committed += sum(result.accepted) + result.rounds
            rounds += result.rounds
        if name == "reduced-oracle" and shape != "chain:4":
            assert committed / rounds > 1.5, committed / rounds


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def big_vocab_bf16():
    # ids above 256 are not representable in bfloat16: a cast d2t would be visibly wrong.
    return tiny_llama(vocab_size=1000, layers=1, seed=1, dtype=torch.bfloat16)


def _d2t_1000():
    return torch.tensor([0, 2, 257, 301, 513, 777, 998, 999])


def test_checkpoint_round_trip_bf16_keeps_d2t_exact(big_vocab_bf16, tmp_path):
    target = big_vocab_bf16
    model = reduced_model(target, _d2t_1000()).float()
    folder = save_feature_drafter(model, tmp_path / "drafter", dtype="bfloat16")
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["d2t"].dtype == torch.int64 and stored["d2t"].tolist() == _d2t_1000().tolist()
    assert stored["processing.0.fc.weight"].dtype == torch.bfloat16
    drafter = load_drafter(folder, target)
    assert drafter.config.draft_vocab_size == 8
    assert drafter.model.d2t.dtype == torch.long and drafter.model.d2t.tolist() == _d2t_1000().tolist()
    assert drafter.to_target_ids(torch.arange(8)).tolist() == _d2t_1000().tolist()
    x = torch.randn(3, target.hidden_size).to(torch.bfloat16)
    torch.testing.assert_close(drafter.model.logits(x), target.lm_head(x)[:, _d2t_1000()])
    # Also onto a float32 copy of the target.
    target32 = tiny_llama(vocab_size=1000, layers=1, seed=1, dtype=torch.float32)
    assert load_drafter(folder, target32).model.d2t.tolist() == _d2t_1000().tolist()


def _rewrite_d2t(folder, d2t):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    if d2t is None:
        del state["d2t"]
    else:
        state["d2t"] = d2t
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([0, 2, 257, 301, 513, 777, 998, 1000]), "lie in"),  # out of the target vocabulary
        (torch.tensor([0, 2, 257, 301, 513, 777, 998, -1]), "lie in"),
        (torch.tensor([0, 2, 257, 301, 513, 777, 999]), "entries"),  # wrong length
        (torch.tensor([2, 0, 257, 301, 513, 777, 998, 999]), "sorted"),
        (torch.tensor([0, 2, 257, 301, 513, 777, 998, 999], dtype=torch.bfloat16), "integer"),
        (None, "no d2t"),
    ],
)
def test_corrupt_d2t_fails_to_load(big_vocab_bf16, tmp_path, bad, message):
    folder = save_feature_drafter(reduced_model(big_vocab_bf16, _d2t_1000()), tmp_path / "drafter")
    _rewrite_d2t(folder, bad)
    with pytest.raises(CheckpointError, match=message):
        load_drafter(folder, big_vocab_bf16)


def test_full_vocabulary_checkpoint_with_a_stray_d2t_fails(big_vocab_bf16, tmp_path):
    folder = save_feature_drafter(FeatureDrafterModel(prism_config(big_vocab_bf16), big_vocab_bf16), tmp_path / "d")
    _rewrite_d2t(folder, _d2t_1000())
    with pytest.raises(CheckpointError, match="draft_vocab_size"):
        load_drafter(folder, big_vocab_bf16)


# --------------------------------------------------------------------------- building the vocabulary
class Ex:
    def __init__(self, ids, mask=None):
        self.input_ids, self.loss_mask = ids, mask


def test_build_draft_vocab_counts_masked_tokens():
    examples = [
        Ex([5, 5, 7, 7, 7, 1], [0, 0, 1, 1, 1, 1]),  # 5 is prompt only: not counted
        Ex(torch.tensor([3, 3, 3, 3, 7, 9]), torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool)),
        {"input_ids": [9, 9, 2], "loss_mask": [1, 1, 0]},
    ]
    # Masked counts: 7 x4, 9 x3, 1 x1, 3 x1.
    counts = count_tokens(examples, 10)
    assert counts.tolist() == [0, 1, 0, 1, 0, 0, 0, 4, 0, 3]
    assert build_draft_vocab(examples, 10, 2).tolist() == [7, 9]
    # Ties (1 and 3 once each) go to the lower id; the result is sorted ascending.
    assert build_draft_vocab(examples, 10, 3).tolist() == [1, 7, 9]
    # EOS ids are always in, taking the places of the least frequent tokens.
    assert build_draft_vocab(examples, 10, 3, include={0}).tolist() == [0, 7, 9]
    assert build_draft_vocab(examples, 10, 3, include=[8, 0]).tolist() == [0, 7, 8]
    # More room than seen tokens: the lowest unseen ids fill it (always exactly `size` ids).
    assert build_draft_vocab(examples, 10, 6).tolist() == [0, 1, 2, 3, 7, 9]
    d2t = build_draft_vocab(examples, 10, 4, include={0})
    check_d2t(d2t, 10, 4)


def test_build_draft_vocab_without_masks_counts_all_tokens():
    assert count_tokens([[4, 4, 1], Ex([1, 4])], 5).tolist() == [0, 2, 0, 0, 3]
    # Only prompt-only (all-zero) masks: fall back to every token.
    assert count_tokens([Ex([2, 2, 3], [0, 0, 0])], 5).tolist() == [0, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="lie in"):
        count_tokens([[1, 7]], 5)
    with pytest.raises(ValueError, match="do not fit"):
        build_draft_vocab([[1, 2]], 5, 1, include=[0, 4])


# --------------------------------------------------------------------------- the reduced loss
def test_reduced_soft_ce_by_hand():
    # Target over 4 tokens p = (.1, .2, .3, .4); draft vocabulary {1, 3}:
    # restricted and renormalised p_d = (.2, .4) / .6 = (1/3, 2/3).
    full = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.05, 0.15, 0.7, 0.1]], dtype=torch.float64))
    d2t = torch.tensor([1, 3])
    dist = TargetDistribution.from_logits(full, topk=1, d2t=d2t)
    torch.testing.assert_close(dist.probs[0], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    # Full-vocabulary argmax as a draft id: row 0 -> target 3 = draft 1; row 1 -> target 2, not draftable.
    assert dist.argmax.tolist() == [1, -1]
    assert dist.topk_ids.tolist() == [[1], [0]]  # top-1 of the restricted distribution, draft ids
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    terms = distillation_terms(torch.log(q), dist)
    ce0 = -(1 / 3 * math.log(0.25) + 2 / 3 * math.log(0.75))
    ce1 = math.log(2)  # p_d = (.15, .1) / .25 = (.6, .4) against q = (.5, .5)
    assert terms["ce"].tolist() == pytest.approx([ce0, ce1], abs=1e-12)
    assert terms["topk"].tolist() == pytest.approx([-(2 / 3) * math.log(0.75), -0.6 * math.log(0.5)], abs=1e-12)
    # Row 0: drafter argmax draft 1 = target 3 = target argmax. Row 1: never right, even
    # though the drafter's argmax (draft 0, a tie broken low) is the restricted argmax.
    assert terms["correct"].tolist() == [True, False]


def _batch(target, lengths=(12, 9), seed=0, loss_from=3):
    g = torch.Generator().manual_seed(seed)
    B, n = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (B, n), generator=g)
    attn = torch.zeros(B, n, dtype=torch.long)
    hidden = torch.randn(B, n, target.hidden_size, generator=g, dtype=torch.float64)
    for b, L in enumerate(lengths):
        attn[b, :L] = 1
        hidden[b, :L] = forward_one(target, ids[b, :L], torch.arange(L), target.new_cache()).features
    loss_mask = attn.clone()
    loss_mask[:, :loss_from] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "hidden": hidden}


@pytest.mark.parametrize("stage", ["hass", "tuning"])
def test_compute_loss_over_the_draft_vocabulary(target, stage):
    batch = _batch(target)
    # Half the target's greedy tokens at the loss rows are draftable, half are not.
    with torch.no_grad():
        greedy = target.lm_head(batch["hidden"]).argmax(-1).flatten().unique().tolist()
    d2t = torch.tensor(sorted(set(greedy[::2]) | {0, 1, 50, 51, 52}))
    assert set(greedy) - set(d2t.tolist())
    model = reduced_model(target, d2t, num_modules=2).eval()
    cfg = ObjectiveConfig(objective=stage, aligned_steps=3, topk_weight=0.5, topk=3, step_weights=[1.0, 0.7, 0.5])
    loss, metrics = compute_loss(model, batch, cfg)
    with torch.no_grad():
        outs = draft_passes(
            model, batch["input_ids"], batch["hidden"], batch["attention_mask"], 3,
            pass_modules(model, stage, 3), detach=stage == "hass",
        )
    hidden, lm = batch["hidden"], batch["loss_mask"]
    n, expected, all_hits = hidden.shape[1], 0.0, []
    for j in range(1, 4):
        ces, tks, hits, feats = [], [], [], []
        for b in range(hidden.shape[0]):
            for i in range(j - 1, n - 2):
                if not lm[b, i + 2]:
                    continue
                pred, tgt = outs[j - 1][b, i], hidden[b, i + 1]
                full = target.lm_head(tgt)
                p = torch.softmax(full[d2t], -1)  # restricted, renormalised
                log_q = torch.log_softmax(target.lm_head(pred)[d2t], -1)
                ces.append(-(p * log_q).sum())
                top = p.topk(3).indices
                tks.append(-(p[top] * log_q[top]).sum())
                hits.append(float(d2t[log_q.argmax()] == full.argmax()))
                feats.append(torch.nn.functional.smooth_l1_loss(pred, tgt))
        c, t, f = (torch.stack(v).mean().item() for v in (ces, tks, feats))
        assert metrics[f"ce_loss_step{j}"] == pytest.approx(c, rel=1e-9)
        assert metrics[f"topk_loss_step{j}"] == pytest.approx(t, rel=1e-9)
        assert metrics[f"acc_step{j}"] == pytest.approx(sum(hits) / len(hits))
        all_hits += hits
        w = cfg.step_weights[j - 1]
        expected += w * (0.1 * c + 0.5 * t + (f if stage == "hass" else 0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    model.train()
    loss, _ = compute_loss(model, batch, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.processing[0].fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stage", ["hass", "tuning"])
def test_a_step_without_accuracy_has_the_same_loss_and_skips_the_full_vocabulary(target, stage, monkeypatch):
    from prism_spec.train import objectives

    batch = _batch(target)
    d2t = torch.tensor(sorted(set(range(0, VOCAB, 3)) | {1}))
    model = reduced_model(target, d2t, num_modules=2).eval()
    cfg = ObjectiveConfig(objective=stage, aligned_steps=3, topk_weight=0.5, topk=3)
    loss, metrics = compute_loss(model, batch, cfg)
    full_calls = []
    real = objectives._target_logits
    monkeypatch.setattr(objectives, "_target_logits", lambda *a: full_calls.append(1) or real(*a))
    lean, lean_metrics = compute_loss(model, batch, cfg, accuracy=False)
    assert not full_calls  # no [rows, vocabulary] product
    assert lean.item() == pytest.approx(loss.item(), rel=1e-12)
    for j in (1, 2, 3):
        assert lean_metrics[f"ce_loss_step{j}"] == pytest.approx(metrics[f"ce_loss_step{j}"], rel=1e-12)
        assert lean_metrics[f"count_step{j}"] == metrics[f"count_step{j}"]
        assert f"acc_step{j}" not in lean_metrics and f"acc_step{j}" in metrics


def test_compute_loss_accuracy_uses_the_full_vocabulary_argmax(target):
    """A drafter that predicts the target features exactly is right wherever the target's
    argmax is draftable and wrong elsewhere, whatever the restricted distribution says."""
    batch = _batch(target)
    with torch.no_grad():
        greedy = target.lm_head(batch["hidden"]).argmax(-1)
    d2t = torch.tensor(sorted(set(greedy.flatten().unique().tolist()[::2]) | {0}))
    model = reduced_model(target, d2t).eval()
    # Replace the drafter's prediction by the target feature itself (an oracle drafter).
    model.step = lambda module, tokens, features, *a, **k: batch["hidden"][:, 1:]
    _, metrics = compute_loss(model, batch, ObjectiveConfig(objective="eagle", noise_std=0.0))
    lm = batch["loss_mask"][:, 2:].bool()
    target_next = greedy[:, 1:-1][lm]  # argmax of softmax(head(f[i+1])) at loss rows
    draftable = torch.isin(target_next, d2t).double().mean().item()
    assert 0 < draftable < 1
    assert metrics["acc_step1"] == pytest.approx(draftable)
