"""The one drafter interface every method implements, and the registry of architectures
(:class:`DrafterKind`: how each is loaded, trained and benched).

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
from dataclasses import dataclass
from typing import Callable

import torch


class DrafterMismatchError(ValueError):
    """A drafter was built for a different target (vocabulary, hidden size, ...)."""


class Drafter(ABC):
    """A drafter works on a batch of sequences (rows); one sequence is a batch of one.

    A drafter written for one sequence at a time subclasses :class:`SingleSequenceDrafter`
    instead, which adapts its three one-row methods to this interface."""

    #: What the drafter needs from the target's verify forward:
    #: None (tokens only), "last" (last hidden state) or a tuple of HF hidden_states indices.
    feature_layers: tuple[int, ...] | str | None = None
    #: Name shown in tables.
    method: str = "drafter"
    #: Whether it drafts for several sequences at once.
    supports_batches: bool = True

    @abstractmethod
    def begin(self, prompts: list[torch.Tensor], first_tokens: list[int], features: list) -> torch.Tensor:
        """Reset, then consume each row's prompt (ragged) and first generated token; ``features``
        are the target's features for the prompt positions (None when not needed). Returns the
        next-token logits [B, V]."""

    @abstractmethod
    def extend(self, tokens: list[torch.Tensor], features: list) -> torch.Tensor:
        """Consume each row's newly committed ``tokens`` [m_b] (rows commit different numbers);
        ``features`` [m_b, h] are the target's features at the positions just before each
        token. Returns the next-token logits [B, V]."""

    @abstractmethod
    def expand(
        self, tokens: torch.Tensor, parent_slots: torch.Tensor, tree_mask: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """Run one tree level: ``tokens`` / ``parent_slots`` [B, k] at tree depth ``depth``,
        ``tree_mask`` [B, k, t]; returns logits [B, k, V]."""

    @abstractmethod
    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences leave the batch)."""

    @abstractmethod
    def end_round(self) -> None:
        """Drop this round's tree entries from the drafter's caches."""

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map drafter vocabulary ids to target ids (identity unless the vocabulary is reduced)."""
        return draft_ids

    def check_target(self, target) -> None:
        """Raise DrafterMismatchError when this drafter cannot serve ``target``."""

    def use_static_cache(self, capacity: int | None, cuda_graphs: bool = False) -> None:
        """Follow the target's cache mode: a preallocated KV cache of ``capacity`` positions
        (None: a growing one), optionally replayed as CUDA graphs. Drafters without a cache
        of their own ignore it."""

    def pack_weights(self) -> int:
        """On a CPU, run the drafter's linear layers on prepacked weights (see
        :mod:`prism_spec.targets.packed`); returns how many layers changed. Loaders call it when
        the target's weights are packed."""
        return 0

    def use_int8_weights(self) -> int:
        """On a CPU, run the drafter's own linear layers and its head on int8 weights
        (:class:`prism_spec.targets.packed.Int8Linear`): cheaper draft steps, slightly
        different drafts, the same (lossless) output. Returns how many layers changed; 0 where
        the drafter or this machine cannot (drafters sharing the target's layers keep them)."""
        return 0


def follow_target_packing(drafter: Drafter, target) -> Drafter:
    """Prepack the drafter's CPU weights when the target's are (load_target's default)."""
    if getattr(target, "packed_weights", False):
        drafter.pack_weights()
    return drafter


