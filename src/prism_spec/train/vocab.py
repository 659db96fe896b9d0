"""EAGLE-3-style reduced draft vocabulary: the N most frequent assistant tokens of the
training data (the drafter's ``d2t`` map; see ``FeatureDrafterConfig.draft_vocab_size``)."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from .features import example_ids_and_mask


def _example_arrays(example: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids, bool mask) of a TokenizedExample / train-loop Example / dict / plain id list
    (no mask: every token)."""
    ids, mask = example_ids_and_mask(example)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def count_tokens(examples: Iterable[Any], vocab_size: int) -> torch.Tensor:
    """Token frequencies [vocab_size] (int64) over the loss-masked (assistant) tokens of
    tokenized ``examples`` (objects with ``input_ids`` / ``loss_mask``, dicts with those keys,
    or plain id lists). An example without a mask counts all its tokens; if no token at all is
    masked (e.g. only prompt-only examples), every token of every example is counted instead."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    everything = np.zeros(vocab_size, dtype=np.int64)
    chunks, all_chunks, pending = [], [], 0

    def flush():
        nonlocal chunks, all_chunks, pending
        for src, dst in ((chunks, counts), (all_chunks, everything)):
            if src:
                ids = np.concatenate(src)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"token ids must lie in [0, {vocab_size}), found {ids.min()}..{ids.max()}")
                dst += np.bincount(ids, minlength=vocab_size)
        chunks, all_chunks, pending = [], [], 0

    for example in examples:
        ids, mask = _example_arrays(example)
        chunks.append(ids[mask])
        all_chunks.append(ids)
        pending += ids.size
        if pending >= 1 << 22:
            flush()
    flush()
    return torch.from_numpy(counts if counts.any() else everything)


def draft_vocab_from_counts(counts: torch.Tensor, size: int, include: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent ids of ``counts`` plus every id of ``include`` (which take
    the first places), ties broken by the lower id; returned sorted ascending (the d2t order)."""
    counts = torch.as_tensor(counts, dtype=torch.long).flatten()
    vocab = counts.numel()
    include = sorted({int(i) for i in include})
    if not 1 <= size <= vocab:
        raise ValueError(f"draft vocabulary size {size} must be in 1..{vocab} (the target vocabulary)")
    if include and (include[0] < 0 or include[-1] >= vocab):
        raise ValueError(f"include ids must lie in [0, {vocab}), got {include}")
    if len(include) > size:
        raise ValueError(f"{len(include)} ids to include do not fit a draft vocabulary of {size}")
    # Descending count, ascending id on ties (stable sort of the ids by -count).
    order = torch.sort(-counts, stable=True).indices
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[include] = True
    rest = order[~keep[order]][: size - len(include)]
    keep[rest] = True
    return keep.nonzero().flatten()


def build_draft_vocab(
    examples: Iterable[Any], target_vocab_size: int, size: int, include: Iterable[int] = ()
) -> torch.Tensor:
    """EAGLE-3's reduced vocabulary: the ``d2t`` LongTensor [size] (sorted ascending) of the
    ``size`` most frequent loss-masked tokens of ``examples`` (see :func:`count_tokens`), always
    containing the ids in ``include`` (pass the target's EOS ids: ``target.eos_token_ids``).
    Ties are broken by the lower id; if fewer than ``size`` distinct tokens occur, the lowest
    unseen ids fill the rest, so the result always has exactly ``size`` entries."""
    return draft_vocab_from_counts(count_tokens(examples, target_vocab_size), size, include)
