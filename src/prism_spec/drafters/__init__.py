"""Drafters: one interface, one registry, one module per method."""

from .base import REGISTRY, Drafter, DrafterMismatchError, register
from .checkpoint import CheckpointError, load_drafter, save_feature_drafter, save_standard_drafter
from .feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterModel, prism_config
from .standard import StandardDrafter

__all__ = [
    "CheckpointError",
    "load_drafter",
    "save_feature_drafter",
    "save_standard_drafter",
    "REGISTRY",
    "Drafter",
    "DrafterMismatchError",
    "FeatureDrafter",
    "FeatureDrafterConfig",
    "FeatureDrafterModel",
    "StandardDrafter",
    "prism_config",
    "register",
]
