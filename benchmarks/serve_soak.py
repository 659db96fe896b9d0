"""Soak test of `prism serve`: N concurrent clients for S seconds, good requests mixed with
bad ones, against one in-process server on localhost.

Each client cycles through six kinds of request: a good T=0 chat request (plain, then
streamed), a malformed one (bad JSON, wrong types, out-of-range values, non-UTF-8 bytes,
unknown model or path), a streamed request abandoned after its first event, a plain request
abandoned after a fraction of a second, and a body over the server's size limit. Meanwhile a
probe times `/health` every 0.2 s (and samples memory every 5 s). Reported: requests per kind, server errors (any 5xx, or a
good or malformed request that gets no answer), good replies that differ from greedy
decoding, the largest `/health` latency, cancelled rows, and this process's resident memory
at the start and the end. Exit code 1 on any server error or mismatch, or a `/health` latency
of a second or more.

    python benchmarks/serve_soak.py --clients 16 --seconds 60
    python benchmarks/serve_soak.py --target path/to/model --drafter path/to/drafter
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS  # noqa: E402

from prism_spec.drafters.resolve import resolve_drafter  # noqa: E402
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate  # noqa: E402
from prism_spec.serve import BatchingEngine, create_app, serve_in_thread  # noqa: E402
from prism_spec.targets import load_target  # noqa: E402

KINDS = ("good", "good_stream", "malformed", "abandon_stream", "abandon_plain", "oversized")


def malformed_requests(model: str) -> list[tuple[str, bytes]]:
    """(path, body) pairs a server must answer with a 4xx."""
    def chat(**fields) -> bytes:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()

    return [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}'),
        ("/v1/chat/completions", chat(max_tokens="8")),
        ("/v1/chat/completions", chat(max_tokens=10**9)),
        ("/v1/chat/completions", chat(temperature=0.7, seed=2**64)),
        ("/v1/chat/completions", chat(temperature=-1)),
        ("/v1/chat/completions", chat(stop="")),
        ("/v1/chat/completions", json.dumps({"model": model, "messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
        ("/v1/completions", json.dumps({"model": model, "prompt": ""}).encode()),
        ("/v1/nowhere", chat()),
    ]


def resident_mb() -> float:
    """This process's resident set size in MB (Linux /proc), or nan elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_soak(base: str, expected: dict[str, str], clients: int, seconds: float, max_tokens: int,
             max_body_bytes: int, model: str = "model") -> dict:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {"requests": Counter(), "server_errors": 0, "mismatches": 0, "error_messages": [],
             "health_max_s": 0.0, "health_probes": 0, "rss_mb": []}
    bad = malformed_requests(model)
    json_headers = {"content-type": "application/json"}

    def server_error(message: str):
        with lock:
            stats["server_errors"] += 1
            stats["error_messages"].append(message)

    def good(http: httpx.Client, prompt: str, stream: bool):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        if stream:
            text = ""
            with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return server_error(f"good stream: {response.status_code} {response.read()[:200]!r}")
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            return server_error(f"good stream: {event['error']}")
                        text += "".join(c["delta"].get("content") or "" for c in event["choices"])
        else:
            response = http.post(base + "/v1/chat/completions", json=body)
            if response.status_code != 200:
                return server_error(f"good: {response.status_code} {response.text[:200]}")
            text = response.json()["choices"][0]["message"]["content"]
        if text != expected[prompt]:
            with lock:
                stats["mismatches"] += 1

    def worker(index: int):
        http = httpx.Client(timeout=600)
        i = index
        while time.monotonic() < deadline:
            kind, prompt = KINDS[i % len(KINDS)], PROMPTS[i % len(PROMPTS)]
            try:
                if kind in ("good", "good_stream"):
                    good(http, prompt, kind == "good_stream")
                elif kind == "malformed":
                    path, body = bad[i % len(bad)]
                    response = http.post(base + path, content=body, headers=json_headers)
                    if not 400 <= response.status_code < 500 or "error" not in response.json():
                        server_error(f"malformed {body[:60]!r}: {response.status_code} {response.text[:200]}")
                elif kind == "abandon_stream":
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 4 * max_tokens, "stream": True}
                    with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                        for _ in response.iter_lines():
                            break  # hang up after the first event
                elif kind == "abandon_plain":
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 4 * max_tokens}
                    try:
                        httpx.post(base + "/v1/chat/completions", json=body, timeout=0.05 + (i % 5) * 0.1)
                    except httpx.TimeoutException:
                        pass  # giving up is the point
                else:  # oversized
                    body = b'{"model": "' + b"x" * max_body_bytes + b'"}'
                    response = http.post(base + "/v1/chat/completions", content=body, headers=json_headers)
                    if response.status_code != 413:
                        server_error(f"oversized: {response.status_code} {response.text[:200]}")
            except httpx.TransportError as exc:
                if kind not in ("abandon_stream", "abandon_plain"):
                    server_error(f"{kind}: {type(exc).__name__}: {exc}")
            with lock:
                stats["requests"][kind] += 1
            i += clients
        http.close()

    def probe():
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                ok = httpx.get(base + "/health", timeout=30).status_code == 200
            except httpx.TransportError:
                ok = False
            elapsed = time.perf_counter() - t0
            with lock:
                stats["health_probes"] += 1
                stats["health_max_s"] = max(stats["health_max_s"], elapsed)
                if stats["health_probes"] % 25 == 1:  # about every 5 s
                    stats["rss_mb"].append(round(resident_mb()))
            if not ok:
                server_error("/health did not answer 200")
            time.sleep(0.2)

    stats["rss_start_mb"] = resident_mb()
    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(worker, k) for k in range(clients)] + [pool.submit(probe)]
        for future in futures:
            future.result()
    stats["rss_end_mb"] = resident_mb()
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--tree", default="cpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    resolved = resolve_drafter(args.drafter, target)
    expected = {}
    for prompt in PROMPTS:
        ids = target.render_chat([{"role": "user", "content": prompt}])
        expected[prompt] = target.decode(generate(target, ids, None, GenerationConfig(max_new_tokens=args.max_tokens)).token_ids)
    engine = BatchingEngine(target, resolved.drafter, max_batch=args.max_batch, batch_window_s=0.02,
                            options=DecodeOptions(TreeConfig.parse(args.tree))).start()
    app = create_app(engine, "model", args.max_tokens, max_body_bytes=args.max_body_bytes)
    server, thread, base = serve_in_thread(app)
    try:
        stats = run_soak(base, expected, args.clients, args.seconds, args.max_tokens, args.max_body_bytes)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
    print(f"date {datetime.date.today()}  machine {platform.machine()} {platform.processor() or ''}  "
          f"torch threads {torch.get_num_threads()}  target {args.target}  drafter {resolved.label}  tree {args.tree}")
    print(f"clients {args.clients}  seconds {args.seconds:g}  max_tokens {args.max_tokens}  "
          f"max_body_bytes {args.max_body_bytes}")
    print("requests " + "  ".join(f"{k} {stats['requests'][k]}" for k in KINDS))
    print(f"server errors {stats['server_errors']}  mismatches vs greedy {stats['mismatches']}  "
          f"rows cancelled {engine.rows_cancelled}  batches {engine.batches_run}  largest batch {engine.largest_batch}")
    print(f"/health max latency {stats['health_max_s']:.3f} s over {stats['health_probes']} probes  "
          f"RSS {stats['rss_start_mb']:.0f} MB -> {stats['rss_end_mb']:.0f} MB (every 5 s: {stats['rss_mb']})")
    for message in stats["error_messages"][:5]:
        print("error:", message)
    passed = stats["server_errors"] == 0 and stats["mismatches"] == 0 and stats["health_max_s"] < 1.0
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
