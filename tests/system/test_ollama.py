"""The Ollama-compatible routes (/api/*): the official `ollama` client against a real uvicorn.

References are independent of the routes under test: the OpenAI routes of the same server and
the engine's own greedy `Engine.chat` / `Engine.generate` (at temperature 0 all must agree).
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import httpx
import ollama
import pytest

from rosenblatt import __version__
from rosenblatt.params import GenerationParams
from support import serving, smollm2_path

MODEL_ID = smollm2_path().stem
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = "1, 2, 3, 4, 5,"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server(smollm2_engine):
    with serving(smollm2_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def wait_idle(server, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(server.url + "/health", timeout=10).json()
        if not h["busy"] and h["queued"] == 0:
            return h
        assert time.monotonic() < deadline, f"the worker stayed busy: {h}"
        time.sleep(0.05)


def openai_post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def rfc3339(s: str) -> datetime:
    assert s.endswith("Z"), s
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_version_tags_show_ps(server, client):
    eng = server.engine
    assert httpx.get(server.url + "/api/version", timeout=10).json() == {"version": __version__}

    models = client.list().models
    assert len(models) == 1
    m = models[0]
    assert m.model == f"{MODEL_ID}:latest"
    assert m.size == smollm2_path().stat().st_size
    assert len(m.digest) == 64 and int(m.digest, 16) >= 0
    assert m.details.format == "gguf" and m.details.family == "llama"
    assert m.details.quantization_level == "Q4_1"            # the file's general.file_type
    assert m.details.parameter_size.endswith("M")
    assert m.digest == client.list().models[0].digest          # stable

    for name in (MODEL_ID, f"{MODEL_ID}:latest"):
        s = client.show(name)
        assert s.template == eng.template.source and "<|im_start|>" in s.template
        assert s.details.family == "llama" and s.details.format == "gguf"
        assert s.modelinfo["general.architecture"] == "llama"
        assert s.modelinfo["llama.context_length"] == eng.config.context_length
        assert s.modelinfo["llama.embedding_length"] == eng.config.d_model
        assert s.modelinfo["general.parameter_count"] == eng.config.n_params
        assert "tokenizer.ggml.tokens" not in s.modelinfo          # scalars only
        assert "temperature" in s.parameters and "<|im_end|>" in s.parameters
        assert f"FROM {smollm2_path().name}" in s.modelfile
        assert s.capabilities == ["completion"]

    ps = client.ps().models
    assert len(ps) == 1 and ps[0].model == m.model and ps[0].digest == m.digest
    assert ps[0].context_length == eng.n_ctx and ps[0].size > m.size       # the file and the KV slots


def test_chat_equals_the_openai_route_and_the_engine(server, client):
    eng = server.engine
    r = client.chat(model=MODEL_ID, messages=FRANCE, options=GREEDY, stream=False)
    reference = openai_post(server, "/v1/chat/completions",
                            {"messages": FRANCE, "temperature": 0, "max_tokens": 12})
    wait_idle(server)
    expected = eng.chat(FRANCE, max_new_tokens=12, temperature=0)
    n_prompt = len(eng.tokenize(eng.apply_chat_template(FRANCE), add_special=False))
    assert expected.strip()
    assert r.message.role == "assistant" and r.message.content == expected
    assert reference["choices"][0]["message"]["content"] == expected
    assert r.done and r.done_reason == reference["choices"][0]["finish_reason"] == eng.stats.finish_reason
    assert r.eval_count == eng.stats.generated_tokens == reference["usage"]["completion_tokens"]
    assert r.prompt_eval_count == n_prompt
    assert r.model == MODEL_ID
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration > 0 and r.load_duration == 0
    assert abs((rfc3339(r.created_at) - datetime.now(rfc3339(r.created_at).tzinfo)).total_seconds()) < 60

    # streamed (the default): the parts concatenate to the same text; the last one has the counts
    parts = list(client.chat(model=f"{MODEL_ID}:latest", messages=FRANCE, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == expected and len(parts) > 2
    last = parts[-1]
    assert last.message.content == "" and last.done_reason == r.done_reason
    assert last.eval_count == r.eval_count and last.prompt_eval_count == n_prompt
    assert all(p.model == f"{MODEL_ID}:latest" for p in parts)

    # num_predict cuts it: "length"
    short = client.chat(model=MODEL_ID, messages=FRANCE, options={"temperature": 0, "num_predict": 3})
    assert short.done_reason == "length" and short.eval_count == 3 and expected.startswith(short.message.content)


def test_stream_is_ndjson_by_default(server):
    with httpx.stream("POST", server.url + "/api/chat", timeout=120,
                      json={"model": MODEL_ID, "messages": FRANCE, "options": {"temperature": 0, "num_predict": 4}}) \
            as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 4
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(lines[-1][key], int), key
    assert all(line["done"] is False and line["message"]["role"] == "assistant" for line in lines[:-1])


def test_generate_raw_equals_completions_and_templated_equals_chat(server, client):
    eng = server.engine
    r = client.generate(model=MODEL_ID, prompt=COUNT, raw=True, options={"temperature": 0, "num_predict": 6})
    reference = openai_post(server, "/v1/completions", {"prompt": COUNT, "temperature": 0, "max_tokens": 6})
    wait_idle(server)
    expected = eng.generate(COUNT, max_new_tokens=6, temperature=0)
    assert r.response == reference["choices"][0]["text"] == expected and expected.startswith(" 6,")
    assert r.done_reason == "length" and r.eval_count == 6 and r.prompt_eval_count == len(eng.tokenize(COUNT))
    parts = list(client.generate(model=MODEL_ID, prompt=COUNT, raw=True, stream=True,
                                 options={"temperature": 0, "num_predict": 6}))
    assert "".join(p.response for p in parts) == expected and parts[-1].done and parts[-1].eval_count == 6

    # stop strings come from the options
    cut = client.generate(model=MODEL_ID, prompt=COUNT, raw=True,
                          options={"temperature": 0, "num_predict": 16, "stop": [" 8", "zzz"]})
    assert cut.response == " 6, 7," and cut.done_reason == "stop"

    # not raw: the prompt (and system) through the chat template, as Engine.chat
    system = "You are a geography teacher."
    t = client.generate(model=MODEL_ID, prompt=FRANCE[0]["content"], system=system, options=GREEDY)
    wait_idle(server)
    messages = [{"role": "system", "content": system}] + FRANCE
    assert t.response == eng.chat(messages, max_new_tokens=12, temperature=0)
    assert t.eval_count == eng.stats.generated_tokens


def test_sampling_options_reach_the_sampler(server, client):
    kw = dict(model=MODEL_ID, prompt="Once upon a time", raw=True)
    opts = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "seed": 1234, "num_predict": 6,
            "repeat_penalty": 1.1, "repeat_last_n": 32, "presence_penalty": 0.5, "frequency_penalty": 0.2,
            "num_ctx": 2048, "num_thread": 2, "mirostat": 0, "use_mmap": True, "typical_p": 1}  # the last: ignored
    a, b = client.generate(**kw, options=opts).response, client.generate(**kw, options=opts).response
    reference = openai_post(server, "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
        "seed": 1234, "repeat_penalty": 1.1, "repeat_last_n": 32, "presence_penalty": 0.5,
        "frequency_penalty": 0.2})
    assert a == b == reference["choices"][0]["text"] and a


BAD = [
    ("bad option type", "/api/chat", {"messages": FRANCE, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("bad option range", "/api/chat", {"messages": FRANCE, "options": {"top_p": 2}}, 400, "top_p"),
    ("num_predict text", "/api/generate", {"prompt": "Hi", "options": {"num_predict": "8"}}, 400, "num_predict"),
    ("num_predict -3", "/api/generate", {"prompt": "Hi", "options": {"num_predict": -3}}, 400, "num_predict"),
    ("ignored option ill-typed", "/api/chat", {"messages": FRANCE, "options": {"num_ctx": "big"}}, 400, "num_ctx"),
    ("unknown option", "/api/chat", {"messages": FRANCE, "options": {"temprature": 0}}, 400, "temprature"),
    ("options not an object", "/api/chat", {"messages": FRANCE, "options": [1]}, 400, "options"),
    ("stop not text", "/api/generate", {"prompt": "Hi", "options": {"stop": [3]}}, 400, "stop"),
    ("bad role", "/api/chat", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    ("content not text", "/api/chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("stream not a bool", "/api/chat", {"messages": FRANCE, "stream": "yes"}, 400, "stream"),
    ("tools", "/api/chat", {"messages": FRANCE, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("images", "/api/chat", {"messages": [{"role": "user", "content": "Hi", "images": ["AAAA"]}]}, 400, "images"),
    ("template", "/api/generate", {"prompt": "Hi", "template": "{{ .Prompt }}"}, 400, "template"),
    ("suffix", "/api/generate", {"prompt": "def f(", "suffix": "return 1"}, 400, "suffix"),
    ("think", "/api/chat", {"messages": FRANCE, "think": True}, 400, "think"),
    ("format bad", "/api/chat", {"messages": FRANCE, "format": "yaml"}, 400, "format"),
    ("prompt too long", "/api/generate", {"prompt": "hello " * 600, "raw": True}, 400, "context"),
    ("unknown model", "/api/chat", {"model": "llama3.2", "messages": FRANCE}, 404, "model 'llama3.2' not found"),
    ("unknown model (show)", "/api/show", {"model": "llama3.2"}, 404, "model 'llama3.2' not found"),
    ("no model", "/api/generate", {"prompt": "Hi"}, 400, "model is required"),
    ("malformed json", "/api/chat", b'{"model": ', 400, "JSON"),
    ("not an object", "/api/generate", b"[1, 2]", 400, "JSON object"),
]


@pytest.mark.parametrize("path, body, status, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_ollama_errors(server, path, body, status, words):
    if isinstance(body, dict) and "model" not in body and words != "model is required":
        body = {"model": MODEL_ID, **body}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()
    assert list(err) == ["error"] and isinstance(err["error"], str) and "\n" not in err["error"]
    assert words in err["error"], err


def test_the_client_sees_the_errors(server, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL_ID, messages=FRANCE, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:           # streamed: the status comes before any line
        list(client.chat(model=MODEL_ID, messages=FRANCE, options={"top_k": 1.5}, stream=True))
    assert e.value.status_code == 400 and "top_k" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3.2", prompt="Hi")
    assert e.value.status_code == 404 and e.value.error == "model 'llama3.2' not found"
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3.2:latest")
    assert e.value.status_code == 404


def test_empty_messages_or_prompt_only_load_the_model(server, client):
    """Ollama's way to preload a model (``ollama run`` does it): no generation, done_reason "load"."""
    before = wait_idle(server)
    r = client.chat(model=MODEL_ID, messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    g = client.generate(model=MODEL_ID)
    assert g.done and g.done_reason == "load" and g.response == ""
    assert wait_idle(server)["served"] == before["served"]


def test_format_json_and_schema_through_constrained_decoding(server, client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    if "json_schema" not in GenerationParams.model_fields:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=MODEL_ID, messages=messages, format="json")
        assert e.value.status_code == 400 and e.value.error == "format is not supported by this server yet"
        return
    import jsonschema
    r = client.chat(model=MODEL_ID, messages=messages, format=schema, options={"temperature": 0, "num_predict": 48})
    assert r.done_reason == "stop", r
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client.generate(model=MODEL_ID, prompt=messages[0]["content"], format="json",
                        options={"temperature": 0, "num_predict": 64})
    assert r.done_reason == "stop", r
    assert isinstance(json.loads(r.response), dict)


def test_a_client_that_hangs_up_stops_its_generation(server, client):
    before = wait_idle(server)
    parts = client.generate(model=MODEL_ID, prompt=COUNT, raw=True, stream=True,
                            options={"temperature": 0, "num_predict": 400})
    first = [next(parts).response for _ in range(3)]
    assert "".join(first).strip().startswith("6")
    parts.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"]
    assert 3 <= after["last"]["completion_tokens"] < 200


def test_metrics_count_the_ollama_routes(server, client):
    client.generate(model=MODEL_ID, prompt=COUNT, raw=True, options={"temperature": 0, "num_predict": 2})
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'rosenblatt_requests_total{endpoint="/api/generate",status="200"}' in text
    assert 'endpoint="/api/chat",status="400"' in text           # the refusals of the tests before


# keys in the order the ollama client sends them (the functions are written into the prompt as given)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}


def test_tools_on_chat_answer_as_the_openai_route_does(server, client):
    """Ollama has no tool_choice (auto): at temperature 0 the answer, calls included, is the one
    /v1/chat/completions gives with tool_choice auto; a call and the tool's answer sent back continue."""
    msgs = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    ref = openai_post(server, "/v1/chat/completions", {"messages": msgs, "tools": [WEATHER], "temperature": 0,
                                                       "max_tokens": 60})["choices"][0]["message"]
    for stream in (False, True):
        parts = client.chat(model=MODEL_ID, messages=msgs, tools=[WEATHER], stream=stream,
                            options={"temperature": 0, "num_predict": 60})
        parts = list(parts) if stream else [parts]
        content = "".join(p.message.content or "" for p in parts)
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert content == (ref["content"] or "")
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ref.get("tool_calls") or []]
    history = msgs + [{"role": "assistant", "content": "",
                       "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                      {"role": "tool", "content": '{"temperature": 18}'}]
    r = client.chat(model=MODEL_ID, messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 30})
    assert r.done and r.prompt_eval_count > 0 and (r.message.content or r.message.tool_calls)
