"""CPU matmul backend: numba kernels that read the GGUF blocks directly.

Two regimes, chosen per call by the number of activation rows M:

* M < ``blas_min_rows`` (decode): each output row of W is decoded into a per-thread scratch
  row and dotted with every activation row, in parallel over output rows. W is streamed once
  from the file mapping, never materialised.
* M >= ``blas_min_rows`` (prefill): W is decoded a band of rows at a time into a small float32
  tile and multiplied with the float32 BLAS GEMM, so the decoding cost is shared by M rows.

Accumulation is float32 in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..gguf_file import TensorInfo
from ..quants import F32, SUPPORTED_TYPES, dequant_row, dequant_row_range
from . import MatmulBackend, PreparedWeight

_ROWS_PER_CHUNK = 16
_TILE_FLOATS = 1 << 20  # a 4 MiB float32 tile per band in the BLAS regime


@njit(parallel=True, fastmath={"reassoc", "contract", "nsz"}, cache=True)
def _matmul_rows(x, rows, qtype, out):
    m_rows, k = x.shape
    n = rows.shape[0]
    n_chunks = (n + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for c in prange(n_chunks):
        buf = np.empty(k, np.float32)
        stop = min(n, (c + 1) * _ROWS_PER_CHUNK)
        for r in range(c * _ROWS_PER_CHUNK, stop):
            dequant_row(qtype, rows[r], buf)
            for m in range(m_rows):
                xm = x[m]
                acc = np.float32(0.0)
                for i in range(k):
                    acc += buf[i] * xm[i]
                out[m, r] = acc


@dataclass
class CPUWeight(PreparedWeight):
    name: str
    qtype: int
    n_out: int
    n_in: int
    rows: np.ndarray            # uint8 [n_out, row_bytes], a view into the file mapping
    dense: np.ndarray | None    # float32 [n_out, n_in] view when the file stores F32


class CPUBackend(MatmulBackend):
    name = "cpu"

    def __init__(self, blas_min_rows: int = 8):
        self.blas_min_rows = blas_min_rows

    def prepare(self, tensor: TensorInfo) -> CPUWeight:
        if tensor.qtype not in SUPPORTED_TYPES:
            raise ValueError(f"tensor {tensor.name!r}: type {tensor.qtype.name} is not supported")
        rows = tensor.rows()
        dense = rows.view(np.float32) if int(tensor.qtype) == F32 else None
        return CPUWeight(tensor.name, int(tensor.qtype), tensor.n_rows, tensor.row_len, rows, dense)

    def matmul(self, x: np.ndarray, w: CPUWeight, out: np.ndarray | None = None) -> np.ndarray:
        m = x.shape[0]
        if out is None:
            out = np.empty((m, w.n_out), dtype=np.float32)
        if w.dense is not None:
            np.matmul(x, w.dense.T, out=out)
        elif m < self.blas_min_rows:
            _matmul_rows(x, w.rows, w.qtype, out)
        else:
            band = max(_ROWS_PER_CHUNK, _TILE_FLOATS // w.n_in)
            tile = np.empty((min(band, w.n_out), w.n_in), dtype=np.float32)
            for start in range(0, w.n_out, band):
                t = tile[: min(band, w.n_out - start)]
                dequant_row_range(w.qtype, w.rows, start, t)
                out[:, start:start + t.shape[0]] = x @ t.T
        return out

    def embed(self, w: CPUWeight, ids: np.ndarray) -> np.ndarray:
        """Decode only the looked-up rows (token embedding)."""
        from ..quants import dequant_rows
        out = np.empty((len(ids), w.n_in), dtype=np.float32)
        dequant_rows(w.qtype, w.rows, np.asarray(ids, dtype=np.int64), out)
        return out
