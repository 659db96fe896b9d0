"""The target's own corpus: its answers to a whole prompt set, stored as token ids in shards.

Drafters learn the distribution they are trained on; trained on the target's own replies they
see, at training time, the contexts they meet when drafting for it. This module builds such a
corpus at scale, restartably, on a CPU in the background or on a GPU in one call:

* :func:`collect_prompts` reads every prompt of some data files (the first user turn of each
  record, with a system turn before it if any), drops exact repeats and over-long prompts,
  fixes a seeded order (so any prefix of the corpus is a balanced sample of the sources) and
  stores the rendered prompt token ids in ``prompts.npz``.
* :func:`build_corpus` answers them shard by shard (``shard_size`` prompts each) with a
  :class:`ReplyEngine` and writes ``shard-NNNNN.npz`` (reply ids, finish reasons) plus
  ``shard-NNNNN.json`` (provenance: engine, dtype, device, machine, time) atomically when a
  shard is complete. Replies finished inside an unfinished shard are appended to
  ``shard-NNNNN.partial.jsonl`` first, so an interrupted run loses at most one batch.
* :func:`read_corpus` gives training examples (prompt ids + reply ids, loss on the reply)
  straight from the ids, with no re-tokenisation of decoded text.

Token ids are stored as uint16 when the vocabulary fits (it does for most targets under 65,536
tokens), uint32 otherwise, in compressed ``.npz`` files. A reply ends with the end-of-turn token
the target produced (finish ``stop``) or is cut at ``max_new_tokens`` (finish ``length``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from .conversations import Conversation, conversation_key
from .mix import expand_sources
from .records import read_file

FORMAT = "prism-spec-corpus/1"
MANIFEST = "corpus.json"
PROMPTS = "prompts.npz"
FINISH_CODES = {"stop": 0, "length": 1}
FINISH_NAMES = {v: k for k, v in FINISH_CODES.items()}


class CorpusError(ValueError):
    """The corpus folder or the settings given for it are not usable (a clear message says why)."""


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """How the replies are decoded; fixed for a corpus (a resume with others is refused)."""

    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise CorpusError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CorpusError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CorpusError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CorpusError(f"top_k must be >= 0, got {self.top_k}")


# ============================================================================ files
def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are shared data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n"))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic_write_bytes(path, write)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _pack(seqs: Sequence[Sequence[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[offsets[i]:offsets[i + 1]].astype(np.int64).tolist() for i in range(len(offsets) - 1)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def machine_description() -> str:
    """CPU model and core count, or the GPU's name: where a shard was produced."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


# ============================================================================ prompts
def first_user_turn(conversation: Conversation) -> Conversation | None:
    """The conversation up to its first user turn (a system turn before it is kept)."""
    for i, message in enumerate(conversation):
        if message["role"] == "user":
            return [dict(m) for m in conversation[: i + 1]] if message["content"].strip() else None
    return None


@dataclasses.dataclass
class PromptSet:
    """Rendered prompts in corpus order, with where each one came from."""

    ids: list[list[int]]
    keys: list[str]  # conversation_key of the prompt, first 16 hex digits
    source: list[int]  # index into ``sources``
    position: list[int]  # record position within its source (after unreadable records)
    sources: list[dict]

    def __len__(self) -> int:
        return len(self.ids)


