"""Standard speculative decoding: an independent small causal LM with the target's tokenizer."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..targets.hf import Target
from ..targets.kv_cache import RaggedCache
from ..targets.masks import pad_ragged
from .base import Drafter, DrafterMismatchError


class StandardDrafter(Drafter):
    """Drafts with its own LM and KV cache; needs no target features."""

    feature_layers = None
    method = "standard"

    def __init__(self, model: PreTrainedModel, name: str = "standard"):
        self.lm = Target(model, None, name=name)
        self.kv: RaggedCache | None = None  # committed tokens (the root included) per row

    @classmethod
    def from_target_layers(cls, target: Target, num_layers: int = 2) -> "StandardDrafter":
        """A shallow copy of the target: its first ``num_layers`` layers plus its final norm
        and head (weights shared, not copied). A usable drafter before any training."""
        if not 1 <= num_layers <= target.num_layers:
            raise ValueError(f"num_layers must be in 1..{target.num_layers}")
        config = copy.deepcopy(target.config)
        config.num_hidden_layers = num_layers
        for key in ("layer_types",):  # per-layer lists must shrink with the model
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:num_layers])
        model = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
        state = {k: v for k, v in target.model.state_dict().items() if _layer_index(k) < num_layers}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        return cls(model.to(target.device), name=f"{target.name}[:{num_layers} layers]")

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu") -> "StandardDrafter":
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), name=str(path))

    def check_target(self, target: Target) -> None:
        if self.lm.vocab_size != target.vocab_size:
            raise DrafterMismatchError(
                f"standard drafter {self.lm.name} has a vocabulary of {self.lm.vocab_size} tokens, "
                f"the target {target.name} has {target.vocab_size}: they must share a tokenizer"
            )

    def pack_weights(self) -> int:
        return self.lm.pack_weights()

    def begin(self, prompts, first_tokens, features):
        self.kv = RaggedCache(self.lm.new_cache(), len(prompts), self.lm.device)
        return self.extend([torch.cat([p, p.new_tensor([f])]) for p, f in zip(prompts, first_tokens)], None)

    def extend(self, tokens, features):
        padded, counts = pad_ragged(tokens)
        positions = self.kv.lengths[:, None] + torch.arange(padded.shape[1], device=self.lm.device)
        out = self.lm.forward(padded, positions, self.kv.cache, None, self.kv.lengths)
        self.kv.commit([torch.arange(int(c), device=self.lm.device) for c in counts])
        return out.logits[torch.arange(len(tokens), device=self.lm.device), counts - 1]

    def expand(self, tokens, parent_slots, tree_mask, depth):
        # Depth-d nodes sit d positions after the root, which is the last committed token.
        positions = (self.kv.lengths - 1 + depth)[:, None].expand_as(tokens)
        return self.lm.forward(tokens, positions, self.kv.cache, tree_mask, self.kv.lengths).logits

    def keep_rows(self, rows):
        self.kv.keep_rows(rows)

    def end_round(self):
        self.kv.rollback()


def _layer_index(key: str) -> int:
    """Decoder layer number in a state-dict key, or -1 for non-layer weights."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():  # the families' names for them
            return int(parts[i + 1])
    return -1
