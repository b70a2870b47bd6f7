"""Generation parameters, declared once.

:class:`SamplingParams` (the sampler chain) and :class:`GenerationParams` (sampling plus how long
and where to stop) are pydantic models: each field's default, range and one-line help live here
and nowhere else. The rest of the package reads them:

* ``Engine.responses/stream/generate/chat`` accept a :class:`GenerationParams` or its fields as
  keyword arguments (an unknown or ill-typed keyword is a :class:`ParamError` naming it);
* ``python -m rosenblatt chat`` / ``generate`` get their sampling options from
  :func:`click_options` (option name, type, range, default and help from the fields);
* the server validates a request's sampling fields with :class:`GenerationParams` and answers a
  :class:`ParamError` as OpenAI's ``invalid_request_error`` naming the parameter.

Types are strict (``True`` is not a number, ``2.5`` not an integer, ``"0.7"`` not a float) and
numbers must be finite. Instances are frozen: derive variants with :meth:`SamplingParams.replace`,
which validates again.
"""

from __future__ import annotations

import json
import numbers
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import RosenblattError

#: at most this many stop strings per generation
MAX_STOPS = 16
#: the longest grammar or JSON schema text accepted (characters)
MAX_GRAMMAR = 64 * 1024

__all__ = ["MAX_STOPS", "GenerationParams", "ParamError", "SamplingParams", "click_options", "param_error", "parse"]


class ParamError(RosenblattError, ValueError):
    """A generation parameter out of range or of the wrong type; ``param`` names it."""

    def __init__(self, param: str, problem: str, kind: str = "invalid_value"):
        self.param = param
        self.problem = " ".join(problem.split())
        self.kind = kind                    # an OpenAI error code: "invalid_value", "invalid_type", ...
        super().__init__(f"{param}: {self.problem}")


def _problem(err: dict) -> tuple[str, str]:
    """(problem text, kind) for one pydantic error; kinds are OpenAI's error codes."""
    kind = err["type"]
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list, tuple)) or len(repr(value)) < 60 else type(value).__name__
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown parameter", "unknown_parameter"
    if kind == "missing":
        return "is required", "missing_required_parameter"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"must be {bounds[kind]} {bound}, got {shown}", "invalid_value"
    if kind == "finite_number":
        return f"must be a finite number, got {shown}", "invalid_value"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}", "invalid_value"
    if kind == "too_short":
        return "must not be empty", "invalid_value"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {shown}", "invalid_value"
    wanted = {"float_type": "a number", "int_type": "an integer", "bool_type": "true or false",
              "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
              "model_type": "an object", "model_attributes_type": "an object", "dict_type": "an object"}.get(kind)
    if wanted:
        return f"must be {wanted}, got {shown}", "invalid_type"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if kind == "value_error":
        return msg, "invalid_value"
    return msg, kind                       # a PydanticCustomError: its type is the code


