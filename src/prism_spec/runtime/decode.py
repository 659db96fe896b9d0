"""The decode loop: prefill, then rounds of draft tree -> verify -> accept -> update caches.

Vanilla decoding is the same loop with no drafter: every round's "tree" is only the root, so
one target forward commits exactly one token. Everything a speedup is measured against goes
through this one function. It decodes a batch of sequences (one is the common case): each
row has its own tree and accepted length, and the caches are ragged (``RaggedCache``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.profiler import record_function

from ..devices import synchronize
from ..drafters.base import Drafter
from ..targets.hf import Target
from ..targets.masks import pad_ragged
from .tree import DraftTree, DraftTreeBatch, TreeConfig, draft_tree_batch
from .verify import SamplingConfig, verify_greedy, verify_sampling


STATIC_CACHE_STEP = 256  # static KV caches are sized in multiples of this


#: The seeds a torch.Generator takes (signed or unsigned 64-bit).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


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
    # Polled once per round; True ends this sequence with finish_reason "cancelled" (a server
    # client that went away), without disturbing the other rows of its batch.
    cancelled: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    # Preallocate the target's KV cache (transformers StaticCache, written in place) instead of
    # growing it: fixed addresses for CUDA graphs / torch.compile, no per-step copy of the cache.
    static_cache: bool = False

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (64 bits), got {self.seed}")


@dataclass
class GenerationResult:
    prompt_len: int
    token_ids: list[int]  # generated tokens (the stop token included when it is EOS)
    finish_reason: str  # "eos", "stop", "length", "context" or "cancelled"
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


def stream_generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    drafter: Drafter | None = None,
    configs: GenerationConfig | Sequence[GenerationConfig] | None = None,
) -> Iterator[tuple[int, list[int]] | list[GenerationResult]]:
    """Decode several sequences together; yield ``(row, tokens)`` whenever a row commits
    tokens, then the list of GenerationResults (prompt order).

    Each row has its own tree, accepted length, sampling settings and stop conditions (one
    GenerationConfig per row, or one for all; the tree shape comes from the first); rows that
    finish leave the batch. Each row's output is what decoding it alone would give.
    """
    batch = len(prompts)
    if batch == 0:
        raise PromptError("no prompts")
    if configs is None or isinstance(configs, GenerationConfig):
        configs = [configs or GenerationConfig()] * batch
    if len(configs) != batch:
        raise ValueError(f"{len(configs)} generation configs for {batch} prompts")
    device = target.device
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten().to(device) for p in prompts]
    for i, prompt in enumerate(prompts):
        which = "the prompt" if batch == 1 else f"prompt {i}"
        if prompt.numel() == 0:
            raise PromptError(f"{which} is empty")
        if prompt.numel() >= target.max_context:
            raise PromptError(
                f"{which} has {prompt.numel()} tokens but the target's context holds {target.max_context}"
            )
    if drafter is not None:
        drafter.check_target(target)
        if batch > 1 and not drafter.supports_batches:
            raise ValueError(f"{type(drafter).__name__} drafts for one sequence at a time: decode one prompt per call")
    generators = []
    for cfg in configs:
        gen = None
        if not cfg.sampling.greedy:
            gen = torch.Generator()
            gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        generators.append(gen)
    tree_shape = configs[0].tree
    features_spec = drafter.feature_layers if drafter is not None else None
    layers = features_spec if isinstance(features_spec, tuple) else None

    def pick(row: int, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        cfg = configs[row]
        if cfg.sampling.greedy:
            return verify_greedy(tree, logits)
        return verify_sampling(tree, logits, cfg.sampling, generators[row])

    def drafter_features(out, i, rows):
        if features_spec is None:
            return None
        return (out.layer_features if layers else out.features)[i, rows]

    # Prefill: right-padded prompts, causal; padding never enters the committed region.
    start = time.perf_counter()
    padded, prompt_lens = pad_ragged(prompts)
    capacity = None
    if configs[0].static_cache:
        longest = int(prompt_lens.max()) + max(c.max_new_tokens for c in configs) + tree_shape.total_tokens + 1
        # Rounded up, so a compiled decoder sees few distinct cache sizes.
        capacity = min(-(-longest // STATIC_CACHE_STEP) * STATIC_CACHE_STEP, target.max_context)
    kv = target.new_kv(batch, capacity)
    positions = torch.arange(padded.shape[1], device=device).expand_as(padded)
    # Logits only at each prompt's last position: the LM head over every prompt token is waste.
    out = target.forward_batch(padded, positions, kv.cache, None, kv.lengths, feature_layers=layers, logits=False,
                               logit_rows=prompt_lens - 1, features=features_spec is not None)
    kv.commit([torch.arange(int(n), device=device) for n in prompt_lens])
    roots = [pick(b, DraftTree.root_only(0, device), out.logits[b])[1] for b in range(batch)]
    if drafter is not None:
        # The target's cache mode and CUDA graphs carry over to the drafter's own cache.
        drafter.use_static_cache(kv.capacity if configs[0].static_cache else None,
                                 cuda_graphs=configs[0].static_cache and target.uses_cuda_graphs)
        root_logits = drafter.begin_batch(
            prompts, roots, [drafter_features(out, b, slice(0, int(n))) for b, n in enumerate(prompt_lens)]
        )
    synchronize(device)
    prefill_s = time.perf_counter() - start
    results = [GenerationResult(prompt_len=int(n), token_ids=[], finish_reason="length", prefill_s=prefill_s)
               for n in prompt_lens]

    active = list(range(batch))  # batch row i decodes sequence active[i]
    new_tokens = [[r] for r in roots]
    while True:
        # Commit each row's tokens (EOS / max_new_tokens / stop strings); finished rows leave.
        still = []
        for i, row in enumerate(active):
            committed, finished = _commit(target, results[row], new_tokens[i], configs[row])
            if committed:
                yield row, committed
            if finished is None and int(kv.lengths[i]) + 1 >= kv.capacity:
                finished = "context"
            if finished is None:
                still.append(i)
            else:
                results[row].finish_reason = finished
                results[row].total_s = time.perf_counter() - start
        if not still:
            break
        if len(still) < len(active):
            rows = torch.tensor(still, device=device)
            kv.keep_rows(rows)
            if drafter is not None:
                drafter.keep_rows(rows)
                root_logits = root_logits[rows]
            active, roots = [active[i] for i in still], [roots[i] for i in still]

        # Draft one tree per row.
        t0 = time.perf_counter()
        roots_t = torch.tensor(roots, device=device)
        if drafter is None:
            trees = DraftTreeBatch.roots_only(roots_t)
        else:
            # Tree nodes that fit: the root and drafted tokens take positions lengths.., and the
            # bonus token after the deepest accepted node needs a position too.
            room = kv.capacity - int(kv.lengths.max()) - 1
            shape = tree_shape
            if shape.total_tokens > room:
                shape = TreeConfig(min(shape.depth, room - 1), shape.top_k, room)
            with record_function("draft_tree"):
                trees = draft_tree_batch(drafter, roots_t, root_logits, shape)
                drafter.end_round()
        synchronize(device)
        t1 = time.perf_counter()

        # Verify every tree in one target forward, accept a path per row, keep its KV entries.
        # (The LM head runs for every node: at these tree sizes its cost is reading its weights
        # once, so computing only the nodes acceptance visits, one at a time, is slower.)
        with record_function("verify_forward"):
            out = target.forward_batch(
                trees.tokens, kv.lengths[:, None] + trees.depths, kv.cache, trees.ancestor_mask(), kv.lengths, layers,
                features=features_spec is not None,
            )
        paths, new_tokens, features = [], [], []
        with record_function("accept"):
            for i, row in enumerate(active):
                tree = trees.row(i)
                path, bonus = pick(row, tree, out.logits[i])
                if configs[row].on_round is not None:
                    configs[row].on_round(tree, out.logits[i])
                path_t = torch.tensor(path, device=device)
                paths.append(path_t)
                new_tokens.append(tree.tokens[path_t[1:]].tolist() + [bonus])
                features.append(drafter_features(out, i, path_t))
                result = results[row]
                result.accepted.append(len(path) - 1)
                result.tree_depths.append(int(tree.depths.max()))
                result.tree_sizes.append(tree.size)
                result.exhausted.append(not bool((tree.parents == path[-1]).any()))
        with record_function("cache_commit"):
            kv.commit(paths)
        if drafter is not None:
            with record_function("drafter_extend"):
                root_logits = drafter.extend_batch([torch.tensor(t, device=device) for t in new_tokens], features)
        synchronize(device)
        t2 = time.perf_counter()
        for row in active:  # rows share the round's wall time
            results[row].draft_s += t1 - t0
            results[row].verify_s += t2 - t1
        roots = [t[-1] for t in new_tokens]

    kv.release()
    if target.tokenizer is not None:
        for result in results:
            result.text = target.decode(result.token_ids)
    yield results


def _commit(target: Target, result: GenerationResult, tokens: list[int], config: GenerationConfig):
    """Append a round's tokens to ``result``, cut at EOS / max_new_tokens / stop strings;
    returns (the tokens committed, the finish reason or None)."""
    if config.cancelled is not None and config.cancelled():
        return [], "cancelled"
    finished = None
    eos = target.eos_token_ids if config.stop_on_eos else ()
    for i, tok in enumerate(tokens):
        if tok in eos:
            tokens, finished = tokens[: i + 1], "eos"
            break
    room = config.max_new_tokens - len(result.token_ids)
    if len(tokens) >= room:
        tokens, finished = tokens[:room], finished or "length"
    result.token_ids.extend(tokens)
    if config.stop_strings and target.tokenizer is not None and finished != "eos":
        cut = _stop_string_cut(target, result.token_ids, len(tokens), config.stop_strings)
        if cut is not None:
            tokens = tokens[: len(tokens) - (len(result.token_ids) - cut)]
            result.token_ids = result.token_ids[:cut]
            finished = "stop"
    return tokens, finished


def stream_generate(
    target: Target,
    prompt_ids: Sequence[int] | torch.Tensor,
    drafter: Drafter | None = None,
    config: GenerationConfig | None = None,
) -> Iterator[list[int] | GenerationResult]:
    """One sequence: yield each round's committed tokens as a list, then the GenerationResult."""
    for item in stream_generate_batch(target, [prompt_ids], drafter, config):
        yield item[0] if isinstance(item, list) else item[1]


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


def generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    drafter: Drafter | None = None,
    configs: GenerationConfig | Sequence[GenerationConfig] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> list[GenerationResult]:
    """Decode several prompts together (batched speculative decoding); results in prompt order."""
    for item in stream_generate_batch(target, prompts, drafter, configs):
        if isinstance(item, list):
            return item
        if on_tokens is not None:
            on_tokens(*item)
    raise AssertionError("unreachable")
