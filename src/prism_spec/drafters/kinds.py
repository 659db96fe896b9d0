"""The built-in drafter architectures, registered: how each loads, its training recipes
(``prism train --recipe``) and its ``prism bench`` method kinds. A new drafter is one class
and one :func:`~prism_spec.drafters.base.register` call like these."""

from __future__ import annotations

from .base import BenchKind, DrafterKind, Recipe, register
from .checkpoint import load_feature_drafter, load_standard_drafter


def _hass_stage(**kw) -> dict:
    base = dict(name="hass", objective="hass", aligned_steps=3, feature_weight=1.0, ce_weight=0.1,
                noise_std=0.2, lr=3e-5)
    base.update(kw)
    return base


def _eagle2() -> dict:
    return {"drafter": {"architecture": "eagle"},
            "stages": [dict(name="eagle", objective="eagle", aligned_steps=1, feature_weight=1.0, ce_weight=0.1,
                            noise_std=0.2, lr=3e-5)]}


def _hass(topk: bool = False) -> dict:
    return {"drafter": {"architecture": "eagle"},
            "stages": [_hass_stage(),
                       _hass_stage(name="topk", topk_weight=1.0, topk=10, lr=1e-5, enabled=topk)]}


def _prism(star: bool = False) -> dict:
    return {
        "drafter": {"architecture": "prism", "num_modules": 2, "step_mapping": [0, 1],
                    "input_layers": "auto" if star else "none"},
        "stages": [
            _hass_stage(name="warmup", copy_module0_after=True, noise_std=0.0 if star else 0.2),
            dict(name="tuning", objective="tuning", aligned_steps=3, feature_weight=0.0, ce_weight=0.1,
                 noise_std=0.0 if star else 0.2, lr=1e-5),
        ],
    }


def _stacked(layers: int) -> dict:
    return {"drafter": {"architecture": "stacked", "layers_per_module": layers},
            "stages": [_hass_stage(name=f"hass{layers}")]}


def _standard() -> dict:
    return {"drafter": {"architecture": "standard", "standard_layers": 2},
            "stages": [dict(name="distill", objective="standard", aligned_steps=1, feature_weight=0.0,
                            ce_weight=1.0, noise_std=0.0, lr=1e-4)]}


register(DrafterKind(
    "eagle", load_feature_drafter,
    recipes=(
        Recipe("eagle2", "EAGLE-2 drafter: one module, one stage, no context alignment (aligned_steps=1)", _eagle2),
        Recipe("hass", "HASS: one module, 3-step context alignment; optional top-K stage "
               "(enable with --set stages.1.enabled=true or use hass-topk)", _hass),
        Recipe("hass-topk", "HASS with its second top-K distillation stage enabled", lambda: _hass(topk=True)),
    ),
    bench_kinds=(BenchKind("eagle2", "EAGLE-2 drafter folder"),
                 BenchKind("hass", "HASS drafter folder (same architecture as EAGLE-2, other training)")),
))
register(DrafterKind(
    "prism", load_feature_drafter,
    recipes=(
        Recipe("prism", "PRISM: 2 modules; HASS warmup stage, copy module 0 -> 1, CE-only tuning stage "
               "(lr 1e-5, no detach across aligned steps)", _prism),
        Recipe("prism*", "PRISM* : PRISM with multi-layer target input (input_layers auto, EAGLE-3 style)",
               lambda: _prism(star=True)),
    ),
    bench_kinds=(BenchKind("prism", "PRISM drafter folder", multi_layer=False),
                 BenchKind("prism*", "PRISM drafter folder with multi-layer input", multi_layer=True)),
))
register(DrafterKind(
    "stacked", load_feature_drafter,
    recipes=(Recipe("stacked2", "HASS-2: one module of 2 stacked decoder layers", lambda: _stacked(2)),
             Recipe("stacked3", "HASS-3: one module of 3 stacked decoder layers", lambda: _stacked(3))),
    bench_kinds=(BenchKind("stacked", "stacked-layer HASS drafter folder (HASS-2 / HASS-3)"),),
))
register(DrafterKind(
    "standard", load_standard_drafter, trains_as="standard",
    recipes=(Recipe("standard", "standard drafter: the target's first N layers (drafter.standard_layers) "
                    "distilled on the target's distribution", _standard),),
    bench_kinds=(BenchKind("standard", "drafter folder or layers:N"),),
))
