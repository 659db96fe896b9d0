"""``prism generate`` and ``prism chat``: decoding from the command line.

    prism generate "Hello!" --file prompts.jsonl -o out.jsonl   # one JSON line per prompt
    prism generate --stdin --stream < prompts.txt                # replies printed as they decode
    prism chat --system "Be brief."                              # multi-turn, streaming; /reset, /exit

Prompts come from arguments, ``--file`` (plain lines or JSON lines with a "prompt" field) and
``--stdin``, in that order; :class:`TextStreamer` prints replies as rounds commit tokens. Both
commands take the target, drafter and sampling option groups of :mod:`prism_spec.cli_common`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from .cli_common import (
    add_drafter_options,
    add_sampling_options,
    add_subparser,
    add_target_options,
    CLIError,
    generation_config,
    load_decoding_setup,
    print_status,
    write_jsonl_atomic,
)
from .options import non_empty


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
    from .runtime import generate

    prompts = collect_prompts(args)  # all input errors surface before the model loads
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise CLIError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    cfg = generation_config(args, args.stop)
    target, resolved, options = load_decoding_setup(args, "none" if args.vanilla else args.drafter)
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
    from .runtime import PromptError, generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    cfg = generation_config(args)
    target, resolved, options = load_decoding_setup(args, args.drafter)
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
