"""Padded batches for drafter training.

Both datasets yield dicts of 1-D/2-D tensors per example: :class:`TokenizedDataset` (online
mode: ``input_ids``, ``loss_mask``; features come from
:func:`prism_spec.train.features.capture_batch` in the loop) and
:class:`prism_spec.train.features.FeatureDataset` (offline mode: plus ``hidden`` and
``layers``). :func:`collate` right-pads either into one batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples (TokenizedExample, or dicts with ``input_ids`` / ``loss_mask``) as
    dicts of long tensors, cut to ``max_length``."""

    def __init__(self, examples: Sequence[Any], max_length: int | None = None):
        self.examples = examples
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        if isinstance(ex, dict):
            ids, mask = ex["input_ids"], ex.get("loss_mask")
        else:
            ids, mask = ex.input_ids, ex.loss_mask
        ids = torch.as_tensor(ids, dtype=torch.long)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        if self.max_length is not None:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        return {"input_ids": ids, "loss_mask": mask}

    def lengths(self) -> list[int]:
        out = []
        for ex in self.examples:
            n = len(ex["input_ids"] if isinstance(ex, dict) else ex.input_ids)
            out.append(min(n, self.max_length) if self.max_length is not None else n)
        return out


def collate(
    batch: Sequence[dict[str, torch.Tensor]],
    pad_token_id: int = 0,
    feature_dtype: torch.dtype | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    Returns ``input_ids`` [B, n] long (padded with ``pad_token_id``), ``attention_mask`` [B, n]
    long (1 on real tokens), ``loss_mask`` [B, n] long (0 on padding), and when every example
    has them ``hidden`` [B, n, h] and ``layers`` [B, n, k*h] (stored dtype, or
    ``feature_dtype``; zeros on padding). ``n`` is the longest example, capped at
    ``max_length``. Use ``functools.partial`` to set the options for a DataLoader."""
    if not batch:
        raise ValueError("empty batch")
    lengths = [int(ex["input_ids"].shape[0]) for ex in batch]
    n = max(lengths) if max_length is None else min(max(lengths), max_length)
    b = len(batch)
    out = {
        "input_ids": torch.full((b, n), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, n), dtype=torch.long),
        "loss_mask": torch.zeros((b, n), dtype=torch.long),
    }
    for key in ("hidden", "layers"):
        present = [key in ex and ex[key] is not None for ex in batch]
        if any(present) and not all(present):
            raise ValueError(f"some examples in the batch have {key!r} and some do not")
        if all(present):
            ref = batch[0][key]
            width = ref.shape[-1]
            if any(ex[key].shape[-1] != width for ex in batch):
                raise ValueError(f"{key!r} widths differ within the batch")
            out[key] = torch.zeros((b, n, width), dtype=feature_dtype or ref.dtype)
    for i, ex in enumerate(batch):
        m = min(lengths[i], n)
        out["input_ids"][i, :m] = ex["input_ids"][:m]
        out["attention_mask"][i, :m] = 1
        if ex.get("loss_mask") is not None:
            out["loss_mask"][i, :m] = ex["loss_mask"][:m]
        else:
            out["loss_mask"][i, :m] = 1
        for key in ("hidden", "layers"):
            if key in out:
                if ex[key].shape[0] != lengths[i]:
                    raise ValueError(f"{key!r} has {ex[key].shape[0]} rows for {lengths[i]} tokens")
                out[key][i, :m] = ex[key][:m].to(out[key].dtype)
    return out
