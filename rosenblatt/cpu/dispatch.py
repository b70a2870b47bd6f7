"""Products of prepared weight matrices with quantized activations: the row split over threads
(:func:`cut`), the call of one kernel over a row range (:func:`rows_kernel`) and
:class:`KernelGroup`, one to three matrices run as one product."""

from __future__ import annotations

import ctypes

import numpy as np
from numba import njit, prange

from .activations import CHUNK_BYTES, Activations, chunk_rows
from .build import kernels
from .ir import ACT_FORMAT, ROWS
from .jit import call_address
from .pack import Packed


@njit(nogil=True, cache=True, inline="always")
def cut(n, p, parts):
    """Start of share ``p`` of ``n`` rows split in ``parts``: a multiple of 8 (the packed
    kernels' row groups) but for the end, ``n``."""
    return n if p >= parts else n * p // parts // 8 * 8


@njit(nogil=True, cache=True)
def rows_kernel(f1, fr, w, row_bytes, a, b, nblk, m_rows, x, sx, out, so):
    """Rows [a, b) of one matrix against every activation row: ROWS at a time, then the rest."""
    m4 = m_rows - m_rows % ROWS
    if m4 > 0:
        call_address(fr, (w, row_bytes, a, b, nblk, m4, x, sx, out, so))
    if m_rows > m4:
        call_address(f1, (w, row_bytes, a, b, nblk, m_rows - m4, x + m4 * sx, sx, out + 4 * m4 * so, so))


@njit(nogil=True, cache=True)
def _group_serial(f1, fr, w, row_bytes, n, col, nblk, buf, chunk):
    """The products of a :class:`KernelGroup` on the calling thread: out [M, col[-1]]."""
    m_rows, so = buf.shape[0], col[-1]
    out = np.empty((m_rows, so), np.float32)
    base, x, sx = np.int64(out.ctypes.data), np.int64(buf.ctypes.data), np.int64(buf.strides[0])
    for m0 in range(0, m_rows, chunk):
        mc = min(chunk, m_rows - m0)
        for j in range(len(w)):
            rows_kernel(f1[j], fr[j], w[j], row_bytes[j], 0, n[j], nblk, mc, x + m0 * sx, sx,
                         base + 4 * (m0 * so + col[j]), so)
    return out


@njit(parallel=True, nogil=True, cache=True)
def _group_parallel(f1, fr, w, row_bytes, n, col, nblk, buf, chunk, parts):
    """:func:`_group_serial` with the rows of every matrix split in ``parts`` shares, share p on
    thread p: one parallel region per chunk of activation rows."""
    m_rows, so = buf.shape[0], col[-1]
    out = np.empty((m_rows, so), np.float32)
    base, x, sx = np.int64(out.ctypes.data), np.int64(buf.ctypes.data), np.int64(buf.strides[0])
    for m0 in range(0, m_rows, chunk):
        mc = min(chunk, m_rows - m0)
        for p in prange(parts):
            for j in range(len(w)):
                rows_kernel(f1[j], fr[j], w[j], row_bytes[j], cut(n[j], p, parts), cut(n[j], p + 1, parts), nblk, mc,
                             x + m0 * sx, sx, base + 4 * (m0 * so + col[j]), so)
    return out


class KernelGroup:
    """One to three weight matrices (row-major blocks, the same input length) whose types share
    an activation format, prepared once for products against the same activations: q/k/v,
    gate/up, or a single matrix. Calling it returns float32 [M, sum of the matrices' rows], the
    matrices' outputs side by side (see :attr:`columns`)."""

    def __init__(self, qtypes, rows, fns: dict | None = None):
        fns = fns or kernels()
        self.fmt = ACT_FORMAT[qtypes[0]]
        if any(ACT_FORMAT[qt] != self.fmt for qt in qtypes) or not 1 <= len(qtypes) <= 3:
            raise ValueError("a kernel group is 1-3 matrices whose types share an activation format")
        addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value
        i64 = lambda vals: np.array(vals, dtype=np.int64)
        # a Packed matrix runs on its packed kernels, which take the bytes of a group of 8 rows
        rows = list(rows)
        if any(isinstance(r, Packed) and ("packed", r.qtype) not in fns for r in rows):
            raise ValueError("packed rows need the packed kernels of this ISA")
        keys = [("packed", qt) if isinstance(r, Packed) else qt for qt, r in zip(qtypes, rows)]
        data = [r.data if isinstance(r, Packed) else r for r in rows]
        self.rows = list(rows)          # keeps the mappings the addresses point into alive
        self.f1, self.fr = i64([addr(fns[key][0]) for key in keys]), i64([addr(fns[key][1]) for key in keys])
        self.w, self.row_bytes = i64([r.ctypes.data for r in data]), i64([r.strides[0] for r in data])
        self.n = i64([r.n if isinstance(r, Packed) else r.shape[0] for r in rows])
        #: bytes of each matrix
        self.nbytes = i64([r.nbytes for r in data])
        self.col = i64([0] + list(np.cumsum(self.n)))
        #: (start, stop) of each matrix's columns in the output
        self.columns = [(int(a), int(b)) for a, b in zip(self.col[:-1], self.col[1:])]

    def __call__(self, acts: Activations, parts: int = 1, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
        """``parts`` shares of rows on numba's threads; activation rows in chunks of about
        ``chunk_bytes`` (each weight row is read once per chunk)."""
        assert acts.fmt == self.fmt
        chunk = chunk_rows(acts.k, chunk_bytes)
        args = (self.f1, self.fr, self.w, self.row_bytes, self.n, self.col, acts.k // acts.fmt, acts.buf, chunk)
        return _group_parallel(*args, parts) if parts > 1 else _group_serial(*args)


def matmul(qtype: int, rows: np.ndarray, acts: Activations, out: np.ndarray, fns: dict | None = None,
           parts: int = 1, chunk_bytes: int = CHUNK_BYTES) -> None:
    """``out[m, r] = dot(rows[r], x[m])`` for every weight row r and activation row m of ``acts``
    (from :func:`quantize_activations` with the type's :data:`ACT_FORMAT`); ``parts`` > 1 splits
    the rows over numba's threads. (The backend keeps :class:`KernelGroup` objects instead.)"""
    out[...] = KernelGroup([qtype], [rows], fns)(acts, parts, chunk_bytes)
