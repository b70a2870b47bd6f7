"""Constrained decoding and tool calls against independent references: Python's ``re`` and
``json``/``jsonschema`` decide what is valid, not llguidance."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from rosenblatt.params import GenerationParams, ParamError
from rosenblatt.sampling import Sampler, SamplingParams
from rosenblatt.text import grammar, tools
from rosenblatt.text.tokenizer import TokenAttr, Tokenizer
from support import smollm2_path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_path())


def _texts(tok):
    attrs = tok.token_attrs()
    return [None if attrs[i] & TokenAttr.CONTROL else tok.token_to_piece(i) for i in range(len(attrs))]


def test_mask_is_exactly_the_tokens_a_regex_allows(tok):
    """For ``[0-9]{1,3}`` the allowed first tokens are the non-empty digit strings of at most 3
    characters (by ``re``), and after one digit, those of at most 2 plus the end tokens."""
    texts = _texts(tok)
    c = grammar.Constraint(tok, grammar.lark_grammar("start: /[0-9]{1,3}/"))
    allowed = set(np.flatnonzero(c.allowed()).tolist())
    expect = {i for i, t in enumerate(texts) if t and re.fullmatch(rb"[0-9]{1,3}", t)}
    assert allowed == expect and expect
    one = next(i for i, t in enumerate(texts) if t == b"7")
    c.consume(one)
    allowed = set(np.flatnonzero(c.allowed()).tolist())
    expect = {i for i, t in enumerate(texts) if t and re.fullmatch(rb"[0-9]{1,2}", t)}
    eog = {i for i in range(len(texts)) if tok.is_eog(i)}
    assert expect <= allowed and allowed - expect <= eog and allowed & eog


def test_sampler_never_leaves_the_language(tok):
    """Random logits, several sampling settings: every sampled text matches the regex by ``re``."""
    rng = np.random.default_rng(0)
    n = len(tok.token_attrs())
    pattern = r"(yes|no)( and (yes|no)){0,3}"
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0),
                   SamplingParams(temperature=0.8, top_k=5, seed=3), SamplingParams(temperature=1.0, min_p=0.2)):
        for _ in range(5):
            c = grammar.Constraint(tok, grammar.lark_grammar(f"start: /{pattern}/"))
            s = Sampler(params, c)
            out: list[int] = []
            while len(out) < 40:
                t = s(rng.standard_normal(n) * 3, out)
                if tok.is_eog(t):
                    break
                out.append(t)
            assert tok.is_eog(t), "the grammar ends the answer"
            assert re.fullmatch(pattern, tok.decode(out)), tok.decode(out)


def _random_answer(tok, rng, scale: float = 4.0, **fields) -> str:
    """The text a constrained generation with ``fields`` gives under random logits (unfiltered
    sampling at temperature 1), ended by an end token or its ``max_new_tokens``."""
    p = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=int(rng.integers(2**32)), **fields)
    s = Sampler(p.sampling(), grammar.constraint(tok, p))
    n = len(tok.token_attrs())
    out: list[int] = []
    for _ in range(p.max_new_tokens):
        t = s(rng.standard_normal(n) * scale, out)
        if tok.is_eog(t):
            break
        out.append(t)
    return tok.decode(out)


def test_json_closes_before_the_budget(tok):
    """A list of strings under random logits (which would ramble forever) is closed within its
    token budget: the text parses and validates."""
    schema = {"type": "array", "items": {"type": "string"}}
    rng = np.random.default_rng(1)
    for budget in (12, 24, 48):
        jsonschema.validate(json.loads(_random_answer(tok, rng, json_schema=schema, max_new_tokens=budget)), schema)


def test_json_with_required_keys_closes_before_the_budget(tok):
    """Four required string properties under random logits: the last tokens of the budget are
    kept for the keys not yet written, so the object is complete and valid."""
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in "abcd"}, "required": list("abcd")}
    rng = np.random.default_rng(4)
    for budget in (64, 96):
        for _ in range(5):
            text = _random_answer(tok, rng, json_schema=schema, max_new_tokens=budget)
            jsonschema.validate(json.loads(text), schema)


def test_closed_objects_only_narrows():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "b": {"type": "array", "items": {"properties": {"c": {}}}}},
              "$defs": {"d": {"properties": {"e": {}}, "additionalProperties": True}}}
    closed = grammar.closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]        # the map of names is not a schema
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True     # said explicitly: kept
    assert "additionalProperties" not in schema                     # the caller's dict is untouched
    ok = {"properties": {"a": 1}, "b": [{"c": 2}]}
    jsonschema.validate(ok, closed)
    jsonschema.validate(ok, schema)


@pytest.mark.parametrize("fields, param", [
    ({"json_schema": {"type": "strang"}}, "json_schema"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                      "required": ["a"]}}, "json_schema"),
    ({"json_schema": {"type": "string", "pattern": "(("}}, "json_schema"),
    ({"grammar": "start: (("}, "grammar"),
])
def test_unusable_constraints_are_refused_by_name(tok, fields, param):
    with pytest.raises(ParamError) as e:
        grammar.compile_grammar(tok, GenerationParams(**fields))
    assert e.value.param == param and "\n" not in str(e.value)


def test_params_take_schema_text_and_refuse_both():
    assert GenerationParams(json_schema='{"type": "object"}').json_schema == {"type": "object"}
    with pytest.raises(ParamError, match="json_schema: is not valid JSON"):
        GenerationParams(json_schema="{nope")
    with pytest.raises(ParamError, match="grammar: give json_schema or grammar, not both"):
        GenerationParams(json_schema={}, grammar='start: "a"')


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "time_in", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def test_forced_call_grammar_yields_calls_that_validate(tok):
    """Random logits through the forced-call grammar: the text parses into one call of a
    listed function whose arguments validate against its schema."""
    rng = np.random.default_rng(2)
    checked = tools.check_tools([WEATHER, CLOCK])
    parsed = 0
    for only in (None, "time_in"):
        for _ in range(3):
            # rambling strings are closed within the budget
            text = _random_answer(tok, rng, scale=2.0, grammar=tools.call_grammar(checked, only, parallel=False),
                                  max_new_tokens=120)
            content, calls = tools.parse_calls(text)
            assert content == "" and len(calls) == 1
            fn = calls[0]["function"]
            spec = {"get_weather": WEATHER, "time_in": CLOCK}[fn["name"]]
            assert only in (None, fn["name"])
            jsonschema.validate(json.loads(fn["arguments"]), spec["function"]["parameters"])
            parsed += 1
    assert parsed == 6


def test_call_parser_streams_content_and_holds_calls():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n' \
           '</tool_call>'
    whole = tools.parse_calls(text)
    assert whole[0] == "Let me look." and json.loads(whole[1][0]["function"]["arguments"])["city"] == "Oslo"
    rng = np.random.default_rng(3)
    for _ in range(20):
        cuts = sorted(rng.choice(len(text), size=6, replace=False))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        p = tools.CallParser()
        streamed = "".join(p.feed(x) for x in parts)
        rest, calls = p.finish()
        assert streamed.strip() + rest == "Let me look." and "<" not in streamed
        assert [c["function"] for c in calls] == [c["function"] for c in whole[1]]
    p = tools.CallParser()                      # "<" that does not start a call is passed on
    assert p.feed("a <b") + p.feed("> c") + p.finish()[0] == "a <b> c"


def test_broken_calls_stay_text():
    for text in ('<tool_call>\n{"name": 3}\n</tool_call>', "<tool_call>\nnot json\n</tool_call>",
                 '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>'):
        assert tools.parse_calls(text) == (text, [])


def test_messages_for_a_template_without_tools():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"t": 3}'},
            {"role": "tool", "tool_call_id": "c2", "content": '{"t": 4}'}]
    out, t = tools.render_messages(msgs, tools.check_tools([WEATHER]), template_has_tools=False)
    assert t is None and out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert tools.parse_calls(out[2]["content"])[1][0]["function"]["name"] == "get_weather"
    assert out[3]["content"].count("<tool_response>") == 2
    out, t = tools.render_messages(msgs, tools.check_tools([WEATHER]), template_has_tools=True)
    assert t and out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "celsius"}
    assert out[2] == {"role": "tool", "content": '{"t": 3}', "tool_call_id": "c1"}


def test_tool_choice_names_a_function_even_one_called_none():
    checked = tools.check_tools([{"type": "function", "function": {"name": "none"}}])
    assert tools.choice({"type": "function", "function": {"name": "none"}}, checked) == ("function", "none")
    assert tools.choice("none", checked) == "none" and tools.choice(None, checked) == "auto"
    with pytest.raises(ParamError, match="tool_choice"):
        tools.choice({"type": "function", "function": {"name": ["f"]}}, checked)


@pytest.mark.parametrize("bad, param", [
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools[0].function.parameters"),
    ("f", "tools"),
])
def test_bad_tools_are_named(bad, param):
    with pytest.raises(ParamError) as e:
        tools.check_tools(bad)
    assert e.value.param == param
