"""Key/value cache: preallocated per layer (memory committed as positions are written), truncatable."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np


def _lazy_zeros(shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """float32 zero arrays of ``shapes`` in one anonymous mapping: pages are committed on first write.

    ``np.zeros`` of a few MiB may come from the malloc heap, which zero-fills (touches) all of
    it; a 4096-position cache of a 1.5B model is 224 MiB of which a short chat writes a few MiB.
    """
    sizes = [int(np.prod(s)) * 4 for s in shapes]
    buf = mmap.mmap(-1, max(1, sum(sizes)), flags=mmap.MAP_PRIVATE)   # anonymous, zero-filled on demand
    out, pos = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(np.frombuffer(buf, dtype=np.float32, count=size // 4, offset=pos).reshape(shape))
        pos += size
    return out


#: the local pool of a cache without sliding-window layers
_EMPTY_LOCAL = np.zeros((1, 0, 1, 0, 1), np.float32)


class KVCache:
    """``k[layer]``: float32 [n_kv_heads, n_ctx, head_dim]; positions [0, length) are valid.

    A cache is slot :attr:`slot` of a pool (:meth:`pool`): the pool's keys are one
    [slots, n_layers, n_kv_heads, n_ctx, head_dim] array (:attr:`pool_k`), so that one call can
    run several sequences, each row reading and writing its own slot. A cache made alone is the
    only slot of its own pool."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, head_dim_v: int,
                 _pool: tuple[np.ndarray, np.ndarray, int] | None = None):
        self.n_ctx = n_ctx
        if _pool is None:
            _pool = (*_lazy_zeros([(1, n_layers, n_kv_heads, n_ctx, head_dim),
                                   (1, n_layers, n_kv_heads, n_ctx, head_dim_v)]), 0)
        #: the pool's keys / values [slots, n_layers, n_kv_heads, n_ctx, head_dim], this cache's slot
        self.pool_k, self.pool_v, self.slot = _pool
        #: every layer's keys / values as one [n_layers, n_kv_heads, n_ctx, head_dim] array
        self.k_all, self.v_all = self.pool_k[self.slot], self.pool_v[self.slot]
        self.k, self.v = list(self.k_all), list(self.v_all)
        self.offset = [0] * n_layers     # position held at index 0 of each layer's arrays
        self.length = 0
        #: for the fused layers: each layer's arrays are ``pool_k[slot, index[layer]]``, or
        #: ``pool_kl[slot, index[layer]]`` where ``local[layer]`` (none here)
        self.pool_kl, self.pool_vl = _EMPTY_LOCAL, _EMPTY_LOCAL
        self.index = np.arange(n_layers, dtype=np.int64)
        self.local = np.zeros(n_layers, np.int64)

    @classmethod
    def pool(cls, slots: int, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int,
             head_dim_v: int) -> list["KVCache"]:
        """``slots`` caches in one mapping (memory committed as positions are written)."""
        k, v = _lazy_zeros([(slots, n_layers, n_kv_heads, n_ctx, head_dim),
                            (slots, n_layers, n_kv_heads, n_ctx, head_dim_v)])
        return [cls(n_layers, n_kv_heads, n_ctx, head_dim, head_dim_v, _pool=(k, v, s)) for s in range(slots)]

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

    def copy_from(self, other: "KVCache", length: int) -> None:
        """Become ``other``'s first ``length`` positions (the same bits: a shared prompt's keys
        and values computed once)."""
        if type(other) is not KVCache or type(self) is not KVCache or not 0 <= length <= other.length:
            raise ValueError("copy_from needs two plain caches and a length within the source's")
        self.k_all[:, :, :length] = other.k_all[:, :, :length]
        self.v_all[:, :, :length] = other.v_all[:, :, :length]
        self.length = length

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the arrays are reused, not cleared)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def reusable(self, length: int) -> int:
        """The longest prefix, at most ``length`` positions, that :meth:`truncate` can keep."""
        return length

    #: whether every layer's arrays are still in the pools (the fused layers need them there)
    pooled = True

    def make_room(self, start: int, t: int) -> bool:
        """Before the fused layers write positions ``start``..``start + t - 1`` themselves: False
        if they would not fit without growing arrays (run such a call operation by operation)."""
        return True


