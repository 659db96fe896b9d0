"""Vanilla vs speculative decoding speed on a GPU (also runs on a CPU, for checking).

    python benchmarks/gpu_speed.py smoke   [--device cuda] [--json smoke.json]
    python benchmarks/gpu_speed.py default [--drafter auto ...] [--json default.json]
    python benchmarks/gpu_speed.py shape7b [--json shape7b.json]
    python benchmarks/gpu_speed.py report  --default default.json --shape7b shape7b.json

smoke    a tiny random Llama target and a random PRISM drafter in float32: speculative output
         (eager, static cache, CUDA graphs; greedy) must equal vanilla greedy token for token.
default  the default target (SmolLM2-135M-Instruct) with trained drafters on benchmark prompts,
         batch 1, T=0: tokens/s of vanilla and speculative decoding under three runtimes
         (eager + dynamic cache, static cache, static cache + CUDA graphs), speedups as ratios
         of the same run, acceptance length (AL) per tree shape, outputs checked against vanilla.
shape7b  a randomly initialised Llama of LLaMA-2-7B's shape (bf16) and a random PRISM drafter of
         the same width: target forward latency against the number of verified tokens, the
         drafter's per-step cost, and the measured wall time of whole speculative rounds per
         tree shape through the real decode loop. Random weights accept nothing, so these give
         cost only; ``report`` turns them into tokens/s using acceptance lengths *measured on
         the default target* (stated as such in its table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from prism_spec.bench.datasets import conversation_prompt, load_benchmarks
from prism_spec.bench.machine import machine_info
from prism_spec.devices import median_seconds, synchronize
from prism_spec.drafters.feature import FeatureDrafter, FeatureDrafterModel, prism_config
from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, generate
from prism_spec.runtime.autotune import measure_draft_cost
from prism_spec.runtime.tree import TreeConfig
from prism_spec.targets import load_target
from prism_spec.targets.hf import Target
from prism_spec.targets.kv_cache import StaticKV

MODES = ("eager", "static", "graphs")
TREES = ("paper", "serving", "cpu", "chain:3", "24/4/4")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def set_mode(target: Target, mode: str) -> bool:
    """Switch the target's runtime; returns the matching DecodeOptions.static_cache."""
    if mode == "graphs":
        if target.device.type != "cuda":
            raise ValueError("graphs mode needs a CUDA device")
        target.use_cuda_graphs()
    else:
        target.use_cuda_graphs(False)
    return mode != "eager"


def random_llama(shape: dict, device, dtype) -> Target:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return Target(model.to(device=device, dtype=dtype), None, name=f"random-llama-{shape['hidden_size']}")


def random_prism(target: Target, seed: int = 0) -> FeatureDrafter:
    torch.manual_seed(seed)
    return FeatureDrafter(FeatureDrafterModel(prism_config(target), target))


def run_one(target, ids, drafter, tree, max_new_tokens, static):
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_on_eos=False)
    res = generate(target, ids, drafter, cfg, DecodeOptions(tree, static_cache=static))
    synchronize(target.device)
    return res


def summarise(results) -> dict:
    tokens = sum(len(r.token_ids) for r in results)
    seconds = sum(r.total_s for r in results)
    decode_s = sum(r.total_s - r.prefill_s for r in results)
    rounds = sum(r.rounds for r in results)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "decode_tokens_per_s": (tokens - len(results)) / decode_s if decode_s else 0.0,
        "rounds": rounds,
        "al": (sum(sum(r.accepted) for r in results) + rounds) / rounds if rounds else 0.0,
        "round_ms": 1e3 * decode_s / rounds if rounds else 0.0,
        "draft_ms_per_round": 1e3 * sum(r.draft_s for r in results) / rounds if rounds else 0.0,
        "verify_ms_per_round": 1e3 * sum(r.verify_s for r in results) / rounds if rounds else 0.0,
    }


