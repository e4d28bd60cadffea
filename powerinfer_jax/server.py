"""The OpenAI-compatible HTTP layer: FastAPI routes over a `batching.ContinuousBatcher`.

A request flows: JSON body -> a pydantic model (a bad field is a 400 in OpenAI's error shape) -> prompt
token ids (the tokenizer, or the chat template of `chat.py`) -> `batcher.submit(ids, RequestParams,
on_event)` -> events from the batcher thread, handed to the request's asyncio queue -> stop strings cut
here -> one JSON response, or server-sent event chunks ending with `data: [DONE]`. A client that goes
away cancels its request, which frees its batch row at the next step.

    app = create_app(engine, batcher, "my-model")      # then run it with uvicorn (bin/serve does)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /health.
Beyond OpenAI's fields a request may set `top_k` (0: no cut). Defaults follow OpenAI: temperature 1,
top_p 1, max_tokens 16 for completions and the rest of the context for chat; no seed means a random one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from powerinfer_jax.batching import Event, RequestParams
from powerinfer_jax.chat import ChatFormatter
from powerinfer_jax.errors import PowerInferError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 16
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


class OpenAIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ---------------------------------------------------------------------------------------
Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    # OpenAI clients may send fields that change nothing here (user, metadata, ...): ignored, not refused.
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Sampling controls this server does not implement: refused unless neutral, so a client never
    # believes a setting took effect when it did not.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt]
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = None
    tools: list[Any] | None = None


# ---- stop strings -----------------------------------------------------------------------------------------
class StopMatcher:
    """Cuts generated text before the first stop string; while streaming it holds back any tail of the
    text that could still be the start of one, so no piece of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text, self.shown = "", 0  # text[:shown] has been handed out

    def push(self, piece: str) -> tuple[str, bool]:
        """Adds a token's text; returns (text now safe to show, whether a stop string was reached)."""
        self.text += piece
        return self._advance(final=False)

    def finish(self, full_text: str) -> tuple[str, bool]:
        """The end: the whole completion text (it may end with what pieces held back, half a UTF-8 character)."""
        if full_text.startswith(self.text):
            self.text = full_text
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.text, self.shown = self.text[self.shown:cut], self.text[:cut], cut
            return out, True
        end = len(self.text) if final else max(self.shown, len(self.text) - self._held())
        out, self.shown = self.text[self.shown:end], end
        return out, False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


