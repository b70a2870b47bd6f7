"""Structured output on the real models: for ten JSON schemas the answer of SmolLM2 and gemma3,
greedy and sampled, parses with ``json`` and validates with ``jsonschema`` (an independent
validator), and ends by itself rather than at the token limit."""

from __future__ import annotations

import json

import jsonschema
import pytest

from rosenblatt import Engine
from support import gemma3_path, smollm2_path

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]}},
                 "required": ["name", "address"]}}, "required": ["user"]},
    "todo list": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"title": {"type": "string"}, "done": {"type": "boolean"}},
                  "required": ["title", "done"]}}}, "required": ["items"]},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"]},
    "bounded numbers": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 60},
        "humidity": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["temperature", "humidity"]},
    "integer array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                      "minItems": 2, "maxItems": 5},
    "optional fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
                                                         "note": {"type": "string"},
                                                         "tags": {"type": "array", "items": {"type": "string"}}},
                        "required": ["id"]},
    "nullable": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                  "error": {"type": ["string", "null"]}},
                 "required": ["ok", "error"]},
    "matrix": {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "number"}}}}, "required": ["rows"]},
    "one of shapes": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
         "required": ["kind", "radius"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}},
         "required": ["kind", "side"]}]},
}

ASK = {
    "person": "Describe a fictional person.", "nested": "Give a user with a postal address.",
    "todo list": "Make a short todo list.", "enums": "Pick a T-shirt.", "bounded numbers": "What is the weather?",
    "integer array": "Give some small numbers.", "optional fields": "Make a record.",
    "nullable": "Report the status of a job.", "matrix": "Give a small matrix.", "one of shapes": "Describe a shape.",
}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def engine(request):
    path = smollm2_path() if request.param == "smollm2" else gemma3_path()
    return Engine.load(path, n_ctx=1024)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_ten_schemas_parse_and_validate(engine, temperature):
    failures = []
    for name, schema in SCHEMAS.items():
        messages = [{"role": "user", "content": f"{ASK[name]} Answer in JSON."}]
        responses = list(engine.chat_responses(messages, temperature=temperature, seed=7, max_new_tokens=160,
                                               json_schema=schema))
        text = "".join(r.text for r in responses)
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{name}: {e.__class__.__name__}: {text!r}")
        # the grammar ended the answer (an end token), not the limit
        if responses[-1].finish_reason != "stop":
            failures.append(f"{name}: finished by {responses[-1].finish_reason}: {text!r}")
    assert not failures, "\n".join(failures)


def test_json_object_mode_through_the_engine(engine):
    text = engine.chat([{"role": "user", "content": "Say hello as JSON."}], temperature=0, max_new_tokens=60,
                       json_schema={"type": "object"})
    assert isinstance(json.loads(text), dict)
