"""An OpenAI-compatible HTTP server for one loaded :class:`~rosenblatt.engine.Engine`.

``python -m rosenblatt serve --model PATH`` (or :func:`create_app` / :func:`serve` from Python)
offers ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain
JSON or Server-Sent Events with ``"stream": true``) and ``GET /health``, built on starlette and
uvicorn.

Design:

* **One engine, one worker thread.** The engine is not thread-safe, so every generation runs on
  a single :class:`EngineWorker` thread fed by a FIFO :class:`queue.Queue`. Requests are served
  one after another in the order their bodies arrived; the event loop never touches the engine
  and stays free for ``/health``, ``/v1/models`` and for accepting more requests.
* **Events back to the event loop.** The worker pushes ``("started" | "piece" | "done" |
  "error" | "cancelled", value)`` events into the request's own :class:`asyncio.Queue` with
  ``loop.call_soon_threadsafe``; a request only ever sees its own pieces, so outputs cannot mix.
* **Cancellation.** Each job carries a :class:`threading.Event`. A client that disconnects
  (while queued, while waiting for a non-streamed answer, or mid-stream) sets it; the worker
  checks it before decoding each further token and closes the engine's generator, so decoding
  stops at once (at most the token in progress is finished). A job cancelled while still
  queued is skipped without touching the engine.
* **Errors.** Validation happens before a job is queued; what only the engine can check (the
  prompt's length against the context, the chat template) is checked when the job starts and
  answered as a 4xx before any streamed byte is sent. Every error body has OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}``; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat_template import ChatTemplateError
from .errors import ModelFileError
from .generate import GenerationResponse
from .params import GenerationParams, ParamError, parse

log = logging.getLogger("rosenblatt.server")

#: request bodies larger than this are refused (413)
MAX_BODY_BYTES = 4 * 2**20
#: at most this many requests wait for the engine; more get 503
DEFAULT_MAX_QUEUE = 64


# -- errors ---------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "invalid_request_error"
    if status == 429 or status == 503:
        return "server_overloaded"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _engine_error(e: Exception, param: str) -> APIError:
    """What the engine raised when a job started, as the answer to the client."""
    msg = " ".join(str(e).split())
    if isinstance(e, ModelFileError):       # e.g. an unusable chat template: the model's fault, not the request's
        return APIError(500, msg, code="model_error")
    if isinstance(e, ChatTemplateError):
        return _bad(msg, param="messages", code="invalid_messages")
    if isinstance(e, ValueError):
        if "the context holds" in msg:
            return _bad(f"This model's context is too short for the prompt: {msg}", param=param,
                        code="context_length_exceeded")
        return _bad(msg, param=param)
    log.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}", code="internal_error")


# -- the worker thread ------------------------------------------------------------------------

@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""          # "stop", "length" or "cancelled"

    def openai(self) -> UsageBody:
        return UsageBody(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens)


class Job:
    """One generation: ``start(engine)`` returns the engine's piece iterator (validating eagerly)."""

    def __init__(self, start: Callable[[Any], Iterator[GenerationResponse]], loop: asyncio.AbstractEventLoop):
        self.start = start
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, value: Any = None) -> None:
        """Called on the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:                 # the event loop is gone (shutdown): nobody listens any more
            self.cancelled.set()

    async def next(self) -> tuple[str, Any]:
        return await self.events.get()


class EngineWorker:
    """Runs every generation of one engine on one thread, first come first served."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE):
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self.served = 0          # jobs run to their end (stop or length)
        self.cancelled = 0       # jobs stopped or skipped because their client went away
        self.failed = 0          # jobs the engine refused or failed
        self.last = Usage()      # the last job that ran on the engine

    # event-loop side
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._main, name="rosenblatt-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and everything queued; wait for the thread to end."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post("cancelled")
        if self._current is not None:
            self._current.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, start: Callable[[Any], Iterator[str]]) -> Job:
        self.start()                          # no-op while the thread runs
        if self._jobs.qsize() >= self.max_queue:
            raise APIError(503, f"too many requests waiting ({self.max_queue}); try again later",
                           code="queue_full")
        job = Job(start, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def stats(self) -> dict:
        return {"served": self.served, "cancelled": self.cancelled, "failed": self.failed,
                "queued": self.queued, "busy": self.busy, "last": asdict(self.last)}

    # worker-thread side
    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():      # its client left while it was queued
                self.cancelled += 1
                job.post("cancelled")
                continue
            self._current = job
            try:
                self._run(job)
            except Exception as e:           # never let the one engine thread die
                log.exception("worker failed")
                self.failed += 1
                job.post("error", e)
            finally:
                self._current = None

    def _run(self, job: Job) -> None:
        engine = self.engine
        try:
            pieces = job.start(engine)
        except Exception as e:               # refused before generating: bad prompt, template, ...
            self.failed += 1
            job.post("error", e)
            return
        job.post("started")
        st = None
        try:
            while not job.cancelled.is_set():
                try:
                    r = next(pieces)
                except StopIteration:
                    break
                st = r.stats
                if r.text:
                    job.post("piece", r.text)
        except Exception as e:               # a failure while decoding: a bug, never the client's fault
            log.exception("generation failed")
            with contextlib.suppress(Exception):
                pieces.close()
            engine.reset()                    # the cache may be half-updated
            self.failed += 1
            job.post("error", e)
            return
        finally:
            pieces.close()                    # stops the engine's generator (no-op when it ended)
        if job.cancelled.is_set():
            self.cancelled += 1
            usage = Usage(st.prompt_tokens if st else 0, st.generated_tokens if st else 0, "cancelled")
        else:
            self.served += 1
            usage = Usage(st.prompt_tokens, st.generated_tokens, st.finish_reason)
        self.last = usage
        job.post("done", usage)


# -- requests and responses -------------------------------------------------------------------
#
# A request's OpenAI envelope (model, messages or prompt, stream, ...) is declared by the models
# below; its sampling fields are the engine's own declaration, GenerationParams. Both raise a
# ParamError naming the field, answered as OpenAI's invalid_request_error.

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
#: the envelope keeps the fields it does not declare, to refuse the unsupported ones by name
_ENVELOPE = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        """Content parts: only text is understood; they are joined into one string."""
        if isinstance(v, list):
            for j, part in enumerate(v):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise PydanticCustomError("invalid_value", f"content[{j}]: only text parts are supported")
            return "".join(part["text"] for part in v)
        if v is None:
            raise PydanticCustomError("missing_required_parameter", "is required")
        return v


class _Request(BaseModel):
    """What both endpoints share, besides the sampling fields."""
    model_config = _ENVELOPE
    model: str | None = None                 # optional here: there is one model
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)

    def unsupported(self, name: str, ok: Callable[[Any], bool]) -> None:
        value = (self.model_extra or {}).get(name, getattr(self, name, None))
        if not ok(value):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")

    def generation(self, body: dict) -> GenerationParams:
        """The engine's parameters from the request's sampling fields (llama.cpp's extensions
        top_k, min_p, repeat_penalty, repeat_last_n included)."""
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
        for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
            self.unsupported(name, lambda v: not v)
        fields = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
        if isinstance(fields.get("seed"), int) and not isinstance(fields["seed"], bool):
            fields["seed"] %= 2**64          # OpenAI allows any int64; the sampler wants >= 0
        max_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # omitted: as many as the context holds (the engine caps it)
        fields["max_new_tokens"] = max_tokens if max_tokens is not None else 1 << 30
        try:
            return GenerationParams(**fields)
        except ParamError as e:
            name = max_name if e.param == "max_new_tokens" else e.param.split("[")[0]
            raise _bad(f"'{name}' {e.problem}", param=name, code=e.kind) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


