"""The one drafter interface every method implements, and the registry of architectures.

A round, seen from the drafter:

1. ``begin`` (once, after prefill) or ``extend`` (after each verification) feeds the newly
   committed tokens -- with the target's features for the positions just before them -- and
   returns the drafter's logits for the token after the last one (the tree's first level).
2. ``expand`` is called once per tree level with the frontier tokens; ``parent_slots`` tells
   which earlier expansion (or -1: the last committed position) produced each node, and
   ``tree_mask`` which tree entries (earlier expansions plus the new ones) each node may see.
3. ``end_round`` throws the tree's KV away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch


class DrafterMismatchError(ValueError):
    """A drafter was built for a different target (vocabulary, hidden size, ...)."""


class Drafter(ABC):
    """Drafters work on a batch of sequences (rows); the single-sequence methods ``begin`` /
    ``extend`` / ``expand`` are the one-row case. A drafter implements either the ``*_batch``
    methods (and then serves batches) or only the single-sequence ones (then the decode loop
    can use it for one sequence at a time)."""

    #: What the drafter needs from the target's verify forward:
    #: None (tokens only), "last" (last hidden state) or a tuple of HF hidden_states indices.
    feature_layers: tuple[int, ...] | str | None = None
    #: Name shown in tables.
    method: str = "drafter"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for single, batch in (("begin", "begin_batch"), ("extend", "extend_batch"), ("expand", "expand_batch")):
            if getattr(cls, single) is getattr(Drafter, single) and getattr(cls, batch) is getattr(Drafter, batch):
                if not getattr(cls, "__abstractmethods__", None) and not cls.__name__.startswith("_"):
                    raise TypeError(f"{cls.__name__} must implement {single} or {batch}")

    # ------------------------------------------------------------- one sequence
    def begin(self, prompt_ids: torch.Tensor, first_token: int, features: torch.Tensor | None) -> torch.Tensor:
        """Reset, consume the prompt and the first generated token; return next-token logits [V]."""
        return self.begin_batch([prompt_ids], [first_token], [features])[0]

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Consume newly committed ``tokens`` [m]; ``features`` [m, h] are the target's features
        at the positions just before each token. Return logits [V] for the next token."""
        return self.extend_batch([tokens], [features])[0]

    def expand(
        self, tokens: torch.Tensor, parent_slots: torch.Tensor, tree_mask: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """Run one tree level: ``tokens`` [k] at tree depth ``depth``; return logits [k, V]."""
        return self.expand_batch(tokens[None], parent_slots[None], tree_mask[None], depth)[0]

    # ------------------------------------------------------------- batches
    def begin_batch(self, prompts: list[torch.Tensor], first_tokens: list[int], features: list) -> torch.Tensor:
        """``begin`` for B sequences (ragged prompts); returns logits [B, V]."""
        self._single_only(len(prompts))
        return self.begin(prompts[0], first_tokens[0], features[0])[None]

    def extend_batch(self, tokens: list[torch.Tensor], features: list) -> torch.Tensor:
        """``extend`` for B sequences (each row commits its own number of tokens); [B, V]."""
        self._single_only(len(tokens))
        return self.extend(tokens[0], features[0])[None]

    def expand_batch(
        self, tokens: torch.Tensor, parent_slots: torch.Tensor, tree_mask: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """``expand`` for B sequences: tokens / parent_slots [B, k], tree_mask [B, k, t]; [B, k, V]."""
        self._single_only(tokens.shape[0])
        return self.expand(tokens[0], parent_slots[0], tree_mask[0], depth)[None]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences leave the batch)."""
        self._single_only(2)

    def _single_only(self, batch: int) -> None:
        if batch != 1:
            raise NotImplementedError(f"{type(self).__name__} drafts for one sequence at a time")

    @abstractmethod
    def end_round(self) -> None:
        """Drop this round's tree entries from the drafter's caches."""

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map drafter vocabulary ids to target ids (identity unless the vocabulary is reduced)."""
        return draft_ids

    def check_target(self, target) -> None:
        """Raise DrafterMismatchError when this drafter cannot serve ``target``."""

    def pack_weights(self) -> int:
        """On a CPU, run the drafter's linear layers on prepacked weights (see
        :mod:`prism_spec.targets.packed`); returns how many layers changed. Loaders call it when
        the target's weights are packed."""
        return 0


def follow_target_packing(drafter: Drafter, target) -> Drafter:
    """Prepack the drafter's CPU weights when the target's are (load_target's default)."""
    if getattr(target, "packed_weights", False):
        drafter.pack_weights()
    return drafter


REGISTRY: dict[str, Callable] = {}


def register(architecture: str):
    """Class decorator: make a drafter loadable from a checkpoint whose config names it."""

    def wrap(cls):
        REGISTRY[architecture] = cls
        return cls

    return wrap
