"""The OpenAI-compatible server: the real `openai` client against a real uvicorn on 127.0.0.1.

One server runs in-process on a thread (random free port) for the module, serving the session's
SmolLM2 engine; the `serve` command itself is tested once as a subprocess (with --api-key).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import httpx          # the 'test' extra brings the server's packages and the clients: a missing
import openai         # one fails the suite instead of skipping it
import pytest
import starlette      # noqa: F401
import uvicorn        # noqa: F401

from support import serving, smollm2_path

MODEL_ID = smollm2_path().stem
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def server(smollm2_engine):
    with serving(smollm2_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def health(server) -> dict:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_idle(server, timeout=60.0) -> dict:
    """/health once the worker has nothing running or queued."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if not h["busy"] and h["queued"] == 0:
            return h
        assert time.monotonic() < deadline, f"the worker stayed busy: {h}"
        time.sleep(0.05)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL_ID


def test_chat_completion_streamed_and_not(server, client):
    eng = server.engine
    r = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=12, temperature=0)
    wait_idle(server)                      # the engine is idle: ask it directly for the reference
    expected = eng.chat(FRANCE, max_new_tokens=12, temperature=0)
    n_prompt = len(eng.tokenize(eng.apply_chat_template(FRANCE), add_special=False))
    assert expected.strip()      # (the first token's margin is 0.06 in llama.cpp: no content assertion)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    finish = eng.stats.finish_reason           # "stop" at <|im_end|> or "length": depends on the near tie
    assert r.choices[0].finish_reason == finish in ("stop", "length")
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == eng.stats.generated_tokens
    assert r.usage.total_tokens == n_prompt + eng.stats.generated_tokens
    assert r.model == MODEL_ID and r.object == "chat.completion"

    # streamed: the pieces concatenate to the same text; usage comes in a last chunk
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == expected and finishes == [finish]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == n_prompt and chunks[-1].usage.total_tokens == r.usage.total_tokens

    # max_tokens cuts it: finish_reason "length" (max_completion_tokens is the newer name)
    short = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_completion_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert expected.startswith(short.choices[0].message.content)


def test_completion_stop_seed_top_p(server, client):
    eng = server.engine
    r = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=6, temperature=0)
    wait_idle(server)
    expected = eng.generate(COUNT, max_new_tokens=6, temperature=0)
    assert r.choices[0].text == expected and expected.startswith(" 6,")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(eng.tokenize(COUNT))

    streamed = list(client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"

    cut = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=16, temperature=0, stop=[" 8", "zzz"])
    assert cut.choices[0].text == " 6, 7," and cut.choices[0].finish_reason == "stop"

    # sampling: the same seed gives the same text; top_p is accepted
    kw = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=6, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b and a


async def _stream(aclient, req) -> str:
    if "messages" in req:
        s = await aclient.chat.completions.create(model=MODEL_ID, stream=True, temperature=0, max_tokens=8, **req)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
    s = await aclient.completions.create(model=MODEL_ID, stream=True, temperature=0, max_tokens=8, **req)
    return "".join([c.choices[0].text async for c in s])


def test_concurrent_streams_are_batched_and_give_the_texts_of_serving_alone(server):
    """8 streams at once run together in the worker's slots (continuous batching) and each text
    is the one the same request gets alone: nothing mixes, and batching changes no token."""
    distinct = [
        {"messages": [{"role": "user", "content": "Name a color."}]},
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"prompt": "The capital of Italy is"},
        {"prompt": COUNT},
    ]
    requests = distinct * 2                 # 8 at once, each text twice: any mixing shows
    before = wait_idle(server)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            together = await asyncio.gather(*(_stream(aclient, r) for r in requests))
            alone = [await _stream(aclient, r) for r in distinct]
        return together, alone

    together, alone = asyncio.run(main())
    assert len(set(alone)) == len(alone) and all(alone)
    assert together == alone * 2
    after = wait_idle(server)
    assert after["served"] - before["served"] == 12 and after["failed"] == before["failed"]
    assert after["peak_running"] >= 2 and after["slots"] == 4


