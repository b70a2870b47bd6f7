"""The starlette application (routes, streaming, authentication) and the uvicorn server around it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .protocol import (APIError, LogprobLog, AssistantMessage, ChatChoice, ChatRequest, ChunkChoice, Completion, CompletionRequest,
                       Delta, OpenAIRequest, TextChoice, UsageBody, bad_request, engine_error, parse_request)
from ..params import ParamError
from ..text import grammar
from ..text import tools as tool_calls
from .metrics import MetricsMiddleware, ServerMetrics
from .worker import DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_QUEUE_TIMEOUT, EngineWorker, Job, Usage


log = logging.getLogger("rosenblatt.serve")


#: request bodies larger than this are refused (413)
MAX_BODY_BYTES = 4 * 2**20
#: a request's headers and body must arrive within this many seconds of the connection (or of the
#: previous request's end); a connection that stalls longer is closed
DEFAULT_READ_TIMEOUT = 30.0
#: at most this many connections at once; a request beyond them gets 503 (uvicorn's limit)
DEFAULT_MAX_CONNECTIONS = 128
#: paths served without the API key (and everything under /static/: the chat page asks for the key)
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/"})
#: the chat page's files (plain HTML, JS and CSS; no build step, nothing fetched from elsewhere)
STATIC_DIR = Path(__file__).parent / "static"
#: the page may load and call nothing but this server
PAGE_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def _error_response(err: APIError) -> Response:
    """``err`` as its response; a 503 the worker refused carries ``Retry-After`` (its estimate)."""
    retry_after = getattr(err, "retry_after", None)
    return err.response(headers={"Retry-After": str(int(retry_after))} if retry_after is not None else None)


# -- the application --------------------------------------------------------------------------

class _SSEResponse(StreamingResponse):
    """A streamed answer that cancels its job however the response ends (done, disconnect, error)."""

    def __init__(self, content, job, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job          # anything with cancel(): a Job, or the _Choices of a request

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
async def _cancel_on_disconnect(request: Request, job):
    """While inside, a client that hangs up cancels ``job`` (a Job, or a request's _Choices)."""
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
    """``Authorization: Bearer <key>`` on every path but ``/health``, ``/metrics`` and the chat page
    (``/``, ``/static/``) (pure ASGI: streaming-safe)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and not scope["path"].startswith("/static/"):
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

    def __init__(self, engine, model_id: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT, parallel: int = DEFAULT_PARALLEL):
        self.engine = engine
        path = Path(engine.path)
        self.model_id = model_id or path.stem
        self.model_names = {self.model_id, path.stem, path.name}
        try:
            self.created = int(os.path.getmtime(path))
        except OSError:
            self.created = int(time.time())
        self.worker = EngineWorker(engine, max_queue=max_queue, queue_timeout=queue_timeout, parallel=parallel)
        self.metrics = ServerMetrics(self.worker)

    # helpers
    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "rosenblatt"}

    def _check_model(self, req: OpenAIRequest) -> None:
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
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    # routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, **self.worker.stats()})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def props(self, request: Request) -> Response:
        """What the chat page shows of the model: architecture, size, quantization, contexts, slots."""
        from gguf import LlamaFileType
        cfg, ftype = self.engine.config, self.engine.gguf.get("general.file_type")
        try:
            quant = LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else None
        except ValueError:
            quant = None
        return JSONResponse({"model": self.model_id, "name": cfg.name or None, "architecture": cfg.arch,
                             "parameters": cfg.n_params, "quantization": quant, "n_ctx": self.engine.n_ctx,
                             "n_ctx_train": cfg.context_length, "device": self.engine.device,
                             "slots": self.worker.parallel})

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                                "Cache-Control": "no-cache"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.model_names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json(request)
        req = parse_request(ChatRequest, body)
        self._check_model(req)
        params = req.checked().generation(body)
        messages = req.chat()
        # tool_choice "none": no tools in the prompt, nothing searched for calls
        tools = (req.tool_list() or None) if req.tool_mode() != "none" else None
        calls = tools is not None
        await self._check_grammar(params, {"json_schema": "response_format" if req.response_format else "json_schema",
                                           "grammar": "grammar" if req.tool_mode() in ("none", "auto") else "tools"})
        return await self._run(request, lambda p: (lambda e: e.prepare_chat(messages, p, tools=tools)), params, req,
                               chat=True, calls=calls)

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        req = parse_request(CompletionRequest, body)
        self._check_model(req)
        params = req.checked(self.engine.config.vocab_size).generation(body)
        prompt = req.prompt
        await self._check_grammar(params, {"json_schema": "response_format" if req.response_format else "json_schema"})
        return await self._run(request, lambda p: (lambda e: e.prepare(prompt, p)), params, req, chat=False)

    async def _check_grammar(self, params, names: dict[str, str]) -> None:
        """A response format, grammar or forced tool call the vocabulary cannot serve: a 400 now,
        naming what the client sent (``names``: the parameter's name -> the request's field)."""
        if params.json_schema is None and params.grammar is None:
            return
        try:
            await asyncio.to_thread(grammar.compile_grammar, self.engine.tokenizer, params)
        except ParamError as e:
            name = names.get(e.param, e.param)
            raise bad_request(f"'{name}' {e.problem}", param=name, code=e.kind) from None

    async def _run(self, request: Request, make, params, req, chat: bool, calls: bool = False) -> Response:
        """Queue the request's ``n`` choices (one generation each: with a seed, choice i samples
        with seed + i; identical prompts share their keys and values in the batch) and answer.
        With ``calls``, the model's ``<tool_call>`` blocks become the message's ``tool_calls``."""
        n = req.n or 1
        t0 = time.perf_counter()
        jobs: list[Job] = []
        try:
            for i in range(n):
                p = params if n == 1 or params.seed is None else params.replace(seed=(params.seed + i) % 2**64)
                jobs.append(self.worker.submit(make(p)))
        except APIError:
            for job in jobs:
                job.cancel()
            raise
        choices = _Choices(jobs)
        param = "messages" if chat else "prompt"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        handed_over = False
        try:
            if req.stream:
                async with _cancel_on_disconnect(request, choices):     # while queued
                    early = await choices.first()
                i, kind, value = early[-1]
                if kind == "error":
                    return _error_response(engine_error(value, param))
                if kind == "cancelled":
                    return Response(status_code=499)   # the client is gone; nobody reads this
                handed_over = True
                return _SSEResponse(self._events(choices, early[:-1], rid, created, chat, req.include_usage,
                                                 params.logprobs, request, t0, calls), choices)
            texts = [[] for _ in range(n)]
            logs = [LogprobLog(self.engine.tokenizer, chat) if params.logprobs else None for _ in range(n)]
            usages: list[Usage | None] = [None] * n
            async with _cancel_on_disconnect(request, choices):
                while any(u is None for u in usages):
                    i, kind, value = await choices.next()
                    if kind == "piece":
                        texts[i].append(value.text)
                        if logs[i] is not None:
                            logs[i].add(value)
                    elif kind == "error":
                        return _error_response(engine_error(value, param))
                    elif kind == "cancelled":
                        return Response(status_code=499)
                    elif kind == "done":
                        usages[i] = value
            if any(u.finish_reason == "cancelled" for u in usages):
                return Response(status_code=499)
            out = []
            for i, (pieces, log, usage) in enumerate(zip(texts, logs, usages)):
                text, lp = "".join(pieces), (log.body() if log is not None else None)
                found: list[dict] = []
                if calls:
                    text, found = tool_calls.parse_calls(text)
                message = AssistantMessage(content=text or None, tool_calls=found) if found \
                    else AssistantMessage(content=text)
                finish = "tool_calls" if found else usage.finish_reason
                out.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=lp) if chat
                           else TextChoice(index=i, text=text, finish_reason=usage.finish_reason, logprobs=lp))
            _access(request, rid, usages, t0, False)
            return JSONResponse(Completion(id=rid, object="chat.completion" if chat else "text_completion",
                                           created=created, model=self.model_id, choices=out,
                                           usage=_usage(usages)).body())
        finally:
            if not handed_over:
                choices.cancel()

    async def _events(self, choices: "_Choices", early: list, rid: str, created: int, chat: bool,
                      include_usage: bool, logprobs: bool = False, request: Request | None = None,
                      t0: float = 0.0, calls: bool = False):
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = len(choices.jobs)
        offsets = [0] * n
        usages: list[Usage | None] = [None] * n
        parsers = [tool_calls.CallParser() for _ in range(n)] if calls else None

        def chunk(i: int, piece: str | None, finish: str | None = None, role: bool = False, choices_=None,
                  usage: UsageBody | None = None, lp: dict | None = None, found: list | None = None) -> dict:
            if choices_ is None:
                choices_ = [ChunkChoice(index=i, delta=Delta(role="assistant" if role else None, content=piece,
                                                             tool_calls=found),
                                        finish_reason=finish, logprobs=lp) if chat
                            else TextChoice(index=i, text=piece or "", finish_reason=finish, logprobs=lp)]
            return Completion(id=rid, object=obj, created=created, model=self.model_id, choices=choices_,
                              usage=usage).body()

        async def events():
            for e in early:
                yield e
            while True:
                yield await choices.next()

        try:
            if chat:
                for i in range(n):
                    yield _sse(chunk(i, "", role=True))
            async for i, kind, value in events():
                if kind == "piece":
                    text = parsers[i].feed(value.text) if parsers else value.text
                    if not text and not logprobs:
                        continue
                    lp = None
                    if logprobs:
                        log = LogprobLog(self.engine.tokenizer, chat)
                        log.offset = offsets[i]
                        log.add(value)
                        offsets[i] = log.offset
                        lp = log.body()
                    yield _sse(chunk(i, text, lp=lp))
                elif kind == "done":
                    usage: Usage = value
                    if usage.finish_reason == "cancelled":
                        return
                    usages[i] = usage
                    finish = usage.finish_reason
                    if parsers:
                        rest, found = parsers[i].finish()
                        if rest:
                            yield _sse(chunk(i, rest))
                        if found:
                            finish = "tool_calls"
                            yield _sse(chunk(i, None, found=[{"index": k, **c} for k, c in enumerate(found)]))
                    yield _sse(chunk(i, None if chat else "", finish=finish))
                    if all(u is not None for u in usages):
                        if request is not None:
                            _access(request, rid, usages, t0, True)
                        if include_usage:
                            yield _sse(chunk(0, None, choices_=[], usage=_usage(usages)))
                        yield "data: [DONE]\n\n"
                        return
                elif kind == "error":
                    yield _sse(engine_error(value, "messages" if chat else "prompt").body())
                    return
                elif kind == "cancelled":
                    return
        finally:
            choices.cancel()                            # a no-op when the jobs ended by themselves


class _Choices:
    """The jobs of one request (one per choice), their events merged as (index, kind, value)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self._events: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, i: int, job: Job) -> None:
        while True:
            kind, value = await job.next()
            await self._events.put((i, kind, value))
            if kind in ("done", "error", "cancelled"):
                return

    async def next(self) -> tuple[int, str, Any]:
        return await self._events.get()

    async def first(self) -> list[tuple[int, str, Any]]:
        """Events up to choice 0's first one ("started", or why it could not start; every
        choice has the same prompt, so choice 0 speaks for all): the others' come before it."""
        seen = []
        while True:
            e = await self.next()
            seen.append(e)
            if e[0] == 0 and e[1] != "piece":
                if e[1] == "started":
                    return [x for x in seen if x[1] != "started"] + [e]
                return [e]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        for t in self._tasks:
            if not t.done():
                t.cancel()


