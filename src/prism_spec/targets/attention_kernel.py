"""The compiled row-invariant attention kernel (``csrc/row_invariant_attention.cpp``).

Row-invariant verification needs every verified token's attention to be bit for bit what a
one-token decode step computes. Calling PyTorch's SDPA once per tree node gives that, but
reads the whole prefix once per node (a 4-node tree costs four decode steps' attention). This
kernel defines the attention of one query as a fixed function of the keys it sees, in order,
and computes every query of a call in one call per layer; decode steps, verification and
prefill all run through it in row-invariant mode, so they agree by construction.

It is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler, and ninja from
the ``ninja`` wheel; about 40 s on two cores, cached under ``TORCH_EXTENSIONS_DIR``) for the
vector instructions PyTorch itself uses on this CPU. Where it cannot be built, :func:`load_kernel` returns None with the
reason in :func:`unavailable_reason`, and row-invariant verification falls back to one SDPA
call per node. ``PRISM_SPEC_ATTENTION_KERNEL=0`` turns it off (for A/B measurements).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "row_invariant_attention.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# PyTorch's vector types pick their implementation from CPU_CAPABILITY; without these defines
# an extension gets the scalar fallback (measured 5x slower).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_log = logging.getLogger(__name__)
_reason: str | None = None


def enabled() -> bool:
    """False when ``PRISM_SPEC_ATTENTION_KERNEL=0``."""
    return os.environ.get("PRISM_SPEC_ATTENTION_KERNEL", "1") != "0"


def _put_ninja_on_path() -> None:
    """The ``ninja`` wheel (a dependency) installs its binary next to the interpreter's scripts,
    which is not on PATH when a virtual environment's python runs without being activated."""
    try:
        import ninja
    except ImportError:
        return
    directory = getattr(ninja, "BIN_DIR", None)
    if directory and directory not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _build():
    global _reason
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, [])
    name = f"prism_spec_row_invariant_attention_{capability.lower()}"
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        _put_ninja_on_path()
        verify_ninja_availability()
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        if not any(build_dir.glob(f"*/{name}/{name}*.so")):
            print(f"[prism-spec] Building the row-invariant attention kernel for {capability} "
                  "(one time, about a minute) ...", file=sys.stderr, flush=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say why
        lines = str(error).strip().splitlines() or [""]
        _reason = f"{type(error).__name__}: " + next((line for line in lines if "error:" in line), lines[-1])
        _log.warning("row-invariant attention kernel unavailable (%s); per-node SDPA is used instead", _reason)
        return None


def load_kernel():
    """The compiled extension module (``row_invariant_attention(query, key, value, shared,
    tail_offsets, tail_index, scale)``), or None where it cannot be built or is turned off."""
    if not enabled():
        return None
    return _build()


def unavailable_reason() -> str | None:
    """Why :func:`load_kernel` returned None (None if it did not, or was not called)."""
    if not enabled():
        return "turned off by PRISM_SPEC_ATTENTION_KERNEL=0"
    return _reason


def attention_plan(attention_mask: torch.Tensor | None, batch: int, n: int, kv_len: int):
    """The kernel's description of which keys each query sees, from an additive mask
    [B, 1, n, >= kv_len] (0 = visible) or None (every key): ``shared`` [B * n], the length of
    each query's leading run of visible keys, and the rest of its visible keys in cache order
    as CSR (``tail_offsets`` [B * n + 1], ``tail_index``)."""
    if attention_mask is None:
        shared = torch.full((batch * n,), kv_len, dtype=torch.long)
        return shared, torch.zeros(batch * n + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    visible = (attention_mask[:, 0, :, :kv_len] == 0).cpu()
    shared = visible.long().cumprod(-1).sum(-1)  # [B, n]
    tail = visible & (torch.arange(kv_len) >= shared[..., None])
    offsets = torch.zeros(batch * n + 1, dtype=torch.long)
    torch.cumsum(tail.sum(-1).flatten(), 0, out=offsets[1:])
    return shared.flatten(), offsets, tail.nonzero()[:, 2].contiguous()
