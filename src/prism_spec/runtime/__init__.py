"""The speculative decoding runtime: trees, verification and the decode loop."""

from .decode import (
    GenerationConfig,
    GenerationResult,
    PromptError,
    generate,
    generate_batch,
    stream_generate,
    stream_generate_batch,
)
from .tree import TREE_PRESETS, DraftTree, DraftTreeBatch, TreeConfig, ancestor_mask, chain, draft_tree, draft_tree_batch
from .verify import SamplingConfig, target_probs, verify_greedy, verify_sampling

__all__ = [
    "TREE_PRESETS",
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
    "draft_tree_batch",
    "generate_batch",
    "stream_generate_batch",
    "generate",
    "stream_generate",
    "target_probs",
    "verify_greedy",
    "verify_sampling",
]
