"""A fleet of boards behind one OpenAI endpoint, on Ray Serve (``rosenblatt serve --fleet``).

One Ray Serve application, two deployments:

* ``boards``: one replica per board, each holding one :class:`~rosenblatt.engine.Engine` and the
  whole application :func:`~rosenblatt.serve.app.create_app` builds for it (every route it
  serves, its worker thread, its ``/metrics``). Every board's Ray node advertises the resource
  ``rosenblatt-board: 1`` and ``board-<name>: 1``; a replica asks for one ``rosenblatt-board``, so
  each board holds exactly one, and reads which board it is on from its node's ``board-<name>``.
  It pins itself to the board file's ``serve.cpus`` and loads ``serve.model`` with the board's
  context, slots, threads and device. It reports its slot occupancy to Ray Serve's router
  (``record_routing_stats``; :class:`~rosenblatt.serve.fleet_router.SlotRouter` ranks on it) and
  answers Ray Serve's health checks by calling its app's ``/health`` and checking the engine's
  thread. A model it cannot load fails its constructor with one line (:class:`BoardLoadError`),
  which :func:`deploy` reports instead of waiting.
* ``ingress``: the HTTP entry (Ray Serve's proxy on the head sends it every request). It reads
  the request and hands it to a board replica through a deployment handle as plain data; the
  replica runs it through its app and streams the ASGI messages back. If the replica dies
  (board off, process killed) before a byte of the response went out, the request is sent once
  more (Ray Serve routes it to a live board); if that fails too, the client gets 503 with
  ``Retry-After``. A streamed answer cut off mid-way ends with an error event. Ray Serve's
  controller replaces the dead replica when its board is back.

This module (and :mod:`rosenblatt.serve.fleet_router`) is the only one importing ray, which it
does inside its functions: ``import rosenblatt`` and ``rosenblatt.serve`` never need it. The
board and fleet files are declared in :mod:`rosenblatt.fleet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from typing import Any

from ..errors import RosenblattError
from ..fleet import Fleet, cpu_list

log = logging.getLogger("rosenblatt.fleet")

#: every board's Ray node advertises one; a board replica takes it (one replica per board)
RESOURCE = "rosenblatt-board"
#: the Ray Serve application's name
APP_NAME = "rosenblatt"
#: seconds a client is told to wait after a 503 (a dead board's replacement takes longer, but
#: the retry goes to a live board)
RETRY_AFTER_S = 1
#: Ray Serve's health check and routing-stats periods, seconds
HEALTH_CHECK_PERIOD_S = 2.0
ROUTING_STATS_PERIOD_S = 1.0
#: request bodies larger than this are refused at the ingress (the app's own limit)
MAX_BODY_BYTES = 4 * 2**20


def board_resource(name: str) -> str:
    """The resource naming board ``name``'s Ray node."""
    return f"board-{name}"


class BoardLoadError(RosenblattError, RuntimeError):
    """A board replica that cannot start (model file, CPU pinning, engine): one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class FleetDeployError(RosenblattError, RuntimeError):
    """The fleet could not be brought up: one line saying which board and why."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def fleet_spec(fleet: Fleet, api_key: str | None = None) -> dict:
    """What the replicas need from the fleet, as plain data (pickled to every replica)."""
    boards = {}
    for name, board in fleet.members.items():
        s = board.serve
        boards[name] = {"model": os.fspath(board.serve_model_path()), "ctx": s.ctx, "slots": s.slots,
                        "cpus": list(s.cpus), "threads": s.threads, "device": s.device}
    return {"fleet": fleet.name, "api_key": api_key, "boards": boards}


# -- running an ASGI app in-process -----------------------------------------------------------

class _Lifespan:
    """Drives an ASGI app's lifespan (startup, shutdown) as a server would."""

    def __init__(self, app):
        self.app = app
        self._in: asyncio.Queue = asyncio.Queue()
        self._out: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def _step(self, kind: str, timeout: float) -> None:
        await self._in.put({"type": f"lifespan.{kind}"})
        msg = await asyncio.wait_for(self._out.get(), timeout)
        if msg["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"lifespan {kind} failed: {msg.get('message', msg['type'])}")

    async def startup(self, timeout: float = 60.0) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._in.get, self._out.put))
        await self._step("startup", timeout)

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await self._step("shutdown", timeout)


