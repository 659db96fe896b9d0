"""The speculative decoding runtime: trees, verification and the decode loop."""

from .decode import GenerationConfig, GenerationResult, PromptError, generate, stream_generate
from .tree import TREE_PRESETS, DraftTree, TreeConfig, ancestor_mask, chain, draft_tree
from .verify import SamplingConfig, target_probs, verify_greedy, verify_sampling

__all__ = [
    "TREE_PRESETS",
    "DraftTree",
    "GenerationConfig",
    "GenerationResult",
    "PromptError",
    "SamplingConfig",
    "TreeConfig",
    "ancestor_mask",
    "chain",
    "draft_tree",
    "generate",
    "stream_generate",
    "target_probs",
    "verify_greedy",
    "verify_sampling",
]
