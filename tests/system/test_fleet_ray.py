"""The fleet on Ray Serve (`rosenblatt serve --fleet`): two "boards" as two nodes of a local Ray
cluster on this machine, each serving the real SmolLM2 behind one endpoint.

Everything listens on 127.0.0.1 (the Ray nodes, the driver, Ray Serve's HTTP proxy on a free
port), the dashboard and usage stats are off, nothing is downloaded. One cluster for the module,
shut down in the fixture's teardown whatever happens; every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml
from click.testing import CliRunner
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from rosenblatt.cli import main
from rosenblatt.serve.fleet import APP_NAME, RESOURCE, board_resource, deploy
from rosenblatt.fleet import load_fleet
from support import smollm2_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16
CTX = 512
MODEL_ID = smollm2_path().stem
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_fleet(d: Path, port: int, model_dir: Path, model_file: str, boards: dict[str, str] | None = None,
                edit=None) -> Path:
    """Board files a and b (copies of boltzmann.yaml: one CPU each as their "A76", the model in
    ``model_dir``) and the fleet file pair.yaml beside them; ``edit(name, data)`` changes a board."""
    d.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    base = yaml.safe_load((REPO / "fleet" / "boltzmann.yaml").read_text())
    boards = boards or {"a": "127.0.0.1", "b": "127.0.0.1"}
    for i, name in enumerate(boards):
        mine = cpus[i % len(cpus)]
        data = yaml.safe_load(yaml.safe_dump(base))
        data["name"] = name
        data["cpu"]["a76"] = [mine]
        data["cpu"]["a55"] = [c for c in cpus[:2] if c != mine]
        data["models"] = {"dir": str(model_dir), "default": "smollm2", "files": {"smollm2": model_file}}
        data["bench"].update(cpus=[mine], threads=1, model="smollm2")
        data["serve"] = {"model": "smollm2", "ctx": CTX, "slots": 4, "cpus": [mine], "threads": 1, "device": "cpu"}
        if edit is not None:
            edit(name, data)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    fleet = {"schema": 1, "name": "pair", "head": next(iter(boards)), "ray_port": 6379,
             "http": {"host": "127.0.0.1", "port": port},
             "boards": {name: {"address": addr} for name, addr in boards.items()}}
    path = d / "pair.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def report(what: str) -> None:
    print(f"[fleet] {what}", file=sys.stderr)


# ------------------------------------------------------------------ bad files, before any Ray


@pytest.mark.parametrize("problem", ["unknown key", "not an A76 core", "missing model file", "fleet unknown key"])
def test_bad_fleet_files_are_one_line_errors_before_ray(tmp_path, problem):
    model = smollm2_path()

    def edit(name, data):
        if name != "b":
            return
        if problem == "unknown key":
            data["serve"]["slot"] = 2
        elif problem == "not an A76 core":
            data["serve"]["cpus"] = data["cpu"]["a55"][:1] or [1023]
    model_file = "absent.gguf" if problem == "missing model file" else model.name
    path = write_fleet(tmp_path, 1, model.parent, model_file, edit=edit)
    if problem == "fleet unknown key":
        data = yaml.safe_load(path.read_text())
        data["http"]["adress"] = "x"
        path.write_text(yaml.safe_dump(data))
    expect = {"unknown key": ("b.yaml", "serve.slot:", "unknown key in serve"),
              "not an A76 core": ("b.yaml", "serve.cpus:", "is not an A76 core"),
              "missing model file": ("a.yaml", "serve.model:", "absent.gguf not found"),
              "fleet unknown key": ("pair.yaml", "http.adress:", "unknown key in http")}[problem]

    r = CliRunner().invoke(main, ["fleet", "check", str(path)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosenblatt: error: "), r.output
    assert all(x in lines[0] for x in expect), lines[0]

    # serve --fleet refuses the same file before touching Ray: RAY_ADDRESS is a port nobody
    # listens on, so reaching Ray would be a different error (and a wait)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "rosenblatt", "serve", "--fleet", str(path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rosenblatt: error: ") and all(x in err[0] for x in expect), p.stderr
    assert time.monotonic() - t0 < 60


def test_fleet_plan_prints_ray_start_per_board(tmp_path):
    path = write_fleet(tmp_path, 8000, smollm2_path().parent, smollm2_path().name,
                       boards={"a": "10.0.0.1", "b": "10.0.0.2"})
    r = CliRunner().invoke(main, ["fleet", "plan", str(path)])
    assert r.exit_code == 0, r.output
    starts = [line for line in r.output.splitlines() if "ray start" in line]
    assert len(starts) == 2
    assert "--head --port=6379" in starts[0] and "--node-ip-address=10.0.0.1" in starts[0]
    assert "--address=10.0.0.1:6379" in starts[1] and "--node-ip-address=10.0.0.2" in starts[1]
    assert '"board-b": 1' in starts[1] and f'"{RESOURCE}": 1' in starts[1] and "--num-cpus=1" in starts[1]
    assert f"rosenblatt serve --fleet {path}" in r.output


# ------------------------------------------------------------------ the ingress, without Ray


class _FakeBoards:
    """A deployment handle whose replicas play the given scripts: a list of ASGI messages, or
    an exception raised after them (the board dying)."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.calls = 0

    def options(self, **kw):
        return self

    @property
    def forward(self):
        return self

    def remote(self, req):
        self.calls += 1
        script = self.scripts.pop(0)
        outer = self

        class Gen:
            def cancel(self):
                outer.cancelled = True

            async def __aiter__(self):
                for item in script:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        return Gen()