def speed_table(target, prompts, methods: dict, trees, modes, max_new_tokens, repeats=1) -> dict:
    """Every (mode, method, tree) over every prompt; methods interleaved per prompt so drift
    hits all alike. Returns {mode: {label: summary}} with `same_as_vanilla` counts."""
    out = {}
    for mode in modes:
        static = set_mode(target, mode)
        rows = {}
        plan = [("vanilla", None, TreeConfig.parse("cpu"))] + [
            (f"{label} {tree}", drafter, TreeConfig.parse(tree)) for label, drafter in methods.items() for tree in trees
        ]
        # Warm-up (graph capture, allocator, kernels' first use), untimed.
        for _, drafter, tree in plan:
            run_one(target, prompts[0], drafter, tree, 16, static)
        results = {name: [] for name, _, _ in plan}
        for _ in range(repeats):
            for ids in prompts:
                for name, drafter, tree in plan:
                    results[name].append(run_one(target, ids, drafter, tree, max_new_tokens, static))
        vanilla = results["vanilla"]
        base = summarise(vanilla)
        for name, _, _ in plan:
            row = summarise(results[name])
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
            row["same_as_vanilla"] = sum(a.token_ids == b.token_ids for a, b in zip(results[name], vanilla))
            row["runs"] = len(results[name])
            rows[name] = row
            log(f"[{mode}] {name:28s} {row['tokens_per_s']:8.1f} tok/s  x{row['speedup']:.2f}  "
                f"AL {row['al']:.2f}  round {row['round_ms']:.2f} ms  same {row['same_as_vanilla']}/{row['runs']}")
        stats = target.cuda_graph_stats
        if stats is not None:
            rows["_graph_captures"] = stats["captures"]
            rows["_graph_failures"] = stats["uncapturable"]
            for label, drafter in methods.items():
                drafter_stats = getattr(drafter, "cuda_graph_stats", None)
                if drafter_stats is not None:
                    rows[f"_{label}_graph_captures"] = drafter_stats["captures"]
                    rows[f"_{label}_graph_failures"] = drafter_stats["uncapturable"]
        out[mode] = rows
    target.use_cuda_graphs(False)
    return out


def available_modes(device, wanted):
    modes = [m for m in wanted if m != "graphs" or torch.device(device).type == "cuda"]
    return modes


# ----------------------------------------------------------------------------- sections
def section_smoke(args) -> dict:
    torch.manual_seed(0)
    target = random_llama(TINY, args.device, torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (5, 40, 200)]
    # A random drafter accepts nothing; the target's own layers accept almost everything, so
    # multi-token acceptance and cache compaction are exercised too.
    methods = {"prism": random_prism(target), "self": resolve_drafter(f"layers:{TINY['num_hidden_layers']}", target).drafter}
    table = speed_table(target, prompts, methods, ("paper", "cpu", "chain:3"), available_modes(args.device, MODES), 48)
    # Speculative greedy must reproduce vanilla greedy in every mode, and modes must agree.
    ok = all(row["same_as_vanilla"] == row["runs"] for rows in table.values()
             for name, row in rows.items() if not name.startswith("_"))
    return {"ok": ok, "table": table}


def bench_prompts(target, n_per_bench: int, benches=None) -> list[list[int]]:
    prompts = []
    for bench in load_benchmarks(benches, limit=n_per_bench):
        for q in bench.questions:
            prompts.append(conversation_prompt(target, q.turns[:1], []))
    return prompts


def section_default(args) -> dict:
    target = load_target(args.target, dtype=args.dtype, device=args.device)
    methods = {}
    for spec in args.drafter:
        label, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        resolved = resolve_drafter(path, target)
        methods[label or path] = resolved.drafter
        log(f"drafter {label or path}: {resolved.label}")
    prompts = bench_prompts(target, args.prompts_per_bench)
    result = {"target": args.target, "dtype": args.dtype, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "table": {}}
    for mode in available_modes(args.device, args.modes):
        result["table"].update(speed_table(target, prompts, methods, args.trees, [mode], args.max_new_tokens))
        save_partial(args, result)
    return result


def verify_curve(target, sizes, prefix, mode, repeats) -> dict[int, float]:
    """Seconds of one forward over n new tokens (causal) after a ``prefix``-token static cache."""
    set_mode(target, mode)
    kv = StaticKV(target.static_caches, 1, prefix + max(sizes) + 256, target.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (1, prefix), generator=gen).to(target.device)
    target.forward(ids, torch.arange(prefix, device=target.device)[None], kv.cache, None, kv.lengths)
    kv.commit([torch.arange(prefix, device=target.device)])
    out = {}
    for n in sizes:
        tokens = torch.randint(0, target.vocab_size, (1, n), generator=gen).to(target.device)
        positions = torch.arange(prefix, prefix + n, device=target.device)[None]
        causal = torch.ones(n, n, dtype=torch.bool, device=target.device).tril()[None]  # a chain "tree"

        def run():
            target.forward(tokens, positions, kv.cache, causal, kv.lengths)
            kv.rollback()

        run()  # capture (graphs) outside the timing
        out[n] = median_seconds(run, repeats, target.device)
    target.use_cuda_graphs(False)
    return out


def save_partial(args, result: dict) -> None:
    """Write what is measured so far (a run cut short by a time limit keeps it)."""
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**result, "partial": True}, indent=1, default=str))


