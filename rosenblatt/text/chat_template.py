"""Chat messages → prompt text with the model's own Jinja chat template.

Renders ``tokenizer.chat_template`` the way Hugging Face transformers' ``apply_chat_template``
does, so a prompt is character-for-character what the model was trained on:

* a sandboxed, immutable Jinja environment (``ImmutableSandboxedEnvironment``) with
  ``trim_blocks`` and ``lstrip_blocks`` on, the ``loopcontrols`` extension (``break``/``continue``)
  and a ``{% generation %}`` block tag that renders its body unchanged;
* the ``tojson`` filter replaced by plain ``json.dumps`` (no HTML escaping, non-ASCII kept;
  ``indent``, ``separators``, ``sort_keys`` and ``ensure_ascii`` accepted);
* globals ``raise_exception(message)`` and ``strftime_now(format)``;
* variables ``messages``, ``add_generation_prompt``, ``tools`` (``None`` unless given),
  ``documents`` (``None``) and the special-token strings ``bos_token``, ``eos_token``,
  ``unk_token``, ``pad_token`` taken from the vocabulary; extra keyword arguments of
  :meth:`ChatTemplate.render` are passed through.

A GGUF without a template gets ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``), which is
also llama.cpp's fallback. Any problem in a template (syntax, ``raise_exception``, undefined
value, sandbox violation) is raised as one :class:`ChatTemplateError` with a one-line message.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RosenblattError

KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

#: Used when the GGUF carries no ``tokenizer.chat_template``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# End-of-turn markers of common template families, in order of preference.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>",
                        "<|end_of_text|>", "<|endoftext|>", "</s>")


class ChatTemplateError(RosenblattError):
    """A chat template that cannot be compiled or rendered for the given messages."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called ``raise_exception``."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; render as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


#: the longest template accepted (real ones are 1-20 KiB; llama.cpp's largest tested ~12 KiB)
MAX_TEMPLATE_BYTES = 256 * 1024
#: the deepest nesting of blocks ({% for/if/macro/... %}) and brackets accepted (real ones: < 10)
MAX_TEMPLATE_DEPTH = 64
_BLOCK_TAGS = {"for", "if", "macro", "call", "filter", "with", "block", "generation"}
_OPEN, _CLOSE = "([{", ")]}"


def _check_shape(env, source: str, name: str) -> None:
    """Refuse a template too long or nested too deeply before jinja2 compiles it: its parser and
    code generator recurse once per level and a template nested 100,000 deep escaped as a
    RecursionError. The lexer is a flat loop, so this scan is linear in the template's length."""
    size = len(source.encode("utf-8", errors="replace"))
    if size > MAX_TEMPLATE_BYTES:
        raise ChatTemplateError(f"{name}: {size} bytes, more than the {MAX_TEMPLATE_BYTES} a chat template may have")
    depth = top = 0
    tag_next = False
    for lineno, kind, value in env.lex(source):
        if kind == "whitespace":
            continue
        if kind in ("block_begin", "variable_begin"):
            tag_next = kind == "block_begin"
            continue
        if tag_next and kind == "name":
            if value in _BLOCK_TAGS:
                depth += 1
            elif value.startswith("end") and value[3:] in _BLOCK_TAGS:
                depth -= 1
        tag_next = False
        if kind == "operator" and value in _OPEN:
            depth += 1
        elif kind == "operator" and value in _CLOSE:
            depth -= 1
        if depth > top:
            top = depth
            if top > MAX_TEMPLATE_DEPTH:
                raise ChatTemplateError(f"{name}: nested more than {MAX_TEMPLATE_DEPTH} deep (template line {lineno})")


def _describe(exc: BaseException) -> str:
    lineno = getattr(exc, "lineno", None)
    where = f" (template line {lineno})" if lineno else ""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split()) + where


