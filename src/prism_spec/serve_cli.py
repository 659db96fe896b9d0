"""``prism serve``: the OpenAI-compatible HTTP server (:mod:`prism_spec.serve`) from the
command line.

    prism serve --port 8000 --max-batch 8                       # localhost, no API key
    prism serve --host 0.0.0.0 --api-key KEY --max-tokens-cap 1024

The server needs the ``serve`` extra (FastAPI, uvicorn); it is imported only when the command
runs, so the parser is built without it.
"""

from __future__ import annotations

import argparse
import os

from .cli_common import (
    add_drafter_options,
    add_subparser,
    add_target_options,
    load_decoding_setup,
    print_status,
    tree_label,
)
from .options import non_empty, positive_int


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = add_subparser(
        subparsers,
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) with batching",
        description="Serve the target with speculative decoding over an OpenAI-compatible API. Concurrent "
        "requests are decoded together in batches (each row keeps its own tree and stop conditions).",
    )
    add_target_options(p)
    add_drafter_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the --target value)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="most requests decoded together (default: 8)")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N",
                   help="completion length when a request gives none (default: 256, at most --max-tokens-cap)")
    limits = p.add_argument_group("limits and access")
    limits.add_argument("--max-tokens-cap", type=positive_int, default=None, metavar="N",
                        help="largest max_tokens a request may ask for; more is a 400 (default: the context the "
                        "prompt leaves, which bounds every request anyway)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=None, metavar="N",
                        help="larger request bodies get a 413 before they are parsed (default: 1 MiB)")
    limits.add_argument("--api-key", type=non_empty, default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (what OpenAI clients send as their api_key) on "
                        "every path but /health (default: the PRISM_API_KEY environment variable, else no key)")
    limits.add_argument("--docs", action="store_true",
                        help="serve the interactive API docs (/docs, /redoc, /openapi.json); off by default")
    p.set_defaults(func=run_serve)
    return p


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines and anyone may use it."""
    import ipaddress

    if api_key:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"warning: --host {host} makes the server reachable from other machines and it has no API key: "
            "anyone who can connect may use it (set --api-key or PRISM_API_KEY)")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serve import BatchingEngine, create_app
    from .serve.app import DEFAULT_MAX_BODY_BYTES

    api_key = args.api_key or os.environ.get("PRISM_API_KEY") or None
    target, resolved, options = load_decoding_setup(args, args.drafter)
    engine = BatchingEngine(target, resolved.drafter, max_batch=args.max_batch, options=options).start()
    name = args.model_name or args.target
    print_status(f"serving {name} on http://{args.host}:{args.port}/v1 (drafter: {resolved.label}, "
                 f"tree {tree_label(options.tree)}, batches up to {engine.max_batch}, "
                 f"{'API key required' if api_key else 'no API key'})")
    warning = exposure_warning(args.host, api_key)
    if warning:
        print_status(warning)
    try:
        app = create_app(engine, name, args.max_tokens, max_tokens_cap=args.max_tokens_cap,
                         max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, api_key=api_key, docs=args.docs)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
