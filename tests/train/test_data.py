"""Training-data readers, the real training files, sampling, and response regeneration."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from prism_spec.train import conversations as D
from prism_spec.train.conversations import conversation_key, strip_think_blocks
from prism_spec.train.mix import load_training_mix, sample, split_heldout
from prism_spec.train.records import (
    SkipStats,
    detect_file_format,
    load_hf_dataset,
    read_file,
    read_records,
    write_conversations,
)

TRAIN = Path("/work/shared/data/train")


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def check_invariant(stats: SkipStats):
    assert stats.read == stats.kept + stats.total_skipped


# ------------------------------------------------------------------------------ ShareGPT
def test_sharegpt_jsonl_with_malformed_records(tmp_path):
    f = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"id": "a", "conversations": [{"from": "human", "value": "Hi\r\nthere"}, {"from": "gpt", "value": "Hello"}]},
            '{"id": "broken", "conversations": [',                               # invalid JSON
            "",                                                                  # blank: not a record
            ["not", "an", "object"],                                             # not an object
            {"id": "c"},                                                         # missing field
            {"id": "d", "conversations": "Hi"},                                  # wrong type
            {"id": "e", "conversations": [{"from": "human", "value": 3}]},       # wrong type
            {"id": "f", "conversations": [{"from": "human", "value": "  "}]},    # empty text
            {"id": "g", "conversations": [{"from": "alien", "value": "x"}]},     # unknown role
            {"id": "h", "conversations": [{"from": "system", "value": "sys"}]},  # no user turn
            {"id": "i", "conversations": [{"from": "human", "value": "Only a prompt"}]},
        ],
    )
    convs, stats = read_file(f)
    assert convs == [[U("Hi\nthere"), A("Hello")], [U("Only a prompt")]]
    assert (stats.read, stats.kept, stats.prompt_only) == (10, 2, 1)
    assert stats.skipped == Counter(
        invalid_json=1, not_an_object=1, missing_field=1, wrong_type=2, empty_text=1, unknown_role=1, no_user_turn=1
    )
    check_invariant(stats)


def test_sharegpt_roles_and_repairs(tmp_path):
    records = [
        {"conversations": [
            {"from": "system", "value": "Be nice."},
            {"from": "gpt", "value": "Leading reply"},         # dropped: nothing to answer
            {"from": "human", "value": "Q1"},
            {"from": "user", "value": "more Q1"},              # merged into Q1
            {"from": "chatgpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "bard", "value": "A2"},
            {"from": "human", "value": "Q3"},
            {"from": "gpt", "value": ""},                      # cut here: Q3 stays unanswered
            {"from": "human", "value": "Q4"},
        ]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}, {"role": "assistant", "content": "ok"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "late"}]},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    convs, stats = read_file(tmp_path / "chat.json")
    assert convs[0] == [S("Be nice."), U("Q1\n\nmore Q1"), A("A1"), U("Q2"), A("A2"), U("Q3")]
    assert convs[1] == [U("parts"), A("ok")]
    assert stats.skipped == Counter(system_not_first=1)
    assert stats.notes["dropped_leading_assistant"] == 1
    assert stats.notes["merged_same_role"] == 1
    assert stats.notes["cut_at_empty_turn"] == 1
    assert D.needs_response(convs[0]) and not D.needs_response(convs[1])


def test_truncated_json_array_is_salvaged(tmp_path):
    good = {"conversations": [{"from": "human", "value": "kept"}]}
    (tmp_path / "cut.json").write_text("[" + json.dumps(good) + ", " + json.dumps(good)[:20])
    convs, stats = read_file(tmp_path / "cut.json")
    assert convs == [[U("kept")]]
    assert stats.skipped == Counter(invalid_json=1)


def test_json_file_that_is_really_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "test.json", [{"problem": "1+1?", "solution": "2"}, "{oops"])
    convs, stats = read_file(f)
    assert convs == [[U("1+1?"), A("2")]]
    assert stats.skipped == Counter(invalid_json=1)


# ------------------------------------------------------------------------------ turns
def test_turns_format(tmp_path):
    f = write_jsonl(
        tmp_path / "question.jsonl",
        [
            {"question_id": 1, "turns": ["T1", "T2"]},
            {"question_id": 2, "turns": ["T1", "T2"], "reference": ["R1", "R2"]},
            {"question_id": 3, "turns": ["T1", "T2"], "reference": ["R1"]},
            {"question_id": 4, "turns": [{"content": "dict turn"}], "choices": [{"index": 0, "turns": ["C1"]}]},
            {"question_id": 5, "turns": []},
            {"question_id": 6, "turns": ["ok"], "reference": 5},
        ],
    )
    assert detect_file_format(f) == "turns"
    convs, stats = read_file(f)
    assert convs == [
        [U("T1"), U("T2")],  # unanswered turns stay separate for turn-by-turn regeneration
        [U("T1"), A("R1"), U("T2"), A("R2")],
        [U("T1"), A("R1"), U("T2")],
        [U("dict turn"), A("C1")],
    ]
    assert stats.prompt_only == 1
    assert stats.skipped == Counter(wrong_type=2)


# ------------------------------------------------------------------------------ alpaca
def test_alpaca_and_self_instruct(tmp_path):
    records = [
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "response": "hi"},
        {"instruction": "No answer yet.", "input": "", "output": ""},
        {"instruction": "Sys.", "input": "", "output": "x", "system": "You are terse.", "history": [["h1", "a1"]]},
        {"instruction": 7, "input": "", "output": "x"},
        {"instruction": "Seed task", "instances": [{"input": "in", "output": "out"}]},
        {"instruction": "Seed task", "instances": []},
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    convs, stats = read_file(tmp_path / "alpaca.json")
    assert convs == [
        [U("Add.\n\n1 and 2"), A("3")],
        [U("Say hi."), A("hi")],
        [U("No answer yet.")],
        [S("You are terse."), U("h1"), A("a1"), U("Sys."), A("x")],
        [U("Seed task\nin"), A("out")],
    ]
    assert stats.prompt_only == 1 and stats.skipped == Counter(wrong_type=2)


# ------------------------------------------------------------------------------ prompt lists
def test_prompt_lists(tmp_path):
    f = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "P", "completion": "C<|endoftext|>"},
            {"question": "Q", "answer": ["a", "b"]},
            {"Body": "Tom has 3.", "Question": "How many?", "Answer": 3.0},
            {"problem": "Pr", "solution": "So"},
            {"text": "Write f.", "code": "def f():\r\n    pass", "test_list": ["assert f() is None"]},
            {"instruction": "Only a prompt"},
            {"prompt": "P", "answer": {"nested": 1}},
            {"prompt": ""},
            {"uid": "x"},
        ],
    )
    assert detect_file_format(f) == "prompts"
    convs, stats = read_file(f)
    assert convs == [
        [U("P"), A("C")],
        [U("Q"), A("a, b")],
        [U("Tom has 3. How many?"), A("3")],
        [U("Pr"), A("So")],
        [U("Write f.\nYour code should pass these tests:\nassert f() is None"), A("def f():\n    pass")],
        [U("Only a prompt")],
    ]
    assert stats.skipped == Counter(wrong_type=1, empty_text=1, missing_field=1)
    check_invariant(stats)


def test_text_file_and_format_override(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \r\n")
    convs, stats = read_file(tmp_path / "p.txt")
    assert convs == [[U("first prompt")], [U("second prompt")]] and stats.read == 2
    # An alpaca-looking file read as a plain prompt list: instruction + input, answer from output.
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "I", "input": "x", "output": "o"}]))
    assert read_file(tmp_path / "a.json", fmt="prompts")[0] == [[U("I\n\nx"), A("o")]]
    with pytest.raises(ValueError, match="unknown format"):
        read_file(tmp_path / "a.json", fmt="csv")


def test_undetectable_files(tmp_path):
    bad = write_jsonl(tmp_path / "meta.jsonl", [{"path": "x", "rows": 3}])
    with pytest.raises(ValueError, match="cannot detect"):
        read_file(bad)
    assert read_file(write_jsonl(tmp_path / "empty.jsonl", []))[1].read == 0
    # Inside a folder an undetectable file is skipped with a warning; the rest loads.
    write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p"}])
    with pytest.warns(UserWarning, match="meta.jsonl"):
        convs, stats = load_training_mix([tmp_path])
    assert convs == [[U("p")]]
    with pytest.raises(FileNotFoundError):
        load_training_mix([tmp_path / "nope.jsonl"])


def test_strip_think():
    assert strip_think_blocks("<think>plan</think>\n\nAnswer") == "Answer"
    assert strip_think_blocks("a<think>x</think>b<think>y\n</think>c") == "abc"
    assert strip_think_blocks("reasoning without opener</think> done") == "done"
    assert strip_think_blocks("text <think> never closed") == "text"
    assert strip_think_blocks("<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>S<|end_of_solution|>") == "S"
    records = [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<think>hmm</think>A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<think>only thinking</think>"}]},
    ]
    convs, stats = read_records(records, strip_think=True)
    assert convs == [[U("Q"), A("A")], [U("Q")]]  # an all-thinking reply leaves the prompt
    assert read_records(records)[0][0] == [U("Q"), A("<think>hmm</think>A")]


def test_mix_tuples_dedupe_and_write_roundtrip(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    (tmp_path / "b.txt").write_text("same\n")
    convs, stats = load_training_mix([a, (tmp_path / "b.txt", "text")], dedupe=True)
    assert convs == [[U("same")], [U("other")]]
    assert stats.skipped == Counter(duplicate=2) and stats.kept == 2 and stats.read == 4
    assert stats.sources[str(a)].kept == 2
    check_invariant(stats)
    n = write_conversations(tmp_path / "out.jsonl", [[U("q"), A("a")], [U("p")]])
    assert n == 2 and read_file(tmp_path / "out.jsonl")[0] == [[U("q"), A("a")], [U("p")]]
    assert json.loads(json.dumps(stats.as_dict()))["sources"]


def test_hf_dataset_through_mocked_datasets(monkeypatch):
    calls = []
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>t</think>a"}]},
        {"messages": "broken"},
        {"messages": [{"role": "user", "content": "q2"}]},
    ]

    def load_dataset(name, config=None, split="train", **kw):
        calls.append((name, config, split, kw))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    convs, stats = load_hf_dataset("org/chat", split="train_sft", strip_think=True, max_records=2)
    assert convs == [[U("q"), A("a")]] and stats.skipped == Counter(wrong_type=1)
    assert calls == [("org/chat", None, "train_sft", {})]
    convs, stats = load_training_mix(["hf:org/chat:default@test"])
    assert calls[-1] == ("org/chat", "default", "test", {})
    assert len(convs) == 2 and stats.prompt_only == 1


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("org/chat")


# ------------------------------------------------------------------------------ sampling
def test_sample_and_heldout_are_deterministic_and_nested():
    items = [[U(f"q{i}"), A(f"a{i}")] for i in range(200)]
    s25, s50, s100 = (sample(items, f, seed=1) for f in (0.25, 0.5, 1.0))
    assert (len(s25), len(s50), len(s100)) == (50, 100, 200)
    keys = lambda xs: {conversation_key(x) for x in xs}  # noqa: E731
    assert keys(s25) <= keys(s50) <= keys(s100) == keys(items)
    assert sample(items, 0.25, seed=1) == s25 and sample(items, 0.25, seed=2) != s25
    assert sample(list(reversed(items)), 0.25, seed=1) == list(reversed(s25))  # order-independent membership
    assert [items.index(x) for x in s25] == sorted(items.index(x) for x in s25)  # original order kept
    assert len(sample(items, 7)) == 7
    train, held = split_heldout(items, 0.1, seed=0)
    assert len(held) == 20 and len(train) == 180 and not keys(train) & keys(held)
    assert split_heldout(items, 0.1, seed=0) == (train, held)
    assert len(split_heldout(items, 5)[1]) == 5
    with pytest.raises(ValueError):
        sample(items, 1.5)


# ------------------------------------------------------------------------------ the real training files
# README table rows; kept = rows minus skipped; prompt_only = kept without an answer.
EXPECTED = {
    # file: (rows, kept, prompt_only)
    "arena_hard_v0.1_question.jsonl": (500, 500, 500),
    "arena_hard_v2.0_question.jsonl": (750, 750, 750),
    "code_alpaca_2k.json": (2017, 2017, 2),  # two records have an empty output
    "fastchat_dummy_conversation.json": (500, 500, 0),
    "gpteacher_codegen.json": (4535, 4535, 0),
    "gpteacher_roleplay.json": (1923, 1923, 0),
    "gsm8k_train.jsonl": (7472, 7472, 0),
    "math_test.jsonl": (4998, 4998, 0),
    "mbpp.jsonl": (974, 974, 0),
    "nq_open_efficientqa_dev.jsonl": (1800, 1800, 0),
    "nq_open_efficientqa_test.jsonl": (1769, 1769, 0),
    "self_instruct_seed_tasks.jsonl": (175, 175, 0),
    "self_instruct_user_oriented_instructions.jsonl": (252, 252, 0),
    # 2958 human first turns, one of them empty; 16 system-only and 4 gpt-only have no prompt
    "sharegpt_sg90k_first_turn.json": (2978, 2957, 2957),
    "sharegpt_v3_filtered_1000.json": (1000, 1000, 1000),
    "svamp.json": (1000, 1000, 0),
    "t0_subset/cnn_dailymail_3_0_0_news_summary.jsonl": (200, 200, 0),
    "t0_subset/kilt_tasks_hotpotqa_straighforward_qa.jsonl": (200, 200, 0),
    "t0_subset/samsum_Summarize_.jsonl": (200, 200, 0),
    "t0_subset/sciq_Direct_Question_Closed_Book_.jsonl": (200, 200, 0),
    "t0_subset/xsum_summarize_DOC.jsonl": (200, 200, 0),
}

needs_shared = pytest.mark.skipif(
    not TRAIN.is_dir(), reason="/work/shared/data/train (the project's shared training data) is not on this machine"
)


@pytest.fixture(scope="module")
def mix():
    return load_training_mix([TRAIN])


@needs_shared
def test_real_training_files_record_counts(mix):
    convs, stats = mix
    got = {str(Path(k).relative_to(TRAIN)): (v.read, v.kept, v.prompt_only) for k, v in stats.sources.items()}
    assert got == EXPECTED
    assert stats.read == 33643  # README: "Train total: 33,643 records."
    assert len(convs) == stats.kept == 33622
    assert stats.sources[str(TRAIN / "sharegpt_sg90k_first_turn.json")].skipped == Counter(no_user_turn=20, empty_text=1)
    check_invariant(stats)


def _first(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return json.loads(text.split("\n", 1)[0])
    return json.loads(text)[0]


@needs_shared
def test_real_training_files_carry_their_answers(mix):
    convs, stats = mix
    start = 0
    first = {}
    for name, st in stats.sources.items():
        first[str(Path(name).relative_to(TRAIN))] = convs[start]
        start += st.kept
    rec = lambda name: _first(TRAIN / name)  # noqa: E731
    r = rec("gsm8k_train.jsonl")
    assert first["gsm8k_train.jsonl"] == [U(r["question"]), A(r["answer"])]
    r = rec("math_test.jsonl")
    assert first["math_test.jsonl"] == [U(r["problem"]), A(r["solution"])]
    r = rec("mbpp.jsonl")
    assert first["mbpp.jsonl"][0]["content"].startswith(r["text"])
    assert first["mbpp.jsonl"][1] == A(r["code"].replace("\r\n", "\n").strip())
    r = rec("code_alpaca_2k.json")
    assert first["code_alpaca_2k.json"] == [U(r["instruction"] + "\n\n" + r["input"]), A(r["output"])]
    r = rec("gpteacher_roleplay.json")
    assert first["gpteacher_roleplay.json"] == [U(r["instruction"]), A(r["response"])]
    r = rec("t0_subset/samsum_Summarize_.jsonl")
    assert r["completion"].endswith("<|endoftext|>")
    assert first["t0_subset/samsum_Summarize_.jsonl"][1] == A(r["completion"][: -len("<|endoftext|>")].strip())
    r = rec("nq_open_efficientqa_test.jsonl")
    assert len(r["answer"]) == 2 and first["nq_open_efficientqa_test.jsonl"][1] == A(", ".join(r["answer"]))
    r = rec("svamp.json")
    assert first["svamp.json"] == [U(r["Body"] + " " + r["Question"]), A("51")]
    r = rec("self_instruct_seed_tasks.jsonl")
    assert first["self_instruct_seed_tasks.jsonl"][1] == A(r["instances"][0]["output"])
    r = rec("arena_hard_v0.1_question.jsonl")
    assert first["arena_hard_v0.1_question.jsonl"] == [U(r["prompt"])]
    assert first["sharegpt_sg90k_first_turn.json"][0]["role"] == "user"
    assert len(first["sharegpt_sg90k_first_turn.json"]) == 1
    # Every file with answers yields answered conversations only (code_alpaca: 2 empty outputs).
    assert not any(m["role"] == "system" for c in convs for m in c)
    answered = sum(D.has_assistant(c) for c in convs)
    assert answered == 33622 - 5209


# ------------------------------------------------------------------------------ regeneration
@pytest.fixture(scope="module")
def chat_target(one_thread):
    """A tiny random Llama speaking the default target's tokenizer (so prompts render with its
    real chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prism_spec.targets import default_target_path
    from prism_spec.targets.hf import Target

    try:
        path = default_target_path()
    except RuntimeError as exc:
        pytest.skip(f"default target tokenizer unavailable: {exc}")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return Target(LlamaForCausalLM(config), tok, name="tiny-chat")


