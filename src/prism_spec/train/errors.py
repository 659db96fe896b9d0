"""The errors of drafter training, in a module of their own so that every training module can
raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A training configuration is malformed: unknown key, wrong type or bad value."""


class TrainingError(RuntimeError):
    """Training cannot start or go on (empty data, incompatible checkpoint, ...)."""
