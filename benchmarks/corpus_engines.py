"""Reply tokens per second of `prism corpus build`'s engines on the same corpus prompts.

    python benchmarks/corpus_engines.py [--corpus results/smollm2-135m/corpus] [--prompts 64]
        [--max-new-tokens 128] [--llama-cpp-batches 1,8,16,32] [--torch-batches 48] [--torch-dtypes float32] \\
        [--threads 2] [--json out.json]

Each engine answers the same ``--prompts`` prompts (the first ones of the corpus's last shard,
greedy, ``--max-new-tokens``) through its ``generate``; tokens/s is reply tokens over wall time.
"llama.cpp" is the GGUF model with continuous batching (train.corpus.engines.LlamaCppEngine);
"transformers" is the model in each of ``--torch-dtypes`` with left-padded batches
(train.corpus.engines.HFEngine; bfloat16 pays on CPUs with bf16 instructions). Run it on an idle
machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_rows
from prism_spec.targets import load_target
from prism_spec.train.corpus.engines import HFEngine, LlamaCppEngine
from prism_spec.train.corpus.prompts import load_prompts
from prism_spec.train.corpus.store import DecodingSettings, read_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="results/smollm2-135m/corpus")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--llama-cpp-batches", default="1,8,16,32")
    parser.add_argument("--torch-batches", default="48")
    parser.add_argument("--torch-dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.corpus)
    last = (manifest["num_shards"] - 1) * manifest["shard_size"]
    prompts = load_prompts(args.corpus).ids[last:last + args.prompts]
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    engines = []
    if args.llama_cpp_batches:
        gguf = load_target(engine="llama.cpp", threads=args.threads)
        engines += [(f"llama.cpp batch {b}", lambda b=b: LlamaCppEngine(gguf.gguf_path, gguf.eos_token_ids, int(b),
                                                                         args.threads))
                    for b in args.llama_cpp_batches.split(",") if b]
    for dtype in args.torch_dtypes.split(",") if args.torch_batches else []:
        torch_target = load_target(dtype=dtype)
        engines += [(f"transformers {dtype} batch {b}", lambda b=b, t=torch_target: HFEngine(t, int(b)))
                    for b in args.torch_batches.split(",")]
    rows = []
    print(f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, greedy, {args.threads} threads")
    for name, make in engines:
        engine, replies = make(), {}
        start = time.perf_counter()
        engine.generate(prompts, settings, 0, lambda i, ids, finish: replies.__setitem__(i, ids))
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in replies.values())
        rows.append({"engine": name, "replies": len(replies), "reply_tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1)})
        print(f"{name:32s} {tokens:6d} tokens {seconds:7.1f} s {tokens / seconds:7.1f} tok/s", flush=True)
    if args.json:
        write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
