"""The llama.cpp engine, on the default target's own GGUF and on a tiny random GGUF the tests
write (``tiny_gguf_path``, fast): its vanilla decoding is llama.cpp's plain greedy decoding,
speculative decoding on it equals its vanilla decoding token for token, T>0 draws from its
distribution, and what it cannot do fails clearly."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers import NoisyDrafter, chi_square_pvalue, require_llama_cpp, tiny_gguf  # noqa: E402

llama_cpp = require_llama_cpp()
from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, StandardDrafter, prism_config  # noqa: E402
from prism_spec.drafters.resolve import resolve_drafter  # noqa: E402
from prism_spec.runtime import (  # noqa: E402
    DecodeOptions,
    GenerationConfig,
    SamplingConfig,
    TreeConfig,
    generate,
    generate_batch,
)
from prism_spec.runtime.verify import target_probs  # noqa: E402
from prism_spec.targets import load_target  # noqa: E402
from prism_spec.targets.hf import Target, resolve_engine  # noqa: E402
from prism_spec.targets.llamacpp import (  # noqa: E402
    DEFAULT_MAX_N_CTX,
    KV_TYPES,
    LlamaCppTarget,
    load_llamacpp_target,
    plain_greedy,
    plain_llama,
    requantize,
)

QUESTIONS = ["Write a short poem about the sea.", "What is 17 times 23? Explain step by step.",
             "def fibonacci(n):"]
MAX_NEW = 32
N_TINY_SAMPLES = 600


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    try:
        return load_target(engine="llama.cpp", threads=2)
    except RuntimeError as error:  # the default target's wheel is missing
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.encode_prompt(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def vanilla(engine, prompts):
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    return [generate(engine, p, None, config).token_ids for p in prompts]


def test_vanilla_is_llama_cpps_own_greedy_decoding(engine, prompts, vanilla):
    plain = plain_llama(engine)
    for prompt, ours in zip(prompts, vanilla):
        assert ours == plain_greedy(plain, prompt, MAX_NEW)


@pytest.mark.parametrize("tree", ["4/0/3", "10/3/3", "chain:4"])
@pytest.mark.parametrize("drafter_kind", ["packaged", "standard", "untrained-prism"])
def test_speculative_equals_vanilla(engine, prompts, vanilla, tree, drafter_kind):
    if drafter_kind == "packaged":
        drafter = resolve_drafter("auto", engine).drafter
    elif drafter_kind == "standard":
        drafter = StandardDrafter.from_target_layers(engine, 1)
    else:
        torch.manual_seed(0)
        drafter = FeatureDrafter(FeatureDrafterModel(prism_config(engine), engine))
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    options = DecodeOptions(TreeConfig.parse(tree))
    for prompt, expected in zip(prompts, vanilla):
        result = generate(engine, prompt, drafter, config, options)
        assert result.token_ids == expected
        if drafter_kind == "packaged":
            assert result.acceptance_length > 1.0  # drafts really are accepted on the engine's features


def test_what_the_engine_cannot_do_is_refused(engine, prompts):
    with pytest.raises(ValueError, match="one sequence at a time"):
        generate_batch(engine, prompts[:2], None, GenerationConfig(max_new_tokens=4))
    star = FeatureDrafter(FeatureDrafterModel(prism_config(engine, input_layers=[1, 15, 28]), engine))
    with pytest.raises(ValueError, match="intermediate target layers"):
        generate(engine, prompts[0], star, GenerationConfig(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="logits come from its forward"):
        engine.logits(torch.zeros(1, engine.hidden_size))


def test_engine_choice():
    assert resolve_engine("model.gguf") == "llama.cpp"
    assert resolve_engine("org/model") == "torch"
    assert resolve_engine("smollm2-135m", "llama.cpp") == "llama.cpp"
    with pytest.raises(ValueError, match="runs GGUF files"):
        resolve_engine("org/model", "llama.cpp")
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("org/model", "vllm")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_target("/nonexistent/model.gguf")


@pytest.mark.slow
def test_sampling_matches_the_engines_distribution(engine, prompts):
    """First two tokens at T=1 with top-k 3 (a small exact support), speculative with a
    1-layer standard drafter, against the distribution computed from the engine's logits."""
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    prompt = prompts[0]

    def probs(ids):
        kv = engine.new_kv(1)
        ids = torch.tensor(ids)
        out = engine.forward(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths,
                                   logits=False, logit_rows=torch.tensor([len(ids) - 1]), features=False)
        return target_probs(out.logits[0, 0], cfg)

    drafter = StandardDrafter.from_target_layers(engine, 1)
    n = 600
    seen: dict[tuple[int, int], int] = {}
    options = DecodeOptions(TreeConfig(depth=1, top_k=3, total_tokens=4))
    for seed in range(n):
        config = GenerationConfig(max_new_tokens=2, stop_on_eos=False, seed=seed, sampling=cfg)
        a, b = generate(engine, prompt, drafter, config, options).token_ids
        seen[(a, b)] = seen.get((a, b), 0) + 1
    first = probs(prompt)
    cells, expected = [], []
    for a in torch.nonzero(first).flatten().tolist():
        second = probs(prompt + [a])
        for b in torch.nonzero(second).flatten().tolist():
            cells.append(seen.pop((a, b), 0))
            expected.append(float(first[a]) * float(second[b]))
    assert not seen, f"samples outside the support: {seen}"
    p = chi_square_pvalue(np.array(cells), np.array(expected), n)
    assert p > 0.001, p


