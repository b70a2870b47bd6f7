"""One engine, one thread: generations run one after another on :class:`EngineWorker`, their
pieces handed to the requests' event loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from ..generate import GenerationResponse
from .protocol import APIError, UsageBody


log = logging.getLogger("rosenblatt.serve")

#: at most this many requests wait for the engine; more get 503
DEFAULT_MAX_QUEUE = 64
#: a request that waited this many seconds for the engine gets 503 instead of running
DEFAULT_QUEUE_TIMEOUT = 600.0

# -- the worker thread ------------------------------------------------------------------------

@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""          # "stop", "length" or "cancelled"

    def openai(self) -> UsageBody:
        return UsageBody(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens)


class Job:
    """One generation: ``start(engine)`` returns the engine's piece iterator (validating eagerly)."""

    def __init__(self, start: Callable[[Any], Iterator[GenerationResponse]], loop: asyncio.AbstractEventLoop):
        self.start = start
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.queued_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, value: Any = None) -> None:
        """Called on the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:                 # the event loop is gone (shutdown): nobody listens any more
            self.cancelled.set()

    async def next(self) -> tuple[str, Any]:
        return await self.events.get()


class EngineWorker:
    """Runs every generation of one engine on one thread, first come first served."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT):
        self.engine = engine
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.timed_out = 0       # jobs that waited longer than queue_timeout
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self.served = 0          # jobs run to their end (stop or length)
        self.cancelled = 0       # jobs stopped or skipped because their client went away
        self.failed = 0          # jobs the engine refused or failed
        self.last = Usage()      # the last job that ran on the engine

    # event-loop side
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._main, name="rosenblatt-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and everything queued; wait for the thread to end."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post("cancelled")
        if self._current is not None:
            self._current.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, start: Callable[[Any], Iterator[str]]) -> Job:
        self.start()                          # no-op while the thread runs
        if self._jobs.qsize() >= self.max_queue:
            raise APIError(503, f"too many requests waiting ({self.max_queue}); try again later",
                           code="queue_full")
        job = Job(start, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def stats(self) -> dict:
        return {"served": self.served, "cancelled": self.cancelled, "failed": self.failed, "timed_out": self.timed_out,
                "queued": self.queued, "busy": self.busy, "last": asdict(self.last)}

    # worker-thread side
    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():      # its client left while it was queued
                self.cancelled += 1
                job.post("cancelled")
                continue
            waited = time.monotonic() - job.queued_at
            if waited > self.queue_timeout:
                self.timed_out += 1
                job.post("error", APIError(503, f"waited {waited:.0f} s for the model, more than the server's "
                                                f"{self.queue_timeout:g} s; try again later", code="queue_timeout"))
                continue
            self._current = job
            try:
                self._run(job)
            except Exception as e:           # never let the one engine thread die
                log.exception("worker failed")
                self.failed += 1
                job.post("error", e)
            finally:
                self._current = None

    def _run(self, job: Job) -> None:
        engine = self.engine
        try:
            pieces = job.start(engine)
        except Exception as e:               # refused before generating: bad prompt, template, ...
            self.failed += 1
            job.post("error", e)
            return
        job.post("started")
        st = None
        try:
            while not job.cancelled.is_set():
                try:
                    r = next(pieces)
                except StopIteration:
                    break
                st = r.stats
                if r.text:
                    job.post("piece", r.text)
        except Exception as e:               # a failure while decoding: a bug, never the client's fault
            log.exception("generation failed")
            with contextlib.suppress(Exception):
                pieces.close()
            engine.reset()                    # the cache may be half-updated
            self.failed += 1
            job.post("error", e)
            return
        finally:
            pieces.close()                    # stops the engine's generator (no-op when it ended)
        if job.cancelled.is_set():
            self.cancelled += 1
            usage = Usage(st.prompt_tokens if st else 0, st.generated_tokens if st else 0, "cancelled")
        else:
            self.served += 1
            usage = Usage(st.prompt_tokens, st.generated_tokens, st.finish_reason)
        self.last = usage
        job.post("done", usage)

