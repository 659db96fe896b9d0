"""GGUF targets on llama.cpp (llama-cpp-python's low-level API) behind the runtime's target surface.

The engine runs the quantised model; a transformers copy of the same model (its *companion*)
supplies what stays in PyTorch: the tokenizer and chat template, the config, the embeddings
and LM head that feature drafters read, and the layers a stand-in standard drafter copies.

How a draft tree is verified in one ``llama_decode``: the committed tokens live in sequence 0
of a unified KV cache. Each leaf of the tree gets its own sequence id (the prefix is shared
with it by ``seq_cp``, which only tags cells), and every node is placed, at its depth's
position, in the sequences of the leaves below it, so it attends to the prefix and to its
ancestors only. The same decode returns every node's logits and its final hidden state (the
drafters' feature). Accepting a path drops the other sequences, trims the accepted leaf's
sequence after the path, and tags the path's cells as sequence 0.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import torch

from .hf import ForwardOutput, Target

#: Sequence ids a context can hold: the committed sequence, one per tree leaf and the
#: tombstone sequence (llama.cpp's own limit is 256).
MAX_SEQUENCES = 128
#: Rejected tree nodes stay in their cells under this sequence id, which nothing attends to:
#: llama.cpp places new tokens in the first free cells, holes included, and a later token in
#: a hole before an accepted node would change the cell order attention sums in (see
#: LlamaCppKV.commit).
TOMBSTONE = MAX_SEQUENCES - 1
#: The context a GGUF target gets unless ``n_ctx`` says otherwise: its trained context, at most
#: this. llama.cpp allocates the KV cache of the whole context up front, and recent GGUFs
#: declare 128k positions (16 GiB of float16 KV for an 8B Llama). The default target's is 8192.
DEFAULT_MAX_N_CTX = 8192

#: KV cache types (ggml type ids). ``f16`` is llama.cpp's default. With ``q8_0`` every query of
#: a batch takes the same per-row flash-attention kernel as a one-token step, at any context
#: length and thread count (f16/f32 caches switch one-token steps over 512 cells to a split-KV
#: kernel, and batches of 64 or more queries to a tiled one): docs/llamacpp.md#exactness.
KV_TYPES = {"f16": 1, "q8_0": 8}


#: x86 instruction sets as llama.cpp's system-info line names them, and the /proc/cpuinfo flag
#: of each (SSE3 is "pni" there).
X86_FEATURE_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from ``cpuinfo`` (Linux), or None where they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def missing_instruction_sets(system_info: str, flags: set[str] | None) -> list[str]:
    """The x86 instruction sets a llama.cpp build was compiled for (``NAME = 1`` in its
    system-info line) that a CPU with ``flags`` lacks; empty where ``flags`` is None."""
    if flags is None:
        return []
    built = {name.strip() for name, _, value in (item.partition("=") for item in system_info.split("|"))
             if value.strip() == "1"}
    return [name for name, flag in X86_FEATURE_FLAGS.items() if name in built and flag not in flags]


def cmake_args(flags: set[str]) -> str:
    """CMAKE_ARGS that build llama.cpp for a CPU with ``flags``: each instruction set on only
    where the CPU has it, AMX off (as ``scripts/llamacpp_cmake_args.sh`` prints)."""
    switches = [f"-DGGML_{name}={'ON' if X86_FEATURE_FLAGS[name] in flags else 'OFF'}"
                for name in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")]
    return " ".join(["-DGGML_NATIVE=OFF", *switches, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def llama_cpp_module():
    """The llama_cpp module (its C library's log silenced unless PRISM_LLAMA_LOG is set), or
    an ImportError saying how to install it, also when the installed build uses instructions
    this CPU lacks (it would die of SIGILL at its first decode instead)."""
    try:
        import llama_cpp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the llama.cpp engine needs llama-cpp-python: pip install 'prism-spec[llamacpp]' "
            "(see the README for the build flags this CPU needs)"
        ) from error
    global _SILENT_LOG, _CHECKED_BUILD
    if not _CHECKED_BUILD:
        system_info = llama_cpp.llama_print_system_info()
        system_info = system_info.decode("utf-8", "replace") if isinstance(system_info, bytes) else str(system_info)
        flags = cpu_flags()
        missing = missing_instruction_sets(system_info, flags)
        if missing:
            raise ImportError(
                f"this llama-cpp-python build uses {', '.join(missing)}, which this CPU does not have "
                "(it would crash with an illegal instruction); rebuild it for this CPU: "
                f"CMAKE_ARGS=\"{cmake_args(flags)}\" pip install --no-cache-dir --force-reinstall --no-deps "
                "'llama-cpp-python==0.3.36'"
            )
        _CHECKED_BUILD = True
    if _SILENT_LOG is None and not os.environ.get("PRISM_LLAMA_LOG"):
        _SILENT_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive here
        llama_cpp.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
    return llama_cpp


_CHECKED_BUILD = False
_SILENT_LOG = None


def free_llama(owner) -> None:
    """Free what an object holding ``llama_cpp``, ``_batch``, ``_ctx`` and ``_model`` (any of
    them possibly missing: a constructor that failed half way) created on the C side."""
    llama_cpp = getattr(owner, "llama_cpp", None)
    if llama_cpp is None:
        return
    if getattr(owner, "_batch", None) is not None:
        llama_cpp.llama_batch_free(owner._batch)
    if getattr(owner, "_ctx", None):
        llama_cpp.llama_free(owner._ctx)
    if getattr(owner, "_model", None):
        llama_cpp.llama_model_free(owner._model)


class LlamaCppKV:
    """The decode loop's KV-cache contract (``RaggedCache``'s) on a llama.cpp context, for one
    sequence: ``lengths`` committed tokens in sequence 0, and the pending tree of the last
    verify forward until it is committed or rolled back."""

    def __init__(self, target: "LlamaCppTarget", capacity: int):
        self.target = target
        self.cache = self  # what forward receives
        self.lengths = torch.zeros(1, dtype=torch.long)
        self.region = 0
        self.capacity = capacity
        self.pending: tuple[list[int], list[list[int]]] | None = None  # (leaf seq ids, node -> seq ids)
        target.clear_memory()

    def commit(self, keep: Sequence[torch.Tensor]) -> None:
        (kept,) = keep
        length, count = self.region, int(kept.numel())
        llama_cpp, memory = self.target.llama_cpp, self.target.memory
        if self.pending is None:  # a causal extend: its tokens are in sequence 0 already
            llama_cpp.llama_memory_seq_rm(memory, 0, length + count, -1)
        else:
            # Rejected nodes become tombstones instead of holes, so that every later token lands
            # after every accepted one, in position order, as in one-token decoding.
            leaves, node_seqs = self.pending
            last = int(kept[-1]) if count else 0
            chosen = node_seqs[last][0]  # a leaf sequence through the path's last node
            for seq in leaves:
                if seq != chosen:
                    llama_cpp.llama_memory_seq_cp(memory, seq, TOMBSTONE, length, -1)
                    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, chosen, TOMBSTONE, length + count, -1)
            llama_cpp.llama_memory_seq_rm(memory, chosen, length + count, -1)  # below the path
            llama_cpp.llama_memory_seq_cp(memory, chosen, 0, length, length + count)
            llama_cpp.llama_memory_seq_rm(memory, chosen, -1, -1)
            self.pending = None
        self.region = length + count
        self.lengths = torch.tensor([self.region])

    def rollback(self) -> None:
        llama_cpp, memory = self.target.llama_cpp, self.target.memory
        if self.pending is not None:
            for seq in self.pending[0]:
                llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
            self.pending = None
        llama_cpp.llama_memory_seq_rm(memory, 0, self.region, -1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if rows.tolist() != [0]:
            raise ValueError("the llama.cpp engine decodes one sequence at a time")

    def release(self) -> None:
        """Nothing to hand back: the next generation clears the context's memory."""


