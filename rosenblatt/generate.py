"""Generation: from a prompt's token ids to streamed responses.

``stream_generate`` is the loop of one generation (``Engine.stream``/``stream_chat``, the CLI,
``bench``): it takes tokens from :func:`generate_step`, turns them into text with a
:class:`TextStream` (streaming detokenizer, stop strings held back until they cannot match) and
yields one :class:`GenerationResponse` per generated token, then a last one with the finish
reason and whatever text was held back. Each response carries the running
:class:`GenerationStats`, so a consumer never reads the engine's state afterwards.
:class:`BatchGenerator` runs several generations at once (the server): the same text streams,
with the prompts' chunks and one batched decode step per round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .models.kv_cache import KVCache
from .sampling import Sampler
from .text import grammar


@dataclass
class GenerationStats:
    """Counts and timings of one generation."""

    prompt_tokens: int = 0          # tokens of the prompt
    cached_tokens: int = 0          # of those, reused from the KV cache (not evaluated again)
    generated_tokens: int = 0
    prefill_s: float = 0.0          # evaluating the new prompt tokens (= time to first token)
    decode_s: float = 0.0
    finish_reason: str = ""         # "stop" (end-of-generation token or stop string) or "length"
    tokens: list[int] = field(default_factory=list)   # generated ids (an end-of-generation id included)

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of the prefill; each later one costs one decode step
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    def summary(self) -> str:
        new = self.prompt_tokens - self.cached_tokens
        return (f"prompt {self.prompt_tokens} tok ({new} new) {self.prefill_tok_s:.1f} tok/s | "
                f"generated {self.generated_tokens} tok {self.decode_tok_s:.1f} tok/s")


@dataclass(frozen=True)
class GenerationResponse:
    """One step of :func:`stream_generate`."""

    text: str                       # new text ("" while a stop string might be starting)
    token: int | None               # the generated id; None in the last response
    logprob: float | None           # log-probability of ``token`` under the model (logprobs=True)
    finish_reason: str | None       # None until the last response: then "stop" or "length"
    stats: GenerationStats          # the running counts and timings (one object, updated)
    top_logprobs: tuple[tuple[int, float], ...] = ()   # (id, log-probability), most likely first


@dataclass
class StopScanner:
    """Holds back streamed text that might be the start of a stop string."""

    stops: tuple[str, ...]
    buffer: str = ""
    hit: bool = field(default=False)

    def feed(self, text: str) -> str:
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.hit = self.buffer[:cut], "", True
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], in float64."""
    x = logits.astype(np.float64)
    top = x.max()
    return float(x[token] - top - np.log(np.exp(x - top).sum()))


