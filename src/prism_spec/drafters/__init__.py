"""Drafters: one interface, one registry, one module per method."""

from .base import REGISTRY, Drafter, DrafterMismatchError, register
from .feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterModel, prism_config
from .standard import StandardDrafter

__all__ = [
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
