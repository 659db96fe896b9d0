"""The llama.cpp engine on the default target's own GGUF: its vanilla decoding is llama.cpp's
plain greedy decoding, speculative decoding on it equals its vanilla decoding token for token,
T>0 draws from its distribution, and what it cannot do fails clearly."""

from __future__ import annotations


import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")

from helpers import chi_square_pvalue  # noqa: E402
from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, StandardDrafter, prism_config  # noqa: E402
from prism_spec.drafters.resolve import resolve_drafter  # noqa: E402
from prism_spec.runtime import GenerationConfig, SamplingConfig, TreeConfig, generate, generate_batch  # noqa: E402
from prism_spec.runtime.verify import target_probs  # noqa: E402
from prism_spec.targets import load_target  # noqa: E402
from prism_spec.targets.hf import resolve_engine  # noqa: E402
from prism_spec.targets.llamacpp import plain_greedy, plain_llama  # noqa: E402

QUESTIONS = ["Write a short poem about the sea.", "What is 17 times 23? Explain step by step.",
             "def fibonacci(n):"]
MAX_NEW = 32


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
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False, tree=TreeConfig.parse(tree))
    for prompt, expected in zip(prompts, vanilla):
        result = generate(engine, prompt, drafter, config)
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
        out = engine.forward_batch(ids[None], torch.arange(len(ids))[None], kv.cache, None, kv.lengths,
                                   logits=False, logit_rows=torch.tensor([len(ids) - 1]), features=False)
        return target_probs(out.logits[0, 0], cfg)

    drafter = StandardDrafter.from_target_layers(engine, 1)
    n = 600
    seen: dict[tuple[int, int], int] = {}
    for seed in range(n):
        config = GenerationConfig(max_new_tokens=2, stop_on_eos=False, seed=seed, sampling=cfg,
                                  tree=TreeConfig(depth=1, top_k=3, total_tokens=4))
        a, b = generate(engine, prompt, drafter, config).token_ids
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
