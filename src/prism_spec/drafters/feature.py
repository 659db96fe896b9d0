"""Feature-level drafters: EAGLE-2 / HASS (one module), PRISM (several modules behind a step
mapping), stacked baselines (several layers per module) and multi-layer input (PRISM*).

A *processing module* is ``fc`` (Linear 2h -> h, bias) followed by decoder layer(s) of the
target's own family, the first without its input norm. Its input at position t is
``fc(concat(embed(token[t+1]), feature[t]))``; its output is a predicted feature that the
target's frozen LM head turns into logits. PRISM runs exactly one module per draft step:
step 0 (the pass over newly committed tokens) always runs ``step_mapping[0]`` and writes the
drafter's prefix KV cache; later steps run their mapped module, attending to that same cache.

Reduced draft vocabulary (EAGLE-3 style, optional): with ``draft_vocab_size = N`` the drafter
scores only N target tokens -- usually the N most frequent assistant tokens of the training
data (``prism_spec.train.vocab.build_draft_vocab``) -- through rows ``d2t`` of the frozen target head, so its
logits are [.., N] over *draft ids*. ``d2t`` [N] (a persistent long buffer, saved with the
weights) maps draft id i to target id ``d2t[i]`` and is sorted ascending by target id (so a
draft id is the rank of its target id inside the draft vocabulary, and the reverse map is a
binary search). ``FeatureDrafter.to_target_ids`` maps proposals back; the target verifies
target ids as usual, so decoding stays lossless (a token outside the draft vocabulary is
simply never proposed: it can still be committed as the target's bonus token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ..targets.attention import attention_backends
from ..targets.family import full_attention_config, generic_layer_config
from ..targets.hf import Target, cache_kwarg
from ..targets.kv_cache import RaggedCache, StaticCachePool, StaticKV
from ..targets.masks import batch_attention_mask, fit_mask_to_cache, pad_ragged
from ..targets.packed import int8_linear, int8_linear_available, int8_linears, pack_linears, packed_linear
from .base import Drafter, DrafterMismatchError


@dataclass
class FeatureDrafterConfig:
    architecture: str = "eagle"  # eagle | prism | stacked (all this class; names for tables)
    num_modules: int = 1
    layers_per_module: int = 1
    step_mapping: list[int] = field(default_factory=lambda: [0])
    input_layers: list[int] | None = None  # None: last hidden state; else HF hidden_states indices
    # With input_layers: RMS-normalise each target layer before the fuse. Raw residual-stream
    # states carry massive activations (SmolLM2-135M layers 3/16/28: rms 3-25 on ordinary
    # tokens, up to 2.5e4 on the first one; benchmarks/hidden_state_scale.py) that swamp the
    # fuse. False for drafters saved before the option existed (their config.json lacks it).
    input_norm: bool = False
    # The target this drafter was built for.
    target_name: str = ""
    target_model_type: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    # Reduced draft vocabulary: None = the target's whole vocabulary; N = only the N target
    # tokens listed in the model's ``d2t`` buffer (see the module docstring).
    draft_vocab_size: int | None = None
    # The decoder layer class of the modules: "target" (the target family's own) or "llama"
    # (for families whose layers do not take Llama's arguments; targets.family).
    drafter_layer: str = "target"

    def __post_init__(self):
        if self.drafter_layer not in ("target", "llama"):
            raise ValueError(f"drafter_layer must be 'target' or 'llama', got {self.drafter_layer!r}")
        if self.num_modules < 1 or self.layers_per_module < 1:
            raise ValueError("num_modules and layers_per_module must be >= 1")
        if not self.step_mapping or any(not 0 <= m < self.num_modules for m in self.step_mapping):
            raise ValueError(f"step_mapping {self.step_mapping} must name modules 0..{self.num_modules - 1}")
        if self.draft_vocab_size is not None:
            n = self.draft_vocab_size
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"draft_vocab_size must be None or a positive integer, got {n!r}")
            if self.vocab_size and n > self.vocab_size:
                raise ValueError(f"draft_vocab_size {n} exceeds the target vocabulary ({self.vocab_size})")

    def module_for_step(self, step: int) -> int:
        return self.step_mapping[min(step, len(self.step_mapping) - 1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_target(cls, target: Target, **kwargs) -> "FeatureDrafterConfig":
        kwargs.setdefault("drafter_layer", "target" if target.family.native_drafter_layer else "llama")
        return cls(
            target_name=str(target.name),
            target_model_type=str(getattr(target.config, "model_type", "")),
            vocab_size=target.vocab_size,
            hidden_size=target.hidden_size,
            **kwargs,
        )


# --------------------------------------------------------------------------- draft vocabulary
def check_d2t(d2t: torch.Tensor, vocab_size: int, size: int | None = None) -> None:
    """Raise ValueError unless ``d2t`` is a valid draft -> target map: a 1-D integer tensor of
    ``size`` entries, strictly increasing (sorted, no repeats), within [0, vocab_size)."""
    if not isinstance(d2t, torch.Tensor) or d2t.dim() != 1:
        raise ValueError(f"d2t must be a 1-D tensor, got {getattr(d2t, 'shape', type(d2t).__name__)}")
    if d2t.dtype.is_floating_point or d2t.dtype.is_complex or d2t.dtype == torch.bool:
        raise ValueError(f"d2t must hold integer token ids, got dtype {d2t.dtype}")
    if size is not None and d2t.numel() != size:
        raise ValueError(f"d2t has {d2t.numel()} entries, the config says draft_vocab_size {size}")
    if d2t.numel() == 0:
        raise ValueError("d2t is empty")
    lo, hi = int(d2t.min()), int(d2t.max())
    if lo == hi == -1:
        raise ValueError("d2t is not set (all -1): call set_draft_vocab(build_draft_vocab(...)) or load weights")
    if lo < 0 or (vocab_size and hi >= vocab_size):
        raise ValueError(f"d2t ids must lie in [0, {vocab_size}) (the target vocabulary), found {lo}..{hi}")
    if d2t.numel() > 1 and not bool((d2t[1:] > d2t[:-1]).all()):
        raise ValueError("d2t must be sorted ascending without repeats")


def draft_ids_for(target_ids: torch.Tensor, d2t: torch.Tensor) -> torch.Tensor:
    """Target ids -> draft ids through the sorted map ``d2t``; -1 where a target id is not in
    the draft vocabulary."""
    d2t = d2t.to(target_ids.device)
    idx = torch.searchsorted(d2t, target_ids.long()).clamp(max=d2t.numel() - 1)
    return torch.where(d2t[idx] == target_ids, idx, torch.full_like(idx, -1))


def rms_normalize_layers(features: torch.Tensor, width: int, eps: float = 1e-6) -> torch.Tensor:
    """Concatenated layers [.., L * width] -> each width-sized chunk divided by its RMS
    (computed in at least float32: squares of ~1e4 activations overflow float16)."""
    chunks = features.to(torch.promote_types(features.dtype, torch.float32)).unflatten(-1, (-1, width))
    normed = chunks * torch.rsqrt(chunks.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2).to(features.dtype)


def prism_config(target: Target, num_modules: int = 2, **kwargs) -> FeatureDrafterConfig:
    """PRISM's main shape: step 0 -> module 0, step j -> module min(j, M-1)."""
    return FeatureDrafterConfig.for_target(
        target, architecture="prism", num_modules=num_modules, step_mapping=list(range(num_modules)), **kwargs
    )


