"""A transformers causal LM behind the one small surface the runtime needs.

Everything model-family specific stays here: a forward over new tokens (optionally a draft
tree) on top of a KV cache, the hidden states drafters consume, cache compaction after
acceptance, and chat-template rendering.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from .default import DEFAULT_TARGET, default_target_path

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [n, vocab]
    features: torch.Tensor  # [n, hidden]: last hidden state after the final norm
    layer_features: torch.Tensor | None = None  # [n, len(layers) * hidden] when asked for


def attention_mask_4d(
    past_len: int, n_new: int, tree_mask: torch.Tensor | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """Additive 4D mask [1, 1, n_new, past_len + n_new] for new tokens on top of a cache.

    ``tree_mask`` (bool, [n_new, t]) says which of the last ``t`` cache entries (the tree
    entries written this round, the new ones included) each new token may see; everything
    before them is the committed prefix and always visible. Without it, causal.
    """
    total = past_len + n_new
    if tree_mask is None:
        tree_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    t = tree_mask.shape[1]
    visible = torch.ones(n_new, total, dtype=torch.bool, device=device)
    visible[:, total - t :] = tree_mask.to(device)
    mask = torch.zeros(n_new, total, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def cache_kwarg(module) -> str:
    """transformers renamed `past_key_values` to `cache`; accept both generations."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high layers for EAGLE-3-style input (indices into HF hidden_states)."""
    return (min(3, num_layers), num_layers // 2 + 1, max(num_layers - 2, 1))


class Target:
    """A causal LM plus its tokenizer, batch size 1, driven through transformers' public API."""

    def __init__(self, model: PreTrainedModel, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        self._cache_kw = cache_kwarg(self.decoder)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def max_context(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ----------------------------------------------------------------- chat
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's own chat template."""
        if self.tokenizer is None:
            raise ValueError("this target has no tokenizer")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # Base models without a template: plain concatenation of the turns.
        text = "\n".join(m["content"] for m in messages)
        return self.tokenizer(text)["input_ids"]

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        if chat and self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.render_chat(messages)
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- forward
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def build_mask(self, past_len: int, n_new: int, tree_mask: torch.Tensor | None) -> torch.Tensor:
        return attention_mask_4d(past_len, n_new, tree_mask, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        tree_mask: torch.Tensor | None = None,
        feature_layers: Sequence[int] | None = None,
    ) -> ForwardOutput:
        """Run new tokens (1-D) at ``positions`` on top of ``cache`` (which grows by n)."""
        n = input_ids.shape[-1]
        past = cache.get_seq_length()
        mask = self.build_mask(past, n, tree_mask)
        out = self.decoder(
            input_ids=input_ids.view(1, n).to(self.device),
            position_ids=positions.view(1, n).to(self.device),
            attention_mask=mask,
            use_cache=True,
            output_hidden_states=bool(feature_layers),
            **{self._cache_kw: cache},
        )
        hidden = out.last_hidden_state[0]
        layer_features = None
        if feature_layers:
            layer_features = torch.cat([out.hidden_states[i][0] for i in feature_layers], dim=-1)
        return ForwardOutput(self.lm_head(hidden).float(), hidden, layer_features)


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cache entry from position ``length`` on."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def keep_in_cache(cache: DynamicCache, prefix_len: int, keep: torch.Tensor) -> None:
    """Keep the first ``prefix_len`` entries plus the tree entries at indices ``keep`` (sorted)."""
    m = keep.numel()
    if bool((keep == torch.arange(m, device=keep.device)).all()):  # a chain prefix: no copy
        truncate_cache(cache, prefix_len + m)
        return
    index = torch.cat([torch.arange(prefix_len, device=keep.device), prefix_len + keep])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, index.to(layer.values.device))


def load_target(
    name_or_path: str = DEFAULT_TARGET,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> Target:
    """Load any transformers causal LM by hub id or local path, or the embedded default."""
    path: str | Path = default_target_path() if name_or_path == DEFAULT_TARGET else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=parse_dtype(dtype), attn_implementation=attn_implementation
    ).to(device)
    return Target(model, tokenizer, name=name_or_path)
