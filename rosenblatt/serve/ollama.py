"""Ollama's API beside the OpenAI one: ``/api/chat``, ``/api/generate``, ``/api/tags``,
``/api/show``, ``/api/ps`` and ``/api/version``, so that Ollama clients (the ``ollama`` Python
package, Open WebUI) talk to the one loaded model.

The routes are thin: a request's envelope is declared below (pydantic, strict like
:mod:`.protocol`), its ``options`` become a :class:`~rosenblatt.params.GenerationParams` (the same
declaration as the OpenAI routes and the engine: the same defaults, ranges and messages), and the
generation goes through the same worker (``srv.worker.submit``: the batch's slots, the queue's
limits, cancellation when the client hangs up). Answers are Ollama's: NDJSON lines
(``application/x-ndjson``) when streaming (the default), one JSON object otherwise, the last
with ``done: true``, the finish reason and the counts and durations (nanoseconds); errors are
``{"error": "..."}`` with a 4xx/5xx status.

What does not apply is accepted and ignored (the load-time and llama.cpp-only options in
:data:`IGNORED_OPTIONS`, ``keep_alive``, ``context``); what would change the answer and is not
done is refused by name (``template``, ``suffix``, ``images``, ``think``, ``logprobs``,
an unknown option).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from functools import cached_property, wraps
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..params import GenerationParams, ParamError, parse
from ..text import tools as tool_calls
from .app import _access, _cancel_on_disconnect, _Choices, _SSEResponse
from .protocol import APIError, engine_error

log = logging.getLogger("rosenblatt.serve")

#: Ollama options that become GenerationParams fields of the same name
MAPPED_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop",
                  "frequency_penalty", "presence_penalty")
#: real Ollama options that do not apply here (load-time settings, llama.cpp samplers this engine
#: does not have): type-checked, then ignored
IGNORED_OPTIONS: dict[str, type] = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "num_keep": int,
    "num_gqa": int, "mirostat": int,
    "numa": bool, "low_vram": bool, "f16_kv": bool, "logits_all": bool, "vocab_only": bool, "use_mmap": bool,
    "use_mlock": bool, "embedding_only": bool, "penalize_newline": bool,
    "tfs_z": float, "typical_p": float, "mirostat_tau": float, "mirostat_eta": float,
    "rope_frequency_base": float, "rope_frequency_scale": float,
}
#: ``num_predict`` absent or -1: GenerationParams' default; -2: as much as the context holds
FILL_CONTEXT = 1 << 30
#: ``expires_at`` of /api/ps: the model is never unloaded
NEVER = "9999-12-31T23:59:59Z"


# -- requests -----------------------------------------------------------------------------------

_ENVELOPE = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class OllamaMessage(BaseModel):
    model_config = _ENVELOPE
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list | None = None
    tool_calls: list | None = None


class _Generation(BaseModel):
    """What /api/chat and /api/generate share (``keep_alive`` is ignored: the model stays loaded)."""
    model_config = _ENVELOPE
    model: str = ""
    stream: bool | None = None                  # Ollama's default: true
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None

    def refuse(self, name: str, refused: bool, why: str) -> None:
        if refused:
            raise APIError(400, f"'{name}' {why}")


class OllamaChatRequest(_Generation):
    messages: list[OllamaMessage] | None = None
    tools: list | None = None


class OllamaGenerateRequest(_Generation):
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    raw: bool | None = None
    images: list | None = None
    context: list | None = None                 # the older conversation memory: ignored


class ShowRequest(BaseModel):
    model_config = _ENVELOPE
    model: str = ""
    name: str = ""                              # the older field


def _parse(model: type[BaseModel], body: dict):
    try:
        return parse(model, body)
    except ParamError as e:
        raise APIError(400, f"'{e.param}' {e.problem}") from None


# -- options ------------------------------------------------------------------------------------

def _option_error(e: ParamError) -> APIError:
    name = "num_predict" if e.param == "max_new_tokens" else e.param.split("[")[0]
    return APIError(400, f"option '{name}' {e.problem}")


def generation_params(options: dict[str, Any] | None, fmt: Any = None) -> GenerationParams:
    """Ollama's ``options`` (and ``format``) as the engine's parameters; a :class:`APIError`
    (400) naming the option that is unknown, ill-typed or out of range."""
    options = options or {}
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in MAPPED_OPTIONS:
            fields[name] = value
        elif name == "num_predict":
            if isinstance(value, bool) or not isinstance(value, int):
                raise APIError(400, f"option 'num_predict' must be an integer, got {value!r}")
            if value < -2:
                raise APIError(400, f"option 'num_predict' must be >= -2 (-1: the default, -2: fill the "
                                    f"context), got {value}")
            if value >= 0:
                fields["max_new_tokens"] = value
            elif value == -2:
                fields["max_new_tokens"] = FILL_CONTEXT
        elif name in IGNORED_OPTIONS:
            kind = IGNORED_OPTIONS[name]
            ok = isinstance(value, bool) if kind is bool else \
                isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            if not ok:
                wanted = {int: "an integer", float: "a number", bool: "true or false"}[kind]
                raise APIError(400, f"option '{name}' must be {wanted}, got {value!r}")
        else:
            raise APIError(400, f"unknown option '{name}'")
    if fields.get("seed") == -1 and not isinstance(fields["seed"], bool):
        fields["seed"] = None                   # llama.cpp's "random"
    if fmt not in (None, ""):
        if "json_schema" not in GenerationParams.model_fields:
            raise APIError(400, "format is not supported by this server yet")
        if fmt == "json":
            fields["json_schema"] = {"type": "object"}
        elif isinstance(fmt, dict):
            fields["json_schema"] = fmt
        else:
            raise APIError(400, f"'format' must be \"json\" or a JSON schema object, got {fmt!r}")
    try:
        return GenerationParams(**fields)
    except ParamError as e:
        if e.param == "json_schema":
            raise APIError(400, f"'format' {e.problem}") from None
        raise _option_error(e) from None


# -- the answers --------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _error(err: APIError) -> Response:
    retry_after = getattr(err, "retry_after", None)
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)


def _ollama_errors(handler):
    """Errors of the handler (the server's own APIErrors included: bad JSON, a full queue) in
    Ollama's shape ``{"error": "..."}``."""
    @wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return _error(e)
        except ParamError as e:
            return _error(APIError(400, f"'{e.param}' {e.problem}"))
        except ClientDisconnect:
            raise                               # answered 499 by the app's handler
        except Exception as e:
            log.error("unexpected error", exc_info=e)
            return _error(APIError(500, "internal server error"))
    return wrapped


def _size_label(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def _scalar(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic) and v.ndim == 0:
        return v.item()
    return None


class OllamaAPI:
    """The /api routes over a :class:`~rosenblatt.serve.app.Server` (its worker and names)."""

    def __init__(self, srv):
        self.srv = srv
        self.engine = srv.engine

    # the model's description (read once: the file does not change while it is served)
    @cached_property
    def facts(self) -> dict:
        eng, cfg = self.engine, self.engine.config
        path = Path(eng.path)
        try:
            st = os.stat(path)
            size, mtime, mtime_ns = st.st_size, st.st_mtime, st.st_mtime_ns
        except OSError:
            size, mtime, mtime_ns = 0, time.time(), 0
        # stable while the file is: its name, size and modification time (not its gigabytes)
        digest = hashlib.sha256(f"{path.name}\0{size}\0{mtime_ns}".encode()).hexdigest()
        md = eng.gguf.raw_metadata
        quant = None
        ft = md.get("general.file_type")
        if ft is not None:
            try:
                from gguf import LlamaFileType
                quant = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
            except (ValueError, ImportError):
                quant = None
        if quant is None:                      # the type holding the most bytes
            mix = Counter()
            for t in eng.gguf.tensors.values():
                mix[t.qtype.name] += t.data.nbytes
            quant = mix.most_common(1)[0][0] if mix else "unknown"
        n_params = cfg.n_params
        details = {"parent_model": "", "format": "gguf", "family": cfg.arch, "families": [cfg.arch],
                   "parameter_size": _size_label(n_params), "quantization_level": quant}
        info = {"general.parameter_count": n_params}
        for k, v in md.items():
            if k == "tokenizer.chat_template":
                continue
            v = _scalar(v)
            if v is not None:
                info[k] = v
        return {"size": size, "modified_at": _rfc3339(mtime), "digest": digest, "details": details,
                "model_info": dict(sorted(info.items())), "file": path.name}

    def _name(self, name: str) -> str:
        """The request's model name, checked (the served id, the file's name, each with ``:latest``)."""
        if not name:
            raise APIError(400, "model is required")
        if name in self.srv.model_names or (name.endswith(":latest") and name[:-7] in self.srv.model_names):
            return name
        raise APIError(404, f"model '{name}' not found")

    @property
    def tag(self) -> str:
        return f"{self.srv.model_id}:latest"

    def _card(self) -> dict:
        f = self.facts
        return {"name": self.tag, "model": self.tag, "modified_at": f["modified_at"], "size": f["size"],
                "digest": f["digest"], "details": f["details"]}

    # -- routes: the model --------------------------------------------------------------------------
    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._card()]})

    async def ps(self, request: Request) -> Response:
        card = self._card()
        del card["modified_at"]
        try:
            kv = self.srv.worker.batch.kv_bytes
        except Exception:                      # pragma: no cover - the slots are made at startup
            kv = 0
        card.update(size=card["size"] + kv, size_vram=0, expires_at=NEVER, context_length=self.engine.n_ctx)
        return JSONResponse({"models": [card]})

    async def show(self, request: Request) -> Response:
        req = _parse(ShowRequest, await self.srv._json(request))
        self._name(req.model or req.name)
        f, eng = self.facts, self.engine
        template = eng.template.source if eng.template is not None and not isinstance(eng.template, Exception) else ""
        stops = list(eng.template.stop_strings) if template else []
        defaults = GenerationParams()
        params = [(k, getattr(defaults, k)) for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                      "repeat_last_n")]
        params += [("num_predict", defaults.max_new_tokens)] + [("stop", s) for s in stops]
        parameters = "\n".join(f"{k:<30} {json.dumps(v) if isinstance(v, str) else f'{v:g}'}" for k, v in params)
        modelfile = "\n".join([
            "# Modelfile generated by rosenblatt (the server's defaults; the file is served as it is)",
            f"FROM {f['file']}",
            f'TEMPLATE """{template}"""' if template else "",
            *(f"PARAMETER {k} {json.dumps(v) if isinstance(v, str) else f'{v:g}'}" for k, v in params),
        ])
        license_ = eng.gguf.raw_metadata.get("general.license")
        return JSONResponse({
            "license": license_ if isinstance(license_, str) else "",
            "modelfile": modelfile, "parameters": parameters, "template": template,
            "details": f["details"], "model_info": f["model_info"], "capabilities": ["completion"],
            "modified_at": f["modified_at"],
        })

    # -- routes: generation -------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self.srv._json(request)
        req = _parse(OllamaChatRequest, body)
        name = self._name(req.model)
        try:
            tools = tool_calls.check_tools(req.tools) if req.tools else None
        except ParamError as e:
            raise APIError(400, f"'{e.param}' {e.problem}") from None
        self._common(req, name)
        params = generation_params(req.options, req.format)
        if not req.messages:                    # Ollama's way to load a model: nothing to generate
            return JSONResponse(self._loaded(name, chat=True))
        await self.srv._check_grammar(params, {"json_schema": "format"})
        messages = []
        for i, m in enumerate(req.messages):
            req.refuse(f"messages[{i}].images", bool(m.images), "are not supported: the model reads text only")
            msg: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:                    # Ollama's calls: {"function": {"name", "arguments": {...}}}
                msg["tool_calls"] = [{"type": "function", **c} if isinstance(c, dict) else c for c in m.tool_calls]
            messages.append(msg)
        return await self._answer(request, lambda e: e.prepare_chat(messages, params, tools=tools), name, req.stream,
                                  chat=True, calls=tools is not None)

    async def generate(self, request: Request) -> Response:
        body = await self.srv._json(request)
        req = _parse(OllamaGenerateRequest, body)
        name = self._name(req.model)
        req.refuse("template", bool(req.template), "is not supported: the model's own chat template is used "
                                                   "(or none with raw: true)")
        req.refuse("suffix", bool(req.suffix), "is not supported (no fill-in-the-middle)")
        req.refuse("images", bool(req.images), "are not supported: the model reads text only")
        self._common(req, name)
        params = generation_params(req.options, req.format)
        if not req.prompt:
            return JSONResponse(self._loaded(name, chat=False))
        await self.srv._check_grammar(params, {"json_schema": "format"})
        prompt = req.prompt
        if req.raw:
            start = lambda e: e.prepare(prompt, params)             # noqa: E731
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                [{"role": "user", "content": prompt}]
            start = lambda e: e.prepare_chat(messages, params)      # noqa: E731
        return await self._answer(request, start, name, req.stream, chat=False)

    def _common(self, req: _Generation, name: str) -> None:
        req.refuse("think", req.think not in (None, False), f"is not supported: '{name}' does not think")
        req.refuse("logprobs", bool(req.logprobs), "are not supported on the Ollama API yet")

    def _loaded(self, name: str, chat: bool) -> dict:
        out = {"model": name, "created_at": _now()}
        out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        out.update(done=True, done_reason="load")
        return out

    def _part(self, name: str, chat: bool, text: str, calls: list | None = None) -> dict:
        out = {"model": name, "created_at": _now()}
        out.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
        if calls:                               # Ollama gives arguments as an object, not as JSON text
            out["message"]["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                          "arguments": json.loads(c["function"]["arguments"])}}
                                            for c in calls]
        out["done"] = False
        return out

    def _final(self, name: str, chat: bool, text: str, usage, stats, t0: float, calls: list | None = None) -> dict:
        out = self._part(name, chat, text, calls)
        out.update(done=True, done_reason=usage.finish_reason, total_duration=_ns(time.perf_counter() - t0),
                   load_duration=0, prompt_eval_count=usage.prompt_tokens,
                   prompt_eval_duration=_ns(stats.prefill_s if stats is not None else 0.0),
                   eval_count=usage.completion_tokens,
                   eval_duration=_ns(stats.decode_s if stats is not None else 0.0))
        return out

    async def _answer(self, request: Request, start, name: str, stream: bool | None, chat: bool,
                      calls: bool = False) -> Response:
        """One generation through the worker (as the OpenAI routes' ``Server._run`` with one
        choice): errors before the first token as a status, then NDJSON lines or one object."""
        t0 = time.perf_counter()
        param = "messages" if chat else "prompt"
        job = self.srv.worker.submit(start)            # 503 when the queue is full
        choices = _Choices([job])
        rid = f"ollama-{uuid.uuid4().hex[:24]}"
        handed_over = False
        try:
            async with _cancel_on_disconnect(request, choices):     # while queued
                _, kind, value = (await choices.first())[-1]
            if kind == "error":
                raise engine_error(value, param)
            if kind == "cancelled":
                return Response(status_code=499)                   # the client is gone
            if stream is None or stream:
                handed_over = True
                return _SSEResponse(self._lines(choices, name, chat, t0, request, rid, calls), choices,
                                    media_type="application/x-ndjson")
            pieces, stats, usage = [], None, None
            async with _cancel_on_disconnect(request, choices):
                while usage is None:
                    _, kind, value = await choices.next()
                    if kind == "piece":
                        pieces.append(value.text)
                        stats = value.stats
                    elif kind == "error":
                        raise engine_error(value, param)
                    elif kind == "cancelled":
                        return Response(status_code=499)
                    elif kind == "done":
                        usage = value
            if usage.finish_reason == "cancelled":
                return Response(status_code=499)
            _access(request, rid, [usage], t0, False)
            text, found = tool_calls.parse_calls("".join(pieces)) if calls else ("".join(pieces), [])
            return JSONResponse(self._final(name, chat, text, usage, stats, t0, found))
        finally:
            if not handed_over:
                choices.cancel()

    async def _lines(self, choices, name: str, chat: bool, t0: float, request: Request, rid: str,
                     calls: bool = False):
        stats = None
        parser = tool_calls.CallParser() if calls else None
        try:
            while True:
                _, kind, value = await choices.next()
                if kind == "piece":
                    stats = value.stats
                    text = parser.feed(value.text) if parser else value.text
                    if text:
                        yield _line(self._part(name, chat, text))
                elif kind == "done":
                    if value.finish_reason == "cancelled":
                        return
                    _access(request, rid, [value], t0, True)
                    rest, found = parser.finish() if parser else ("", [])
                    if rest or found:
                        yield _line(self._part(name, chat, rest, found))
                    yield _line(self._final(name, chat, "", value, stats, t0))
                    return
                elif kind == "error":
                    yield _line({"error": engine_error(value, "messages" if chat else "prompt").message})
                    return
                elif kind == "cancelled":
                    return
        finally:
            choices.cancel()


def routes(srv) -> list[Route]:
    """The /api routes serving ``srv`` (a :class:`~rosenblatt.serve.app.Server`)."""
    api = OllamaAPI(srv)
    return [
        Route("/api/version", _ollama_errors(api.version), methods=["GET"]),
        Route("/api/tags", _ollama_errors(api.tags), methods=["GET"]),
        Route("/api/ps", _ollama_errors(api.ps), methods=["GET"]),
        Route("/api/show", _ollama_errors(api.show), methods=["POST"]),
        Route("/api/chat", _ollama_errors(api.chat), methods=["POST"]),
        Route("/api/generate", _ollama_errors(api.generate), methods=["POST"]),
    ]


__all__ = ["IGNORED_OPTIONS", "MAPPED_OPTIONS", "OllamaAPI", "generation_params", "routes"]