@pytest.mark.slow
def test_disconnect_stops_generation(server, client):
    """A client that hangs up stops its generation: non-streamed, streamed, or still queued."""
    long = {"prompt": COUNT, "max_tokens": 480, "temperature": 0}       # counting goes on and on
    before = wait_idle(server)
    # a non-streamed request whose client gives up while it is being generated (after 0.4 s: at
    # ~300 tok/s a 1 s wait already produced more than half of max_tokens)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long, timeout=httpx.Timeout(30, read=0.4))
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"]
    assert after["last"]["finish_reason"] == "cancelled" and after["last"]["completion_tokens"] < 240

    # a stream whose client reads a few pieces and hangs up ...
    stream = client.completions.create(model=MODEL_ID, stream=True, **long)
    pieces = iter(stream)
    first = [next(pieces).choices[0].text for _ in range(3)]
    assert "".join(first).strip().startswith("6")
    # ... while a second client gives up waiting behind it: it is dropped from the queue
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long, timeout=httpx.Timeout(30, read=0.5))
    stream.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 3 and after["served"] == before["served"]
    assert after["last"]["finish_reason"] == "cancelled"
    assert 3 <= after["last"]["completion_tokens"] < 240        # stopped long before max_tokens

    # the next request is served normally
    r = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert wait_idle(server)["served"] == before["served"] + 1


LONG = "hello " * 600               # longer than the test engine's 512-token context

