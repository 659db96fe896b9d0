"""A campaign's settings (``campaign.json``'s ``config``) and the checks on them."""

from __future__ import annotations

import dataclasses

METHODS = ("eagle2", "hass", "prism")


@dataclasses.dataclass
class CampaignConfig:
    target: str = "smollm2-135m"
    data: list[str] = dataclasses.field(default_factory=list)
    base_steps: int = 200
    batch_size: int = 16
    max_length: int = 1024
    lr: float = 2e-4
    tuning_lr: float = 2e-5
    draft_vocab_size: int | None = 16384
    holdout: int = 200
    dtype: str = "bfloat16"
    mixed_precision: str = "bf16"
    seed: int = 0
    #: Batches of similar-length examples (far less padding; see data_order.DataOrder).
    group_by_length: bool = True
    #: Per method, train-config settings (dotted keys, as ``prism train --set`` takes them) for
    #: that method's segments, e.g. ``{"hass": {"stages.hass.aligned_steps": 2}}``. HASS's
    #: settings shape PRISM's first stage too (PRISM starts from HASS's snapshot); PRISM's own
    #: address its tuning stage. What makes the budget equal is the campaign's: see
    #: RECIPE_SETTINGS_FIXED.
    recipe_settings: dict[str, dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.base_steps < 4:
            raise ValueError(f"base_steps must be >= 4 (PRISM's 3:1 split of a level needs room), got {self.base_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_recipe_settings(self.recipe_settings)

    @classmethod
    def from_dict(cls, data: dict) -> CampaignConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown campaign settings {unknown}; known: {sorted(names)}")
        return cls(**data)


#: Stage fields a campaign sets itself (the budget and the data each method gets): recipe
#: settings may not change them.
RECIPE_SETTINGS_FIXED = ("steps", "epochs", "batch_size", "grad_accum", "lr", "copy_module0_after")


def check_recipe_settings(settings: dict) -> None:
    """Clear errors for recipe settings a campaign cannot honour; unknown keys are caught when
    a segment's config is built (:func:`check_segment_configs`)."""
    if not isinstance(settings, dict):
        raise ValueError(f"recipe_settings must map a method to its settings, got {settings!r}")
    for method, values in settings.items():
        if method not in METHODS:
            raise ValueError(f"recipe_settings: unknown method {method!r}; methods are {list(METHODS)}")
        if not isinstance(values, dict):
            raise ValueError(f"recipe_settings.{method} must map dotted keys to values, got {values!r}")
        for key in values:
            parts = key.split(".")
            if parts[0] not in ("stages", "drafter") or len(parts) < 2:
                raise ValueError(f"recipe_settings.{method}: {key!r} is not a stage or drafter setting "
                                 "(e.g. stages.hass.aligned_steps); data, target and schedule are the campaign's")
            if parts[0] == "stages" and parts[-1] in RECIPE_SETTINGS_FIXED:
                raise ValueError(f"recipe_settings.{method}: {parts[-1]} is set by the campaign for every method "
                                 "(equal budgets); change the campaign's own setting instead")
            if key == "drafter.draft_vocab_size":
                raise ValueError(f"recipe_settings.{method}: the draft vocabulary is the campaign's draft_vocab_size")
            if method == "prism" and parts[0] == "stages" and len(parts) > 1 and parts[1] in ("0", "warmup"):
                raise ValueError("recipe_settings.prism: PRISM's first stage is HASS's snapshot in a campaign; "
                                 "set it under 'hass'")


def level_steps(config: CampaignConfig, level: int) -> int:
    return config.base_steps * 2 ** level
