"""The engines that answer a corpus's prompts: transformers' ``generate`` over left-padded
batches (:class:`HFEngine`) and a GGUF model on llama.cpp with continuous batching
(:class:`LlamaCppEngine`), behind the :class:`ReplyEngine` protocol."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from .store import CorpusError, DecodingSettings


class ReplyEngine(Protocol):
    """Answers prompts given as token ids. ``generate`` calls ``on_reply(i, reply_ids,
    finish)`` once per prompt (``i`` indexes ``prompts``), in any order, as replies finish, and
    returns early (some prompts unanswered) once ``should_stop()`` is true; it asks between
    batches, so a stop costs at most one batch's work."""

    name: str

    def describe(self) -> dict: ...

    def generate(self, prompts: Sequence[Sequence[int]], settings: DecodingSettings, seed: int,
                 on_reply: Callable[[int, list[int], str], None],
                 should_stop: Callable[[], bool] = lambda: False) -> None: ...


def _cut_reply(ids: Sequence[int], eos: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """The reply up to and including its first end token, or its first max_new_tokens."""
    for j, t in enumerate(ids[:max_new_tokens]):
        if t in eos:
            return list(ids[: j + 1]), "stop"
    return list(ids[:max_new_tokens]), "length"


class HFEngine:
    """``target.model.generate`` over left-padded batches of similar length.

    On CUDA the KV cache is a preallocated static cache (one shape per batch width and length
    bucket). Rows that finish early keep decoding padding until the batch ends, so batches are
    formed from prompts of similar length."""

    name = "transformers"

    def __init__(self, target, batch_size: int = 32, static_cache: bool | None = None):
        self.target = target
        self.batch_size = int(batch_size)
        self.static_cache = target.device.type == "cuda" if static_cache is None else bool(static_cache)
        self.eos = set(int(e) for e in target.eos_token_ids)
        tok = target.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos, default=0)

    def describe(self) -> dict:
        import torch
        import transformers

        return {"engine": self.name, "transformers": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.target.dtype).replace("torch.", ""), "device": str(self.target.device),
                "batch_size": self.batch_size, "static_cache": self.static_cache}

    def generate(self, prompts, settings, seed, on_reply, should_stop=lambda: False):
        import torch
        from transformers import GenerationConfig

        from ...targets.attention import attention_backends

        sampling = settings.temperature > 0
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=sampling, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos) or None,
            **({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
               if sampling else {}),
            **({"cache_implementation": "static"} if self.static_cache else {}),
        )
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        device = self.target.device
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            if should_stop():
                return
            rows = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = prompts[i]
                input_ids[r, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
                mask[r, width - len(ids):] = 1
            if sampling:
                torch.manual_seed(seed * 1_000_003 + b)
            with torch.inference_mode(), attention_backends(device):
                out = self.target.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config)
            new = out[:, width:].tolist()
            for r, i in enumerate(rows):
                reply, finish = _cut_reply(new[r], self.eos, settings.max_new_tokens)
                on_reply(i, reply, finish)


