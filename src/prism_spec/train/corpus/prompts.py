"""A corpus's prompts: every usable first user turn of some data files, rendered, in a seeded
order, and stored as token ids in ``prompts.npz``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..conversations import Conversation, conversation_key
from ..mix import expand_sources
from ..records import read_file
from .store import PROMPTS, CorpusError, pack, read_manifest, token_dtype, unpack, write_npz


def first_user_turn(conversation: Conversation) -> Conversation | None:
    """The conversation up to its first user turn (a system turn before it is kept)."""
    for i, message in enumerate(conversation):
        if message["role"] == "user":
            return [dict(m) for m in conversation[: i + 1]] if message["content"].strip() else None
    return None


@dataclasses.dataclass
class PromptSet:
    """Rendered prompts in corpus order, with where each one came from."""

    ids: list[list[int]]
    keys: list[str]  # conversation_key of the prompt, first 16 hex digits
    source: list[int]  # index into ``sources``
    position: list[int]  # record position within its source (after unreadable records)
    sources: list[dict]

    def __len__(self) -> int:
        return len(self.ids)


def collect_prompts(
    paths: Iterable[str | os.PathLike],
    tokenizer,
    max_prompt_tokens: int = 1536,
    seed: int = 0,
    progress: bool = True,
) -> PromptSet:
    """Every usable prompt of ``paths`` (files or folders, any format the trainer reads).

    Usable: a non-empty first user turn, not an exact repeat of an earlier prompt, at most
    ``max_prompt_tokens`` tokens once rendered with the chat template and generation prompt.
    The order is a seeded shuffle, so the first shards are a balanced sample of all sources."""
    from tqdm.auto import tqdm

    from ..chat import has_chat_template, render

    sources = expand_sources(list(paths))
    if not sources:
        raise CorpusError("no prompt files given")
    templated = has_chat_template(tokenizer)
    entries: list[tuple[Conversation, int, int]] = []
    source_stats: list[dict] = []
    seen: set[str] = set()
    for s, (source, fmt, _from_folder) in enumerate(sources):
        try:
            convs, stats = read_file(source, fmt)
        except ValueError as err:
            raise CorpusError(f"cannot read prompts from {source}: {err}") from None
        info = {"file": os.path.basename(source) if not source.startswith("hf:") else source,
                "records": len(convs) + stats.total_skipped, "unreadable": stats.total_skipped,
                "no_prompt": 0, "duplicates": 0, "too_long": 0, "usable": 0}
        for position, conv in enumerate(convs):
            prompt = first_user_turn(conv)
            if prompt is None:
                info["no_prompt"] += 1
                continue
            key = conversation_key(prompt)
            if key in seen:
                info["duplicates"] += 1
                continue
            seen.add(key)
            entries.append((prompt, s, position))
        source_stats.append(info)

    texts = [render(tokenizer, prompt, add_generation_prompt=True) for prompt, _, _ in entries]
    ids_all: list[list[int]] = []
    for start in tqdm(range(0, len(texts), 512), desc="tokenize prompts", disable=not progress, unit="batch"):
        ids_all += tokenizer(texts[start:start + 512], add_special_tokens=not templated)["input_ids"]
    kept = []
    for (prompt, s, position), ids in zip(entries, ids_all):
        if len(ids) > max_prompt_tokens:
            source_stats[s]["too_long"] += 1
            continue
        source_stats[s]["usable"] += 1
        kept.append((list(ids), conversation_key(prompt)[:16], s, position))
    if not kept:
        raise CorpusError(f"no usable prompt in {[src for src, _, _ in sources]}")
    random.Random(seed).shuffle(kept)
    return PromptSet(
        ids=[k[0] for k in kept], keys=[k[1] for k in kept], source=[k[2] for k in kept],
        position=[k[3] for k in kept], sources=source_stats,
    )


def save_prompts(folder: Path, prompts: PromptSet, vocab_size: int) -> str:
    flat, offsets = pack(prompts.ids, token_dtype(vocab_size))
    write_npz(folder / PROMPTS, {
        "ids": flat, "offsets": offsets,
        "keys": np.array(prompts.keys, dtype="S16"),
        "source": np.array(prompts.source, dtype=np.int32),
        "position": np.array(prompts.position, dtype=np.int64),
    })
    return _prompts_hash(prompts.ids)


def _prompts_hash(ids: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for seq in ids:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"\xff" * 8)
    return h.hexdigest()


def load_prompts(folder: str | os.PathLike) -> PromptSet:
    folder = Path(folder)
    manifest = read_manifest(folder)
    with np.load(folder / PROMPTS) as z:
        ids = unpack(z["ids"], z["offsets"])
        keys = [k.decode() for k in z["keys"].tolist()]
        source, position = z["source"].tolist(), z["position"].tolist()
    return PromptSet(ids, keys, source, position, manifest["prompts"]["sources"])
