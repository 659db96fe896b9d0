"""prism-spec: lossless speculative decoding with PRISM and its baselines."""

from .drafters import Drafter, FeatureDrafter, StandardDrafter
from .runtime import GenerationConfig, GenerationResult, SamplingConfig, TreeConfig, generate, stream_generate
from .targets import DEFAULT_TARGET, Target, load_target

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "Drafter",
    "FeatureDrafter",
    "GenerationConfig",
    "GenerationResult",
    "SamplingConfig",
    "StandardDrafter",
    "Target",
    "TreeConfig",
    "generate",
    "load_target",
    "stream_generate",
]
