"""Bounded load test of `prism serve`: N concurrent OpenAI clients for S seconds at T=0.

Starts the server in-process on localhost, first computes each prompt's greedy output with
plain (vanilla) decoding, then lets the clients fire requests (prompts in rotation, streaming
and non-streaming alternating) until the time is up. Prints requests, errors, mismatches
against greedy, latency percentiles and the largest batch the engine formed. Exit code 1 on
any error or mismatch.

    python benchmarks/serve_load.py --clients 16 --seconds 60
    python benchmarks/serve_load.py --target path/to/model --drafter path/to/drafter --clients 16
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.serve import BatchingEngine, create_app, serve_in_thread
from prism_spec.targets import load_target

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about autumn.",
    "Explain what a hash table is.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
]


def start_server(target, drafter, tree, max_batch, max_tokens):
    engine = BatchingEngine(target, drafter, max_batch=max_batch, batch_window_s=0.02,
                            options=DecodeOptions(tree)).start()
    server, thread, base = serve_in_thread(create_app(engine, "model", max_tokens))
    return engine, server, thread, base


def run_load(base: str, expected: dict[str, str], clients: int, seconds: float, max_tokens: int,
             model: str = "model") -> dict:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {"requests": 0, "errors": 0, "mismatches": 0, "latencies": [], "error_messages": []}

    def worker(index: int):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        i = index
        while time.monotonic() < deadline:
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = i % 2 == 1
            t0 = time.perf_counter()
            try:
                kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                              temperature=0)
                if stream:
                    text = "".join(c.choices[0].delta.content or "" for c in
                                   client.chat.completions.create(stream=True, **kwargs) if c.choices)
                else:
                    text = client.chat.completions.create(**kwargs).choices[0].message.content
                ok, err = text == expected[prompt], None
            except Exception as exc:  # counted, never fatal: the point is to count them
                ok, err = False, f"{type(exc).__name__}: {exc}"
            with lock:
                stats["requests"] += 1
                stats["latencies"].append(time.perf_counter() - t0)
                if err:
                    stats["errors"] += 1
                    stats["error_messages"].append(err)
                elif not ok:
                    stats["mismatches"] += 1
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--tree", default="cpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    drafter = resolve_drafter(args.drafter, target)
    tree = TreeConfig.parse(args.tree)
    expected = {}
    for prompt in PROMPTS:
        ids = target.render_chat([{"role": "user", "content": prompt}])
        expected[prompt] = target.decode(generate(target, ids, None, GenerationConfig(max_new_tokens=args.max_tokens)).token_ids)
    engine, server, thread, base = start_server(target, drafter.drafter, tree, args.max_batch, args.max_tokens)
    try:
        stats = run_load(base, expected, args.clients, args.seconds, args.max_tokens)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
    lat = sorted(stats["latencies"])
    print(f"date {datetime.date.today()}  machine {platform.machine()} {platform.processor() or ''} "
          f"torch threads {torch.get_num_threads()}  target {args.target}  drafter {drafter.label}  tree {args.tree}")
    print(f"clients {args.clients}  seconds {args.seconds:g}  max_tokens {args.max_tokens}")
    print(f"requests {stats['requests']}  errors {stats['errors']}  mismatches vs greedy {stats['mismatches']}  "
          f"largest batch {engine.largest_batch}  batches {engine.batches_run}")
    if lat:
        print(f"latency s: median {statistics.median(lat):.2f}  p90 {lat[int(0.9 * (len(lat) - 1))]:.2f}  max {lat[-1]:.2f}")
    for message in stats["error_messages"][:5]:
        print("error:", message)
    return 0 if stats["errors"] == 0 and stats["mismatches"] == 0 and stats["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
