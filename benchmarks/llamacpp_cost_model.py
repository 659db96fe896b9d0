"""A cost model for larger GGUF targets on llama.cpp: verify curves of randomly initialised
Llama-shaped Q4_1 GGUF files, and the speedup they project with measured acceptance rates.

    python benchmarks/llamacpp_cost_model.py [--shapes smollm2-135m,1b,3b] [--repeats 10]
        [--prefix 300] [--ns 1,2,3,4,5,6,8,16,32] [--threads 2] [--quant Q4_1]
        [--pause-pid-file runs/logs/corpus.pid] [--prepare-only] [--json out.json]

What it does:

1. **Writes the models** (once; reused from ``--cache-dir``, default
   ``$PRISM_SPEC_CACHE/cost-model`` = ``~/.cache/prism-spec/cost-model``) with the ``gguf``
   package: Llama architecture, weights drawn from N(0, 0.02) and quantised with gguf's numpy
   quantisers in the default target's layout (every matrix Q4_1, or ``--quant``; the tied token
   embedding / LM head Q8_0; norms F32). The tokenizer is the default target's (``tokenizer.ggml.*``
   copied from its GGUF), padded with unused dummy tokens to larger vocabularies or cut (and its
   merges filtered) for smaller ones. Random weights cost what trained ones cost: the kernels
   do not look at the values. The packaged GGUF itself is measured alongside as a check.
   Rope scaling (Llama 3.2's ``llama3`` rope type) is left out: it does not change the cost.
2. **Measures each verify curve** the way ``../shared/docs/llamacpp-notes.md`` did, with the
   engine's context settings (``targets/llamacpp.py``: flash attention on, unified KV cache,
   embeddings on, 128 sequences, ``--threads`` threads): a ``--prefix``-token random prefix,
   then ``--repeats`` ``llama_decode`` calls of n new tokens with logits for every token for each
   n of ``--ns`` (interleaved: one round over all n per repeat), the n tokens removed from the
   KV cache (``llama_memory_seq_rm``) after each; the median per n.
3. **Measures a drafter step** two ways, at each target's width, after the same prefix:
   ``llama.cpp`` = a one-layer stand-in GGUF (the target's width and heads, a 16,384-row head
   like the packaged drafter's draft vocabulary; its FFN widened by 2h/3 so that it carries the
   weights of the drafter's fc (2h -> h) too), one-token ``llama_decode``: a drafter run by
   llama.cpp itself; ``torch`` = the same network in float32 PyTorch (fc, one decoder layer on
   a KV cache of the prefix, 16,384-row head; plain ``F.linear``, no rope), as the engine runs
   drafters today, without the runtime's Python around it.
4. **Projects the speedup** with a stated cost model. A chain of depth d costs
   ``d * c_draft + verify(d + 1)`` per round (``+ --round-overhead-ms``) and commits
   ``1 + sum_k prod_{j<=k} p_j`` tokens with per-step acceptance rates p_j; a 4/0/3 tree (three
   candidates for the next token, one drafter step) costs ``c_draft + verify(4)`` and commits
   ``1 + a3``. Speedup = (tokens / round time) / (1 / verify(1)). verify(n) between measured n
   is interpolated linearly. Acceptance scenarios (the 135M target's drafter, assumed to carry
   over to larger targets):

   - ``llama.cpp``: the packaged PRISM drafter on the llama.cpp engine, per-step rates from the
     chain:1/2/3 acceptance lengths of ``results/cpu/llamacpp_speed_intel.json``
     (p1 = AL1 - 1, p_k = (AL_k - AL_{k-1}) / (AL_{k-1} - AL_{k-2})), a3 from its 4/0/3 row;
   - ``pytorch``: the packaged drafter's held-out top-1 accuracy per draft step
     (``results/smollm2-135m/drafters/prism-ft2/train_log.jsonl``, last eval; unconditional
     accuracies taken as a chain's conditional rates, an approximation), a3 from the packaged drafter's 4/0/3 runs
     in ``results/smollm2-135m/bench-cpu-packaged-prism/results.json`` (formerly ``bench-cpu-s6``);
   - ``hypothetical``: drafters that accept, 0.80 / 0.75 / 0.70 / 0.65 / 0.60 (chain:4 AL 3.09),
     a3 = 1 - (1 - p1) * (the llama.cpp scenario's miss ratio (1 - a3) / (1 - p1)).

   Past the last given step the last rate holds.

Run it on an idle machine: with 2 threads, llama.cpp's OpenMP threads wait for each other, and
one core taken by another process makes decodes several times slower. Each model's timing
records how many cores other processes kept busy meanwhile (from /proc/stat) and warns above
0.2. ``--pause-pid-file`` stops a background job with SIGSTOP while timing and resumes it
afterwards, also on errors (a job that is stopped already is left alone).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prism_spec.bench.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
# Where the measured acceptance statistics live (first existing path; result folders get renamed).
LLAMACPP_SPEED = ("results/cpu/llamacpp_speed_intel.json",)
TRAIN_LOG = ("results/smollm2-135m/drafters/prism-ft2/train_log.jsonl",)
BENCH_4_0_3 = ("results/smollm2-135m/bench-cpu-packaged-prism/results.json",
               "results/smollm2-135m/bench-cpu-s6/results.json")
PACKAGED_METHOD = "prism-ft2"  # the packaged drafter's name in BENCH_4_0_3
HYPOTHETICAL = [0.80, 0.75, 0.70, 0.65, 0.60]
DRAFT_VOCAB = 16384  # the packaged drafter's draft_vocab_size
MAX_SEQUENCES = 128  # the engine's n_seq_max
FORMAT_VERSION = 1   # bump to rewrite cached files


@dataclass(frozen=True)
class Shape:
    name: str
    reference: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_base: float = 500000.0
    context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        """Weights, the tied embedding / LM head counted once."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.ffn + 2 * h
        return self.vocab * h + self.layers * layer + h

    def drafter(self) -> Shape:
        """The one-layer llama.cpp stand-in for a PRISM drafter step at this width: the draft
        vocabulary's head, and 2h/3 more FFN columns (3 * h * 2h/3 = 2h^2 weights: its fc)."""
        extra = round(2 * self.hidden / 3 / 32) * 32
        return Shape(f"{self.name}-drafter", f"1-layer drafter stand-in at {self.reference}'s width", self.hidden,
                     1, self.heads, self.kv_heads, self.ffn + extra, DRAFT_VOCAB, self.rope_base, self.context)


