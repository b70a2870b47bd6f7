"""Matmul backends: the seam between the model and the hardware.

A backend turns a stored weight matrix into whatever form it multiplies fastest, once, at load
(:meth:`MatmulBackend.prepare`), and computes ``y = x @ W.T`` at run time
(:meth:`MatmulBackend.matmul`). The model only ever talks to this interface, so the CPU kernels
and the NPU path are interchangeable per matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..gguf_file import TensorInfo


class PreparedWeight:
    """A weight matrix ``W[N, K]`` in a backend's own form. ``n_out`` = N, ``n_in`` = K."""

    name: str
    n_out: int
    n_in: int


class MatmulBackend(ABC):
    name: str = "?"

    @abstractmethod
    def prepare(self, tensor: TensorInfo) -> PreparedWeight:
        """Called once per weight matrix at load time."""

    @abstractmethod
    def matmul(self, x: np.ndarray, w: PreparedWeight, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` float32 ``[M, K]`` (C-contiguous) → float32 ``[M, N]`` = ``x @ W.T``."""


def get_backend(name: str, threads: int | None = None, **options) -> MatmulBackend:
    if name == "cpu":
        from .cpu import CPUBackend
        return CPUBackend(threads=threads, **options)
    raise ValueError(f"unknown matmul backend {name!r} (known: cpu)")
