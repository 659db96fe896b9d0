"""Response regeneration: let the target answer prompt-only conversations.

Drafters trained on the target's own outputs match its distribution better than ones trained
on other models' answers. :func:`regenerate_responses` fills a reply after every user turn that
has none (a multi-turn prompt list is answered turn by turn, each reply conditioned on the
earlier ones), batched through ``target.model.generate`` with left padding, greedy or sampled.

Resumable: each finished conversation is appended to ``out_path`` as one JSONL line
``{"key": sha256 of the input conversation, "conversation": [...] | null, "status":
"ok" | "empty" | "too_long", "finish": ["stop" | "length", ...]}`` and flushed; a rerun skips
keys already there. A partially written last line (a crash mid-write) is cut off and redone.
Use another ``out_path`` for other generation settings.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..targets.attention import attention_backends
from .chat import has_chat_template, render
from .conversations import Conversation, conversation_key, strip_think_blocks


def _first_unanswered(conv: Conversation) -> int | None:
    for i, m in enumerate(conv):
        if m["role"] == "user" and (i + 1 == len(conv) or conv[i + 1]["role"] != "assistant"):
            return i
    return None


def _unanswered_count(conv: Conversation) -> int:
    return sum(
        1
        for i, m in enumerate(conv)
        if m["role"] == "user" and (i + 1 == len(conv) or conv[i + 1]["role"] != "assistant")
    )


def read_done(out_path: str | os.PathLike) -> dict[str, dict]:
    """Records already in ``out_path`` by key; cuts off a partial last line in place."""
    path = Path(out_path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done: dict[str, dict] = {}
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[str(record["key"])] = record
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        warnings.warn(f"{path}: ignored {bad} unreadable lines; those conversations are redone", stacklevel=2)
    return done


def _generate(target, prompts: list[Conversation], gen_config, max_prompt_tokens: int | None):
    """Replies (text, finish reason) for a batch of prompts, or None for over-long ones."""
    tok = target.tokenizer
    texts = [render(tok, p, add_generation_prompt=True) for p in prompts]
    templated = has_chat_template(tok)
    encoded = [tok(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    results: list[tuple[str, str] | None] = [None] * len(prompts)
    keep = [i for i, ids in enumerate(encoded) if max_prompt_tokens is None or len(ids) <= max_prompt_tokens]
    if not keep:
        return results
    pad_id = gen_config.pad_token_id
    width = max(len(encoded[i]) for i in keep)
    input_ids = torch.full((len(keep), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(keep), width), dtype=torch.long)
    for row, i in enumerate(keep):  # left padding
        ids = encoded[i]
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    with torch.inference_mode(), attention_backends(target.device):  # the cache grows every step
        out = target.model.generate(
            input_ids=input_ids.to(target.device),
            attention_mask=attention_mask.to(target.device),
            generation_config=gen_config,
        )
    new = out[:, width:].tolist()
    eos = set(gen_config.eos_token_id or [])
    for row, i in enumerate(keep):
        ids = new[row]
        stop = next((j for j, t in enumerate(ids) if t in eos), None)
        finish = "stop" if stop is not None else "length"
        ids = ids[:stop] if stop is not None else ids
        results[i] = (tok.decode(ids, skip_special_tokens=True).strip(), finish)
    return results


def regenerate_responses(
    target,
    conversations: Sequence[Conversation],
    out_path: str | os.PathLike,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    strip_think: bool = False,
    regenerate_all: bool = False,
    max_prompt_tokens: int | None = None,
    progress: bool = True,
) -> list[Conversation]:
    """Fill the missing assistant replies of ``conversations`` with the target's own.

    Conversations with nothing to answer pass through unchanged (and are not written), unless
    ``regenerate_all``, which drops every assistant turn first and regenerates them all.
    ``temperature`` 0 is greedy; otherwise sampled with ``top_p`` / ``top_k`` (0 = off).
    Prompts longer than ``max_prompt_tokens`` and conversations whose reply comes out empty
    (after ``strip_think``) are recorded and left out. Returns the finished conversations in
    input order."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tok = target.tokenizer
    if tok is None:
        raise ValueError("regeneration needs a target with a tokenizer")
    eos = sorted(target.eos_token_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
        **({"temperature": temperature, "top_p": top_p, "top_k": top_k} if sampling else {}),
    )
    if sampling:
        torch.manual_seed(seed)

    inputs: list[Conversation] = []
    for conv in conversations:
        conv = [dict(m) for m in conv]
        if regenerate_all:
            conv = [m for m in conv if m["role"] != "assistant"]
        inputs.append(conv)
    keys = [conversation_key(c) for c in inputs]
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(path)

    todo = [i for i, c in enumerate(inputs) if _first_unanswered(c) is not None and keys[i] not in done]
    # Shortest first prompts together: less padding.
    todo.sort(key=lambda i: len(render(tok, inputs[i][: _first_unanswered(inputs[i]) + 1], True)))
    replies_needed = sum(_unanswered_count(inputs[i]) for i in todo)
    bar = tqdm(total=replies_needed, desc="regenerate", unit="reply", disable=not progress)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            work = {i: [dict(m) for m in inputs[i]] for i in chunk}
            finish: dict[int, list[str]] = {i: [] for i in chunk}
            status: dict[int, str] = {}
            while True:
                pending = [i for i in chunk if i not in status and _first_unanswered(work[i]) is not None]
                if not pending:
                    break
                cuts = {i: _first_unanswered(work[i]) + 1 for i in pending}
                results = _generate(target, [work[i][: cuts[i]] for i in pending], gen_config, max_prompt_tokens)
                for i, result in zip(pending, results):
                    if result is None:
                        status[i] = "too_long"
                        continue
                    text, why = result
                    if strip_think:
                        text = strip_think_blocks(text)
                    bar.update(1)
                    if not text:
                        status[i] = "empty"
                        continue
                    work[i].insert(cuts[i], {"role": "assistant", "content": text})
                    finish[i].append(why)
            for i in chunk:
                st = status.get(i, "ok")
                record = {
                    "key": keys[i],
                    "status": st,
                    "conversation": work[i] if st == "ok" else None,
                    "finish": finish[i],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                done[keys[i]] = record
    bar.close()

    out: list[Conversation] = []
    for i, conv in enumerate(inputs):
        if keys[i] in done:
            if done[keys[i]].get("status") == "ok" and done[keys[i]].get("conversation"):
                out.append(done[keys[i]]["conversation"])
        elif _first_unanswered(conv) is None:
            out.append(conv)
    return out
