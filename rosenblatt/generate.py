"""Generation: from a prompt's token ids to streamed responses.

``stream_generate`` is the loop every caller runs (``Engine.stream``/``stream_chat``, the CLI,
the server, ``bench``): it takes tokens from :func:`generate_step`, turns them into text
(streaming detokenizer, stop strings held back until they cannot match) and yields one
:class:`GenerationResponse` per generated token, then a last one with the finish reason and
whatever text was held back. Each response carries the running :class:`GenerationStats`, so a
consumer never reads the engine's state afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


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


def stream_generate(engine, ids: Sequence[int], sampler, max_new_tokens: int, stops: tuple[str, ...] = (),
                    ignore_eos: bool = False, logprobs: bool = False) -> Iterator[GenerationResponse]:
    """Generate after ``ids`` (a validated, non-empty prompt that fits the context with
    ``max_new_tokens``) with ``sampler`` until an end-of-generation token (unless
    ``ignore_eos``), one of ``stops`` (not included in the text) or ``max_new_tokens``;
    ``engine.stats`` is the responses' stats object."""
    tok = engine.tokenizer
    engine.stats = st = GenerationStats(prompt_tokens=len(ids))
    detok = tok.streaming()
    scanner = StopScanner(stops)
    st.finish_reason = "length"
    steps = generate_step(engine, ids, sampler, st)
    t1 = None
    try:
        for i in range(max_new_tokens):
            token, logits = next(steps)
            if t1 is None:
                t1 = time.perf_counter()
            st.generated_tokens += 1
            st.tokens.append(token)
            if tok.is_eog(token) and not ignore_eos:
                st.finish_reason = "stop"
                break
            piece = detok.add(token)
            if stops:
                piece = scanner.feed(piece)
            yield GenerationResponse(piece, token, logprob(logits, token) if logprobs else None, None, st)
            if scanner.hit:
                st.finish_reason = "stop"
                break
        if t1 is None:                      # max_new_tokens = 0: the prompt is still evaluated
            _timed_prefill(engine, ids, st)
            t1 = time.perf_counter()
        tail = detok.flush()
        tail = scanner.feed(tail) + scanner.flush() if stops and not scanner.hit else ("" if scanner.hit else tail)
        st.decode_s = time.perf_counter() - t1
        yield GenerationResponse(tail, None, None, st.finish_reason, st)
    finally:
        steps.close()
        if t1 is not None and not st.decode_s:
            st.decode_s = time.perf_counter() - t1


def _timed_prefill(engine, ids, stats: GenerationStats) -> np.ndarray:
    """:meth:`Engine.prefill`, its seconds in ``stats.prefill_s``."""
    t0 = time.perf_counter()
    logits = engine.prefill(ids, stats)
    stats.prefill_s = time.perf_counter() - t0
    return logits