async def _asgi_messages(app, req: dict, extra_headers: list | None = None):
    """Run one HTTP request (plain data: method, path, query_string, headers, body, client)
    through ``app``; yield the ASGI messages it sends. Closing the generator is the client
    hanging up (the app sees ``http.disconnect``)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req["method"], "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(),
             "query_string": req["query_string"], "root_path": "", "headers": req["headers"],
             "client": req.get("client"), "server": None, "state": {}}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body = [req["body"]]

    async def receive():
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        await out.put(msg)

    done = object()
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda t: out.put_nowait(done))
    try:
        while True:
            msg = await out.get()
            if msg is done:
                break
            if msg["type"] == "http.response.start" and extra_headers:
                msg = {**msg, "headers": list(msg.get("headers", [])) + extra_headers}
            yield msg
        if not task.cancelled() and task.exception() is not None:
            log.error("the app failed on %s %s", req["method"], req["path"], exc_info=task.exception())
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            task.cancel()


def _request(method: str, path: str, body: bytes = b"", headers: list | None = None) -> dict:
    return {"method": method, "path": path, "query_string": b"", "headers": headers or [], "body": body,
            "client": None}


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- the board replica ------------------------------------------------------------------------

def _this_board(spec: dict) -> str:
    """The fleet board this process's Ray node is (its ``board-<name>`` resource)."""
    import ray
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            names = [k[len("board-"):] for k in node.get("Resources", {}) if k.startswith("board-")]
            known = [n for n in names if n in spec["boards"]]
            if len(known) == 1:
                return known[0]
            raise BoardLoadError(f"this Ray node advertises {', '.join(board_resource(n) for n in names) or 'no board-<name> resource'}; "
                                 f"fleet {spec['fleet']} has {', '.join(spec['boards'])}")
    raise BoardLoadError(f"this Ray node ({node_id}) is not in the cluster's node list")


class BoardReplica:
    """One board: its engine and the app serving it (the ``boards`` deployment)."""

    async def __init__(self, spec: dict):
        from ..engine import Engine
        from .app import create_app
        self.board = board = _this_board(spec)
        cfg = spec["boards"][board]
        self.model = cfg["model"]
        try:
            os.sched_setaffinity(0, cfg["cpus"])
        except (OSError, ValueError) as e:
            raise BoardLoadError(f"board {board}: cannot pin to CPUs {cpu_list(cfg['cpus'])} (serve.cpus): {e}") from None
        if not os.path.isfile(self.model):
            raise BoardLoadError(f"board {board}: {self.model}: no such model file (serve.model)")
        t0 = time.perf_counter()
        try:
            engine = await asyncio.to_thread(Engine.load, self.model, device=cfg["device"], n_ctx=cfg["ctx"],
                                             threads=cfg["threads"])
        except (RosenblattError, OSError, ValueError) as e:
            raise BoardLoadError(f"board {board}: cannot load {self.model}: {e}") from None
        self.load_s = time.perf_counter() - t0
        access = logging.getLogger("rosenblatt.serve.access")
        if not access.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(f"%(asctime)s board {board}: %(message)s"))
            access.addHandler(handler)
            access.setLevel(logging.INFO)
        self.app = create_app(engine, api_key=spec.get("api_key"), parallel=cfg["slots"])
        self.server = self.app.state.server
        self._lifespan = _Lifespan(self.app)
        await self._lifespan.startup()
        self._header = [(b"x-rosenblatt-board", board.encode())]
        log.warning("board %s: serving %s (ctx %d, %d slots, CPUs %s, %d threads, %s) after %.1f s", board,
                    os.path.basename(self.model), cfg["ctx"], cfg["slots"], cpu_list(cfg["cpus"]), cfg["threads"],
                    cfg["device"], self.load_s)

    async def forward(self, req: dict):
        """One HTTP request through the app: the ASGI messages it sends (streamed back)."""
        async for msg in _asgi_messages(self.app, req, self._header):
            yield msg

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's routing stats: the slots and how many are taken or waited for."""
        s = self.server.worker.stats()
        return {"slots": s["slots"], "running": s["running"], "queued": s["queued"]}

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine's thread runs and the app's /health answers."""
        if not self.server.worker.alive:
            raise RuntimeError(f"board {self.board}: the engine thread is not running")
        status = None
        async for msg in _asgi_messages(self.app, _request("GET", "/health")):
            if msg["type"] == "http.response.start":
                status = msg["status"]
        if status != 200:
            raise RuntimeError(f"board {self.board}: /health answered {status}")

    def describe(self) -> dict[str, Any]:
        """Which board this is, its process and what it serves (for operators and tests)."""
        import ray
        return {"board": self.board, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "cpus": sorted(os.sched_getaffinity(0)), "model": self.model, "load_s": self.load_s,
                "rss_mb": _rss_mb(),
                **self.server.worker.stats()}

    async def __del__(self):
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            await lifespan.shutdown()


# -- the ingress ------------------------------------------------------------------------------

def _retryable(exc: BaseException) -> bool:
    """A failure of the board or of the way to it (not of the request): worth another board."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex
    if isinstance(exc, (sex.BackPressureError, sex.DeploymentUnavailableError, sex.ReplicaUnavailableError)):
        return True
    if isinstance(exc, (rex.TaskCancelledError, rex.RayTaskError)):
        return False
    return isinstance(exc, rex.RayError)


