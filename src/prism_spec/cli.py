"""The ``prism`` command line.

    prism demo       vanilla vs speculative decoding on one prompt, side by side
    prism generate   generate for prompts from arguments, a file or stdin; one JSON line per prompt
    prism chat       interactive multi-turn chat with streaming speculative decoding
    prism serve      OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) with batching
    prism corpus     build the target's own answer corpus (token ids, sharded, resumable)
    prism train      train a drafter (EAGLE-2 / HASS / PRISM / stacked / standard)
    prism bench      measure methods on the benchmarks (tables, JSON, figures)

Layout: argparse value types and shared option groups (``add_*_options``) first, then one
``add_<command>_parser`` / ``run_<command>`` pair per subcommand defined here (demo, generate,
chat, serve); corpus, train and bench are defined with the code they drive and only registered
here. ``SUBCOMMANDS`` lists them all, in ``prism --help`` order, for ``build_parser``. What the
subcommand modules share with this one (``CLIError``, ``add_subparser``, the target options
and loading the target, atomic JSON-lines output, status lines) is in
:mod:`prism_spec.cli_common`.

Argument mistakes are argparse errors (usage + message, exit 2); user errors found while
running (empty prompt, missing file, mismatched drafter, bad config) print
``error: <message>`` to stderr and exit 2, without a traceback (set PRISM_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .cli_common import (
    CLIError,
    add_subparser,
    add_target_options,
    load_target_from_args,
    print_status,
    write_jsonl_atomic,
)
from .options import (
    TreeTooLargeError,
    check_tree_fits,
    non_empty,
    positive,
    seed,
)

EXIT_USER_ERROR = 2


# ====================================================================== argparse value types
_positive_int = positive(int)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"temperature must be a finite number >= 0, got {text}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"top-p must be in (0, 1], got {text}")
    return value


def _tree_spec(text: str):
    from .runtime.tree import TreeConfig

    if text == "auto":  # resolved once the drafter is loaded (runtime.autotune)
        return text
    try:
        return TreeConfig.parse(text)
    except ValueError as exc:
        message = str(exc)
        if "invalid literal" in message:
            message = f"bad tree spec {text!r}: chain:N needs an integer N"
        if not message.startswith(("bad tree spec", "invalid tree shape", "a chain")):
            message = f"bad tree spec {text!r}: {message}"
        if "paper" not in message:
            message += " (use paper, serving, cpu, chain:N or TOTAL/DEPTH/TOPK)"
        raise argparse.ArgumentTypeError(message) from None


# ====================================================================== shared option groups
# add_target_options is in cli_common (the corpus subcommand uses it too).
def add_drafter_options(parser: argparse.ArgumentParser, default: str = "auto", tree: str = "cpu") -> None:
    group = parser.add_argument_group("drafter")
    group.add_argument(
        "--drafter",
        default=default,
        metavar="SPEC",
        help="auto (best available for the target), layers:N (the target's first N layers, untrained), "
        f"none (vanilla decoding) or a drafter checkpoint path (default: {default})",
    )
    group.add_argument(
        "--tree",
        type=_tree_spec,
        default=tree,
        metavar="SPEC",
        help="draft tree: paper, serving, cpu, chain:N, TOTAL/DEPTH/TOPK, or auto (measured on this "
        f"machine for this drafter, cached) (default: {tree})",
    )


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N",
        help=f"tokens to generate at most (default: {max_new_tokens})",
    )
    group.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T", help="0 = greedy (default: 0)"
    )
    group.add_argument("--top-p", type=_top_p, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    group.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K", help="0 disables (default: 0)")
    group.add_argument("--seed", type=seed, default=None, metavar="S", help="random seed for sampling")


def generation_config(args: argparse.Namespace, stop_strings: Sequence[str] = ()):
    from .runtime import GenerationConfig, SamplingConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        stop_strings=tuple(stop_strings),
        seed=args.seed,
    )


def decode_options(args: argparse.Namespace, target, resolved):
    """The DecodeOptions the flags ask for: the tree (see resolve_tree_from_args) and the
    cache mode."""
    from .runtime import DecodeOptions

    return DecodeOptions(resolve_tree_from_args(args, target, resolved), wants_static_cache(args))


def wants_static_cache(args: argparse.Namespace) -> bool:
    """--static-cache, or a runtime that needs one (--compile, --cuda-graphs)."""
    return any(getattr(args, flag, False) for flag in ("static_cache", "compile", "cuda_graphs"))


def resolve_tree_from_args(args: argparse.Namespace, target, resolved):
    """The tree shape: the parsed --tree, or for ``auto`` the autotuned one (cached on disk). A
    given tree must fit in the target's context beside a prompt: a larger one is refused here,
    the first moment the context is known, rather than decoding at a crawl."""
    if args.tree != "auto":
        try:
            check_tree_fits(args.tree, target.max_context)
        except TreeTooLargeError as exc:
            raise CLIError(str(exc)) from None
        return args.tree
    from .runtime.autotune import resolve_tree

    return resolve_tree("auto", target, resolved.drafter, resolved.label, progress=print_status,
                        static_cache=wants_static_cache(args))


def tree_label(tree) -> str:
    """The shape as ``--tree`` takes it (TOTAL/DEPTH/TOPK), spelled out."""
    levels = f"{tree.max_depth} drafted level{'s' * (tree.max_depth > 1)}"
    return f"{tree.total_tokens}/{tree.depth}/{tree.top_k} ({tree.total_tokens} nodes with the root, {levels}, top-k {tree.top_k})"


# ====================================================================== prompts
def _parse_prompt_lines(lines: Iterable[str], source: str, jsonl: bool | None = None) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field (detected from the first line)."""
    lines = [line.rstrip("\r\n") for line in lines]
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if jsonl is None:
        jsonl = bool(numbered) and _json_prompt(numbered[0][1]) is not None
    if not jsonl:
        return [line for _, line in numbered]
    prompts = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{source} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise CLIError(f'{source} line {number}: expected a JSON object with a "prompt" field')
        if not isinstance(record["prompt"], str):
            raise CLIError(f'{source} line {number}: "prompt" must be a string')
        prompts.append(record["prompt"])
    return prompts


