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

import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import (  # noqa: E402
    MODEL,
    PROMPTS,
    build_parser,
    greedy_replies,
    load_target_and_drafter,
    run_header,
    running_server,
)

from prism_spec.runtime import TreeConfig  # noqa: E402


def run_load(base: str, expected: dict[str, str], clients: int, seconds: float, max_tokens: int,
             model: str = MODEL) -> dict:
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
    args = build_parser(__doc__, max_tokens=24).parse_args(argv)
    target, drafter = load_target_and_drafter(args)
    tree = TreeConfig.parse(args.tree)
    expected = greedy_replies(target, args.max_tokens)
    with running_server(target, drafter.drafter, tree, args.max_batch, args.max_tokens) as (engine, base):
        stats = run_load(base, expected, args.clients, args.seconds, args.max_tokens)
    lat = sorted(stats["latencies"])
    print(run_header(args, drafter.label))
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
