"""Acceptance rules: greedy on hand-built trees, sampling edge cases, and goodness-of-fit
tests showing speculative sampling draws exactly from the target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prism_spec.runtime.decode as decode
from helpers import NoisyDrafter, chi_square_pvalue, forward_one, tiny_llama
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, SamplingConfig, TreeConfig, generate
from prism_spec.runtime.tree import DraftTree
from prism_spec.runtime.verify import argmax_rows, target_probs, verify_greedy, verify_sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def t(values):
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------- sampling config


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-1), dict(top_k=-1)]
)
def test_sampling_config_rejects(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_sampling_config_greedy_flag():
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.7).greedy


def test_target_probs_temperature_topk_topp():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = target_probs(logits, SamplingConfig(temperature=1.0))
    assert p.dtype == torch.float64
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=1e-7)
    p = target_probs(logits, SamplingConfig(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits.double() / 0.5, -1), atol=1e-12)
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=1e-7)
    # top_p: drop a token once the mass before it reaches top_p.
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=1e-7)
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_p=0.81))
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95, atol=1e-7)
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_p=0.1))
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]
    # top_k then top_p, row-wise on a batch.
    batch = torch.stack([logits, logits.flip(0)])
    p = target_probs(batch, SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    assert torch.allclose(p[0], torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(p[1], torch.tensor([0, 0, 0.375, 0.625], dtype=torch.float64), atol=1e-7)


# --------------------------------------------------------------------------- greedy
#
#            0
#          /   \
#      1 (3)   2 (5)
#      /   \      \
#   3 (1) 4 (2)   5 (4)
#           |
#         6 (7)
TREE = DraftTree(tokens=t([0, 3, 5, 1, 2, 4, 7]), parents=t([-1, 0, 0, 1, 1, 2, 4]), depths=t([0, 1, 1, 2, 2, 2, 3]))


def logits_with_argmax(argmax: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.randn(len(argmax), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmax)), t(argmax)] = 10.0
    return logits


@pytest.mark.parametrize(
    "argmax, path, bonus",
    [
        ([3, 2, 4, 6, 7, 0, 5], [0, 1, 4, 6], 5),  # the deepest path, all accepted
        ([5, 2, 4, 6, 7, 1, 5], [0, 2, 5], 1),  # 4 and 6 match their parents but 1 is wrong
        ([6, 2, 4, 6, 7, 0, 5], [0], 6),  # nothing accepted: the bonus is the root's argmax
        ([3, 6, 4, 6, 7, 0, 5], [0, 1], 6),  # stops at node 1
        ([3, 1, 4, 2, 7, 0, 5], [0, 1, 3], 2),  # the shallower branch
    ],
)
def test_verify_greedy_hand_tree(argmax, path, bonus):
    assert verify_greedy(TREE, logits_with_argmax(argmax)) == (path, bonus)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)])
def test_argmax_rows_is_torchs_argmax(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 3, shape, generator=gen).to(dtype)  # small integers: many ties
    flat = logits.view(-1, shape[-1])
    flat[-1, 2:4] = float("inf")  # a tie at the top: the first index
    flat[0, 5] = float("nan")  # NaN counts as the largest, as in torch
    got = argmax_rows(logits)
    assert got.dtype == torch.long and torch.equal(got, logits.argmax(dim=-1))
    assert got.view(-1)[0] == 5 and (len(flat) == 1 or got.view(-1)[-1] == 2)


def test_argmax_rows_leaves_integers_and_autograd_to_torch():
    ints = torch.tensor([[1, 5, 5], [7, 0, 7]])
    assert argmax_rows(ints).tolist() == [1, 0]
    weights = torch.tensor([[0.0, 2.0, 1.0]], requires_grad=True)
    assert argmax_rows(weights * 2).tolist() == [1]


def test_verify_greedy_root_only():
    tree = DraftTree.root_only(4)
    assert verify_greedy(tree, logits_with_argmax([6])) == ([0], 6)


# --------------------------------------------------------------------------- sampling edge cases


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.6, top_k=3), SamplingConfig(1.3, top_p=0.8)])
def test_verify_sampling_leaf_root_samples_from_p(cfg):
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    p = target_probs(logits, cfg)[0]
    for seed in range(50):
        path, bonus = verify_sampling(DraftTree.root_only(2), logits, cfg, torch.Generator().manual_seed(seed))
        expected = int(torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed)))
        assert (path, bonus) == ([0], expected)


def test_verify_sampling_certain_child_is_always_accepted():
    # Root children: 3 then 5. The target puts all its mass on 5 at the root and on 2 at node 2.
    tree = DraftTree(tokens=t([0, 3, 5, 1]), parents=t([-1, 0, 0, 2]), depths=t([0, 1, 1, 2]))
    logits = torch.zeros(4, 8)
    logits[0] = float("-inf")
    logits[0, 5] = 0.0
    logits[2] = float("-inf")
    logits[2, 2] = 0.0
    for seed in range(200):
        path, bonus = verify_sampling(tree, logits, SamplingConfig(1.0), torch.Generator().manual_seed(seed))
        # Node 3 (token 1) has probability 0 at node 2: rejected, and the bonus is certain.
        assert (path, bonus) == ([0, 2], 2)


def test_verify_sampling_top_k_one_accepts_the_argmax_chain():
    chain = DraftTree(tokens=t([0, 4, 6, 1]), parents=t([-1, 0, 1, 2]), depths=t([0, 1, 2, 3]))
    logits = logits_with_argmax([4, 6, 1, 3])
    for seed in range(50):
        got = verify_sampling(chain, logits, SamplingConfig(1.0, top_k=1), torch.Generator().manual_seed(seed))
        assert got == ([0, 1, 2, 3], 3)


def test_verify_sampling_bonus_never_repeats_a_rejected_child():
    # Flat target over 4 tokens, children 0, 1, 2: after all three are rejected only 3 remains.
    tree = DraftTree(tokens=t([0, 0, 1, 2]), parents=t([-1, 0, 0, 0]), depths=t([0, 1, 1, 1]))
    logits = torch.zeros(4, 4)
    seen_bonus = 0
    for seed in range(300):
        path, bonus = verify_sampling(tree, logits, SamplingConfig(1.0), torch.Generator().manual_seed(seed))
        if path == [0]:
            assert bonus == 3
            seen_bonus += 1
        else:
            assert len(path) == 2
    assert seen_bonus > 0  # 1/4 of the time in expectation


# --------------------------------------------------------------------------- goodness of fit


def buggy_bonus_from_p(tree, logits, cfg, generator=None):
    """Wrong: after every child is rejected, samples the bonus from p, not the residual."""
    tokens, children = tree.tokens.tolist(), tree.children()
    node, path = 0, [0]
    while True:
        probs_node = target_probs(logits[node], cfg).cpu()  # logits: [n, V] or NodeLogits
        p = probs_node.clone()
        next_node = None
        for child in children[node]:
            if torch.rand((), generator=generator, dtype=torch.float64) < p[tokens[child]]:
                next_node = child
                break
            p[tokens[child]] = 0.0
            p /= p.sum()
        if next_node is None:
            return path, int(torch.multinomial(probs_node, 1, generator=generator))
        node = next_node
        path.append(node)


def buggy_double_accept(tree, logits, cfg, generator=None):
    """Wrong: accepts a child with probability min(1, 2 p(x))."""
    tokens, children = tree.tokens.tolist(), tree.children()
    node, path = 0, [0]
    while True:
        p = target_probs(logits[node], cfg).cpu().clone()  # logits: [n, V] or NodeLogits
        next_node = None
        for child in children[node]:
            if torch.rand((), generator=generator, dtype=torch.float64) < min(1.0, 2 * float(p[tokens[child]])):
                next_node = child
                break
            p[tokens[child]] = 0.0
            p /= p.sum()
        if next_node is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        node = next_node
        path.append(node)


# A depth-2 tree over a 6-token vocabulary:  0 -> {1 (tok 2), 2 (tok 4)}, 1 -> {3 (tok 0), 4 (tok 2)},
# 2 -> {5 (tok 5)}. Logits are fixed per node, as if the target had been run on the tree.
SMALL_TREE = DraftTree(tokens=t([1, 2, 4, 0, 2, 5]), parents=t([-1, 0, 0, 1, 1, 2]), depths=t([0, 1, 1, 2, 2, 2]))
SMALL_LOGITS = torch.tensor(
    [
        [0.1, 0.05, 0.4, 0.05, 0.3, 0.1],
        [0.35, 0.1, 0.25, 0.1, 0.1, 0.1],
        [0.15, 0.15, 0.1, 0.1, 0.1, 0.4],
        [1 / 6] * 6,
        [1 / 6] * 6,
        [1 / 6] * 6,
    ]
).log()


def small_tree_distribution(rule, n: int, cfg: SamplingConfig):
    """Observed and exact distribution of the first two committed tokens (x1, x2), where
    x2 = 'none' (index 6) when x1 is the bonus (the round ends there)."""
    probs = target_probs(SMALL_LOGITS, cfg).numpy()
    node_of = {2: 1, 4: 2}  # root children by token
    exact = np.zeros((6, 7))
    for x1 in range(6):
        if x1 in node_of:
            exact[x1, :6] = probs[0, x1] * probs[node_of[x1]]
        else:
            exact[x1, 6] = probs[0, x1]
    observed = np.zeros((6, 7))
    gen = torch.Generator().manual_seed(1234)
    tokens = SMALL_TREE.tokens.tolist()
    for _ in range(n):
        path, bonus = rule(SMALL_TREE, SMALL_LOGITS, cfg, gen)
        committed = [tokens[i] for i in path[1:]] + [bonus]
        observed[committed[0], committed[1] if len(committed) > 1 else 6] += 1
    return observed, exact


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.8, top_k=4, top_p=0.9)], ids=["t1", "topk-topp"])
def test_verify_sampling_exact_on_depth_two_tree(cfg):
    n = 20000
    observed, exact = small_tree_distribution(verify_sampling, n, cfg)
    assert abs(exact.sum() - 1) < 1e-9
    p = chi_square_pvalue(observed, exact, n)
    assert p > 0.001, p


@pytest.mark.parametrize("rule", [buggy_bonus_from_p, buggy_double_accept])
def test_depth_two_tree_catches_wrong_rules(rule):
    n = 20000
    observed, exact = small_tree_distribution(rule, n, SamplingConfig(1.0))
    p = chi_square_pvalue(observed, exact, n)
    assert p < 1e-6, p


# ------------------------------------------------ end to end: 2-token continuations via generate

V = 8
PROMPT = [1, 5, 2, 7, 3]
N_SAMPLES = 2000
DIST_TREE = TreeConfig(depth=1, top_k=3, total_tokens=6)


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab_size=V, layers=2, seed=0)


def exact_two_token_distribution(target, cfg: SamplingConfig) -> np.ndarray:
    prompt = t(PROMPT)
    out = forward_one(target, prompt, torch.arange(len(PROMPT)), target.new_cache())
    p1 = target_probs(out.logits[-1], cfg)
    rows = []
    for x1 in range(V):
        ids = torch.cat([prompt, t([x1])])
        rows.append(target_probs(forward_one(target, ids, torch.arange(ids.numel()), target.new_cache()).logits[-1], cfg))
    joint = (p1[:, None] * torch.stack(rows)).numpy()
    assert abs(joint.sum() - 1) < 1e-9
    return joint


def sample_two_tokens(target, drafter_factory, cfg: SamplingConfig, n: int):
    observed = np.zeros((V, V))
    drafter = drafter_factory(target) if drafter_factory else None
    accepted = 0
    for i in range(n):
        config = GenerationConfig(max_new_tokens=2, stop_on_eos=False, seed=i, sampling=cfg)
        result = generate(target, PROMPT, drafter, config, DecodeOptions(DIST_TREE))
        assert len(result.token_ids) == 2 and result.finish_reason == "length"
        observed[result.token_ids[0], result.token_ids[1]] += 1
        accepted += sum(result.accepted)
    return observed, accepted / n


def noisy_first_layer(target):
    return NoisyDrafter(StandardDrafter.from_target_layers(target, 1), scale=0.5, seed=7)


T1 = SamplingConfig(temperature=1.0)
TOPKP = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)


@pytest.mark.parametrize(
    "drafter_factory, cfg",
    [(None, T1), (noisy_first_layer, T1), (noisy_first_layer, TOPKP)],
    ids=["plain-t1", "speculative-t1", "speculative-topk-topp"],
)
def test_sampling_matches_target_distribution(small_target, drafter_factory, cfg):
    exact = exact_two_token_distribution(small_target, cfg)
    observed, accepted = sample_two_tokens(small_target, drafter_factory, cfg, N_SAMPLES)
    if drafter_factory is not None:
        assert accepted > 0.3  # the second token really comes from accepted drafts often
    p = chi_square_pvalue(observed, exact, N_SAMPLES)
    print(f"chi-square p = {p:.3g} (N = {N_SAMPLES}, accepted drafts per sample {accepted:.2f})")
    assert p > 0.001, p


@pytest.mark.parametrize("rule", [buggy_bonus_from_p, buggy_double_accept])
def test_wrong_acceptance_rule_fails_goodness_of_fit(small_target, monkeypatch, rule):
    monkeypatch.setattr(decode, "verify_sampling", rule)
    exact = exact_two_token_distribution(small_target, T1)
    observed, _ = sample_two_tokens(small_target, noisy_first_layer, T1, N_SAMPLES)
    p = chi_square_pvalue(observed, exact, N_SAMPLES)
    print(f"wrong rule {rule.__name__}: chi-square p = {p:.3g} (N = {N_SAMPLES})")
    assert p < 1e-6, p