def _json_prompt(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "prompt" in record else None


def collect_prompts(args: argparse.Namespace, stdin=None) -> list[str]:
    prompts = list(args.prompt)
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise CLIError(f"prompt file {args.file!r} not found" if not path.exists() else f"{args.file!r} is not a file")
        jsonl = True if path.suffix == ".jsonl" else None
        with path.open(encoding="utf-8") as f:
            prompts += _parse_prompt_lines(f, str(path), jsonl)
    if args.stdin:
        prompts += _parse_prompt_lines((stdin or sys.stdin).read().splitlines(), "stdin")
    if not prompts:
        raise CLIError("no prompts: give PROMPT arguments, --file FILE or --stdin")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise CLIError(f"prompt {i} is empty" if len(prompts) > 1 else "the prompt is empty")
    return prompts


# ====================================================================== output
class TextStreamer:
    """Prints decoded text as tokens arrive; holds back an incomplete UTF-8 tail."""

    def __init__(self, target, out=None):
        self.target, self.out = target, out or sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.target.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def _emit(self, text: str) -> None:
        new = text[len(self.printed):] if text.startswith(self.printed) else text
        if new:
            self.out.write(new)
            self.out.flush()
        self.printed = text

    def finish(self, final_text: str) -> None:
        self._emit(final_text)
        self.out.write("\n")
        self.out.flush()


# ====================================================================== prism demo
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

    from .drafters.resolve import resolve_drafter
    from .runtime import generate

    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    cfg = generation_config(args)
    print_status(f"loading target {args.target} ({args.dtype}, {args.device}) ...")
    target = load_target_from_args(args)
    resolved = resolve_drafter(args.drafter, target)
    if resolved.drafter is None:
        raise CLIError("the demo compares vanilla and speculative decoding: pick a drafter, not --drafter none")
    options = decode_options(args, target, resolved)
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


# ====================================================================== prism generate
def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = add_subparser(
        subparsers,
        "generate",
        help="generate for prompts from arguments, a file or stdin; one JSON line per prompt",
        description="Generate a reply for each prompt and write one JSON line per prompt with the fields "
        "prompt, text, token_ids, finish_reason, new_tokens, acceptance_length, tokens_per_s, method.",
    )
    p.add_argument("prompt", nargs="*", help="prompt(s); each argument is one prompt")
    src = p.add_argument_group("prompt sources (combined in this order: arguments, --file, --stdin)")
    src.add_argument("--file", metavar="FILE",
                     help='one prompt per line, or JSON lines with a "prompt" field (.jsonl is always JSON lines)')
    src.add_argument("--stdin", action="store_true", help="read prompts from stdin, same formats as --file")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="render each prompt as a user turn with the chat template (default: --chat)")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")
    add_target_options(p)
    add_drafter_options(p)
    p.add_argument("--vanilla", action="store_true", help="no drafter: same as --drafter none")
    add_sampling_options(p)
    p.add_argument("--stop", action="append", default=[], metavar="STR", type=non_empty,
                   help="stop when the text contains STR (repeat for several)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write the JSON lines to FILE (atomically); default: stdout")
    p.add_argument("--stream", action="store_true",
                   help="print each reply to stdout as it is generated; the JSON lines then go only to --output")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> int:
    from .drafters.resolve import resolve_drafter
    from .runtime import generate

    prompts = collect_prompts(args)  # all input errors surface before the model loads
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise CLIError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    cfg = generation_config(args, args.stop)
    target = load_target_from_args(args)
    resolved = resolve_drafter("none" if args.vanilla else args.drafter, target)
    options = decode_options(args, target, resolved)
    if resolved.drafter is not None and not resolved.trained:
        print_status(f"drafter: {resolved.label} (lossless, but expect little or no speedup)")
    method = resolved.drafter.method if resolved.drafter is not None else "vanilla"

    records = []
    for prompt in prompts:
        ids = target.encode_prompt(prompt, chat=args.chat, system=args.system)
        streamer = TextStreamer(target) if args.stream else None
        result = generate(target, ids, resolved.drafter, cfg, options, on_tokens=streamer)
        if streamer is not None:
            streamer.finish(result.text or "")
            print_status(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, "
                         f"acceptance {result.acceptance_length:.2f}, finish: {result.finish_reason}]")
        record = {
            "prompt": prompt,
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "new_tokens": len(result.token_ids),
            "acceptance_length": round(result.acceptance_length, 4),
            "tokens_per_s": round(result.tokens_per_second, 3),
            "method": method,
        }
        records.append(record)
        if args.output is None and not args.stream:
            print(json.dumps(record, ensure_ascii=False), flush=True)
    if args.output is not None:
        write_jsonl_atomic(args.output, records)
        print_status(f"wrote {len(records)} line(s) to {args.output}")
    return 0


