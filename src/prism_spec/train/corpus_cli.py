"""``prism corpus``: build, inspect and export the target's own answer corpus.

    prism corpus build --data ../shared/data/train --out corpora/smollm2   # resumable; rerun to continue
    prism corpus status corpora/smollm2                                    # progress, bytes/token, replies/hour
    prism corpus export corpora/smollm2 -o replies.jsonl                   # as chat JSONL (text)
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_common import CLIError, add_subparser, add_target_options, load_target_from_args, write_jsonl_atomic
from ..options import positive, seed


def _shard_range(text: str) -> tuple[int, int | None]:
    """``A:B`` (B exclusive), ``A:`` or ``K``."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start, stop = int(a or 0), (int(b) if b else None)
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shards as K, A:B or A:, got {text!r}") from None
    if start < 0 or (stop is not None and stop <= start):
        raise argparse.ArgumentTypeError(f"empty or negative shard range {text!r}")
    return start, stop


def add_corpus_parser(subparsers) -> argparse.ArgumentParser:
    p = add_subparser(
        subparsers, "corpus", help="build the target's own answer corpus (token ids, sharded, resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)

    b = add_subparser(sub, "build", help="answer every usable prompt with the target (resumable)")
    b.add_argument("--data", nargs="+", metavar="PATH",
                   help="prompt files or folders (any format `prism train` reads); needed only to create the corpus")
    b.add_argument("--out", required=True, metavar="DIR", help="corpus folder (created, or resumed when it exists)")
    add_target_options(b)
    g = b.add_argument_group("decoding (fixed for a corpus)")
    g.description = ("set when the corpus is created; a resumed corpus keeps its own, and a value given "
                     "that differs from it is an error")
    g.add_argument("--max-new-tokens", type=positive(int), default=None, help="default 384")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=None, help="default 1.0")
    g.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    g.add_argument("--seed", type=seed, default=None, help="sampling seed, and the seed of the prompt order (default 0)")
    g.add_argument("--max-prompt-tokens", type=positive(int), default=None,
                   help="prompts longer than this (rendered) are left out (default 1536)")
    g.add_argument("--shard-size", type=positive(int), default=None, help="prompts per shard file (default 256)")
    r = b.add_argument_group("this run")
    r.add_argument("--batch-size", type=positive(int), default=None,
                   help="sequences decoded together (default: 48 on a CPU, 256 on a GPU, 16 on the llama.cpp engine)")
    r.add_argument("--shards", type=_shard_range, default=None, metavar="A:B",
                   help="only these shards (K, A:B or A:), e.g. to split the work between machines")
    r.add_argument("--reverse", action="store_true",
                   help="take the unfinished shards from the last one down (a second machine working the same "
                   "corpus from the other end)")
    r.add_argument("--time-limit", type=positive(float), default=None, metavar="SECONDS",
                   help="stop cleanly after the batch that passes this many seconds")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run_corpus_build)

    s = add_subparser(sub, "status", help="progress, storage (bytes per token) and replies per hour")
    s.add_argument("folder", metavar="DIR")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.set_defaults(func=run_corpus_status)

    e = add_subparser(sub, "export", help="write the finished replies as chat JSONL (decoded text)")
    e.add_argument("folder", metavar="DIR")
    e.add_argument("-o", "--out", required=True, metavar="FILE")
    e.add_argument("--target", default=None, help="target whose tokenizer decodes the ids (default: the corpus's)")
    e.set_defaults(func=run_corpus_export)
    return p


def make_engine(target, batch_size: int | None, static_cache: bool):
    from .corpus.engines import HFEngine, LlamaCppEngine

    if getattr(target, "engine", "torch") == "llama.cpp":
        if static_cache:
            raise CLIError("--static-cache is a torch option; the llama.cpp engine keeps its own KV cache")
        return LlamaCppEngine(target.gguf_path, target.eos_token_ids, batch_size=batch_size or 16,
                              threads=target.threads, flash_attention=target.flash_attention)
    on_gpu = target.device.type == "cuda"
    return HFEngine(target, batch_size=batch_size or (256 if on_gpu else 48), static_cache=static_cache or None)


CORPUS_DEFAULTS = {"max_new_tokens": 384, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0,
                   "max_prompt_tokens": 1536, "shard_size": 256}


def _corpus_settings(args: argparse.Namespace) -> dict:
    """The corpus's own settings when it exists, else the defaults; values given override."""
    from .corpus.store import is_corpus, read_manifest

    values = dict(CORPUS_DEFAULTS)
    if is_corpus(args.out):
        manifest = read_manifest(args.out)
        values.update(manifest["decoding"], max_prompt_tokens=manifest["max_prompt_tokens"],
                      shard_size=manifest["shard_size"])
    values.update({k: getattr(args, k) for k in CORPUS_DEFAULTS if getattr(args, k) is not None})
    return values


