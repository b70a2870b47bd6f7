"""One decode step of the llama family (one token, every layer, the output) in a single numba
call and a single parallel region.

Decode runs ~20 small operations per layer (norms, four groups of products, biases, RoPE, the
cache write, attention, SiLU, residuals). As separate calls from Python each costs a few
microseconds of dispatch and argument checking, ~2-5 % of a 1.5B step and ~20 % of a 135M one.
Here the whole stack of layers is one call over arrays prepared once: the int8 kernels of
:mod:`rosenblatt.simd` (addresses and weight pointers of each layer's q/k/v, o, gate/up and
down groups), the norm weights and biases stacked per layer, the rope tables and the cache.
Its threads share each product out in chunks claimed from atomic counters
(:mod:`rosenblatt.parallel`) instead of starting a parallel region per product.

It computes exactly what :meth:`LlamaModel.forward` computes for one token with the same
kernels (same quantization, same per-row products, same float32 operations in the same order),
so its logits are bit-identical to the per-operation path; tests/test_llama_step.py checks it.
The plan exists only when every product can run on the int8 kernels (the CPU backend's default);
otherwise, and while :attr:`LlamaModel.profile` collects a per-stage split, the per-operation
path runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import ops, parallel, simd

#: the products of one layer, in order: q/k/v, o, gate/up, down
GROUPS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


@njit(nogil=True, cache=True)
def _products(sync, ph, g, f1, fr, w, rb, col, nmat, nchunk, nblk, abuf, out):
    """Phase ``ph``: group ``g``'s one-row products of the quantized activations in ``abuf`` into
    ``out`` [1, columns], as ``nchunk[g]`` chunks of consecutive output rows (a chunk's rows may
    span two matrices). Every row is the kernel's own per-row dot product, so the split does not
    change a bit of the result. Returns the next phase."""
    m, chunks = nmat[g], nchunk[g]
    total = col[g, m]
    x, o = np.int64(abuf.ctypes.data), np.int64(out.ctypes.data)
    while True:
        c = parallel.claim(sync, ph, chunks)
        if c < 0:
            break
        a, b = total * c // chunks, total * (c + 1) // chunks
        for j in range(m):
            lo, hi = max(a, col[g, j]), min(b, col[g, j + 1])
            if lo < hi:
                simd._rows_kernel(f1[g, j], fr[g, j], w[g, j], rb[g, j], lo - col[g, j], hi - col[g, j], nblk, 1,
                                  x, 0, o + 4 * col[g, j], total)
        parallel.done(sync, ph)
    parallel.wait(sync, ph, chunks)
    return ph + 1


@njit(nogil=True, cache=True)
def _run_step(tid, sync, x_in, pos, f1, fr, w, rb, col, nmat, nchunk, fmt, abuf, attn_norm, ffn_norm, eps,
              bias, cos, sin, rope_dim, neox, n_heads, n_kv, hd, hd_v, k_cache, v_cache, scale, x, h, gated, qkv,
              act, o, gu, down, out_norm, logits):
    """Thread ``tid``'s walk through the phases of a step (see :mod:`rosenblatt.parallel`).

    The products and attention are shared out in chunks; the small row operations between them
    (residual adds, norms, SiLU, activation quantization) every thread computes for itself on its
    own copy of the residual (``x[tid]``, ``h[tid]``, ``gated[tid]``, ``abuf[tid]``), the same
    operations on the same values in the same order, so the copies stay identical and no thread
    waits while another does them. The shared rows (``qkv`` .. ``down``) have one row per layer:
    none is written twice in a step, so a thread that falls behind never reads a row another has
    already overwritten. Whichever thread claims the last phase writes the residual back."""
    last = attn_norm.shape[0] * 5 + 1            # phases: 5 a layer, the output product, the write-back
    if parallel.drained(sync, last, 1):
        return                                   # a runtime ran the region's threads one after another
    q_dim, k_dim = n_heads * hd, n_kv * hd
    group = n_heads // n_kv
    d, d_ff = x.shape[2], gated.shape[2]
    xt, ht, gt, at = x[tid], h[tid], gated[tid], abuf[tid]
    xt[:] = x_in
    ph = 0
    for layer in range(attn_norm.shape[0]):
        g = 4 * layer
        if layer:
            xt += down[layer - 1]
        ops.rms_norm(xt, attn_norm[layer], eps, ht)
        simd.quantize_row_into(ht, at, fmt[g])
        ph = _products(sync, ph, g, f1, fr, w, rb, col, nmat, nchunk, d // fmt[g], at, qkv[layer])
        flat = qkv[layer, 0]
        q = flat[:q_dim].reshape((1, n_heads, hd))
        k = flat[q_dim:q_dim + k_dim].reshape((1, n_kv, hd))
        v = flat[q_dim + k_dim:]
        heads_out = act[layer].reshape((n_heads, hd_v))
        while True:                                # per kv head: bias, RoPE, cache, attention
            kh = parallel.claim(sync, ph, n_kv)
            if kh < 0:
                break
            h0, h1 = kh * group, (kh + 1) * group
            if bias.shape[1]:
                for i in range(h0 * hd, h1 * hd):
                    flat[i] += bias[layer, i]
                for i in range(q_dim + kh * hd, q_dim + (kh + 1) * hd):
                    flat[i] += bias[layer, i]
                for i in range(q_dim + k_dim + kh * hd_v, q_dim + k_dim + (kh + 1) * hd_v):
                    flat[i] += bias[layer, i]
            ops.rope(q[:, h0:h1], cos[pos:pos + 1], sin[pos:pos + 1], rope_dim, neox)
            ops.rope(k[:, kh:kh + 1], cos[pos:pos + 1], sin[pos:pos + 1], rope_dim, neox)
            k_cache[layer, kh, pos, :] = k[0, kh]
            v_cache[layer, kh, pos, :] = v[kh * hd_v:(kh + 1) * hd_v]
            ops.attention_decode(q[0, h0:h1], k_cache[layer, kh:kh + 1], v_cache[layer, kh:kh + 1], 1, 0, pos + 1,
                                 scale, heads_out[h0:h1])
            parallel.done(sync, ph)
        parallel.wait(sync, ph, n_kv)
        simd.quantize_row_into(act[layer], at, fmt[g + 1])
        ph = _products(sync, ph + 1, g + 1, f1, fr, w, rb, col, nmat, nchunk, act.shape[2] // fmt[g + 1], at,
                       o[layer])
        xt += o[layer]
        ops.rms_norm(xt, ffn_norm[layer], eps, ht)
        simd.quantize_row_into(ht, at, fmt[g + 2])
        ph = _products(sync, ph, g + 2, f1, fr, w, rb, col, nmat, nchunk, d // fmt[g + 2], at, gu[layer])
        ops.silu_mul(gu[layer, :, :d_ff], gu[layer, :, d_ff:], gt)
        simd.quantize_row_into(gt, at, fmt[g + 3])
        ph = _products(sync, ph, g + 3, f1, fr, w, rb, col, nmat, nchunk, d_ff // fmt[g + 3], at, down[layer])
    xt += down[-1]
    if logits.shape[1]:                          # the output norm and product
        ops.rms_norm(xt, out_norm, eps, ht)
        simd.quantize_row_into(ht, at, fmt[nmat.shape[0] - 1])
        _products(sync, ph, nmat.shape[0] - 1, f1, fr, w, rb, col, nmat, nchunk, d // fmt[nmat.shape[0] - 1],
                  at, logits)
    if parallel.claim(sync, last, 1) == 0:       # a thread that started late finds this claimed
        x_in[:] = xt
        parallel.done(sync, last)


@njit(parallel=True, nogil=True, cache=True)
def decode_layers(threads, sync, x_in, pos, f1, fr, w, rb, col, nmat, nchunk, fmt, abuf, attn_norm, ffn_norm,
                  eps, bias, cos, sin, rope_dim, neox, n_heads, n_kv, hd, hd_v, k_cache, v_cache, scale, x, h, gated,
                  qkv, act, o, gu, down, out_norm, logits):
    """Run the one-token residual ``x_in`` [1, d] at position ``pos`` through every layer, in
    place, writing each layer's key and value into ``k_cache``/``v_cache`` [layers, n_kv, n_ctx,
    hd]; then, if ``logits`` has columns, the output norm and product into it. One parallel
    region of ``threads`` threads (none for one).

    Group ``4 * layer + i`` holds the layer's i-th product (:data:`GROUPS`), the last group the
    output; ``bias`` is [layers, q+k+v] or has no columns when the model has none. ``x``, ``h``,
    ``gated``, ``abuf`` are per-thread scratch rows [threads, ...], ``qkv`` .. ``down`` shared ones
    [layers, 1, ...]; ``sync`` the phase counters (zeroed here)."""
    sync[:] = 0
    if threads == 1:
        _run_step(np.int64(0), sync, x_in, pos, f1, fr, w, rb, col, nmat, nchunk, fmt, abuf, attn_norm,
                  ffn_norm, eps, bias, cos, sin, rope_dim, neox, n_heads, n_kv, hd, hd_v, k_cache, v_cache, scale,
                  x, h, gated, qkv, act, o, gu, down, out_norm, logits)
        return
    for tid in prange(threads):
        _run_step(np.int64(tid), sync, x_in, pos, f1, fr, w, rb, col, nmat, nchunk, fmt, abuf, attn_norm,
                  ffn_norm, eps, bias, cos, sin, rope_dim, neox, n_heads, n_kv, hd, hd_v, k_cache, v_cache, scale,
                  x, h, gated, qkv, act, o, gu, down, out_norm, logits)


#: weight bytes per chunk of a product phase (a few tens of microseconds of work: claiming a
#: chunk costs well under one); at most MAX_CHUNKS chunks a product
CHUNK_BYTES, MAX_CHUNKS = 1 << 16, 64


class DecodePlan:
    """The arrays :func:`decode_layers` runs on, built from a model's layers and backend; None
    from :meth:`build` when some product has no int8 kernel group. The output product joins the
    step when it has a group too (else the model computes the logits after the step)."""

    def __init__(self, groups, model, threads: int, with_output: bool):
        layers, cfg = model.layers, model.cfg
        size = len(groups)
        i64 = lambda: np.zeros((size, 3), np.int64)
        self.f1, self.fr, self.w, self.rb = i64(), i64(), i64(), i64()
        self.col = np.zeros((size, 4), np.int64)
        self.nmat, self.nchunk, self.fmt = (np.zeros(size, np.int64) for _ in range(3))
        self._keep = groups              # the KernelGroups own the weight mappings' references
        for i, kg in enumerate(groups):
            m = len(kg.n)
            self.f1[i, :m], self.fr[i, :m], self.w[i, :m] = kg.f1, kg.fr, kg.w
            self.rb[i, :m], self.col[i, :m + 1] = kg.row_bytes, kg.col
            self.nmat[i], self.fmt[i] = m, kg.fmt
            weight_bytes = int((kg.n * kg.row_bytes).sum())
            self.nchunk[i] = 1 if threads == 1 else min(MAX_CHUNKS, max(threads, weight_bytes // CHUNK_BYTES))
        self.threads, self.with_output = threads, with_output
        widest = max(cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim_v)
        self.attn_norm = np.stack([L.attn_norm for L in layers])
        self.ffn_norm = np.stack([L.ffn_norm for L in layers])
        self.out_norm = model.out_norm
        self.bias = (np.stack([np.concatenate([L.bq, L.bk, L.bv]) for L in layers]) if cfg.qkv_bias
                     else np.zeros((len(layers), 0), np.float32))
        self.cfg = cfg
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        f32 = lambda *shape: np.empty(shape, np.float32)
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * (cfg.head_dim + cfg.head_dim_v)
        t = threads
        self.abuf = np.empty((t, widest // 32 * simd.ACT_BLOCK[simd.Q8_32]), np.uint8)   # the larger format
        self.private = (f32(t, 1, cfg.d_model), f32(t, 1, cfg.d_model), f32(t, 1, cfg.d_ff))      # x, h, gated
        L = len(layers)
        # qkv, act, o, gu, down: a row per layer, none written twice in a step
        self.shared = (f32(L, 1, q_dim + kv_dim), f32(L, 1, cfg.n_heads * cfg.head_dim_v), f32(L, 1, cfg.d_model),
                       f32(L, 1, 2 * cfg.d_ff), f32(L, 1, cfg.d_model))
        self.sync = parallel.new_sync(L * 5 + 2)
        self.no_logits = f32(1, 0)
        self.vocab = int(groups[-1].col[-1]) if with_output else 0

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
        out = decode_group((model.output,))
        if out is not None:
            groups.append(out)
        return cls(groups, model, max(1, int(getattr(model.backend, "threads", 1))), out is not None)

    def run(self, x: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
            cos: np.ndarray, sin: np.ndarray, logits: bool = False) -> np.ndarray | None:
        """The step on ``x`` [1, d] in place; with ``logits`` (and the output in the plan) the
        logits [1, vocab], else None (the caller computes them from ``x``)."""
        c = self.cfg
        out = np.empty((1, self.vocab), np.float32) if logits and self.with_output else self.no_logits
        decode_layers(self.threads, self.sync, x, pos, self.f1, self.fr, self.w, self.rb, self.col,
                      self.nmat, self.nchunk, self.fmt, self.abuf, self.attn_norm, self.ffn_norm, c.rms_eps,
                      self.bias, cos, sin, c.rope_dim, c.rope_neox, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim_v,
                      k_cache, v_cache, self.scale, *self.private, *self.shared, self.out_norm, out)
        return out if out.shape[1] else None