#: the request fields handed to GenerationParams (max_tokens is mapped by hand)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop")


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)

    def checked(self) -> ChatRequest:
        self.unsupported("logprobs", lambda v: not v)
        self.unsupported("top_logprobs", lambda v: not v)
        self.unsupported("tools", lambda v: not v)
        self.unsupported("functions", lambda v: not v)
        self.unsupported("response_format", lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"))
        return self

    def chat(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]                             # a batch of one
        if isinstance(v, list) and len(v) > 1 and all(isinstance(x, (str, list)) for x in v):
            raise PydanticCustomError("unsupported_parameter", "only one prompt per request is supported")
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if isinstance(v, str):
            return v
        raise PydanticCustomError("invalid_type", "must be a string, a list of token ids or a list holding one of those")

    def checked(self, vocab_size: int) -> CompletionRequest:
        if isinstance(self.prompt, list):
            bad = [t for t in self.prompt if not 0 <= t < vocab_size]
            if bad:
                raise _bad(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt",
                           code="invalid_value")
        self.unsupported("echo", lambda v: not v)
        self.unsupported("logprobs", lambda v: v is None)
        self.unsupported("suffix", lambda v: not v)
        self.unsupported("best_of", lambda v: v in (None, 1))
        return self


def _request(model: type[_Request], body: dict):
    try:
        return parse(model, body)
    except ParamError as e:
        raise _bad(f"'{e.param}' {e.problem}", param=e.param, code=e.kind) from None


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A whole answer, or one streamed chunk of it (``object`` says which)."""
    id: str
    object: Literal["chat.completion", "chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChoice] | list[ChunkChoice] | list[TextChoice]
    usage: UsageBody | None = None

    def body(self) -> dict:
        d = self.model_dump()
        if d["usage"] is None:
            del d["usage"]
        for c in d["choices"]:
            if "delta" in c:
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return d


# -- the application --------------------------------------------------------------------------

class _SSEResponse(StreamingResponse):
    """A streamed answer that cancels its job however the response ends (done, disconnect, error)."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        # Below ASGI spec 2.4 starlette itself listens for the disconnect and cancels the body
        # iterator; from 2.4 on it only learns of it when a send fails, which servers may not
        # signal, so listen here too.
        spec = scope.get("asgi", {}).get("spec_version", "2.0")
        watcher = None
        if tuple(int(x) for x in spec.split(".")[:2] if x.isdigit()) >= (2, 4):
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.job.cancel()
            watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            if watcher is not None:
                watcher.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, job: Job):
    """While inside, a client that hangs up cancels ``job``."""
    async def watch():
        await _wait_for_disconnect(request)
        job.cancel()
    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class _AuthMiddleware:
    """``Authorization: Bearer <key>`` on every path but ``/health`` (pure ASGI: streaming-safe)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                msg = ("Missing API key: send 'Authorization: Bearer <key>'" if not given
                       else "Incorrect API key provided")
                err = APIError(401, msg, code="invalid_api_key")
                await err.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The state behind the routes: the engine's worker, the model's names."""

    def __init__(self, engine, model_id: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.engine = engine
        path = Path(engine.path)
        self.model_id = model_id or path.stem
        self.model_names = {self.model_id, path.stem, path.name}
        try:
            self.created = int(os.path.getmtime(path))
        except OSError:
            self.created = int(time.time())
        self.worker = EngineWorker(engine, max_queue=max_queue)

    # helpers
    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "rosenblatt"}

    def _check_model(self, req: _Request) -> None:
        if req.model is not None and req.model not in self.model_names:
            raise APIError(404, f"The model '{req.model}' does not exist; this server has '{self.model_id}'",
                           param="model", code="model_not_found")

    async def _json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:       # JSONDecodeError, UnicodeDecodeError, too deep
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    # routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, **self.worker.stats()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.model_names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json(request)
        req = _request(ChatRequest, body)
        self._check_model(req)
        params = req.checked().generation(body)
        messages = req.chat()
        return await self._run(request, lambda e: e.chat_responses(messages, params=params), chat=True,
                               stream=bool(req.stream), include_usage=req.include_usage)

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        req = _request(CompletionRequest, body)
        self._check_model(req)
        params = req.checked(self.engine.config.vocab_size).generation(body)
        prompt = req.prompt
        return await self._run(request, lambda e: e.responses(prompt, params), chat=False,
                               stream=bool(req.stream), include_usage=req.include_usage)

    async def _run(self, request: Request, start, chat: bool, stream: bool, include_usage: bool) -> Response:
        job = self.worker.submit(start)
        param = "messages" if chat else "prompt"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        handed_over = False
        try:
            if stream:
                async with _cancel_on_disconnect(request, job):      # while queued
                    kind, value = await job.next()
                if kind == "error":
                    return _engine_error(value, param).response()
                if kind == "cancelled":
                    return Response(status_code=499)   # the client is gone; nobody reads this
                handed_over = True
                return _SSEResponse(self._events(job, rid, created, chat, include_usage), job)
            pieces: list[str] = []
            async with _cancel_on_disconnect(request, job):
                while True:
                    kind, value = await job.next()
                    if kind == "piece":
                        pieces.append(value)
                    elif kind == "error":
                        return _engine_error(value, param).response()
                    elif kind == "cancelled":
                        return Response(status_code=499)
                    elif kind == "done":
                        break
            usage: Usage = value
            if usage.finish_reason == "cancelled":
                return Response(status_code=499)
            text = "".join(pieces)
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=usage.finish_reason) if chat \
                else TextChoice(text=text, finish_reason=usage.finish_reason)
            return JSONResponse(Completion(id=rid, object="chat.completion" if chat else "text_completion",
                                           created=created, model=self.model_id, choices=[choice],
                                           usage=usage.openai()).body())
        finally:
            if not handed_over:
                job.cancel()

    async def _events(self, job: Job, rid: str, created: int, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, role: bool = False, choices=None,
                  usage: UsageBody | None = None) -> dict:
            if choices is None:
                choices = [ChunkChoice(delta=Delta(role="assistant" if role else None, content=piece),
                                       finish_reason=finish) if chat
                           else TextChoice(text=piece or "", finish_reason=finish)]
            return Completion(id=rid, object=obj, created=created, model=self.model_id, choices=choices,
                              usage=usage).body()

        try:
            if chat:
                yield _sse(chunk("", role=True))
            while True:
                kind, value = await job.next()
                if kind == "piece":
                    yield _sse(chunk(value))
                elif kind == "done":
                    usage: Usage = value
                    if usage.finish_reason == "cancelled":
                        return
                    yield _sse(chunk(None if chat else "", finish=usage.finish_reason))
                    if include_usage:
                        yield _sse(chunk(None, choices=[], usage=usage.openai()))
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "error":
                    yield _sse(_engine_error(value, "messages" if chat else "prompt").body())
                    return
                else:                                   # cancelled
                    return
        finally:
            job.cancel()                                # a no-op when the job ended by itself