class LlamaCppTarget(Target):
    """A GGUF model run by llama.cpp, with a transformers companion of the same model."""

    engine = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike, companion: Target, n_ctx: int | None = None,
                 threads: int | None = None, name: str | None = None, flash_attention: bool = True,
                 kv_type: str = "f16"):
        super().__init__(companion.model, companion.tokenizer, name=name or str(gguf_path))
        self.llama_cpp = llama_cpp = llama_cpp_module()
        self.gguf_path = Path(gguf_path)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.gguf_path).encode(), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {self.gguf_path}")
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        if self.n_vocab != companion.vocab_size or self.n_embd != companion.hidden_size:
            raise ValueError(
                f"{self.gguf_path.name} (vocabulary {self.n_vocab}, width {self.n_embd}) is not the model of its "
                f"transformers companion {companion.name} ({companion.vocab_size}, {companion.hidden_size})"
            )
        if kv_type not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {kv_type!r}; one of {', '.join(KV_TYPES)}")
        config = companion.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if kv_type == "q8_0" and head_dim % 32:
            raise ValueError(f"a q8_0 KV cache stores blocks of 32 values: this model's attention heads have {head_dim}")
        params = llama_cpp.llama_context_default_params()
        self.kv_type = kv_type
        params.type_k = params.type_v = KV_TYPES[kv_type]
        self.n_ctx = int(n_ctx or min(companion.max_context, DEFAULT_MAX_N_CTX))
        self.flash_attention = flash_attention
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = min(self.n_ctx, 512)
        params.n_seq_max = MAX_SEQUENCES
        self.threads = int(threads or torch.get_num_threads())
        params.n_threads = params.n_threads_batch = self.threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.kv_unified = True
        # Flash attention: each query sums over the visible cells in cell order and skips masked
        # ones, so a tree node whose path sits in consecutive cells gets its one-token step's
        # attention. Without it, multi-token batches take other kernels than one-token steps
        # and speculative output drifts from plain greedy output (measured: 11 of 12 prompts
        # with chains of 3). llama-cpp-python's Llama class leaves it off by default: compare
        # with Llama(..., flash_attn=True).
        params.flash_attn_type = 1 if flash_attention else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ValueError(f"llama.cpp could not create a context for {self.gguf_path}")
        self.n_batch = int(params.n_batch)
        self.memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, MAX_SEQUENCES)
        self._embeddings_on = True

    def __del__(self):  # free the C side with the object
        free_llama(self)

    # ----------------------------------------------------------------- facts
    @property
    def max_context(self) -> int:
        return self.n_ctx

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def pack_weights(self, enabled: bool = True) -> int:
        return 0  # llama.cpp's own kernels

    def clear_memory(self) -> None:
        # Metadata only, as llama.cpp's own reset: masked cells are never read, and zeroing
        # the whole context's buffers took 13 ms a generation.
        self.llama_cpp.llama_memory_clear(self.memory, False)

    def new_kv(self, batch: int, static_capacity: int | None = None) -> LlamaCppKV:
        if batch != 1:
            raise ValueError("the llama.cpp engine decodes one sequence at a time: pass one prompt per call")
        return LlamaCppKV(self, self.n_ctx)

    # ----------------------------------------------------------------- forward
    def _decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]], outputs: list[bool]) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, node_seqs, out) in enumerate(zip(tokens, positions, seqs, outputs)):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = len(node_seqs)
            for j, seq in enumerate(node_seqs):
                batch.seq_id[i][j] = seq
            batch.logits[i] = int(out)
        status = self.llama_cpp.llama_decode(self._ctx, batch)
        if status == 1:  # no free cells: give the tombstones' cells back and try once more
            self.llama_cpp.llama_memory_seq_rm(self.memory, TOMBSTONE, -1, -1)
            status = self.llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (KV cache full or bad batch)")

    def _rows(self, getter, n_out: int, width: int) -> torch.Tensor:
        """A copy of the first ``n_out`` float rows of ``width`` that ``getter`` points at (one
        memmove: numpy.ctypeslib's view costs ~0.1 ms a call, a tenth of a decode step's budget)."""
        rows = torch.empty(n_out, width, dtype=torch.float32)
        ctypes.memmove(rows.data_ptr(), getter(self._ctx), rows.numel() * rows.element_size())
        return rows

    @torch.inference_mode()
    def forward(self, input_ids, positions, cache, tree_mask=None, lengths=None, feature_layers=None,
                      logits: bool = True, logit_rows: torch.Tensor | None = None,
                      features: bool = True) -> ForwardOutput:
        """One sequence ([1, n] tokens). See :meth:`Target.forward`; ``features=False``
        skips the hidden states (the embeddings output) where no drafter reads them, and the
        output's ``features`` are then None."""
        if input_ids.shape[0] != 1:
            raise ValueError("the llama.cpp engine decodes one sequence at a time")
        if feature_layers:
            raise ValueError("the llama.cpp engine gives the last hidden state only: drafters that read "
                             "intermediate target layers (PRISM*) need the PyTorch engine")
        if not isinstance(cache, LlamaCppKV):
            raise TypeError("a llama.cpp target runs on the KV cache of its own new_kv()")
        tokens, pos = input_ids[0].tolist(), positions[0].tolist()
        n = len(tokens)
        chain = tree_mask is None or n == 1 or bool(tree_mask[0].bool().equal(torch.ones(n, n, dtype=torch.bool).tril()))
        if chain:
            # Causal input, or a chain (vanilla's one-node rounds, chain trees): sequence 0 itself.
            # Rejected tail entries are cut at commit, and the holes they leave sit right after
            # the kept ones, where the next tokens go in position order.
            tree_mask = None
            seqs = [[0]] * n
        else:
            mask = tree_mask[0].bool()
            is_leaf = ~(mask & ~torch.eye(n, dtype=torch.bool, device=mask.device)).any(0)
            leaves = [int(i) for i in torch.nonzero(is_leaf).flatten()]
            if len(leaves) + 2 > MAX_SEQUENCES:
                raise ValueError(f"a tree with {len(leaves)} leaves: the llama.cpp engine takes {MAX_SEQUENCES - 2}")
            leaf_seq = {leaf: s for s, leaf in enumerate(leaves, start=1)}
            seqs = [[leaf_seq[leaf] for leaf in leaves if bool(mask[leaf, i])] for i in range(n)]
            for seq in leaf_seq.values():
                self.llama_cpp.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
            cache.pending = (list(leaf_seq.values()), seqs)
        # Every token is an output when all logits or all hidden states are asked for (llama.cpp
        # computes both for an output); else only the rows of logit_rows.
        every_token = logits or features
        outputs = [every_token] * n
        if not every_token and logit_rows is not None:
            for row in logit_rows.tolist():
                outputs[row] = True
        if features != self._embeddings_on:
            self.llama_cpp.llama_set_embeddings(self._ctx, features)
            self._embeddings_on = features
        # Long inputs (prefill) in pieces of n_batch; trees fit in one.
        all_logits, all_features = [], []
        for start in range(0, n, self.n_batch):
            stop = min(n, start + self.n_batch)
            self._decode(tokens[start:stop], pos[start:stop], seqs[start:stop], outputs[start:stop])
            n_out = sum(outputs[start:stop])
            if n_out:
                all_logits.append(self._rows(self.llama_cpp.llama_get_logits, n_out, self.n_vocab))
                if features:
                    all_features.append(self._rows(self.llama_cpp.llama_get_embeddings, n_out, self.n_embd))
        out_logits = _joined(all_logits, self.n_vocab)
        hidden = _joined(all_features, self.n_embd)[None].to(self.dtype) if features else None
        if logit_rows is not None:
            out_logits = out_logits[logit_rows.cpu()] if every_token else out_logits
        elif not logits:
            out_logits = None
        return ForwardOutput(None if out_logits is None else out_logits[None], hidden, None)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a llama.cpp target's logits come from its forward (pass logit_rows), not from features")


