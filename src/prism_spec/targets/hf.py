"""A transformers causal LM behind the one small surface the runtime needs.

Everything model-family specific stays here: a forward over new tokens (optionally a draft
tree) on top of a KV cache, the hidden states drafters consume, chat-template rendering, and
loading a model by hub id or path. The masks of those forwards are :mod:`.masks`', the KV
caches and their compaction after acceptance :mod:`.kv_cache`'s.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, StaticCache

from .attention import attention_backends, row_invariant_attention, use_grouped_sdpa
from .attention_kernel import DTYPES as KERNEL_DTYPES
from .attention_kernel import load_kernel
from .default import DEFAULT_TARGET, default_target_path
from .family import TargetFamily, UnsupportedTargetError, check_supported, full_attention_config
from .kv_cache import RaggedCache, StaticCachePool, StaticKV
from .masks import batch_attention_mask, fit_mask_to_cache
from .packed import PackedLinear, available_memory_bytes, linear_weight_bytes, pack_linears, unpack_linears

#: load_hf_target packs by default only when the packed copy takes at most this share of the
#: memory still free (the rest is left for activations, the KV cache and other processes).
PACKING_MEMORY_SHARE = 0.5

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
    logits: torch.Tensor | None  # [n, vocab] (float32); None when not asked for (Target.logits later)
    features: torch.Tensor | None  # [n, hidden]: last hidden state after the final norm (None: not asked for)
    layer_features: torch.Tensor | None = None  # [n, len(layers) * hidden] when asked for


def cache_kwarg(module) -> str:
    """transformers renamed `past_key_values` to `cache`; accept both generations."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high layers for EAGLE-3-style input (indices into HF hidden_states)."""
    return (min(3, num_layers), num_layers // 2 + 1, max(num_layers - 2, 1))


#: Forwards over at most this many new tokens use the compiled decoder (decode and verify, not prefill).
COMPILED_MAX_TOKENS = 128


class Target:
    """A causal LM plus its tokenizer, batch size 1, driven through transformers' public API."""

    engine = "torch"

    def __init__(self, model: PreTrainedModel, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.family = TargetFamily.of(model)  # raises UnsupportedTargetError for what cannot be decoded exactly
        # KV caches keep every entry (sliding windows are applied by the masks): see full_attention_config.
        self.cache_config = full_attention_config(model.config) if self.family.sliding else model.config
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        self._cache_kw = cache_kwarg(self.decoder)
        # Tree verification gives every node the attention of a one-token step, so that
        # speculative output equals vanilla output bit for bit in any dtype (attention.py).
        self.row_invariant_verify = False
        self.attention_kernel = None  # the compiled row-invariant kernel, when make_row_invariant() built one
        self._compiled_decoder = None  # see compile_decoder()
        self._graphed_decoder = None  # see use_cuda_graphs()
        self.static_caches = StaticCachePool(self.cache_config)  # buffers for StaticKV
        for p in self.model.parameters():
            p.requires_grad_(False)

    def compile_decoder(self, mode: str | None = None, backend: str = "inductor") -> None:
        """Run small forwards on a static KV cache (decode steps, tree verification) through
        ``torch.compile``; on CUDA the default mode is ``reduce-overhead`` (CUDA graphs).
        Prefill and dynamic-cache forwards stay eager. Each new (tokens, cache size) shape
        compiles once: keep the tree size fixed and let the static cache round its size up."""
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        self._compiled_decoder = torch.compile(self.decoder, mode=mode, backend=backend, dynamic=False)

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay small forwards on a static KV cache (decode steps, tree verification) as
        captured CUDA graphs (:mod:`prism_spec.targets.graphs`): no compile step, one capture per
        shape. Needs a CUDA target; prefill and dynamic-cache forwards stay eager.
        ``enabled=False`` goes back to eager forwards (and frees the graphs)."""
        if not enabled:
            self._graphed_decoder = None
            self.static_caches.reuse = False
            self.static_caches.free.clear()
            return
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA target; this one is on {self.device}")
        if self._graphed_decoder is not None:
            return  # already on: keep the captured graphs
        from .graphs import CudaGraphRunner

        self._graphed_decoder = CudaGraphRunner()
        self.static_caches.reuse = True

    def pack_weights(self, enabled: bool = True) -> int:
        """On a CPU, run the target's linear layers on oneDNN-prepacked weights
        (:mod:`prism_spec.targets.packed`: the same parameters, about twice their memory while
        on, often half the time or less per small product). ``enabled=False`` restores plain
        ``nn.Linear``. Returns the number of layers changed; a no-op off the CPU."""
        if enabled and self.device.type != "cpu":
            return 0
        changed = pack_linears(self.model) if enabled else unpack_linears(self.model)
        self.lm_head = self.model.get_output_embeddings()
        return changed

    def make_row_invariant(self) -> dict[str, str]:
        """Bit-identical verification (:mod:`prism_spec.targets.row_invariance`): every verified
        node gets the attention of its one-token step, and the linear layers whose kernels on
        this machine round a row differently in a many-row product get a two-row minimum or are
        split along K until they do not (probed here, about a second). Vanilla and speculative
        decoding of this target then give identical tokens in any dtype, also bf16. Returns
        ``{"OUTxIN": what was done}``; raises ``RowInvarianceUnavailable`` (a ValueError) where
        nothing tried is invariant. Call it after :meth:`pack_weights`."""
        from .row_invariance import make_linears_row_invariant

        report = make_linears_row_invariant(self.model)
        self.lm_head = self.model.get_output_embeddings()
        self.row_invariant_verify = True
        if self.device.type == "cpu" and self.dtype in KERNEL_DTYPES:
            self.attention_kernel = load_kernel()
        return report

    @property
    def packed_weights(self) -> bool:
        """Whether the linear layers run on prepacked weights (:meth:`pack_weights`)."""
        return isinstance(self.lm_head, PackedLinear)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self._graphed_decoder is not None

    @property
    def cuda_graph_stats(self) -> dict[str, int] | None:
        """{"captures": graphs captured so far, "uncapturable": shapes run eagerly} while CUDA
        graphs are on, else None."""
        graphs = self._graphed_decoder
        return None if graphs is None else {"captures": graphs.captures, "uncapturable": len(graphs.uncapturable)}

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
        return DynamicCache(config=self.cache_config)

    def new_kv(self, batch: int, static_capacity: int | None = None) -> "RaggedCache | StaticKV":
        """The decode loop's KV cache for ``batch`` sequences: a growing one, or with
        ``static_capacity`` a preallocated StaticCache of that many entries."""
        if static_capacity is not None:
            return StaticKV(self.static_caches, batch, static_capacity, self.device)
        return RaggedCache(self.new_cache(), batch, self.device, capacity=self.max_context)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the first decoder layer receives them (scaled where the family
        scales them inside the decoder)."""
        embeds = self.embed_tokens(input_ids)
        scale = self.family.embed_scale
        return embeds if scale is None else embeds * torch.tensor(scale, dtype=embeds.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        tree_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        feature_layers: Sequence[int] | None = None,
        logits: bool = True,
        logit_rows: torch.Tensor | None = None,
        features: bool = True,
    ) -> ForwardOutput:
        """Run new tokens [B, n] at ``positions`` [B, n] on top of ``cache``; row b sees its
        first ``lengths[b]`` committed entries and the tree entries ``tree_mask`` [B, n, t]
        allows. Outputs are [B, n, ...]. ``logits=False`` skips the LM head (its vocabulary-wide
        product costs a fifth of a small model's forward per token); ``logit_rows`` [B] then
        asks for the logits at one position per row only (``logits`` [B, 1, vocab]).
        ``features`` is for engines whose hidden states cost extra (here they come free)."""
        batch, n = input_ids.shape
        past = int(cache.get_seq_length())
        masks = {
            layer_type: fit_mask_to_cache(
                batch_attention_mask(lengths, past, n, tree_mask, self.dtype, self.device, positions, window),
                cache, self.dtype,
            )
            for layer_type, window in self.family.mask_windows().items()
        }
        # One mask for every layer, or (decoders with sliding and full layers) one per layer type.
        mask = masks[None] if None in masks else masks
        # Graphs (below) for decode steps and tree verification, which carry a tree mask; not for
        # prefill, whose length varies with every prompt (a capture per length would not pay).
        small_static = isinstance(cache, StaticCache) and n <= COMPILED_MAX_TOKENS
        decoder = self.decoder
        if self._compiled_decoder is not None and small_static:
            decoder = self._compiled_decoder

        def run(ids, pos, attention_mask):
            out = decoder(input_ids=ids, position_ids=pos, attention_mask=attention_mask, use_cache=True,
                          output_hidden_states=bool(feature_layers), **{self._cache_kw: cache})
            layers = torch.cat([out.hidden_states[i] for i in feature_layers], -1) if feature_layers else None
            return out.last_hidden_state, layers

        inputs = (input_ids.to(self.device), positions.to(self.device), mask)
        # Decode steps (vanilla rounds) and verification. Prefill too where the kernel runs it:
        # then a prompt's cache does not depend on the batch it is prefilled in (the kernel
        # computes each query alone); per-node SDPA leaves prefill, the same forward in
        # vanilla and speculative decoding of one batch, as it is.
        row_invariant = self.row_invariant_verify and (tree_mask is not None or self.attention_kernel is not None)
        with attention_backends(self.device), row_invariant_attention(row_invariant, self.attention_kernel):
            # (The graph runner takes tensors only: per-type mask dicts run eagerly.)
            if self._graphed_decoder is not None and small_static and tree_mask is not None and None in masks:
                hidden, layer_features = self._graphed_decoder(run, inputs, cache, key=tuple(feature_layers or ()))
            else:
                hidden, layer_features = run(*inputs)
        if logit_rows is not None:
            # One row at a time, as a decode step computes its logits (a product's rounding can
            # depend on how many rows it has).
            rows = [self.logits(hidden[b, int(r) : int(r) + 1]) for b, r in enumerate(logit_rows.tolist())]
            return ForwardOutput(torch.stack(rows), hidden, layer_features)
        return ForwardOutput(self.logits(hidden) if logits else None, hidden, layer_features)

    @torch.inference_mode()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits from last hidden states (``ForwardOutput.features``),
        scaled or soft-capped as the family's own forward does."""
        return self.family.scale_logits(self.lm_head(features)).float()

    @torch.inference_mode()
    def check_against_model(self, length: int = 8) -> None:
        """Check that this wrapper's forward gives the model's own logits on a short input
        (raises UnsupportedTargetError otherwise): a family whose forward does something this
        module does not know of is refused instead of decoding wrongly."""
        ids = torch.arange(1, length + 1, device=self.device)[None] % self.vocab_size
        reference = self.model(input_ids=ids, use_cache=False).logits.float()[0]
        cache = self.new_cache()
        ours = self.forward(ids, torch.arange(length, device=self.device)[None], cache).logits[0]
        tolerance = 1e-3 if self.dtype in (torch.float32, torch.float64) else 5e-2
        error = float((ours - reference).abs().max()) / max(float(reference.abs().max()), 1e-6)
        if not error <= tolerance:
            raise UnsupportedTargetError(
                f"{self.family.model_type}: the runtime's forward differs from the model's own "
                f"(relative logit error {error:.2g}); this family is not supported"
            )


def with_attention_fallback(build, attn_implementation: str = "sdpa"):
    """``build(implementation)``, falling back to transformers' ``eager`` attention for
    families without the requested one (Gemma 2 has no SDPA: its soft-capped scores need eager)."""
    try:
        return build(attn_implementation)
    except ValueError as error:
        message = str(error)
        if attn_implementation == "eager" or ("attn_implementation" not in message and "support" not in message):
            raise
        return build("eager")


ENGINES = ("auto", "torch", "llama.cpp")


def resolve_engine(name_or_path: str, engine: str = "auto") -> str:
    """``torch`` or ``llama.cpp`` for a target: ``auto`` picks llama.cpp for ``.gguf`` files."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "llama.cpp" if str(name_or_path).lower().endswith(".gguf") else "torch"
    if engine == "llama.cpp" and name_or_path != DEFAULT_TARGET and not str(name_or_path).lower().endswith(".gguf"):
        raise ValueError(f"the llama.cpp engine runs GGUF files; {name_or_path} is not one")
    return engine


def load_hf_target(
    name_or_path: str = DEFAULT_TARGET,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    pack_weights: bool | None = None,
) -> Target:
    """Load any transformers causal LM by hub id or local path, or the embedded default, on
    the torch engine. ``pack_weights`` (default: on for CPU targets in float32 / bfloat16)
    runs its linear layers on prepacked weights (:meth:`Target.pack_weights`).

    :func:`prism_spec.targets.load_target` is the usual entry point: it picks the engine
    (this one, or llama.cpp for GGUF files) and calls this for torch."""
    path: str | Path = default_target_path() if name_or_path == DEFAULT_TARGET else name_or_path
    check_supported(AutoConfig.from_pretrained(path))  # before loading any weights
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = with_attention_fallback(
        lambda implementation: AutoModelForCausalLM.from_pretrained(
            path, dtype=parse_dtype(dtype), attn_implementation=implementation
        ),
        attn_implementation,
    ).to(device)
    # Same kernel and outputs as "sdpa", without copying the KV cache per query group.
    use_grouped_sdpa(model)
    target = Target(model, tokenizer, name=name_or_path)
    target.check_against_model()
    if pack_weights is None:
        pack_weights = target.device.type == "cpu" and target.dtype in (torch.float32, torch.bfloat16)
        if pack_weights:
            # The packed copy is about the weights' size again: never let the default run a
            # machine out of memory that the plain model fits in.
            need, free = linear_weight_bytes(target.model), available_memory_bytes()
            if free is not None and need > PACKING_MEMORY_SHARE * free:
                warnings.warn(
                    f"not prepacking the CPU weights of {name_or_path}: the packed copy needs "
                    f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free (pass pack_weights=True "
                    "to force it); decoding runs on plain nn.Linear layers, slower",
                    stacklevel=3,  # the caller of targets.load_target
                )
                pack_weights = False
    if pack_weights:
        target.pack_weights()
    return target
