"""One decode step of the llama family (one token, every layer) in a single numba call.

Decode runs ~20 small operations per layer (norms, four groups of products, biases, RoPE, the
cache write, attention, SiLU, residuals). As separate calls from Python each costs a few
microseconds of dispatch and argument checking, ~2-5 % of a 1.5B step and ~20 % of a 135M one.
Here the whole stack of layers is one call over arrays prepared once: the int8 kernels of
:mod:`rosenblatt.simd` (addresses and weight pointers of each layer's q/k/v, o, gate/up and
down groups), the norm weights and biases stacked per layer, the rope tables and the cache.

It computes exactly what :meth:`LlamaModel.forward` computes for one token with the same
kernels (same quantization, same per-row products, same float32 operations in the same order),
so its logits are bit-identical to the per-operation path; tests/test_llama_step.py checks it.
The plan exists only when every product can run on the int8 kernels (the CPU backend's default);
otherwise, and while :attr:`LlamaModel.profile` collects a per-stage split, the per-operation
path runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import ops, simd

#: the products of one layer, in order: q/k/v, o, gate/up, down
GROUPS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


@njit(nogil=True, cache=True)
def _products(g, xin, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf):
    """Group ``g``'s products of ``xin`` [1, K]: quantize once, then :class:`simd.KernelGroup`'s
    own serial or row-split call on the group's arrays; [1, columns]."""
    simd.quantize_row_into(xin, abuf, fmt[g])
    m = nmat[g]
    buf = abuf.reshape((1, abuf.shape[0]))         # one activation row (its length is not read)
    nblk = xin.shape[1] // fmt[g]
    if parts[g] > 1:
        return simd._group_parallel(f1[g, :m], fr[g, :m], w[g, :m], rb[g, :m], n[g, :m], col[g, :m + 1],
                                    nblk, buf, 1, parts[g])
    return simd._group_serial(f1[g, :m], fr[g, :m], w[g, :m], rb[g, :m], n[g, :m], col[g, :m + 1], nblk, buf, 1)


@njit(nogil=True, cache=True)
def decode_layers(x, pos, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf, attn_norm, ffn_norm, eps,
                  bias, cos, sin, rope_dim, neox, n_heads, n_kv, hd, hd_v, k_cache, v_cache, scale):
    """Run the one-token residual ``x`` [1, d] at position ``pos`` through every layer, in place,
    writing each layer's key and value into ``k_cache``/``v_cache`` [layers, n_kv, n_ctx, hd].

    Group ``4 * layer + i`` holds the layer's i-th product (:data:`GROUPS`); ``bias`` is [layers,
    q+k+v] or has no columns when the model has none."""
    q_dim, k_dim = n_heads * hd, n_kv * hd
    h = np.empty_like(x)
    act = np.empty((1, n_heads * hd_v), np.float32)
    for layer in range(attn_norm.shape[0]):
        g = 4 * layer
        ops.rms_norm(x, attn_norm[layer], eps, h)
        qkv = _products(g, h, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf)
        if bias.shape[1]:
            for i in range(qkv.shape[1]):
                qkv[0, i] += bias[layer, i]
        flat = qkv[0]
        q = flat[:q_dim].reshape((1, n_heads, hd))
        k = flat[q_dim:q_dim + k_dim].reshape((1, n_kv, hd))
        v = flat[q_dim + k_dim:]
        ops.rope(q, cos[pos:pos + 1], sin[pos:pos + 1], rope_dim, neox)
        ops.rope(k, cos[pos:pos + 1], sin[pos:pos + 1], rope_dim, neox)
        for kh in range(n_kv):
            k_cache[layer, kh, pos, :] = k[0, kh]
            v_cache[layer, kh, pos, :] = v[kh * hd_v:(kh + 1) * hd_v]
        ops.attention_decode(q[0], k_cache[layer], v_cache[layer], n_kv, 0, pos + 1, scale,
                             act.reshape((n_heads, hd_v)))
        o = _products(g + 1, act, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf)
        x += o
        ops.rms_norm(x, ffn_norm[layer], eps, h)
        gu = _products(g + 2, h, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf)
        d_ff = gu.shape[1] // 2
        gated = np.empty((1, d_ff), np.float32)
        ops.silu_mul(gu[:, :d_ff], gu[:, d_ff:], gated)
        x += _products(g + 3, gated, f1, fr, w, rb, n, col, nmat, parts, fmt, abuf)


class DecodePlan:
    """The arrays :func:`decode_layers` runs on, built from a model's layers and backend; None
    from :meth:`build` when some product has no int8 kernel group."""

    def __init__(self, groups, model):
        layers, cfg = model.layers, model.cfg
        size = len(groups)
        i64 = lambda: np.zeros((size, 3), np.int64)
        self.f1, self.fr, self.w, self.rb, self.n = i64(), i64(), i64(), i64(), i64()
        self.col = np.zeros((size, 4), np.int64)
        self.nmat, self.parts, self.fmt = (np.zeros(size, np.int64) for _ in range(3))
        self._keep = groups              # the KernelGroups own the weight mappings' references
        for i, (kg, parts) in enumerate(groups):
            m = len(kg.n)
            self.f1[i, :m], self.fr[i, :m], self.w[i, :m] = kg.f1, kg.fr, kg.w
            self.rb[i, :m], self.n[i, :m], self.col[i, :m + 1] = kg.row_bytes, kg.n, kg.col
            self.nmat[i], self.parts[i], self.fmt[i] = m, parts, kg.fmt
        widest = max(cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim_v)
        self.abuf = np.empty(widest // 32 * simd.ACT_BLOCK[simd.Q8_32], np.uint8)   # the larger format
        self.attn_norm = np.stack([L.attn_norm for L in layers])
        self.ffn_norm = np.stack([L.ffn_norm for L in layers])
        self.bias = (np.stack([np.concatenate([L.bq, L.bk, L.bv]) for L in layers]) if cfg.qkv_bias
                     else np.zeros((len(layers), 0), np.float32))
        self.cfg = cfg
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))

    @classmethod
    def build(cls, model) -> "DecodePlan | None":
        decode_group = getattr(model.backend, "decode_group", None)
        if decode_group is None:
            return None
        groups = []
        for L in model.layers:
            for names in GROUPS:
                g = decode_group(tuple(getattr(L, a) for a in names))
                if g is None:
                    return None
                groups.append(g)
        return cls(groups, model)

    def run(self, x: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
            cos: np.ndarray, sin: np.ndarray) -> None:
        c = self.cfg
        decode_layers(x, pos, self.f1, self.fr, self.w, self.rb, self.n, self.col, self.nmat, self.parts,
                      self.fmt, self.abuf, self.attn_norm, self.ffn_norm, c.rms_eps, self.bias, cos, sin,
                      c.rope_dim, c.rope_neox, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim_v,
                      k_cache, v_cache, self.scale)