def top_logprobs(logits: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` most likely tokens as (id, log-probability), most likely first (ties: lower id),
    each value computed as :func:`logprob` computes it."""
    x = logits.astype(np.float64)
    top = x.max()
    lp = x - top - np.log(np.exp(x - top).sum())
    n = min(n, lp.size)
    idx = np.argpartition(-lp, n - 1)[:n] if n < lp.size else np.arange(lp.size)
    idx = idx[np.lexsort((idx, -lp[idx]))]
    return tuple((int(i), float(lp[i])) for i in idx)


def sampler_for(tokenizer, params) -> Sampler:
    """The sampler of one generation with ``params`` (a GenerationParams): its sampling
    settings, and its grammar's :class:`~rosenblatt.text.grammar.Constraint` if it has one."""
    return Sampler(params.sampling(), grammar.constraint(tokenizer, params))


def generate_step(engine, ids: Sequence[int], sampler, stats: GenerationStats) -> Iterator[tuple[int, np.ndarray]]:
    """(token, the logits it was sampled from), one at a time after the prompt ``ids``: the
    prompt is brought into the cache first (:meth:`Engine.prefill`, reusing the cached prefix;
    its time goes to ``stats.prefill_s``), and each next token costs one decode step, run only
    when the consumer asks for it (so the last token taken is never evaluated)."""
    logits = _timed_prefill(engine, ids, stats)
    history = list(ids)
    while True:
        token = sampler(logits, history)
        yield token, logits
        history.append(token)
        logits = engine.decode(token)


class TextStream:
    """Sampled tokens in, text out: the streaming detokenizer, the stop strings and the end
    conditions of one generation. :func:`stream_generate` and :class:`BatchGenerator` push each
    sampled token into one; ``done`` says when the generation is over, :meth:`finish` gives the
    last response (what was held back, the finish reason)."""

    def __init__(self, tokenizer, stats: GenerationStats, max_new_tokens: int, stops: tuple[str, ...] = (),
                 ignore_eos: bool = False, logprobs: bool = False, top: int = 0):
        self.tok, self.stats, self.max_new_tokens = tokenizer, stats, max_new_tokens
        self.stops, self.ignore_eos, self.logprobs, self.top = stops, ignore_eos, logprobs, top
        self.detok = tokenizer.streaming()
        self.scanner = StopScanner(stops)
        stats.finish_reason = "length"
        self.done = max_new_tokens <= 0

    def push(self, token: int, logits: np.ndarray) -> GenerationResponse | None:
        """One sampled token (and the logits it came from): its response, None for an
        end-of-generation token (which ends the generation unless ``ignore_eos``)."""
        st = self.stats
        st.generated_tokens += 1
        st.tokens.append(token)
        if self.tok.is_eog(token) and not self.ignore_eos:
            st.finish_reason = "stop"
            self.done = True
            return None
        piece = self.detok.add(token)
        if self.stops:
            piece = self.scanner.feed(piece)
        r = GenerationResponse(piece, token, logprob(logits, token) if self.logprobs else None, None, st,
                               top_logprobs(logits, self.top) if self.logprobs and self.top else ())
        if self.scanner.hit:
            st.finish_reason = "stop"
            self.done = True
        elif st.generated_tokens >= self.max_new_tokens:
            self.done = True
        return r

    def finish(self, reason: str | None = None) -> GenerationResponse:
        """The last response: the text held back and the finish reason (``reason`` overrides
        it, e.g. "cancelled")."""
        if reason is not None:
            self.stats.finish_reason = reason
        tail = self.detok.flush()
        sc = self.scanner
        tail = sc.feed(tail) + sc.flush() if self.stops and not sc.hit else ("" if sc.hit else tail)
        return GenerationResponse(tail, None, None, self.stats.finish_reason, self.stats)


def stream_generate(engine, ids: Sequence[int], sampler, max_new_tokens: int, stops: tuple[str, ...] = (),
                    ignore_eos: bool = False, logprobs: bool = False, top: int = 0) -> Iterator[GenerationResponse]:
    """Generate after ``ids`` (a validated, non-empty prompt that fits the context with
    ``max_new_tokens``) with ``sampler`` until an end-of-generation token (unless
    ``ignore_eos``), one of ``stops`` (not included in the text) or ``max_new_tokens``;
    ``engine.stats`` is the responses' stats object."""
    engine.stats = st = GenerationStats(prompt_tokens=len(ids))
    text = TextStream(engine.tokenizer, st, max_new_tokens, stops, ignore_eos, logprobs, top)
    steps = generate_step(engine, ids, sampler, st)
    t1 = None
    try:
        while not text.done:
            token, logits = next(steps)
            if t1 is None:
                t1 = time.perf_counter()
            r = text.push(token, logits)
            if r is not None:
                yield r
        if t1 is None:                      # max_new_tokens = 0: the prompt is still evaluated
            _timed_prefill(engine, ids, st)
            t1 = time.perf_counter()
        last = text.finish()
        st.decode_s = time.perf_counter() - t1
        yield last
    finally:
        steps.close()
        if t1 is not None and not st.decode_s:
            st.decode_s = time.perf_counter() - t1


class _Running:
    """One generation inside a :class:`BatchGenerator`."""

    def __init__(self, uid: int, slot: int, cache, ids: list[int], sampler, text: TextStream):
        self.uid, self.slot, self.cache, self.ids = uid, slot, cache, ids
        self.sampler, self.text = sampler, text
        self.history = list(ids)
        self.filled = 0                 # prompt positions in the cache (the last one runs alone)
        self.next: int | None = None    # the sampled token the next decode step evaluates
        self.t0 = time.perf_counter()
        self.t1: float | None = None    # when the first token was sampled


class BatchGenerator:
    """Several generations on one engine at once (continuous batching): each has a slot of one
    pooled KV cache (:meth:`LlamaModel.new_caches`), its own sampler, stop strings and limits.

    :meth:`insert` starts one (when :attr:`free` > 0), :meth:`remove` stops one, and each
    :meth:`step` runs at most one prompt chunk of the longest-waiting new generation (so a new
    prompt delays the running streams by one chunk at most) and then one decode step for every
    generation that has a token to evaluate, all rows in one call (each weight row read once for
    all of them). A generation's tokens are the ones it would get alone: its prompt goes through
    the same chunks as :meth:`Engine.prefill` on an empty cache, and a batched decode row is the
    same bits as decoding it alone (``forward_batch``)."""

    def __init__(self, engine, slots: int, prefill_chunk: int | None = None, prefixes: int = 2):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if prefixes < 0:
            raise ValueError(f"prefixes must be >= 0, got {prefixes}")
        self.engine = engine
        self.model = engine.model
        self.caches = self.model.new_caches(slots)
        self.chunk = prefill_chunk or engine.prefill_chunk
        self._free = list(range(slots))
        self._running: dict[int, _Running] = {}
        self._uid = 0
        #: per slot, the prompt tokens whose keys and values it holds in whole prefill chunks
        #: (what a later prompt starting with the same tokens reuses: the same chunks, the same bits)
        self._kept: list[list[int]] = [[] for _ in range(slots)]
        self.reused_tokens = 0          # prompt tokens taken from a slot instead of computed
        #: the prefix cache beyond the slots: when a slot is given to an unrelated prompt, what it
        #: kept is copied into the least recently used of ``prefixes`` spare caches (plain caches
        #: only: a sliding-window cache cannot be copied), from where a later prompt takes it back
        self._plain = all(type(c) is KVCache for c in self.caches)     # copyable between slots
        self._spares = self.model.new_caches(prefixes) if prefixes and self._plain else []
        self._spare_kept: list[list[int]] = [[] for _ in self._spares]
        self._spare_used: list[float] = [0.0 for _ in self._spares]

    @property
    def slots(self) -> int:
        return len(self.caches)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def kv_bytes(self) -> int:
        """Bytes reserved for the slots' keys and values and the spare prefixes' (committed as
        positions are written)."""
        return sum(c.nbytes for c in self.caches + self._spares)

    @property
    def kv_in_use(self) -> int:
        """Bytes of keys and values the running generations hold now."""
        return sum(r.cache.nbytes // r.cache.n_ctx * r.cache.length for r in list(self._running.values()))

    def insert(self, ids: Sequence[int], params) -> int:
        """Start generating after ``ids`` (validated, fitting the context with
        ``params.max_new_tokens``) with ``params`` (a GenerationParams): its id."""
        if not self._free:
            raise RuntimeError("no free slot")
        ids = [int(t) for t in ids]
        sampler = sampler_for(self.engine.tokenizer, params)        # may refuse the grammar: before any slot is taken
        # the prefix cache: the free slot holding the longest reusable prefix of this prompt is
        # truncated to it; a longer one held by a running generation's slot (its whole prompt
        # chunks do not change while it runs) or by a spare is copied into a free slot
        slot, keep = max(((s, self._reusable(ids, s)) for s in self._free), key=lambda x: x[1])
        source, spare, copy = None, None, keep
        if self._plain:
            for r in self._running.values():
                k = self._reusable(ids, r.slot)
                if k > copy:
                    source, spare, copy = self.caches[r.slot], None, k
            for s, kept in enumerate(self._spare_kept):
                k = self._common(ids, kept)
                if k > copy:
                    source, spare, copy = self._spares[s], s, k
        if source is not None or (keep == 0 and self._spares):   # the slot's own prefix is replaced:
            slot = min(self._free, key=lambda s: len(self._kept[s]))    # the one with the least to lose,
            self._save(slot, spare)                                     # kept in a spare first
        cache = self.caches[slot]
        if source is not None:
            cache.copy_from(source, copy)
            if spare is not None:
                self._spare_used[spare] = time.monotonic()
            keep = copy
        else:
            keep = min(keep, cache.length, cache.reusable(keep)) // self.chunk * self.chunk
            cache.truncate(keep) if keep else cache.reset()
        self._free.remove(slot)
        self._kept[slot] = ids[:keep]
        uid, self._uid = self._uid, self._uid + 1
        st = GenerationStats(prompt_tokens=len(ids), cached_tokens=cache.length)
        text = TextStream(self.engine.tokenizer, st, params.max_new_tokens, params.stop, params.ignore_eos,
                          params.logprobs, params.top_logprobs)
        run = _Running(uid, slot, cache, ids, sampler, text)
        run.filled = cache.length
        self.reused_tokens += cache.length
        self._running[uid] = run
        return uid

    def _reusable(self, ids: list[int], slot: int) -> int:
        """Positions of slot ``slot`` that a prompt ``ids`` can reuse exactly: the common prefix
        of what the slot keeps, in whole prefill chunks, leaving the prompt's last token to run."""
        return self._common(ids, self._kept[slot])

    def _common(self, ids: list[int], kept: list[int]) -> int:
        n = 0
        limit = min(len(kept), len(ids) - 1)
        while n < limit and kept[n] == ids[n]:
            n += 1
        return n // self.chunk * self.chunk

    def _save(self, slot: int, keep_spare: int | None) -> None:
        """Copy what slot ``slot`` keeps into the least recently used spare but ``keep_spare``
        (unless a spare already holds it or more of it)."""
        kept = self._kept[slot]
        others = [i for i in range(len(self._spares)) if i != keep_spare]
        if not kept or not others or any(sk[:len(kept)] == kept for sk in self._spare_kept):
            return
        s = min(others, key=lambda i: self._spare_used[i])
        self._spares[s].copy_from(self.caches[slot], len(kept))
        self._spare_kept[s] = list(kept)
        self._spare_used[s] = time.monotonic()

    def remove(self, uid: int, reason: str = "cancelled") -> GenerationResponse:
        """Stop generation ``uid`` now: its last response (finish reason ``reason``)."""
        return self._end(self._running[uid], reason)

    def _end(self, run: _Running, reason: str | None = None) -> GenerationResponse:
        del self._running[run.uid]
        self._free.append(run.slot)
        st = run.text.stats
        if run.t1 is not None:
            st.decode_s = time.perf_counter() - run.t1
        return run.text.finish(reason)

    def _sampled(self, run: _Running, logits: np.ndarray, out: list) -> None:
        try:
            token = run.sampler(logits, run.history)
        except ValueError as e:         # this generation's grammar failed (or allows nothing): it alone ends
            self._end(run, "error")
            out.append((run.uid, e))
            return
        run.history.append(token)
        if run.t1 is None:
            run.t1 = time.perf_counter()
            run.text.stats.prefill_s = run.t1 - run.t0
        r = run.text.push(token, logits)
        if r is not None:
            out.append((run.uid, r))
        if run.text.done:
            out.append((run.uid, self._end(run)))
        else:
            run.next = token

    def _share_prompt(self, run: _Running, others: list[_Running]) -> None:
        """Waiting generations with the same prompt (the choices of one request, or the same
        prompt twice) copy its keys and values instead of computing them again; each then runs
        the prompt's last token itself, as it would alone."""
        n = len(run.ids)
        for other in others:
            if other.filled < n - 1 and other.ids == run.ids and not other.text.done and \
                    type(other.cache) is type(run.cache):
                try:
                    other.cache.copy_from(run.cache, n - 1)
                except ValueError:
                    continue
                other.filled = n - 1
                self._kept[other.slot] = list(self._kept[run.slot])

    def step(self) -> list[tuple[int, GenerationResponse | Exception]]:
        """One round: (generation id, response) pairs, a generation's last one with its finish
        reason (after which the id is gone and its slot free); a generation whose sampling failed
        (its grammar) gets the exception instead, as its last."""
        out: list[tuple[int, GenerationResponse]] = []
        model = self.model
        waiting = [r for r in self._running.values() if r.t1 is None]
        if waiting:
            run = waiting[0]
            n = len(run.ids)
            if run.text.done:                          # max_new_tokens 0: the prompt is still read
                model.forward(np.asarray(run.ids, np.int64), run.cache, logits="none")
                out.append((run.uid, self._end(run)))
            elif run.filled < n - 1:
                end = min(run.filled + self.chunk, n - 1)
                model.forward(np.asarray(run.ids[run.filled:end], np.int64), run.cache, logits="none")
                run.filled = end
                self._kept[run.slot] = run.ids[:end // self.chunk * self.chunk]
                if end == n - 1:
                    self._share_prompt(run, waiting[1:])
            else:
                start = run.cache.length
                logits = model.forward(np.asarray(run.ids[-1:], np.int64), run.cache, logits="last")
                self.engine.check_logits(logits, start)
                run.filled = n
                self._sampled(run, logits[0], out)
        ready = [r for r in self._running.values() if r.next is not None]
        if ready:
            start = min(r.cache.length for r in ready)
            logits = model.forward_batch([r.next for r in ready], [r.cache for r in ready])
            self.engine.check_logits(logits, start)
            for run, row in zip(ready, logits):
                run.next = None
                self._sampled(run, row, out)
        return out


def _timed_prefill(engine, ids, stats: GenerationStats) -> np.ndarray:
    """:meth:`Engine.prefill`, its seconds in ``stats.prefill_s``."""
    t0 = time.perf_counter()
    logits = engine.prefill(ids, stats)
    stats.prefill_s = time.perf_counter() - t0
    return logits