# ---- one request's generation -----------------------------------------------------------------------------
class _Generation:
    """One submitted request: its events arrive from the batcher thread into an asyncio queue."""

    def __init__(self, app_state: "_State", prompt_ids: list[int], params: RequestParams, stops: list[str]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.state, self.prompt_tokens, self.completion_tokens = app_state, len(prompt_ids), 0
        self.matcher = StopMatcher(stops)
        self.finish_reason: str | None = None
        self._getter: asyncio.Future | None = None
        self._next_check = 0.0  # when a non-streaming request next asks whether its client is still there

        def on_event(ev: Event) -> None:  # the batcher thread: hand over, never block
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

        self.req = app_state.batcher.submit(prompt_ids, params, on_event)
        app_state.in_flight += 1
        self._open = True

    async def pieces(self, request: Request | None = None) -> AsyncIterator[str]:
        """Text pieces as they become safe to show; sets finish_reason at the end. With `request`, a client
        that disconnects ends it (streams learn that from Starlette, which cancels them)."""
        try:
            while self.finish_reason is None:
                ev = await self._next(request)
                if ev.kind == "token":
                    self.completion_tokens += 1
                    piece, stopped = self.matcher.push(ev.text)
                    if stopped:
                        self.finish_reason = "stop"
                        self.req.cancel()  # the batcher's "cancelled" done that follows is not read
                elif ev.kind == "done":
                    if ev.finish_reason == "cancelled":  # not ours: the batcher is stopping
                        raise OpenAIError(503, "the server is shutting down; retry later", "server_error")
                    piece, stopped = self.matcher.finish(ev.text)
                    self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)
                    self.finish_reason = "stop" if stopped else ev.finish_reason
                else:
                    raise OpenAIError(500, f"generation failed: {ev.error}", "server_error")
                if piece:
                    yield piece
        finally:
            self.close()

    def close(self) -> None:
        """Frees the request's batch row if it is still generating (client gone, error); idempotent."""
        if self._open:
            self._open = False
            self.state.in_flight -= 1
            if self.finish_reason is None:
                self.req.cancel()
            if self._getter is not None:
                self._getter.cancel()

    def usage(self) -> dict:
        """OpenAI's usage counts."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def _next(self, request: Request | None) -> Event:
        if request is None:
            return await self.queue.get()
        while True:  # one getter kept across polls, so no event is lost to a timeout
            now = time.monotonic()
            if now >= self._next_check:  # by the clock: tokens may arrive faster than any timeout
                self._next_check = now + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise OpenAIError(499, "the client closed the request")
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait([self._getter], timeout=DISCONNECT_POLL_S)
            if done:
                ev, self._getter = self._getter.result(), None
                return ev


class _State:
    def __init__(self, engine, batcher, model_name: str):
        self.engine, self.batcher, self.model_name = engine, batcher, model_name
        self.chat = ChatFormatter(engine.tokenizer, getattr(engine, "model_dir", None))
        self.created = int(time.time())
        self.in_flight = 0  # requests this server is generating for (HTTP side; the batcher counts its own)
        self.stopping = False  # set by `drain`: new requests get a 503


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(engine, batcher, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` through a started `batcher` under the model id `model_name`."""
    app = FastAPI(title="PowerInfer-JAX", docs_url=None, redoc_url=None, openapi_url=None)
    state = _State(engine, batcher, model_name)
    app.state.serving = state
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "requests_in_flight": state.in_flight,
                "batcher": _plain(batcher.stats())}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(state, body)
        for name, default in (("echo", False), ("logprobs", None), ("suffix", None)):
            if getattr(body, name) not in (None, default):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name)
        if body.best_of not in (None, 1):
            raise OpenAIError(400, "best_of must be 1 (one completion per request)", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OpenAIError(400, "prompt: one prompt per request (send one request per prompt)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await run_in_threadpool(engine.encode, prompt)  # a long prompt must not stall other streams
        else:
            ids = list(prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        gen = _start(state, body, ids, max_tokens, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(gen, lambda piece: chunk(piece, None), lambda: chunk("", gen.finish_reason), None, body)
        text = await _collect(gen, request)
        return {**chunk(text, gen.finish_reason), "usage": gen.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_common(state, body)
        if body.logprobs:
            raise OpenAIError(400, "logprobs is not supported by this server", param="logprobs")
        if body.tools:
            raise OpenAIError(400, "tools are not supported by this server", param="tools")
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        ids = await run_in_threadpool(state.chat.prompt_ids, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.max_seq_len - len(ids), 1)
        gen = _start(state, body, ids, max_tokens, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(gen, lambda piece: chunk({"content": piece}, None), lambda: chunk({}, gen.finish_reason),
                        chunk({"role": "assistant", "content": ""}, None), body)
        text = await _collect(gen, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": gen.finish_reason}],
                "usage": gen.usage()}

    return app


def _start(state: _State, body: _Sampling, ids: list[int], max_tokens: int, prompt_param: str) -> _Generation:
    """Checks the context and submits the request (a bad value is a 400 before anything is generated)."""
    if state.stopping:
        raise OpenAIError(503, "the server is shutting down; retry later", "server_error")
    limit = state.engine.max_seq_len
    if len(ids) + max_tokens > limit:
        too_long = len(ids) >= limit
        what = "prompt" if prompt_param == "prompt" else "conversation"
        fix = f"shorten the {what}" if too_long else f"lower max_tokens or shorten the {what}"
        raise OpenAIError(400, f"this model's maximum context length is {limit} tokens, but the {what} has "
                               f"{len(ids)} tokens and max_tokens asks for {max_tokens} more: {fix}",
                          param=prompt_param if too_long else "max_tokens", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise OpenAIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
    params = RequestParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                           seed=secrets.randbits(63) if body.seed is None else body.seed, stop_at_eos=True)
    return _Generation(state, ids, params, stops)


async def _collect(gen: _Generation, request: Request) -> str:
    """The whole (stop-cut) completion text of a non-streaming request."""
    return "".join([piece async for piece in gen.pieces(request)])


def _sse(gen: _Generation, piece_chunk, final_chunk, first_chunk: dict | None, body: _Sampling) -> StreamingResponse:
    """A streaming response: a first chunk (chat: the role), one per text piece, a final one with
    finish_reason, then [DONE]."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(obj: dict) -> str:
        if include_usage:  # OpenAI's shape with include_usage: null on every chunk but the last
            obj.setdefault("usage", None)
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if first_chunk is not None:
                yield event(first_chunk)
            async for piece in gen.pieces():
                yield event(piece_chunk(piece))
            yield event(final_chunk())
            if include_usage:
                yield event({**final_chunk(), "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"
        except OpenAIError as err:  # after the headers went out: the error travels as an event (the client raises it)
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            gen.close()  # a client gone mid-stream (Starlette cancels this generator): free the row now

    return _ClosingStream(events(), gen, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClosingStream(StreamingResponse):
    """Closes its generator and request however the response ends, so a client gone mid-stream frees its batch
    row at once (when sending fails, Starlette leaves the generator to the garbage collector, and a client gone
    before the first chunk would never start it)."""

    def __init__(self, content, generation: _Generation, **kw):
        super().__init__(content, **kw)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # its `finally` does no awaiting: safe in a cancelled task
            self.generation.close()


async def drain(app: FastAPI) -> None:
    """Starts a shutdown: new requests get a 503 and the batcher stops, so running requests end now (an
    error event on a stream) instead of holding the server's shutdown until its graceful timeout."""
    state: _State = app.state.serving
    state.stopping = True  # set on the event loop, where _start checks it: nothing is submitted after this
    await run_in_threadpool(state.batcher.stop)  # the loop keeps running: the requests' last events arrive


def freeze_startup_heap() -> tuple[int, float]:
    """Takes every object alive now (the loaded model, JAX, the compiled programs) out of the garbage
    collector's full passes; returns (objects frozen, seconds a full collection took before).

    A full (generation-2) collection walks every tracked object: ~135 ms in a server holding the bundled
    model, while every stream waits. It runs whenever enough objects have survived since the last one, so a
    busy server stalls every so often; frozen startup objects are never walked again (what Instagram's and
    vLLM's servers do). Objects made later are collected as usual. For a process serving one model for its
    whole life: frozen garbage is never freed."""
    t0 = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - t0
    gc.freeze()
    return gc.get_freeze_count(), seconds


# ---- checks and errors ------------------------------------------------------------------------------------
def _check_model(state: _State, model: str) -> None:
    if model != state.model_name:
        raise OpenAIError(404, f"the model {model!r:.80} does not exist: this server serves {state.model_name!r} "
                               "(GET /v1/models)", param="model", code="model_not_found")


def _check_common(state: _State, body: _Sampling) -> None:
    _check_model(state, body.model)
    if body.n not in (None, 1):
        raise OpenAIError(400, f"n must be 1 (one completion per request), got {body.n}", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise OpenAIError(400, f"{name} is not supported by this server (send 0 or leave it out)", param=name)
    if body.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias")


def _message_text(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    if any(part.type != "text" for part in m.content):
        raise OpenAIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
    return "".join(part.text or "" for part in m.content)


def _model_card(state: _State) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "powerinfer-jax",
            "max_model_len": state.engine.max_seq_len}


def _plain(obj):
    """Stats as JSON values (numpy scalars become Python numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj.item() if hasattr(obj, "item") else obj


def _add_error_handlers(app: FastAPI) -> None:
    def reply(err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request, err: OpenAIError):
        return reply(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        # FastAPI answers 422 with its own shape; OpenAI clients expect a 400 with an "error" object.
        return reply(_validation_error(err.errors()))

    @app.exception_handler(PowerInferError)
    async def bad_input(_request, err: PowerInferError):
        return reply(OpenAIError(400, str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return reply(OpenAIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        return reply(OpenAIError(500, f"internal error ({type(err).__name__}: {err})", "server_error"))


def _validation_error(errors: list[dict]) -> OpenAIError:
    """FastAPI's validation errors as one OpenAI error: the first problem, naming its field."""
    if not errors:
        return OpenAIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return OpenAIError(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""))
    raw = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in raw if not _is_type_tag(p)]  # pydantic names the union member that failed: not a field
    tagged = bool(raw) and _is_type_tag(raw[-1])
    if not loc:  # the body itself: absent, not an object, or not sent as JSON
        return OpenAIError(400, "the request body must be a JSON object, sent with Content-Type: application/json")
    param = ".".join(loc)
    if tagged and loc[-1] in _UNION_FIELDS:  # one message for the union, not its first member's complaint
        return OpenAIError(400, f"{param}: must be {_UNION_FIELDS[loc[-1]]}", param=param)
    return OpenAIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part


_UNION_FIELDS = {"prompt": "a string, a list of one string, or a list of token ids",
                 "stop": "a string or a list of strings", "content": "a string or a list of text parts"}

