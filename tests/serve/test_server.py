"""The OpenAI-compatible server, driven by the official `openai` client over localhost."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from helpers import tiny_chat_target
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime import GenerationConfig, TreeConfig, generate
from prism_spec.serve import BatchingEngine, create_app, serve_in_thread
from prism_spec.serve.app import visible_text
from prism_spec.targets import load_target

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny"
TREE = TreeConfig.parse("8/3/2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    target = load_target(tiny_chat_target(tmp_path_factory.mktemp("tiny")))
    drafter = StandardDrafter.from_target_layers(target, 1)
    engine = BatchingEngine(target, drafter, max_batch=8, batch_window_s=0.05).start()
    srv, thread, base = serve_in_thread(create_app(engine, MODEL, TREE, default_max_tokens=16))
    yield {"base": base, "target": target, "engine": engine}
    srv.should_exit = True
    thread.join(10)
    engine.stop()


def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(server, messages, max_tokens):
    target = server["target"]
    ids = target.render_chat(messages)
    result = generate(target, ids, None, GenerationConfig(max_new_tokens=max_tokens))
    return target.decode(result.token_ids), result


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"


def test_chat_completion_equals_greedy(server):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    text, result = greedy(server, messages, 12)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == len(result.token_ids)
    assert reply.usage.prompt_tokens == result.prompt_len
    assert reply.usage.model_extra["acceptance_length"] >= 1.0


def test_streaming_chat_and_completion(server):
    messages = [{"role": "user", "content": "Count to ten."}]
    stream = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=14, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text, result = greedy(server, messages, 14)
    assert "".join(pieces) == text
    assert finish == "length" and usage.completion_tokens == len(result.token_ids)
    # /v1/completions streams too.
    target = server["target"]
    ids = target.tokenizer("Once upon a time")["input_ids"]
    expected = target.decode(generate(target, ids, None, GenerationConfig(max_new_tokens=10)).token_ids)
    streamed = "".join(c.choices[0].text for c in client(server).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices)
    plain = client(server).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert streamed == plain.choices[0].text == expected


def test_concurrent_requests_are_batched_and_lossless(server):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    before = server["engine"].largest_batch

    def ask(p):
        messages = [{"role": "user", "content": p}]
        return client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=6 + len(p) % 7,
                                                       temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, prompts))
    for p, reply in zip(prompts, replies):
        assert reply == greedy(server, [{"role": "user", "content": p}], 6 + len(p) % 7)[0]
    assert server["engine"].largest_batch > max(before, 1)  # requests really shared a batch


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "invalid_value"),
        ({"model": MODEL, "messages": []}, 400, "invalid_value"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "   "}]}, 400, "empty_prompt"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "invalid_value"),
    ],
)
def test_bad_requests_get_4xx(server, body, status, code):
    response = httpx.post(server["base"] + "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_invalid_json_is_400(server):
    response = httpx.post(server["base"] + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_client_disconnect_mid_stream_leaves_server_healthy(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body) as response:
        for _ in response.iter_lines():
            break  # hang up after the first event
    # The server keeps serving, and the abandoned row does not hold up a new request.
    reply = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=5, temperature=0)
    assert reply.choices[0].message.content == greedy(server, [{"role": "user", "content": "hi"}], 5)[0]


def test_visible_text_holds_back_partial_stop_strings():
    assert visible_text("hello wor", ["world"], final=False) == "hello "
    assert visible_text("hello world!", ["world"], final=False) == "hello "
    assert visible_text("hello wor", ["world"], final=True) == "hello wor"
    assert visible_text("abc", [], final=False) == "abc"


@pytest.mark.slow
def test_bounded_load_16_clients(server):
    """16 concurrent clients for 20 s: zero errors, every response equal to greedy."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    expected = {p: greedy(server, [{"role": "user", "content": p}], 8)[0] for p in serve_load.PROMPTS}
    stats = serve_load.run_load(server["base"], expected, clients=16, seconds=20, max_tokens=8, model=MODEL)
    assert stats["requests"] >= 16
    assert stats["errors"] == 0, stats["error_messages"][:3]
    assert stats["mismatches"] == 0


def test_out_of_range_seed_is_a_400_naming_the_field(server):
    for seed in (2**64, -(2**63) - 1):
        r = httpx.post(server["base"] + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "seed": seed,
            "max_tokens": 4})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"
    with pytest.raises(ValueError, match="seed"):
        GenerationConfig(seed=2**64)


def test_a_failing_row_ends_only_itself(server):
    """Four requests in one batch, one of them with token ids the model does not have: the
    batch fails, every row is decoded again alone, and the three good ones equal greedy decoding."""
    import threading

    from prism_spec.serve import EngineRequest

    target, engine = server["target"], server["engine"]
    prompts = [target.render_chat([{"role": "user", "content": f"Count to {i}."}]) for i in range(3)]
    bad = [target.config.vocab_size + 5, 1, 2]
    events: dict[int, list] = {i: [] for i in range(4)}
    done = {i: threading.Event() for i in range(4)}

    def collect(i):
        def on_event(kind, payload):
            events[i].append((kind, payload))
            if kind in ("done", "error"):
                done[i].set()
        return on_event

    batches_before = engine.batches_run
    for i, ids in enumerate(prompts[:2] + [bad] + prompts[2:]):
        engine.submit(EngineRequest(ids, GenerationConfig(max_new_tokens=6, tree=TREE), collect(i)))
    assert all(done[i].wait(60) for i in range(4))
    assert engine.batches_run - batches_before == 5  # the failed batch of four, then each row alone
    assert events[2][-1][0] == "error"
    for i, ids in zip((0, 1, 3), prompts):
        kind, result = events[i][-1]
        assert kind == "done"
        assert result.token_ids == generate(target, ids, None, GenerationConfig(max_new_tokens=6)).token_ids


def test_streamed_multibyte_text_arrives_whole():
    """Token by token, as the SSE path streams: no replacement character reaches the client and
    the chunks add up to the text (emoji and CJK characters span several byte-level tokens)."""
    from transformers import AutoTokenizer

    from prism_spec.targets import default_target_path

    try:
        tok = AutoTokenizer.from_pretrained(default_target_path())
    except RuntimeError as exc:
        pytest.skip(str(exc))
    text = "héllo 你好 🙂 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sent, chunks = "", []
    for k in range(1, len(ids) + 1):
        shown = visible_text(tok.decode(ids[:k]), [], final=k == len(ids))
        assert shown.startswith(sent)
        if len(shown) > len(sent):
            chunks.append(shown[len(sent):])
            sent = shown
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert len(chunks) > 1