def collect_prompts(
    paths: Iterable[str | os.PathLike],
    tokenizer,
    max_prompt_tokens: int = 1536,
    seed: int = 0,
    progress: bool = True,
) -> PromptSet:
    """Every usable prompt of ``paths`` (files or folders, any format the trainer reads).

    Usable: a non-empty first user turn, not an exact repeat of an earlier prompt, at most
    ``max_prompt_tokens`` tokens once rendered with the chat template and generation prompt.
    The order is a seeded shuffle, so the first shards are a balanced sample of all sources."""
    from tqdm.auto import tqdm

    from .chat import has_chat_template, render

    sources = expand_sources(list(paths))
    if not sources:
        raise CorpusError("no prompt files given")
    templated = has_chat_template(tokenizer)
    entries: list[tuple[Conversation, int, int]] = []
    source_stats: list[dict] = []
    seen: set[str] = set()
    for s, (source, fmt, _from_folder) in enumerate(sources):
        try:
            convs, stats = read_file(source, fmt)
        except ValueError as err:
            raise CorpusError(f"cannot read prompts from {source}: {err}") from None
        info = {"file": os.path.basename(source) if not source.startswith("hf:") else source,
                "records": len(convs) + stats.total_skipped, "unreadable": stats.total_skipped,
                "no_prompt": 0, "duplicates": 0, "too_long": 0, "usable": 0}
        for position, conv in enumerate(convs):
            prompt = first_user_turn(conv)
            if prompt is None:
                info["no_prompt"] += 1
                continue
            key = conversation_key(prompt)
            if key in seen:
                info["duplicates"] += 1
                continue
            seen.add(key)
            entries.append((prompt, s, position))
        source_stats.append(info)

    texts = [render(tokenizer, prompt, add_generation_prompt=True) for prompt, _, _ in entries]
    ids_all: list[list[int]] = []
    for start in tqdm(range(0, len(texts), 512), desc="tokenize prompts", disable=not progress, unit="batch"):
        ids_all += tokenizer(texts[start:start + 512], add_special_tokens=not templated)["input_ids"]
    kept = []
    for (prompt, s, position), ids in zip(entries, ids_all):
        if len(ids) > max_prompt_tokens:
            source_stats[s]["too_long"] += 1
            continue
        source_stats[s]["usable"] += 1
        kept.append((list(ids), conversation_key(prompt)[:16], s, position))
    if not kept:
        raise CorpusError(f"no usable prompt in {[src for src, _, _ in sources]}")
    random.Random(seed).shuffle(kept)
    return PromptSet(
        ids=[k[0] for k in kept], keys=[k[1] for k in kept], source=[k[2] for k in kept],
        position=[k[3] for k in kept], sources=source_stats,
    )


def _save_prompts(folder: Path, prompts: PromptSet, vocab_size: int) -> str:
    flat, offsets = _pack(prompts.ids, _token_dtype(vocab_size))
    _write_npz(folder / PROMPTS, {
        "ids": flat, "offsets": offsets,
        "keys": np.array(prompts.keys, dtype="S16"),
        "source": np.array(prompts.source, dtype=np.int32),
        "position": np.array(prompts.position, dtype=np.int64),
    })
    return _prompts_hash(prompts.ids)


def _prompts_hash(ids: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for seq in ids:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"\xff" * 8)
    return h.hexdigest()


def load_prompts(folder: str | os.PathLike) -> PromptSet:
    folder = Path(folder)
    manifest = read_manifest(folder)
    with np.load(folder / PROMPTS) as z:
        ids = _unpack(z["ids"], z["offsets"])
        keys = [k.decode() for k in z["keys"].tolist()]
        source, position = z["source"].tolist(), z["position"].tolist()
    return PromptSet(ids, keys, source, position, manifest["prompts"]["sources"])


# ============================================================================ manifest
def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{folder} is not a corpus folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CorpusError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    return manifest


