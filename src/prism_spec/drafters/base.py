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
    """Drafters work on a batch of sequences (rows); the single-sequence methods ``begin`` /
    ``extend`` / ``expand`` are the one-row case. A drafter implements either the ``*_batch``
    methods (and then serves batches) or only the single-sequence ones (then the decode loop
    can use it for one sequence at a time)."""

    #: What the drafter needs from the target's verify forward:
    #: None (tokens only), "last" (last hidden state) or a tuple of HF hidden_states indices.
    feature_layers: tuple[int, ...] | str | None = None
    #: Name shown in tables.
    method: str = "drafter"
    #: Whether it drafts for several sequences at once (it implements the ``*_batch`` methods);
    #: set for every subclass from what it implements.
    supports_batches: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.supports_batches = cls.expand_batch is not Drafter.expand_batch
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

    def use_static_cache(self, capacity: int | None, cuda_graphs: bool = False) -> None:
        """Follow the target's cache mode: a preallocated KV cache of ``capacity`` positions
        (None: a growing one), optionally replayed as CUDA graphs. Drafters without a cache
        of their own ignore it."""

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


# ----------------------------------------------------------------- the registry
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