def _ingress_app(boards):
    from rosenblatt.serve.fleet import Ingress
    return Ingress(boards).__serve_build_asgi_app__()


START_SSE = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
START_JSON = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}


@pytest.mark.parametrize("case", ["dies twice", "dies once", "dies mid-stream"])
def test_ingress_retries_once_then_503(case):
    import asyncio

    from ray.exceptions import ActorDiedError
    died = ActorDiedError()
    ok = [START_JSON, {"type": "http.response.body", "body": b'{"ok": 1}', "more_body": False}]
    boards = {"dies twice": _FakeBoards([died], [died]),
              "dies once": _FakeBoards([died], ok),
              "dies mid-stream": _FakeBoards([START_SSE, {"type": "http.response.body", "body": b"data: {}\n\n",
                                                          "more_body": True}, died])}[case]

    async def go():
        transport = httpx.ASGITransport(app=_ingress_app(boards))
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as c:
            return await c.post("/v1/chat/completions", json={"messages": FRANCE})
    r = asyncio.run(go())
    if case == "dies twice":
        assert boards.calls == 2 and r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "board_unavailable"
    elif case == "dies once":
        assert boards.calls == 2 and r.status_code == 200 and r.json() == {"ok": 1}
    else:                       # a byte went out: no second try, the stream ends with an error event
        assert boards.calls == 1 and r.status_code == 200
        assert r.text.startswith("data: {}\n\n") and '"code": "board_unavailable"' in r.text
        assert "[DONE]" not in r.text


def test_router_puts_boards_with_a_free_slot_first():
    import asyncio
    from types import SimpleNamespace

    from rosenblatt.serve.fleet_router import SlotRouter
    full = SimpleNamespace(routing_stats={"slots": 4, "running": 4, "queued": 1})
    free = SimpleNamespace(routing_stats={"slots": 4, "running": 3, "queued": 0})
    fresh = SimpleNamespace(routing_stats={})
    ranks = asyncio.run(SlotRouter.choose_replicas(None, [full, free, fresh]))
    assert [sorted(map(id, r)) for r in ranks] == [sorted([id(free), id(fresh)]), [id(full)]]
    assert asyncio.run(SlotRouter.choose_replicas(None, [full])) == [[full]]


# ------------------------------------------------------------------ the local cluster


