"""An OpenAI-compatible HTTP server for one loaded :class:`~rosenblatt.engine.Engine`.

``python -m rosenblatt serve --model PATH`` (or :func:`create_app` / :func:`serve` from Python)
offers ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain
JSON or Server-Sent Events with ``"stream": true``) and ``GET /health``, built on starlette and
uvicorn.

Design:

* **One engine, one worker thread.** The engine is not thread-safe, so every generation runs on
  a single :class:`EngineWorker` thread fed by a FIFO :class:`queue.Queue`. Requests are served
  one after another in the order their bodies arrived; the event loop never touches the engine
  and stays free for ``/health``, ``/v1/models`` and for accepting more requests.
* **Events back to the event loop.** The worker pushes ``("started" | "piece" | "done" |
  "error" | "cancelled", value)`` events into the request's own :class:`asyncio.Queue` with
  ``loop.call_soon_threadsafe``; a request only ever sees its own pieces, so outputs cannot mix.
* **Cancellation.** Each job carries a :class:`threading.Event`. A client that disconnects
  (while queued, while waiting for a non-streamed answer, or mid-stream) sets it; the worker
  checks it before decoding each further token and closes the engine's generator, so decoding
  stops at once (at most the token in progress is finished). A job cancelled while still
  queued is skipped without touching the engine.
* **Errors.** Validation happens before a job is queued; what only the engine can check (the
  prompt's length against the context, the chat template) is checked when the job starts and
  answered as a 4xx before any streamed byte is sent. Every error body has OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}``; no traceback reaches a client.
"""

from .app import DEFAULT_MAX_QUEUE, MAX_BODY_BYTES, Server, create_app, is_loopback, make_server, url_for
from .protocol import APIError
from .worker import EngineWorker

__all__ = ["APIError", "DEFAULT_MAX_QUEUE", "EngineWorker", "MAX_BODY_BYTES", "Server", "create_app",
           "is_loopback", "make_server", "url_for"]
