"""The speculative decoding runtime: trees, verification and the decode loop."""

from .decode import (
    DecodeOptions,
    GenerationConfig,
    GenerationResult,
    PromptError,
    generate,
    generate_batch,
    stream_generate_batch,
)
from .tree import TREE_PRESETS, DraftTree, DraftTreeBatch, TreeConfig, ancestor_mask, chain, draft_tree
from .verify import SamplingConfig, target_probs, verify_greedy, verify_sampling

__all__ = [
    "TREE_PRESETS",
    "DecodeOptions",
    "DraftTree",
    "DraftTreeBatch",
    "GenerationConfig",
    "GenerationResult",
    "PromptError",
    "SamplingConfig",
    "TreeConfig",
    "ancestor_mask",
    "chain",
    "draft_tree",
    "generate_batch",
    "stream_generate_batch",
    "generate",
    "target_probs",
    "verify_greedy",
    "verify_sampling",
]
