"""Feature-level drafters: EAGLE-2 / HASS (one module), PRISM (several modules behind a step
mapping), stacked baselines (several layers per module) and multi-layer input (PRISM*).

A *processing module* is ``fc`` (Linear 2h -> h, bias) followed by decoder layer(s) of the
target's own family, the first without its input norm. Its input at position t is
``fc(concat(embed(token[t+1]), feature[t]))``; its output is a predicted feature that the
target's frozen LM head turns into logits. PRISM runs exactly one module per draft step:
step 0 (the pass over newly committed tokens) always runs ``step_mapping[0]`` and writes the
drafter's prefix KV cache; later steps run their mapped module, attending to that same cache.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..targets.hf import Target, attention_mask_4d, cache_kwarg, truncate_cache
from .base import Drafter, DrafterMismatchError, register


@dataclass
class FeatureDrafterConfig:
    architecture: str = "eagle"  # eagle | prism | stacked (all this class; names for tables)
    num_modules: int = 1
    layers_per_module: int = 1
    step_mapping: list[int] = field(default_factory=lambda: [0])
    input_layers: list[int] | None = None  # None: last hidden state; else HF hidden_states indices
    # The target this drafter was built for.
    target_name: str = ""
    target_model_type: str = ""
    vocab_size: int = 0
    hidden_size: int = 0

    def __post_init__(self):
        if self.num_modules < 1 or self.layers_per_module < 1:
            raise ValueError("num_modules and layers_per_module must be >= 1")
        if not self.step_mapping or any(not 0 <= m < self.num_modules for m in self.step_mapping):
            raise ValueError(f"step_mapping {self.step_mapping} must name modules 0..{self.num_modules - 1}")

    def module_for_step(self, step: int) -> int:
        return self.step_mapping[min(step, len(self.step_mapping) - 1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_target(cls, target: Target, **kwargs) -> "FeatureDrafterConfig":
        return cls(
            target_name=str(target.name),
            target_model_type=str(getattr(target.config, "model_type", "")),
            vocab_size=target.vocab_size,
            hidden_size=target.hidden_size,
            **kwargs,
        )


def prism_config(target: Target, num_modules: int = 2, **kwargs) -> FeatureDrafterConfig:
    """PRISM's main shape: step 0 -> module 0, step j -> module min(j, M-1)."""
    return FeatureDrafterConfig.for_target(
        target, architecture="prism", num_modules=num_modules, step_mapping=list(range(num_modules)), **kwargs
    )


class ProcessingModule(nn.Module):
    def __init__(self, layer_cls, layer_config, num_layers: int):
        super().__init__()
        h = layer_config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList(layer_cls(layer_config, layer_idx=i) for i in range(num_layers))
        # The fc output goes straight into attention.
        self.layers[0].input_layernorm = nn.Identity()


