"""Key/value cache: preallocated per layer, truncatable (prefix reuse across chat turns)."""

from __future__ import annotations

import numpy as np


class KVCache:
    """``k[layer]``: float32 [n_kv_heads, n_ctx, head_dim]; positions [0, length) are valid."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, head_dim_v: int):
        self.n_ctx = n_ctx
        self.k = [np.zeros((n_kv_heads, n_ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_kv_heads, n_ctx, head_dim_v), dtype=np.float32) for _ in range(n_layers)]
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray):
        """Write k/v [T, n_kv, hd] at positions start.. and return the layer's cache arrays."""
        t = k.shape[0]
        kc, vc = self.k[layer], self.v[layer]
        kc[:, start:start + t] = k.transpose(1, 0, 2)
        vc[:, start:start + t] = v.transpose(1, 0, 2)
        return kc, vc

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the arrays are reused, not cleared)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
