"""Fused dot products of one quantized row with float32 activations (the decode hot loop).

Each function reads the blocks of a row directly and never writes decoded weights to memory.
The inner loops run over 16 or 32 contiguous bytes with independent float32 accumulators, so
LLVM turns them into SIMD code (the callers compile with reassociation allowed). Affine terms
are factored out: for a sub-block with scale ``d`` and min ``m``,
``sum((d*q - m) * x) = d * sum(q*x) - m * sum(x)``, where ``sum(x)`` per 32 activations
(``xs``) is computed once per activation row and shared by every weight row.

Types without a fused version here (Q2_K, Q3_K, F16, BF16) fall back to decode-then-dot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..gguf.quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, _h, _scale_min_k4, dequant_row, k45_quants

FASTMATH = {"reassoc", "contract", "nsz"}



@njit(fastmath=FASTMATH, cache=True)
def block_sums(x, out):
    """out[m, j] = sum(x[m, 32j:32j+32])."""
    for m in range(x.shape[0]):
        for j in range(out.shape[1]):
            s = np.float32(0.0)
            for i in range(32):
                s += x[m, 32 * j + i]
            out[m, j] = s


@njit(fastmath=FASTMATH, inline="always")
def _dot_q4(src, x, xs, nb, has_min):
    """Q4_0 ((q-8)*d), or Q4_1 (d*q + m) when ``has_min``."""
    bsize, qo = (20, 4) if has_min else (18, 2)
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * bsize
        y = b * 32
        s = np.float32(0.0)
        for j in range(16):
            q = src[o + qo + j]
            s += np.float32(q & 0xF) * x[y + j] + np.float32(q >> 4) * x[y + 16 + j]
        if has_min:
            acc += _h(src, o) * s + _h(src, o + 2) * xs[b]
        else:
            acc += _h(src, o) * (s - np.float32(8.0) * xs[b])
    return acc


@njit(fastmath=FASTMATH, inline="always")
def _dot_q5(src, x, xs, nb, bsize, qoff, has_min):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * bsize
        y = b * 32
        qh = (np.uint32(src[o + qoff - 4]) | (np.uint32(src[o + qoff - 3]) << 8)
              | (np.uint32(src[o + qoff - 2]) << 16) | (np.uint32(src[o + qoff - 1]) << 24))
        s = np.float32(0.0)
        for j in range(16):
            q = src[o + qoff + j]
            lo = np.int32(q & 0xF) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            s += np.float32(lo) * x[y + j] + np.float32(hi) * x[y + 16 + j]
        if has_min:
            acc += _h(src, o) * s + _h(src, o + 2) * xs[b]
        else:
            acc += _h(src, o) * (s - np.float32(16.0) * xs[b])
    return acc


@njit(fastmath=FASTMATH, inline="always")
def _dot_q8_0(src, x, nb):
    qs = src.view(np.int8)
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 34
        y = b * 32
        s = np.float32(0.0)
        for j in range(32):
            s += np.float32(qs[o + 2 + j]) * x[y + j]
        acc += _h(src, o) * s
    return acc


@njit(fastmath=FASTMATH, inline="always")
def _dot_q45_k(src, x, xs, nb, five):
    """Q4_K, or Q5_K when ``five`` (qh[32] sits before qs and adds the 5th bit)."""
    bsize, qoff = (176, 48) if five else (144, 16)
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * bsize
        d = _h(src, o)
        dmin = _h(src, o + 2)
        y = b * 256
        for c in range(4):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            base = o + qoff + c * 32
            xo = y + c * 64
            for l in range(32):
                lo, hi = k45_quants(src, o, base, l, c, five)
                s0 += np.float32(lo) * x[xo + l]
                s1 += np.float32(hi) * x[xo + 32 + l]
            sc0, m0 = _scale_min_k4(src, o + 4, 2 * c)
            sc1, m1 = _scale_min_k4(src, o + 4, 2 * c + 1)
            acc += d * (np.float32(sc0) * s0 + np.float32(sc1) * s1) \
                - dmin * (np.float32(m0) * xs[b * 8 + 2 * c] + np.float32(m1) * xs[b * 8 + 2 * c + 1])
    return acc


@njit(fastmath=FASTMATH, inline="always")
def _dot_q6_k(src, x, nb):
    sc8 = src.view(np.int8)
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 210
        y = b * 256
        t = np.float32(0.0)
        for h in range(2):
            for half in range(2):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for i in range(16):
                    l = half * 16 + i
                    a = src[o + h * 64 + l]
                    c = src[o + h * 64 + 32 + l]
                    hb = src[o + 128 + h * 32 + l]
                    xo = y + h * 128 + l
                    s0 += np.float32(np.int32((a & 0xF) | ((hb & 3) << 4)) - 32) * x[xo]
                    s1 += np.float32(np.int32((c & 0xF) | (((hb >> 2) & 3) << 4)) - 32) * x[xo + 32]
                    s2 += np.float32(np.int32((a >> 4) | (((hb >> 4) & 3) << 4)) - 32) * x[xo + 64]
                    s3 += np.float32(np.int32((c >> 4) | (((hb >> 6) & 3) << 4)) - 32) * x[xo + 96]
                so = o + 192 + h * 8 + half
                t += np.float32(sc8[so]) * s0 + np.float32(sc8[so + 2]) * s1 \
                    + np.float32(sc8[so + 4]) * s2 + np.float32(sc8[so + 6]) * s3
        acc += _h(src, o + 208) * t
    return acc


@njit(fastmath=FASTMATH, inline="always")
def dot_row(qtype, src, x, xs, scratch):
    """dot(decode(src), x) for one row; ``xs`` = block_sums of x, ``scratch`` a float32 row buffer."""
    k = x.shape[0]
    if qtype == Q4_K:
        return _dot_q45_k(src, x, xs, k // 256, False)
    if qtype == Q6_K:
        return _dot_q6_k(src, x, k // 256)
    if qtype == Q8_0:
        return _dot_q8_0(src, x, k // 32)
    if qtype == Q4_0:
        return _dot_q4(src, x, xs, k // 32, False)
    if qtype == Q4_1:
        return _dot_q4(src, x, xs, k // 32, True)
    if qtype == Q5_K:
        return _dot_q45_k(src, x, xs, k // 256, True)
    if qtype == Q5_0:
        return _dot_q5(src, x, xs, k // 32, 22, 6, False)
    if qtype == Q5_1:
        return _dot_q5(src, x, xs, k // 32, 24, 8, True)
    dequant_row(qtype, src, scratch)
    acc = np.float32(0.0)
    for i in range(k):
        acc += scratch[i] * x[i]
    return acc
