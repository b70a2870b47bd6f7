"""Activations quantized to int8 in the layout the kernels read (:data:`.ir.ACT_BLOCK`), for
whole matrices (:func:`quantize_activations`) and for one row inside numba (:func:`quantize_row_into`)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ir import ACT_BLOCK, Q8_32, Q8_256, ROWS, WIDE
from .jit import njit_twin


class Activations:
    """Quantized activation rows in the kernels' layout: per row, blocks of ACT_BLOCK[fmt] bytes
    holding the block's int8 quants, its float32 scale and its sums. ``q``, ``d``, ``s`` are
    [M, K] int8, [M, K/fmt] float32 and the sums ([M, K/32] float32 or [M, K/16] int16) as
    copies, for inspection."""

    def __init__(self, buf: np.ndarray, fmt: int, k: int):
        self.buf, self.fmt, self.k = buf, fmt, k

    def _fields(self):
        blocks = self.buf.reshape(self.buf.shape[0], self.k // self.fmt, ACT_BLOCK[self.fmt])
        f = self.fmt
        s_type, n_s = (np.float32, 1) if f == Q8_32 else (np.int16, 16)
        return (blocks[:, :, :f].view(np.int8), blocks[:, :, f:f + 4].view(np.float32),
                blocks[:, :, f + 4:f + 4 + n_s * np.dtype(s_type).itemsize].view(s_type))

    @property
    def rows(self) -> int:
        return self.buf.shape[0]

    def __getitem__(self, rows: slice) -> "Activations":
        return Activations(self.buf[rows], self.fmt, self.k)

    q = property(lambda self: self._fields()[0].reshape(self.rows, self.k))
    d = property(lambda self: self._fields()[1].reshape(self.rows, -1))
    s = property(lambda self: self._fields()[2].reshape(self.rows, -1))


def quantize_activations(x: np.ndarray, fmt: int = Q8_32) -> Activations:
    """Quantize float32 activations [M, K] for the kernels.

    As llama.cpp's SIMD paths do: per 32 values (ggml's Q8_0), q = rint(x * 127 / max|x|) and
    d = max|x| / 127, with sums d * sum(q); per 256 (ggml's Q8_K), q = rint(x * -127 / m) and
    d = 1 / (-127 / m) with m the value of largest magnitude (so d < 0 when m > 0), with the
    integer sums of every 16 quants. rint rounds half to even. A block holding a NaN or an infinity
    gets a NaN scale, so non-finite activations stay non-finite through the integer kernels (the
    engine then names the weight at fault) instead of turning into finite noise."""
    m, k = x.shape
    buf = np.empty((m, k // fmt * ACT_BLOCK[fmt]), dtype=np.uint8)
    acts = Activations(buf, fmt, k)
    _QUANTIZE[m >= 2 * ROWS](x, buf, fmt)
    return acts


@njit(nogil=True, cache=True, inline="always")
def _q32_row(x, buf):
    """One row x [K] in the ``Q8_32`` format into ``buf`` (1-D, the layout of :class:`Activations`;
    see :func:`quantize_activations`), block by block at byte offsets (no reshape)."""
    for b in range(x.shape[0] // 32):
        o = 64 * b
        q = buf[o:o + 32].view(np.int8)
        amax = np.float32(0.0)
        bad = np.float32(0.0)          # 0, or NaN once a value is NaN or infinite
        for i in range(32):
            amax = max(amax, abs(x[32 * b + i]))
            bad += x[32 * b + i] * np.float32(0.0)
        if bad != 0:                   # a non-finite activation gives a NaN scale, not finite noise
            amax = bad
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        total = 0
        for i in range(32):
            qi = np.int8(np.rint(x[32 * b + i] * inv))
            q[i] = qi
            total += qi
        d = amax / np.float32(127.0)
        buf[o + 32:o + 36].view(np.float32)[0] = d
        buf[o + 36:o + 40].view(np.float32)[0] = d * np.float32(total)


@njit(nogil=True, cache=True, inline="always")
def _q256_row(x, buf):
    """One row x [K] in the ``Q8_256`` format into ``buf``, as :func:`_q32_row`."""
    for b in range(x.shape[0] // 256):
        o = 320 * b
        q = buf[o:o + 256].view(np.int8)
        s = buf[o + 260:o + 292].view(np.int16)
        amax = np.float32(0.0)
        top = np.float32(0.0)
        bad = np.float32(0.0)
        for i in range(256):
            v = x[256 * b + i]
            bad += v * np.float32(0.0)
            if abs(v) > amax:
                amax = abs(v)
                top = v
        if bad != 0:
            amax = bad
            top = bad
        inv = np.float32(-127.0) / top if amax > 0 else np.float32(0.0)
        for g in range(16):
            total = 0
            for i in range(16 * g, 16 * g + 16):
                qi = np.int8(min(np.float32(127.0), np.rint(x[256 * b + i] * inv)))
                q[i] = qi
                total += qi
            s[g] = total
        buf[o + 256:o + 260].view(np.float32)[0] = np.float32(1.0) / inv if amax > 0 else amax * np.float32(0.0)


@njit(nogil=True, cache=True)
def quantize_row_into(x, buf, fmt):
    """One activation row x [1, K] quantized into ``buf`` (uint8, 1-D, at least K/fmt *
    ACT_BLOCK[fmt] bytes) in the layout of :class:`Activations`; for callers inside numba."""
    if fmt == Q8_256:
        _q256_row(x[0], buf)
    else:
        _q32_row(x[0], buf)


def _quantize_rows(x, buf, fmt):
    """Every row of x [M, K] into the rows of ``buf`` [M, bytes]."""
    for m in prange(x.shape[0]):
        if fmt == Q8_256:
            _q256_row(x[m], buf[m])
        else:
            _q32_row(x[m], buf[m])


# a few activation rows run serially: a parallel region costs more than the work
# (separate functions for numba's cache, see jit.njit_twin)
_QUANTIZE = {par: njit_twin(_quantize_rows, "_parallel" if par else "_serial", cache=True, parallel=par)
             for par in (False, True)}


#: int8 activation bytes kept in L2 while a weight row is dotted with them (prefill chunks)
CHUNK_BYTES = 1 << 18


def chunk_rows(row_bytes: int, budget: int = CHUNK_BYTES) -> int:
    """Activation rows of ``row_bytes`` each per prefill chunk: what fits ``budget``, in whole
    passes of the widest kernel (8 rows, or ROWS)"""
    group = max([ROWS, *WIDE.values()])
    return max(ROWS, budget // row_bytes // group * group)