class FeatureDrafterModel(nn.Module):
    """The trainable part. The target's embedding and LM head are used, never stored."""

    def __init__(self, config: FeatureDrafterConfig, target: Target):
        super().__init__()
        self.config = config
        layer_config = copy.deepcopy(target.config)
        layer_config.num_hidden_layers = config.layers_per_module
        layer_config._attn_implementation = target.config._attn_implementation or "sdpa"
        layer_cls = type(target.decoder.layers[0])
        h = target.hidden_size
        self.fuse = nn.Linear(len(config.input_layers) * h, h, bias=False) if config.input_layers else None
        self.processing = nn.ModuleList(
            ProcessingModule(layer_cls, layer_config, config.layers_per_module) for _ in range(config.num_modules)
        )
        self.rotary = type(target.decoder.rotary_emb)(config=layer_config)
        self._cache_kw = cache_kwarg(self.processing[0].layers[0])
        # Frozen target pieces, kept out of state_dict / parameters().
        self.__dict__["target_embed"] = target.embed_tokens
        self.__dict__["target_head"] = target.lm_head
        self.to(device=target.device, dtype=target.dtype)

    def input_features(self, target_features: torch.Tensor) -> torch.Tensor:
        """Map what the target provides (last hidden state or concatenated layers) to width h."""
        return self.fuse(target_features) if self.fuse is not None else target_features

    def step(
        self,
        module: int,
        tokens: torch.Tensor,  # [B, n]
        features: torch.Tensor,  # [B, n, h]
        position_ids: torch.Tensor,  # [B, n]
        attention_mask: torch.Tensor,  # additive, [B or 1, 1, n, kv]
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """One processing module over n inputs; returns predicted features [B, n, h]."""
        block = self.processing[module]
        x = block.fc(torch.cat([self.target_embed(tokens), features], dim=-1))
        position_embeddings = self.rotary(x, position_ids)
        for layer in block.layers:
            x = layer(
                x,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=cache is not None,
                **{self._cache_kw: cache},
            )
            if isinstance(x, tuple):  # older transformers return (hidden, ...)
                x = x[0]
        return x

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return self.target_head(predicted)


@register("eagle")
@register("prism")
@register("stacked")
class FeatureDrafter(Drafter):
    """Runs a FeatureDrafterModel inside the decode loop (batch 1)."""

    def __init__(self, model: FeatureDrafterModel):
        self.model = model.eval()
        self.config = model.config
        self.method = self.config.architecture
        self.feature_layers = tuple(self.config.input_layers) if self.config.input_layers else "last"
        self.cache: DynamicCache | None = None
        self.length = 0  # drafter prefix entries (one per committed token after the first)
        self.root_feature: torch.Tensor | None = None
        self.slot_features: list[torch.Tensor] = []

    def check_target(self, target: Target) -> None:
        c = self.config
        if c.vocab_size != target.vocab_size or c.hidden_size != target.hidden_size:
            raise DrafterMismatchError(
                f"this {c.architecture} drafter was trained for {c.target_name or 'another target'} "
                f"(vocabulary {c.vocab_size}, hidden size {c.hidden_size}); the target {target.name} has "
                f"vocabulary {target.vocab_size} and hidden size {target.hidden_size}"
            )
        if c.input_layers and max(c.input_layers) > target.num_layers:
            raise DrafterMismatchError(
                f"drafter reads target layer {max(c.input_layers)} but {target.name} has {target.num_layers}"
            )

    @property
    def _device(self):
        return self.model.processing[0].fc.weight.device

    def _mask(self, n_new: int, tree_mask: torch.Tensor | None) -> torch.Tensor:
        past = self.cache.get_seq_length()
        return attention_mask_4d(past, n_new, tree_mask, self.model.processing[0].fc.weight.dtype, self._device)

    @torch.inference_mode()
    def begin(self, prompt_ids, first_token, features):
        self.cache = DynamicCache()
        self.length = 0
        tokens = torch.cat([prompt_ids[1:], prompt_ids.new_tensor([first_token])])
        return self.extend(tokens, features)

    @torch.inference_mode()
    def extend(self, tokens, features):
        m = tokens.numel()
        positions = torch.arange(self.length, self.length + m, device=self._device)[None]
        mask = self._mask(m, None)
        out = self.model.step(
            self.config.module_for_step(0), tokens[None], self.model.input_features(features)[None], positions, mask, self.cache
        )[0]
        self.length += m
        self.root_feature = out[-1]
        self.slot_features = []
        return self.model.logits(out[-1]).float()

    @torch.inference_mode()
    def expand(self, tokens, parent_slots, tree_mask, depth):
        known = torch.stack([self.root_feature, *self.slot_features])  # slot -1 -> row 0
        parents = known[parent_slots + 1]
        positions = torch.full((1, tokens.numel()), self.length - 1 + depth, device=self._device)
        mask = self._mask(tokens.numel(), tree_mask)
        out = self.model.step(
            self.config.module_for_step(depth), tokens[None], parents[None], positions, mask, self.cache
        )[0]
        self.slot_features.extend(out.unbind(0))
        return self.model.logits(out).float()

    def end_round(self):
        truncate_cache(self.cache, self.length)
        self.slot_features = []