def test_demo_shows_llama_cpp_plain_vanilla_and_speculative_side_by_side(engine, capsys):
    from prism_spec.cli import main

    rc = main(["demo", "--engine", "llama.cpp", "--threads", "2", "--tree", "chain:2", "--max-new-tokens", "16",
               "--no-warmup"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "engine: llama.cpp" in err
    rows = {line.split()[0] for line in out.splitlines() if line.split()}
    assert {"llama.cpp", "vanilla", "speculative"} <= rows
    assert "vs llama.cpp" in out and "identical    yes" in out


# --------------------------------------------------------------------------- a tiny GGUF
# A random 2-layer Llama (hidden 64, float32, the default target's tokenizer) written by the
# tests: the engine on a GGUF that is not the default target, with its companion de-quantised
# by transformers, in seconds. One thread on both sides: llama.cpp's threads meet at a barrier
# after every op, and on a busy 2-core machine a second thread made this model's decoding
# ~70x slower (230 ms a token instead of 3); torch's second thread cost 2.5x.


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf_path, one_thread):
    return load_llamacpp_target(tiny_gguf_path, threads=1)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_engine):
    return [tiny_engine.encode_prompt(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny_vanilla(tiny_engine, tiny_prompts):
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    return [generate(tiny_engine, p, None, config).token_ids for p in tiny_prompts]


def last_logits(engine, ids) -> torch.Tensor:
    """The engine's next-token logits after ``ids`` (a fresh KV cache)."""
    kv = engine.new_kv(1)
    ids = torch.tensor(ids)
    out = engine.forward(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths,
                               logits=False, logit_rows=torch.tensor([len(ids) - 1]), features=False)
    return out.logits[0, 0]


def test_tiny_forward_outputs_only_what_is_asked(tiny_engine, tiny_prompts):
    ids = torch.tensor(tiny_prompts[0])
    kv = tiny_engine.new_kv(1)
    out = tiny_engine.forward(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths,
                              logits=False, logit_rows=torch.tensor([len(ids) - 1]), features=False)
    assert out.features is None and out.logits.shape == (1, 1, tiny_engine.vocab_size)
    kv = tiny_engine.new_kv(1)
    out = tiny_engine.forward(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths)
    assert out.features.shape == (1, len(ids), tiny_engine.hidden_size)
    assert out.logits.shape == (1, len(ids), tiny_engine.vocab_size)


def test_tiny_gguf_loads_with_a_companion_of_the_same_model(tiny_engine, tiny_prompts):
    assert (tiny_engine.vocab_size, tiny_engine.hidden_size, tiny_engine.max_context) == (49152, 64, 512)
    assert tiny_engine.num_layers == 2 and tiny_engine.eos_token_ids == {2}
    assert tiny_engine.decode(tiny_prompts[0], skip_special_tokens=False).startswith("<|im_start|>system")
    # The companion (transformers' de-quantised copy, which drafters read) is the engine's model:
    # the same logits up to llama.cpp's rounding (float16 KV cache): measured 0.4% of the largest
    # logit, and 140% with Q and K left in llama.cpp's rope order (transformers permutes them back).
    prompt = torch.tensor(tiny_prompts[0])
    kv = tiny_engine.new_kv(1)
    ours = tiny_engine.forward(prompt[None], torch.arange(len(prompt))[None], kv.cache, None,
                                     kv.lengths).logits[0]
    with torch.no_grad():
        theirs = tiny_engine.model(prompt[None]).logits[0]
    assert (ours - theirs).abs().max() < 0.02 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    # Not degenerate: some entropy at T=1, far from uniform (ln 49152 = 10.8 nats).
    probs = torch.softmax(ours.double(), -1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    assert 0.5 < float(entropy.mean()) < 6.0, entropy


def test_requantize_writes_a_model_llama_cpp_decodes(tiny_gguf_path, tiny_engine, tiny_prompts, tmp_path):
    """``requantize`` (the llama.cpp-speed benchmark's --quant) writes the same model in another
    type through llama.cpp's quantiser, completely or not at all, and refuses unknown types."""
    out = requantize(tiny_gguf_path, tmp_path / "tiny.q8_0.gguf", "Q8_0", threads=1)
    assert out.is_file() and not list(tmp_path.glob("*.partial"))
    assert out.stat().st_size < 0.5 * tiny_gguf_path.stat().st_size  # float32 in, ~8.5 bits a weight out
    engine = load_llamacpp_target(out, threads=1)
    ours, reference = last_logits(engine, tiny_prompts[0]), last_logits(tiny_engine, tiny_prompts[0])
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()  # the same model, rounded
    with pytest.raises(ValueError, match="unknown quantisation 'Q3_X'"):
        requantize(tiny_gguf_path, tmp_path / "x.gguf", "Q3_X")
    with pytest.raises(FileNotFoundError):
        requantize(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q4_0")


def verified_against_stepped(engine, prefix: list[int], chain: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``chain[0]`` after ``prefix``: as row 0 of a verify forward over ``chain``
    and from a one-token step."""
    rows = []
    for tokens in (chain, chain[:1]):
        kv = engine.new_kv(1)
        ids = torch.tensor(prefix)
        engine.forward(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths, logits=False,
                       logit_rows=torch.tensor([len(ids) - 1]), features=False)
        kv.commit([torch.arange(len(ids))])
        n = len(tokens)
        out = engine.forward(torch.tensor(tokens)[None], (len(prefix) + torch.arange(n))[None], kv.cache,
                             torch.ones(1, n, n, dtype=torch.bool).tril(), kv.lengths, features=False)
        rows.append(out.logits[0, 0])
    return rows[0], rows[1]


def test_q8_0_kv_gives_a_verified_token_its_one_token_steps_logits(tmp_path, tiny_prompts):
    """With two threads and more than 256 cells in use, llama.cpp's float16 KV cache sends a
    one-token step to its split-KV attention kernel and a verify forward to the per-row one;
    a q8_0 cache sends both to the per-row kernel, so the logits agree bit for bit. (Quantised
    weights, as the default target's: float32 ones take other matrix kernels for several rows.)"""
    f32 = tiny_gguf(tmp_path / "tiny-heads-of-32.gguf", heads=2, kv_heads=1)  # q8_0 blocks: 32 values
    path = requantize(f32, tmp_path / "tiny-heads-of-32.q4_1.gguf", "Q4_1", threads=1)
    companion = load_llamacpp_target(f32, threads=1)
    companion = Target(companion.model, companion.tokenizer)
    prefix = (tiny_prompts[0] * 40)[:300]
    f16 = LlamaCppTarget(path, companion, threads=2)
    verified, stepped = verified_against_stepped(f16, prefix, [17, 23, 31])
    assert not torch.equal(verified, stepped)  # the split-KV kernel really runs here
    del f16
    engine = LlamaCppTarget(path, companion, threads=2, kv_type="q8_0")
    assert engine.kv_type == "q8_0" and plain_llama(engine).context_params.type_k == KV_TYPES["q8_0"]
    verified, stepped = verified_against_stepped(engine, prefix, [17, 23, 31])
    assert torch.equal(verified, stepped)


def test_row_invariant_loads_a_q8_0_kv_cache(tiny_gguf_path, monkeypatch):
    import prism_spec.targets.llamacpp as llamacpp

    seen = {}
    monkeypatch.setattr(llamacpp, "LlamaCppTarget", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(llamacpp, "_companion_from_gguf", lambda path: None)
    load_target(str(tiny_gguf_path), row_invariant=True)
    assert seen["kv_type"] == "q8_0"
    load_target(str(tiny_gguf_path))
    assert seen["kv_type"] == "f16"


def test_kv_types_are_checked(tiny_gguf_path, tiny_engine):
    companion = Target(tiny_engine.model, tiny_engine.tokenizer)
    with pytest.raises(ValueError, match="unknown KV cache type 'q4_k'"):
        LlamaCppTarget(tiny_gguf_path, companion, threads=1, kv_type="q4_k")
    with pytest.raises(ValueError, match="blocks of 32 values: this model's attention heads have 16"):
        LlamaCppTarget(tiny_gguf_path, companion, threads=1, kv_type="q8_0")


def test_tiny_gguf_context_is_its_trained_one_capped(tiny_gguf_path, tiny_engine, monkeypatch):
    """The context defaults to the model's trained one (512 here), at most DEFAULT_MAX_N_CTX:
    llama.cpp allocates the whole KV cache up front, and GGUFs declare up to 128k positions."""
    companion = Target(tiny_engine.model, tiny_engine.tokenizer)
    monkeypatch.setattr(companion.config, "max_position_embeddings", 131072)
    assert LlamaCppTarget(tiny_gguf_path, companion, threads=1).max_context == DEFAULT_MAX_N_CTX
    assert LlamaCppTarget(tiny_gguf_path, companion, n_ctx=1024, threads=1).max_context == 1024


def test_tiny_vanilla_is_llama_cpps_own_greedy_decoding(tiny_engine, tiny_prompts, tiny_vanilla):
    plain = plain_llama(tiny_engine)
    for prompt, ours in zip(tiny_prompts, tiny_vanilla):
        assert len(set(ours)) > MAX_NEW // 2  # a real continuation, not one token repeated
        assert ours == plain_greedy(plain, prompt, MAX_NEW)


@pytest.mark.parametrize("tree", ["4/0/3", "10/3/3", "chain:4"])
@pytest.mark.parametrize("drafter_kind", ["standard", "untrained-prism", "noisy-self"])
def test_tiny_speculative_equals_vanilla(tiny_engine, tiny_prompts, tiny_vanilla, tree, drafter_kind):
    if drafter_kind == "standard":  # the first layer: a few drafts accepted (AL ~1.1)
        drafter = StandardDrafter.from_target_layers(tiny_engine, 1)
    elif drafter_kind == "untrained-prism":  # no draft accepted
        torch.manual_seed(0)
        drafter = FeatureDrafter(FeatureDrafterModel(prism_config(tiny_engine), tiny_engine))
    else:  # the whole model plus noise: paths of every depth accepted and rejected (AL 1.3-2.4)
        drafter = NoisyDrafter(StandardDrafter.from_target_layers(tiny_engine, 2), scale=2.0, seed=0)
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    options = DecodeOptions(TreeConfig.parse(tree))
    accepted, rounds = 0, 0
    for prompt, expected in zip(tiny_prompts, tiny_vanilla):
        result = generate(tiny_engine, prompt, drafter, config, options)
        assert result.token_ids == expected
        accepted, rounds = accepted + sum(result.accepted), rounds + len(result.accepted)
    if drafter_kind == "standard":
        assert accepted > 0  # rounds that commit accepted tree paths
    elif drafter_kind == "noisy-self":
        assert accepted > 0.3 * rounds


def test_tiny_sampling_matches_the_engines_distribution(tiny_engine, tiny_prompts):
    """First three tokens at T=1 with top-k 4 (a small exact support), speculative with a
    1-layer standard drafter on depth-1 trees of 3 drafts, against the distribution computed
    from the engine's one-sequence logits. The third token comes from an accepted draft's logits
    (computed inside the tree: a wrong tree mask puts samples outside the support) or from the
    next round (after the KV commit). Measured with these N and seeds: p = 0.41; a bonus drawn
    from p instead of the residual gives p ~ 5e-15, accepting with min(1, 2p) ~ 6e-50,
    sampling at T=0.8 ~ 2e-5, the engine ignoring the tree mask p = 0."""
    cfg = SamplingConfig(temperature=1.0, top_k=4)
    prompt = tiny_prompts[0]
    drafter = StandardDrafter.from_target_layers(tiny_engine, 1)
    n = N_TINY_SAMPLES
    seen: dict[tuple[int, ...], int] = {}
    accepted = 0
    options = DecodeOptions(TreeConfig(depth=1, top_k=3, total_tokens=4))
    for seed in range(n):
        config = GenerationConfig(max_new_tokens=3, stop_on_eos=False, seed=seed, sampling=cfg)
        result = generate(tiny_engine, prompt, drafter, config, options)
        seen[tuple(result.token_ids)] = seen.get(tuple(result.token_ids), 0) + 1
        accepted += result.accepted[0]
    assert accepted > 0.2 * n  # the second token often is an accepted draft, the third its bonus
    cells, expected = [], []

    def walk(prefix: list[int], prob: float) -> None:  # every 3-token continuation in the support
        if len(prefix) == 3:
            cells.append(seen.pop(tuple(prefix), 0))
            expected.append(prob)
            return
        probs = target_probs(last_logits(tiny_engine, prompt + prefix), cfg)
        for token in torch.nonzero(probs).flatten().tolist():
            walk(prefix + [token], prob * float(probs[token]))

    walk([], 1.0)
    assert not seen, f"samples outside the support: {seen}"
    p = chi_square_pvalue(np.array(cells), np.array(expected), n)
    print(f"chi-square p = {p:.3g} (N = {n}, accepted drafts in the first round per sample {accepted / n:.2f})")
    assert p > 0.001, p
