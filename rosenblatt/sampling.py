"""Sampler stage: logits of the last position → the next token id.

The design follows mlx-lm's sampler factory (one callable built once from the parameters) and
llama.cpp's default sampler chain. For each call the steps run in this fixed order:

0. **logit bias**: ``logit_bias[id]`` is added to token ``id``'s logit.
1. **penalties** over the last ``repeat_last_n`` tokens of ``history`` (``-1``: all of it, ``0``:
   none). Each *distinct* token of that window is penalised once: a positive logit is divided by
   ``repeat_penalty``, a zero or negative one multiplied by it; then ``count * frequency_penalty
   + presence_penalty`` is subtracted, ``count`` its occurrences in the window (llama.cpp's
   penalties sampler; OpenAI's formula over the same window).
2. **top-k**: keep the ``top_k`` largest logits (``top_k <= 0`` or ``>= vocab``: no-op).
3. **top-p** (nucleus): softmax over the survivors, sort them by probability, keep the shortest
   prefix whose cumulative probability reaches ``top_p`` (the token that crosses is kept, so at
   least one token always survives; ``top_p == 1``: no-op).
4. **min-p**: keep the survivors whose probability is at least ``min_p`` times the largest, i.e.
   ``logit >= max_logit + log(min_p)`` (``min_p == 0``: no-op).
5. **temperature**: divide the surviving logits by ``temperature`` and softmax.
6. **sample** one token from that distribution with the sampler's own
   :class:`numpy.random.Generator` (inverse CDF over the survivors in ascending token-id order
   with a single ``Generator.random()`` draw per call).

As in llama.cpp, top-p and min-p therefore see the temperature-1 distribution; temperature only
reshapes what survives. ``temperature == 0`` is greedy decoding: the repetition penalty is
applied and the arg-max taken (ties → the lowest token id); no random number is consumed.

Ties are broken deterministically everywhere: when top-k or top-p must cut between equal
logits, the lower token id is kept (the order of a stable sort by descending logit).

All steps work on ``float64`` copies; the input array is never modified. Tokens whose logit is
``-inf`` are never candidates. ``NaN`` or ``+inf`` logits, or all ``-inf``, raise
:class:`ValueError`.

The filters are also exposed as pure functions on full-vocabulary logits
(:func:`apply_repeat_penalty`, :func:`top_k_filter`, :func:`top_p_filter`, :func:`min_p_filter`),
each returning a new ``float64`` array with ``-inf`` at the removed tokens, and
:func:`probabilities` gives the exact distribution :class:`Sampler` draws from.

Speed: nothing loops over the vocabulary in Python. Top-k is an ``argpartition``; top-p sorts
only a growing prefix of the candidates (the first 256, as llama.cpp does, then a prefix sized
from the probability still missing) until the cumulative probability reaches ``top_p``, and when min-p is also on it sorts only the min-p
survivors, which is exact because both filters keep a prefix of the same sorted order and the
min-p cut depends only on the maximum logit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from .params import SamplingParams

__all__ = [
    "SamplingParams",
    "Sampler",
    "make_sampler",
    "apply_repeat_penalty",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "temperature_softmax",
    "probabilities",
]

# Top-p sorts at most this many candidates outright; above it, it sorts a growing prefix.
_TOP_P_FULL_SORT = 1024
_TOP_P_FIRST_PREFIX = 256


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _checked(logits) -> np.ndarray:
    """``logits`` as an array, validated (1-D, non-empty, real, no NaN/+inf, not all -inf)."""
    a = np.asarray(logits)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"logits must be a real numeric array, got dtype {a.dtype}")
    if not np.all(a < np.inf):  # one pass catches both NaN and +inf
        nan = np.flatnonzero(np.isnan(a))
        if nan.size:
            raise ValueError(f"logits contain NaN at {nan.size} token id(s), first {nan[:5].tolist()}")
        pinf = np.flatnonzero(a == np.inf)
        raise ValueError(f"logits contain +inf at {pinf.size} token id(s), first {pinf[:5].tolist()}")
    if not np.any(a > -np.inf):
        raise ValueError("all logits are -inf: no token can be sampled")
    return a


def _as_logits(logits) -> np.ndarray:
    """A validated float64 copy of ``logits`` (see :func:`_checked`)."""
    return _checked(logits).astype(np.float64)  # always a copy


def _history_window(history, last_n: int, vocab: int, counts: bool = False, distinct: bool = True):
    """The distinct token ids among the last ``last_n`` of ``history`` (validated); with
    ``counts``, also how often each occurs there; without ``distinct``, only validated (the
    window as it is: no sort, for settings that do not use it)."""
    if last_n == 0 or history is None:
        empty = np.empty(0, dtype=np.int64)
        return (empty, empty) if counts else empty
    if not isinstance(history, (np.ndarray, list, tuple, range)):
        history = list(history)  # e.g. a deque, which cannot be sliced
    window = history if last_n < 0 else history[-last_n:]
    h = np.asarray(window)
    if h.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return (empty, empty) if counts else empty
    if h.ndim != 1 or h.dtype.kind not in "iu":
        raise ValueError(f"history must be a 1-D sequence of integer token ids, got dtype {h.dtype}, shape {h.shape}")
    if not distinct:
        lo, hi = h.min(), h.max()
        if lo < 0 or hi >= vocab:
            bad = h[(h < 0) | (h >= vocab)]
            raise ValueError(f"history contains token id(s) outside [0, {vocab}): {np.unique(bad)[:5].tolist()}")
        return h
    u, c = np.unique(h, return_counts=True)
    if u[0] < 0 or u[-1] >= vocab:
        bad = u[(u < 0) | (u >= vocab)]
        raise ValueError(f"history contains token id(s) outside [0, {vocab}): {bad[:5].tolist()}")
    u = u.astype(np.int64, copy=False)
    return (u, c) if counts else u


def _penalties_off(penalty: float, last_n: int, frequency: float = 0.0, presence: float = 0.0) -> bool:
    return (penalty == 1.0 and frequency == 0.0 and presence == 0.0) or last_n == 0


def _penalise_inplace(x: np.ndarray, history, penalty: float, last_n: int, frequency: float = 0.0,
                      presence: float = 0.0) -> None:
    if _penalties_off(penalty, last_n, frequency, presence):
        # still validate the window so bad ids are reported whatever the settings
        _history_window(history, last_n, x.size, distinct=False)
        return
    u, counts = _history_window(history, last_n, x.size, counts=True)
    if u.size:
        v = x[u]
        if penalty != 1.0:
            v = np.where(v > 0, v / penalty, v * penalty)
        if frequency != 0.0 or presence != 0.0:
            v = v - (counts * frequency + presence)
        x[u] = v


def _bias_inplace(x: np.ndarray, bias) -> None:
    """Add ``bias`` (token id -> value) to the logits (llama.cpp's logit-bias sampler, first)."""
    if not bias:
        return
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    if ids.min() < 0 or ids.max() >= x.size:
        bad = ids[(ids < 0) | (ids >= x.size)][0]
        raise ValueError(f"logit_bias: token id {bad} is outside [0, {x.size})")
    x[ids] += np.fromiter(bias.values(), dtype=np.float64, count=len(bias))


def _adjust(x: np.ndarray, params: SamplingParams, history) -> None:
    """Steps 0 and 1 of the chain: the logit bias, then the penalties."""
    _bias_inplace(x, params.logit_bias)
    _penalise_inplace(x, history, params.repeat_penalty, params.repeat_last_n, params.frequency_penalty,
                      params.presence_penalty)


# --------------------------------------------------------------------------------------------
# Candidate-level kernels (positions into a candidate array whose token ids ascend)
# --------------------------------------------------------------------------------------------


def _select_top(vals: np.ndarray, m: int) -> np.ndarray:
    """Ascending positions of the ``m`` largest ``vals``; among equal values at the cut the
    lowest positions win (exactly the first ``m`` of a stable descending sort)."""
    n = vals.size
    if m >= n:
        return np.arange(n)
    part = np.argpartition(vals, n - m)[n - m:]
    kth = vals[part].min()
    if np.count_nonzero(vals >= kth) == m:  # no tie straddles the cut: the partition is exact
        return np.sort(part)
    above = np.flatnonzero(vals > kth)
    ties = np.flatnonzero(vals == kth)
    return np.sort(np.concatenate([above, ties[: m - above.size]]))


def _sorted_prefix(vals: np.ndarray, m: int) -> np.ndarray:
    """Positions of the first ``m`` candidates in (descending value, ascending position) order.

    A quicksort is 4x faster than numpy's stable sort; the runs of equal values it may leave
    out of position order are put back in order by a small lexsort over the tied entries only.
    """
    pos = _select_top(vals, m)
    v = vals[pos]
    o = np.argsort(-v)
    sv = v[o]
    eq = sv[1:] == sv[:-1]
    if eq.any():
        tied = np.zeros(sv.size, dtype=bool)
        tied[1:] |= eq
        tied[:-1] |= eq
        t = np.flatnonzero(tied)
        sub = o[t]
        o[t] = sub[np.lexsort((sub, -sv[t]))]
    return pos[o]


def _top_p_positions(vals: np.ndarray, top_p: float, limit: int | None = None) -> np.ndarray:
    """Positions kept by top-p, in sorted order; ``limit`` caps the kept prefix (used to fuse
    with min-p, whose survivors are the first ``limit`` entries of the same order).

    Sorting only a prefix is exact: the cumulative sums of a prefix of the sorted order are
    the first entries of the full cumulative sums (``cumsum`` adds sequentially), so if the
    prefix reaches ``top_p`` the full sort would cut at the same place.
    """
    n = vals.size
    limit = n if limit is None else limit
    e = np.exp(vals - vals.max())
    z = e.sum()
    m = limit if limit <= _TOP_P_FULL_SORT else _TOP_P_FIRST_PREFIX
    while True:
        order = _sorted_prefix(vals, m)
        cum = np.cumsum(e[order] / z)
        j = int(np.searchsorted(cum, top_p, side="left"))  # first index with cum >= top_p
        if j < m:
            return order[: j + 1]
        if m >= limit:
            return order
        # each further token weighs at most as much as the m-th: at least `need` more are needed
        p_last = e[order[-1]] / z
        need = (top_p - cum[-1]) / p_last if p_last > 0 else math.inf
        m_next = max(4.0 * m, 2.0 * (m + need))
        m = int(m_next) if m_next < limit / 2 else limit  # past half the candidates: sort all


def _min_p_mask(vals: np.ndarray, min_p: float) -> np.ndarray:
    return vals >= vals.max() + math.log(min_p)


def _candidates(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """Token ids (ascending) and logits surviving top-k → top-p → min-p on penalised ``x``.
    The ids are ``None`` when every token survives (saves building a vocabulary-sized range)."""
    finite = x > -np.inf
    if finite.all():
        idx, vals = None, x
    else:
        idx = np.flatnonzero(finite)
        vals = x[idx]

    def keep(pos):
        return (pos if idx is None else idx[pos]), vals[pos]

    if 0 < params.top_k < vals.size:
        idx, vals = keep(_select_top(vals, params.top_k))
    if params.top_p < 1.0:
        limit = None
        if params.min_p > 0:
            limit = int(np.count_nonzero(_min_p_mask(vals, params.min_p)))
        pos = _top_p_positions(vals, params.top_p, limit)
        if pos.size < vals.size:
            idx, vals = keep(np.sort(pos))
    elif params.min_p > 0:
        mask = _min_p_mask(vals, params.min_p)
        if not mask.all():
            idx, vals = keep(np.flatnonzero(mask))
    return idx, vals


def _softmax_t(vals: np.ndarray, temperature: float) -> np.ndarray:
    # subtract the max before dividing so huge logits / tiny temperatures cannot overflow
    e = np.exp((vals - vals.max()) / temperature)
    return e / e.sum()


# --------------------------------------------------------------------------------------------
# Public pure functions (full-vocabulary in, full-vocabulary out)
# --------------------------------------------------------------------------------------------


def _scatter(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.full(x.size, -np.inf)
    out[idx] = x[idx]
    return out


def apply_repeat_penalty(logits, history, penalty: float, last_n: int) -> np.ndarray:
    """Logits with llama.cpp's repetition penalty applied (a new float64 array).

    Every distinct token among the last ``last_n`` entries of ``history`` (``-1``: all,
    ``0``: none) is penalised once: ``l / penalty`` if ``l > 0`` else ``l * penalty``.
    """
    if not _is_real(penalty) or not math.isfinite(penalty) or penalty <= 0:
        raise ValueError(f"repeat_penalty must be a finite number > 0, got {penalty!r}")
    if not _is_int(last_n) or last_n < -1:
        raise ValueError(f"repeat_last_n must be an integer >= -1, got {last_n!r}")
    x = _as_logits(logits)
    _penalise_inplace(x, history, penalty, last_n)
    return x


def top_k_filter(logits, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the cut → lower token ids); others become -inf.
    ``k <= 0`` or ``k >=`` the number of finite logits: unchanged."""
    if not _is_int(k):
        raise ValueError(f"top_k must be an integer, got {k!r}")
    x = _as_logits(logits)
    idx = np.flatnonzero(x > -np.inf)
    if 0 < k < idx.size:
        idx = idx[_select_top(x[idx], k)]
    return _scatter(x, idx)


def top_p_filter(logits, p: float) -> np.ndarray:
    """Nucleus filter: softmax over the finite logits, keep the shortest prefix of the tokens
    sorted by descending probability (ties → lower id first) whose cumulative probability is
    ``>= p``; the others become -inf. ``p == 1``: unchanged."""
    if not _is_real(p) or not (0.0 < p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    x = _as_logits(logits)
    idx = np.flatnonzero(x > -np.inf)
    if p < 1.0:
        idx = idx[_top_p_positions(x[idx], p)]
    return _scatter(x, idx)


def min_p_filter(logits, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is ``>= min_p`` times the largest one, computed as
    ``logit >= max_logit + log(min_p)``; the others become -inf. ``min_p == 0``: unchanged."""
    if not _is_real(min_p) or not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    x = _as_logits(logits)
    if min_p == 0:
        return x
    idx = np.flatnonzero(x > -np.inf)
    idx = idx[_min_p_mask(x[idx], min_p)]
    return _scatter(x, idx)


def temperature_softmax(logits, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64 (-inf → probability 0); temperature 0 is
    the one-hot of the arg-max (lowest id among ties)."""
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    x = _as_logits(logits)
    out = np.zeros(x.size)
    if temperature == 0:
        out[int(np.argmax(x))] = 1.0
        return out
    idx = np.flatnonzero(x > -np.inf)
    out[idx] = _softmax_t(x[idx], temperature)
    return out


def probabilities(logits, params: SamplingParams, history: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """The full-vocabulary float64 distribution :class:`Sampler` draws from for these inputs
    (zeros at filtered tokens; one-hot at the penalised arg-max when greedy)."""
    x = _as_logits(logits)
    _adjust(x, params, history)
    out = np.zeros(x.size)
    if params.greedy:
        out[int(np.argmax(x))] = 1.0
        return out
    idx, vals = _candidates(x, params)
    out[slice(None) if idx is None else idx] = _softmax_t(vals, params.temperature)
    return out


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


class Sampler:
    """``sampler(logits, history) -> token id`` for a fixed :class:`SamplingParams`.

    Owns a :class:`numpy.random.Generator` seeded from ``params.seed`` (``None``: OS entropy):
    the same seed and the same sequence of (logits, history) give the same tokens. Each
    non-greedy call consumes exactly one ``Generator.random()`` value ``u`` and returns the
    first candidate (ascending token id) whose cumulative probability exceeds ``u`` times the
    total, i.e. an inverse-CDF draw from :func:`probabilities`.
    """

    def __init__(self, params: SamplingParams | None = None, constraint=None):
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        self._params = params
        self._rng = np.random.default_rng(params.seed)
        #: constrained decoding (``rosenblatt.text.grammar.Constraint``): ``apply(x)`` sets the
        #: logits of tokens it forbids next to -inf before anything else, ``consume(token)`` after
        self.constraint = constraint

    @property
    def params(self) -> SamplingParams:
        return self._params

    def reset(self, seed: int | None = None) -> None:
        """Re-seed the generator: with ``seed``, or else ``params.seed`` (so a seeded sampler
        replays its sequence from the start; an unseeded one draws fresh OS entropy)."""
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
        self._rng = np.random.default_rng(self._params.seed if seed is None else seed)

    def probabilities(self, logits, history: Sequence[int] | np.ndarray = ()) -> np.ndarray:
        return probabilities(logits, self._params, history)

    def __call__(self, logits, history: Sequence[int] | np.ndarray = ()) -> int:
        token = self._choose(logits, history)
        if self.constraint is not None:
            self.constraint.consume(token)
        return token

    def _choose(self, logits, history) -> int:
        params = self._params
        if params.greedy and self.constraint is None and not params.logit_bias and _penalties_off(
                params.repeat_penalty, params.repeat_last_n, params.frequency_penalty, params.presence_penalty):
            # nothing changes the logits: the arg-max of the row as given (float32 -> float64 is
            # exact, so it is the same token) without the float64 copy; _adjust only validates
            # the history here
            a = _checked(logits)
            _adjust(a, params, history)
            return int(np.argmax(a))
        x = _as_logits(logits)
        if self.constraint is not None:
            self.constraint.apply(x)
        _adjust(x, params, history)
        if params.greedy:
            return int(np.argmax(x))
        idx, vals = _candidates(x, params)
        if vals.size == 1:
            self._rng.random()  # keep the one-draw-per-call contract
            return 0 if idx is None else int(idx[0])
        p = _softmax_t(vals, params.temperature)
        cdf = np.cumsum(p)
        u = self._rng.random()
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        if i >= p.size:  # u * total rounded up to the total: take the last non-zero probability
            i = int(np.flatnonzero(p)[-1])
        return i if idx is None else int(idx[i])


def make_sampler(params: SamplingParams | None = None, **overrides) -> Sampler:
    """mlx-lm-style factory: ``make_sampler(temperature=0.7, top_p=0.9, seed=1)`` or
    ``make_sampler(params, seed=2)`` (fields in ``overrides`` replace those of ``params``)."""
    if params is None:
        params = SamplingParams(**overrides)
    elif overrides:
        params = params.replace(**overrides)
    return Sampler(params)
