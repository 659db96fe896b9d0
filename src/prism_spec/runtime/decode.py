"""The decode loop: prefill, then rounds of draft tree -> verify -> accept -> update caches.

Vanilla decoding is the same loop with no drafter: every round's "tree" is only the root, so
one target forward commits exactly one token. Everything a speedup is measured against goes
through this one function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..drafters.base import Drafter
from ..targets.hf import Target, keep_in_cache
from .tree import DraftTree, TreeConfig, draft_tree
from .verify import SamplingConfig, verify_greedy, verify_sampling


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=lambda: TreeConfig.parse("cpu"))
    stop_strings: Sequence[str] = ()
    stop_on_eos: bool = True
    seed: int | None = None
    # Called after each verification with (tree, target logits at every node); for tracing
    # and tree autotuning, None in normal use.
    on_round: Callable[[DraftTree, torch.Tensor], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    prompt_len: int
    token_ids: list[int]  # generated tokens (the stop token included when it is EOS)
    finish_reason: str  # "eos", "stop", "length" or "context"
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted per round
    tree_depths: list[int] = field(default_factory=list)  # deepest drafted level per round
    # Per round: True when the last accepted node had no children in the tree, i.e. the
    # round ended because the draft ran out, not because the target rejected a draft.
    exhausted: list[bool] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    text: str | None = None

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per verify forward, bonus included (the first token, which
        prefill produces for every method, is not counted). Vanilla is 1.0."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0


class PromptError(ValueError):
    """An empty prompt or one that does not fit in the target's context."""


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_generate(
    target: Target,
    prompt_ids: Sequence[int] | torch.Tensor,
    drafter: Drafter | None = None,
    config: GenerationConfig | None = None,
) -> Iterator[list[int] | GenerationResult]:
    """Yield each round's committed tokens as a list, then the final GenerationResult."""
    config = config or GenerationConfig()
    sampling = config.sampling
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().to(target.device)
    if prompt.numel() == 0:
        raise PromptError("the prompt is empty")
    if prompt.numel() >= target.max_context:
        raise PromptError(
            f"the prompt has {prompt.numel()} tokens but the target's context holds {target.max_context}"
        )
    if drafter is not None:
        drafter.check_target(target)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator()
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    eos = target.eos_token_ids if config.stop_on_eos else set()
    features_spec = drafter.feature_layers if drafter is not None else None
    layers = features_spec if isinstance(features_spec, tuple) else None

    def pick(logits: torch.Tensor) -> tuple[list[int], int]:
        if sampling.greedy:
            return verify_greedy(tree, logits)
        return verify_sampling(tree, logits, sampling, generator)

    def drafter_features(out, rows):
        if features_spec is None:
            return None
        return (out.layer_features if layers else out.features)[rows]

    start = time.perf_counter()
    cache = target.new_cache()
    out = target.forward(prompt, torch.arange(prompt.numel(), device=target.device), cache, feature_layers=layers)
    tree = DraftTree.root_only(0, target.device)  # lets `pick` sample the first token
    _, root = pick(out.logits[-1:])
    if drafter is not None:
        root_logits = drafter.begin(prompt, root, drafter_features(out, slice(None)))
    _sync(target.device)
    result = GenerationResult(prompt_len=prompt.numel(), token_ids=[], finish_reason="length")
    result.prefill_s = time.perf_counter() - start

    new_tokens = [root]
    root_pos = prompt.numel()  # position of the root: everything before it is in the cache
    while True:
        # Commit this round's tokens, cutting at EOS / max_new_tokens / stop strings.
        finished = None
        for i, tok in enumerate(new_tokens):
            if tok in eos:
                new_tokens, finished = new_tokens[: i + 1], "eos"
                break
        room = config.max_new_tokens - len(result.token_ids)
        if len(new_tokens) >= room:
            new_tokens, finished = new_tokens[:room], finished or "length"
        result.token_ids.extend(new_tokens)
        if config.stop_strings and target.tokenizer is not None and finished != "eos":
            cut = _stop_string_cut(target, result.token_ids, len(new_tokens), config.stop_strings)
            if cut is not None:
                new_tokens = new_tokens[: len(new_tokens) - (len(result.token_ids) - cut)]
                result.token_ids = result.token_ids[:cut]
                finished = "stop"
        if new_tokens:
            yield new_tokens
        if finished is None and root_pos + 1 >= target.max_context:
            finished = "context"
        if finished is not None:
            result.finish_reason = finished
            break

        # Draft.
        t0 = time.perf_counter()
        tree_cfg = config.tree
        # Tree nodes that fit: the root and drafted tokens take positions root_pos.., and the
        # bonus token after the deepest accepted node needs a position too (< max_context).
        room_in_context = target.max_context - root_pos - 1
        if drafter is None:
            tree = DraftTree.root_only(root, target.device)
        else:
            if tree_cfg.total_tokens > room_in_context:
                tree_cfg = TreeConfig(min(tree_cfg.depth, room_in_context - 1), tree_cfg.top_k, room_in_context)
            tree = draft_tree(drafter, root, root_logits, tree_cfg)
            drafter.end_round()
        _sync(target.device)
        t1 = time.perf_counter()

        # Verify all tree nodes in one target forward, then accept a path.
        out = target.forward(
            tree.tokens, tree.positions(root_pos), cache, tree.ancestor_mask(), feature_layers=layers
        )
        path, bonus = pick(out.logits)
        if config.on_round is not None:
            config.on_round(tree, out.logits)
        path_t = torch.tensor(path, device=target.device)
        keep_in_cache(cache, root_pos, path_t)
        accepted = tree.tokens[path_t[1:]].tolist()
        new_tokens = accepted + [bonus]
        if drafter is not None:
            root_logits = drafter.extend(
                torch.tensor(new_tokens, device=target.device), drafter_features(out, path_t)
            )
        _sync(target.device)
        t2 = time.perf_counter()

        result.accepted.append(len(accepted))
        result.tree_depths.append(int(tree.depths.max()))
        result.exhausted.append(not bool((tree.parents == path[-1]).any()))
        result.tree_sizes.append(tree.size)
        result.draft_s += t1 - t0
        result.verify_s += t2 - t1
        root_pos += len(path)
        root = bonus

    result.total_s = time.perf_counter() - start
    if target.tokenizer is not None:
        result.text = target.decode(result.token_ids)
    yield result


def _stop_string_cut(target: Target, token_ids: list[int], n_new: int, stops: Sequence[str]) -> int | None:
    """Token count to keep when a stop string appears in text touched by the newest tokens."""
    # Decode a window wide enough to contain any stop string that ends in the new tokens.
    window = n_new + max(len(s) for s in stops) + 2
    start = max(0, len(token_ids) - window)
    text = target.decode(token_ids[start:], skip_special_tokens=False)
    if not any(s in text for s in stops):
        return None
    # Smallest number of tokens whose text contains a stop string.
    for keep in range(start + 1, len(token_ids) + 1):
        piece = target.decode(token_ids[start:keep], skip_special_tokens=False)
        if any(s in piece for s in stops):
            return keep
    return len(token_ids)


def generate(
    target: Target,
    prompt_ids: Sequence[int] | torch.Tensor,
    drafter: Drafter | None = None,
    config: GenerationConfig | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Generate with speculative decoding (or vanilla decoding when ``drafter`` is None)."""
    for item in stream_generate(target, prompt_ids, drafter, config):
        if isinstance(item, GenerationResult):
            return item
        if on_tokens is not None:
            on_tokens(item)
    raise AssertionError("unreachable")
