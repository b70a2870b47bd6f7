"""CPU matmul backend: numba kernels that read the GGUF blocks directly.

By default (``kernels="int8"``) the activations are quantized to int8 and the integer-SIMD
kernels of :mod:`rosenblatt.cpu` do the dots (llama.cpp's scheme), for any number of
activation rows M (decode and prefill alike; measured faster than band decode + BLAS even for
long prompts): each quantized row of W is dotted directly with the activation rows, in parallel over output rows; W is streamed from the file mapping, never
materialised. Types without an int8 kernel, or ``kernels="float"`` (exact to float32 rounding):

* M < ``blas_min_rows`` (decode): the float32 kernels of :mod:`rosenblatt.cpu.qdot`;
* otherwise (prefill): W is decoded a band of rows at a time into a small float32 tile and
  multiplied with the float32 BLAS GEMM, so the decoding cost is shared by M rows; the bands
  are spread over the backend's worker threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numba
from numba import njit, prange

from ..cpu.activations import quantize_activations
from ..cpu.build import kernels
from ..cpu.dispatch import KernelGroup
from ..cpu.ir import ACT_FORMAT
from ..cpu.pack import Packed, pack

from ..gguf.file import TensorInfo
from ..cpu.qdot import FASTMATH, block_sums, dot_row
from ..gguf.quants import F32, SUPPORTED_TYPES, decode_rows, dequant_band
from . import MatmulBackend, PreparedWeight

_ROWS_PER_CHUNK = 16
_SPLIT_MIN_WEIGHTS = 1 << 18   # ~20 us of int8 dots on one core
_TILE_FLOATS = 1 << 18  # a 1 MiB float32 tile per band and worker in the BLAS regime
_blas_limiter = None


def _configure_threads(threads: int | None) -> int:
    """Set numba's thread count and pin OpenBLAS to one thread (see CPUBackend)."""
    global _blas_limiter
    available = numba.config.NUMBA_NUM_THREADS
    threads = available if threads is None else max(1, min(int(threads), available))
    numba.set_num_threads(threads)
    if _blas_limiter is None:
        from threadpoolctl import threadpool_limits
        _blas_limiter = threadpool_limits(limits=1, user_api="blas")
    return threads


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matmul_rows(x, xs, rows, qtype, out):
    m_rows, k = x.shape
    n = rows.shape[0]
    n_chunks = (n + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for c in prange(n_chunks):
        scratch = np.empty(k, np.float32)  # used only by types without a fused kernel
        stop = min(n, (c + 1) * _ROWS_PER_CHUNK)
        for r in range(c * _ROWS_PER_CHUNK, stop):
            src = rows[r]
            for m in range(m_rows):
                out[m, r] = dot_row(qtype, src, x[m], xs[m], scratch)


@dataclass
class CPUWeight(PreparedWeight):
    name: str
    qtype: int
    n_out: int
    n_in: int
    rows: np.ndarray            # uint8 [n_out, row_bytes], a view into the file mapping
    dense: np.ndarray | None    # float32 [n_out, n_in] view when the file stores F32
    packed: Packed | None = None   # the rows in a packed kernel's layout (x86: Q4_K; Q6_K and the 32-quant types with VNNI)


def _file_backed(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a, np.ndarray) else None
    return False


def _drop_pages(a: np.ndarray) -> None:
    """Take the whole pages of ``a`` (a view into the model file's mapping, read-only) out of
    this process's resident set: the kernel reads them back from the file if they are touched
    again (an embedding row). Only for file mappings (anonymous pages would be lost)."""
    if not _file_backed(a) or not hasattr(os, "sysconf"):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if end <= start:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)     # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