class SlidingWindowKVCache(KVCache):
    """A cache whose sliding-window layers keep only recent positions (gemma3's local layers).

    ``windows[layer] = w > 0``: the layer's queries see the last ``w`` positions only (their own
    included), so its arrays hold about ``3 w`` positions instead of ``n_ctx``: positions
    ``[offset[layer], length)`` at indices ``[0, length - offset[layer])``. When new positions do
    not fit, the ``w - 1`` positions the new queries still need, and up to ``w`` older ones (so that
    truncating back a little stays possible), move to the front; a call storing more than fits
    grows the arrays (that layer then leaves the pool until :meth:`reset`). Layers with ``w = 0``
    keep every position, as in :class:`KVCache`. Truncating to a length whose window was already
    dropped is refused (:meth:`reusable` is 0).

    As :class:`KVCache`, a cache is a slot of a pool (:meth:`pool`): the global layers' arrays
    in ``pool_k`` [slots, global layers, n_kv_heads, n_ctx, head_dim], the local ones' in
    ``pool_kl`` [slots, local layers, n_kv_heads, ~3 w, head_dim].
    """

    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, head_dim_v: int,
                 windows: Sequence[int], _pool: tuple | None = None):
        if len(windows) != n_layers:
            raise ValueError(f"{len(windows)} windows for {n_layers} layers")
        self.n_ctx = n_ctx
        self.windows = [int(w) for w in windows]
        if _pool is None:
            _pool = (*self._pools(1, n_kv_heads, n_ctx, head_dim, head_dim_v, self.windows), 0)
        self.pool_k, self.pool_v, self.pool_kl, self.pool_vl, self.slot = _pool
        self.local = np.array([1 if w else 0 for w in self.windows], np.int64)
        self.index = np.zeros(n_layers, np.int64)
        for flag in (0, 1):
            at = np.flatnonzero(self.local == flag)
            self.index[at] = np.arange(len(at))
        self.reset()

    @staticmethod
    def _pools(slots, n_kv_heads, n_ctx, head_dim, head_dim_v, windows):
        g = sum(1 for w in windows if not w)
        local = [w for w in windows if w]
        size = min(n_ctx, 3 * max(local)) if local else 0
        return _lazy_zeros([(slots, g, n_kv_heads, n_ctx, head_dim), (slots, g, n_kv_heads, n_ctx, head_dim_v),
                            (slots, len(local), n_kv_heads, size, head_dim),
                            (slots, len(local), n_kv_heads, size, head_dim_v)])

    @classmethod
    def pool(cls, slots: int, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, head_dim_v: int,
             windows: Sequence[int]) -> list["SlidingWindowKVCache"]:
        """``slots`` caches in one mapping (memory committed as positions are written)."""
        pools = cls._pools(slots, n_kv_heads, n_ctx, head_dim, head_dim_v, [int(w) for w in windows])
        return [cls(n_layers, n_kv_heads, n_ctx, head_dim, head_dim_v, windows, _pool=(*pools, s))
                for s in range(slots)]

    def _link(self) -> None:
        """Each layer's arrays as views of the pools (every local layer the first ~3 w positions
        of the local pool's length, which the largest window sets)."""
        self.k, self.v = [], []
        for layer, w in enumerate(self.windows):
            i = self.index[layer]
            if w:
                n = min(self.n_ctx, 3 * w)
                self.k.append(self.pool_kl[self.slot, i, :, :n])
                self.v.append(self.pool_vl[self.slot, i, :, :n])
            else:
                self.k.append(self.pool_k[self.slot, i])
                self.v.append(self.pool_v[self.slot, i])
        self.pooled = True

    def _keep(self, layer: int, start: int) -> int:
        """The first position a local ``layer`` keeps once positions from ``start`` on are
        written: the window of position ``start``, and ``w`` older positions."""
        return max(self.offset[layer], start - 2 * self.windows[layer] + 1)

    def _room(self, layer: int, start: int, t: int) -> None:
        """Make the local ``layer``'s arrays hold positions up to ``start + t``: old ones dropped to
        the front as the class describes, the arrays grown if that is not enough."""
        kc, vc, first = self.k[layer], self.v[layer], self.offset[layer]
        if start + t - first <= kc.shape[1]:
            return
        keep = self._keep(layer, start)
        more = start + t - keep - kc.shape[1]
        if more > 0:
            kc = self.k[layer] = np.concatenate([kc, np.zeros((kc.shape[0], more, kc.shape[2]), kc.dtype)], 1)
            vc = self.v[layer] = np.concatenate([vc, np.zeros((vc.shape[0], more, vc.shape[2]), vc.dtype)], 1)
            self.pooled = False
        kc[:, :start - keep] = kc[:, keep - first:start - first]
        vc[:, :start - keep] = vc[:, keep - first:start - first]
        self.offset[layer] = keep

    def make_room(self, start: int, t: int) -> bool:
        local = [layer for layer, w in enumerate(self.windows) if w]
        if not self.pooled or any(start + t - self._keep(i, start) > self.k[i].shape[1] for i in local):
            return False
        for i in local:
            self._room(i, start, t)
        return True

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray):
        if not self.windows[layer]:
            return super().store(layer, start, k, v)
        t = k.shape[0]
        self._room(layer, start, t)
        kc, vc, first = self.k[layer], self.v[layer], self.offset[layer]
        kc[:, start - first:start - first + t] = k.transpose(1, 0, 2)
        vc[:, start - first:start - first + t] = v.transpose(1, 0, 2)
        return kc, vc

    def reusable(self, length: int) -> int:
        ok = all(max(0, length - w + 1) >= first for w, first in zip(self.windows, self.offset) if w)
        return length if ok else 0

    def reset(self) -> None:
        self.length = 0
        self.offset = [0] * len(self.windows)
        self._link()

    def truncate(self, length: int) -> None:
        if 0 <= length <= self.length and self.reusable(length) != length:
            raise ValueError(f"cannot truncate to {length} positions: sliding-window layers have dropped "
                             f"keys that position {length} attends to (reset and evaluate again)")
        super().truncate(length)
        if length == 0:
            self.reset()