def test_regenerate_resume_and_partial_line(chat_target, tmp_path, monkeypatch):
    from prism_spec.train import regenerate as R

    convs = [
        [U("first prompt")],
        [U("a much longer second prompt with more words in it")],
        [U("turn one"), U("turn two")],            # answered turn by turn
        [U("q"), A("already answered")],           # passes through untouched
        [S("sys"), U("third")],
    ]
    out = tmp_path / "regen.jsonl"
    rows_generated = []
    real = R._generate

    def spy(target, prompts, cfg, max_prompt_tokens):
        rows_generated.append(len(prompts))
        return real(target, prompts, cfg, max_prompt_tokens)

    monkeypatch.setattr(R, "_generate", spy)
    result = R.regenerate_responses(chat_target, convs, out, batch_size=2, max_new_tokens=3, progress=False)
    assert sum(rows_generated) == 5  # 1 + 1 + 2 turns + 0 + 1
    assert len(result) == 5 and result[3] == convs[3]
    assert [m["role"] for m in result[2]] == ["user", "assistant", "user", "assistant"]
    assert all(not D.needs_response(c) for c in result)
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and {json.loads(x)["status"] for x in lines} == {"ok"}

    # A rerun generates nothing.
    rows_generated.clear()
    assert R.regenerate_responses(chat_target, convs, out, batch_size=2, max_new_tokens=3, progress=False) == result
    assert rows_generated == []

    # A crash mid-write: the last record is half there. It is cut off and redone, identically (greedy).
    text = out.read_text()
    out.write_text(text[: len(text) - len(lines[-1]) // 2 - 1])
    again = R.regenerate_responses(chat_target, convs, out, batch_size=2, max_new_tokens=3, progress=False)
    assert again == result
    assert 1 <= sum(rows_generated) <= 2
    assert len(out.read_text().splitlines()) == 4
    assert all(json.loads(x) for x in out.read_text().splitlines())


def test_regenerate_too_long_and_regenerate_all(chat_target, tmp_path):
    from prism_spec.train.regenerate import regenerate_responses

    convs = [[U("short")], [U("x " * 200)], [U("q"), A("old answer")]]
    out = regenerate_responses(
        chat_target, convs, tmp_path / "r.jsonl", max_new_tokens=2, max_prompt_tokens=60,
        regenerate_all=True, temperature=0.8, top_k=5, progress=False,
    )
    assert len(out) == 2  # the over-long prompt is recorded and left out
    assert out[1][0] == U("q") and out[1][1]["content"] != "old answer"
    statuses = Counter(json.loads(x)["status"] for x in (tmp_path / "r.jsonl").read_text().splitlines())
    assert statuses == Counter(ok=2, too_long=1)
