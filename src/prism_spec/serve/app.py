"""An OpenAI-compatible HTTP API over the batching engine (FastAPI).

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (JSON or Server-Sent Events with
``stream: true``), ``/v1/models`` and ``/health``. Usage reports prompt and completion tokens
plus ``acceptance_length`` (tokens per target forward).

Every error has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``. Before a
request is parsed, a guard checks its API key (``Authorization: Bearer``, when the server has
one) and its body size; every field is then validated against its real range, so nothing
malformed reaches the engine. Prompts are tokenised on a worker thread, not on the event loop.
A client that disconnects, streaming or not, cancels its row at the next round.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.decode import SEED_MAX, SEED_MIN, GenerationConfig, GenerationResult
from ..runtime.verify import SamplingConfig
from .engine import BatchingEngine, EngineRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}

#: Request bodies larger than this get a 413 unless the server is given another limit: a chat
#: request that fills a long context is a few hundred KB of JSON.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1
#: Paths that need no API key: load balancers probe /health without one.
OPEN_PATHS = frozenset({"/health"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: Any  # a string, or OpenAI content parts; normalised to a string below

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        """A string as it is; a list of ``{"type": "text", "text": ...}`` parts joined by newlines
        (as vLLM does); anything else, images included, is refused."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string or a list of text content parts")
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                got = f"type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
                raise ValueError(f"part {i} is {got}; this server takes only text parts "
                                 '({"type": "text", "text": "..."})')
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)


class _Sampling(BaseModel):
    # Unknown OpenAI fields are accepted and ignored. Numbers and booleans are strict: "8" and
    # true are not a max_tokens, "0.7" is not a temperature (JSON has real numbers for them).
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0, le=2, strict=True)
    top_p: float = Field(default=1.0, gt=0, le=1, strict=True)
    top_k: int = Field(default=0, ge=0, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, strict=True)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


class RequestGuard:
    """ASGI middleware: the checks that come before routing and parsing. The API key first
    (nothing of an unauthenticated request is read), then the body: refused by its declared
    length or as soon as it grows past ``max_body_bytes``, and refused when it is not UTF-8.
    The body is read here, within the limit, and handed on whole."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, open_paths: frozenset[str]):
        self.app, self.max_body_bytes, self.open_paths = app, max_body_bytes, open_paths
        # Digests have one length whatever the key's, so compare_digest leaks nothing, not even that.
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key_digest is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
            return await _error(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                                "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await _error(400, f"the request body is not valid UTF-8 (byte {exc.start})",
                                "invalid_encoding")(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # later messages: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.key_digest)

    async def _too_large(self, scope, receive, send):
        await _error(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                     "request_too_large")(scope, receive, send)


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
    default_max_tokens: int = 256,
    *,
    max_tokens_cap: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    docs: bool = False,
) -> FastAPI:
    """The app for ``engine`` (whose DecodeOptions set the tree and the cache mode of every
    batch). ``default_max_tokens``: the reply length when a request gives
    none. ``max_tokens_cap``: the most a request may ask for (always also bounded by the
    context the prompt leaves). ``api_key``: required as a Bearer token on every path but
    /health. ``docs``: serve /docs, /redoc and /openapi.json."""
    app = FastAPI(title="prism-spec", description="Lossless speculative decoding, OpenAI-compatible API",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes,
                       open_paths=OPEN_PATHS | (DOCS_PATHS if docs else frozenset()))
    target = engine.target

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return _error(400, f"{where or 'request'}: {message}", "invalid_value", where or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # The framework's own errors (unknown path, wrong method, unreadable body).
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return _error(exc.status_code, message, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches_run": engine.batches_run,
                "largest_batch": engine.largest_batch, "rows_cancelled": engine.rows_cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "prism-spec"}]}

    def prepare(body: _Sampling, prompt_ids: list[int], prompt_param: str) -> tuple[GenerationConfig, list[str]]:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model_not_found", "model")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "empty_prompt", prompt_param)
        if len(prompt_ids) + 1 >= target.max_context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
                                f"{target.max_context}", "context_length_exceeded", prompt_param)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
        config = GenerationConfig(
            max_new_tokens=reply_length(body, len(prompt_ids)),
            sampling=SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
            stop_strings=tuple(stops),
            seed=body.seed,
        )
        return config, stops

    def reply_length(body: _Sampling, prompt_len: int) -> int:
        """The request's max_tokens (max_completion_tokens for chat) within the cap and the
        context the prompt leaves; without one, the server's default within the cap (decoding
        then ends where the context does)."""
        chat_limit = isinstance(body, ChatRequest) and body.max_completion_tokens is not None
        param = "max_completion_tokens" if chat_limit else "max_tokens"
        requested = getattr(body, param)
        if requested is None:
            return min(default_max_tokens, max_tokens_cap or default_max_tokens)
        if max_tokens_cap is not None and requested > max_tokens_cap:
            raise APIError(400, f"{param} is {requested} but this server allows at most {max_tokens_cap}",
                           "invalid_value", param)
        room = target.max_context - prompt_len
        if requested > room:
            raise APIError(400, f"{param} is {requested} but the prompt's {prompt_len} tokens leave room for "
                                f"{room} in the model's context of {target.max_context}",
                           "context_length_exceeded", param)
        return requested

    async def run(body: _Sampling, prompt_ids: list[int], prompt_param: str, chat: bool, request: Request):
        config, stops = prepare(body, prompt_ids, prompt_param)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind: str, payload) -> None:  # on the engine thread
            if body.stream or kind != "tokens":  # a plain reply needs only the result
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = EngineRequest(prompt_ids, config, on_event)
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
            pending = asyncio.ensure_future(events.get())
            # Nothing tells a handler that its client hung up: ask, while the engine works.
            while not (await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    pending.cancel()
                    job.cancel.set()  # the engine ends the row at its next round
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except asyncio.CancelledError:  # the server is shutting down
            pending.cancel()
            job.cancel.set()
            raise
        kind, payload = pending.result()
        if kind == "error":
            raise APIError(500, f"generation failed: {payload}", "generation_error")
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
        # Rendering and tokenising a long prompt takes a while: not on the event loop.
        ids = await run_in_threadpool(target.render_chat, messages)
        return await run(body, ids, "messages", True, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "this server takes one prompt per request", "invalid_value", "prompt")
            prompt = prompt[0]
        ids = (await run_in_threadpool(target.tokenizer, prompt))["input_ids"] if prompt else []
        return await run(body, ids, "prompt", False, request)

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
