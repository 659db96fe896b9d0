"""Creating a corpus (prompts and manifest) and building it shard by shard with a reply engine,
restartably: finished replies go to a shard's journal first, whole shards are written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .engines import ReplyEngine
from .prompts import collect_prompts, load_prompts, save_prompts
from .store import (
    FINISH_CODES,
    FORMAT,
    MANIFEST,
    PROMPTS,
    CorpusError,
    DecodingSettings,
    Shard,
    is_corpus,
    pack,
    read_manifest,
    read_partial,
    shard_done,
    shard_name,
    shards_of,
    token_dtype,
    write_json,
    write_npz,
)


def target_identity(target) -> dict:
    """What must not change between the shards of one corpus."""
    tok = target.tokenizer
    return {
        "name": str(target.name),
        "model_type": getattr(target.config, "model_type", None),
        "vocab_size": int(target.config.vocab_size),
        "tokenizer_vocab": int(len(tok)),
        "eos_token_ids": sorted(int(e) for e in target.eos_token_ids),
    }


def create_corpus(
    folder: str | os.PathLike,
    target,
    data_paths: Sequence[str | os.PathLike],
    settings: DecodingSettings,
    shard_size: int = 256,
    max_prompt_tokens: int = 1536,
    prompt_seed: int = 0,
    progress: bool = True,
) -> dict:
    """Collect the prompts and write the manifest; an existing corpus with the same settings
    is opened as it is (any difference is an error naming it)."""
    folder = Path(folder)
    if shard_size < 1:
        raise CorpusError(f"shard_size must be >= 1, got {shard_size}")
    wanted = {
        "target": target_identity(target),
        "decoding": dataclasses.asdict(settings),
        "shard_size": int(shard_size),
        "max_prompt_tokens": int(max_prompt_tokens),
        "prompt_seed": int(prompt_seed),
    }
    if is_corpus(folder):
        manifest = read_manifest(folder)
        diffs = [f"{k}: corpus has {manifest.get(k)!r}, asked for {v!r}" for k, v in wanted.items()
                 if manifest.get(k) != v]
        if diffs:
            raise CorpusError(f"{folder} was built with other settings (use another folder):\n  " + "\n  ".join(diffs))
        return manifest
    # A creation cut short leaves prompts.npz (or a temporary file) without the manifest,
    # which is written last: start that over; anything else is someone else's folder.
    leftovers = [p for p in folder.iterdir() if p.name != PROMPTS and not p.name.endswith(".tmp")] \
        if folder.exists() else []
    if leftovers:
        raise CorpusError(f"{folder} exists and is not a corpus folder; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    prompts = collect_prompts(data_paths, target.tokenizer, max_prompt_tokens, prompt_seed, progress)
    digest = save_prompts(folder, prompts, int(target.config.vocab_size))
    total_tokens = sum(len(p) for p in prompts.ids)
    manifest = {
        "format": FORMAT,
        **wanted,
        "token_dtype": token_dtype(int(target.config.vocab_size)).name,
        "prompts": {
            "count": len(prompts), "tokens": total_tokens, "sha256": digest,
            "sources": prompts.sources,
            "data_paths": [str(p) for p in data_paths],
            "selection": "first user turn (with a system turn before it), exact repeats dropped, "
                         f"rendered with the chat template and generation prompt, <= {max_prompt_tokens} tokens, "
                         f"seeded shuffle (seed {prompt_seed})",
        },
        "num_shards": -(-len(prompts) // shard_size),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def _finish_shard(folder: Path, manifest: dict, shard: Shard, replies: dict[int, tuple[list[int], str]],
                  meta: dict) -> None:
    dtype = np.dtype(manifest["token_dtype"])
    seqs = [replies[i][0] for i in range(shard.start, shard.stop)]
    flat, offsets = pack(seqs, dtype)
    finish = np.array([FINISH_CODES[replies[i][1]] for i in range(shard.start, shard.stop)], dtype=np.uint8)
    name = shard_name(shard.index)
    write_npz(folder / f"{name}.npz", {"reply_ids": flat, "reply_offsets": offsets, "finish": finish})
    meta = dict(meta, shard=shard.index, prompts=[shard.start, shard.stop],
                replies=len(seqs), reply_tokens=int(offsets[-1]),
                finish={k: int((finish == v).sum()) for k, v in FINISH_CODES.items()},
                npz_bytes=(folder / f"{name}.npz").stat().st_size)
    write_json(folder / f"{name}.json", meta)  # written last: its presence marks the shard done
    (folder / f"{name}.partial.jsonl").unlink(missing_ok=True)


def build_corpus(
    folder: str | os.PathLike,
    engine: ReplyEngine,
    shards: Sequence[int] | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    group_prompts: int | None = None,
) -> dict:
    """Answer the prompts of the corpus at ``folder`` shard by shard (``shards``: which ones and
    in which order, default all; finished ones are skipped). Consecutive shards are handed to
    the engine together until they hold ``group_prompts`` unanswered prompts (default: twice
    the engine's batch size), so a large GPU batch is not capped by the shard size. Stops
    cleanly after the batch that passes ``time_limit_s``. Returns counts of this run (replies,
    tokens, seconds, shards finished)."""
    from tqdm.auto import tqdm

    from ...bench.machine import machine_description

    folder = Path(folder)
    manifest = read_manifest(folder)
    settings = DecodingSettings(**manifest["decoding"])
    prompts = load_prompts(folder)
    all_shards = shards_of(manifest)
    wanted = all_shards if shards is None else [all_shards[k] for k in shards]
    todo = [s for s in wanted if not shard_done(folder, s.index)]
    partials = {s.index: read_partial(folder / f"{shard_name(s.index)}.partial.jsonl") for s in todo}
    missing = {s.index: [i for i in range(s.start, s.stop) if i not in partials[s.index]] for s in todo}
    remaining = sum(len(m) for m in missing.values())
    group_prompts = group_prompts or 2 * int(getattr(engine, "batch_size", 1))
    groups: list[list[Shard]] = []
    for shard in todo:
        if not groups or sum(len(missing[s.index]) for s in groups[-1]) >= group_prompts:
            groups.append([])
        groups[-1].append(shard)
    say = log or (lambda m: None)
    say(f"{len(wanted) - len(todo)} of {len(wanted)} shards already done; {remaining} replies to go")
    t0 = time.time()

    def out_of_time() -> bool:
        return time_limit_s is not None and time.time() - t0 > time_limit_s

    stats = {"replies": 0, "reply_tokens": 0, "shards_finished": [], "seconds": 0.0, "stopped_by_time": False}
    bar = tqdm(total=remaining, desc="corpus", unit="reply", disable=not progress, smoothing=0.05)
    try:
        for group in groups:
            if out_of_time():
                stats["stopped_by_time"] = True
                break
            owners = [(s.index, i) for s in group for i in missing[s.index]]
            journals = {s.index: open(folder / f"{shard_name(s.index)}.partial.jsonl", "a", encoding="utf-8")
                        for s in group}
            started = time.time()
            try:
                def on_reply(j: int, ids: list[int], finish: str) -> None:
                    k, i = owners[j]
                    partials[k][i] = (ids, finish)
                    journals[k].write(json.dumps({"i": i, "ids": ids, "finish": finish}) + "\n")
                    journals[k].flush()
                    stats["replies"] += 1
                    stats["reply_tokens"] += len(ids)
                    bar.update(1)

                engine.generate(
                    [prompts.ids[i] for _, i in owners], settings, seed=settings.seed * 100_003 + group[0].index,
                    on_reply=on_reply, should_stop=out_of_time,
                )
            finally:
                for journal in journals.values():
                    journal.close()
            seconds = time.time() - started
            for shard in group:
                done = partials[shard.index]
                if len(done) < shard.stop - shard.start:  # stopped by the time limit
                    stats["stopped_by_time"] = True
                    continue
                share = len(missing[shard.index]) / max(1, len(owners))  # this shard's part of the group's time
                _finish_shard(folder, manifest, shard, done, {
                    **engine.describe(), "machine": machine_description(),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "seconds_this_run": round(seconds * share, 1),
                    "resumed_replies": shard.stop - shard.start - len(missing[shard.index]),
                })
                stats["shards_finished"].append(shard.index)
                say(f"{shard_name(shard.index)} done: {len(missing[shard.index])} replies, "
                    f"{seconds * share:.0f} s")
            if stats["stopped_by_time"]:
                break
    finally:
        bar.close()
        stats["seconds"] = round(time.time() - t0, 1)
    return stats
