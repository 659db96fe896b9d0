"""Shared by the `prism serve` load and soak tests (benchmarks/serve_load.py and
benchmarks/serve_soak.py): their command-line options, the prompts the clients send, the
greedy replies good requests must equal, and an in-process server on localhost.

The scripts put this folder on ``sys.path`` themselves, so they also import when loaded from
their file path (as tests/serve/test_server.py does).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from contextlib import contextmanager

import torch

from prism_spec.drafters.resolve import resolve_drafter
from prism_spec.runtime import GenerationConfig, generate
from prism_spec.runtime import DecodeOptions
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

#: The model id the in-process server answers to.
MODEL = "model"


def build_parser(description: str, max_tokens: int, max_body_bytes: int | None = None) -> argparse.ArgumentParser:
    """The options both scripts take; ``--max-body-bytes`` (the server's body limit) only when
    ``max_body_bytes`` gives its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="auto")
    parser.add_argument("--tree", default="cpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--max-batch", type=int, default=16)
    if max_body_bytes is not None:
        parser.add_argument("--max-body-bytes", type=int, default=max_body_bytes)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def load_target_and_drafter(args: argparse.Namespace):
    """The target and the resolved drafter the options name (torch threads set first)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    return target, resolve_drafter(args.drafter, target)


def greedy_replies(target, max_tokens: int) -> dict[str, str]:
    """Each prompt's reply (as a user turn) by plain greedy decoding: what every good T=0
    request must get back."""
    expected = {}
    for prompt in PROMPTS:
        ids = target.render_chat([{"role": "user", "content": prompt}])
        expected[prompt] = target.decode(generate(target, ids, None, GenerationConfig(max_new_tokens=max_tokens)).token_ids)
    return expected


@contextmanager
def running_server(target, drafter, tree, max_batch: int, max_tokens: int, **app_options):
    """A batching engine and the app over it, served on localhost in a thread; yields
    ``(engine, base_url)`` and stops both on the way out."""
    engine = BatchingEngine(target, drafter, max_batch=max_batch, batch_window_s=0.02,
                            options=DecodeOptions(tree)).start()
    server, thread, base = serve_in_thread(create_app(engine, MODEL, max_tokens, **app_options))
    try:
        yield engine, base
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


def run_header(args: argparse.Namespace, drafter_label: str) -> str:
    """The first line of a report: when, on what, with which target, drafter and tree."""
    return (f"date {datetime.date.today()}  machine {platform.machine()} {platform.processor() or ''}  "
            f"torch threads {torch.get_num_threads()}  target {args.target}  drafter {drafter_label}  tree {args.tree}")
