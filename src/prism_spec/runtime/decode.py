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

from ..devices import profiled, synchronize
from ..drafters.base import Drafter
from ..targets.hf import Target
from ..targets.masks import pad_ragged
from .tree import DraftTree, DraftTreeBatch, TreeConfig, draft_tree
from .verify import SamplingConfig, verify_greedy, verify_sampling


STATIC_CACHE_STEP = 256  # static KV caches are sized in multiples of this


#: The seeds a torch.Generator takes (signed or unsigned 64-bit).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass
class GenerationConfig:
    """What one sequence asks for: its length, sampling and stop conditions. In a batch every
    sequence has its own."""

    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_strings: Sequence[str] = ()
    stop_on_eos: bool = True
    seed: int | None = None
    # Called after each verification with (tree, target logits at every node); for tracing
    # and tree autotuning, None in normal use.
    on_round: Callable[[DraftTree, torch.Tensor], None] | None = field(default=None, repr=False, compare=False)
    # Polled once per round; True ends this sequence with finish_reason "cancelled" (a server
    # client that went away), without disturbing the other rows of its batch.
    cancelled: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (64 bits), got {self.seed}")


@dataclass
class DecodeOptions:
    """How a call decodes, the same for every sequence of a batch: the draft tree's shape and
    the target's KV cache mode. Neither changes what is generated."""

    tree: TreeConfig = field(default_factory=lambda: TreeConfig.parse("cpu"))
    # Preallocate the target's KV cache (transformers StaticCache, written in place) instead of
    # growing it: fixed addresses for CUDA graphs / torch.compile, no per-step copy of the cache.
    static_cache: bool = False


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
    options: DecodeOptions | None = None,
) -> Iterator[tuple[int, list[int]] | list[GenerationResult]]:
    """Decode several sequences together; yield ``(row, tokens)`` whenever a row commits
    tokens, then the list of GenerationResults (prompt order).

    Each row has its own tree, accepted length and GenerationConfig (one per row, or one for
    all); ``options`` hold what the whole batch shares. Rows that finish leave the batch. Each
    row's output is what decoding it alone would give.
    """
    run = _BatchDecode(target, checked_prompts(target, prompts), drafter, configs, options or DecodeOptions())
    run.prefill()
    while True:
        yield from run.commit()
        if not run.active:
            break
        trees = run.draft()
        run.verify_and_accept(trees)
    yield run.finish()