def drafter_layer_parts(target: Target, config: FeatureDrafterConfig):
    """(decoder layer class, rotary embedding class, their config) for the drafter's modules:
    the target family's own, or Llama's at the target's width (``config.drafter_layer``).
    Every layer attends over the whole prefix (no sliding window) and runs the target's
    attention implementation when it is an SDPA one."""
    attn = target.config._attn_implementation or "sdpa"
    if config.drafter_layer == "llama":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        layer_config = generic_layer_config(target.config, attn if "sdpa" in attn else "sdpa")
        layer_cls, rotary_cls = LlamaDecoderLayer, LlamaRotaryEmbedding
    else:
        if not hasattr(target.decoder, "rotary_emb"):
            raise DrafterMismatchError(
                f"{target.family.model_type} has no rotary embedding to build drafter layers of its own family "
                "from: use drafter_layer='llama'"
            )
        layer_config = full_attention_config(target.config)
        layer_config._attn_implementation = attn
        layer_cls, rotary_cls = type(target.family.layers[0]), type(target.decoder.rotary_emb)
    layer_config.num_hidden_layers = config.layers_per_module
    if getattr(layer_config, "layer_types", None) is not None:
        layer_config.layer_types = ["full_attention"] * config.layers_per_module
    return layer_cls, rotary_cls, layer_config


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

    def __init__(self, config: FeatureDrafterConfig, target: Target, d2t: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        layer_cls, rotary_cls, layer_config = drafter_layer_parts(target, config)
        self.layer_config = layer_config  # also sizes a static KV cache (FeatureDrafter.use_static_cache)
        h = target.hidden_size
        self.fuse = nn.Linear(len(config.input_layers) * h, h, bias=False) if config.input_layers else None
        self.processing = nn.ModuleList(
            ProcessingModule(layer_cls, layer_config, config.layers_per_module) for _ in range(config.num_modules)
        )
        self.rotary = rotary_cls(config=layer_config)
        self._cache_kw = cache_kwarg(self.processing[0].layers[0])
        # Frozen target pieces, kept out of state_dict / parameters().
        self.__dict__["target_embed"] = target.embed
        self.__dict__["target_head"] = target.lm_head
        self.__dict__["_head_cache"] = None  # (key, weight[d2t], bias[d2t] or None, packed head or None)
        self.packed = False  # FeatureDrafter.pack_weights: CPU linears on prepacked weights
        self.int8 = False  # FeatureDrafter.use_int8_weights: CPU linears and head on int8 weights
        if config.draft_vocab_size is None:
            if d2t is not None:
                raise ValueError("a d2t map needs config.draft_vocab_size")
            self.register_buffer("d2t", None)
        else:
            # -1 = not set yet: call set_draft_vocab or load a state dict before using logits.
            self.register_buffer("d2t", torch.full((config.draft_vocab_size,), -1, dtype=torch.long))
            if d2t is not None:
                self.set_draft_vocab(d2t)
        self.to(device=target.device, dtype=target.dtype)

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        """Set the draft -> target id map (e.g. from ``prism_spec.train.vocab.build_draft_vocab``), checked."""
        if self.d2t is None:
            raise ValueError("this drafter has the full target vocabulary (config.draft_vocab_size is None)")
        d2t = torch.as_tensor(d2t)
        check_d2t(d2t, self.config.vocab_size, self.config.draft_vocab_size)
        with torch.no_grad():
            self.d2t.copy_(d2t.to(self.d2t.device, torch.long))

    def draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [N, h], bias [N] or None): the target head's rows ``d2t``, sliced once and
        cached; recomputed when the head or ``d2t`` changes (device, dtype, storage, in-place
        update). Without a reduced vocabulary: the head's own weight and bias."""
        weight, bias, _ = self._draft_head()
        return weight, bias

    def _draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None, nn.Module | None]:
        """:meth:`draft_head` plus the head as a layer of its own when its weights are prepacked
        (the slice, ``packed``) or int8 (the slice or the whole head, ``int8``)."""
        head = self.target_head
        weight, bias = head.weight, getattr(head, "bias", None)
        d2t = self.d2t
        if d2t is None and not self.int8:
            return weight, bias, None
        key = (weight.device, weight.dtype, weight.data_ptr(), weight._version, self.packed, self.int8,
               None if d2t is None else (d2t.device, d2t.data_ptr(), d2t._version))
        cached = self._head_cache
        if cached is None or cached[0] != key:
            # A plain (non-inference) tensor even when first built under inference_mode, so
            # training can save it for backward later.
            with torch.inference_mode(False), torch.no_grad():
                if d2t is None:
                    sliced = (weight.detach(), None if bias is None else bias.detach())
                else:
                    if int(d2t.min()) < 0:
                        raise RuntimeError(
                            "the draft vocabulary is not set: call set_draft_vocab(build_draft_vocab(...)) "
                            "or load the drafter's weights first"
                        )
                    idx = d2t.to(weight.device)
                    sliced = (weight.detach()[idx].contiguous(),
                              None if bias is None else bias.detach()[idx].contiguous())
            head = int8_linear(*sliced) if self.int8 else packed_linear(*sliced) if self.packed else None
            self.__dict__["_head_cache"] = cached = (key, *sliced, head)
        return cached[1], cached[2], cached[3]

    def derived_weight_bytes(self) -> int:
        """Memory held besides parameters and buffers: the reduced vocabulary's head slice (and
        its prepacked copy when packed), and the int8 copy of the head when ``int8``."""
        weight = self.target_head.weight
        rows = (self.config.draft_vocab_size or weight.shape[0]) * weight.shape[1]
        total = rows if self.int8 else 0
        if self.d2t is not None:
            total += rows * weight.element_size() * (2 if self.packed and not self.int8 else 1)
        return total

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids -> target ids (identity without a reduced vocabulary)."""
        return draft_ids if self.d2t is None else self.d2t.to(draft_ids.device)[draft_ids]

    def input_features(self, target_features: torch.Tensor) -> torch.Tensor:
        """Map what the target provides (last hidden state or concatenated layers) to width h."""
        if self.fuse is None:
            return target_features
        if self.config.input_norm:
            width = self.fuse.in_features // len(self.config.input_layers)
            target_features = rms_normalize_layers(target_features, width)
        return self.fuse(target_features)

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
        with attention_backends(x.device):  # a new cache length every step
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
        """Logits over the draft vocabulary: the target's full vocabulary, or the ``d2t``
        rows of its head when the vocabulary is reduced ([.., N], indexed by draft id)."""
        if self.d2t is None and not self.int8:
            return self.target_head(predicted)
        weight, bias, head = self._draft_head()
        return F.linear(predicted, weight, bias) if head is None else head(predicted)


class FeatureDrafter(Drafter):
    """Runs a FeatureDrafterModel inside the decode loop, for a batch of sequences."""

    def __init__(self, model: FeatureDrafterModel):
        self.model = model.eval()
        self.config = model.config
        self.method = self.config.architecture
        self.feature_layers = tuple(self.config.input_layers) if self.config.input_layers else "last"
        self.kv: RaggedCache | StaticKV | None = None  # one committed entry per token after the first
        self._static: tuple[StaticCachePool, int] | None = None  # see use_static_cache()
        self._graphs = None  # a CudaGraphRunner while CUDA graphs are on
        self.root_feature: torch.Tensor | None = None  # [B, h]: output at the last committed token
        self.slot_features: list[torch.Tensor] = []  # this round's expansions, [B, k, h] each
        if model.d2t is not None:
            check_d2t(model.d2t, self.config.vocab_size, self.config.draft_vocab_size)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.model.to_target_ids(draft_ids)

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

    def pack_weights(self) -> int:
        if self._device.type != "cpu":
            return 0
        model = self.model
        model.packed = True
        model.__dict__["_head_cache"] = None  # rebuilt with a packed draft head
        return pack_linears(model)

    def use_int8_weights(self) -> int:
        model = self.model
        if self._device.type != "cpu" or not int8_linear_available():
            return 0
        model.int8 = True
        model.__dict__["_head_cache"] = None  # rebuilt as an int8 head
        return int8_linears(model) + 1  # its own layers and the head

    def use_static_cache(self, capacity: int | None, cuda_graphs: bool = False) -> None:
        """From the next generation on, keep the drafter's KV cache in a preallocated
        StaticCache of ``capacity`` entries (the decode loop passes the target's static cache
        size: the drafter never holds more entries than the target) and, with ``cuda_graphs``
        (CUDA only), replay its steps as captured CUDA graphs. ``capacity=None``: back to a
        growing cache. Drafts are the same either way."""
        if capacity is None:
            self._static, self._graphs = None, None
            return
        if cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA drafter; this one is on {self._device}")
        if self._static is None or self._static[1] != capacity:
            self._static = (StaticCachePool(self.model.layer_config), capacity)
        if not cuda_graphs:
            self._graphs = None
        elif self._graphs is None:
            from ..targets.graphs import CudaGraphRunner

            self._graphs = CudaGraphRunner(max_graphs=32)  # modules x (catch-up lengths + tree levels)
        self._static[0].reuse = cuda_graphs

    @property
    def cuda_graph_stats(self) -> dict[str, int] | None:
        """{"captures", "uncapturable"} while the drafter's steps replay as CUDA graphs, else None."""
        graphs = self._graphs
        return None if graphs is None else {"captures": graphs.captures, "uncapturable": len(graphs.uncapturable)}

    def _mask(self, n_new: int, tree_mask: torch.Tensor | None) -> torch.Tensor:
        kv = self.kv
        dtype = self.model.processing[0].fc.weight.dtype
        mask = batch_attention_mask(kv.lengths, int(kv.cache.get_seq_length()), n_new, tree_mask, dtype, self._device)
        return fit_mask_to_cache(mask, kv.cache, dtype)

    def _step(self, module: int, tokens, features, positions, mask, graph: bool = True) -> torch.Tensor:
        cache = self.kv.cache
        if not graph or self._graphs is None or not isinstance(self.kv, StaticKV):
            return self.model.step(module, tokens, features, positions, mask, cache)
        (out,) = self._graphs(lambda t, f, p, m: (self.model.step(module, t, f, p, m, cache),),
                              (tokens, features, positions, mask), cache, key=(module,))
        return out

    @torch.inference_mode()
    def begin(self, prompts, first_tokens, features):
        if self.kv is not None:
            self.kv.release()  # the previous generation's buffers, for reuse
        if self._static is not None:
            pool, capacity = self._static
            self.kv = StaticKV(pool, len(prompts), capacity, self._device)
        else:
            self.kv = RaggedCache(DynamicCache(), len(prompts), self._device)
        tokens = [torch.cat([p[1:], p.new_tensor([first])]) for p, first in zip(prompts, first_tokens)]
        return self._extend(tokens, features, graph=False)  # the prompt: one length per prompt, no graph

    @torch.inference_mode()
    def extend(self, tokens, features):
        return self._extend(tokens, features)

    def _extend(self, tokens, features, graph: bool = True):
        # Step 0 of a round: module step_mapping[0] over the newly committed tokens writes the
        # prefix KV cache that every later step (whatever its module) attends to.
        padded, counts = pad_ragged(tokens)
        feats, _ = pad_ragged([f.to(self._device) for f in features])
        m = padded.shape[1]
        positions = self.kv.lengths[:, None] + torch.arange(m, device=self._device)
        out = self._step(
            self.config.module_for_step(0), padded, self.model.input_features(feats), positions, self._mask(m, None),
            graph=graph,
        )
        self.kv.commit([torch.arange(int(c), device=self._device) for c in counts])
        self.root_feature = out[torch.arange(out.shape[0], device=self._device), counts - 1]  # [B, h]
        self.slot_features = []
        return self.model.logits(self.root_feature).float()

    @torch.inference_mode()
    def expand(self, tokens, parent_slots, tree_mask, depth):
        batch, k = tokens.shape
        known = torch.cat([self.root_feature[:, None], *self.slot_features], dim=1)  # slot -1 -> 0
        index = (parent_slots + 1)[..., None].expand(batch, k, known.shape[-1])
        parents = known.gather(1, index)
        positions = (self.kv.lengths - 1 + depth)[:, None].expand(batch, k)
        out = self._step(self.config.module_for_step(depth), tokens, parents, positions, self._mask(k, tree_mask))
        self.slot_features.append(out)
        return self.model.logits(out).float()

    def keep_rows(self, rows):
        self.kv.keep_rows(rows)
        self.root_feature = self.root_feature[rows]

    def end_round(self):
        self.kv.rollback()
        self.slot_features = []
