"""An OpenAI-compatible HTTP API over the batching engine (FastAPI).

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (JSON or Server-Sent Events with
``stream: true``), ``/v1/models`` and ``/health``. Usage reports prompt and completion tokens
plus ``acceptance_length`` (tokens per target forward). Bad requests get OpenAI-style 4xx
errors; a client that disconnects mid-stream cancels its row at the next round.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..runtime.decode import SEED_MAX, SEED_MIN, GenerationConfig, GenerationResult
from ..runtime.tree import TreeConfig
from ..runtime.verify import SamplingConfig
from .engine import BatchingEngine, EngineRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def visible_text(text: str, stops: list[str], final: bool) -> str:
    """Text a client may see: cut at the first stop string; while streaming, hold back a tail
    that could still become a stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut]
    if final:
        return text
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    text = text[: len(text) - hold] if hold else text
    return text.rstrip("\ufffd")  # an incomplete UTF-8 character decodes to one or more of these


def create_app(
    engine: BatchingEngine,
    model_name: str,
    tree: TreeConfig,
    default_max_tokens: int = 256,
    static_cache: bool = False,
) -> FastAPI:
    app = FastAPI(title="prism-spec", description="Lossless speculative decoding, OpenAI-compatible API")
    target = engine.target

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", "invalid_value", where or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.code, exc.param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches_run": engine.batches_run,
                "largest_batch": engine.largest_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "prism-spec"}]}

    def prepare(body: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> tuple[GenerationConfig, list[str]]:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model_not_found", "model")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "empty_prompt", "messages")
        if len(prompt_ids) + 1 >= target.max_context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
                                f"{target.max_context}", "context_length_exceeded", "messages")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
        config = GenerationConfig(
            max_new_tokens=max_tokens or default_max_tokens,
            sampling=SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
            tree=tree,
            stop_strings=tuple(stops),
            seed=body.seed,
            static_cache=static_cache,
        )
        return config, stops

    async def run(body: _Sampling, prompt_ids: list[int], max_tokens: int | None, chat: bool, request: Request):
        config, stops = prepare(body, prompt_ids, max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = EngineRequest(prompt_ids, config, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(events, job, rid, created, chat, stops, include_usage),
                media_type="text/event-stream",
            )
        try:
            while True:
                kind, payload = await events.get()
                if kind == "done":
                    break
                if kind == "error":
                    raise APIError(500, f"generation failed: {payload}", "generation_error")
        except asyncio.CancelledError:  # the client went away
            job.cancel.set()
            raise
        result: GenerationResult = payload
        text = visible_text(target.decode(result.token_ids), stops, final=True)
        finish = FINISH[result.finish_reason]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": _usage(result)}

    async def _stream(events, job, rid, created, chat, stops, include_usage):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, finish=None, usage=None) -> str:
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                      else {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
            body = {"id": rid, "object": kind_name, "created": created, "model": model_name, "choices": [choice]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        ids: list[int] = []
        sent = ""
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, payload = await events.get()
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': str(payload), 'type': 'server_error'}})}\n\n"
                    break
                final = kind == "done"
                if not final:
                    ids.extend(payload)
                text = visible_text(target.decode(ids), stops, final)
                if len(text) > len(sent):
                    piece, sent = text[len(sent):], text
                    yield chunk({"content": piece} if chat else piece)
                if final:
                    yield chunk({} if chat else "", FINISH[payload.finish_reason])
                    if include_usage:
                        body = {"id": rid, "object": kind_name, "created": created, "model": model_name,
                                "choices": [], "usage": _usage(payload)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # no-op when finished; stops the row when the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
        if all(not m["content"].strip() for m in messages):
            raise APIError(400, "the messages are empty", "empty_prompt", "messages")
        return await run(body, target.render_chat(messages), body.max_completion_tokens or body.max_tokens, True, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "this server takes one prompt per request", "invalid_value", "prompt")
            prompt = prompt[0]
        ids = target.tokenizer(prompt)["input_ids"] if prompt else []
        return await run(body, ids, body.max_tokens, False, request)

    return app


def _usage(result: GenerationResult) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_len, "completion_tokens": n, "total_tokens": result.prompt_len + n,
            "acceptance_length": round(result.acceptance_length, 4)}


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 20.0):
    """Start uvicorn for ``app`` on a background thread (port 0: a free one); returns
    (server, thread, base_url). Stop with ``server.should_exit = True; thread.join()``.
    For tests, load tests and notebooks."""
    import socket
    import threading

    import httpx
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, name="prism-serve", daemon=True)
    thread.start()
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, thread, base
        except httpx.TransportError:
            time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError(f"the server did not come up on {base} within {timeout_s:g} s")
