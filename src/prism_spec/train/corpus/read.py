"""Reading a corpus: its replies as training examples, and its progress and storage figures."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Collection

import numpy as np

from .prompts import load_prompts
from .store import (
    FINISH_CODES,
    FINISH_NAMES,
    PROMPTS,
    read_manifest,
    read_partial,
    shard_done,
    shard_name,
    shards_of,
    unpack,
)


@dataclasses.dataclass
class CorpusExample:
    """One prompt and the target's reply, as token ids; ``key`` identifies the prompt."""

    key: str
    prompt_ids: list[int]
    reply_ids: list[int]
    finish: str

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.reply_ids

    @property
    def loss_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.reply_ids)


def finished_shards(folder: str | os.PathLike) -> list[int]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    return [s.index for s in shards_of(manifest) if shard_done(folder, s.index)]


def read_corpus(folder: str | os.PathLike, include_partial: bool = False,
                shards: Collection[int] | None = None) -> list[CorpusExample]:
    """The finished replies of a corpus in corpus order (with ``include_partial``, also the
    replies journalled in unfinished shards). Empty replies are left out. ``shards``: read
    only these shard indices, each of which must be finished (a pinned data set)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    all_shards = shards_of(manifest)
    if shards is not None:
        wanted = set(shards)
        unknown = sorted(wanted - {s.index for s in all_shards})
        if unknown:
            raise ValueError(f"{folder} has {len(all_shards)} shards; no shard {unknown[:5]}")
        unfinished = sorted(k for k in wanted if not shard_done(folder, k))
        if unfinished:
            raise ValueError(f"{folder}: pinned shards {unfinished[:5]} are not finished on this machine "
                             f"({len(unfinished)} of {len(wanted)}); bring the corpus up to date first")
        all_shards = [s for s in all_shards if s.index in wanted]
        include_partial = False
    prompts = load_prompts(folder)
    out: list[CorpusExample] = []
    for shard in all_shards:
        name = shard_name(shard.index)
        if shard_done(folder, shard.index):
            with np.load(folder / f"{name}.npz") as z:
                replies = unpack(z["reply_ids"], z["reply_offsets"])
                finish = z["finish"].tolist()
            items = [(shard.start + j, replies[j], FINISH_NAMES[int(finish[j])]) for j in range(len(replies))]
        elif include_partial:
            items = [(i, ids, f) for i, (ids, f) in sorted(read_partial(folder / f"{name}.partial.jsonl").items())]
        else:
            continue
        for i, ids, f in items:
            if ids:
                out.append(CorpusExample(prompts.keys[i], prompts.ids[i], ids, f))
    return out


def corpus_status(folder: str | os.PathLike) -> dict:
    """Progress and storage figures: shards and replies done, tokens, bytes per stored token,
    and throughput per engine/machine (replies per hour) from the shards' own timings."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = shards_of(manifest)
    done = [s for s in shards if shard_done(folder, s.index)]
    metas = [json.loads((folder / f"{shard_name(s.index)}.json").read_text()) for s in done]
    reply_tokens = sum(m["reply_tokens"] for m in metas)
    prompt_tokens = 0
    if done:
        prompts = load_prompts(folder)
        prompt_tokens = sum(len(prompts.ids[i]) for s in done for i in range(s.start, s.stop))
    shard_bytes = sum(m["npz_bytes"] for m in metas)
    journalled = sum(len(read_partial(p)) for p in sorted(folder.glob("shard-*.partial.jsonl")))
    by_engine: dict[str, dict] = {}
    for m in metas:
        label = f"{m.get('engine')} {m.get('dtype', '')} on {m.get('machine')}".strip()
        e = by_engine.setdefault(label, {"shards": 0, "replies": 0, "reply_tokens": 0, "seconds": 0.0})
        if m.get("resumed_replies", 0):
            continue  # a resumed shard's time covers only part of it
        e["shards"] += 1
        e["replies"] += m["replies"]
        e["reply_tokens"] += m["reply_tokens"]
        e["seconds"] += m["seconds_this_run"]
    for e in by_engine.values():
        if e["seconds"]:
            e["replies_per_hour"] = round(e["replies"] / e["seconds"] * 3600)
            e["reply_tokens_per_s"] = round(e["reply_tokens"] / e["seconds"], 1)
    finish = {k: sum(m["finish"][k] for m in metas) for k in FINISH_CODES}
    return {
        "folder": str(folder),
        "shards_done": len(done), "num_shards": len(shards),
        "replies_done": sum(m["replies"] for m in metas), "prompts": manifest["prompts"]["count"],
        "replies_journalled": journalled,
        "reply_tokens": reply_tokens, "prompt_tokens_of_done": prompt_tokens,
        "finish": finish,
        "bytes_per_reply_token": round(shard_bytes / reply_tokens, 3) if reply_tokens else None,
        "prompt_file_bytes_per_token": round((folder / PROMPTS).stat().st_size / manifest["prompts"]["tokens"], 3),
        "throughput": by_engine,
    }
