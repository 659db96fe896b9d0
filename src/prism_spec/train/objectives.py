"""Training objectives for the drafters: EAGLE, HASS context alignment (also PRISM's warmup
stage), PRISM tuning, and distillation of a standard small-LM drafter.

Index conventions (one sequence of n tokens t[0..n-1], target features f[0..n-1], where f[k]
is the target's last hidden state after its final norm at position k, so softmax(head(f[k]))
is the target's distribution of t[k+1]):

* Drafter position i (i = 0..n-2) takes ``(embed(t[i+1]), x[i])`` at rotary position i and
  outputs a predicted feature h[i] meant to equal f[i+1]; head(h[i]) drafts t[i+2].
* Pass 1 (plain EAGLE): x[i] = f[i] (or fuse(layers[i]) for PRISM*), causal attention.
* Pass j > 1 (HASS context alignment): x[i] = h^(j-1)[i-1], the previous pass's prediction
  shifted right by one, and the query attends to the target-feature keys of pass 1 only up to
  position i-j+1; the j-1 newest context positions are the drafter's own earlier passes (see
  :func:`alignment_mask`). This is exactly draft depth j-1 of the EAGLE-2 tree at inference:
  committed tokens t[0..i-j+2] (prefix drafter entries 0..i-j+1 written by step 0), then a
  chain of j-1 expansions feeding the drafter's own predicted features (checked against
  ``FeatureDrafter.begin/expand`` in tests/train/test_objectives.py).
* A loss is taken at drafter position i of pass j when the drafted token t[i+2] is an
  assistant token (``loss_mask[i+2]``), is real (``attention_mask[i+2]``), and i >= j-1
  (pass j at i < j-1 would need an empty committed prefix, which inference never has).
* Losses are averaged over the masked positions of the whole batch (pooled, as EAGLE does),
  per pass, then summed over passes with ``step_weights`` (default 1 each).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers import DynamicCache

from ..drafters.feature import FeatureDrafterModel
from .config import OBJECTIVES
from .losses import (
    TargetDistribution,
    distillation_terms,
    masked_mean,
    smooth_l1_per_position,
)

@dataclass
class ObjectiveConfig:
    objective: str = "hass"  # "hass" (HASS: feature + soft CE, detached cross-step inputs) | "tuning" (PRISM: CE only, no detach) | "eagle" (plain EAGLE: 1 step) | "standard" (small-LM distillation)
    aligned_steps: int = 3  # HASS context-alignment passes (1 = plain EAGLE)
    feature_weight: float = 1.0  # SmoothL1 on predicted vs target features
    ce_weight: float = 0.1  # soft CE against the target's distribution softmax(head(target feature))
    topk_weight: float = 0.0  # HASS top-K distillation term, K = topk
    topk: int = 10
    noise_std: float = 0.2  # EAGLE-style uniform noise on input target features (last-hidden variant only)
    step_weights: list[float] | None = None  # optional per-aligned-step weights

    @classmethod
    def for_stage(cls, stage) -> "ObjectiveConfig":
        """The objective of a training stage (a config.StageConfig)."""
        return cls(
            objective=stage.objective, aligned_steps=stage.aligned_steps, feature_weight=stage.feature_weight,
            ce_weight=stage.ce_weight, topk_weight=stage.topk_weight, topk=stage.topk, noise_std=stage.noise_std,
            step_weights=list(stage.step_weights) if stage.step_weights is not None else None,
        )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.aligned_steps < 1:
            raise ValueError("aligned_steps must be >= 1")

    def num_passes(self) -> int:
        """Passes actually run: 1 for "eagle" and "standard", aligned_steps otherwise."""
        return 1 if self.objective in ("eagle", "standard") else int(self.aligned_steps)

    def weights(self) -> list[float]:
        steps = self.num_passes()
        if self.step_weights is None:
            return [1.0] * steps
        if len(self.step_weights) < steps:
            raise ValueError(f"step_weights has {len(self.step_weights)} entries for {steps} aligned steps")
        return [float(w) for w in self.step_weights[:steps]]


# --------------------------------------------------------------------------- masks
def alignment_mask(
    n: int,
    step: int,
    dtype: torch.dtype = torch.float32,
    device=None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask [B or 1, 1, n, step * n] for aligned pass ``step`` (1-based).

    Keys are the concatenated KV of passes 1..step (pass 1's n positions first, as the
    DynamicCache holds them). The query at position i of pass j sees

    * pass-1 keys (target features) at positions p <= i - (j-1): the committed prefix, and
    * the pass-k key at position p = i - (j-k) for every 2 <= k <= j: the drafter's own
      chain of earlier draft depths, the query itself being (pass j, position i).

    n = 5, pass 3 (``x`` visible, ``.`` masked)::

                     pass 1      pass 2      pass 3
        key pos ->  0 1 2 3 4   0 1 2 3 4   0 1 2 3 4
        query 0     . . . . .   . . . . .   x . . . .    (i < j-1: invalid, sees itself only)
        query 1     . . . . .   x . . . .   . x . . .    (invalid)
        query 2     x . . . .   . x . . .   . . x . .
        query 3     x x . . .   . . x . .   . . . x .
        query 4     x x x . .   . . . x .   . . . . x

    Pass 1 is the plain causal mask. Masked entries hold ``finfo(dtype).min`` (a true -inf
    mask, never a multiplicative 0/1 one). ``key_padding`` ([B, n] bool/0-1, 1 = real) also
    hides padded keys; every query keeps itself visible so no row is fully masked.
    """
    i = torch.arange(n, device=device)[:, None]
    p = torch.arange(n, device=device)[None, :]
    blocks = [p <= i - (step - 1)]
    blocks += [p == i - (step - k) for k in range(2, step + 1)]
    visible = torch.cat(blocks, dim=1)[None]  # [1, n, step*n]
    if key_padding is not None:
        real = key_padding.to(device=device, dtype=torch.bool).repeat(1, step)  # [B, step*n]
        visible = visible & real[:, None, :]
        visible[:, :, (step - 1) * n :] |= torch.eye(n, dtype=torch.bool, device=device)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def valid_positions(n: int, step: int, device=None) -> torch.Tensor:
    """Bool [n]: drafter positions whose pass-``step`` output has a real inference counterpart."""
    return torch.arange(n, device=device) >= step - 1