BAD = [
    ("malformed json", "/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("not an object", "/v1/completions", [1, 2], 400, None, "invalid_json"),
    ("nested too deep", "/v1/completions", b"[" * 100_000, 400, None, "invalid_json"),
    ("max_tokens text", "/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ("max_tokens negative", "/v1/completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("messages not a list", "/v1/chat/completions", {"messages": "Hi"}, 400, "messages", "invalid_type"),
    ("message without content", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400,
     "messages[0].content", "missing_required_parameter"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", "invalid_value"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4o", "messages": FRANCE}, 404, "model",
     "model_not_found"),
    ("n=17", "/v1/completions", {"prompt": "Hi", "n": 17}, 400, "n", "invalid_value"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": FRANCE, "top_logprobs": 2}, 400, "top_logprobs",
     "invalid_value"),
    ("legacy logprobs 6", "/v1/completions", {"prompt": "Hi", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("tool without function", "/v1/chat/completions", {"messages": FRANCE, "tools": [{"type": "function"}]}, 400,
     "tools[0]", "invalid_value"),
    ("tool_choice unknown function", "/v1/chat/completions",
     {"messages": FRANCE, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", "invalid_value"),
    ("tool_choice required, no tools", "/v1/chat/completions", {"messages": FRANCE, "tool_choice": "required"}, 400,
     "tool_choice", "invalid_value"),
    ("bad JSON schema", "/v1/chat/completions",
     {"messages": FRANCE, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                     "schema": {"type": "strang"}}}},
     400, "response_format", "invalid_value"),
    ("json_schema without schema", "/v1/chat/completions",
     {"messages": FRANCE, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format", "invalid_value"),
    ("unknown response_format", "/v1/chat/completions", {"messages": FRANCE, "response_format": {"type": "xml"}},
     400, "response_format.type", "invalid_value"),
    ("bad grammar", "/v1/completions", {"prompt": "Hi", "grammar": "start: (("}, 400, "grammar", "invalid_value"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content", "invalid_value"),
    ("max_completion_tokens", "/v1/completions", {"prompt": "Hi", "max_completion_tokens": 1.5}, 400,
     "max_completion_tokens", "invalid_type"),
    ("too many stops", "/v1/completions", {"prompt": "Hi", "stop": ["x"] * 17}, 400, "stop", "invalid_value"),
    ("stop not text", "/v1/completions", {"prompt": "Hi", "stop": ["x", 3]}, 400, "stop", "invalid_type"),
    ("unknown top_k type", "/v1/completions", {"prompt": "Hi", "top_k": "5"}, 400, "top_k", "invalid_type"),
    ("frequency_penalty", "/v1/completions", {"prompt": "Hi", "frequency_penalty": 3}, 400, "frequency_penalty",
     "invalid_value"),
    ("logit_bias key", "/v1/completions", {"prompt": "Hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "invalid_value"),
    ("logit_bias value", "/v1/completions", {"prompt": "Hi", "logit_bias": {"5": 101}}, 400, "logit_bias",
     "invalid_value"),
    ("logit_bias id", "/v1/completions", {"prompt": "Hi", "logit_bias": {"999999": 1}}, 400, "logit_bias",
     "invalid_value"),
    ("temperature", "/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature", "invalid_value"),
    ("top_p", "/v1/completions", {"prompt": "Hi", "top_p": True}, 400, "top_p", "invalid_type"),
    ("stop", "/v1/completions", {"prompt": "Hi", "stop": 5}, 400, "stop", "invalid_type"),
    ("stream not a bool", "/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("prompt too long", "/v1/completions", {"prompt": LONG, "max_tokens": 2}, 400, "prompt",
     "context_length_exceeded"),
    ("chat too long, streamed", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG}], "stream": True}, 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("path, body, status, param, code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_and_client_errors(server, client):
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("GET", "/v1/models/gpt-4o", 404)]:
        r = httpx.request(method, server.url + path, timeout=10)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # the openai client sees the typed errors
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=LONG, max_tokens=2, stream=True)
    assert e.value.code == "context_length_exceeded"
    # and the server is still fine
    r = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert health(server)["status"] == "ok"


@pytest.mark.slow
def test_serve_command_with_api_key():
    """`python -m rosenblatt serve` prints its URL, checks the key, stops on Ctrl-C (SIGINT)."""
    import pexpect
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ROSENBLATT_API_KEY", None)
    child = pexpect.spawn(sys.executable, ["-m", "rosenblatt", "serve", "--model", str(smollm2_path()),
                                           "--port", "0", "--ctx", "256", "--threads", "1", "--api-key", "sekrit"],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect(r"at (http://127\.0\.0\.1:\d+)/v1")
        url = child.match.group(1)
        assert MODEL_ID in child.before
        # no key, a wrong key: 401 with an OpenAI error body; /health needs none
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 401
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=60) as good:
            assert [m.id for m in good.models.list().data] == [MODEL_ID]
            r = good.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=2, temperature=0)
            assert r.usage.completion_tokens == 2
        child.kill(signal.SIGINT)
        child.expect("server stopped", timeout=30)
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_serve_refuses_a_missing_model():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "rosenblatt", "serve", "--model", "no-such-model.gguf", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and re.search(r"no-such-model\.gguf: no such file", out.stderr)


def test_stalled_connections_are_closed_and_others_served(smollm2_engine):
    """Slow clients (headers a byte at a time and then nothing, a body that stops half-way, a
    connection that never sends) are closed once --read-timeout passes; requests from others are
    answered meanwhile and afterwards. Loopback only, every wait bounded."""
    with serving(smollm2_engine, read_timeout=1.0) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"prompt": "Hi", "max_tokens": 2}'
        stalls = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty",           # headers cut
                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:10],                  # body cut
                  b""]                                                                    # silence
        socks = []
        for data in stalls:
            s = socket.create_connection((host, int(port)), timeout=10)
            if data:
                s.sendall(data)
            socks.append(s)
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text                 # served while the stalled ones wait
        for s in socks:
            try:
                assert s.recv(4096) == b""                  # the server closed it: EOF (or a reset)
            except ConnectionResetError:
                pass
            s.close()
        assert time.monotonic() - t0 < 10                   # closed after ~1 s, not held
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_request_that_waited_too_long_gets_503(smollm2_engine):
    """One long generation holds the engine; a request queued behind it past --queue-timeout is
    answered 503 (queue_timeout) when its turn comes, and the next one is served."""
    with serving(smollm2_engine, app_kw={"queue_timeout": 0.5, "parallel": 1}) as srv:
        def long():
            return httpx.post(srv.url + "/v1/completions", timeout=120,
                              json={"prompt": COUNT, "max_tokens": 300, "temperature": 0})
        t = threading.Thread(target=long)
        t.start()
        deadline = time.monotonic() + 30
        while not srv.worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        t.join(120)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout", r.text
        assert srv.worker.stats()["timed_out"] == 1
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200


# -- metrics and overload ---------------------------------------------------------------------

def scrape(url: str) -> dict:
    """/metrics (no key) parsed: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain") and "version=0.0.4" in r.headers["content-type"]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_no_key_and_count_refusals(smollm2_engine):
    with serving(smollm2_engine, app_kw={"api_key": "sekrit"}) as srv:
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 401
        m = scrape(srv.url)                                  # no Authorization header
        assert sample(m, "rosenblatt_requests_total", endpoint="/v1/models", status="401") == 1
        assert sample(m, "rosenblatt_slots") == 4 and sample(m, "rosenblatt_queue_length") == 0
        for name in ("rosenblatt_time_to_first_token_seconds", "rosenblatt_decode_tokens_per_second"):
            assert (f"{name}_count", ()) in m
        m = scrape(srv.url)
        assert sample(m, "rosenblatt_requests_total", endpoint="/metrics", status="200") == 1


def test_metrics_count_requests_and_tokens(server, client):
    wait_idle(server)
    before = scrape(server.url)
    a = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=5, temperature=0)
    wait_idle(server)
    after = scrape(server.url)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("rosenblatt_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("rosenblatt_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("rosenblatt_prompt_tokens_total") == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert moved("rosenblatt_generated_tokens_total") == a.usage.completion_tokens + b.usage.completion_tokens
    assert moved("rosenblatt_generations_served_total") == 2
    assert moved("rosenblatt_generations_failed_total") == moved("rosenblatt_generations_cancelled_total") == 0
    assert moved("rosenblatt_time_to_first_token_seconds_count") == 2
    assert moved("rosenblatt_time_to_first_token_seconds_sum") > 0
    assert moved("rosenblatt_queue_wait_seconds_count") == 2
    decoded = sum(r.usage.completion_tokens > 1 for r in (a, b))
    assert moved("rosenblatt_decode_tokens_per_second_count") == decoded
    assert sample(after, "rosenblatt_queue_length") == sample(after, "rosenblatt_running_generations") == 0
    assert sample(after, "rosenblatt_slots") == 4
    assert moved("rosenblatt_inter_token_latency_seconds_count") == decoded
    assert sample(after, "rosenblatt_kv_in_use_bytes") == 0                      # nothing running
    assert sample(after, "rosenblatt_kv_reserved_bytes") == server.worker.batch.kv_bytes > 0


def test_a_full_queue_gets_503_with_retry_after(smollm2_engine):
    """max_queue=1, one slot: one long generation runs, one request waits, the third is refused
    at once with 503 queue_full and an integer Retry-After (the estimate once a job time is known)."""
    errors = []

    def post(url):
        try:
            httpx.post(url + "/v1/completions", timeout=120,
                       json={"prompt": COUNT, "max_tokens": 480, "temperature": 0})
        except httpx.HTTPError as e:          # the server stops under it at the end of the test
            errors.append(e)

    threads = []
    with serving(smollm2_engine, app_kw={"max_queue": 1, "parallel": 1}) as srv:
        deadline = time.monotonic() + 30
        for cond in (lambda: srv.worker.busy, lambda: srv.worker.queued == 1):
            threads.append(threading.Thread(target=post, args=(srv.url,), daemon=True))
            threads[-1].start()
            while not cond():
                assert time.monotonic() < deadline, srv.worker.stats()
                time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        srv.worker.avg_job_s = 2.0           # as if recent jobs took 2 s: 1 + 1 queued x 2 s / 1 slot
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": FRANCE}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        m = scrape(srv.url)
        assert sample(m, "rosenblatt_requests_rejected_total") == 2
        assert sample(m, "rosenblatt_requests_total", endpoint="/v1/completions", status="503") == 1
        assert sample(m, "rosenblatt_queue_length") == 1 and sample(m, "rosenblatt_running_generations") == 1
    for t in threads:
        t.join(60)


def test_logit_bias_and_penalties_reach_the_sampler(server, client):
    """OpenAI's logit_bias forces a token (+100) in every position; frequency/presence penalties
    are accepted and change a greedy counting continuation."""
    tok = server.engine.tokenize(" cat", add_special=False)[0]
    r = client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(tok): 100})
    assert r.choices[0].text == server.engine.detokenize([tok] * 3)
    plain = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=12, temperature=0).choices[0].text
    pen = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=12, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert plain != pen


def test_logprobs_are_the_engines_own_streamed_and_not(server, client):
    """logprobs / top_logprobs on chat and completions, streamed and not: each chosen token's
    value is the one Engine.responses(logprobs=True) gives for the same greedy generation, and
    (greedy) it heads its step's top list, sorted most likely first."""
    from rosenblatt import GenerationParams
    e = server.engine
    alone = [r for r in e.responses(COUNT, GenerationParams(max_new_tokens=6, temperature=0, logprobs=True))
             if r.token is not None]
    want = [r.logprob for r in alone]
    r = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == want and len(lp.tokens) == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for v, top in zip(lp.token_logprobs, lp.top_logprobs):
        vals = list(top.values())
        assert len(top) == 3 and vals == sorted(vals, reverse=True) and max(vals) == v
    got = []
    for c in client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=6, temperature=0, logprobs=2,
                                       stream=True):
        if c.choices and c.choices[0].logprobs:
            got += c.choices[0].logprobs.token_logprobs
    assert got == want
    chat = client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob == t.logprob and len(t.top_logprobs) == 2
               for t in content)
    streamed = [t for c in client.chat.completions.create(model=MODEL_ID, messages=FRANCE, max_tokens=5, temperature=0,
                                                           logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == [t.logprob for t in content]


def test_batched_logprobs_equal_log_softmax_of_engine_logits(server, client):
    """Three long prompts (several prefill chunks) generated together: every chosen token's
    logprob is log_softmax(Engine.logits(prompt + generated)) at its position, within 1e-3
    (the prompt kernels give a row the same bits whatever else is in the call)."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    e = server.engine
    prompts = [f"Chapter {i}. " + "The river ran past the old mill and the town. " * (8 + 3 * i) for i in range(3)]

    def ask(p):
        return client.completions.create(model=MODEL_ID, prompt=p, max_tokens=24, temperature=0, logprobs=1)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, prompts))
    wait_idle(server)
    for p, a in zip(prompts, answers):
        ids = e.tokenize(p)
        gen = [r.token for r in e.responses(ids, temperature=0, max_new_tokens=24) if r.token is not None]
        assert len(ids) > 64 and e.detokenize(gen) == a.choices[0].text
        x = e.logits(ids + gen[:-1]).astype(np.float64)[len(ids) - 1:]
        top = x.max(axis=1, keepdims=True)
        lsm = x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))
        want = lsm[np.arange(len(gen)), gen]
        assert np.abs(np.array(a.choices[0].logprobs.token_logprobs) - want).max() <= 1e-3


def test_n_choices_share_the_prompt_and_each_is_its_own_generation(server, client):
    """n choices: greedy ones all equal the single answer; seeded sampled ones equal single
    requests with seeds seed, seed + 1, ...; usage counts the prompt once; streamed choices carry
    their index and the same texts."""
    one = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=8, temperature=0)
    r = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.text == one.choices[0].text for c in r.choices)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0)
    alone = [client.chat.completions.create(seed=40 + i, **kw).choices[0].message.content for i in range(3)]
    many = client.chat.completions.create(seed=40, n=3, **kw)
    assert [c.message.content for c in many.choices] == alone
    texts = ["", "", ""]
    for c in client.chat.completions.create(seed=40, n=3, stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == alone



@pytest.mark.slow
def test_a_burst_of_32_clients_half_leaving_mid_stream(server):
    """32 streaming clients at once, every other one hanging up after its first pieces: the
    others' texts are exactly what they get alone (nothing lost or mixed), the slots all come back
    (nothing running or queued afterwards) and the process's RSS returns near its level before."""
    prompts = [f"{', '.join(str(k) for k in range(1, 4 + i % 5))}," for i in range(32)]
    alone = {}

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    async def run_one(aclient, i):
        s = await aclient.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=24, temperature=0,
                                             stream=True)
        text = ""
        async for c in s:
            text += c.choices[0].text if c.choices else ""
            if i % 2 and len(text) >= 4:
                await s.response.aclose()                       # hang up mid-stream
                return None
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as aclient:
            for i in range(0, 32, 2):
                if prompts[i] not in alone:
                    alone[prompts[i]] = await run_one(aclient, i)
            before_burst = rss_mb()
            texts = await asyncio.gather(*(run_one(aclient, i) for i in range(32)))
            return before_burst, texts

    before = wait_idle(server)
    before_burst, texts = asyncio.run(main())
    for i, t in enumerate(texts):
        if i % 2 == 0:
            assert t == alone[prompts[i]], (i, t)
    after = wait_idle(server, timeout=120)
    assert after["running"] == 0 and after["queued"] == 0
    assert after["failed"] == before["failed"]
    assert after["served"] + after["cancelled"] - before["served"] - before["cancelled"] >= 32
    assert rss_mb() - before_burst < 50


def test_one_access_log_line_per_request(server, client, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="rosenblatt.serve.access"):
        r = client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=3, temperature=0)
        for _ in client.completions.create(model=MODEL_ID, prompt=COUNT, max_tokens=2, temperature=0, stream=True):
            pass
        deadline = time.monotonic() + 10
        while len([x for x in caplog.records if x.name == "rosenblatt.serve.access"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    lines = [x.getMessage() for x in caplog.records if x.name == "rosenblatt.serve.access"]
    assert len(lines) == 2
    assert "POST /v1/completions" in lines[0] and f"prompt={r.usage.prompt_tokens} completion=3" in lines[0]
    assert lines[1].endswith(" stream") and "completion=2" in lines[1]


# -- structured output and tool calls -----------------------------------------------------------

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": WEATHER_ARGS}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_response_format_json_schema_streamed_and_not(server, client):
    import jsonschema
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "temperature": {"type": "integer", "minimum": -50, "maximum": 50}},
              "required": ["city", "temperature"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    r = client.chat.completions.create(model=MODEL_ID, messages=PARIS, temperature=0, max_tokens=80,
                                       response_format=fmt)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_ID, messages=PARIS, temperature=0, max_tokens=80, response_format=fmt, stream=True)
        if c.choices)
    assert streamed == text
    r = client.chat.completions.create(model=MODEL_ID, messages=PARIS, temperature=0.8, seed=3, max_tokens=80,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_required_tool_call_validates_and_the_conversation_continues(server, client):
    import jsonschema
    r = client.chat.completions.create(model=MODEL_ID, messages=PARIS, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    # streamed: the same call, as a tool_calls delta, then finish_reason tool_calls
    calls, finish = [], None
    for c in client.chat.completions.create(model=MODEL_ID, messages=PARIS, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True):
        if c.choices:
            calls += c.choices[0].delta.tool_calls or []
            finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(d.function.name, d.function.arguments) for d in calls] == \
        [(call.function.name, call.function.arguments)]
    # the tool's answer goes back; the model answers in text
    history = PARIS + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=history, tools=[WEATHER], temperature=0,
                                        max_tokens=40)
    assert r2.choices[0].message.content and r2.choices[0].finish_reason in ("stop", "length")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 10          # the call and the answer are in the prompt


def test_named_tool_choice_and_none(server, client):
    clock = {"type": "function", "function": {"name": "local_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
    r = client.chat.completions.create(model=MODEL_ID, messages=PARIS, tools=[WEATHER, clock], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "local_time"}},
                                       max_tokens=60)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "local_time" and "zone" in json.loads(call.function.arguments)
    r = client.chat.completions.create(model=MODEL_ID, messages=PARIS, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
