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
    #: What the drafter needs from the target's verify forward:
    #: None (tokens only), "last" (last hidden state) or a tuple of HF hidden_states indices.
    feature_layers: tuple[int, ...] | str | None = None
    #: Name shown in tables.
    method: str = "drafter"

    @abstractmethod
    def begin(self, prompt_ids: torch.Tensor, first_token: int, features: torch.Tensor | None) -> torch.Tensor:
        """Reset, consume the prompt and the first generated token; return next-token logits [V]."""

    @abstractmethod
    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Consume newly committed ``tokens`` [m]; ``features`` [m, h] are the target's features
        at the positions just before each token. Return logits [V] for the next token."""

    @abstractmethod
    def expand(
        self, tokens: torch.Tensor, parent_slots: torch.Tensor, tree_mask: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """Run one tree level: ``tokens`` [k] at tree depth ``depth``; return logits [k, V]."""

    @abstractmethod
    def end_round(self) -> None:
        """Drop this round's tree entries from the drafter's caches."""

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map drafter vocabulary ids to target ids (identity unless the vocabulary is reduced)."""
        return draft_ids

    def check_target(self, target) -> None:
        """Raise DrafterMismatchError when this drafter cannot serve ``target``."""


REGISTRY: dict[str, Callable] = {}


def register(architecture: str):
    """Class decorator: make a drafter loadable from a checkpoint whose config names it."""

    def wrap(cls):
        REGISTRY[architecture] = cls
        return cls

    return wrap