def param_error(e: ValidationError) -> ParamError:
    """The first problem of a pydantic ``ValidationError`` as one :class:`ParamError`, its
    ``param`` the dotted path (``messages[0].role``)."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    name = loc[0] if loc else "body"
    for part in loc[1:]:
        name += f"[{part}]" if part.isdigit() else f".{part}"
    problem, kind = _problem(err)
    return ParamError(name, problem, kind)


def parse(model: type[BaseModel], data: Any):
    """``model.model_validate(data)``, its errors raised as one :class:`ParamError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise param_error(e) from None


def _plain_number(v: Any) -> Any:
    """numpy scalars as Python numbers (strict mode would refuse ``np.int64(5)``); bools untouched."""
    if isinstance(v, bool) or isinstance(v, (int, float)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


class SamplingParams(BaseModel):
    """The sampler chain (defaults as llama.cpp's ``common_params_sampling``; order and rules in
    :mod:`rosenblatt.sampling`)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 = greedy (arg-max).",
                               json_schema_extra={"cli": "--temp"})
    top_k: int = Field(40, description="Keep the k most likely tokens (<= 0: off).",
                       json_schema_extra={"cli": "--top-k"})
    top_p: float = Field(0.95, gt=0, le=1, description="Keep the smallest set of tokens with this much "
                         "probability (1: off).", json_schema_extra={"cli": "--top-p"})
    min_p: float = Field(0.05, ge=0, le=1, description="Drop tokens less likely than min-p x the most "
                         "likely one (0: off).", json_schema_extra={"cli": "--min-p"})
    repeat_penalty: float = Field(1.0, gt=0, description="Penalty for tokens seen in the last "
                                  "repeat-last-n (1: off).", json_schema_extra={"cli": "--repeat-penalty"})
    repeat_last_n: int = Field(64, ge=-1, description="How many recent tokens the repeat penalty looks "
                               "at (-1: all, 0: off).", json_schema_extra={"cli": "--repeat-last-n"})
    seed: int | None = Field(None, ge=0, description="Random seed for reproducible sampling (default: "
                             "fresh entropy).", json_schema_extra={"cli": "--seed"})
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from a token's logit once per "
                                     "occurrence in the last repeat-last-n (0: off).",
                                     json_schema_extra={"cli": "--frequency-penalty"})
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from the logit of every token "
                                    "present in the last repeat-last-n (0: off).",
                                    json_schema_extra={"cli": "--presence-penalty"})
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, description="Token id -> a bias (-100 to 100) added to its logit before sampling.")

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise param_error(e) from None

    @model_validator(mode="before")
    @classmethod
    def _numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: _plain_number(v) for k, v in data.items()}
        return data

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied, validated again."""
        return type(self)(**{**self.model_dump(), **changes})

    def sampling(self) -> SamplingParams:
        """Only the sampler's fields."""
        return SamplingParams(**{k: getattr(self, k) for k in SamplingParams.model_fields})


class GenerationParams(SamplingParams):
    """Sampling plus the length and the end of a generation."""

    max_new_tokens: int = Field(512, ge=0, description="Maximum number of tokens to generate.",
                                json_schema_extra={"cli": "--max-tokens"})
    stop: tuple[str, ...] = Field((), max_length=MAX_STOPS, description="Stop at this text (not included in the "
                                  "output); repeat for several.", json_schema_extra={"cli": "--stop"})
    ignore_eos: bool = Field(False, description="Keep generating past end-of-generation tokens "
                             "(benchmarks, like llama-bench).")
    logprobs: bool = Field(False, description="Give each generated token's log-probability.")
    top_logprobs: int = Field(0, ge=0, le=20, description="With logprobs: the log-probabilities of this many "
                              "most likely tokens at each step too.")
    json_schema: dict[str, Any] | None = Field(None, description="Constrain the answer to JSON valid against "
                                               "this JSON Schema (JSON text; '{\"type\": \"object\"}': any "
                                               "object).", json_schema_extra={"cli": "--json-schema"})
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR, description="Constrain the answer to this "
                                "grammar (Lark syntax, llguidance's dialect).", json_schema_extra={"cli": "--grammar"})

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        """A dict, or JSON text of one (what the command line gives)."""
        if isinstance(v, str):
            if len(v) > MAX_GRAMMAR:
                raise ValueError(f"is longer than {MAX_GRAMMAR} characters")
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(f"is not valid JSON: {e}") from None
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"must be a JSON object (a JSON Schema), got {type(v).__name__}")
        return v

    @field_validator("grammar")
    @classmethod
    def _one_constraint(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("json_schema") is not None:
            raise ValueError("give json_schema or grammar, not both")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        """A string or a list of strings; empty strings stop nothing and are dropped."""
        if v is None:
            return ()
        if isinstance(v, str):
            v = (v,)
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, tuple):
            return tuple(s for s in v if not (isinstance(s, str) and s == ""))
        return v


def click_options(model: type[BaseModel] = GenerationParams):
    """A decorator adding one click option per field of ``model`` that names a ``cli`` flag, with
    the field's type, range, default and help; the command gets the fields' names as keywords."""
    import click
    from annotated_types import Ge, Gt, Le, Lt

    def option(name: str, info) -> Any:
        flag = info.json_schema_extra["cli"]
        ann = info.annotation
        lo = hi = None
        lo_open = hi_open = False
        for m in info.metadata:
            if isinstance(m, Ge):
                lo = m.ge
            elif isinstance(m, Gt):
                lo, lo_open = m.gt, True
            elif isinstance(m, Le):
                hi = m.le
            elif isinstance(m, Lt):
                hi, hi_open = m.lt, True
        kw: dict[str, Any] = {"help": info.description, "show_default": info.default not in (None, ())}
        bounded = lo is not None or hi is not None
        if ann is float:
            kw["type"] = click.FloatRange(lo, hi, min_open=lo_open, max_open=hi_open) if bounded else float
        elif ann in (int, int | None):
            kw["type"] = click.IntRange(lo, hi, min_open=lo_open, max_open=hi_open) if bounded else int
        elif ann == tuple[str, ...]:
            kw.update(type=str, multiple=True)
        elif ann in (str | None, dict[str, Any] | None):       # text (a dict field parses its JSON)
            kw["type"] = str
        else:                                       # pragma: no cover - a new field type
            raise TypeError(f"no click type for {name}: {ann}")
        return click.option(flag, name, default=info.default, **kw)

    opts = [option(n, f) for n, f in model.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and "cli" in f.json_schema_extra]

    def decorate(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return decorate