class LlamaCppEngine:
    """The GGUF model on llama.cpp, decoding ``batch_size`` prompts at once with continuous
    batching: every step is one ``llama_decode`` of one token per active sequence, and a
    finished sequence's slot takes the next prompt at once (no padding, nothing rides along).

    Sequences are independent KV streams of one context (``kv_unified`` off), so each token
    attends to its own sequence's cells only. Greedy is the argmax of llama.cpp's logits (its
    own greedy sampler's choice); T > 0 samples with numpy from a generator seeded per prompt,
    so a reply does not depend on which prompts shared its batch."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike, eos_token_ids: Iterable[int], batch_size: int = 16,
                 threads: int | None = None, flash_attention: bool = True):
        from ...targets.llamacpp import llama_cpp_module

        self.llama_cpp = llama_cpp = llama_cpp_module()
        self.gguf_path = Path(gguf_path)
        self.batch_size = int(batch_size)
        self.threads = int(threads or os.cpu_count() or 1)
        self.flash_attention = flash_attention
        self.eos = set(int(e) for e in eos_token_ids)
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(str(self.gguf_path).encode(),
                                                           llama_cpp.llama_model_default_params())
        if not self._model:
            raise CorpusError(f"llama.cpp could not load {self.gguf_path}")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        self._ctx, self._per_sequence = None, 0
        self.n_batch = 512
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def describe(self) -> dict:
        import llama_cpp

        return {"engine": self.name, "llama_cpp_python": llama_cpp.__version__, "gguf": self.gguf_path.name,
                "dtype": "gguf", "device": "cpu", "batch_size": self.batch_size, "threads": self.threads,
                "flash_attention": self.flash_attention}

    def __del__(self):
        from ...targets.llamacpp import free_llama

        free_llama(self)

    def _context(self, per_sequence: int):
        """A context with ``batch_size`` streams of at least ``per_sequence`` cells each."""
        per_sequence = -(-per_sequence // 256) * 256
        if self._ctx is not None and per_sequence <= self._per_sequence:
            self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self._ctx), True)
            return self._ctx
        if self._ctx is not None:
            self.llama_cpp.llama_free(self._ctx)
        params = self.llama_cpp.llama_context_default_params()
        params.n_ctx = per_sequence * self.batch_size
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.batch_size
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False
        params.flash_attn_type = 1 if self.flash_attention else 0
        self._ctx = self.llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise CorpusError(f"llama.cpp could not create a context of {self.batch_size} x {per_sequence} cells")
        self._per_sequence = per_sequence
        return self._ctx

    def _decode(self, ctx, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, int(out)
            batch.seq_id[i][0] = seq
        status = self.llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _logits(self, ctx, row: int) -> np.ndarray:
        pointer = self.llama_cpp.llama_get_logits_ith(ctx, row)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    @staticmethod
    def _choose(logits: np.ndarray, settings: "DecodingSettings", rng) -> int:
        if settings.temperature <= 0:
            return int(logits.argmax())
        scaled = logits.astype(np.float64) / settings.temperature
        if settings.top_k:
            cut = np.partition(scaled, -settings.top_k)[-settings.top_k]
            scaled = np.where(scaled < cut, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if settings.top_p < 1:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < settings.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(rng.choice(len(probs), p=probs))

    def generate(self, prompts, settings, seed, on_reply, should_stop=lambda: False):
        if not prompts:
            return
        ctx = self._context(max(len(p) for p in prompts) + settings.max_new_tokens)
        memory = self.llama_cpp.llama_get_memory(ctx)
        queue = list(range(len(prompts)))[::-1]  # popped from the end: prompts in order
        active: dict[int, dict] = {}  # sequence id -> state of the prompt it holds
        free = list(range(self.batch_size))[::-1]
        while queue or active:
            # Admit prompts into free sequences: prefill each, its last position's logits give
            # its first reply token. Once asked to stop, only the sequences started finish.
            while free and queue and not should_stop():
                i, seq = queue.pop(), free.pop()
                ids = list(prompts[i])
                for start in range(0, len(ids), self.n_batch):
                    chunk = ids[start:start + self.n_batch]
                    self._decode(ctx, [(t, start + k, seq, start + k == len(ids) - 1) for k, t in enumerate(chunk)])
                rng = np.random.default_rng([seed, i]) if settings.temperature > 0 else None
                state = {"i": i, "reply": [], "pos": len(ids), "rng": rng}
                self._take(seq, state, self._choose(self._logits(ctx, len(chunk) - 1), settings, rng),
                           settings, active, free, memory, on_reply)
            if not active:
                if should_stop():
                    return
                continue
            seqs = list(active)
            self._decode(ctx, [(active[s]["reply"][-1], active[s]["pos"], s, True) for s in seqs])
            for row, seq in enumerate(seqs):
                state = active[seq]
                state["pos"] += 1
                self._take(seq, state, self._choose(self._logits(ctx, row), settings, state["rng"]),
                           settings, active, free, memory, on_reply)

    def _take(self, seq, state, token, settings, active, free, memory, on_reply) -> None:
        """Append ``token`` to a sequence's reply; hand the reply over and free the sequence
        when it ends (end token or length)."""
        state["reply"].append(token)
        done = token in self.eos or len(state["reply"]) >= settings.max_new_tokens
        if not done:
            active[seq] = state
            return
        active.pop(seq, None)
        self.llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        free.append(seq)
        on_reply(state["i"], state["reply"], "stop" if token in self.eos else "length")
