"""The one place where conversations become token ids and a loss mask.

``loss_mask`` is 1 exactly on the tokens of assistant turns: the reply's content and the
template's end-of-turn token that follows it (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in
Llama-3, ``<end_of_turn>`` in Gemma, ``</s>`` in Mistral), and 0 on everything else: system and
user turns, the assistant header (``<|im_start|>assistant\\n``) and the whitespace a template
writes after the end-of-turn token (which the model never generates).

It works for any chat template without template-specific string hacks: the conversation is
rendered incrementally with the tokenizer's own template (``tokenize=False``); the text an
assistant turn adds is the difference between the rendering of the conversation up to and
including that turn and the rendering of the conversation before it *with* the generation
prompt (which is the assistant header). Character spans are mapped to tokens with the fast
tokenizer's offset mapping. Templates whose earlier text changes as the conversation grows
(the prefix property fails) fall back to locating the reply's text in the full rendering and
extending it over the special tokens that follow it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from .conversations import Conversation, has_assistant


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(self.loss_mask))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The conversation as text, with the tokenizer's chat template (the same rendering as
    :meth:`prism_spec.targets.hf.Target.render_chat`). Without a template (base models) the
    turns are joined with newlines."""
    if has_chat_template(tokenizer):
        if not messages:
            try:
                return tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=False) or ""
            except Exception:  # many templates index messages[0]
                return ""
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return "\n".join(m["content"] for m in messages)


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def assistant_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans [start, end) of the assistant replies in it)."""
    full = render(tokenizer, conversation, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    if not has_chat_template(tokenizer):
        cursor = 0
        for m in conversation:
            start = full.find(m["content"], cursor)
            if start < 0:
                continue
            cursor = start + len(m["content"])
            if m["role"] == "assistant":
                spans.append((start, cursor))
        return full, spans

    specials = None
    cursor = 0
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        prev = render(tokenizer, conversation[:i], add_generation_prompt=False)
        before = render(tokenizer, conversation[:i], add_generation_prompt=True)
        after = render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        if full.startswith(after) and after.startswith(prev):
            if after.startswith(before):
                start = len(before)
            else:  # the generation prompt differs from the header the turn is rendered with
                start = max(len(prev), len(os.path.commonprefix([before, after])))
            end = len(after.rstrip())
            if cursor <= start < end:
                spans.append((start, end))
                cursor = end
                continue
        # Fallback: find the reply's text, then take the special tokens right after it.
        if specials is None:
            specials = _special_strings(tokenizer)
        content = m["content"]
        start = full.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = full.find(content, cursor) if content else -1
        if start < 0:
            warnings.warn(
                f"assistant turn {i} not found in the rendered conversation; it gets no loss",
                stacklevel=2,
            )
            continue
        end = start + len(content)
        extended = True
        while extended:
            extended = False
            for s in specials:
                if full.startswith(s, end):
                    end += len(s)
                    extended = True
                    break
        spans.append((start, end))
        cursor = end
    return full, spans


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask = []
    k = 0
    for s, _e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        mask.append(1 if k < len(spans) and spans[k][0] <= s < spans[k][1] else 0)
    return mask


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int | None = None) -> TokenizedExample:
    """Token ids of the conversation rendered with the tokenizer's chat template, and a loss
    mask that is 1 exactly on assistant-turn tokens (see the module docstring).

    A conversation without assistant turns (prompt-only) is rendered with the generation
    prompt and gets an all-zero mask. The result is cut to ``max_length`` tokens."""
    if not conversation:
        raise ValueError("empty conversation")
    templated = has_chat_template(tokenizer)
    if has_assistant(conversation):
        text, spans = assistant_spans(tokenizer, conversation)
    else:
        text, spans = render(tokenizer, conversation, add_generation_prompt=True), []
    # The template writes BOS itself; without a template the tokenizer adds its specials.
    add_special = not templated
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = _mask_from_offsets(enc["offset_mapping"], spans)
    else:  # slow tokenizer: tokenize span by span
        ids, mask, pos = [], [], 0
        pieces = []
        for a, b in spans:
            pieces += [(text[pos:a], 0), (text[a:b], 1)]
            pos = b
        pieces.append((text[pos:], 0))
        if add_special:
            ids = tokenizer("", add_special_tokens=True)["input_ids"]
            mask = [0] * len(ids)
        for piece, flag in pieces:
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                mask += [flag] * len(piece_ids)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask)


def tokenize_conversations(
    tokenizer,
    conversations: Iterable[Conversation],
    max_length: int | None = None,
    drop_unmasked: bool = False,
    progress: bool = False,
) -> list[TokenizedExample]:
    """:func:`tokenize_conversation` over many; ``drop_unmasked`` leaves out examples with no
    loss token (prompt-only ones, or replies cut away by ``max_length``)."""
    from tqdm.auto import tqdm

    out = []
    for conv in tqdm(conversations, desc="tokenize", disable=not progress):
        ex = tokenize_conversation(tokenizer, conv, max_length)
        if drop_unmasked and not ex.num_loss_tokens:
            continue
        out.append(ex)
    return out