def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code).response(headers=getattr(exc, "headers", None))


def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error").response()


def create_app(engine, api_key: str | None = None, model_id: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE) -> Starlette:
    """The ASGI application serving ``engine`` (its worker thread starts with the app's lifespan).

    ``app.state.server`` is the :class:`Server` (its ``worker`` has the counters of ``/health``).
    """
    srv = Server(engine, model_id=model_id, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(srv.worker.stop)

    routes = [
        Route("/health", srv.health, methods=["GET"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/v1/models/{model:path}", srv.model, methods=["GET"]),
        Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, APIError: _api_error, ClientDisconnect: _client_gone,
                Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = srv
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    return app


# -- running it -------------------------------------------------------------------------------

def url_for(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app, host: str = "127.0.0.1", port: int = 8080, on_ready: Callable[[str], None] | None = None,
                log_level: str = "warning", graceful_timeout: float = 5.0):
    """A :class:`uvicorn.Server` for ``app`` that calls ``on_ready(url)`` once it listens.

    ``port=0`` picks a free port; ``on_ready`` gets the URL with the real one. Run it with
    ``server.run()`` (blocks; Ctrl-C stops it) and stop it from another thread with
    ``server.should_exit = True``.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                bound = port
                for s in getattr(self, "servers", []):
                    for sock in s.sockets or ():
                        bound = sock.getsockname()[1]
                        break
                self.url = url_for(host, bound)
                if on_ready is not None:
                    on_ready(self.url)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=graceful_timeout)
    return _Server(config)


__all__ = ["APIError", "EngineWorker", "Server", "create_app", "make_server", "url_for", "is_loopback"]