def run_corpus_build(args: argparse.Namespace) -> int:
    from .corpus.build import build_corpus, create_corpus
    from .corpus.read import corpus_status
    from .corpus.store import DecodingSettings, is_corpus, read_manifest

    if args.compile or args.cuda_graphs:
        raise CLIError("--compile and --cuda-graphs are not used by `prism corpus build` (--static-cache is)")
    values = _corpus_settings(args)
    settings = DecodingSettings(values["max_new_tokens"], values["temperature"], values["top_p"], values["top_k"],
                                values["seed"])
    target = load_target_from_args(args)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not is_corpus(args.out):
        if not args.data:
            raise CLIError(f"{args.out} is not a corpus yet: give --data to create it")
        log(f"collecting prompts from {' '.join(args.data)} ...")
    manifest = create_corpus(args.out, target, args.data or [], settings, shard_size=values["shard_size"],
                             max_prompt_tokens=values["max_prompt_tokens"], prompt_seed=values["seed"],
                             progress=not args.quiet)
    manifest = read_manifest(args.out)
    log(f"{manifest['prompts']['count']} prompts in {manifest['num_shards']} shards of {manifest['shard_size']}")
    shards = None
    if args.shards is not None:
        start, stop = args.shards
        stop = manifest["num_shards"] if stop is None else min(stop, manifest["num_shards"])
        if start >= manifest["num_shards"]:
            raise CLIError(f"--shards {start}: the corpus has {manifest['num_shards']} shards")
        shards = list(range(start, stop))
    if args.reverse:
        shards = list(range(manifest["num_shards"]))[::-1] if shards is None else shards[::-1]
    engine = make_engine(target, args.batch_size, args.static_cache)
    log(f"engine: {json.dumps(engine.describe())}")
    stats = build_corpus(args.out, engine, shards=shards, time_limit_s=args.time_limit,
                         progress=not args.quiet, log=log)
    status = corpus_status(args.out)
    log(f"this run: {stats['replies']} replies, {stats['reply_tokens']} tokens in {stats['seconds']:.0f} s"
        f"{' (stopped by --time-limit)' if stats['stopped_by_time'] else ''}; corpus: "
        f"{status['shards_done']}/{status['num_shards']} shards, {status['replies_done']}/{status['prompts']} replies")
    return 0


def _print_status(status: dict) -> None:
    print(f"corpus {status['folder']}")
    print(f"  shards done      {status['shards_done']} / {status['num_shards']}")
    print(f"  replies done     {status['replies_done']} / {status['prompts']} prompts"
          f" (+{status['replies_journalled']} in unfinished shards)")
    print(f"  reply tokens     {status['reply_tokens']:,} (finish: "
          + ", ".join(f"{k} {v}" for k, v in status["finish"].items()) + ")")
    if status["bytes_per_reply_token"] is not None:
        print(f"  storage          {status['bytes_per_reply_token']} bytes per reply token;"
              f" prompts {status['prompt_file_bytes_per_token']} bytes per token")
    for label, e in status["throughput"].items():
        if e.get("replies_per_hour"):
            print(f"  {label}: {e['replies_per_hour']:,} replies/hour, {e['reply_tokens_per_s']} tokens/s"
                  f" ({e['shards']} whole shards, wall time: a paused or shared machine counts)")


def run_corpus_status(args: argparse.Namespace) -> int:
    from .corpus.read import corpus_status

    status = corpus_status(args.folder)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        _print_status(status)
    return 0


def run_corpus_export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..targets import DEFAULT_TARGET, default_target_path
    from .corpus.read import read_corpus
    from .corpus.store import read_manifest

    manifest = read_manifest(args.folder)
    name = args.target or manifest["target"]["name"]
    tokenizer = AutoTokenizer.from_pretrained(default_target_path() if name == DEFAULT_TARGET else name)
    examples = read_corpus(args.folder)
    records = []
    for ex in examples:
        prompt = tokenizer.decode(ex.prompt_ids, skip_special_tokens=False)
        reply = tokenizer.decode(ex.reply_ids, skip_special_tokens=True).strip()
        records.append({"key": ex.key, "prompt_text": prompt, "reply": reply, "finish": ex.finish})
    write_jsonl_atomic(args.out, records)
    print(f"{len(records)} replies written to {args.out}", file=sys.stderr)
    return 0
