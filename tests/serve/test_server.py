"""The OpenAI-compatible server, driven by the official `openai` client over localhost."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from helpers import tiny_chat_target
from prism_spec.drafters import StandardDrafter
from prism_spec.runtime import DecodeOptions, GenerationConfig, SamplingConfig, TreeConfig, generate
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
    engine = BatchingEngine(target, drafter, max_batch=8, batch_window_s=0.05, options=DecodeOptions(TREE)).start()
    srv, thread, base = serve_in_thread(create_app(engine, MODEL, default_max_tokens=16))
    yield {"base": base, "target": target, "engine": engine, "drafter": drafter, "thread": thread}
    srv.should_exit = True
    thread.join(10)
    engine.stop()


API_KEY = "sekret-key"
CAP = 24


@pytest.fixture(scope="module")
def guarded(server):
    """A second app on the same engine with an API key, a max_tokens cap, a small body limit
    and the docs UI on."""
    app = create_app(server["engine"], MODEL, default_max_tokens=64, max_tokens_cap=CAP,
                     max_body_bytes=4096, api_key=API_KEY, docs=True)
    srv, thread, base = serve_in_thread(app)
    yield {**server, "base": base}
    srv.should_exit = True
    thread.join(10)


def keyed(key=API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


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
    # The engine's acceptance length is the drafter's real one at this tree, not a placeholder.
    drafted = generate(server["target"], server["target"].render_chat(messages), server["drafter"],
                       GenerationConfig(max_new_tokens=12), DecodeOptions(TREE))
    assert drafted.token_ids == result.token_ids
    assert reply.usage.model_extra["acceptance_length"] == pytest.approx(drafted.acceptance_length)


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


def benchmark_script(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bounded_load_16_clients(server):
    """16 concurrent clients for 20 s: zero errors, every response equal to greedy."""
    serve_load = benchmark_script("serve_load")
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
        engine.submit(EngineRequest(ids, GenerationConfig(max_new_tokens=6), collect(i)))
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


# ---------------------------------------------------------------------- limits, access, errors
def chat_body(content="hi", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


class SlowDrafter(StandardDrafter):
    """Sleeps each round, so that a request lasts long enough for its client to give up."""

    def extend(self, tokens, features):
        time.sleep(0.05)
        return super().extend(tokens, features)


def test_abandoned_non_streaming_request_is_cancelled(server):
    """A client that gives up on a long non-streaming request frees the engine: its row is
    cancelled at the next round instead of decoding to max_tokens (minutes on the old code)."""
    target = server["target"]
    engine = BatchingEngine(target, SlowDrafter.from_target_layers(target, 1), max_batch=4,
                            options=DecodeOptions(TREE)).start()
    srv, thread, base = serve_in_thread(create_app(engine, MODEL))
    try:
        with pytest.raises(httpx.ReadTimeout):  # 200 tokens take 100+ rounds of 50 ms
            httpx.post(base + "/v1/chat/completions", json=chat_body("Write a long story.", max_tokens=200,
                                                                     temperature=0), timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.rows_cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.rows_cancelled == 1
        assert httpx.get(base + "/health").json()["rows_cancelled"] == 1
        # The engine is free: a short request is answered at once.
        reply = httpx.post(base + "/v1/chat/completions", json=chat_body(max_tokens=3, temperature=0), timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        srv.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.mark.parametrize("field, value", [("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 8.5),
                                          ("max_completion_tokens", "8"), ("seed", "3"), ("temperature", "0.7"),
                                          ("stream", "yes"), ("top_k", False)])
def test_strings_and_booleans_are_not_numbers(server, field, value):
    response = httpx.post(server["base"] + "/v1/chat/completions", json=chat_body(**{field: value}))
    assert_openai_error(response, 400, "invalid_value", field)


def test_max_tokens_beyond_the_cap_or_the_context_is_a_400(server, guarded):
    # The configured cap (max_completion_tokens wins over max_tokens and is the one named).
    url = guarded["base"] + "/v1/chat/completions"
    assert_openai_error(httpx.post(url, json=chat_body(max_tokens=CAP + 1), headers=keyed()), 400, "invalid_value",
                        "max_tokens")
    assert_openai_error(httpx.post(url, json=chat_body(max_tokens=5, max_completion_tokens=CAP + 1), headers=keyed()),
                        400, "invalid_value", "max_completion_tokens")
    # Without a cap: the context the prompt leaves (10**9 was accepted by the old code).
    target = server["target"]
    room = target.max_context - len(target.render_chat([{"role": "user", "content": "hi"}]))
    for max_tokens in (10**9, room + 1):
        response = httpx.post(server["base"] + "/v1/chat/completions", json=chat_body(max_tokens=max_tokens))
        assert_openai_error(response, 400, "context_length_exceeded", "max_tokens")
    # Within both it runs; a request that gives none gets the server default within the cap.
    ok = httpx.post(url, json=chat_body(max_tokens=CAP, temperature=0), headers=keyed(), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= CAP
    default = httpx.post(url, json=chat_body(temperature=0), headers=keyed(), timeout=60).json()
    assert default["usage"]["completion_tokens"] == CAP and default["choices"][0]["finish_reason"] == "length"


def test_oversized_bodies_get_413_before_parsing(guarded):
    url = guarded["base"] + "/v1/chat/completions"
    big = json.dumps(chat_body("word " * 2000)).encode()
    assert len(big) > 4096
    assert_openai_error(httpx.post(url, content=big, headers={**keyed(), "content-type": "application/json"}),
                        413, "request_too_large")
    # Sent in chunks without a Content-Length, the limit holds as the body grows.
    chunks = (big[i:i + 1000] for i in range(0, len(big), 1000))
    assert_openai_error(httpx.post(url, content=chunks, headers={**keyed(), "content-type": "application/json"}),
                        413, "request_too_large")
    # A body within the limit still works.
    small = httpx.post(url, json=chat_body(max_tokens=2, temperature=0), headers=keyed(), timeout=60)
    assert small.status_code == 200


def test_prompts_are_tokenised_off_the_event_loop(server, monkeypatch):
    """Rendering and tokenising run on worker threads: a huge prompt must not stall /health."""
    target = server["target"]
    threads = []
    render_chat, tokenizer = target.render_chat, target.tokenizer

    class RecordingTokenizer:
        def __call__(self, *args, **kwargs):
            threads.append(threading.current_thread())
            return tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    def recording_render_chat(*args, **kwargs):
        threads.append(threading.current_thread())
        return render_chat(*args, **kwargs)

    monkeypatch.setattr(target, "render_chat", recording_render_chat)
    monkeypatch.setattr(target, "tokenizer", RecordingTokenizer())
    assert httpx.post(server["base"] + "/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    assert httpx.post(server["base"] + "/v1/completions",
                      json={"model": MODEL, "prompt": "Once", "max_tokens": 2}).status_code == 200
    assert len(threads) >= 2 and server["thread"] not in threads  # the event loop runs on the server's thread


def test_api_key_is_required_except_on_health(guarded):
    url = guarded["base"] + "/v1/chat/completions"
    for headers in ({}, keyed("wrong"), {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        error = assert_openai_error(httpx.post(url, json=chat_body(max_tokens=2), headers=headers), 401,
                                    "invalid_api_key")
        assert error["type"] == "authentication_error"
    assert_openai_error(httpx.get(guarded["base"] + "/v1/models"), 401, "invalid_api_key")
    assert httpx.get(guarded["base"] + "/health").status_code == 200
    # The official client sends its api_key as the Bearer token.
    models = openai.OpenAI(base_url=guarded["base"] + "/v1", api_key=API_KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded["base"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_docs_ui_is_off_unless_asked_for(server, guarded):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(server["base"] + path), 404, "not_found")
        assert httpx.get(guarded["base"] + path).status_code == 200  # docs=True: open without the key


def test_framework_errors_are_openai_shaped(server):
    base = server["base"]
    assert_openai_error(httpx.get(base + "/v1/nothing-here"), 404, "not_found")
    assert_openai_error(httpx.get(base + "/v1/chat/completions"), 405, "method_not_allowed")
    not_utf8 = b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    assert_openai_error(httpx.post(base + "/v1/chat/completions", content=not_utf8,
                                   headers={"content-type": "application/json"}), 400, "invalid_encoding")
    assert_openai_error(httpx.post(base + "/v1/chat/completions", content=b"{not json",
                                   headers={"content-type": "application/json"}), 400, "invalid_json")


def test_content_part_arrays_are_text(server):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about the sea."}]
    reply = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                                   max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == greedy(server, [{"role": "user", "content": "Tell me\nabout the sea."}],
                                                      8)[0]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    response = httpx.post(server["base"] + "/v1/chat/completions", json=chat_body([parts[0], image]))
    error = assert_openai_error(response, 400, "invalid_value", "messages.0.content")
    assert "image_url" in error["message"]
    assert_openai_error(httpx.post(server["base"] + "/v1/chat/completions", json=chat_body(5)), 400,
                        "invalid_value", "messages.0.content")


@pytest.mark.parametrize("prompt", ["", [""]])
def test_completions_empty_prompt_names_prompt(server, prompt):
    response = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert_openai_error(response, 400, "empty_prompt", "prompt")


def test_stop_strings_through_the_server(server):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    text, _ = greedy(server, messages, 16)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a piece of the greedy reply, wherever it first occurs
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                   stop=[stop])
    assert reply.choices[0].message.content == text[: text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_sampling_and_seed_through_the_server(server):
    """At T>0 a seed makes a reply reproducible, another seed changes it, and each row of a
    batch of sampled requests equals the same request decoded alone with its seed."""
    target, drafter = server["target"], server["drafter"]
    messages = [{"role": "user", "content": "Tell me about the sea."}]

    def ask(seed):
        return client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                      temperature=1.5, seed=seed).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # concurrent: they share a batch
        replies = list(pool.map(ask, range(4)))
    assert len(set(replies)) > 1  # different seeds, different samples
    assert ask(2) == replies[2]
    ids = target.render_chat(messages)
    for seed, reply in enumerate(replies):
        config = GenerationConfig(max_new_tokens=12, seed=seed, sampling=SamplingConfig(temperature=1.5))
        assert reply == target.decode(generate(target, ids, drafter, config, DecodeOptions(TREE)).token_ids)


@pytest.mark.slow
def test_soak_16_clients_good_and_bad(server):
    """16 concurrent clients for 60 s mixing good requests, malformed ones, streams and plain
    requests abandoned midway, and oversized bodies: no server error, every good T=0 reply
    equal to greedy, /health always answering within a second, memory flat after warm-up."""
    serve_soak = benchmark_script("serve_soak")
    max_body_bytes = 64 * 1024
    app = create_app(server["engine"], MODEL, default_max_tokens=8, max_body_bytes=max_body_bytes)
    srv, thread, base = serve_in_thread(app)
    try:
        expected = {p: greedy(server, [{"role": "user", "content": p}], 8)[0] for p in serve_soak.PROMPTS}
        cancelled_before = server["engine"].rows_cancelled
        stats = serve_soak.run_soak(base, expected, clients=16, seconds=60, max_tokens=8,
                                    max_body_bytes=max_body_bytes, model=MODEL)
    finally:
        srv.should_exit = True
        thread.join(10)
    print(f"soak: {dict(stats['requests'])}, /health max {stats['health_max_s']:.3f} s, "
          f"RSS {stats['rss_start_mb']:.0f} -> {stats['rss_end_mb']:.0f} MB, samples {stats['rss_mb']}")
    assert all(stats["requests"][kind] > 0 for kind in serve_soak.KINDS), stats["requests"]
    assert stats["server_errors"] == 0, stats["error_messages"][:3]
    assert stats["mismatches"] == 0
    assert stats["health_max_s"] < 1.0
    assert server["engine"].rows_cancelled > cancelled_before
    warmed_up = stats["rss_mb"][len(stats["rss_mb"]) // 3]
    assert stats["rss_end_mb"] < 1.25 * warmed_up, stats["rss_mb"]