def _joined(pieces: list[torch.Tensor], width: int) -> torch.Tensor:
    """The rows of ``pieces`` as one tensor (no copy for the usual single piece)."""
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else torch.empty(0, width)


def plain_generate(llm, prompt: Sequence[int], max_new_tokens: int, eos_token_ids=(), temperature: float = 0.0,
                   seed: int = 0) -> list[int]:
    """llama-cpp-python's own decoding (``Llama.generate``) of ``prompt``, cut after the first
    EOS: the reference the engine's decoding is compared with. Greedy at ``temperature`` 0;
    above it plain temperature sampling (top-k, top-p and min-p off) seeded with ``seed``.
    ``reset`` first, else ``generate`` reuses the KV entries of a prefix shared with the
    previous prompt and skips their prefill (its output then differs)."""
    llm.reset()
    llm.set_seed(seed % 0xFFFFFFFF)  # 32-bit, and 0xFFFFFFFF would mean a random seed
    if temperature > 0:
        sampling = dict(temp=temperature, top_k=0, top_p=1.0, min_p=0.0)
    else:
        sampling = dict(temp=0.0, top_k=1)
    tokens = []
    for token in llm.generate(list(prompt), reset=True, **sampling):
        tokens.append(token)
        if len(tokens) >= max_new_tokens or token in eos_token_ids:
            break
    return tokens