def section_shape7b(args) -> dict:
    shape = dict(LLAMA_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    target = random_llama(shape, args.device, torch.bfloat16)
    synchronize(args.device)
    log(f"random 7B-shaped Llama built in {time.perf_counter() - t0:.1f} s "
        f"({sum(p.numel() for p in target.model.parameters()) / 1e9:.2f} B parameters)")
    drafter = random_prism(target)
    modes = available_modes(args.device, args.modes)
    curves = {m: verify_curve(target, args.sizes, args.prefix, m, args.repeats) for m in modes if m != "eager"}
    for m, c in curves.items():
        log(f"verify[{m}] " + "  ".join(f"n={n}: {1e3 * s:.2f} ms" for n, s in c.items()))
    result = {"shape": shape, "prefix": args.prefix,
              "verify_ms": {m: {n: 1e3 * s for n, s in c.items()} for m, c in curves.items()}, "table": {}}
    save_partial(args, result)
    extend_s, expand_s = measure_draft_cost(target, drafter, top_ks=(1, 2, 4, 6, 10))
    log(f"drafter extend {1e3 * extend_s:.2f} ms, expand " + "  ".join(f"k={k}: {1e3 * s:.2f} ms" for k, s in expand_s.items()))
    result.update(drafter_extend_ms=1e3 * extend_s, drafter_expand_ms={k: 1e3 * s for k, s in expand_s.items()})
    save_partial(args, result)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, shape["vocab_size"], (n,), generator=gen).tolist() for n in (120, 400)]
    for mode in modes:  # one mode at a time, saved as it completes
        result["table"].update(speed_table(target, prompts, {"random-prism": drafter}, args.trees, [mode],
                                           args.max_new_tokens))
        save_partial(args, result)
    return result


def section_report(args) -> dict:
    """Projected speedups at the 7B shape: round costs from the shape7b JSON (its fastest
    runtime), acceptance lengths from default-target JSONs (the first row found per tree)."""
    shape = json.loads(Path(args.shape7b).read_text())
    mode = next(m for m in ("graphs", "static", "eager") if m in shape["table"])
    s_rows = shape["table"][mode]
    vanilla_ms = s_rows["vanilla"]["round_ms"]
    acceptance = {}  # tree -> (AL, source)
    for path in args.default:
        default = json.loads(Path(path).read_text())
        for d_mode, rows in default["table"].items():
            for name, row in rows.items():
                if name.startswith("_") or name == "vanilla":
                    continue
                label, tree = name.rsplit(" ", 1)
                acceptance.setdefault(tree, (row["al"], f"{label}, {default['dtype']}, {d_mode}, {Path(path).name}"))
    lines = [f"Projected speed at the 7B shape ({mode} runtime): round costs measured on the random 7B-shaped "
             "Llama, acceptance lengths measured on the default target.\n",
             "| tree | AL (source) | round ms | vanilla ms/token | projected speedup | AL for 2.5x |",
             "|---|---|--:|--:|--:|--:|"]
    projections = []
    for name, s_row in s_rows.items():
        if name.startswith("_") or name == "vanilla":
            continue
        tree = name.rsplit(" ", 1)[1]
        if tree not in acceptance:
            continue
        al, source = acceptance[tree]
        speedup = al * vanilla_ms / s_row["round_ms"]
        needed = 2.5 * s_row["round_ms"] / vanilla_ms
        projections.append({"tree": tree, "al": al, "al_source": source, "round_ms": s_row["round_ms"],
                            "vanilla_ms": vanilla_ms, "projected_speedup": speedup, "al_for_2_5x": needed})
        lines.append(f"| {tree} | {al:.2f} ({source}) | {s_row['round_ms']:.2f} | {vanilla_ms:.2f} | "
                     f"{speedup:.2f}x | {needed:.2f} |")
    text = "\n".join(lines)
    print(text)
    return {"mode": mode, "projections": projections, "markdown": text}


def markdown_table(result: dict) -> str:
    lines = []
    for mode, rows in result["table"].items():
        lines.append(f"\n**{mode}**\n")
        lines.append("| method | tokens/s | speedup | AL | round ms | draft ms | verify+accept ms | same as vanilla |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            if name.startswith("_"):
                continue
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['al']:.2f} | {r['round_ms']:.2f} | "
                         f"{r['draft_ms_per_round']:.2f} | {r['verify_ms_per_round']:.2f} | {r['same_as_vanilla']}/{r['runs']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("smoke", "default", "shape7b", "report"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", action="append", default=None, metavar="[LABEL=]SPEC",
                        help="default section: drafters to compare (default: prism=auto)")
    parser.add_argument("--trees", nargs="+", default=list(TREES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--prompts-per-bench", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="shape7b: fewer layers (for a quick check)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--default", nargs="+", default=[], help="report: default-section JSONs (acceptance lengths)")
    parser.add_argument("--shape7b", help="report: the shape7b section's JSON")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    args.drafter = args.drafter or ["prism=auto"]
    t0 = time.perf_counter()
    result = {"section_smoke": section_smoke, "section_default": section_default,
              "section_shape7b": section_shape7b, "section_report": section_report}[f"section_{args.section}"](args)
    if args.section != "report":
        result["machine"] = machine_info(args.device)
        result["seconds"] = time.perf_counter() - t0
        result["command"] = "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv)
        print(markdown_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.section == "smoke" and not result["ok"]:
        sys.exit("smoke: speculative output differs from vanilla greedy")


if __name__ == "__main__":
    main()