def is_corpus(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def target_identity(target) -> dict:
    """What must not change between the shards of one corpus."""
    tok = target.tokenizer
    return {
        "name": str(target.name),
        "model_type": getattr(target.config, "model_type", None),
        "vocab_size": int(target.config.vocab_size),
        "tokenizer_vocab": int(len(tok)),
        "eos_token_ids": sorted(int(e) for e in target.eos_token_ids),
    }


def create_corpus(
    folder: str | os.PathLike,
    target,
    data_paths: Sequence[str | os.PathLike],
    settings: DecodingSettings,
    shard_size: int = 256,
    max_prompt_tokens: int = 1536,
    prompt_seed: int = 0,
    progress: bool = True,
) -> dict:
    """Collect the prompts and write the manifest; an existing corpus with the same settings
    is opened as it is (any difference is an error naming it)."""
    folder = Path(folder)
    if shard_size < 1:
        raise CorpusError(f"shard_size must be >= 1, got {shard_size}")
    wanted = {
        "target": target_identity(target),
        "decoding": dataclasses.asdict(settings),
        "shard_size": int(shard_size),
        "max_prompt_tokens": int(max_prompt_tokens),
        "prompt_seed": int(prompt_seed),
    }
    if is_corpus(folder):
        manifest = read_manifest(folder)
        diffs = [f"{k}: corpus has {manifest.get(k)!r}, asked for {v!r}" for k, v in wanted.items()
                 if manifest.get(k) != v]
        if diffs:
            raise CorpusError(f"{folder} was built with other settings (use another folder):\n  " + "\n  ".join(diffs))
        return manifest
    # A creation cut short leaves prompts.npz (or a temporary file) without the manifest,
    # which is written last: start that over; anything else is someone else's folder.
    leftovers = [p for p in folder.iterdir() if p.name != PROMPTS and not p.name.endswith(".tmp")] \
        if folder.exists() else []
    if leftovers:
        raise CorpusError(f"{folder} exists and is not a corpus folder; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    prompts = collect_prompts(data_paths, target.tokenizer, max_prompt_tokens, prompt_seed, progress)
    digest = _save_prompts(folder, prompts, int(target.config.vocab_size))
    total_tokens = sum(len(p) for p in prompts.ids)
    manifest = {
        "format": FORMAT,
        **wanted,
        "token_dtype": _token_dtype(int(target.config.vocab_size)).name,
        "prompts": {
            "count": len(prompts), "tokens": total_tokens, "sha256": digest,
            "sources": prompts.sources,
            "data_paths": [str(p) for p in data_paths],
            "selection": "first user turn (with a system turn before it), exact repeats dropped, "
                         f"rendered with the chat template and generation prompt, <= {max_prompt_tokens} tokens, "
                         f"seeded shuffle (seed {prompt_seed})",
        },
        "num_shards": -(-len(prompts) // shard_size),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    _write_json(folder / MANIFEST, manifest)
    return manifest


# ============================================================================ engines
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

        from ..targets.hf import attention_backends

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
        from ..targets.llamacpp import llama_cpp_module

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
        from ..targets.llamacpp import free_llama

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


# ============================================================================ building
@dataclasses.dataclass
class Shard:
    index: int
    start: int  # first prompt index
    stop: int  # one past the last


def shards_of(manifest: dict) -> list[Shard]:
    n, size = manifest["prompts"]["count"], manifest["shard_size"]
    return [Shard(k, k * size, min(n, (k + 1) * size)) for k in range(manifest["num_shards"])]


def shard_done(folder: Path, k: int) -> bool:
    return (folder / f"{shard_name(k)}.json").is_file() and (folder / f"{shard_name(k)}.npz").is_file()


def _read_partial(path: Path) -> dict[int, tuple[list[int], str]]:
    """Replies already in a shard's journal; a partial last line (a crash mid-write) is cut."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done: dict[int, tuple[list[int], str]] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[int(rec["i"])] = ([int(t) for t in rec["ids"]], str(rec["finish"]))
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: an unreadable line was ignored; that reply is redone", stacklevel=2)
    return done


def _finish_shard(folder: Path, manifest: dict, shard: Shard, replies: dict[int, tuple[list[int], str]],
                  meta: dict) -> None:
    dtype = np.dtype(manifest["token_dtype"])
    seqs = [replies[i][0] for i in range(shard.start, shard.stop)]
    flat, offsets = _pack(seqs, dtype)
    finish = np.array([FINISH_CODES[replies[i][1]] for i in range(shard.start, shard.stop)], dtype=np.uint8)
    name = shard_name(shard.index)
    _write_npz(folder / f"{name}.npz", {"reply_ids": flat, "reply_offsets": offsets, "finish": finish})
    meta = dict(meta, shard=shard.index, prompts=[shard.start, shard.stop],
                replies=len(seqs), reply_tokens=int(offsets[-1]),
                finish={k: int((finish == v).sum()) for k, v in FINISH_CODES.items()},
                npz_bytes=(folder / f"{name}.npz").stat().st_size)
    _write_json(folder / f"{name}.json", meta)  # written last: its presence marks the shard done
    (folder / f"{name}.partial.jsonl").unlink(missing_ok=True)


def build_corpus(
    folder: str | os.PathLike,
    engine: ReplyEngine,
    shards: Sequence[int] | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    group_prompts: int | None = None,
) -> dict:
    """Answer the prompts of the corpus at ``folder`` shard by shard (``shards``: which ones and
    in which order, default all; finished ones are skipped). Consecutive shards are handed to
    the engine together until they hold ``group_prompts`` unanswered prompts (default: twice
    the engine's batch size), so a large GPU batch is not capped by the shard size. Stops
    cleanly after the batch that passes ``time_limit_s``. Returns counts of this run (replies,
    tokens, seconds, shards finished)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    manifest = read_manifest(folder)
    settings = DecodingSettings(**manifest["decoding"])
    prompts = load_prompts(folder)
    all_shards = shards_of(manifest)
    wanted = all_shards if shards is None else [all_shards[k] for k in shards]
    todo = [s for s in wanted if not shard_done(folder, s.index)]
    partials = {s.index: _read_partial(folder / f"{shard_name(s.index)}.partial.jsonl") for s in todo}
    missing = {s.index: [i for i in range(s.start, s.stop) if i not in partials[s.index]] for s in todo}
    remaining = sum(len(m) for m in missing.values())
    group_prompts = group_prompts or 2 * int(getattr(engine, "batch_size", 1))
    groups: list[list[Shard]] = []
    for shard in todo:
        if not groups or sum(len(missing[s.index]) for s in groups[-1]) >= group_prompts:
            groups.append([])
        groups[-1].append(shard)
    say = log or (lambda m: None)
    say(f"{len(wanted) - len(todo)} of {len(wanted)} shards already done; {remaining} replies to go")
    t0 = time.time()

    def out_of_time() -> bool:
        return time_limit_s is not None and time.time() - t0 > time_limit_s

    stats = {"replies": 0, "reply_tokens": 0, "shards_finished": [], "seconds": 0.0, "stopped_by_time": False}
    bar = tqdm(total=remaining, desc="corpus", unit="reply", disable=not progress, smoothing=0.05)
    try:
        for group in groups:
            if out_of_time():
                stats["stopped_by_time"] = True
                break
            owners = [(s.index, i) for s in group for i in missing[s.index]]
            journals = {s.index: open(folder / f"{shard_name(s.index)}.partial.jsonl", "a", encoding="utf-8")
                        for s in group}
            started = time.time()
            try:
                def on_reply(j: int, ids: list[int], finish: str) -> None:
                    k, i = owners[j]
                    partials[k][i] = (ids, finish)
                    journals[k].write(json.dumps({"i": i, "ids": ids, "finish": finish}) + "\n")
                    journals[k].flush()
                    stats["replies"] += 1
                    stats["reply_tokens"] += len(ids)
                    bar.update(1)

                engine.generate(
                    [prompts.ids[i] for _, i in owners], settings, seed=settings.seed * 100_003 + group[0].index,
                    on_reply=on_reply, should_stop=out_of_time,
                )
            finally:
                for journal in journals.values():
                    journal.close()
            seconds = time.time() - started
            for shard in group:
                done = partials[shard.index]
                if len(done) < shard.stop - shard.start:  # stopped by the time limit
                    stats["stopped_by_time"] = True
                    continue
                share = len(missing[shard.index]) / max(1, len(owners))  # this shard's part of the group's time
                _finish_shard(folder, manifest, shard, done, {
                    **engine.describe(), "machine": machine_description(),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "seconds_this_run": round(seconds * share, 1),
                    "resumed_replies": shard.stop - shard.start - len(missing[shard.index]),
                })
                stats["shards_finished"].append(shard.index)
                say(f"{shard_name(shard.index)} done: {len(missing[shard.index])} replies, "
                    f"{seconds * share:.0f} s")
            if stats["stopped_by_time"]:
                break
    finally:
        bar.close()
        stats["seconds"] = round(time.time() - t0, 1)
    return stats


# ============================================================================ reading
@dataclasses.dataclass
class CorpusExample:
    """One prompt and the target's reply, as token ids; ``key`` identifies the prompt."""

    key: str
    prompt_ids: list[int]
    reply_ids: list[int]
    finish: str

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.reply_ids

    @property
    def loss_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.reply_ids)


def finished_shards(folder: str | os.PathLike) -> list[int]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    return [s.index for s in shards_of(manifest) if shard_done(folder, s.index)]


def read_corpus(folder: str | os.PathLike, include_partial: bool = False) -> list[CorpusExample]:
    """The finished replies of a corpus in corpus order (with ``include_partial``, also the
    replies journalled in unfinished shards). Empty replies are left out."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    prompts = load_prompts(folder)
    out: list[CorpusExample] = []
    for shard in shards_of(manifest):
        name = shard_name(shard.index)
        if shard_done(folder, shard.index):
            with np.load(folder / f"{name}.npz") as z:
                replies = _unpack(z["reply_ids"], z["reply_offsets"])
                finish = z["finish"].tolist()
            items = [(shard.start + j, replies[j], FINISH_NAMES[int(finish[j])]) for j in range(len(replies))]
        elif include_partial:
            items = [(i, ids, f) for i, (ids, f) in sorted(_read_partial(folder / f"{name}.partial.jsonl").items())]
        else:
            continue
        for i, ids, f in items:
            if ids:
                out.append(CorpusExample(prompts.keys[i], prompts.ids[i], ids, f))
    return out


def corpus_status(folder: str | os.PathLike) -> dict:
    """Progress and storage figures: shards and replies done, tokens, bytes per stored token,
    and throughput per engine/machine (replies per hour) from the shards' own timings."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = shards_of(manifest)
    done = [s for s in shards if shard_done(folder, s.index)]
    metas = [json.loads((folder / f"{shard_name(s.index)}.json").read_text()) for s in done]
    reply_tokens = sum(m["reply_tokens"] for m in metas)
    prompt_tokens = 0
    if done:
        prompts = load_prompts(folder)
        prompt_tokens = sum(len(prompts.ids[i]) for s in done for i in range(s.start, s.stop))
    shard_bytes = sum(m["npz_bytes"] for m in metas)
    journalled = sum(len(_read_partial(p)) for p in sorted(folder.glob("shard-*.partial.jsonl")))
    by_engine: dict[str, dict] = {}
    for m in metas:
        label = f"{m.get('engine')} {m.get('dtype', '')} on {m.get('machine')}".strip()
        e = by_engine.setdefault(label, {"shards": 0, "replies": 0, "reply_tokens": 0, "seconds": 0.0})
        if m.get("resumed_replies", 0):
            continue  # a resumed shard's time covers only part of it
        e["shards"] += 1
        e["replies"] += m["replies"]
        e["reply_tokens"] += m["reply_tokens"]
        e["seconds"] += m["seconds_this_run"]
    for e in by_engine.values():
        if e["seconds"]:
            e["replies_per_hour"] = round(e["replies"] / e["seconds"] * 3600)
            e["reply_tokens_per_s"] = round(e["reply_tokens"] / e["seconds"], 1)
    finish = {k: sum(m["finish"][k] for m in metas) for k in FINISH_CODES}
    return {
        "folder": str(folder),
        "shards_done": len(done), "num_shards": len(shards),
        "replies_done": sum(m["replies"] for m in metas), "prompts": manifest["prompts"]["count"],
        "replies_journalled": journalled,
        "reply_tokens": reply_tokens, "prompt_tokens_of_done": prompt_tokens,
        "finish": finish,
        "bytes_per_reply_token": round(shard_bytes / reply_tokens, 3) if reply_tokens else None,
        "prompt_file_bytes_per_token": round((folder / PROMPTS).stat().st_size / manifest["prompts"]["tokens"], 3),
        "throughput": by_engine,
    }
