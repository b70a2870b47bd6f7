"""The CPU backend's integer kernels as a model's fused step calls them from numba code.

A fused step (``models/llama_step.py``) runs a whole layer, or all of them, inside one numba
function on the backend's threads. It gets its weights as the :class:`~rosenblatt.cpu.KernelGroup`
objects of :meth:`CPUBackend.decode_group` (kernel addresses, matrices, row strides) and calls
only what is named here, so the kernels, their activation formats and how their rows are split
stay the backend's (a model never imports the integer kernels: :mod:`rosenblatt.cpu.ir`, ``build``,
``activations``, ``pack``, ``dispatch``).
"""

from __future__ import annotations

from ..cpu.activations import chunk_rows as _chunk_rows, quantize_row_into
from ..cpu.dispatch import cut, rows_kernel
from ..cpu.ir import ACT_BLOCK

#: ``quantize_row(x [1, K], buf, fmt)``: one activation row into a group's format (numba code)
quantize_row = quantize_row_into
#: ``rows_product(f1, fr, w, row_bytes, a, b, nblk, m_rows, x, sx, out, so)``: rows [a, b) of
#: one matrix of a group against ``m_rows`` quantized activation rows (numba code; see rosenblatt.cpu.dispatch)
rows_product = rows_kernel
#: ``split_point(n, p, parts)``: where share ``p`` of ``n`` output rows starts (numba code): a
#: multiple of the packed kernels' 8-row groups, so no share recomputes another's rows
split_point = cut


def act_row_bytes(k: int, fmt: int) -> int:
    """Bytes of one quantized activation row of length ``k`` in format ``fmt``."""
    return k // fmt * ACT_BLOCK[fmt]


def widest_act_row_bytes(k: int) -> int:
    """Bytes of a quantized row of length ``k`` in the larger of the activation formats."""
    return max(act_row_bytes(k, fmt) for fmt in ACT_BLOCK)


def chunk_rows(row_bytes: int, budget: int) -> int:
    """Activation rows per pass over a chunk of weight rows: what fits ``budget`` bytes (L2),
    in whole passes of the kernels' widest row count."""
    return _chunk_rows(row_bytes, budget)
