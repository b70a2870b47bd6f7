"""Several threads, one engine: :class:`Scheduler` batches their generations.

An :class:`~rosenblatt.engine.Engine` holds one KV cache and generates one thing at a time; two
threads calling it at once would share that cache. A scheduler owns a thread that runs the
engine's :class:`~rosenblatt.generate.BatchGenerator` (the server's continuous batching): each
caller's generation takes a slot, joins and leaves between decode steps, and every decode step
serves all of them with one pass over the weights. A caller gets the same tokens it would get
alone (the batch is bit-identical to a single decode); calls beyond ``parallel`` wait their turn.

    >>> with engine.scheduler(parallel=4) as s:           # doctest: +SKIP
    ...     answers = list(pool.map(lambda q: s.chat([{"role": "user", "content": q}]), questions))

Stopping to read a :meth:`Scheduler.responses` iterator (``close()``, or dropping it) frees its
slot at the next step. While a scheduler runs, use it rather than the engine's own generation
methods: they would touch the engine's cache from another thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence

from .generate import BatchGenerator, GenerationResponse
from .params import GenerationParams

_STOP = object()


class _Request:
    def __init__(self, ids: list[int], params: GenerationParams):
        self.ids, self.params = ids, params
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()


class Scheduler:
    """Generations from any thread through one :class:`BatchGenerator` (``parallel`` slots)."""

    def __init__(self, engine, parallel: int = 4):
        self.engine = engine
        self.batch = BatchGenerator(engine, parallel)
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="rosenblatt-scheduler", daemon=True)
        self._closed = threading.Event()
        self._lock = threading.Lock()           # a request is either queued before close or refused
        self._thread.start()

    # caller side
    def responses(self, prompt: str | Sequence[int], params: GenerationParams | None = None, *,
                  add_special: bool = True, **overrides) -> Iterator[GenerationResponse]:
        """As :meth:`Engine.responses` (the prompt and parameters checked here, on the caller's thread)."""
        return self._submit(*self.engine.prepare(prompt, params, add_special=add_special, **overrides))

    def chat_responses(self, messages: Sequence[Mapping], params: GenerationParams | None = None,
                       tools: Sequence[Mapping] | None = None, **overrides) -> Iterator[GenerationResponse]:
        """As :meth:`Engine.chat_responses`."""
        return self._submit(*self.engine.prepare_chat(messages, params, tools=tools, **overrides))

    def generate(self, prompt: str | Sequence[int], params: GenerationParams | None = None, **kwargs) -> str:
        return "".join(r.text for r in self.responses(prompt, params, **kwargs))

    def chat(self, messages: Sequence[Mapping], params: GenerationParams | None = None, **kwargs) -> str:
        return "".join(r.text for r in self.chat_responses(messages, params, **kwargs))

    def _submit(self, ids: list[int], params: GenerationParams) -> Iterator[GenerationResponse]:
        req = _Request(ids, params)
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the scheduler is closed")
            self._inbox.put(req)
        return self._read(req)

    @staticmethod
    def _read(req: _Request) -> Iterator[GenerationResponse]:
        try:
            while True:
                r = req.out.get()
                if isinstance(r, BaseException):
                    raise r
                yield r
                if r.finish_reason is not None:
                    return
        finally:
            req.cancelled.set()             # a no-op once finished; frees the slot if left early

    def close(self, timeout: float = 30.0) -> None:
        """Stop at the next step: what runs ends with finish reason "cancelled", what waits gets
        a RuntimeError; waits for the thread."""
        with self._lock:
            self._closed.set()
            self._inbox.put(_STOP)              # wakes the thread if it waits for work
        self._thread.join(timeout)

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the scheduler's thread
    def _stop(self, active: dict) -> None:
        for uid, req in active.items():
            req.out.put(self.batch.remove(uid))
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if req is not _STOP:
                req.out.put(RuntimeError("the scheduler was closed before this generation started"))

    def _main(self) -> None:
        batch, active = self.batch, {}
        while True:
            if self._closed.is_set():
                self._stop(active)
                return
            while batch.free:
                try:
                    req = self._inbox.get(block=not active)
                except queue.Empty:
                    break
                if req is _STOP:
                    break
                if req.cancelled.is_set():
                    continue
                try:
                    active[batch.insert(req.ids, req.params)] = req
                except Exception as e:      # e.g. an unusable grammar: the caller's error
                    req.out.put(e)
            for uid, req in list(active.items()):
                if req.cancelled.is_set():
                    batch.remove(uid)
                    del active[uid]
            if not active:
                continue
            try:
                results = batch.step()
            except Exception as e:
                for uid, req in list(active.items()):
                    try:
                        batch.remove(uid)
                    except Exception:
                        pass
                    req.out.put(e)
                active.clear()
                continue
            for uid, r in results:
                req = active.get(uid)
                if req is None:
                    continue
                req.out.put(r)
                if isinstance(r, Exception) or r.finish_reason is not None:
                    del active[uid]