def checked_prompts(target: Target, prompts: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
    """The prompts as 1-D id tensors on the target's device; PromptError for an empty one or
    one the target's context cannot hold with a token more."""
    if len(prompts) == 0:
        raise PromptError("no prompts")
    checked = [torch.as_tensor(p, dtype=torch.long).flatten().to(target.device) for p in prompts]
    for i, prompt in enumerate(checked):
        which = "the prompt" if len(checked) == 1 else f"prompt {i}"
        if prompt.numel() == 0:
            raise PromptError(f"{which} is empty")
        if prompt.numel() >= target.max_context:
            raise PromptError(
                f"{which} has {prompt.numel()} tokens but the target's context holds {target.max_context}"
            )
    return checked


class _BatchDecode:
    """The state of one batched decode: the target's KV cache, the rows still decoding
    (``active[i]`` is the sequence in batch row i), each row's root token and the drafter's
    logits after it, and the results."""

    def __init__(self, target: Target, prompts: list[torch.Tensor], drafter: Drafter | None,
                 configs: GenerationConfig | Sequence[GenerationConfig] | None, options: DecodeOptions):
        batch = len(prompts)
        if configs is None or isinstance(configs, GenerationConfig):
            configs = [configs or GenerationConfig()] * batch
        if len(configs) != batch:
            raise ValueError(f"{len(configs)} generation configs for {batch} prompts")
        if drafter is not None:
            drafter.check_target(target)
            if batch > 1 and not drafter.supports_batches:
                raise ValueError(
                    f"{type(drafter).__name__} drafts for one sequence at a time: decode one prompt per call"
                )
        self.target, self.prompts, self.drafter, self.configs, self.options = target, prompts, drafter, configs, options
        self.device = target.device
        self.eos_token_ids = target.eos_token_ids  # read once: a property that walks configs
        self.generators = []
        for cfg in configs:
            gen = None
            if not cfg.sampling.greedy:
                gen = torch.Generator()
                gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
            self.generators.append(gen)
        spec = drafter.feature_layers if drafter is not None else None
        self.wants_features = spec is not None
        self.layers = spec if isinstance(spec, tuple) else None  # intermediate target layers, if any
        self.active = list(range(batch))
        self.results: list[GenerationResult] = []
        # A round of vanilla decoding: the tree of the root alone (its token is not read) and
        # the accepted path through it.
        self.root_tree = DraftTree.root_only(0, self.device)
        self.root_path = torch.zeros(1, dtype=torch.long, device=self.device)

    def pick(self, row: int, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        """Sequence ``row``'s accepted path through ``tree`` and the token after it."""
        cfg = self.configs[row]
        if cfg.sampling.greedy:
            return verify_greedy(tree, logits)
        return verify_sampling(tree, logits, cfg.sampling, self.generators[row])

    def drafter_features(self, out, i: int, rows):
        """What the drafter reads of batch row ``i``'s target outputs at positions ``rows``."""
        if not self.wants_features:
            return None
        return (out.layer_features if self.layers else out.features)[i, rows]

    def prefill(self) -> None:
        """Run the prompts (right-padded, causal: padding never enters the committed region),
        choose each first token and start the drafter."""
        target, options, device = self.target, self.options, self.device
        self.start = time.perf_counter()
        padded, prompt_lens = pad_ragged(self.prompts)
        capacity = None
        if options.static_cache:
            longest = (int(prompt_lens.max()) + max(c.max_new_tokens for c in self.configs)
                       + options.tree.total_tokens + 1)
            # Rounded up, so a compiled decoder sees few distinct cache sizes.
            capacity = min(-(-longest // STATIC_CACHE_STEP) * STATIC_CACHE_STEP, target.max_context)
        self.kv = kv = target.new_kv(len(self.prompts), capacity)
        positions = torch.arange(padded.shape[1], device=device).expand_as(padded)
        # Logits only at each prompt's last position: the LM head over every prompt token is waste.
        out = target.forward(padded, positions, kv.cache, None, kv.lengths, feature_layers=self.layers, logits=False,
                             logit_rows=prompt_lens - 1, features=self.wants_features)
        kv.commit([torch.arange(int(n), device=device) for n in prompt_lens])
        self.roots = [self.pick(b, self.root_tree, out.logits[b])[1] for b in range(len(self.prompts))]
        if self.drafter is not None:
            # The target's cache mode and CUDA graphs carry over to the drafter's own cache.
            self.drafter.use_static_cache(kv.capacity if options.static_cache else None,
                                          cuda_graphs=options.static_cache and target.uses_cuda_graphs)
            self.root_logits = self.drafter.begin(
                self.prompts, self.roots,
                [self.drafter_features(out, b, slice(0, int(n))) for b, n in enumerate(prompt_lens)],
            )
        synchronize(device)
        prefill_s = time.perf_counter() - self.start
        self.results = [GenerationResult(prompt_len=int(n), token_ids=[], finish_reason="length", prefill_s=prefill_s)
                        for n in prompt_lens]
        self.new_tokens = [[r] for r in self.roots]

    def commit(self) -> Iterator[tuple[int, list[int]]]:
        """Commit each row's new tokens (cut at EOS / max_new_tokens / stop strings), yielding
        ``(row, tokens)``; rows that finish leave the batch."""
        kv, still = self.kv, []
        for i, row in enumerate(self.active):
            committed, finished = _commit(self.target, self.results[row], self.new_tokens[i], self.configs[row],
                                          self.eos_token_ids)
            if committed:
                yield row, committed
            if finished is None and int(kv.lengths[i]) + 1 >= kv.capacity:
                finished = "context"
            if finished is None:
                still.append(i)
            else:
                self.results[row].finish_reason = finished
                self.results[row].total_s = time.perf_counter() - self.start
        if still and len(still) < len(self.active):
            rows = torch.tensor(still, device=self.device)
            kv.keep_rows(rows)
            if self.drafter is not None:
                self.drafter.keep_rows(rows)
                self.root_logits = self.root_logits[rows]
            self.roots = [self.roots[i] for i in still]
        self.active = [self.active[i] for i in still]

    def draft(self) -> DraftTreeBatch:
        """One draft tree per row (only the root without a drafter: vanilla decoding)."""
        self.t_draft = time.perf_counter()
        roots = torch.tensor(self.roots, device=self.device)
        if self.drafter is None:
            trees = DraftTreeBatch.roots_only(roots)
        else:
            # Tree nodes that fit: the root and drafted tokens take positions lengths.., and the
            # bonus token after the deepest accepted node needs a position too.
            shape = self.options.tree.fitting(self.kv.capacity - int(self.kv.lengths.max()) - 1)
            with profiled("draft_tree"):
                trees = draft_tree(self.drafter, roots, self.root_logits, shape)
                self.drafter.end_round()
        synchronize(self.device)
        return trees

    def verify_and_accept(self, trees: DraftTreeBatch) -> None:
        """Verify every tree in one target forward, accept a path per row, keep its KV entries
        and feed the committed tokens to the drafter."""
        device, kv = self.device, self.kv
        t_verify = time.perf_counter()
        # (The LM head runs for every node: at these tree sizes its cost is reading its weights
        # once, so computing only the nodes acceptance visits, one at a time, is slower.)
        with profiled("verify_forward"):
            out = self.target.forward(
                trees.tokens, kv.lengths[:, None] + trees.depths, kv.cache, trees.ancestor_mask(), kv.lengths,
                self.layers, features=self.wants_features,
            )
        paths, self.new_tokens, features = [], [], []
        # Rounds of the root alone (vanilla decoding) and paths that accept nothing skip the
        # tensor bookkeeping: on a fast engine a decode step is ~8 ms and every op here ~1% of it.
        roots_only = trees.tokens.shape[1] == 1
        with profiled("accept"):
            for i, row in enumerate(self.active):
                tree = self.root_tree if roots_only else trees.row(i)
                path, bonus = self.pick(row, tree, out.logits[i])
                if self.configs[row].on_round is not None:
                    self.configs[row].on_round(trees.row(i), out.logits[i])
                path_t = self.root_path if len(path) == 1 else torch.tensor(path, device=device)
                paths.append(path_t)
                self.new_tokens.append(tree.tokens[path_t[1:]].tolist() + [bonus] if len(path) > 1 else [bonus])
                features.append(self.drafter_features(out, i, path_t))
                result = self.results[row]
                result.accepted.append(len(path) - 1)
                result.tree_depths.append(0 if roots_only else int(tree.depths.max()))
                result.tree_sizes.append(len(tree.tokens))
                result.exhausted.append(roots_only or not bool((tree.parents == path[-1]).any()))
        with profiled("cache_commit"):
            kv.commit(paths)
        if self.drafter is not None:
            with profiled("drafter_extend"):
                self.root_logits = self.drafter.extend([torch.tensor(t, device=device) for t in self.new_tokens],
                                                       features)
        synchronize(device)
        done = time.perf_counter()
        for row in self.active:  # rows share the round's wall time
            self.results[row].draft_s += t_verify - self.t_draft
            self.results[row].verify_s += done - t_verify
        self.roots = [t[-1] for t in self.new_tokens]

    def finish(self) -> list[GenerationResult]:
        self.kv.release()
        if self.target.tokenizer is not None:
            for result in self.results:
                result.text = self.target.decode(result.token_ids)
        return self.results


def _commit(target: Target, result: GenerationResult, tokens: list[int], config: GenerationConfig,
            eos_token_ids: set[int]):
    """Append a round's tokens to ``result``, cut at EOS / max_new_tokens / stop strings;
    returns (the tokens committed, the finish reason or None)."""
    if config.cancelled is not None and config.cancelled():
        return [], "cancelled"
    finished = None
    eos = eos_token_ids if config.stop_on_eos else ()
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
    options: DecodeOptions | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Generate for one prompt with speculative decoding (vanilla decoding when ``drafter`` is
    None); ``on_tokens`` receives each round's committed tokens as they come."""
    for item in stream_generate_batch(target, [prompt_ids], drafter, config, options):
        if isinstance(item, list):
            return item[0]
        if on_tokens is not None:
            on_tokens(item[1])
    raise AssertionError("unreachable")


def generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    drafter: Drafter | None = None,
    configs: GenerationConfig | Sequence[GenerationConfig] | None = None,
    options: DecodeOptions | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> list[GenerationResult]:
    """Decode several prompts together (batched speculative decoding); results in prompt order.
    ``on_tokens(row, tokens)`` receives each row's committed tokens as they come."""
    for item in stream_generate_batch(target, prompts, drafter, configs, options):
        if isinstance(item, list):
            return item
        if on_tokens is not None:
            on_tokens(*item)
    raise AssertionError("unreachable")