class CPUBackend(MatmulBackend):
    """Quantized matmuls on ``threads`` CPU threads (default: every core numba sees).

    OpenBLAS is limited to one thread for the life of the process: its worker threads spin
    after each call and fight numba's for the same cores (measured: both run 2-15x slower).
    Large products are instead split over the backend's own thread pool, one band of W per
    worker, each decoding its band (numba, GIL released) and multiplying it (BLAS, GIL released).
    """

    name = "cpu"

    def __init__(self, threads: int | None = None, blas_min_rows: int = 8, kernels: str | None = None):
        self.threads = _configure_threads(threads)
        self.blas_min_rows = blas_min_rows
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rosenblatt-mm") if self.threads > 1 else None
        self.kernels = kernels or os.environ.get("ROSENBLATT_KERNELS", "int8")

    @property
    def kernels(self) -> str:
        """"int8": activations quantized to int8 and integer-SIMD dots (:mod:`rosenblatt.cpu`, as
        llama.cpp does) for the types that have them; "float": float32 kernels and BLAS (exact
        to float32 rounding)."""
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        if value not in ("int8", "float"):
            raise ValueError(f"kernels must be 'int8' or 'float', got {value!r}")
        self._kernels = value
        self._simd = kernels() if value == "int8" else {}
        self._groups = {}

    def _int8(self, w: CPUWeight) -> bool:
        return w.qtype in self._simd

    def prepare(self, tensor: TensorInfo) -> CPUWeight:
        if tensor.qtype not in SUPPORTED_TYPES:
            raise ValueError(f"tensor {tensor.name!r}: type {tensor.qtype.name} is not supported")
        rows = tensor.rows()
        dense = rows.view(np.float32) if int(tensor.qtype) == F32 else None
        packed = None
        if ("packed", int(tensor.qtype)) in self._simd:     # repacked once, the file's pages let go
            packed = pack(int(tensor.qtype), rows, release=_drop_pages)
            if packed is not None:
                _drop_pages(rows)           # the pages the pieces shared
        return CPUWeight(tensor.name, int(tensor.qtype), tensor.n_rows, tensor.row_len, rows, dense, packed)

    def matmul(self, x: np.ndarray, w: CPUWeight, out: np.ndarray | None = None) -> np.ndarray:
        m = x.shape[0]
        if self._int8(w):
            y = self._run_int8(x, (w,))[0]
            if out is None:
                return y
            out[...] = y
            return out
        if out is None:
            out = np.empty((m, w.n_out), dtype=np.float32)
        if m < self.blas_min_rows and w.dense is None:
            xs = np.empty((m, w.n_in // 32), dtype=np.float32)
            block_sums(x, xs)
            _matmul_rows(x, xs, w.rows, w.qtype, out)
            return out
        parts = _split(w.n_out, self.threads if w.n_out * m >= 1 << 16 else 1)
        if len(parts) == 1 or self._pool is None:
            self._gemm_part(x, w, out, 0, w.n_out)
        else:
            list(self._pool.map(lambda p: self._gemm_part(x, w, out, *p), parts))
        return out

    def matmul_many(self, x: np.ndarray, ws) -> list[np.ndarray]:
        """Products of one input on the int8 kernels: one quantization, one parallel region."""
        fmt = {ACT_FORMAT[w.qtype] if self._int8(w) else None for w in ws}
        if None in fmt or len(fmt) > 1 or not 1 <= len(ws) <= 3:
            return [self.matmul(x, w) for w in ws]
        y, g = self._run_int8(x, tuple(ws))
        return [y[:, a:b] for a, b in g.columns]

    def decode_group(self, ws):
        """The :class:`~rosenblatt.cpu.dispatch.KernelGroup` of one-row products of ``ws`` on the int8 kernels, for
        callers that run the group inside numba (on :attr:`threads` threads); None if they have
        none, or if a subclass computes its products differently (they would be bypassed)."""
        cls = type(self)
        if cls.matmul is not CPUBackend.matmul or cls.matmul_many is not CPUBackend.matmul_many:
            return None
        if not all(self._int8(w) for w in ws) or len({ACT_FORMAT[w.qtype] for w in ws}) != 1:
            return None
        return self._group(ws)

    def fused_rows(self) -> int:
        return 1 << 30

    def _group(self, ws):
        key = tuple(id(w) for w in ws)
        entry = self._groups.get(key)
        if entry is None:     # the weights are kept in the entry, so their ids stay theirs
            rows = [w.packed if w.packed is not None else w.rows for w in ws]
            entry = self._groups[key] = (KernelGroup([w.qtype for w in ws], rows, self._simd), ws)
        return entry[0]

    def _parts(self, g, ws, m: int) -> int:
        # starting a parallel region costs ~20 us: split only products that take longer
        return self.threads if int(g.col[-1]) * ws[0].n_in * m >= _SPLIT_MIN_WEIGHTS else 1

    def _run_int8(self, x, ws):
        """(x @ W.T for the group side by side, its KernelGroup); groups are built once."""
        g = self._group(ws)
        acts = quantize_activations(x, g.fmt)
        return g(acts, self._parts(g, ws, x.shape[0])), g

    @staticmethod
    def _gemm_part(x, w, out, start, stop):
        if w.dense is not None:
            out[:, start:stop] = x @ w.dense[start:stop].T
            return
        band = max(_ROWS_PER_CHUNK, _TILE_FLOATS // w.n_in)
        tile = np.empty((min(band, stop - start), w.n_in), dtype=np.float32)
        for s in range(start, stop, band):
            t = tile[: min(band, stop - s)]
            dequant_band(w.qtype, w.rows, s, t)
            out[:, s:s + t.shape[0]] = x @ t.T

    def embed(self, w: CPUWeight, ids: np.ndarray) -> np.ndarray:
        """Decode only the looked-up rows (token embedding)."""
        out = np.empty((len(ids), w.n_in), dtype=np.float32)
        decode_rows(w.qtype, w.rows, np.asarray(ids, dtype=np.int64), out)
        return out
