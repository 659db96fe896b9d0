"""``load_target``: a target by hub id, folder or GGUF file, on the engine that runs it.

transformers models load through :func:`.hf.load_hf_target`, GGUF files (and the default
target's own GGUF) through :func:`.llamacpp.load_llamacpp_target`; :func:`.hf.resolve_engine`
picks between them. The choice lives here rather than in either engine's module: the llama.cpp
target is built on the transformers one, so :mod:`.llamacpp` imports :mod:`.hf`, and this
module is what imports both.
"""

from __future__ import annotations

import torch

from .default import DEFAULT_TARGET, default_gguf_path, default_target_path
from .hf import Target, load_hf_target, resolve_engine


def load_target(
    name_or_path: str = DEFAULT_TARGET,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    pack_weights: bool | None = None,
    engine: str = "auto",
    threads: int | None = None,
    row_invariant: bool = False,
) -> Target:
    """Load any transformers causal LM by hub id or local path, or the embedded default.
    ``pack_weights`` (default: on for CPU targets in float32 / bfloat16) runs its linear
    layers on prepacked weights (:meth:`Target.pack_weights`).

    ``engine``: ``torch`` (transformers), ``llama.cpp`` (GGUF files, and the default target's
    own GGUF; :mod:`prism_spec.targets.llamacpp`) or ``auto``: llama.cpp for ``.gguf`` paths,
    torch otherwise (see :func:`~prism_spec.targets.hf.resolve_engine`).

    ``row_invariant``: bit-identical verification. On the torch engine
    (:meth:`Target.make_row_invariant`), speculative output equals vanilla output of this target
    in any dtype where this machine's kernels allow it; ``RowInvarianceUnavailable`` (a
    ValueError) where they do not. On the llama.cpp engine, a q8_0 KV cache (``kv_type``), with
    which every verified token takes its one-token step's attention kernel at any context length
    and thread count; llama.cpp's plain decoding compared with it uses the same cache."""
    engine = resolve_engine(name_or_path, engine)
    if engine == "llama.cpp":
        from .llamacpp import load_llamacpp_target  # numpy and ctypes: only for llama.cpp targets

        if device != "cpu" or dtype not in ("float32", "fp32", "auto", torch.float32):
            raise ValueError("the llama.cpp engine runs GGUF weights on the CPU: leave --dtype and --device at their defaults")
        kv_type = "q8_0" if row_invariant else "f16"
        if name_or_path == DEFAULT_TARGET:
            return load_llamacpp_target(default_gguf_path(), default_target_path(), threads=threads,
                                        name=DEFAULT_TARGET, kv_type=kv_type)
        return load_llamacpp_target(name_or_path, threads=threads, kv_type=kv_type)
    target = load_hf_target(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            pack_weights=pack_weights)
    if row_invariant:
        target.make_row_invariant()
    return target