@pytest.fixture(scope="module")
def cluster():
    """A head node (no board) and two board nodes a and b, all on 127.0.0.1; the driver connected."""
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS", LOOPBACK_ENV)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    # Ray turns a loopback address given to ray.init into this machine's outward address unless
    # "clusters" are off (its switch for macOS and Windows, read at import: the node processes
    # get the variable, this process the constant)
    os.environ[LOOPBACK_ENV] = "0"
    mp = pytest.MonkeyPatch()
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    t0 = time.monotonic()
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False})
        for name in ("a", "b"):
            c.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources={RESOURCE: 1, board_resource(name): 1})
        c.wait_for_nodes(timeout=60)
        ray.init(address=c.address, log_to_driver=False)
        assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        report(f"3-node cluster up in {time.monotonic() - t0:.1f} s, RSS {rss_mb(_descendants(os.getpid())):.0f} MB")
        yield c
    finally:
        for step in (serve.shutdown, ray.shutdown, c.shutdown if c is not None else None):
            try:
                if step is not None:
                    step()
            except Exception as e:
                report(f"teardown: {step.__qualname__}: {e}")
        mp.undo()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        left = [pid for pid in _descendants(os.getpid()) if "ray" in _cmdline(pid)]
        assert not left, f"Ray processes left: {[_cmdline(p)[:80] for p in left]}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_board_that_cannot_load_its_model_says_why(cluster, tmp_path):
    """serve --fleet as the operator runs it (RAY_ADDRESS: the cluster), board b's model file
    absent on its own disk (its address is not this machine, so only its replica can tell):
    one line naming the board and the file, exit status 2, the cluster still usable."""
    model = smollm2_path()
    path = write_fleet(tmp_path, free_port(), model.parent, model.name,
                       boards={"a": "127.0.0.1", "b": "192.0.2.1"})
    bdata = yaml.safe_load((tmp_path / "b.yaml").read_text())
    bdata["models"]["dir"] = str(tmp_path / "elsewhere")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bdata, sort_keys=False))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "rosenblatt", "serve", "--fleet", str(path)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": cluster.address})
    took = time.monotonic() - t0
    report(f"a board without its model: refused in {took:.1f} s")
    assert p.returncode == 2, (p.stdout, p.stderr)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("rosenblatt: error: board b: ") and "no such model file (serve.model)" in last, p.stderr
    assert str(tmp_path / "elsewhere" / model.name) in last


