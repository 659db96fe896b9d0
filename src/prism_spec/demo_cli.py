"""``prism demo``: vanilla and speculative decoding of one chat prompt, side by side.

    prism demo                                   # the default target and its packaged drafter
    prism demo --target model.gguf --prompt "Hi"  # a GGUF target: llama.cpp's own decoding too

Prints both replies, a table of tokens, seconds, tokens/s and acceptance length, the speedup,
and whether greedy decoding gave the same tokens.
"""

from __future__ import annotations

import argparse
import os
import time

from .cli_common import (
    add_drafter_options,
    add_sampling_options,
    add_subparser,
    add_target_options,
    CLIError,
    generation_config,
    load_decoding_setup,
    print_status,
    tree_label,
)

DEMO_PROMPT = "Explain in a few sentences why the sky is blue."


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = add_subparser(
        subparsers,
        "demo",
        help="vanilla vs speculative decoding on one prompt, side by side",
        description="Load the target, run vanilla and speculative decoding on one chat prompt and compare "
        "their replies, tokens/s and acceptance length.",
    )
    p.add_argument("--prompt", default=DEMO_PROMPT, help="user message (rendered with the chat template)")
    add_target_options(p)
    # The tree tuned for this machine and drafter (about 30 s the first time, then cached): the
    # fixed cpu preset's depth costs more than it gains on small CPUs (docs/performance.md).
    add_drafter_options(p, tree="auto")
    add_sampling_options(p, max_new_tokens=128)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the short warm-up runs")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .drafters.resolve import NONE_SPECS
    from .runtime import generate

    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    if args.drafter.strip().lower() in NONE_SPECS:  # refused before the model loads
        raise CLIError(f"the demo compares vanilla and speculative decoding: pick a drafter, not --drafter {args.drafter}")
    cfg = generation_config(args)
    print_status(f"loading target {args.target} ({args.dtype}, {args.device}) ...")
    target, resolved, options = load_decoding_setup(args, args.drafter)
    ids = target.encode_prompt(args.prompt)

    if args.warmup:  # one-time costs (allocator, kernels) should not land on either side
        print_status("warming up ...")
        warm = generation_config(args)
        warm.max_new_tokens = min(8, cfg.max_new_tokens)
        generate(target, ids, None, warm, options)
        generate(target, ids, resolved.drafter, warm, options)
    plain = None
    if target.engine == "llama.cpp":  # llama.cpp's own decoding of the same GGUF, as the baseline
        from .targets.llamacpp import plain_greedy, plain_llama

        print_status("llama.cpp plain decoding ...")
        llm = plain_llama(target)
        started = time.perf_counter()
        eos = target.eos_token_ids if cfg.stop_on_eos else ()
        plain = plain_greedy(llm, ids, cfg.max_new_tokens, eos), time.perf_counter() - started
    print_status("vanilla decoding ...")
    vanilla = generate(target, ids, None, cfg, options)
    print_status("speculative decoding ...")
    spec = generate(target, ids, resolved.drafter, cfg, options)

    print(f"target       {target.name} ({target.num_layers} layers, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"drafter      {resolved.drafter.method}: {resolved.label}")
    print(f"tree         {tree_label(options.tree)}")
    sampling = "greedy (T=0)" if cfg.sampling.greedy else (
        f"T={cfg.sampling.temperature} top-p={cfg.sampling.top_p} top-k={cfg.sampling.top_k} seed={cfg.seed}")
    print(f"sampling     {sampling}, max {cfg.max_new_tokens} new tokens")
    print(f"prompt       {args.prompt!r} ({len(ids)} tokens with the chat template)")
    for title, result in (("vanilla", vanilla), ("speculative", spec)):
        print(f"\n--- {title} reply ({len(result.token_ids)} tokens, finish: {result.finish_reason}) ---")
        print(result.text)
    print()
    print(f"{'':12} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'accept len':>10}")
    if plain is not None:
        tokens, seconds = plain
        print(f"{'llama.cpp':12} {len(tokens):6d} {seconds:8.2f} {len(tokens) / seconds:9.1f} {'':>10}")
    for title, result in (("vanilla", vanilla), ("speculative", spec)):
        print(f"{title:12} {len(result.token_ids):6d} {result.total_s:8.2f} {result.tokens_per_second:9.1f} "
              f"{result.acceptance_length:10.2f}")
    speedup = spec.tokens_per_second / vanilla.tokens_per_second if vanilla.tokens_per_second else float("nan")
    print(f"speedup      {speedup:.2f}x (speculative tokens/s / vanilla tokens/s, same run)")
    if plain is not None:
        print(f"vs llama.cpp {spec.tokens_per_second * plain[1] / len(plain[0]):.2f}x (speculative / llama.cpp's own "
              "decoding of the same GGUF)")
    if cfg.sampling.greedy:
        same = spec.token_ids == vanilla.token_ids
        print(f"identical    {'yes' if same else 'NO'} (greedy decoding must give the same tokens)")
        if plain is not None:
            own = "the same" if plain[0] == vanilla.token_ids else (
                "differs (with several threads llama.cpp's one-token and multi-token attention round "
                "differently on long contexts: docs/llamacpp.md)")
            print(f"             llama.cpp's own greedy reply: {own}")
    else:
        print("identical    not compared: at T>0 both replies are samples from the same distribution")
    if not resolved.trained:
        print("note         the drafter is untrained, so a low acceptance length and no speedup are expected")
    busy = _machine_busy_note()
    if busy:
        print(f"note         {busy}")
    return 0


def _machine_busy_note() -> str | None:
    """A warning when other processes compete for the CPUs (timings are then unreliable)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cpus = os.cpu_count() or 1
    if load <= cpus:
        return None
    return (f"the 1-minute load average is {load:.1f} on {cpus} CPUs: other processes compete for the "
            "CPUs, so both tokens/s figures (and their ratio) are unreliable; rerun on an idle machine")