def _unavailable(message: str) -> tuple[dict, dict]:
    """The 503 (OpenAI's error shape, ``Retry-After``) as ASGI messages."""
    from .protocol import APIError
    body = json.dumps(APIError(503, message, code="board_unavailable").body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(RETRY_AFTER_S).encode())]
    return ({"type": "http.response.start", "status": 503, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class Ingress:
    """The HTTP entry: every request to a board replica, retried once on another when its board
    fails before answering (the ``ingress`` deployment, an ASGI app)."""

    def __init__(self, boards):
        self.boards = boards.options(stream=True)
        self.retried = 0
        self.unavailable = 0

    def counts(self) -> dict[str, int]:
        """Requests sent once more after their board failed, and those answered 503."""
        return {"retried": self.retried, "unavailable": self.unavailable}

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):     # a function: servers take a bound method for ASGI 2
            await self._asgi(scope, receive, send)
        return app

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                from .protocol import APIError
                resp = APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large").response()
                await resp(scope, receive, send)
                return
            if not msg.get("more_body", False):
                break
        client = scope.get("client")
        req = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
               "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], "body": b"".join(chunks),
               "client": tuple(client) if client else None}
        for attempt in (1, 2):
            started, sse = False, False
            gen = self.boards.forward.remote(req)
            try:
                async for msg in gen:
                    if msg["type"] == "http.response.start":
                        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                  for k, v in msg.get("headers", []))
                    await send(msg)
                    started = True
                return
            except Exception as e:
                if not _retryable(e):
                    raise
                what = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                if started:
                    log.warning("%s %s: the board failed mid-answer (%s)", req["method"], req["path"], what)
                    tail = b""
                    if sse:
                        err = {"error": {"message": "the board serving this answer failed; retry the request",
                                         "type": "server_error", "param": None, "code": "board_unavailable"}}
                        tail = f"data: {json.dumps(err)}\n\n".encode()
                    with contextlib.suppress(Exception):
                        await send({"type": "http.response.body", "body": tail, "more_body": False})
                    return
                if attempt == 1:
                    self.retried += 1
                    log.warning("%s %s: the board failed before answering (%s); sending it once more",
                                req["method"], req["path"], what)
                    continue
                self.unavailable += 1
                log.warning("%s %s: failed twice (%s); 503", req["method"], req["path"], what)
                for m in _unavailable("no board could take the request just now (one failed); retry"):
                    await send(m)
                return
            finally:
                gen.cancel()


# -- bringing it up ---------------------------------------------------------------------------

def build_app(spec: dict):
    """The Ray Serve application for a fleet spec (:func:`fleet_spec`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    boards = spec["boards"]
    slots = max(b["slots"] for b in boards.values())
    board_dep = serve.deployment(
        BoardReplica, name="boards", num_replicas=len(boards),
        # a few waiting on the board so a freed slot is taken at once; the rest wait in the router
        max_ongoing_requests=2 * slots,
        ray_actor_options={"num_cpus": min(len(b["cpus"]) for b in boards.values()), "resources": {RESOURCE: 1}},
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0, graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=2 * len(boards),
        request_router_config=RequestRouterConfig(
            request_router_class="rosenblatt.serve.fleet_router.SlotRouter",
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S, request_routing_stats_timeout_s=5.0),
    )
    ingress_dep = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                                   max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},
                                   graceful_shutdown_timeout_s=5.0)
    return ingress_dep.bind(board_dep.bind(spec))


def check_nodes(fleet: Fleet) -> None:
    """Every board of the fleet has a live Ray node advertising its resources (else one line)."""
    import ray
    have: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                have[k] = have.get(k, 0) + v
    for name in fleet.boards:
        for res in (board_resource(name), RESOURCE):
            if have.get(res, 0) < 1:
                raise FleetDeployError(
                    f"board {name}: no live Ray node advertises the resource {res!r}; run the board's "
                    f"`ray start` command from `rosenblatt fleet plan {fleet.path or fleet.name}` on it")
        have[RESOURCE] -= 1


def _failure(status) -> str | None:
    """The one-line reason a board replica gave, from Ray Serve's application status."""
    app = status.applications.get(APP_NAME)
    if app is None:
        return None
    texts = [app.message or ""] + [d.message or "" for d in app.deployments.values()]
    for text in texts:
        for line in text.splitlines():
            m = re.search(r"BoardLoadError: (.+)$", line)
            if m:
                return m.group(1).strip()
    return None