#: one line per answered generation request (the CLI's ``serve`` prints them; --no-access-log)
access_log = logging.getLogger("rosenblatt.serve.access")


def _access(request: Request, rid: str, usages: list[Usage], t0: float, streamed: bool) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    client = request.client.host if request.client else "-"
    u = _usage(usages)
    reasons = ",".join(sorted({x.finish_reason for x in usages}))
    access_log.info("%s %s %s %s prompt=%d completion=%d n=%d finish=%s %.3fs%s", client, request.method,
                    request.url.path, rid, u.prompt_tokens, u.completion_tokens, len(usages), reasons,
                    time.perf_counter() - t0, " stream" if streamed else "")


def _usage(usages: list[Usage]) -> UsageBody:
    """One request's usage: its prompt once, the tokens of every choice."""
    prompt = usages[0].prompt_tokens
    completion = sum(u.completion_tokens for u in usages)
    return UsageBody(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code).response(headers=getattr(exc, "headers", None))


def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error").response()


def create_app(engine, api_key: str | None = None, model_id: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
               parallel: int = DEFAULT_PARALLEL) -> Starlette:
    """The ASGI application serving ``engine`` (its worker thread starts with the app's lifespan).

    ``app.state.server`` is the :class:`Server` (its ``worker`` has the counters of ``/health``,
    its ``metrics`` the Prometheus registry of ``/metrics``).
    """
    srv = Server(engine, model_id=model_id, max_queue=max_queue, queue_timeout=queue_timeout, parallel=parallel)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(srv.worker.stop)

    routes = [
        Route("/health", srv.health, methods=["GET"]),
        Route("/metrics", srv.prometheus, methods=["GET"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/v1/models/{model:path}", srv.model, methods=["GET"]),
        Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/props", srv.props, methods=["GET"]),
        Route("/", srv.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    from . import ollama                          # its routes use this module's helpers: imported here
    routes += ollama.routes(srv)
    handlers = {HTTPException: _http_error, APIError: _api_error, ClientDisconnect: _client_gone,
                Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = srv
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)      # outermost: counts the 401s too
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


def _timed_protocol(read_timeout: float):
    """uvicorn's h11 protocol with a read deadline: from a connection's start, or from the first
    byte of a further request on it, the whole request (headers and body) must arrive within
    ``read_timeout`` seconds, else the connection is closed (uvicorn itself waits for slow headers
    and bodies forever; a client sending a byte a minute held its socket as long as it liked)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
                self._arm()                 # a request is on its way
            else:
                self._disarm()              # it has arrived (or the connection is closing)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                log.info("closing a connection whose request did not arrive within %g s", read_timeout)
                self.transport.close()

    return TimedH11Protocol


def make_server(app, host: str = "127.0.0.1", port: int = 8080, on_ready: Callable[[str], None] | None = None,
                log_level: str = "warning", graceful_timeout: float = 5.0,
                read_timeout: float = DEFAULT_READ_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS):
    """A :class:`uvicorn.Server` for ``app`` that calls ``on_ready(url)`` once it listens.

    ``port=0`` picks a free port; ``on_ready`` gets the URL with the real one. Run it with
    ``server.run()`` (blocks; Ctrl-C stops it) and stop it from another thread with
    ``server.should_exit = True``. ``read_timeout``: seconds a request may take to arrive;
    ``max_connections``: connections served at once (more get 503).
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
                            lifespan="on", timeout_graceful_shutdown=graceful_timeout,
                            http=_timed_protocol(read_timeout), limit_concurrency=max_connections)
    return _Server(config)


__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_READ_TIMEOUT", "MAX_BODY_BYTES", "Server", "create_app", "is_loopback", "make_server", "url_for"]
