"""What the runtime and the feature drafters need from a transformers causal LM, per family.

One place knows how transformers' decoder-only families differ, through their configs and
public modules: where the decoder layers are, which layers attend over a sliding window and
how the decoder takes their masks, how logits are scaled after the LM head, how embeddings
are scaled before the first layer, and which decoder layer a drafter module can be built
from. Anything the runtime cannot serve exactly (encoder-decoder, state-space and hybrid
models, chunked attention) is refused here with the model type named, instead of decoding
wrongly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

#: Families whose decoder layer takes Llama's arguments (hidden states, mask, position ids,
#: rotary ``position_embeddings`` from the decoder's ``rotary_emb``, a KV cache) and has an
#: ``input_layernorm``: a drafter module is built from the target's own layer class. Every
#: other family gets drafter modules of Llama layers at the target's width
#: (:func:`generic_layer_config`): the drafter only has to predict features, and its layers
#: need not match the target's to keep decoding lossless.
NATIVE_DRAFTER_LAYERS = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2", "granite"})

#: Model types without attention over a KV cache of their own tokens, or with layers that
#: are not attention: the tree verification and cache compaction do not apply to them.
STATE_SPACE_OR_HYBRID = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba", "zamba2", "bamba",
    "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2", "lfm2_moe", "qwen3_next", "kimi_linear", "minimax",
    "olmo_hybrid",
})


class UnsupportedTargetError(ValueError):
    """A model the runtime cannot decode exactly; the message names its model type and why."""


@dataclass(frozen=True)
class TargetFamily:
    """The family facts of one loaded model (:meth:`of`)."""

    model_type: str
    layers: nn.ModuleList
    layer_types: tuple[str, ...]  # per decoder layer: full_attention or sliding_attention
    #: Per decoder layer: how many of the latest positions a query attends to (None: all).
    windows: tuple[int | None, ...]
    #: The layer types of a decoder that takes one attention mask per type (a dict), or None
    #: when it takes one mask for every layer.
    mask_types: tuple[str, ...] | None
    embed_scale: float | None  # inputs_embeds are multiplied by it inside the decoder
    logit_scale: float | None  # logits = lm_head(h) * logit_scale (Cohere)
    logit_divisor: float | None  # logits = lm_head(h) / logit_divisor (Granite)
    logit_softcap: float | None  # logits = tanh(logits / cap) * cap
    native_drafter_layer: bool

    @classmethod
    def of(cls, model: nn.Module) -> "TargetFamily":
        config = model.config
        model_type = str(getattr(config, "model_type", "") or type(model).__name__)
        check_supported(config)
        decoder = model.get_decoder()
        layers = decoder_layers(decoder, model_type)
        n = len(layers)
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "attention_chunk_size", None):
            raise UnsupportedTargetError(f"{model_type}: chunked attention is not supported")
        if layer_types is not None:
            layer_types = tuple(str(t) for t in layer_types)[:n]
            unknown = sorted(set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
            if unknown:
                raise UnsupportedTargetError(
                    f"{model_type}: layer types {unknown} are not attention over a KV cache the runtime can "
                    "verify draft trees on (hybrid or chunked models are not supported)"
                )
            windows = tuple(int(window) if t == SLIDING_ATTENTION and window else None for t in layer_types)
            # Decoders with per-layer types take a dict of masks, one per type (transformers
            # builds the same mapping itself when given none).
            mask_types = tuple(sorted(set(layer_types))) if any(windows) else None
        else:
            # Mistral-style: one sliding-window mask for every layer when a window is set.
            windows = (int(window) if window else None,) * n
            layer_types = (SLIDING_ATTENTION if window else FULL_ATTENTION,) * n
            mask_types = None
        return cls(
            model_type=model_type,
            layers=layers,
            layer_types=layer_types,
            windows=windows,
            mask_types=mask_types,
            embed_scale=embedding_scale(config, model_type, decoder),
            logit_scale=_not_one(getattr(config, "logit_scale", None)) if model_type.startswith("cohere") else None,
            logit_divisor=_not_one(getattr(config, "logits_scaling", None)),
            logit_softcap=_positive(getattr(config, "final_logit_softcapping", None)),
            native_drafter_layer=model_type in NATIVE_DRAFTER_LAYERS,
        )

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)

    def mask_windows(self) -> dict[str | None, int | None]:
        """The masks one forward needs, as {layer type: window}; the key None stands for one
        mask shared by every layer."""
        if self.mask_types is None:
            return {None: self.windows[0]}
        return {t: self.windows[self.layer_types.index(t)] for t in self.mask_types}

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's post-head transform, in the order transformers applies it."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _positive(value) -> float | None:
    return float(value) if value else None


def _not_one(value) -> float | None:
    return None if value is None or float(value) == 1.0 else float(value)


def check_supported(config) -> None:
    """Raise :class:`UnsupportedTargetError` for models the runtime cannot decode exactly."""
    model_type = str(getattr(config, "model_type", "") or type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedTargetError(
            f"{model_type} is an encoder-decoder model; speculative decoding here needs a decoder-only causal LM"
        )
    if model_type in STATE_SPACE_OR_HYBRID or getattr(config, "layers_block_type", None) is not None:
        raise UnsupportedTargetError(
            f"{model_type} is a state-space or hybrid model: its recurrent state cannot be rolled back to a "
            "verified draft prefix, so it is not supported as a target"
        )


def decoder_layers(decoder: nn.Module, model_type: str = "") -> nn.ModuleList:
    """The decoder's list of layers (``layers`` in most families, ``h`` in GPT-2 and Falcon)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise UnsupportedTargetError(f"{model_type or type(decoder).__name__}: cannot find its decoder layers")


def embedding_scale(config, model_type: str, decoder: nn.Module) -> float | None:
    """The factor the decoder multiplies token embeddings by before the first layer (Gemma
    and Gemma 2: sqrt(hidden size); Granite: ``embedding_multiplier``). None when the
    embedding module applies it itself (Gemma 3's scaled embedding) or there is none."""
    if model_type in ("gemma", "gemma2"):
        return math.sqrt(config.hidden_size)
    return _not_one(getattr(config, "embedding_multiplier", None))


def full_attention_config(config):
    """A copy of ``config`` whose every layer is full attention, for KV caches: the runtime
    keeps every entry (windows are applied by the masks), so entries can be moved and cut
    in place; transformers' sliding-window cache layers would keep only the last window and
    count positions on their own."""
    config = copy.deepcopy(config)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [FULL_ATTENTION] * len(config.layer_types)
    return config


def generic_layer_config(config, attn_implementation: str | None = None):
    """A LlamaConfig at the target's width for drafter modules of families whose own decoder
    layer does not take Llama's arguments (see :data:`NATIVE_DRAFTER_LAYERS`)."""
    from transformers import LlamaConfig

    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    max_positions = next((int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                          if (v := getattr(config, k, None))), 2048)
    generic = LlamaConfig(
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    generic._attn_implementation = attn_implementation or "sdpa"
    return generic
