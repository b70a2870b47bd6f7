"""numba kernels for the small per-layer operations: RMS norm, RoPE, SiLU gating, decode attention.

A decode step calls each of these a few times per layer on vectors of a few thousand floats,
where numpy's per-call overhead (tens of microseconds for a chain of ufuncs) dominates; a numba
function does the whole operation in one call and one pass. All arithmetic is float32, as in
llama.cpp, except the sum of squares of the RMS norm (float64, as ggml's ``rms_norm``).

numba calls ``expf`` from libm one element at a time (no vector math library), so :func:`exp`
is a polynomial LLVM can vectorize: ggml's ``ggml_v_expf`` (from ARM's optimized-routines, and
what llama.cpp's SIMD SiLU uses), within 2 ulp of the exact value, 0 below -103.9, inf above 88.7.

Outputs are arrays the caller allocates (cheaper than returning an array numba allocated).
The kernels compile with ``error_model="numpy"``: a float division by zero gives inf/nan as in
numpy instead of raising, which also keeps the check out of the loops so that they vectorize.
None of them lets LLVM reassociate: a reassociated sum is vectorized to the target's width
(16 lanes with AVX-512, 4 on NEON) and differently again where the function is inlined, so
results would depend on the machine and on the caller. Sums are written as 8 partial sums
combined in one fixed order instead, which vectorizes lane-wise the same everywhere; with
the int8 kernels' fixed order (:mod:`rosenblatt.cpu`) a position's logits are the same bits on
x86 and the A76, and whether it was computed alone, in a prompt chunk or in the fused step.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .jit import call_address, njit_twin

_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))      # ln 2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_MIN, _EXP_MAX = np.float32(-103.972084), np.float32(88.72284)     # exp underflows to 0 / overflows
_C1, _C2, _C3, _C4, _C5 = (np.float32(float.fromhex(c)) for c in
                           ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7"))


@intrinsic
def _bits_of(typingctx, x):
    """The int32 bit pattern of the float32 ``x``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a bitcast, which vectorizes)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def exp(x):
    """exp(x) of a float32 (no reassociation here: the Cody-Waite reduction depends on the order)."""
    n = np.float32(np.rint(x * _LOG2E))                  # exp(x) = 2^n * exp(b), |b| <= ln2/2
    b = x - n * _LN2_HI - n * _LN2_LO
    u = b * b
    p = ((_C5 * b + _C4) * u + (_C3 * b + _C2)) * u + _C1 * b    # exp(b) - 1
    # 2^n as two normal floats 2^n1 * 2^(n-n1), so that results below 2^-126 round once, to subnormals
    m = np.int32(min(max(n, np.float32(-150.0)), np.float32(128.0)))
    n1 = m >> 1
    k1 = _f32_from_bits((n1 + 127) << 23)
    k2 = _f32_from_bits((m - n1 + 127) << 23)
    y = (p * k1 + k1) * k2
    y = np.float32(0.0) if x < _EXP_MIN else y
    return np.float32(np.inf) if x > _EXP_MAX else y


@njit(error_model="numpy", cache=True)
def rms_norm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight for each row of x [T, d]; the sum of
    squares in float64 as 8 partial sums combined in one fixed order (the same bits on every
    target and wherever it is inlined)."""
    d = x.shape[1]
    d8 = d - d % 8
    for t in range(x.shape[0]):
        xt = x[t]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        for i in range(0, d8, 8):
            s0 += np.float64(xt[i] * xt[i])
            s1 += np.float64(xt[i + 1] * xt[i + 1])
            s2 += np.float64(xt[i + 2] * xt[i + 2])
            s3 += np.float64(xt[i + 3] * xt[i + 3])
            s4 += np.float64(xt[i + 4] * xt[i + 4])
            s5 += np.float64(xt[i + 5] * xt[i + 5])
            s6 += np.float64(xt[i + 6] * xt[i + 6])
            s7 += np.float64(xt[i + 7] * xt[i + 7])
        for i in range(d8, d):
            s0 += np.float64(xt[i] * xt[i])
        ss = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
        r = np.float32(1.0) / np.sqrt(np.float32(ss / d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * r * weight[i]


@njit(error_model="numpy", cache=True)
def rope(x, cos, sin, rope_dim, neox):
    """Rotate x [T, heads, head_dim] in place: pairs (i, i + rope_dim/2) if ``neox``, else (2i, 2i+1)."""
    half = rope_dim // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            v = x[t, h]
            if neox:
                for i in range(half):
                    x0, x1 = v[i], v[half + i]
                    v[i] = x0 * cos[t, i] - x1 * sin[t, i]
                    v[half + i] = x0 * sin[t, i] + x1 * cos[t, i]
            else:
                for i in range(half):
                    x0, x1 = v[2 * i], v[2 * i + 1]
                    v[2 * i] = x0 * cos[t, i] - x1 * sin[t, i]
                    v[2 * i + 1] = x0 * sin[t, i] + x1 * cos[t, i]


@njit(error_model="numpy", cache=True, inline="always")
def silu(g, u):
    """silu(g) * u = g / (1 + exp(-g)) * u of two float32."""
    return g / (np.float32(1.0) + exp(-g)) * u


def _gelu_table() -> np.ndarray:
    """float32 gelu(h) rounded to float16, for every float16 bit pattern h: ggml's table
    (``ggml_table_gelu_f16``), GELU's tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3))), here evaluated in float64 before the one rounding to float16."""
    with np.errstate(invalid="ignore", over="ignore"):      # the patterns of inf and nan
        x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        y = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * x * (1.0 + 0.044715 * x * x)))
        return y.astype(np.float16).astype(np.float32)


