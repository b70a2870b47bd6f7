"""The llama family's layers over T rows in a single numba call and a single parallel region:
a decode step (T = 1), a prompt chunk (T consecutive positions of one sequence) and a batched
decode step (T sequences, each at its own position in its own cache slot) are the same code.

A row is one token: its residual, its position and the cache slot it reads and writes. Per
layer the rows go through the same operations :meth:`LlamaModel._layers` applies one by one
(RMS norm, activation quantization, the q/k/v products, biases, RoPE, the cache write,
attention, the o product, RMS norm, gate/up, SiLU gating, down), then the output norm and
product for the rows that want logits. The products read each weight row once for all T rows
(the CPU backend's int8 kernels, :mod:`rosenblatt.backends.fused`, several activation rows
per pass), so a batch of
sequences costs little more weight traffic than one.

Work sharing (:mod:`rosenblatt.cpu.parallel`): the products are cut into chunks of weights
(a few of ~1 MiB or more a thread when every row of the call is one pass of the kernels, so each
thread streams long runs of weights; ~64 KiB when the rows take several passes over a chunk,
which then stays in L2), attention into (row, kv head) pairs, the row operations into rows. With one row the
row operations are cheaper than a wait: every thread then repeats them on its own copy of the
residual (the same operations on the same values, so the copies stay identical) and the shared
rows have one row per layer, so that a thread that falls behind never reads a row another has
already overwritten for the next layer. With several rows every read of shared data happens
inside a chunk, after the previous phase's wait, so the shared rows are reused by every layer.

Every sum has one written order (:mod:`rosenblatt.cpu.ops`, the backend's kernels): a row's
results are the same bits whether it runs alone, in a prompt chunk of any size, in a batch, or
op by op through :meth:`LlamaModel._layers`; tests/unit/test_llama_step.py checks it. The plan exists
only when every product can run on the int8 kernels (the CPU backend's default); otherwise, and
when :attr:`LlamaModel.fused` is off or the caller passes its own stage functions (a
profiler's), the per-operation path runs.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided
from numba import njit, prange

from ..cpu import ops, parallel
from ..backends import fused
from ..cpu import jit
from ..cpu.jit import call_native, native_address

#: the products of one layer, in order: q/k/v, o, gate/up, down
GROUPS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
#: phases a layer: norm, q/k/v, bias+RoPE+cache, attention, quantize, o, norm, gate/up, SiLU, down
LAYER_PHASES = 10


@njit(nogil=True, cache=True)
def _products(sync, ph, g, f1, fr, w, rb, col, nmat, nchunk, mchunk, nblk, abuf, r0, r1, out):
    """Phase ``ph``: group ``g``'s products of the quantized activation rows ``abuf[r0:r1]`` into
    ``out`` [r1 - r0, columns], as ``nchunk[g]`` chunks of consecutive output rows (a chunk's rows
    may span two matrices), each over the activation rows ``mchunk[g]`` at a time (kept in
    L2 while the chunk's weight rows pass). Every output is the kernel's own per-row dot product,
    so the split does not change a bit of it. Returns the next phase."""
    m, chunks, step = nmat[g], nchunk[g], mchunk[g]
    total = col[g, m]
    sx = np.int64(abuf.strides[0])
    x, o = np.int64(abuf.ctypes.data) + r0 * sx, np.int64(out.ctypes.data)
    rows = r1 - r0
    while True:
        c = parallel.claim(sync, ph, chunks)
        if c < 0:
            break
        a, b = fused.split_point(total, c, chunks), fused.split_point(total, c + 1, chunks)
        for m0 in range(0, rows, step):
            mc = min(step, rows - m0)
            for j in range(m):
                lo, hi = max(a, col[g, j]), min(b, col[g, j + 1])
                if lo < hi:
                    fused.rows_product(f1[g, j], fr[g, j], w[g, j], rb[g, j], lo - col[g, j], hi - col[g, j], nblk,
                                      mc, x + m0 * sx, sx, o + 4 * (m0 * total + col[g, j]), total)
        parallel.done(sync, ph)
    parallel.wait(sync, ph, chunks)
    return ph + 1


@njit(nogil=True, cache=True, inline="always")
def _norm_quantize(x, t, weight, eps, h, abuf, fmt):
    """Row t: h = rms_norm(x) * weight, quantized into abuf[t]."""
    ops.rms_norm(x[t:t + 1], weight, eps, h[t:t + 1])
    fused.quantize_row(h[t:t + 1], abuf[t], fmt)


@njit(nogil=True, cache=True, inline="always")
def _copy(src, dst):
    """dst[:] = src for 1-D rows of one length (a loop: numba's broadcasting assignment compiles
    an error path that costs seconds on a first run)."""
    for i in range(dst.shape[0]):
        dst[i] = src[i]


@njit(nogil=True, cache=True, inline="always")
def _add(src, dst):
    """dst += src for 1-D rows of one length (see :func:`_copy`)."""
    for i in range(dst.shape[0]):
        dst[i] += src[i]


@njit(nogil=True, cache=True, inline="always")
def _attend(qv, kc, vc, heads_out, s, t, kh, p, off, group, window, scale, dots):
    """Row t's query heads of kv head ``kh`` against positions 0..p (the last ``window`` of them
    when ``window`` > 0) of its layer's cache arrays ``kc``/``vc``, which hold position ``off`` at
    index 0."""
    h0, h1 = kh * group, (kh + 1) * group
    lo = max(0, p - window + 1) if window > 0 else 0
    ops.attention_decode(qv[s, t, h0:h1], kc[kh:kh + 1], vc[kh:kh + 1], 1, lo - off, p + 1 - off, scale,
                         heads_out[s, t, h0:h1], dots)


@njit(nogil=True, cache=True, inline="always")
def _layer_cache(k_cache, v_cache, kl_cache, vl_cache, lidx, lloc, sl, layer):
    """A layer's keys and values [n_kv, positions, hd] in cache slot ``sl``: from the local pool
    for a sliding-window layer of a bounded cache, else from the global one."""
    i = lidx[layer]
    if lloc[layer]:
        return kl_cache[sl, i], vl_cache[sl, i]
    return k_cache[sl, i], v_cache[sl, i]


@njit(nogil=True, cache=True, inline="always")
def _add_normed(src, t, post, eps, h, x):
    """x[t] += src[t] (a sub-block's output), through rms_norm(src[t]) * post first when ``post``
    has a weight (gemma3's post-norms); ``h`` is the row's scratch (private with one row)."""
    if post.shape[0]:
        ops.rms_norm(src[t:t + 1], post, eps, h[t:t + 1])
        _add(h[t], x[t])
    else:
        _add(src[t], x[t])


# A row phase: ``t = _row_first(..)``, ``while t >= 0: <row t>; t = _row_next(..)``, then
# ``ph = _row_end(..)``. With ``rep`` (one row, repeated by every thread) row 0 once and no
# counter is touched; else the rows of ``n`` are claimed one by one and waited for.
@njit(nogil=True, cache=True, inline="always")
def _row_first(sync, ph, rep, n):
    return 0 if rep else parallel.claim(sync, ph, n)


@njit(nogil=True, cache=True, inline="always")
def _row_next(sync, ph, rep, n):
    if rep:
        return -1
    parallel.done(sync, ph)
    return parallel.claim(sync, ph, n)


@njit(nogil=True, cache=True, inline="always")
def _row_end(sync, ph, rep, n):
    if not rep:
        parallel.wait(sync, ph, n)
    return ph + 1


@njit(nogil=True, cache=True)
def _run(tid, sync, x_in, pos, slot, n_logits, f1, fr, w, rb, col, nmat, nchunk, mchunk, fmt, attn_norm, ffn_norm,
         eps, bias, qk_norm, post_attn, post_ffn, window, rope_sel, gelu, cos, sin, rope_dim, neox, n_heads, n_kv, hd,
         hd_v, k_cache, v_cache, kl_cache, vl_cache, lidx, lloc, koff, scale, dots, xp, hp, gp, ap, hs, gs, as_, qkv,
         act, o, gu, down, qv, kv, heads_out, out_norm, logits):
    """Thread ``tid``'s walk through the phases (see the module docstring and :func:`run_rows`).

    Per layer: ``qk_norm[layer]`` the q and k weights of a per-head RMS norm before RoPE and
    ``post_attn[layer]``, ``post_ffn[layer]`` those of the attention's and the FFN's output
    norms (gemma3; empty for llama), ``window[layer]`` the keys a query sees (0: all),
    ``rope_sel[layer]`` its RoPE table in ``cos``/``sin``; ``gelu``: GELU gating through this
    table (``ops.GELU_F16``), or SiLU where it is empty.
    The cache: layer i of slot s is ``k_cache[s, lidx[i]]``, or ``kl_cache[s, lidx[i]]`` where
    ``lloc[i]`` (a bounded cache's sliding-window layer), whose index 0 holds position
    ``koff[t, i]`` for row t."""
    n_layers = attn_norm.shape[0]
    last = n_layers * LAYER_PHASES + 2           # phases: the layers, the output's two, the write-back
    if parallel.drained(sync, last, 1):
        return                                   # a runtime ran the region's threads one after another
    T = x_in.shape[0]
    rep = T == 1
    if rep:                                      # one row: private copies, shared rows one per layer
        x, h, gated, abuf = xp[tid], hp[tid], gp[tid], ap[tid]
        _copy(x_in[0], x[0])
    else:
        x, h, gated, abuf = x_in, hs, gs, as_
    q_dim, k_dim = n_heads * hd, n_kv * hd
    group = n_heads // n_kv
    d, d_ff = x.shape[1], gated.shape[1]
    nb = qkv.shape[0]                             # shared-row sets: one a layer (rep) or one for all
    ph = 0
    for layer in range(n_layers):
        g, s = 4 * layer, layer % nb
        # 1. residual + down of the previous layer, attention norm, quantization
        t = _row_first(sync, ph, rep, T)
        while t >= 0:
            if layer:
                _add_normed(down[(layer - 1) % nb], t, post_ffn[layer - 1], eps, h, x)
            _norm_quantize(x, t, attn_norm[layer], eps, h, abuf, fmt[g])
            t = _row_next(sync, ph, rep, T)
        ph = _row_end(sync, ph, rep, T)
        ph = _products(sync, ph, g, f1, fr, w, rb, col, nmat, nchunk, mchunk, d // fmt[g], abuf, 0, T, qkv[s])
        # 3. per (row, kv head): biases, RoPE, the cache write (and, for one row, attention)
        while True:
            c = parallel.claim(sync, ph, T * n_kv)
            if c < 0:
                break
            t, kh = c // n_kv, c % n_kv
            p, sl = pos[t], slot[t]
            flat = qkv[s, t]
            v = flat[q_dim + k_dim:]
            h0, h1 = kh * group, (kh + 1) * group
            if bias.shape[1]:
                for i in range(h0 * hd, h1 * hd):
                    flat[i] += bias[layer, i]
                for i in range(q_dim + kh * hd, q_dim + (kh + 1) * hd):
                    flat[i] += bias[layer, i]
                for i in range(q_dim + k_dim + kh * hd_v, q_dim + k_dim + (kh + 1) * hd_v):
                    flat[i] += bias[layer, i]
            if qk_norm.shape[1]:
                ops.rms_norm(qv[s, t, h0:h1], qk_norm[layer, 0], eps, qv[s, t, h0:h1])
                ops.rms_norm(kv[s, t, kh:kh + 1], qk_norm[layer, 1], eps, kv[s, t, kh:kh + 1])
            rs = rope_sel[layer]
            ops.rope(qv[s, t:t + 1, h0:h1], cos[rs, p:p + 1], sin[rs, p:p + 1], rope_dim, neox)
            ops.rope(kv[s, t:t + 1, kh:kh + 1], cos[rs, p:p + 1], sin[rs, p:p + 1], rope_dim, neox)
            kc, vc = _layer_cache(k_cache, v_cache, kl_cache, vl_cache, lidx, lloc, sl, layer)
            off = koff[t, layer]
            _copy(kv[s, t, kh], kc[kh, p - off])
            _copy(v[kh * hd_v:(kh + 1) * hd_v], vc[kh, p - off])
            if rep:
                _attend(qv, kc, vc, heads_out, s, t, kh, p, off, group, window[layer], scale, dots)
            parallel.done(sync, ph)
        parallel.wait(sync, ph, T * n_kv)
        ph += 1
        # 4. attention per (row, kv head), once every row's keys are in the cache
        if not rep:
            while True:
                c = parallel.claim(sync, ph, T * n_kv)
                if c < 0:
                    break
                t, kh = c // n_kv, c % n_kv
                kc, vc = _layer_cache(k_cache, v_cache, kl_cache, vl_cache, lidx, lloc, slot[t], layer)
                _attend(qv, kc, vc, heads_out, s, t, kh, pos[t], koff[t, layer], group, window[layer], scale, dots)
                parallel.done(sync, ph)
            parallel.wait(sync, ph, T * n_kv)
        ph += 1
        # 5. the attention output quantized, its product
        t = _row_first(sync, ph, rep, T)
        while t >= 0:
            fused.quantize_row(act[s, t:t + 1], abuf[t], fmt[g + 1])
            t = _row_next(sync, ph, rep, T)
        ph = _row_end(sync, ph, rep, T)
        ph = _products(sync, ph, g + 1, f1, fr, w, rb, col, nmat, nchunk, mchunk, act.shape[2] // fmt[g + 1],
                       abuf, 0, T, o[s])
        # 7. residual + o, FFN norm, quantization, gate/up
        t = _row_first(sync, ph, rep, T)
        while t >= 0:
            _add_normed(o[s], t, post_attn[layer], eps, h, x)
            _norm_quantize(x, t, ffn_norm[layer], eps, h, abuf, fmt[g + 2])
            t = _row_next(sync, ph, rep, T)
        ph = _row_end(sync, ph, rep, T)
        ph = _products(sync, ph, g + 2, f1, fr, w, rb, col, nmat, nchunk, mchunk, d // fmt[g + 2], abuf, 0, T,
                       gu[s])
        # 9. SiLU gating, quantization, down
        t = _row_first(sync, ph, rep, T)
        while t >= 0:
            ops.gate_row(gu[s], t, d_ff, gelu, gated)
            fused.quantize_row(gated[t:t + 1], abuf[t], fmt[g + 3])
            t = _row_next(sync, ph, rep, T)
        ph = _row_end(sync, ph, rep, T)
        ph = _products(sync, ph, g + 3, f1, fr, w, rb, col, nmat, nchunk, mchunk, d_ff // fmt[g + 3], abuf, 0, T,
                       down[s])
    # the last layer's residual, and the output norm + product of the last n_logits rows
    s, first = (n_layers - 1) % nb, T - n_logits
    og = nmat.shape[0] - 1
    t = _row_first(sync, ph, rep, T)
    while t >= 0:
        _add_normed(down[s], t, post_ffn[n_layers - 1], eps, h, x)
        if t >= first:
            _norm_quantize(x, t, out_norm, eps, h, abuf, fmt[og])
        t = _row_next(sync, ph, rep, T)
    ph = _row_end(sync, ph, rep, T)
    if n_logits:
        _products(sync, ph, og, f1, fr, w, rb, col, nmat, nchunk, mchunk, d // fmt[og], abuf, first, T, logits)
    if parallel.claim(sync, last, 1) == 0:       # a thread that started late finds this claimed
        if rep:
            _copy(x[0], x_in[0])
        parallel.done(sync, last)


@njit(parallel=True, nogil=True, cache=True)
def run_rows(threads, run, args):
    """Threads 0 .. ``threads`` - 1 each walk :func:`_run` (``run``: its native address, see
    :func:`jit.call_native`, which keeps the step's code out of this function's module) with
    ``args``: the arguments of :func:`_run` after ``tid``. One parallel region;
    :meth:`FusedPlan.run` calls :func:`_run` directly for one thread."""
    args[0][:] = 0                              # sync
    for tid in prange(threads):
        call_native(run, (np.int64(tid),) + args)


#: weight bytes per chunk of a product phase whose activation rows take several passes (each
#: chunk's weights stay in L2 between them); at most MAX_CHUNKS chunks a product
CHUNK_BYTES, MAX_CHUNKS = 1 << 16, 64
#: the same when the call's rows are one pass (decode, a batched step, short prompts): chunks of
#: at least STREAM_CHUNK_BYTES, at most STREAM_CHUNKS a thread. Each chunk starts a new stream for
#: the hardware prefetchers; 64 KiB chunks made the 1.5B shape's one-row step 25.3 ms against
#: 22.2 ms with these (2 threads, alternating, docs/performance.md)
STREAM_CHUNK_BYTES, STREAM_CHUNKS = 1 << 20, 4
#: int8 activation bytes a product keeps in L2 while a chunk's weight rows pass over them
ACT_CHUNK_BYTES = 1 << 18


class FusedPlan:
    """The arrays :func:`run_rows` runs on, built from a model's layers and backend; None from
    :meth:`build` when some product has no int8 kernel group. The output product joins the call
    when it has a group too (else the model computes the logits after the layers)."""

    def __init__(self, groups, model, threads: int, with_output: bool):
        layers, cfg = model.layers, model.cfg
        size = len(groups)
        i64 = lambda: np.zeros((size, 3), np.int64)
        self.f1, self.fr, self.w, self.rb = i64(), i64(), i64(), i64()
        self.col = np.zeros((size, 4), np.int64)
        self.nmat, self.nchunk, self.mchunk, self.fmt = (np.zeros(size, np.int64) for _ in range(4))
        self.nstream = np.zeros(size, np.int64)
        self._keep = groups              # the KernelGroups own the weight mappings' references
        inputs = (cfg.d_model, cfg.n_heads * cfg.head_dim_v, cfg.d_model, cfg.d_ff)     # of GROUPS' products
        for i, kg in enumerate(groups):
            m = len(kg.n)
            self.f1[i, :m], self.fr[i, :m], self.w[i, :m] = kg.f1, kg.fr, kg.w
            self.rb[i, :m], self.col[i, :m + 1] = kg.row_bytes, kg.col
            self.nmat[i], self.fmt[i] = m, kg.fmt
            weight_bytes = int(kg.nbytes.sum())
            self.nchunk[i] = 1 if threads == 1 else min(MAX_CHUNKS, max(threads, weight_bytes // CHUNK_BYTES))
            self.nstream[i] = 1 if threads == 1 else min(STREAM_CHUNKS * threads,
                                                         max(threads, weight_bytes // STREAM_CHUNK_BYTES))
            k = inputs[i % 4] if i < 4 * len(layers) else cfg.d_model
            self.mchunk[i] = fused.chunk_rows(fused.act_row_bytes(k, kg.fmt), ACT_CHUNK_BYTES)
        self.threads, self.with_output = threads, with_output
        self.attn_norm = np.stack([L.attn_norm for L in layers])
        self.ffn_norm = np.stack([L.ffn_norm for L in layers])
        self.out_norm = model.out_norm
        self.bias = (np.stack([np.concatenate([L.bq, L.bk, L.bv]) for L in layers]) if cfg.qkv_bias
                     else np.zeros((len(layers), 0), np.float32))
        # gemma3's extras (empty for llama): per-head q/k norms, post-norms, windows, local RoPE
        n = len(layers)
        qk = [(L.q_norm, L.k_norm) for L in layers if getattr(L, "q_norm", None) is not None]
        self.qk_norm = np.stack(qk) if qk else np.zeros((n, 0, cfg.head_dim), np.float32)
        posts = [(L.post_attn_norm, L.post_ffn_norm) for L in layers if getattr(L, "post_attn_norm", None) is not None]
        self.post_attn, self.post_ffn = ((np.stack([a for a, _ in posts]), np.stack([f for _, f in posts])) if posts
                                         else (np.zeros((n, 0), np.float32),) * 2)
        self.window = np.zeros(n, np.int64)
        self._windowed = layers if hasattr(layers[0], "window") else None   # read on every call (tests vary them)
        self.rope_sel = np.array([int(getattr(L, "local", False)) for L in layers], np.int64)
        self.gelu = ops.GELU_F16 if getattr(model, "gelu", False) else np.zeros(0, np.float32)
        self.cfg = cfg
        self.scale = np.float32(cfg.attn_scale if cfg.attn_scale else 1.0 / np.sqrt(cfg.head_dim))
        self.dots = np.int64(ops.dots_kernel())
        self.sync = parallel.new_sync(len(layers) * LAYER_PHASES + 3)
        self.vocab = int(groups[-1].col[-1]) if with_output else 0
        self._buffers = {}
        self._run_addr = None
        self._one = self._rows_buffers(1)

    def _abytes(self) -> int:
        c = self.cfg
        widest = max(c.d_model, c.d_ff, c.n_heads * c.head_dim_v)
        return fused.widest_act_row_bytes(widest)

    def _rows_buffers(self, t: int):
        """Scratch for calls of ``t`` rows: (private rows, shared rows, per-layer/all-layer rows)."""
        c, n = self.cfg, self.threads
        f32 = lambda *shape: np.empty(shape, np.float32)
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * (c.head_dim + c.head_dim_v)
        if t == 1:
            private = (f32(n, 1, c.d_model), f32(n, 1, c.d_model), f32(n, 1, c.d_ff),
                       np.empty((n, 1, self._abytes()), np.uint8))
            shared = (f32(0, c.d_model), f32(0, c.d_ff), np.empty((0, self._abytes()), np.uint8))
            sets = len(self.attn_norm)
        else:
            private = (f32(n, 0, c.d_model), f32(n, 0, c.d_model), f32(n, 0, c.d_ff),
                       np.empty((n, 0, self._abytes()), np.uint8))
            shared = (f32(t, c.d_model), f32(t, c.d_ff), np.empty((t, self._abytes()), np.uint8))
            sets = 1
        qkv, act = f32(sets, t, q_dim + kv_dim), f32(sets, t, c.n_heads * c.head_dim_v)
        # q and k of every row as [sets, T, heads, head_dim] views into qkv, the attention output
        # as [sets, T, heads, head_dim_v] (numba code that reshapes compiles its error path: ~3 s)
        f = qkv.itemsize
        qv = as_strided(qkv, (sets, t, c.n_heads, c.head_dim), (qkv.strides[0], qkv.strides[1], c.head_dim * f, f))
        kv = as_strided(qkv[:, :, q_dim:], (sets, t, c.n_kv_heads, c.head_dim),
                        (qkv.strides[0], qkv.strides[1], c.head_dim * f, f))
        layer_rows = (qkv, act, f32(sets, t, c.d_model), f32(sets, t, 2 * c.d_ff), f32(sets, t, c.d_model),
                      qv, kv, act.reshape(sets, t, c.n_heads, c.head_dim_v))
        return private, shared, layer_rows

    @classmethod
    def build(cls, model) -> "FusedPlan | None":
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

    def run(self, x: np.ndarray, pool, pos: np.ndarray, slot: np.ndarray, offset: np.ndarray,
            cos: np.ndarray, sin: np.ndarray, n_logits: int = 0) -> np.ndarray | None:
        """The layers on ``x`` [T, d] in place: row t at position ``pos[t]`` of slot ``slot[t]`` of
        the pool that the cache ``pool`` belongs to, whose layer i holds position ``offset[t, i]``
        at index 0 (see :class:`~rosenblatt.models.kv_cache.KVCache`); RoPE tables [tables, n_ctx,
        rope_dim / 2] of which layer i uses ``rope_sel[i]``. With ``n_logits`` (and the output in
        the plan) the logits of the last ``n_logits`` rows, else None (the caller computes them
        from ``x``)."""
        c, t = self.cfg, x.shape[0]
        if t == 1:
            bufs = self._one
        else:
            bufs = self._buffers.get(t)
            if bufs is None:
                self._buffers.clear()           # one size kept: a prompt's chunks share it
                bufs = self._buffers[t] = self._rows_buffers(t)
        n_logits = n_logits if self.with_output else 0
        out = np.empty((n_logits, self.vocab), np.float32)
        chunks = np.where(self.mchunk >= t, self.nstream, self.nchunk)   # streamed where the rows are one pass
        if self._windowed is not None:
            self.window[:] = [L.window for L in self._windowed]
        args = (self.sync, x, pos, slot, n_logits, self.f1, self.fr, self.w, self.rb, self.col,
                self.nmat, chunks, self.mchunk, self.fmt, self.attn_norm, self.ffn_norm, c.rms_eps, self.bias,
                self.qk_norm, self.post_attn, self.post_ffn, self.window, self.rope_sel, self.gelu, cos, sin,
                c.rope_dim, c.rope_neox, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim_v, pool.pool_k, pool.pool_v,
                pool.pool_kl, pool.pool_vl, pool.index, pool.local, offset, self.scale, self.dots, *bufs[0], *bufs[1],
                *bufs[2], self.out_norm, out)
        if self.threads == 1:
            self.sync[:] = 0
            _run(np.int64(0), *args)
        else:
            if self._run_addr is None:          # the argument types are the same on every call
                # on a first run the parallel region compiles elsewhere while _run compiles here
                elsewhere = jit.compile_elsewhere(run_rows, (self.threads, 0, args))
                self._run_addr = native_address(_run, (np.int64(0),) + args)
                if elsewhere is not None:
                    elsewhere()
            run_rows(self.threads, self._run_addr, args)
        return out if n_logits else None
