"""The OpenAI wire format: errors, request models (the envelope; sampling fields go through
:class:`~rosenblatt.params.GenerationParams`) and response bodies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from ..text import tools as tool_calls
from ..text.chat_template import ChatTemplateError
from ..errors import ModelFileError
from ..params import GenerationParams, ParamError, parse


log = logging.getLogger("rosenblatt.serve")


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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_error(e: Exception, param: str) -> APIError:
    """What the engine raised when a job started, as the answer to the client."""
    if isinstance(e, APIError):             # decided by the server itself (e.g. a queue timeout)
        return e
    msg = " ".join(str(e).split())
    if isinstance(e, ModelFileError):       # e.g. an unusable chat template: the model's fault, not the request's
        return APIError(500, msg, code="model_error")
    if isinstance(e, ParamError):             # the engine's own check of a request (e.g. logit_bias ids)
        return bad_request(f"'{e.param}' {e.problem}", param=e.param, code=e.kind)
    if isinstance(e, ChatTemplateError):
        return bad_request(msg, param="messages", code="invalid_messages")
    if isinstance(e, ValueError):
        if "the context holds" in msg:
            return bad_request(f"This model's context is too short for the prompt: {msg}", param=param,
                        code="context_length_exceeded")
        return bad_request(msg, param=param)
    log.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}", code="internal_error")


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


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str | dict = "{}"


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None        # an assistant's calls, sent back in the history
    tool_call_id: str | None = None                 # a tool's answer: the call it answers
    content: str | None = Field(None, validate_default=True)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any, info: ValidationInfo) -> Any:
        """Content parts: only text is understood; they are joined into one string. Only an
        assistant message with tool calls may leave it out."""
        if isinstance(v, list):
            for j, part in enumerate(v):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise PydanticCustomError("invalid_value", f"content[{j}]: only text parts are supported")
            return "".join(part["text"] for part in v)
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise PydanticCustomError("missing_required_parameter", "is required")
        return v


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema_dict(self) -> dict | None:
        """The JSON Schema the answer must satisfy (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise bad_request("'response_format.json_schema.schema' is required for type json_schema",
                              param="response_format", code="invalid_value")
        return self.json_schema.schema_


class OpenAIRequest(BaseModel):
    """What both endpoints share, besides the sampling fields."""
    model_config = _ENVELOPE
    model: str | None = None                 # optional here: there is one model
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None

    def unsupported(self, name: str, ok: Callable[[Any], bool]) -> None:
        value = (self.model_extra or {}).get(name, getattr(self, name, None))
        if not ok(value):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")

    def generation(self, body: dict) -> GenerationParams:
        """The engine's parameters from the request's sampling fields (llama.cpp's extensions
        top_k, min_p, repeat_penalty, repeat_last_n included)."""
        fields = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
        fields.update(self.logprob_fields())
        schema = self.response_format.schema_dict() if self.response_format is not None else None
        if schema is not None:
            if "json_schema" in fields or "grammar" in fields:
                raise bad_request("give 'response_format' or 'json_schema'/'grammar', not both",
                                  param="response_format", code="invalid_value")
            fields["json_schema"] = schema
        bias = fields.get("logit_bias")
        if isinstance(bias, dict):                  # JSON keys are strings: token ids as text
            try:
                fields["logit_bias"] = {int(k): v for k, v in bias.items()}
            except ValueError:
                raise bad_request("'logit_bias' keys must be token ids (integers as strings)", param="logit_bias",
                                  code="invalid_value") from None
        if isinstance(fields.get("seed"), int) and not isinstance(fields["seed"], bool):
            fields["seed"] %= 2**64          # OpenAI allows any int64; the sampler wants >= 0
        max_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # omitted: as many as the context holds (the engine caps it)
        fields["max_new_tokens"] = max_tokens if max_tokens is not None else 1 << 30
        fields.update(self.tool_fields(fields))
        try:
            return GenerationParams(**fields)
        except ParamError as e:
            name = max_name if e.param == "max_new_tokens" else e.param.split("[")[0]
            if name == "json_schema" and self.response_format is not None:
                name = "response_format"
            raise bad_request(f"'{name}' {e.problem}", param=name, code=e.kind) from None

    def logprob_fields(self) -> dict:
        return {}

    def tool_fields(self, fields: dict) -> dict:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


#: the request fields handed to GenerationParams (max_tokens is mapped by hand)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop",
                    "frequency_penalty", "presence_penalty", "logit_bias", "json_schema", "grammar")


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def tool_list(self) -> list[dict]:
        try:
            return tool_calls.check_tools(self.tools or [])
        except ParamError as e:
            raise bad_request(f"'{e.param}' {e.problem}", param=e.param, code=e.kind) from None

    def tool_mode(self) -> str | tuple[str, str]:
        """"none", "auto", "required" or ("function", name) (tool_choice, checked)."""
        try:
            return tool_calls.choice(self.tool_choice, self.tool_list())
        except ParamError as e:
            raise bad_request(f"'{e.param}' {e.problem}", param=e.param, code=e.kind) from None

    def tool_fields(self, fields: dict) -> dict:
        """With tool_choice "required" or a named function, the grammar that forces the call."""
        mode = self.tool_mode()
        if mode in ("none", "auto"):
            return {}
        if "json_schema" in fields or "grammar" in fields:
            raise bad_request("a forced tool call cannot be combined with a response format or a grammar",
                              param="tool_choice", code="invalid_value")
        only = None if mode == "required" else mode[1]
        # one call unless parallel calls are asked for: a small model forced to call tends to repeat the call
        return {"grammar": tool_calls.call_grammar(self.tool_list(), only, self.parallel_tool_calls is True)}

    def logprob_fields(self) -> dict:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        return {"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0}

    def checked(self) -> ChatRequest:
        self.unsupported("functions", lambda v: not v)
        self.tool_mode()
        return self

    def chat(self) -> list[dict]:
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out


class CompletionRequest(OpenAIRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)      # legacy API: how many top tokens per step

    def logprob_fields(self) -> dict:
        return {"logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0}

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
                raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt",
                           code="invalid_value")
        self.unsupported("echo", lambda v: not v)
        self.unsupported("suffix", lambda v: not v)
        self.unsupported("best_of", lambda v: v in (None, 1))
        return self


def parse_request(model: type[OpenAIRequest], body: dict):
    try:
        return parse(model, body)
    except ParamError as e:
        raise bad_request(f"'{e.param}' {e.problem}", param=e.param, code=e.kind) from None


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: str


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: dict | None = None
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
            if "message" in c and c["message"]["tool_calls"] is None:
                del c["message"]["tool_calls"]
        return d


def _token(tokenizer, tid: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_to_piece(tid, True)
    return raw.decode("utf-8", errors="replace"), list(raw)


class LogprobLog:
    """The log-probabilities of one choice's tokens, in the shape its endpoint answers with:
    chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` or the completions API's
    ``{tokens, token_logprobs, top_logprobs, text_offset}``."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.content: list[dict] = []
        self.tokens: list[str] = []
        self.values: list[float] = []
        self.tops: list[dict] = []
        self.offsets: list[int] = []
        self.offset = 0

    def add(self, r) -> None:
        if r.token is None or r.logprob is None:
            return
        text, raw = _token(self.tok, r.token)
        if self.chat:
            tops = []
            for tid, lp in r.top_logprobs:
                t, b = _token(self.tok, tid)
                tops.append({"token": t, "logprob": lp, "bytes": b})
            self.content.append({"token": text, "logprob": r.logprob, "bytes": raw, "top_logprobs": tops})
        else:
            self.tokens.append(text)
            self.values.append(r.logprob)
            self.tops.append({_token(self.tok, tid)[0]: lp for tid, lp in r.top_logprobs})
            self.offsets.append(self.offset)
            self.offset += len(text)

    def body(self) -> dict:
        if self.chat:
            return {"content": self.content}
        return {"tokens": self.tokens, "token_logprobs": self.values, "top_logprobs": self.tops,
                "text_offset": self.offsets}