def plain_greedy(llm, prompt: Sequence[int], max_new_tokens: int, eos_token_ids=()) -> list[int]:
    """:func:`plain_generate` at temperature 0: llama.cpp's own greedy decoding."""
    return plain_generate(llm, prompt, max_new_tokens, eos_token_ids)


def plain_llama(target: "LlamaCppTarget"):
    """A llama-cpp-python ``Llama`` on ``target``'s GGUF with the engine's settings (context,
    threads, flash attention, KV cache type): plain llama.cpp decoding to compare with."""
    kv = KV_TYPES[target.kv_type]
    return llama_cpp_module().Llama(str(target.gguf_path), n_ctx=target.n_ctx, n_threads=target.threads,
                                    flash_attn=target.flash_attention, type_k=kv, type_v=kv, verbose=False)


#: llama.cpp file types :func:`requantize` writes (``llama_ftype`` values).
REQUANTIZE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15}


def requantize(source: str | os.PathLike, destination: str | os.PathLike, quant: str, threads: int | None = None) -> Path:
    """Write ``source`` GGUF re-quantised to ``quant`` (one of :data:`REQUANTIZE_TYPES`) at
    ``destination`` with llama.cpp's own quantiser (its default tensor-type choices, as
    ``llama-quantize`` makes them). A quantised source is de-quantised first, so the weights
    carry both roundings: a way to measure another type's kernels on the same model, not a
    model of that type's quality. Written to a temporary name and renamed when complete."""
    if quant not in REQUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {quant!r}; one of {', '.join(REQUANTIZE_TYPES)}")
    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise FileNotFoundError(f"no GGUF file at {source}")
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REQUANTIZE_TYPES[quant]
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantise {source} to {quant} (status {status})")
    partial.replace(destination)
    return destination


def load_llamacpp_target(gguf_path: str | os.PathLike, companion_path: str | os.PathLike | None = None,
                         threads: int | None = None, n_ctx: int | None = None,
                         name: str | None = None, kv_type: str = "f16") -> LlamaCppTarget:
    """A GGUF model on llama.cpp. The companion (tokenizer, config, embeddings and head for
    the drafters) is a transformers folder of the same model, or the GGUF itself de-quantised
    by transformers. ``n_ctx``: the context (KV cells); by default the model's trained context,
    at most :data:`DEFAULT_MAX_N_CTX`."""
    from .hf import load_hf_target

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if companion_path is None:
        companion = _companion_from_gguf(gguf_path)
    else:
        companion = load_hf_target(str(companion_path), dtype="float32", pack_weights=False)
    return LlamaCppTarget(gguf_path, companion, n_ctx=n_ctx, threads=threads, name=name, kv_type=kv_type)


def _companion_from_gguf(gguf_path: Path) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return Target(model, tokenizer, name=gguf_path.name)
