"""Matmul backends: the seam between the model and the hardware.

A backend turns a stored weight matrix into whatever form it multiplies fastest, once, at load
(:meth:`MatmulBackend.prepare`), and computes ``y = x @ W.T`` at run time
(:meth:`MatmulBackend.matmul`). The model only ever talks to this interface, so the CPU kernels
and the NPU path are interchangeable per matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..gguf.file import TensorInfo


class PreparedWeight:
    """A weight matrix ``W[N, K]`` in a backend's own form. ``n_out`` = N, ``n_in`` = K."""

    name: str
    n_out: int
    n_in: int


@dataclass
class MatmulNode:
    """Products of one input with several weights (``[x @ W.T for W in ws]``) in a graph of
    such nodes (:meth:`MatmulBackend.run_graph`). ``x()`` returns the float32 input [rows, K]; it is
    called once every node of ``deps`` (indices of earlier nodes) is done. ``done(ys)`` receives
    the products, in the order of ``ws``."""

    x: Callable[[], np.ndarray]
    ws: tuple
    rows: int
    deps: tuple = ()
    done: Callable[[list], None] | None = None


class MatmulBackend(ABC):
    name: str = "?"

    @abstractmethod
    def prepare(self, tensor: TensorInfo) -> PreparedWeight:
        """Called once per weight matrix at load time."""

    @abstractmethod
    def matmul(self, x: np.ndarray, w: PreparedWeight, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` float32 ``[M, K]`` (C-contiguous) → float32 ``[M, N]`` = ``x @ W.T``."""

    def matmul_many(self, x: np.ndarray, ws: tuple[PreparedWeight, ...]) -> list[np.ndarray]:
        """``[x @ W.T for W in ws]``: products of one input (q/k/v, gate/up), which a backend may
        run together (one activation quantization, one parallel region)."""
        return [self.matmul(x, w) for w in ws]

    def graph_chunk(self, rows: int) -> int:
        """Rows per chunk when a model should run a ``rows``-row forward's products as a graph
        (:meth:`run_graph`) over chunks of that many rows; 0: run it operation by operation."""
        return 0

    def run_graph(self, nodes: list[MatmulNode]) -> None:
        """Run a graph of :class:`MatmulNode` (each node's ``deps`` earlier nodes). Here: node by
        node, in order; a backend may group the independent ones (the NPU: one SUBMIT per level)."""
        for n in nodes:
            ys = self.matmul_many(np.ascontiguousarray(n.x(), dtype=np.float32), n.ws)
            if n.done is not None:
                n.done(ys)

    def decode_group(self, ws: tuple[PreparedWeight, ...]):
        """A prepared group of integer kernels (:class:`rosenblatt.cpu.KernelGroup`) for products
        of ``ws`` with up to :meth:`fused_rows` activation rows, run inside numba by a model's
        fused layers on the backend's ``threads``; None when this backend has none for them (the
        model then calls :meth:`matmul_many`)."""
        return None

    def fused_rows(self) -> int:
        """The most activation rows for which :meth:`decode_group`'s kernels are what this backend
        would compute the products with (the model runs larger calls op by op)."""
        return 0


def get_backend(name: str, threads: int | None = None, npu_min_rows: int | None = None, **options) -> MatmulBackend:
    """``"cpu"``; ``"npu"`` (the rocket device, an error if there is none), ``"npu-sim"`` (the
    simulator) or ``"auto"`` (the NPU if present, else the CPU with a notice). ``npu_min_rows``:
    products with fewer activation rows run on the CPU (NPU backends only; see backends/npu.py)."""
    if name == "cpu":
        from .cpu import CPUBackend
        return CPUBackend(threads=threads, **options)
    if name in ("npu", "npu-sim", "auto"):
        from .npu import open_npu_backend
        return open_npu_backend(name, threads=threads, min_rows=npu_min_rows, **options)
    raise ValueError(f"unknown matmul backend {name!r} (known: cpu, npu, npu-sim, auto)")
