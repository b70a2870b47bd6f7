"""One engine, one thread: generations run one after another on :class:`EngineWorker`, their
pieces handed to the requests' event loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from ..generate import BatchGenerator
from .protocol import APIError


log = logging.getLogger("rosenblatt.serve")

#: at most this many requests wait for the engine; more get 503
DEFAULT_MAX_QUEUE = 64
#: a request that waited this many seconds for the engine gets 503 instead of running
DEFAULT_QUEUE_TIMEOUT = 600.0
#: generations served at once (slots of the batch)
DEFAULT_PARALLEL = 4

# -- the worker thread ------------------------------------------------------------------------

@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""          # "stop", "length" or "cancelled"



class Job:
    """One generation: ``start(engine)`` returns its prompt ids and GenerationParams (validating
    them: :meth:`Engine.prepare` / :meth:`Engine.prepare_chat`)."""

    def __init__(self, start: Callable[[Any], tuple[list[int], Any]], loop: asyncio.AbstractEventLoop):
        self.start = start
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token = False         # its time to first token was recorded

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
    """Runs the engine on one thread: up to ``parallel`` generations at once (continuous
    batching through :class:`~rosenblatt.generate.BatchGenerator`), the rest waiting in a FIFO
    queue of at most ``max_queue``. A job joins when a slot is free and leaves when it ends or
    its client goes away; between two rounds of the batch, so no stream waits longer than one
    prompt chunk of a newcomer."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
                 parallel: int = DEFAULT_PARALLEL):
        self.engine = engine
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.parallel = parallel
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._batch: BatchGenerator | None = None
        self._active: dict[int, Job] = {}         # generation id -> its job
        self._stopping = False
        self.served = 0          # jobs run to their end (stop or length)
        self.cancelled = 0       # jobs stopped or skipped because their client went away
        self.failed = 0          # jobs the engine refused or failed
        self.timed_out = 0       # jobs that waited longer than queue_timeout
        self.last = Usage()      # the last job that ended on the engine
        self.peak_running = 0    # the most generations that ran together
        self.rejected = 0        # requests refused because the queue was full
        self.prompt_tokens = 0   # tokens of the prompts of the jobs that ended on the engine
        self.generated_tokens = 0
        self.avg_job_s: float | None = None     # recent mean seconds a served job held its slot
        #: per-job hooks on the worker thread (:class:`~rosenblatt.serve.metrics.ServerMetrics`):
        #: ``admitted(waited_s)``, ``first_token(seconds)``, ``ended(stats)``
        self.metrics = None

    @property
    def batch(self) -> BatchGenerator:
        """The slots (their KV caches are reserved when the worker starts)."""
        if self._batch is None:
            self._batch = BatchGenerator(self.engine, self.parallel)
        return self._batch

    @property
    def alive(self) -> bool:
        """The engine's thread is running (started and not ended)."""
        return self._thread is not None and self._thread.is_alive()

    # event-loop side
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self.batch
            self._stopping = False
            self._thread = threading.Thread(target=self._main, name="rosenblatt-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs and everything queued; wait for the thread to end."""
        self._stopping = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post("cancelled")
        for job in list(self._active.values()):
            job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def running(self) -> int:
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds a refused client should wait before trying again (``Retry-After``): the
        queued jobs' share of the slots times a recent mean job time, or 5 before any job ended."""
        avg = self.avg_job_s
        if avg is None:
            return 5
        return max(1, min(3600, 1 + math.ceil(self.queued * avg / max(1, self.parallel))))

    def submit(self, start: Callable[[Any], tuple[list[int], Any]]) -> Job:
        """Queue a job; ``start(engine)`` gives its prompt ids and GenerationParams (validating)."""
        self.start()                          # no-op while the thread runs
        if self._jobs.qsize() >= self.max_queue:
            self.rejected += 1
            err = APIError(503, f"too many requests waiting ({self.max_queue}); try again later",
                           code="queue_full")
            err.retry_after = self.retry_after()      # answered as a Retry-After header
            raise err
        job = Job(start, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def stats(self) -> dict:
        return {"served": self.served, "cancelled": self.cancelled, "failed": self.failed, "timed_out": self.timed_out,
                "queued": self.queued, "busy": self.busy, "running": len(self._active), "slots": self.parallel,
                "peak_running": self.peak_running, "rejected": self.rejected,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "last": asdict(self.last)}

    # worker-thread side
    def _main(self) -> None:
        batch = self.batch
        while True:
            # admit what the free slots can take; block only when nothing runs
            while batch.free:
                try:
                    job = self._jobs.get(block=not self._active)
                except queue.Empty:
                    break
                if job is None:
                    self._shutdown()
                    return
                self._admit(job)
            if not self._active:
                continue
            for uid, job in list(self._active.items()):      # clients that went away
                if job.cancelled.is_set():
                    self._ended(uid, batch.remove(uid))
            if not self._active:
                continue
            try:
                results = batch.step()
            except Exception as e:           # a failure while generating: a bug, never a client's fault
                log.exception("generation failed")
                for uid in list(self._active):
                    job = self._active.pop(uid)
                    with contextlib.suppress(Exception):
                        batch.remove(uid)
                    self.failed += 1
                    job.post("error", e)
                continue
            for uid, r in results:
                job = self._active.get(uid)
                if job is None:
                    continue
                if isinstance(r, Exception):            # its own grammar failed: it alone ends
                    del self._active[uid]
                    self.failed += 1
                    job.post("error", r)
                    continue
                if not job.first_token:
                    self._first_token(job, r.stats)
                if r.text or r.token is not None:
                    job.post("piece", r)
                if r.finish_reason is not None:
                    self._ended(uid, r)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():      # its client left while it was queued
            self.cancelled += 1
            job.post("cancelled")
            return
        waited = time.monotonic() - job.queued_at
        if waited > self.queue_timeout:
            self.timed_out += 1
            err = APIError(503, f"waited {waited:.0f} s for the model, more than the server's "
                                f"{self.queue_timeout:g} s; try again later", code="queue_timeout")
            err.retry_after = self.retry_after()
            job.post("error", err)
            return
        if self.metrics is not None:
            self.metrics.admitted(waited)
        try:
            ids, params = job.start(self.engine)
            uid = self.batch.insert(ids, params)
        except Exception as e:               # refused before generating: bad prompt, template, ...
            self.failed += 1
            job.post("error", e)
            return
        job.admitted_at = time.monotonic()
        self._active[uid] = job
        self.peak_running = max(self.peak_running, len(self._active))
        job.post("started")

    def _ended(self, uid: int, r) -> None:
        job = self._active.pop(uid)
        st = r.stats
        if r.finish_reason == "cancelled":
            self.cancelled += 1
        else:
            self.served += 1
            took = time.monotonic() - job.admitted_at
            self.avg_job_s = took if self.avg_job_s is None else 0.8 * self.avg_job_s + 0.2 * took
        self.prompt_tokens += st.prompt_tokens
        self.generated_tokens += st.generated_tokens
        if not job.first_token:
            self._first_token(job, st)
        if self.metrics is not None:
            try:
                self.metrics.ended(st)
            except Exception:                # metrics never stop serving
                log.exception("recording metrics failed")
        self.last = Usage(st.prompt_tokens, st.generated_tokens, r.finish_reason)
        job.post("done", self.last)

    def _first_token(self, job: Job, st) -> None:
        """Once per job, when its first token is out: the time from its admission to it."""
        if st.generated_tokens:
            job.first_token = True
            if self.metrics is not None:
                self.metrics.first_token(st.prefill_s)      # from insert to the first sampled token

    def _shutdown(self) -> None:
        for uid in list(self._active):
            self._ended(uid, self.batch.remove(uid))
