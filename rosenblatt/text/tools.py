"""Tool calls: OpenAI's ``tools`` into the prompt, the model's calls out of its text.

The call syntax is the one Qwen2.5's template teaches (Hermes's): each call is a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines.

* :func:`check_tools` validates a request's ``tools`` (names, JSON-schema parameters) and
  :func:`choice` its ``tool_choice``;
* :func:`render_messages` turns an OpenAI conversation (assistant ``tool_calls``, ``role: "tool"``
  answers) into messages for the model's template: a template that knows tools (it reads the
  ``tools`` variable) gets them as they are; one that does not (SmolLM2's, gemma3's) gets the
  functions described in the system message and the calls and answers written in the same
  syntax as text, so any model can be asked;
* :func:`call_grammar` is the grammar that forces one or more valid calls (``tool_choice``
  ``"required"`` or a named function): the arguments are constrained to the function's schema,
  so even a small model returns a call that validates;
* :class:`CallParser` splits the generated text, as it streams, into content and calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..params import ParamError
from .grammar import json_in_lark

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)

#: the system-message text that describes the functions to a template without tool support
_PREAMBLE = ("You may call functions to help with the user's request. The functions, with their "
             "parameters as JSON Schema, are listed between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n"
             "To call a function, answer with a JSON object holding its name and arguments between "
             "<tool_call> and </tool_call>, one call per block:\n<tool_call>\n"
             '{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>')


def check_tools(tools: Any) -> list[dict]:
    """``tools`` as a list of ``{"type": "function", "function": {name, description?, parameters?}}``,
    each checked (a problem is a :class:`ParamError` naming ``tools[i]...``)."""
    if not isinstance(tools, list):
        raise ParamError("tools", f"must be a list of tools, got {type(tools).__name__}")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(t.get("function"), Mapping):
            raise ParamError(where, 'must be {"type": "function", "function": {...}}')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ParamError(f"{where}.function.name", "must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ParamError(f"{where}.function.name", f"{name!r} is given twice")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ParamError(f"{where}.function.parameters", "must be a JSON Schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ParamError(f"{where}.function.description", "must be a string")
        fn = {"name": name, "parameters": dict(params)}
        if desc is not None:
            fn["description"] = desc
        out.append({"type": "function", "function": fn})
    return out


def choice(tool_choice: Any, tools: list[dict]) -> str | tuple[str, str]:
    """``"none"``, ``"auto"``, ``"required"``, or ``("function", name)`` for the one function to call."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ParamError("tool_choice", "is 'required' but no tools are given")
        return tool_choice
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise ParamError("tool_choice", f"names the function {name!r}, which is not among the tools")
        return ("function", name)
    raise ParamError("tool_choice", "must be 'none', 'auto', 'required' or "
                     '{"type": "function", "function": {"name": ...}}')


def _arguments(call: Mapping, where: str) -> dict:
    """A call's arguments as a dict (OpenAI sends them as JSON text)."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ParamError(where, 'must be {"type": "function", "function": {"name": ..., "arguments": ...}}')
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ParamError(f"{where}.function.arguments", "is not valid JSON") from None
    if not isinstance(args, Mapping):
        raise ParamError(f"{where}.function.arguments", "must be a JSON object")
    return {"name": fn["name"], "arguments": dict(args)}


def _call_text(call: dict) -> str:
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def render_messages(messages: Sequence[Mapping], tools: list[dict] | None,
                    template_has_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template: see the module's description. Messages are
    dicts with ``role`` and ``content``, assistant ones optionally with ``tool_calls``, tool
    ones with ``tool_call_id``."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        calls = [_arguments(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.get("tool_calls") or ())]
        if template_has_tools:
            msg = {"role": role, "content": content}
            if calls:
                msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
            if role == "tool" and m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
            continue
        if calls:
            text = "\n".join(([content] if content else []) + [_call_text(c) for c in calls])
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1]["content"] += "\n" + text        # several answers: one user turn
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": content})
    if template_has_tools or not tools:
        return out, (tools or None) if template_has_tools else None
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    preamble = _PREAMBLE.format(tools=listing)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + preamble}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out, None


def call_grammar(tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's) for one call, or several one per line if ``parallel``, of
    the tools (or only of the function ``only``), each call's arguments valid against its schema."""
    alts = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        alts.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
                     "required": ["name", "arguments"], "additionalProperties": False})
    body = alts[0] if len(alts) == 1 else {"anyOf": alts}
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return f'{start}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: {json_in_lark(body)}\n'


def _openai_call(call: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a whole answer: every well-formed ``<tool_call>`` block becomes an
    OpenAI tool call (``id``, ``type``, ``function.name``, ``function.arguments`` as JSON text);
    a block that is not a JSON object with a name stays in the content."""
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                continue
        if not isinstance(args, dict):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(_openai_call({"name": obj["name"], "arguments": args}))
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


class CallParser:
    """Streamed text in; the content to stream out at once, and the calls at the end. Text from
    the first ``<tool_call>`` on is held back (as is a tail that could be the start of one) until
    :meth:`finish` parses it."""

    def __init__(self):
        self.held = ""
        self.in_call = False

    def feed(self, text: str) -> str:
        if self.in_call:
            self.held += text
            return ""
        s = self.held + text
        k = s.find(OPEN)
        if k >= 0:
            self.in_call = True
            self.held = s[k:]
            return s[:k]
        keep = next((n for n in range(min(len(OPEN) - 1, len(s)), 0, -1) if OPEN.startswith(s[-n:])), 0)
        self.held = s[len(s) - keep:] if keep else ""
        return s[:len(s) - keep]

    def finish(self) -> tuple[str, list[dict]]:
        """(the content still held, the calls)."""
        content, calls = parse_calls(self.held)
        self.held = ""
        return content, calls