class ChatTemplate:
    """A compiled chat template.

    ``source`` is the Jinja text, ``is_fallback`` says whether it is the built-in ChatML,
    ``special_tokens`` the ``bos_token``/``eos_token``/... strings given to the template,
    ``end_of_turn`` the string that ends an assistant turn (or ``None`` if unknown) and
    ``stop_strings`` the strings at which generated text should be cut: ``end_of_turn`` first,
    then the texts of the vocabulary's end-of-generation tokens that the template uses, then
    ``eos_token``.
    """

    def __init__(self, source: str | None, *, special_tokens: Mapping[str, str] | None = None,
                 eog_texts: Iterable[str] = (), name: str | None = None):
        self.is_fallback = source is None
        self.source: str = CHATML_TEMPLATE if source is None else source
        if not isinstance(self.source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(self.source).__name__}")
        self.name = name or ("ChatML (built-in)" if self.is_fallback else "chat template")
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            env = _environment()
            _check_shape(env, self.source, self.name)
            self._template = env.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.name}: syntax error: {_describe(e)}") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.name}: cannot compile: {_describe(e)}") from e
        except (RecursionError, MemoryError) as e:     # what the depth check did not foresee
            raise ChatTemplateError(f"{self.name}: cannot compile: {type(e).__name__}") from None

        end = next((m for m in _END_OF_TURN_MARKERS if m in self.source), None)
        self.end_of_turn: str | None = end
        # Generation already stops at end-of-generation *ids*; these strings are for text-level
        # stopping, so only markers the template itself uses (plus EOS) are listed: cutting at
        # e.g. a plain-text "</s>" the template never emits would truncate legitimate output.
        stops: list[str] = []
        candidates = [end] + [t for t in eog_texts if t in self.source] + [self.special_tokens.get("eos_token")]
        for s in candidates:
            if s and s not in stops:
                stops.append(s)
        self.stop_strings: tuple[str, ...] = tuple(stops)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tokenizer: Any = None) -> "ChatTemplate":
        """The template of a GGUF's metadata (``tokenizer.chat_template``), ChatML if it has none.

        The special-token strings come from ``tokenizer`` (a :class:`rosenblatt.text.tokenizer.Tokenizer`)
        when given, else from the metadata's token list and ids.
        """
        source = md.get(KEY_CHAT_TEMPLATE)
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"metadata {KEY_CHAT_TEMPLATE!r}: expected a string, got {type(source).__name__}")
        if source is not None and not source.strip():
            source = None
        special: dict[str, str] = {}
        eog_texts: list[str] = []
        if tokenizer is not None:
            for name, tid in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                              ("unk_token", tokenizer.unk_id), ("pad_token", tokenizer.pad_id)):
                if tid is not None:
                    special[name] = tokenizer.id_to_token(tid)
            eog_texts = [tokenizer.id_to_token(i) for i in sorted(tokenizer.eog_ids)]
        else:
            tokens = md.get("tokenizer.ggml.tokens")
            if isinstance(tokens, list):
                for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"),
                                  ("eos_token", "tokenizer.ggml.eos_token_id"),
                                  ("unk_token", "tokenizer.ggml.unknown_token_id"),
                                  ("pad_token", "tokenizer.ggml.padding_token_id")):
                    tid = md.get(key)
                    if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(tokens):
                        special[name] = tokens[tid]
        name = md.get("general.name")
        label = f"chat template of {name!r}" if isinstance(name, str) and source is not None else None
        return cls(source, special_tokens=special, eog_texts=eog_texts, name=label)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               *, tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt for ``messages`` (a list of ``{"role": ..., "content": ...}`` dicts).

        ``add_generation_prompt`` appends the opening of an assistant turn; ``tools`` is passed
        to templates that support tool calling (JSON-schema dicts); ``extra`` becomes template
        variables and may override ``bos_token`` etc.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"{self.name}: messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ChatTemplateError(f"{self.name}: message {i} must be a dict, got {type(m).__name__}")
        if tools is not None:
            tools = list(tools)
            for t in tools:
                if not isinstance(t, Mapping):
                    raise ChatTemplateError(f"{self.name}: tools must be JSON-schema dicts, got {type(t).__name__}")
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update(extra)
        variables.update(messages=list(messages), tools=tools, add_generation_prompt=bool(add_generation_prompt))
        variables.setdefault("documents", None)
        try:
            return self._template.render(**variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.name} refused the messages: {_describe(e)}") from e
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self.name}: unsafe operation blocked by the sandbox: {_describe(e)}") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.name}: {type(e).__name__}: {_describe(e)}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"{self.name}: rendering failed: {type(e).__name__}: {_describe(e)}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name}, {len(self.source)} chars, end_of_turn={self.end_of_turn!r})"


__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "ChatTemplateError"]