#: gelu of every float16, as float32 (256 KB), indexed by :func:`_f16_bits`. Callers pass it to
#: :func:`gelu` as an argument: numba would compile a global array into every function that
#: inlines it as a 256 KB constant.
GELU_F16 = _gelu_table()
_F16_MIN_NORMAL = np.float32(2.0 ** -14)
_TWO24 = np.float32(2.0 ** 24)


@njit(error_model="numpy", cache=True, inline="always")
def _f16_bits(x):
    """The float16 bit pattern nearest |x| (ties to even) with x's sign, for finite |x| < 65504."""
    u = _bits_of(x)
    sign = (u >> 16) & 0x8000
    a = abs(x)
    if a < _F16_MIN_NORMAL:         # a subnormal float16: a multiple of 2^-24
        return sign | np.int32(np.rint(a * _TWO24))
    e = ((u >> 23) & 0xFF) - 127
    q = np.int32(np.rint(a * _f32_from_bits((137 - e) << 23)))    # a * 2^(10 - e): in [1024, 2048]
    return sign | (((e + 15) << 10) + (q - 1024))                   # q = 2048 carries into the exponent


@njit(error_model="numpy", cache=True, inline="always")
def gelu(g, u, table):
    """gelu(g) * u of two float32 as ggml computes it (``ggml_vec_geglu_f32``): 0 for g <= -10, g * u
    for g >= 10, and between them the table's gelu at g rounded to float16, itself a float16
    (``table``: :data:`GELU_F16`), times u in float32. A lookup: the same bits on every target."""
    if g <= np.float32(-10.0):
        return np.float32(0.0)
    if g >= np.float32(10.0):
        return g * u
    if g != g:
        return g
    return table[_f16_bits(g) & 0xFFFF] * u


def _silu_mul(gate, up, out):
    """out = silu(gate) * up, elementwise, [T, n]."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            out[t, i] = silu(gate[t, i], up[t, i])


silu_mul = njit_twin(_silu_mul, "_serial", error_model="numpy", cache=True)
#: the same with the rows over numba's threads (prompts: [64, 8960] is ~3 ms on one core)
silu_mul_rows = njit_twin(_silu_mul, "_rows", error_model="numpy", cache=True, parallel=True)


def _gelu_mul(gate, up, out, table):
    """out = gelu(gate) * up, elementwise, [T, n] (ggml's float16 table :data:`GELU_F16`, see :func:`gelu`)."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            out[t, i] = gelu(gate[t, i], up[t, i], table)


gelu_mul = njit_twin(_gelu_mul, "_serial", error_model="numpy", cache=True)
#: the same with the rows over numba's threads (prompts)
gelu_mul_rows = njit_twin(_gelu_mul, "_rows", error_model="numpy", cache=True, parallel=True)


@njit(error_model="numpy", cache=True)
def gate_row(gu, t, n, gelu_table, out):
    """out[t, i] = act(gu[t, i]) * gu[t, n + i] for i < n (act: GELU through ``gelu_table``
    (:data:`GELU_F16`), or SiLU where that is empty), for a gate/up
    product's row with its two halves side by side: the fused step's gating, on C-contiguous
    arrays (on strided slices numba's loop does not vectorize: ~8x slower), the same bits as
    :func:`silu_mul` / :func:`gelu_mul`."""
    if gelu_table.shape[0]:
        for i in range(n):
            out[t, i] = gelu(gu[t, i], gu[t, n + i], gelu_table)
    else:
        for i in range(n):
            out[t, i] = silu(gu[t, i], gu[t, n + i])


@njit(error_model="numpy", cache=True, inline="always")
def _dot8(a, b, n):
    """sum(a[:n] * b[:n]) in float32 as 8 running partial sums (lane i % 8), combined in one
    fixed order: the same operations in the same order on every target and in every caller
    (no reassociation for LLVM to redo its own way), which still vectorizes lane-wise."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    n8 = n - n % 8
    for i in range(0, n8, 8):
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
    for i in range(n8, n):
        s0 += a[i] * b[i]
    return ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))


@njit(error_model="numpy", cache=True, inline="always")
def _sum8(a, n):
    """sum(a[:n]) in float32, in :func:`_dot8`'s fixed order."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    n8 = n - n % 8
    for i in range(0, n8, 8):
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
    for i in range(n8, n):
        s0 += a[i]
    return ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))