# ====================================================================== prism chat
def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = add_subparser(
        subparsers,
        "chat",
        help="interactive multi-turn chat with streaming speculative decoding",
        description="Chat with the target in the terminal. Replies stream as rounds commit tokens; after each "
        "reply the acceptance length and tokens/s are shown. Commands: /reset clears the conversation, "
        "/exit (or Ctrl-D) quits.",
    )
    p.add_argument("--system", default=None, help="system prompt")
    add_target_options(p)
    add_drafter_options(p)
    add_sampling_options(p, max_new_tokens=512)
    p.set_defaults(func=run_chat)
    return p


def run_chat(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from .drafters.resolve import resolve_drafter
    from .runtime import PromptError, generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    cfg = generation_config(args)
    target = load_target_from_args(args)
    resolved = resolve_drafter(args.drafter, target)
    options = decode_options(args, target, resolved)
    print_status(f"chatting with {args.target} (drafter: {resolved.label}); /reset clears, /exit quits")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("\n> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print_status("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": text})
        ids = target.render_chat(messages)
        streamer = TextStreamer(target, stdout)
        try:
            result = generate(target, ids, resolved.drafter, cfg, options, on_tokens=streamer)
        except PromptError as exc:  # e.g. the conversation outgrew the context
            messages.pop()
            print_status(f"error: {exc} (use /reset)")
            continue
        streamer.finish(result.text or "")
        messages.append({"role": "assistant", "content": result.text or ""})
        print_status(
            f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, "
            f"acceptance length {result.acceptance_length:.2f}, finish: {result.finish_reason}]"
        )
    return 0


# ====================================================================== prism serve
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
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the --target value)")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="most requests decoded together (default: 8)")
    p.add_argument("--max-tokens", type=_positive_int, default=256, metavar="N",
                   help="completion length when a request gives none (default: 256, at most --max-tokens-cap)")
    limits = p.add_argument_group("limits and access")
    limits.add_argument("--max-tokens-cap", type=_positive_int, default=None, metavar="N",
                        help="largest max_tokens a request may ask for; more is a 400 (default: the context the "
                        "prompt leaves, which bounds every request anyway)")
    limits.add_argument("--max-body-bytes", type=_positive_int, default=None, metavar="N",
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

    from .drafters.resolve import resolve_drafter
    from .serve import BatchingEngine, create_app
    from .serve.app import DEFAULT_MAX_BODY_BYTES

    api_key = args.api_key or os.environ.get("PRISM_API_KEY") or None
    target = load_target_from_args(args)
    resolved = resolve_drafter(args.drafter, target)
    options = decode_options(args, target, resolved)
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


# ====================================================================== other subcommands
# `prism corpus`, `prism train` and `prism bench` live with the code they drive
# (train/corpus_cli.py, train/cli.py, bench/cli.py; train and bench also run on their own as
# `python -m prism_spec.train` / `python -m prism_spec.bench`). Each of those modules has an
# add_<name>_parser(subparsers) -> parser whose commands set func; the wrappers below import it
# only when the parser is built. To add a subcommand: an add_<name>_parser (its parser created
# with add_subparser, setting func=run_<name>, reusing the add_*_options helpers) plus
# run_<name>(args) -> exit code, and add_<name>_parser appended to SUBCOMMANDS below. Every
# subcommand in SUBCOMMANDS is registered and listed by `prism --help`.

def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from .train.cli import add_train_parser as add

    return add(subparsers)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from .bench.cli import add_bench_parser as add

    return add(subparsers)


def add_corpus_parser(subparsers) -> argparse.ArgumentParser:
    from .train.corpus_cli import add_corpus_parser as add

    return add(subparsers)


#: Registration order is the order in `prism --help`.
SUBCOMMANDS: list[Callable] = [
    add_demo_parser,
    add_generate_parser,
    add_chat_parser,
    add_serve_parser,
    add_corpus_parser,
    add_train_parser,
    add_bench_parser,
]


# ====================================================================== entry point
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="prism", description="Lossless speculative decoding with PRISM and its baselines.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"prism-spec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_subparsers={})
    for add in SUBCOMMANDS:
        sub = add(subparsers)
        parser.get_default("_subparsers")[sub.prog.split()[-1]] = sub
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .drafters.base import DrafterMismatchError
    from .runtime import PromptError

    # PromptError and DrafterMismatchError are ValueErrors; listed for the reader.
    return (CLIError, PromptError, DrafterMismatchError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse errors: usage + message on stderr, exit 2. Unknown options are reported by
    # the subcommand's parser, so the usage shown is the subcommand's.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser.get_default("_subparsers").get(args.command, parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "cuda_graphs", False) and not str(getattr(args, "device", "cuda")).startswith(("cuda", "auto")):
        sub = parser.get_default("_subparsers").get(args.command, parser)
        sub.error(f"--cuda-graphs needs a CUDA device (--device cuda or cuda:N), got --device {args.device}")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if os.environ.get("PRISM_DEBUG"):  # full traceback for bug reports
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
