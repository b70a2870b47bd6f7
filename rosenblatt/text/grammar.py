"""Constrained decoding: a JSON schema or a Lark grammar becomes a mask over the vocabulary at
every step, so that the answer is in the language whatever the sampling settings.

The parsing is llguidance's (a Rust library with wheels for x86-64 and aarch64; chosen over
outlines-core and xgrammar by the comparison in docs/performance.md): :func:`compile_grammar`
turns :class:`~rosenblatt.params.GenerationParams`' ``json_schema`` or ``grammar`` into
llguidance's grammar text and checks it against the model's vocabulary (a bad schema is a
:class:`~rosenblatt.params.ParamError` naming the field, before anything runs);
:func:`constraint` gives one generation its :class:`Constraint`, which the sampler calls before
choosing (:meth:`Constraint.apply`: disallowed tokens to -inf) and after (:meth:`Constraint.consume`).

JSON is generated compactly (``", "`` and ``": "`` between items, no other whitespace): a small
model left free to choose whitespace can fill its whole budget with it.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

import numpy as np

from ..params import ParamError
from .tokenizer import TokenAttr

#: how JSON schemas are compiled: one fixed layout, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_VOCABS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
#: JSON's closing characters: a token made of these only ends a string, array or object
_CLOSERS = frozenset(b'"]}')
_CLOSING: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError as e:                        # pragma: no cover - a core dependency
        raise ParamError("json_schema", f"constrained decoding needs the llguidance package ({e})") from None
    return llguidance


class _Encoder:
    """What llguidance asks of a tokenizer: each id's bytes (control tokens marked with a 0xff
    prefix, so that no text can produce them), the end tokens, and an encoder for text."""

    def __init__(self, tokenizer):
        attrs = tokenizer.token_attrs()
        self.tokens, self.special_token_ids, closers = [], [], []
        for i in range(len(attrs)):
            piece = tokenizer.token_to_piece(i)
            if attrs[i] & TokenAttr.CONTROL:
                piece = b"\xff" + piece
                self.special_token_ids.append(i)
            elif piece and set(piece) <= _CLOSERS:
                closers.append(i)
            self.tokens.append(piece)
        self.closers = np.array(closers, dtype=np.int64)
        self.eog = [i for i in range(len(attrs)) if tokenizer.is_eog(i)]
        eos = tokenizer.eos_id
        self.eos_token_id = eos if eos in self.eog else (self.eog[0] if self.eog else len(attrs) - 1)
        self.bos_token_id = None
        self._tok = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


def vocabulary(tokenizer):
    """llguidance's view of ``tokenizer`` (built once per tokenizer: ~0.5 s for 150k tokens)."""
    v = _VOCABS.get(tokenizer)
    if v is None:
        llg = _llguidance()
        enc = _Encoder(tokenizer)
        v = llg.LLTokenizer(llg.TokenizerWrapper(enc), eos_token=enc.eog or None)
        _VOCABS[tokenizer] = v
        _CLOSING[tokenizer] = enc.closers           # found in the same pass over the vocabulary
    return v


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "additionalProperties",
               "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that lists
    properties and says nothing about others (as llama.cpp's converter does). Everything that
    satisfies the result satisfies ``schema``; a model is not left to invent keys."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: closed_objects(s) for name, s in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [closed_objects(s) for s in out[k]]
    for k in _SCHEMA_ONE:
        if isinstance(out.get(k), dict):
            out[k] = closed_objects(out[k])
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "patternProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: Any) -> str:
    """llguidance's grammar for JSON valid against ``schema`` (a dict), laid out compactly,
    objects closed (:func:`closed_objects`)."""
    llg = _llguidance()
    if not isinstance(schema, dict):
        raise ParamError("json_schema", f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    try:
        return llg.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ParamError("json_schema", f"is not a usable JSON Schema: {e}") from None


def lark_grammar(text: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(text)


def json_in_lark(schema: dict) -> str:
    """A Lark rule body matching JSON valid against ``schema`` (compact, objects closed), for
    use inside a grammar."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": JSON_OPTIONS})


def _limits():
    """Per-step work bounds (llguidance's defaults allow ~15 ms a token; a client's ambiguous
    grammar must not hold every slot's step): past them the generation fails, alone."""
    return _llguidance().LLParserLimits(step_max_items=20_000, step_lexer_fuel=100_000)


def compile_grammar(tokenizer, params) -> str | None:
    """The grammar of ``params`` (its ``json_schema`` or ``grammar``), checked against the
    tokenizer's vocabulary; None when the generation is free."""
    if params.json_schema is None and params.grammar is None:
        return None
    field = "json_schema" if params.json_schema is not None else "grammar"
    text = json_schema_grammar(params.json_schema) if field == "json_schema" else lark_grammar(params.grammar)
    llg = _llguidance()
    err = llg.LLMatcher.validate_grammar(text, vocabulary(tokenizer), limits=_limits())
    if err and not err.startswith("WARNING"):
        raise ParamError(field, f"cannot be used: {' '.join(err.split())[:300]}")
    return text


def closing_tokens(tokenizer) -> np.ndarray:
    """Ids of the tokens whose text is only JSON closing characters (``"``, ``]``, ``}``)."""
    vocabulary(tokenizer)
    return _CLOSING[tokenizer]


class Constraint:
    """One generation's grammar state: :meth:`apply` masks the logits, :meth:`consume` advances.

    With a token budget (the generation's ``max_new_tokens``) and ``close_json``, the last
    tokens of the budget go to closing what is open: once the budget left is no more than
    :meth:`margin`, a token that only closes strings, arrays or objects is taken whenever the
    grammar allows one (the most likely of them), so that a model repeating itself inside a
    list still ends with valid JSON rather than being cut off."""

    def __init__(self, tokenizer, grammar: str, budget: int | None = None, close_json: bool = False,
                 required: int = 0):
        llg = _llguidance()
        self.vocab = vocabulary(tokenizer)
        self.matcher = llg.LLMatcher(self.vocab, grammar, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise ParamError("grammar", f"cannot be used: {self.matcher.get_error()}")
        self.n = self.vocab.vocab_size
        self.budget = budget
        self.used = 0
        self.closers = closing_tokens(tokenizer) if close_json and budget is not None else None
        self._depth = 0                 # open strings, arrays and objects in the JSON so far
        self._in_string = self._escaped = False
        self._keys = 0                  # keys written so far (colons outside strings)
        self.required = required        # required properties in the schema (an upper bound on those missing)
        self._tok = tokenizer

    def margin(self) -> int:
        """Tokens kept for closing: a few per open level and per required key not written yet
        (at least 8), at most half of the budget."""
        missing = max(0, self.required - self._keys)
        return min(max(8, 4 * self._depth + 4 + 6 * missing), max(1, self.budget // 2))

    def _after(self, token: int) -> tuple[int, bool, bool, int]:
        """(open levels, in a string, after a backslash, keys) once ``token``'s text follows."""
        depth, in_string, escaped, keys = self._depth, self._in_string, self._escaped, self._keys
        for c in self._tok.token_to_piece(token):
            if in_string:
                if escaped:
                    escaped = False
                elif c == 0x5C:                     # backslash
                    escaped = True
                elif c == 0x22:                     # closing quote
                    in_string = False
                    depth -= 1
            elif c == 0x22:
                in_string = True
                depth += 1
            elif c in (0x5B, 0x7B):                 # [ {
                depth += 1
            elif c in (0x5D, 0x7D):                 # ] }
                depth -= 1
            elif c == 0x3A:                         # : after a key
                keys += 1
        return depth, in_string, escaped, keys

    def _closing(self, allowed: np.ndarray) -> np.ndarray | None:
        """Of the allowed closing tokens, those that leave the fewest levels open (fewer than
        now); None when none closes anything here (inside a string only a quote does)."""
        close = self.closers[allowed[self.closers]]
        if not close.size:
            return None
        depths = np.array([self._after(int(t))[0] for t in close])
        best = depths.min()
        return close[depths == best] if best < self._depth else None

    def allowed(self) -> np.ndarray:
        """Boolean mask over the tokenizer's ids: which tokens may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check()
        return np.unpackbits(bits, bitorder="little", count=self.n).view(bool)

    def apply(self, x: np.ndarray) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf (in place)."""
        allowed = self.allowed()
        if self.closers is not None and self.budget - self.used <= self.margin():
            close = self._closing(allowed)
            if close is not None:
                allowed = np.zeros_like(allowed)
                allowed[close] = True
        x[:self.n][~allowed] = -np.inf
        x[self.n:] = -np.inf                        # padding rows of the output matrix
        if not np.any(x > -np.inf):
            raise ValueError("the grammar allows none of the tokens the model can give here")

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()
        self.used += 1
        if self.closers is not None:
            self._depth, self._in_string, self._escaped, self._keys = self._after(int(token))

    @property
    def finished(self) -> bool:
        """The text so far is complete in the grammar and nothing more may follow."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")


def constraint(tokenizer, params) -> Constraint | None:
    """A fresh :class:`Constraint` for one generation with ``params`` (None when free)."""
    g = compile_grammar(tokenizer, params)
    if g is None:
        return None
    # closing applies to grammars too (a forced tool call is JSON inside tags): it only ever
    # chooses among the tokens the grammar allows
    schema = params.json_schema
    required = _required(schema) if schema is not None else sum(
        _required(json.loads(m)) for m in _JSON_RULE.findall(params.grammar))
    return Constraint(tokenizer, g, params.max_new_tokens, close_json=True, required=required)


#: a JSON schema embedded in a Lark grammar (``rule: %json {...}`` on one line, as
#: :func:`json_in_lark` writes it)
_JSON_RULE = re.compile(r"%json\s+(\{.*\})\s*$", re.M)


def _required(schema: Any) -> int:
    """How many required properties ``schema`` names, nested ones included (each counted once
    per place it appears: an upper bound for one object, not for arrays of them)."""
    if isinstance(schema, dict):
        own = len(schema["required"]) if isinstance(schema.get("required"), list) else 0
        return own + sum(_required(v) for k, v in schema.items() if k != "required")
    if isinstance(schema, list):
        return sum(_required(v) for v in schema)
    return 0