def pass_modules(model: FeatureDrafterModel, objective: str, steps: int) -> list[int]:
    """Module per pass. "tuning" follows the drafter's step mapping (pass j = draft step j-1,
    so pass 1 runs module_for_step(0), which writes the prefix KV, as at inference).
    "hass" and "eagle" train one module as a HASS / EAGLE drafter: module 0 for every pass."""
    if objective == "tuning":
        return [model.config.module_for_step(j) for j in range(steps)]
    return [0] * steps


# --------------------------------------------------------------------------- forward
def _detach_cache(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.detach()
            layer.values = layer.values.detach()


def draft_passes(
    model: FeatureDrafterModel,
    input_ids: torch.Tensor,
    input_features: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 1,
    modules: list[int] | None = None,
    detach: bool = False,
    return_masks: bool = False,
):
    """Run the aligned passes; return the predicted features of each pass, [B, n-1, h] each.

    ``input_ids`` [B, n]; ``input_features`` [B, n, h] are the pass-1 features already at the
    drafter's width (``model.input_features`` applied, noise added); ``attention_mask`` [B, n]
    (1 = real, right padding). Passes share one DynamicCache: pass j appends its KV after the
    KV of passes 1..j-1 and attends to them through :func:`alignment_mask`. With ``detach``
    (HASS) the fed-back predictions and the earlier passes' KV are cut from the graph.
    """
    B, n = input_ids.shape
    m = n - 1
    modules = modules if modules is not None else [0] * steps
    tokens = input_ids[:, 1:]
    positions = torch.arange(m, device=input_ids.device)[None].expand(B, m)
    key_padding = None
    if attention_mask is not None and not bool(attention_mask[:, 1:].bool().all()):
        key_padding = attention_mask[:, 1:]
    dtype = input_features.dtype
    cache = DynamicCache()
    x = input_features[:, :m]
    outputs, masks = [], []
    for j in range(1, steps + 1):
        if j > 1:
            prev = outputs[-1].detach() if detach else outputs[-1]
            # Position 0 has no previous prediction (invalid for j > 1; zeros, never in a loss).
            x = torch.cat([prev.new_zeros(B, 1, prev.shape[-1]), prev[:, :-1]], dim=1)
            if detach:
                _detach_cache(cache)
        mask = alignment_mask(m, j, dtype, input_ids.device, key_padding)
        outputs.append(model.step(modules[j - 1], tokens, x, positions, mask, cache))
        if return_masks:
            masks.append(mask)
    return (outputs, masks) if return_masks else outputs


def add_input_noise(
    features: torch.Tensor, attention_mask: torch.Tensor | None, noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """EAGLE's input augmentation: features + U(-0.5, 0.5) * noise_std * 512 / L, where L is
    each sequence's real length (EAGLE applies it per example before padding, so std 0.2 gives
    U(-0.1, 0.1) at L = 512). Drawn from ``generator`` (its device) for reproducibility."""
    if noise_std <= 0:
        return features
    B, n = features.shape[:2]
    if attention_mask is not None:
        lengths = attention_mask.sum(-1).clamp(min=1).to(features.device, torch.float64)
    else:
        lengths = torch.full((B,), float(n), device=features.device, dtype=torch.float64)
    scale = (noise_std * 512.0 / lengths).to(features.dtype)[:, None, None]
    gen_device = generator.device if generator is not None else features.device
    u = torch.rand(features.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return features + (u.to(features.device, features.dtype) - 0.5) * scale


def copy_module0_into_others(model: FeatureDrafterModel) -> None:
    """PRISM tuning-stage initialisation: every processing module becomes a copy of module 0."""
    source = model.processing[0].state_dict()
    with torch.no_grad():
        for block in model.processing[1:]:
            block.load_state_dict(source)


# --------------------------------------------------------------------------- losses
def _shared_head(model: FeatureDrafterModel):
    """The frozen head the drafter scores with, when it is a plain nn.Linear (else None: the
    generic soft-CE path over full distributions is used). With a reduced draft vocabulary:
    its rows d2t (an object with ``weight`` / ``bias``, what the drafter's logits use)."""
    head = model.__dict__.get("target_head")
    if not (isinstance(head, nn.Linear) and type(model).logits is FeatureDrafterModel.logits):
        return None
    if getattr(model, "d2t", None) is None:
        return head
    weight, bias = model.draft_head()
    return SimpleNamespace(weight=weight, bias=bias)


def _logits(model: FeatureDrafterModel, features: torch.Tensor) -> torch.Tensor:
    """model.logits, feeding the frozen head its own dtype (a float32 drafter trained against
    a bf16 target scores in bf16, as the drafter does at inference in the target's dtype)."""
    weight = getattr(model.__dict__.get("target_head"), "weight", None)
    if weight is not None and weight.dtype != features.dtype:
        features = features.to(weight.dtype)
    return model.logits(features)


def _target_logits(model: FeatureDrafterModel, features: torch.Tensor) -> torch.Tensor:
    """The target's own logits over its whole vocabulary (what the drafter is distilled from).
    Equal to :func:`_logits` unless the drafter has a reduced vocabulary."""
    if getattr(model, "d2t", None) is None:
        return _logits(model, features)
    head = model.__dict__["target_head"]
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dtype != features.dtype:
        features = features.to(weight.dtype)
    return head(features)


def _accumulate(metrics: dict, terms: dict, j: int, rows: int) -> None:
    metrics[f"count_step{j}"] = float(rows)
    if "correct" not in terms:  # no accuracy asked for
        return
    correct = float(terms["correct"].sum()) if rows else 0.0
    metrics[f"correct_step{j}"] = correct
    metrics[f"acc_step{j}"] = correct / rows if rows else 0.0


def compute_loss(
    model, batch: dict, cfg: ObjectiveConfig, generator: torch.Generator | None = None, accuracy: bool = True
) -> tuple[torch.Tensor, dict]:
    """batch: input_ids [B,n] long, attention_mask [B,n] (1 = real token, right padding),
    loss_mask [B,n] (1 on assistant tokens), hidden [B,n,h] (target last hidden state after
    final norm), optionally layers [B,n,k*h] (for drafters with config.input_layers).

    Returns (scalar loss to backprop, metrics). Metrics are floats: ``loss``; ``feature_loss``,
    ``ce_loss``, ``topk_loss`` (step-weighted sums of the per-pass means, so that loss =
    fw * feature_loss + cw * ce_loss + tw * topk_loss; in "tuning" the feature term is reported
    but not trained; "standard" reports 0 and its loss is the unweighted soft CE + tw * top-K,
    plus a ``kl`` metric = CE - H(p)); per pass j: ``acc_step{j}`` (drafter argmax == target
    argmax at the masked positions), ``correct_step{j}``, ``count_step{j}``,
    ``feature_loss_step{j}``, ``ce_loss_step{j}`` (+ ``topk_loss_step{j}``); ``tokens``
    (= count_step1).

    A drafter with a reduced draft vocabulary (``model.d2t``, EAGLE-3) is trained against the
    target distribution restricted to its d2t ids and renormalised (soft CE and top-K over the
    draft ids); ``acc_step{j}`` compares d2t[drafter argmax] with the target's full-vocabulary
    argmax, so a row whose target argmax is outside the draft vocabulary counts as wrong.
    ``accuracy=False`` (training steps whose metrics nobody logs) leaves out the ``acc`` and
    ``correct`` metrics and with them the target's full-vocabulary logits: the loss is the same.

    Objectives: "eagle" = 1 pass, feature + CE; "hass" = cfg.aligned_steps passes, feature + CE,
    cross-pass inputs and KV detached, module 0 for every pass; "tuning" = aligned passes
    through the step mapping, CE (+ top-K) only, nothing detached; "standard" = ``model`` is a
    StandardDrafter or its HF causal LM, trained by soft CE against softmax(target_head(hidden))
    (the target head comes from ``batch["target_head"]`` or :func:`attach_target_head`).
    """
    if cfg.objective == "standard":
        return _standard_loss(model, batch, cfg)
    if not isinstance(model, FeatureDrafterModel):
        raise TypeError(f"objective {cfg.objective!r} trains a FeatureDrafterModel, got {type(model).__name__}")

    device = model.processing[0].fc.weight.device
    dtype = model.processing[0].fc.weight.dtype
    input_ids = batch["input_ids"].to(device)
    B, n = input_ids.shape
    if n < 3:
        raise ValueError("sequences need at least 3 tokens (one drafted token after two inputs)")
    attention_mask = batch.get("attention_mask")
    attention_mask = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    )
    loss_mask = batch["loss_mask"].to(device).bool()
    hidden = batch["hidden"].to(device=device, dtype=dtype)

    # Pass-1 input features.
    if model.config.input_layers:
        if "layers" not in batch:
            raise KeyError(f"this drafter reads target layers {model.config.input_layers}: batch needs 'layers'")
        raw = batch["layers"].to(device=device, dtype=dtype)
    else:
        raw = hidden
        if model.training and cfg.noise_std > 0:
            raw = add_input_noise(hidden, attention_mask, cfg.noise_std, generator)
    features = model.input_features(raw)

    steps = cfg.num_passes()
    weights = cfg.weights()
    train_feature = cfg.objective in ("hass", "eagle")
    outputs = draft_passes(
        model, input_ids, features, attention_mask, steps, pass_modules(model, cfg.objective, steps),
        detach=cfg.objective == "hass",
    )

    # Masked rows of drafter positions (flattened [B, n-1]); the target side is computed once.
    m = n - 1
    select = torch.zeros(B, m, dtype=torch.bool, device=device)
    select[:, : m - 1] = loss_mask[:, 2:] & attention_mask[:, 2:]
    rows1 = select.reshape(-1).nonzero().squeeze(-1)  # pass-1 rows; later passes use a subset
    row_pos = rows1 % m
    target_feat = hidden[:, 1:].reshape(-1, hidden.shape[-1]).detach()[rows1]
    topk = cfg.topk if cfg.topk_weight > 0 else 0
    with torch.no_grad():
        if accuracy:
            # Reduced draft vocabulary (model.d2t): p restricted to the d2t ids and renormalised,
            # accuracy against the target's full-vocabulary argmax (see TargetDistribution).
            target_dist = TargetDistribution.from_logits(
                _target_logits(model, target_feat), topk, _shared_head(model), d2t=getattr(model, "d2t", None))
        else:
            # The loss alone (an unlogged training step): the target's logits over the draft
            # vocabulary only; the full-vocabulary product served only the accuracy's argmax.
            target_dist = TargetDistribution.from_logits(
                _logits(model, target_feat), topk, _shared_head(model), with_argmax=False)

    metrics: dict[str, float] = {}
    zero = hidden.new_zeros((), dtype=torch.promote_types(dtype, torch.float32))
    total = {"feature": zero, "ce": zero, "topk": zero}
    for j, (out, w) in enumerate(zip(outputs, weights), start=1):
        sub = row_pos >= j - 1
        rows = rows1[sub]
        count = int(rows.numel())
        pred = out.reshape(-1, out.shape[-1])[rows]
        tfeat = target_feat[sub]
        if train_feature:
            feat = masked_mean(smooth_l1_per_position(pred, tfeat), count)
        else:
            with torch.no_grad():
                feat = masked_mean(smooth_l1_per_position(pred.detach(), tfeat), count)
        terms = distillation_terms(_logits(model, pred), target_dist.select(sub), pred)
        ce = masked_mean(terms["ce"], count)
        total["feature"] = total["feature"] + w * feat
        total["ce"] = total["ce"] + w * ce
        metrics[f"feature_loss_step{j}"] = float(feat.detach())
        metrics[f"ce_loss_step{j}"] = float(ce.detach())
        if "topk" in terms:
            tk = masked_mean(terms["topk"], count)
            total["topk"] = total["topk"] + w * tk
            metrics[f"topk_loss_step{j}"] = float(tk.detach())
        _accumulate(metrics, terms, j, count)

    loss = cfg.ce_weight * total["ce"]
    if train_feature:
        loss = loss + cfg.feature_weight * total["feature"]
    if cfg.topk_weight > 0:
        loss = loss + cfg.topk_weight * total["topk"]
    metrics.update(
        loss=float(loss.detach()),
        feature_loss=float(total["feature"].detach()),
        ce_loss=float(total["ce"].detach()),
        topk_loss=float(total["topk"].detach()),
        tokens=metrics["count_step1"],
    )
    return loss, metrics


# --------------------------------------------------------------------------- standard drafter
def attach_target_head(model: nn.Module, target_head: nn.Module) -> nn.Module:
    """Give a standard drafter's LM the target's frozen LM head for :func:`compute_loss`
    (kept out of parameters() and state_dict(), like FeatureDrafterModel.target_head)."""
    model.__dict__["target_head"] = target_head
    return model


def _standard_loss(model, batch: dict, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict]:
    lm = model.lm.model if hasattr(model, "lm") and hasattr(model.lm, "model") else model
    target_head = batch.get("target_head")
    for owner in (lm, model):
        if target_head is None:
            target_head = owner.__dict__.get("target_head")
    if target_head is None:
        raise ValueError(
            "objective 'standard' needs the target's LM head: pass batch['target_head'] or call "
            "attach_target_head(lm, target.lm_head) first"
        )
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = head.weight.device
    input_ids = batch["input_ids"].to(device)
    _B, _n = input_ids.shape
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    loss_mask = batch["loss_mask"].to(device).bool()
    hidden = batch["hidden"].to(device)

    out = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).last_hidden_state
    # Position i drafts t[i+1]; the target's distribution for it is softmax(target_head(f[i])).
    select = loss_mask[:, 1:] & attention_mask[:, 1:].bool()
    rows = select.reshape(-1).nonzero().squeeze(-1)
    count = int(rows.numel())
    with torch.no_grad():
        tfeat = hidden[:, :-1].reshape(-1, hidden.shape[-1])[rows].to(target_head.weight.dtype)
        target_dist = TargetDistribution.from_logits(target_head(tfeat), cfg.topk if cfg.topk_weight > 0 else 0)
    logits = head(out[:, :-1].reshape(-1, out.shape[-1])[rows])
    if logits.shape[-1] != target_dist.probs.shape[-1]:
        raise ValueError(
            f"drafter vocabulary {logits.shape[-1]} != target vocabulary {target_dist.probs.shape[-1]}"
        )
    terms = distillation_terms(logits, target_dist)
    ce = masked_mean(terms["ce"], count)
    loss = ce  # the whole objective is distillation: ce_weight only scales the others' CE term
    metrics = {"ce_loss_step1": float(ce.detach()), "feature_loss_step1": 0.0}
    topk = ce.new_zeros(())
    if "topk" in terms:
        topk = masked_mean(terms["topk"], count)
        loss = loss + cfg.topk_weight * topk
        metrics["topk_loss_step1"] = float(topk.detach())
    with torch.no_grad():
        entropy = masked_mean(-(target_dist.probs * target_dist.probs.clamp_min(1e-30).log()).sum(-1), count)
    _accumulate(metrics, terms, 1, count)
    metrics.update(
        loss=float(loss.detach()),
        feature_loss=0.0,
        ce_loss=float(ce.detach()),
        kl=float((ce - entropy).detach()),
        topk_loss=float(topk.detach()),
        tokens=float(count),
    )
    return loss, metrics
