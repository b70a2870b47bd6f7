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
They allow reassociation (:data:`~rosenblatt.qdot.FASTMATH`, vectorized sums) except RoPE, which
computes exactly what the numpy expression ``x0 * c - x1 * s`` does, and :func:`exp`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .jit import njit_twin
from .qdot import FASTMATH

_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))      # ln 2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_MIN, _EXP_MAX = np.float32(-103.972084), np.float32(88.72284)     # exp underflows to 0 / overflows
_C1, _C2, _C3, _C4, _C5 = (np.float32(float.fromhex(c)) for c in
                           ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7"))


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


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def rms_norm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight for each row of x [T, d]."""
    d = x.shape[1]
    for t in range(x.shape[0]):
        ss = 0.0
        for i in range(d):
            ss += np.float64(x[t, i] * x[t, i])
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


def _silu_mul(gate, up, out):
    """out = gate / (1 + exp(-gate)) * up, elementwise, [T, n]."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + exp(-g)) * up[t, i]


silu_mul = njit_twin(_silu_mul, "_serial", fastmath=FASTMATH, error_model="numpy", cache=True)
#: the same with the rows over numba's threads (prompts: [64, 8960] is ~3 ms on one core)
silu_mul_rows = njit_twin(_silu_mul, "_rows", fastmath=FASTMATH, error_model="numpy", cache=True, parallel=True)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def attention_decode(q, k_cache, v_cache, n_kv, lo, hi, scale, out):
    """One query position against the keys/values at [lo, hi) of the cache: q [H, hd] -> out [H, hd_v].

    Query head h reads kv head h // (H / n_kv): softmax(scale * q k^T) v, in float32. Keys and
    values are taken four rows at a time, each row loaded once for the kv head's group of query
    heads; four independent sums per query head (no horizontal reduction per key).
    """
    n_heads, hd = q.shape
    group = n_heads // n_kv
    n = hi - lo
    n4 = n - n % 4
    p = np.empty((n_heads, n), np.float32)
    out[:] = 0.0
    for kh in range(n_kv):
        k, v = k_cache[kh, lo:hi], v_cache[kh, lo:hi]
        heads = range(kh * group, (kh + 1) * group)
        for j in range(0, n4, 4):                                   # scores
            k0, k1, k2, k3 = k[j], k[j + 1], k[j + 2], k[j + 3]
            for h in heads:
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for i in range(hd):
                    s0 += q[h, i] * k0[i]
                    s1 += q[h, i] * k1[i]
                    s2 += q[h, i] * k2[i]
                    s3 += q[h, i] * k3[i]
                p[h, j], p[h, j + 1], p[h, j + 2], p[h, j + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        for j in range(n4, n):
            for h in heads:
                s0 = np.float32(0.0)
                for i in range(hd):
                    s0 += q[h, i] * k[j, i]
                p[h, j] = s0 * scale
        for h in heads:                                             # softmax
            top = p[h, 0]
            for j in range(1, n):
                top = max(top, p[h, j])
            total = np.float32(0.0)
            for j in range(n):
                p[h, j] = exp(p[h, j] - top)
                total += p[h, j]
            for j in range(n):
                p[h, j] /= total
        for j in range(0, n4, 4):                                   # weighted sum of the values
            v0, v1, v2, v3 = v[j], v[j + 1], v[j + 2], v[j + 3]
            for h in heads:
                w0, w1, w2, w3 = p[h, j], p[h, j + 1], p[h, j + 2], p[h, j + 3]
                o = out[h]
                for i in range(o.shape[0]):
                    o[i] += w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i]
        for j in range(n4, n):
            for h in heads:
                w0 = p[h, j]
                for i in range(out.shape[1]):
                    out[h, i] += w0 * v[j, i]