@functools.cache
def dots_kernel() -> int:
    """The address to pass as ``dots`` to :func:`attention_decode`: the float dot-product kernel
    of :mod:`rosenblatt.cpu` (the operations of :func:`_dot8` in one vector register), 0 if
    LLVM cannot build it here. Looked up once (the op-by-op path asks every layer)."""
    from .build import dots_address
    return dots_address()


@njit(error_model="numpy", cache=True)
def attention_decode(q, k_cache, v_cache, n_kv, lo, hi, scale, out, dots):
    """One query position against the keys/values at [lo, hi) of the cache: q [H, hd] -> out [H, hd_v].

    Query head h reads kv head h // (H / n_kv): softmax(scale * q k^T) v, in float32. No
    reassociation: every sum has one written order (:func:`_dot8`, :func:`_sum8`, the values
    accumulated key by key), so the result is the same bits wherever this is compiled: alone,
    inlined into the fused decode step, per row of a prompt (:func:`attention_rows`), on x86 or
    the A76. ``dots``: the address of the vector form of :func:`_dot8` for the scores
    (:func:`dots_kernel`; same bits, ~5x faster), 0 for the plain loop.
    """
    n_heads, hd = q.shape
    group = n_heads // n_kv
    n = hi - lo
    p = np.empty((n_heads, n), np.float32)
    out[:] = 0.0
    vector = dots != 0 and hd % 8 == 0 and q.strides[1] == 4 and k_cache.strides[2] == 4
    for kh in range(n_kv):
        k, v = k_cache[kh, lo:hi], v_cache[kh, lo:hi]
        for h in range(kh * group, (kh + 1) * group):
            ph, qh = p[h], q[h]
            if vector and n > 0:                                    # scores
                call_address(dots, (qh.ctypes.data, k.ctypes.data, k.strides[0], n, hd, ph.ctypes.data))
                for j in range(n):
                    ph[j] *= scale
            else:
                for j in range(n):
                    ph[j] = _dot8(qh, k[j], hd) * scale
            top = ph[0]                                             # softmax
            for j in range(1, n):
                top = max(top, ph[j])
            for j in range(n):
                ph[j] = exp(ph[j] - top)
            total = _sum8(ph, n)
            for j in range(n):
                ph[j] /= total
            o = out[h]
            n4 = n - n % 4                                          # weighted sum of the values,
            for j in range(0, n4, 4):                               # key by key: 4 keys per pass
                w0, w1, w2, w3 = ph[j], ph[j + 1], ph[j + 2], ph[j + 3]   # over o (the same adds in
                v0, v1, v2, v3 = v[j], v[j + 1], v[j + 2], v[j + 3]       # the same order, o read once)
                for i in range(o.shape[0]):
                    o[i] = (((o[i] + w0 * v0[i]) + w1 * v1[i]) + w2 * v2[i]) + w3 * v3[i]
            for j in range(n4, n):
                w, vj = ph[j], v[j]
                for i in range(o.shape[0]):
                    o[i] += w * vj[i]


@njit(parallel=True, error_model="numpy", cache=True)
def attention_rows(q, k_cache, v_cache, n_kv, start, window, scale, out, dots):
    """Causal attention of T query positions start..start+T-1 (q [T, H, hd] -> out [T, H, hd_v]),
    each row by :func:`attention_decode` over exactly the keys its position sees (the last
    ``window`` if > 0). A row's result is the same whether it is computed in a batch of any size
    or alone as a decode step, so a prompt's KV cache does not depend on how the prompt was cut
    into calls (prefix reuse is exact); the rows run over numba's threads."""
    for t in prange(q.shape[0]):
        pos = start + t
        lo = max(0, pos - window + 1) if window > 0 else 0
        attention_decode(q[t], k_cache, v_cache, n_kv, lo, pos + 1, scale, out[t], dots)
