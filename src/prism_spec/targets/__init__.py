"""Targets: load a transformers causal LM and run it over new tokens or a draft tree."""

from .default import DEFAULT_TARGET, cache_dir, default_target_path
from .family import TargetFamily, UnsupportedTargetError
from .hf import ForwardOutput, Target, default_feature_layers, parse_dtype
from .loader import load_target

__all__ = [
    "DEFAULT_TARGET",
    "ForwardOutput",
    "Target",
    "TargetFamily",
    "UnsupportedTargetError",
    "cache_dir",
    "default_feature_layers",
    "default_target_path",
    "load_target",
    "parse_dtype",
]