# ------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory):
    model = smollm2_path()
    port = free_port()
    path = write_fleet(tmp_path_factory.mktemp("fleet"), port, model.parent, model.name)
    f = load_fleet(path)
    t0 = time.monotonic()
    url = deploy(f, "127.0.0.1", port, timeout=300)
    report(f"fleet of 2 boards serving in {time.monotonic() - t0:.1f} s at {url}; "
           f"RSS of the cluster {rss_mb(_descendants(os.getpid())):.0f} MB")
    assert url == f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(fleet):
    with openai.OpenAI(base_url=fleet + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def expected(smollm2_engine):
    return smollm2_engine.chat(FRANCE, temperature=0, max_new_tokens=MAX_TOKENS)


def boards_handle():
    return serve.get_deployment_handle("boards", app_name=APP_NAME)


def chat(client, **kw):
    raw = client.chat.completions.with_raw_response.create(model=MODEL_ID, messages=FRANCE, temperature=0,
                                                           max_tokens=MAX_TOKENS, **kw)
    return raw.headers.get("x-rosenblatt-board"), raw.parse()


def test_answers_through_the_ingress_match_the_engine(client, fleet, expected, smollm2_engine):
    assert [m.id for m in client.models.list().data] == [smollm2_path().stem]
    board, c = chat(client)
    assert board in ("a", "b")
    assert c.choices[0].message.content == expected
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == MAX_TOKENS
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL_ID, messages=FRANCE, temperature=0, max_tokens=MAX_TOKENS, stream=True) if ch.choices]
    assert "".join(pieces) == expected
    text = client.completions.create(model=MODEL_ID, prompt="The capital of France is", temperature=0,
                                     max_tokens=8).choices[0].text
    assert text == smollm2_engine.generate("The capital of France is", temperature=0, max_new_tokens=8)
    h = httpx.get(fleet + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["slots"] == 4 and h.headers["x-rosenblatt-board"] in ("a", "b")
    m = httpx.get(fleet + "/metrics", timeout=30)
    assert m.status_code == 200 and "rosenblatt_requests_total" in m.text
    # whatever else create_app serves comes through too: the Ollama routes
    o = httpx.post(fleet + "/api/chat", timeout=60, json={"model": MODEL_ID, "messages": FRANCE, "stream": False,
                                                          "options": {"temperature": 0, "num_predict": MAX_TOKENS}})
    assert o.status_code == 200 and o.json()["message"]["content"] == expected, o.text
    bad = httpx.post(fleet + "/v1/chat/completions", json={"messages": "nope"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    # each replica sits on its own board, pinned to that board's serve.cpus
    seen = {}
    for _ in range(40):
        d = boards_handle().describe.remote().result(timeout_s=30)
        seen[d["board"]] = d
        if len(seen) == 2:
            break
    assert set(seen) == {"a", "b"} and seen["a"]["node_id"] != seen["b"]["node_id"]
    report("replicas: " + ", ".join(f"board {b} pid {d['pid']} RSS {d['rss_mb']:.0f} MB, loaded in {d['load_s']:.1f} s"
                                    for b, d in sorted(seen.items())))
    cpus = sorted(os.sched_getaffinity(0))
    assert seen["a"]["cpus"] == [cpus[0]] and seen["b"]["cpus"] == [cpus[1 % len(cpus)]]


def burst(client, n: int, during=None) -> tuple[list, list]:
    """``n`` chat requests at once; a 503 is retried once after its Retry-After. Returns
    (board of each answer, [(index, what failed)] for the ones that got a 503 first)."""
    retried = []

    def one(i):
        for attempt in (1, 2):
            try:
                return chat(client)
            except openai.APIStatusError as e:
                assert e.status_code == 503 and attempt == 1, f"request {i}: {e.status_code} {e.message}"
                after = float(e.response.headers["retry-after"])
                assert 0 < after <= 10
                retried.append((i, e.message))
                time.sleep(after)

    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        if during is not None:
            during()
        results = [f.result(timeout=300) for f in futures]
    return results, retried


def test_forty_requests_spread_over_both_boards(client, expected):
    t0 = time.monotonic()
    results, retried = burst(client, 40)
    took = time.monotonic() - t0
    boards = [b for b, _ in results]
    report(f"40 requests ({MAX_TOKENS} tokens each) in {took:.1f} s = {40 * MAX_TOKENS / took:.1f} tok/s; "
           f"board a {boards.count('a')}, b {boards.count('b')}")
    assert not retried
    assert all(c.choices[0].message.content == expected for _, c in results)
    assert boards.count("a") > 0 and boards.count("b") > 0, boards


def test_a_replica_killed_mid_burst_is_replaced_and_no_request_is_lost(client, expected):
    victim = boards_handle().describe.remote().result(timeout_s=30)
    ingress = serve.get_deployment_handle("ingress", app_name=APP_NAME)
    before = ingress.counts.remote().result(timeout_s=30)
    killed_at = []

    def kill():
        time.sleep(1.0)                 # the burst is spread over both boards by now
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at.append(time.monotonic())

    results, retried = burst(client, 40, during=kill)
    report(f"killed board {victim['board']}'s replica (pid {victim['pid']}) mid-burst: "
           f"{len(retried)} of 40 got a 503 first; answers by board: "
           f"a {[b for b, _ in results].count('a')}, b {[b for b, _ in results].count('b')}")
    assert killed_at
    assert all(c.choices[0].message.content == expected for _, c in results)
    after = ingress.counts.remote().result(timeout_s=30)
    hit = after["retried"] - before["retried"]
    report(f"the ingress sent {hit} requests once more, answered {after['unavailable'] - before['unavailable']} "
           f"with 503")
    assert hit + len(retried) > 0, "the kill hit no request in flight"
    assert after["unavailable"] - before["unavailable"] == len(retried)
    # Ray Serve replaces it on the same board (only that node has the board's resource)
    deadline = time.monotonic() + 180
    while True:
        try:
            d = boards_handle().describe.remote().result(timeout_s=10)
            if d["board"] == victim["board"] and d["pid"] != victim["pid"]:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.5)
    report(f"board {victim['board']} serving again {time.monotonic() - killed_at[0]:.1f} s after the kill")
    deadline = time.monotonic() + 120
    while serve.status().applications[APP_NAME].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status().applications[APP_NAME]
        time.sleep(0.5)
    results, retried = burst(client, 8)
    assert not retried and all(c.choices[0].message.content == expected for _, c in results)