SHAPES = {
    "debug": Shape("debug", "tiny debug", 256, 2, 4, 2, 512, 4096, 100000.0),
    "smollm2-135m": Shape("smollm2-135m", "SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, 100000.0),
    "1b": Shape("1b", "Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256),
    "3b": Shape("3b", "Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256),
}
PACKAGED = "smollm2-135m-packaged"  # the default target's own GGUF, measured as a check


# --------------------------------------------------------------------------- writing
def cache_root(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("PRISM_SPEC_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "prism-spec") / "cost-model"


def tokenizer_fields(vocab: int):
    """The default target's tokenizer.ggml.* fields as (key, value, type, sub_type), resized to
    ``vocab`` tokens."""
    import gguf

    from prism_spec.targets.default import default_gguf_path

    reader = gguf.GGUFReader(str(default_gguf_path()))
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            fields[key] = [field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None]
    tokens, types = list(fields["tokenizer.ggml.tokens"][0]), list(fields["tokenizer.ggml.token_type"][0])
    if vocab >= len(tokens):
        pad = vocab - len(tokens)
        tokens += [f"<|prism_cost_model_pad_{i}|>" for i in range(pad)]
        types += [int(gguf.TokenType.UNUSED)] * pad
    else:
        tokens, types = tokens[:vocab], types[:vocab]
        kept = set(tokens)
        merges = [m for m in fields["tokenizer.ggml.merges"][0]
                  if len(m.split(" ")) == 2 and all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept]
        fields["tokenizer.ggml.merges"][0] = merges
        for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
            if f"tokenizer.ggml.{key}" in fields and fields[f"tokenizer.ggml.{key}"][0] >= vocab:
                del fields[f"tokenizer.ggml.{key}"]
    fields["tokenizer.ggml.tokens"][0] = tokens
    fields["tokenizer.ggml.token_type"][0] = types
    return [(k, v, t, s) for k, (v, t, s) in fields.items()]


QUANTS = ("Q4_1", "Q4_0", "Q8_0")  # the matrices' type; Q4_1 is the default target's


def tensor_list(shape: Shape, quant: str = "Q4_1"):
    """(name, rows, cols, type) in the default target's layout (``quant`` for the layers'
    matrices, Q8_0 for the tied embedding / head); cols = 0 for 1-D F32 norms."""
    import gguf

    Q = gguf.GGMLQuantizationType
    M = Q[quant]
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out = [("token_embd.weight", shape.vocab, h, Q.Q8_0)]
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", h, 0, Q.F32), (b + "ffn_down.weight", h, shape.ffn, M),
                (b + "ffn_gate.weight", shape.ffn, h, M), (b + "ffn_up.weight", shape.ffn, h, M),
                (b + "ffn_norm.weight", h, 0, Q.F32), (b + "attn_k.weight", kv, h, M),
                (b + "attn_output.weight", h, h, M), (b + "attn_q.weight", h, h, M),
                (b + "attn_v.weight", kv, h, M)]
    out.append(("output_norm.weight", h, 0, Q.F32))
    return out


def write_gguf(shape: Shape, folder: Path, quant: str = "Q4_1", seed: int = 0) -> tuple[Path, float, bool]:
    """The shape's GGUF file (written unless a complete one is there), seconds spent, and
    whether it was written now."""
    import gguf
    from gguf import quants

    path = folder / f"{shape.name}.{quant}.gguf"
    marker = path.with_suffix(".json")
    spec = {**asdict(shape), "format": FORMAT_VERSION, "seed": seed, "quant": quant}
    if path.exists() and marker.exists() and {"quant": "Q4_1", **json.loads(marker.read_text())} == spec:
        return path, 0.0, False
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(f"random {shape.reference} shape (prism-spec cost model)")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{quant}"]))
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub_type in tokenizer_fields(shape.vocab):
        writer.add_key_value(key, value, vtype, sub_type)
    tensors = tensor_list(shape, quant)
    for name, rows, cols, qtype in tensors:
        if cols == 0:
            writer.add_tensor_info(name, (rows,), np.dtype(np.float32), rows * 4)
        else:
            byte_shape = quants.quant_shape_to_byte_shape((rows, cols), qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, rows, cols, qtype in tensors:
        if cols == 0:
            writer.write_tensor_data(np.ones(rows, dtype=np.float32))
            continue
        data = np.empty(quants.quant_shape_to_byte_shape((rows, cols), qtype), dtype=np.uint8)
        chunk = max(1, (1 << 23) // cols)
        for r in range(0, rows, chunk):
            block = rng.standard_normal((min(chunk, rows - r), cols), dtype=np.float32)
            block *= 0.02
            data[r:r + block.shape[0]] = quants.quantize(block, qtype)
        writer.write_tensor_data(data)
    writer.close()
    os.replace(tmp, path)
    marker.write_text(json.dumps(spec))
    return path, time.perf_counter() - start, True


# --------------------------------------------------------------------------- llama.cpp timing
_SILENT_LOG = None


def llama_cpp_module():
    import llama_cpp

    global _SILENT_LOG
    if _SILENT_LOG is None and not os.environ.get("PRISM_LLAMA_LOG"):
        _SILENT_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


def measure_llamacpp(path: Path, ns: list[int], repeats: int, prefix: int, threads: int, n_ctx: int,
                     seed: int = 0) -> dict:
    """Median ms of one llama_decode of n new tokens (logits for each) after ``prefix`` tokens,
    with the engine's context settings; plus load and prefill seconds."""
    llama_cpp = llama_cpp_module()
    start = time.perf_counter()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = min(n_ctx, 512)
    params.n_seq_max = MAX_SEQUENCES
    params.n_threads = params.n_threads_batch = threads
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
    params.kv_unified = True
    params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED, as the engine
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for {path}")
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(int(params.n_batch), 0, 1)
    load_s = time.perf_counter() - start

    def decode(tokens, first_pos, all_logits):
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = first_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = int(all_logits or i == len(tokens) - 1)
        status = llama_cpp.llama_decode(ctx, batch)
        llama_cpp.llama_synchronize(ctx)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    rng = np.random.default_rng(seed)
    try:
        start = time.perf_counter()
        prompt = rng.integers(3, vocab, prefix)
        for piece in range(0, prefix, int(params.n_batch)):
            decode(prompt[piece:piece + int(params.n_batch)], piece, False)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        share = CpuShare()
        times = {n: [] for n in ns}
        for rep in range(repeats + 1):  # the first pass warms up and is dropped
            order = ns if rep % 2 == 0 else ns[::-1]
            for n in order:
                tokens = rng.integers(3, vocab, n)
                t0 = time.perf_counter()
                decode(tokens, prefix, True)
                elapsed = time.perf_counter() - t0
                llama_cpp.llama_memory_seq_rm(memory, 0, prefix, -1)
                if rep:
                    times[n].append(elapsed * 1e3)
        measure_s = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"ms": {n: statistics.median(v) for n, v in times.items()},
            "spread_ms": {n: [min(v), max(v)] for n, v in times.items()},
            "load_s": load_s, "prefill_s": prefill_s, "measure_s": measure_s, "vocab": vocab,
            "contention": share.result()}


class CpuShare:
    """How many cores other processes kept busy (and the hypervisor stole) while timing, from
    /proc/stat minus this process's own CPU time: a clean run shows about 0."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        own = os.times()
        return time.perf_counter(), user + nice + system + irq + softirq, steal, own.user + own.system

    def result(self) -> dict:
        end = self._sample()
        if self.start is None or end is None:
            return {}
        hz = os.sysconf("SC_CLK_TCK")
        wall = end[0] - self.start[0]
        busy = (end[1] - self.start[1]) / hz
        own = end[3] - self.start[3]
        return {"other_cores": max(0.0, (busy - own) / wall), "steal_cores": (end[2] - self.start[2]) / hz / wall}


# --------------------------------------------------------------------------- torch drafter step
def measure_torch_drafter(shape: Shape, prefix: int, repeats: int, threads: int) -> float:
    """Median ms of one PRISM drafter step at the shape's width in float32 PyTorch: fc (2h -> h),
    one Llama decoder layer attending to a (prefix + 1)-entry KV cache, final norm, a
    DRAFT_VOCAB-row head. Plain F.linear (no oneDNN prepacking), no rope."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h, hd, kvh, heads = shape.hidden, shape.head_dim, shape.kv_heads, shape.heads

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) * 0.02

    fc, q, k, v, o = w(h, 2 * h), w(h, h), w(kvh * hd, h), w(kvh * hd, h), w(h, h)
    gate, up, down, head = w(shape.ffn, h), w(shape.ffn, h), w(h, shape.ffn), w(DRAFT_VOCAB, h)
    k_cache = torch.randn(1, kvh, prefix + 1, hd, generator=g)
    v_cache = torch.randn(1, kvh, prefix + 1, hd, generator=g)
    x_in = torch.randn(1, 1, 2 * h, generator=g)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def step():
        x = F.linear(x_in, fc)
        y = rms(x)
        qq = F.linear(y, q).view(1, 1, heads, hd).transpose(1, 2)
        k_cache[:, :, -1:] = F.linear(y, k).view(1, 1, kvh, hd).transpose(1, 2)
        v_cache[:, :, -1:] = F.linear(y, v).view(1, 1, kvh, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(qq, k_cache, v_cache, enable_gqa=True)
        x = x + F.linear(a.transpose(1, 2).reshape(1, 1, h), o)
        y = rms(x)
        x = x + F.linear(F.silu(F.linear(y, gate)) * F.linear(y, up), down)
        return F.linear(rms(x), head)

    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            step()
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------- acceptance and projection
def source(candidates: tuple[str, ...]) -> Path:
    for candidate in candidates:
        if (REPO / candidate).exists():
            return REPO / candidate
    raise FileNotFoundError(f"none of {', '.join(candidates)} exists: the acceptance statistics moved?")


def acceptance_scenarios() -> list[dict]:
    """Per-step chain acceptance rates and the 4/0/3 first-level acceptance, with sources."""
    speed_file, log_file, bench_file = (source(c) for c in (LLAMACPP_SPEED, TRAIN_LOG, BENCH_4_0_3))
    rows = {r["method"]: r for r in json.loads(speed_file.read_text())["rows"]}
    als = [1.0] + [rows[f"prism chain:{d}"]["acceptance_length"] for d in (1, 2, 3)]
    gains = [als[i] - als[i - 1] for i in range(1, len(als))]  # P(first k drafts accepted)
    llama_rates = [gains[0]] + [gains[i] / gains[i - 1] for i in range(1, len(gains))]
    llama_a3 = rows["prism 4/0/3"]["acceptance_length"] - 1
    miss_ratio = (1 - llama_a3) / (1 - llama_rates[0])

    evals = [json.loads(line) for line in log_file.read_text().splitlines() if '"split": "eval"' in line]
    metrics = evals[-1]["metrics"]
    torch_rates = [metrics[f"correct_step{k}"] / metrics[f"count_step{k}"] for k in (1, 2, 3)]
    reached = accepted = 0
    for agg in json.loads(bench_file.read_text())["aggregates"]:
        if agg["method"] == PACKAGED_METHOD:
            for s in agg["step_acceptance"]:
                if s["step"] == 1:
                    reached, accepted = reached + s["reached"], accepted + s["accepted"]
    torch_a3 = accepted / reached

    def rel(path: Path) -> str:
        return str(path.relative_to(REPO))
    return [
        {"name": "llama.cpp", "rates": llama_rates, "a3": llama_a3,
         "source": f"measured: packaged PRISM drafter on the llama.cpp engine, chain:1-3 and 4/0/3 ALs of {rel(speed_file)}"},
        {"name": "pytorch", "rates": torch_rates, "a3": torch_a3,
         "source": f"measured: packaged drafter's held-out top-1 accuracy per step ({rel(log_file)}, last eval); "
                   f"4/0/3 step-1 acceptance of {PACKAGED_METHOD} in {rel(bench_file)}"},
        {"name": "hypothetical", "rates": HYPOTHETICAL, "a3": 1 - (1 - HYPOTHETICAL[0]) * miss_ratio,
         "source": "hypothetical 'drafters that accept' (chain:4 AL 3.09); a3 from the llama.cpp scenario's miss ratio"},
    ]


def chain_al(rates: list[float], depth: int) -> float:
    al, run = 1.0, 1.0
    for k in range(depth):
        run *= rates[min(k, len(rates) - 1)]
        al += run
    return al


def interpolate(curve: dict[int, float], n: int) -> float:
    points = sorted(curve)
    if n in curve:
        return curve[n]
    if n > points[-1]:
        raise ValueError(f"verify({n}) is past the measured curve (up to {points[-1]})")
    lo = max(p for p in points if p < n)
    hi = min(p for p in points if p > n)
    return curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo)


def project(curve: dict[int, float], c_draft: float, scenario: dict, overhead: float, max_depth: int) -> dict:
    v1 = curve[1]
    chains = []
    for d in range(1, max_depth + 1):
        al = chain_al(scenario["rates"], d)
        round_ms = d * c_draft + interpolate(curve, d + 1) + overhead
        chains.append({"depth": d, "al": al, "round_ms": round_ms, "speedup": al / round_ms * v1})
    best = max(chains, key=lambda c: c["speedup"])
    al3 = 1 + scenario["a3"]
    round3 = c_draft + interpolate(curve, 4) + overhead
    return {"chains": chains, "best_chain": best,
            "tree_4_0_3": {"al": al3, "round_ms": round3, "speedup": al3 / round3 * v1}}


# --------------------------------------------------------------------------- pausing a background job
class Pause:
    """SIGSTOP a background process (pid from a file) while timing; SIGCONT on exit, errors and
    SIGINT / SIGTERM included."""

    def __init__(self, pid_file: str | None):
        self.pid = None
        if pid_file and Path(pid_file).exists():
            text = Path(pid_file).read_text().strip()
            self.pid = int(text) if text.isdigit() else None
        self.stopped = False
        if self.pid:
            atexit.register(self.resume)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.resume()
        raise SystemExit(128 + signum)

    def stop(self):
        if self.pid and not self.stopped:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "?"
            if state in ("T", "t"):  # paused by someone else: leave it to them
                print(f"[pid {self.pid} is already stopped: not touching it]", flush=True)
                return
            try:
                os.kill(self.pid, signal.SIGSTOP)
                self.stopped = True
                print(f"[paused pid {self.pid}]", flush=True)
            except ProcessLookupError:
                self.pid = None

    def resume(self):
        if self.pid and self.stopped:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped = False
            print(f"[resumed pid {self.pid}]", flush=True)


# --------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    ns = result["settings"]["ns"]
    show = [n for n in ns if n in (1, 2, 4, 8, 16, 32)] or ns
    lines = ["| model | params (M) | GGUF MB | " + " | ".join(f"verify({n}) ms" for n in show)
             + " | +1 token / verify(1) | avg extra token 1→8 / verify(1) |",
             "|---|--:|--:|" + "--:|" * len(show) + "--:|--:|"]
    for m in result["models"]:
        c = {int(k): v for k, v in m["verify_ms"].items()}
        v1 = c[1]
        extra8 = (interpolate(c, 8) - v1) / 7 / v1 if max(c) >= 8 else float("nan")
        lines.append(f"| {m['label']} | {m['params'] / 1e6:.0f} | {m['gguf_mb']:.0f} | "
                     + " | ".join(f"{c[n]:.1f}" for n in show)
                     + f" | {(interpolate(c, 2) - v1) / v1:.2f} | {extra8:.2f} |")
    lines += ["", "| model | drafter step (ms) | as fraction of verify(1) | AL to break even: chain:1 | chain:3 | 4/0/3 |",
              "|---|---|---|--:|--:|--:|"]
    for m in result["models"]:
        c = {int(k): v for k, v in m["verify_ms"].items()}
        for name, ms in (m.get("drafter_ms") or {}).items():
            even = [(d * ms + interpolate(c, d + 1)) / c[1] for d in (1, 3)] + [(ms + interpolate(c, 4)) / c[1]]
            lines.append(f"| {m['label']} | {name}: {ms:.2f} | {ms / c[1]:.2f} | "
                         + " | ".join(f"{e:.2f}" for e in even) + " |")
    lines += ["", "| model | acceptance | drafter | best chain (AL) | its speedup | chain:1 | 4/0/3 (AL) | 4/0/3 speedup |",
              "|---|---|---|---|--:|--:|---|--:|"]
    for m in result["models"]:
        for p in m.get("projections", []):
            b, t = p["best_chain"], p["tree_4_0_3"]
            lines.append(f"| {m['label']} | {p['acceptance']} | {p['drafter']} ({p['c_draft_ms']:.1f} ms) | "
                         f"chain:{b['depth']} ({b['al']:.2f}) | {b['speedup']:.2f}x | {p['chains'][0]['speedup']:.2f}x | "
                         f"({t['al']:.2f}) | {t['speedup']:.2f}x |")
    lines += ["", "Acceptance scenarios:"]
    for s in result["acceptance"]:
        lines.append(f"- {s['name']}: per-step {' / '.join(f'{r:.3f}' for r in s['rates'])}, "
                     f"4/0/3 first level {s['a3']:.3f} ({s['source']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,1b,3b",
                        help=f"comma-separated, of {', '.join(SHAPES)}; '{PACKAGED}' (the default target's own "
                             "GGUF) is measured too unless --no-packaged")
    parser.add_argument("--no-packaged", action="store_true")
    parser.add_argument("--ns", default="1,2,3,4,5,6,8,16,32", help="verify sizes (must include 1, 2 and 4)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefix", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=8192, help="context cells (the engine: the model's max context)")
    parser.add_argument("--drafters", default="llama.cpp,torch", help="drafter step costs to measure and project with")
    parser.add_argument("--round-overhead-ms", type=float, default=0.0,
                        help="fixed cost per speculative round added to the model (runtime, tree, acceptance)")
    parser.add_argument("--quant", default="Q4_1", choices=QUANTS,
                        help="type of the layers' matrices (the default target's: Q4_1); the head stays Q8_0")
    parser.add_argument("--cache-dir", help="where the GGUF files go (default $PRISM_SPEC_CACHE/cost-model)")
    parser.add_argument("--prepare-only", action="store_true", help="write the GGUF files and stop")
    parser.add_argument("--pause-pid-file", help="SIGSTOP this pid while timing, SIGCONT afterwards")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    names = [s for s in args.shapes.split(",") if s]
    for name in names:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}: use {', '.join(SHAPES)}")
    ns = sorted({int(n) for n in args.ns.split(",")})
    if not {1, 2, 4} <= set(ns):
        parser.error("--ns must include 1, 2 and 4")
    drafters = [d for d in args.drafters.split(",") if d]
    folder = cache_root(args.cache_dir)
    phases: dict[str, float] = {}
    wall = time.perf_counter()

    # 1. the files
    files = {}
    for name in names:
        for shape in (SHAPES[name], SHAPES[name].drafter()):
            if shape.name.endswith("-drafter") and "llama.cpp" not in drafters:
                continue
            path, seconds, written = write_gguf(shape, folder, args.quant)
            files[shape.name] = path
            phases[f"write {shape.name}"] = seconds
            print(f"{'wrote' if written else 'reused'} {path} ({path.stat().st_size / 1e6:.0f} MB"
                  + (f", {seconds:.0f} s)" if written else ")"), flush=True)
    if args.prepare_only:
        return 0

    scenarios = acceptance_scenarios()
    from prism_spec.targets.default import default_gguf_path

    targets = ([(PACKAGED, "SmolLM2-135M (packaged GGUF)", default_gguf_path(), SHAPES["smollm2-135m"])]
               if not args.no_packaged else [])
    targets += [(n, f"{SHAPES[n].reference} shape (random{'' if args.quant == 'Q4_1' else ', ' + args.quant})",
                 files[n], SHAPES[n]) for n in names]
    pause = Pause(args.pause_pid_file)
    models = []
    try:
        pause.stop()
        for key, label, path, shape in targets:
            start = time.perf_counter()
            m = measure_llamacpp(path, ns, args.repeats, args.prefix, args.threads, args.n_ctx)
            curve = m["ms"]
            row = {"model": key, "label": label, "path": str(path), "gguf_mb": path.stat().st_size / 1e6,
                   "params": shape.params, "shape": asdict(shape), "verify_ms": curve, "spread_ms": m["spread_ms"],
                   "load_s": m["load_s"], "prefill_s": m["prefill_s"], "measure_s": m["measure_s"],
                   "contention": m["contention"]}
            busy = m["contention"]
            print(f"{label}: verify " + " ".join(f"{n}:{curve[n]:.1f}" for n in ns)
                  + f" ms (load {m['load_s']:.1f} s, prefill {m['prefill_s']:.1f} s, timing {m['measure_s']:.0f} s"
                  + (f"; other processes {busy['other_cores']:.2f} cores, steal {busy['steal_cores']:.2f}" if busy else "")
                  + ")", flush=True)
            if busy and busy["other_cores"] > 0.2:
                print(f"  warning: other processes kept {busy['other_cores']:.2f} cores busy while timing: "
                      "these numbers are not an idle machine's", flush=True)
            if key != PACKAGED:
                d_ms = {}
                if "llama.cpp" in drafters:
                    dm = measure_llamacpp(files[shape.drafter().name], [1], max(args.repeats, 20), args.prefix,
                                          args.threads, args.n_ctx)
                    d_ms["llama.cpp"] = dm["ms"][1]
                if "torch" in drafters:
                    d_ms["torch"] = measure_torch_drafter(shape, args.prefix, max(args.repeats, 20), args.threads)
                row["drafter_ms"] = d_ms
                print("  drafter step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in d_ms.items()), flush=True)
                row["projections"] = [
                    {"acceptance": s["name"], "drafter": d, "c_draft_ms": c,
                     **project(curve, c, s, args.round_overhead_ms, min(15, max(ns) - 1))}
                    for s in scenarios for d, c in d_ms.items()]
            phases[f"measure {key}"] = time.perf_counter() - start
            models.append(row)
    finally:
        pause.resume()

    result = {"settings": {**vars(args), "ns": ns}, "cpu": cpu_name(), "python": platform.python_version(),
              "llama_cpp_python": __import__("llama_cpp").__version__, "gguf": _gguf_version(),
              "date": str(datetime.date.today()), "cache_dir": str(folder),
              "cost_model": "chain depth d: round = d * c_draft + verify(d + 1) + overhead, tokens = 1 + "
                            "sum_k prod_{j<=k} p_j; 4/0/3: round = c_draft + verify(4) + overhead, tokens = 1 + a3; "
                            "speedup = tokens / round * verify(1)",
              "acceptance": scenarios, "models": models, "phases_s": phases,
              "total_s": time.perf_counter() - wall}
    result["markdown"] = markdown(result)
    print()
    print(result["markdown"])
    print("\nphases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except ImportError:  # pragma: no cover
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