# ----------------------------------------------------------------- the registry
class SingleSequenceDrafter(Drafter):
    """Base for a drafter that drafts for one sequence at a time: it implements ``begin_one``,
    ``extend_one`` and ``expand_one`` (the one-row forms of :class:`Drafter`'s methods, without
    the batch dimension), and the decode loop gives it one prompt per call."""

    supports_batches = False

    @abstractmethod
    def begin_one(self, prompt_ids: torch.Tensor, first_token: int, features: torch.Tensor | None) -> torch.Tensor:
        """Logits [V] after the prompt and the first generated token."""

    @abstractmethod
    def extend_one(self, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Logits [V] after the newly committed ``tokens`` [m]."""

    @abstractmethod
    def expand_one(
        self, tokens: torch.Tensor, parent_slots: torch.Tensor, tree_mask: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """Logits [k, V] for one tree level of ``tokens`` [k]."""

    def begin(self, prompts, first_tokens, features):
        self._one_row(len(prompts))
        return self.begin_one(prompts[0], first_tokens[0], features[0])[None]

    def extend(self, tokens, features):
        self._one_row(len(tokens))
        return self.extend_one(tokens[0], features[0])[None]

    def expand(self, tokens, parent_slots, tree_mask, depth):
        self._one_row(tokens.shape[0])
        return self.expand_one(tokens[0], parent_slots[0], tree_mask[0], depth)[None]

    def keep_rows(self, rows):
        self._one_row(2)  # one row never shrinks: the loop ends when it finishes

    def _one_row(self, batch: int) -> None:
        if batch != 1:
            raise NotImplementedError(f"{type(self).__name__} drafts for one sequence at a time")


@dataclass(frozen=True)
class Recipe:
    """A training recipe (``prism train --recipe NAME``): the partial training config (its
    ``drafter`` and ``stages`` sections) a run starts from."""

    name: str
    description: str
    config: Callable[[], dict]


@dataclass(frozen=True)
class BenchKind:
    """A ``prism bench`` method kind (``--method NAME=FOLDER``) whose drafter folders hold this
    architecture. ``multi_layer``: True when the drafter must read intermediate target layers
    (PRISM*), False when it must not, None either way."""

    name: str
    help: str
    multi_layer: bool | None = None


#: How a kind's drafters train: "feature" (a FeatureDrafterModel on the target's features,
#: the EAGLE/HASS/PRISM objectives) or "standard" (a small causal LM distilled on the
#: target's next-token distribution).
TRAINING_FAMILIES = ("feature", "standard")


@dataclass(frozen=True)
class DrafterKind:
    """Everything load, save, train and bench need to know about one drafter architecture."""

    architecture: str  # the name in a checkpoint's config.json
    load: Callable  # (folder: Path, config: dict, target) -> Drafter
    trains_as: str = "feature"  # one of TRAINING_FAMILIES
    recipes: tuple[Recipe, ...] = ()
    bench_kinds: tuple[BenchKind, ...] = ()

    def __post_init__(self):
        if self.trains_as not in TRAINING_FAMILIES:
            raise ValueError(f"trains_as must be one of {TRAINING_FAMILIES}, got {self.trains_as!r}")


#: architecture -> its kind. Read through the functions below (tests may add kinds to it).
REGISTRY: dict[str, DrafterKind] = {}


def register(kind: DrafterKind) -> DrafterKind:
    """Make an architecture loadable, its recipes trainable and its bench kinds benchable.
    Registering an architecture again replaces it; a recipe or bench-kind name already taken by
    another architecture is an error."""
    for other in REGISTRY.values():
        if other.architecture == kind.architecture:
            continue
        for what, mine, theirs in (("recipe", kind.recipes, other.recipes),
                                   ("bench kind", kind.bench_kinds, other.bench_kinds)):
            taken = {x.name for x in mine} & {x.name for x in theirs}
            if taken:
                raise ValueError(f"{what} {sorted(taken)[0]!r} already belongs to architecture {other.architecture!r}")
    REGISTRY[kind.architecture] = kind
    return kind


def drafter_kind(architecture: str | None) -> DrafterKind:
    """The registered kind of ``architecture``, or a ValueError listing the known ones."""
    if architecture not in REGISTRY:
        raise ValueError(f"unknown drafter architecture {architecture!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[architecture]


def registered_recipes() -> dict[str, tuple[DrafterKind, Recipe]]:
    """Recipe name -> (its kind, the recipe), over every registered architecture."""
    return {r.name: (kind, r) for kind in REGISTRY.values() for r in kind.recipes}


def registered_bench_kinds() -> dict[str, tuple[DrafterKind, BenchKind]]:
    """Bench method kind -> (its drafter kind, the bench kind)."""
    return {b.name: (kind, b) for kind in REGISTRY.values() for b in kind.bench_kinds}
