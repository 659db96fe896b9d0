"""Drafters: one interface, one registry, one module per method."""

from . import kinds  # noqa: F401  (registers the built-in architectures)
from .base import (REGISTRY, BenchKind, Drafter, DrafterKind, DrafterMismatchError, Recipe,
                   SingleSequenceDrafter, register)
from .checkpoint import (CheckpointError, load_drafter, load_feature_model, save_feature_drafter,
                         save_standard_drafter)
from .feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterModel, prism_config
from .standard import StandardDrafter

__all__ = [
    "CheckpointError",
    "load_drafter",
    "save_feature_drafter",
    "save_standard_drafter",
    "REGISTRY",
    "BenchKind",
    "DrafterKind",
    "Recipe",
    "load_feature_model",
    "Drafter",
    "DrafterMismatchError",
    "SingleSequenceDrafter",
    "FeatureDrafter",
    "FeatureDrafterConfig",
    "FeatureDrafterModel",
    "StandardDrafter",
    "prism_config",
    "register",
]