def deploy(fleet: Fleet, host: str, port: int, api_key: str | None = None, timeout: float = 600.0) -> str:
    """Deploy the fleet on the connected Ray cluster; return the endpoint's URL once every board
    serves. A board that cannot start is a :class:`FleetDeployError` naming it (the half-deployed
    application is deleted first); so is a board whose Ray node is missing, before anything is
    deployed."""
    from ray import serve
    from .app import url_for
    check_nodes(fleet)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve._run(build_app(fleet_spec(fleet, api_key)), name=APP_NAME, route_prefix="/", _blocking=False)
    deadline = time.monotonic() + timeout
    while True:
        st = serve.status()
        app = st.applications.get(APP_NAME)
        state = str(getattr(app, "status", "")) if app is not None else ""
        if state.endswith("RUNNING") and "NOT_STARTED" not in state:
            return url_for(host, port)
        reason = _failure(st)
        if reason or state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if reason:
                raise FleetDeployError(reason)
            msg = " ".join(" ".join([app.message or ""] + [f"{n}: {d.message}" for n, d in app.deployments.items()
                                                           if d.message]).split())[:400] if app is not None else ""
            raise FleetDeployError(f"fleet {fleet.name}: " + ("deployment failed" if state.endswith("DEPLOY_FAILED")
                                                              else f"not serving after {timeout:g} s")
                                   + (f": {msg}" if msg else ""))
        time.sleep(0.5)


def serve_fleet(fleet: Fleet, api_key: str | None = None, address: str | None = None, on_ready=None,
                timeout: float = 600.0) -> None:
    """``rosenblatt serve --fleet``: connect to the fleet's Ray cluster (``address``, else
    $RAY_ADDRESS, else the head's address from the fleet file), deploy, serve until Ctrl-C, then
    take the application and Ray Serve down (the cluster itself stays)."""
    import ray
    from ray import serve
    address = address or os.environ.get("RAY_ADDRESS") or fleet.ray_address
    logging.getLogger("ray.serve").setLevel(logging.WARNING)     # its progress lines, not ours
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise FleetDeployError(f"cannot reach the fleet's Ray cluster at {address}: {' '.join(str(e).split())}") from None
    try:
        url = deploy(fleet, fleet.http.host, fleet.http.port, api_key=api_key, timeout=timeout)
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()


def plan(fleet: Fleet, fleet_path: str | None = None) -> list[str]:
    """The commands that bring the fleet up: ``ray start`` on each board (head first), then
    ``rosenblatt serve --fleet`` on the head. Ray's own processes are pinned to the A55 cores
    (the replica pins itself to ``serve.cpus``); ``--num-cpus`` is the board's serving cores."""
    head = fleet.boards[fleet.head].address
    order = [fleet.head] + [n for n in fleet.boards if n != fleet.head]
    lines = []
    for name in order:
        board = fleet.members[name]
        addr = fleet.boards[name].address
        resources = json.dumps({RESOURCE: 1, board_resource(name): 1})
        pin = f"taskset -c {cpu_list(board.cpu.a55)} " if board.cpu.a55 else ""
        where = (f"--head --port={fleet.ray_port} --include-dashboard=false" if name == fleet.head
                 else f"--address={head}:{fleet.ray_port}")
        lines.append(f"# {name}{' (head)' if name == fleet.head else ''} at {addr}: serves "
                     f"{board.models.files[board.serve.model]} on CPUs {cpu_list(board.serve.cpus)}")
        lines.append(f"RAY_USAGE_STATS_ENABLED=0 {pin}ray start {where} --node-ip-address={addr} "
                     f"--num-cpus={len(board.serve.cpus)} --resources='{resources}' --disable-usage-stats")
    lines.append(f"# then, on {fleet.head}:")
    lines.append(f"rosenblatt serve --fleet {fleet_path or fleet.path or fleet.name + '.yaml'}")
    return lines


__all__ = ["APP_NAME", "BoardLoadError", "BoardReplica", "FleetDeployError", "Ingress", "RESOURCE", "board_resource",
           "build_app", "check_nodes", "deploy", "fleet_spec", "plan", "serve_fleet"]
