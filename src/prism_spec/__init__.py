"""prism-spec: lossless speculative decoding with PRISM and its baselines."""

from .drafters import Drafter, FeatureDrafter, StandardDrafter
from .runtime import (DecodeOptions, GenerationConfig, GenerationResult, SamplingConfig, TreeConfig, generate,
                      generate_batch, stream_generate_batch)
from .targets import DEFAULT_TARGET, Target, load_target

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "DecodeOptions",
    "Drafter",
    "FeatureDrafter",
    "GenerationConfig",
    "GenerationResult",
    "SamplingConfig",
    "StandardDrafter",
    "Target",
    "TreeConfig",
    "generate",
    "generate_batch",
    "load_target",
    "stream_generate_batch",
]
