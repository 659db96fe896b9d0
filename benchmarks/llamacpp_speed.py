"""GGUF targets on llama.cpp: llama.cpp's own plain decoding against prism-spec's vanilla and
speculative decoding on its llama.cpp engine, interleaved per prompt in one process.

    python benchmarks/llamacpp_speed.py [--prompts 2] [--max-new-tokens 96] [--trees chain:1,chain:2,4/0/3]
        [--threads 2] [--quant Q4_0] [--drafter-weights float,packed,int8] [--json out.json]

Prompts: the first turns of ``--prompts`` questions per benchmark, chat template. Every method
decodes greedily (T=0). "llama.cpp plain" is llama-cpp-python's ``Llama.generate`` on the same
GGUF with the engine's settings (flash attention on, same threads). Tokens/s are new tokens
over the whole generate call (prefill included), summed over the prompts; "identical" counts
prompts whose output equals llama.cpp plain's token for token. Run it on an idle machine.

``--quant Q4_0`` (or another llama.cpp type) runs the default target re-quantised from its
shipped Q4_1 by llama.cpp's quantiser (written once to the cache), with the float32 model as
the drafters' companion as usual: Q4_0 weights take llama.cpp's repacked matrix kernels on x86,
whose verify curve is flatter (docs/llamacpp.md). Outputs then are that model's own.

``--drafter-weights float,packed,int8`` runs every tree with each kind of drafter weights
(float32 as loaded, oneDNN-prepacked: ``Drafter.pack_weights``, int8: ``Drafter.use_int8_weights``),
as separate methods of the same interleaved run.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_rows
from prism_spec.bench.datasets import BENCHMARKS, conversation_prompt, load_benchmark
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets.default import DEFAULT_TARGET, cache_dir, default_gguf_path, default_target_path
from prism_spec.targets.llamacpp import KV_TYPES, REQUANTIZE_TYPES, load_llamacpp_target, plain_greedy, plain_llama, requantize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="questions per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trees", default="chain:1,chain:2,4/0/3")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", choices=sorted(REQUANTIZE_TYPES),
                        help="re-quantise the default target to this type first (default: the GGUF as shipped)")
    parser.add_argument("--drafter-weights", default="float", help="comma-separated: float, packed, int8")
    parser.add_argument("--kv-type", choices=sorted(KV_TYPES), default="f16",
                        help="the KV cache type of both llama.cpp plain and the engine (q8_0: row-invariant attention)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quant:
        path = cache_dir() / "requantized" / f"{default_gguf_path().stem}.as-{args.quant}.gguf"
        if not path.is_file():
            requantize(default_gguf_path(), path, args.quant, threads=args.threads)
        print(f"target: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        path = default_gguf_path()
    # The default target's name: the same model, so --drafter auto finds its packaged drafter.
    engine = load_llamacpp_target(path, default_target_path(), threads=args.threads, name=DEFAULT_TARGET,
                                  kv_type=args.kv_type)
    kinds = args.drafter_weights.split(",")
    drafters, label = {}, None
    for kind in kinds:  # one copy per kind: packing and int8 change the drafter in place
        resolved = resolve_drafter(args.drafter, engine, "float" if kind == "packed" else kind)
        if kind == "packed" and not resolved.drafter.pack_weights():
            raise SystemExit("this drafter or machine has no prepacked weights")
        drafters[kind] = resolved.drafter
        label = label if kind != kinds[0] else resolved.label
    plain = plain_llama(engine)
    prompts = [conversation_prompt(engine, q.turns[:1], [])
               for name in BENCHMARKS for q in load_benchmark(name).questions[: args.prompts]]
    methods = ["llama.cpp plain", "prism vanilla"] + [f"prism {t}" + ("" if kind == "float" else f" {kind}")
                                                       for t in args.trees.split(",") for kind in kinds]
    totals = {m: {"tokens": 0, "seconds": 0.0, "identical": 0, "rounds": 0, "accepted": 0} for m in methods}

    for prompt in prompts:
        start = time.perf_counter()
        reference = plain_greedy(plain, prompt, args.max_new_tokens, engine.eos_token_ids)
        totals["llama.cpp plain"]["seconds"] += time.perf_counter() - start
        totals["llama.cpp plain"]["tokens"] += len(reference)
        totals["llama.cpp plain"]["identical"] += 1
        for method in methods[1:]:
            tree, _, kind = method.removeprefix("prism ").partition(" ")
            config = GenerationConfig(max_new_tokens=args.max_new_tokens)
            options = DecodeOptions(TreeConfig.parse(tree if tree != "vanilla" else "chain:1"))
            start = time.perf_counter()
            result = generate(engine, prompt, None if tree == "vanilla" else drafters[kind or "float"], config, options)
            row = totals[method]
            row["seconds"] += time.perf_counter() - start
            row["tokens"] += len(result.token_ids)
            row["identical"] += result.token_ids == reference
            row["rounds"] += result.rounds
            row["accepted"] += sum(result.accepted)

    base = totals["llama.cpp plain"]["tokens"] / totals["llama.cpp plain"]["seconds"]
    rows = []
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.threads} threads, drafter: {label}")
    print(f"{'method':24s} {'tokens/s':>9s} {'vs plain':>9s} {'AL':>5s} {'identical':>10s}")
    for method, row in totals.items():
        speed = row["tokens"] / row["seconds"]
        al = (row["accepted"] + row["rounds"]) / row["rounds"] if row["rounds"] else float("nan")
        rows.append({"method": method, "tokens_per_s": round(speed, 2), "vs_llama_cpp_plain": round(speed / base, 3),
                     "acceptance_length": round(al, 3), "identical_to_plain": row["identical"], "prompts": len(prompts)})
        print(f"{method:24s} {speed:9.1f} {speed / base:9.3f} {al:5.2f} {row['identical']:>5d}/{len(prompts)}")
    write_rows(args.json, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
