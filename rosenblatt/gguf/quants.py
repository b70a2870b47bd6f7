"""GGML block formats, decoded by numba kernels.

One function per format decodes ``nb`` consecutive blocks of a row (raw bytes) into float32,
with the same float32 operations in the same order as ``gguf.quants`` (and so bit-exact with
it). :func:`dequant_row` dispatches on the ggml type code; the matmul kernels in
:mod:`rosenblatt.backends.cpu` call it row by row, so the weights are never decoded whole.

Block layouts (bytes): see ggml's ``ggml-common.h``; the comment on each decoder gives the one
it reads.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
BF16 = 30

#: every ggml type the kernels decode
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType(c) for c in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K))

# fp16 -> fp32 by table: exact for every bit pattern (subnormals, inf, nan) and one load per block.
# AArch64's hardware conversion raises the invalid flag on the signalling-NaN patterns (numpy
# would warn at import there); they still become NaN.
with np.errstate(invalid="ignore"):
    _F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def block_size(qtype: int) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def type_size(qtype: int) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][1]


@njit(inline="always")
def _h(src, off):
    """The fp16 value stored little-endian at src[off:off+2], as float32."""
    return _F16[np.int64(src[off]) | (np.int64(src[off + 1]) << 8)]


@njit(cache=True)
def _deq_f16(src, dst, n):
    for i in range(n):
        dst[i] = _h(src, 2 * i)


@njit(cache=True)
def _deq_bf16(src, dst, n):
    bits = dst.view(np.uint32)
    for i in range(n):
        bits[i] = (np.uint32(src[2 * i]) << 16) | (np.uint32(src[2 * i + 1]) << 24)


@njit(cache=True)
def _deq_f32(src, dst, n):
    vals = src.view(np.float32)
    for i in range(n):
        dst[i] = vals[i]


@njit(cache=True)
def _deq_q4(src, dst, nb, has_min):
    # Q4_0 (18 B): d:f16, qs[16]; value (q-8)*d.   Q4_1 (20 B): d:f16, m:f16, qs[16]; value d*q + m
    # element j = low nibble of qs[j], element j+16 = high nibble
    bsize, qo = (20, 4) if has_min else (18, 2)
    for b in range(nb):
        o = b * bsize
        d = _h(src, o)
        m = _h(src, o + 2) if has_min else np.float32(0.0)
        y = b * 32
        for j in range(16):
            q = src[o + qo + j]
            if has_min:
                dst[y + j] = d * np.float32(q & 0xF) + m
                dst[y + j + 16] = d * np.float32(q >> 4) + m
            else:
                dst[y + j] = d * np.float32(np.int32(q & 0xF) - 8)
                dst[y + j + 16] = d * np.float32(np.int32(q >> 4) - 8)


@njit(cache=True)
def _deq_q5(src, dst, nb, has_min):
    # Q5_0 (22 B): d:f16, qh:u32 (bit i = 5th bit of element i), qs[16]; value (q-16)*d
    # Q5_1 (24 B): d:f16, m:f16, qh:u32, qs[16]; value d*q + m
    bsize, ho = (24, 4) if has_min else (22, 2)
    for b in range(nb):
        o = b * bsize
        d = _h(src, o)
        m = _h(src, o + 2) if has_min else np.float32(0.0)
        qh = (np.uint32(src[o + ho]) | (np.uint32(src[o + ho + 1]) << 8)
              | (np.uint32(src[o + ho + 2]) << 16) | (np.uint32(src[o + ho + 3]) << 24))
        y = b * 32
        for j in range(16):
            q = src[o + ho + 4 + j]
            lo = np.int32(q & 0xF) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            if has_min:
                dst[y + j] = d * np.float32(lo) + m
                dst[y + j + 16] = d * np.float32(hi) + m
            else:
                dst[y + j] = d * np.float32(lo - 16)
                dst[y + j + 16] = d * np.float32(hi - 16)


@njit(cache=True)
def _deq_q8_0(src, dst, nb):
    # d:f16, qs:int8[32]: value q*d
    qs = src.view(np.int8)
    for b in range(nb):
        o = b * 34
        d = _h(src, o)
        y = b * 32
        for j in range(32):
            dst[y + j] = np.float32(qs[o + 2 + j]) * d


@njit(cache=True)
def _deq_q2_k(src, dst, nb):
    # scales[16] (lo nibble scale, hi nibble min), qs[64] (2 bits), d:f16, dmin:f16
    # element h*128 + s*32 + l = (qs[h*32+l] >> 2s) & 3, sub-block of 16 = element // 16
    for b in range(nb):
        o = b * 84
        d = _h(src, o + 80)
        dmin = _h(src, o + 82)
        y = b * 256
        for h in range(2):
            for s in range(4):
                for l in range(32):
                    e = h * 128 + s * 32 + l
                    sc = src[o + e // 16]
                    dl = d * np.float32(sc & 0xF)
                    ml = dmin * np.float32(sc >> 4)
                    q = (src[o + 16 + h * 32 + l] >> (2 * s)) & 3
                    dst[y + e] = dl * np.float32(q) - ml


@njit(cache=True)
def _deq_q3_k(src, dst, nb):
    # hmask[32], qs[64], scales[12] (16 x 6-bit, offset 32), d:f16
    # element e = h*128 + s*32 + l: low 2 bits (qs[h*32+l] >> 2s) & 3, high bit (hmask[l] >> (e//32)) & 1
    # value = d*(scale-32) * (low - 4*(1-high))
    for b in range(nb):
        o = b * 110
        d = _h(src, o + 108)
        y = b * 256
        for i in range(16):
            lo = (src[o + 96 + (i % 8)] >> (4 * (i // 8))) & 0xF
            hi = (src[o + 104 + (i % 4)] >> (2 * (i // 4))) & 3
            sc = np.int32(lo | (hi << 4)) - 32
            dl = d * np.float32(sc)
            for k in range(16):
                e = i * 16 + k
                h = e // 128
                r = e % 128
                s = r // 32
                l = r % 32
                q = np.int32((src[o + 32 + h * 32 + l] >> (2 * s)) & 3)
                bit = np.int32((src[o + l] >> (e // 32)) & 1)
                dst[y + e] = dl * np.float32(q - ((bit ^ 1) << 2))


@njit(inline="always")
def _scale_min_k4(src, o, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at src[o:o+12]."""
    if j < 4:
        sc = src[o + j] & 0x3F
        mn = src[o + 4 + j] & 0x3F
    else:
        sc = (src[o + 4 + j] & 0xF) | ((src[o + j - 4] >> 2) & 0x30)
        mn = (src[o + 4 + j] >> 4) | ((src[o + j] >> 2) & 0x30)
    return sc, mn


@njit(inline="always")
def k45_quants(src, o, base, l, c, five):
    """The quants of sub-blocks 2c and 2c+1 held by byte l of chunk c of a Q4_K (or, when
    ``five``, Q5_K) block at ``o``; ``base`` is where the chunk's 32 bytes start."""
    q = src[base + l]
    lo = q & 0xF
    hi = q >> 4
    if five:
        h = src[o + 16 + l]
        lo |= ((h >> (2 * c)) & 1) << 4
        hi |= ((h >> (2 * c + 1)) & 1) << 4
    return lo, hi


@njit(cache=True)
def _deq_q45_k(src, dst, nb, five):
    # Q4_K (144 B): d:f16, dmin:f16, scales[12], qs[128]; sub-block j = 2c+s holds (qs[c*32+l] >> 4s) & 0xF
    # Q5_K (176 B): the same with qh[32] before qs; 5th bit of sub-block j element l = (qh[l] >> j) & 1
    # One pass over each 32-byte chunk writes both of its sub-blocks (fixed shifts: vectorises).
    bsize, qoff = (176, 48) if five else (144, 16)
    for b in range(nb):
        o = b * bsize
        d = _h(src, o)
        dmin = _h(src, o + 2)
        y = b * 256
        for c in range(4):
            sc0, mn0 = _scale_min_k4(src, o + 4, 2 * c)
            sc1, mn1 = _scale_min_k4(src, o + 4, 2 * c + 1)
            dl0, ml0 = d * np.float32(sc0), dmin * np.float32(mn0)
            dl1, ml1 = d * np.float32(sc1), dmin * np.float32(mn1)
            base = o + qoff + c * 32
            out = y + c * 64
            for l in range(32):
                lo, hi = k45_quants(src, o, base, l, c, five)
                dst[out + l] = dl0 * np.float32(lo) - ml0
                dst[out + 32 + l] = dl1 * np.float32(hi) - ml1


@njit(cache=True)
def _deq_q6_k(src, dst, nb):
    # ql[128], qh[64], scales:int8[16], d:f16
    # element e = h*128 + r: low 4 bits (ql[h*64 + r%64] >> 4*(r//64)) & 0xF,
    # high 2 bits (qh[h*32 + r%32] >> 2*(r//32)) & 3; value d*scale[e//16]*(q-32).
    # Loop order: for each half h and l < 32 the four elements h*128 + l + {0, 32, 64, 96} share
    # their bytes, so the inner loop has no division and vectorises.
    sc8 = src.view(np.int8)
    for b in range(nb):
        o = b * 210
        d = _h(src, o + 208)
        y = b * 256
        for h in range(2):
            for half in range(2):
                s0 = d * np.float32(sc8[o + 192 + 8 * h + half])
                s1 = d * np.float32(sc8[o + 192 + 8 * h + 2 + half])
                s2 = d * np.float32(sc8[o + 192 + 8 * h + 4 + half])
                s3 = d * np.float32(sc8[o + 192 + 8 * h + 6 + half])
                for i in range(16):
                    l = 16 * half + i
                    a = src[o + h * 64 + l]
                    c = src[o + h * 64 + 32 + l]
                    hb = src[o + 128 + h * 32 + l]
                    e = y + h * 128 + l
                    dst[e] = s0 * np.float32(np.int32((a & 0xF) | ((hb & 3) << 4)) - 32)
                    dst[e + 32] = s1 * np.float32(np.int32((c & 0xF) | (((hb >> 2) & 3) << 4)) - 32)
                    dst[e + 64] = s2 * np.float32(np.int32((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
                    dst[e + 96] = s3 * np.float32(np.int32((c >> 4) | (((hb >> 6) & 3) << 4)) - 32)


@njit(cache=True)
def dequant_row(qtype, src, dst):
    """Decode one row: ``src`` uint8 bytes of the row, ``dst`` float32 of the row length."""
    n = dst.shape[0]
    if qtype == Q4_K:
        _deq_q45_k(src, dst, n // 256, False)
    elif qtype == Q6_K:
        _deq_q6_k(src, dst, n // 256)
    elif qtype == Q8_0:
        _deq_q8_0(src, dst, n // 32)
    elif qtype == Q4_0:
        _deq_q4(src, dst, n // 32, False)
    elif qtype == Q4_1:
        _deq_q4(src, dst, n // 32, True)
    elif qtype == Q5_0:
        _deq_q5(src, dst, n // 32, False)
    elif qtype == Q5_1:
        _deq_q5(src, dst, n // 32, True)
    elif qtype == Q5_K:
        _deq_q45_k(src, dst, n // 256, True)
    elif qtype == Q3_K:
        _deq_q3_k(src, dst, n // 256)
    elif qtype == Q2_K:
        _deq_q2_k(src, dst, n // 256)
    elif qtype == F16:
        _deq_f16(src, dst, n)
    elif qtype == BF16:
        _deq_bf16(src, dst, n)
    elif qtype == F32:
        _deq_f32(src, dst, n)
    else:
        raise ValueError("unsupported ggml type")


@njit(parallel=True, cache=True)
def dequant_row_range(qtype, rows, start, out):
    """``out[i] = decode(rows[start + i])`` for a contiguous band of rows."""
    for i in prange(out.shape[0]):
        dequant_row(qtype, rows[start + i], out[i])


@njit(nogil=True, cache=True)
def dequant_band(qtype, rows, start, out):
    """Serial :func:`dequant_row_range` that releases the GIL (one band per Python worker thread)."""
    for i in range(out.shape[0]):
        dequant_row(qtype, rows[start + i], out[i])


#: ggml type -> one row's decoder (src uint8, dst float32), each calling only its own type's
#: numba function: a model's first run compiles the decoder of its embedding's type, not all
_ROW_DECODERS = {
    Q4_K: lambda s, d: _deq_q45_k(s, d, d.shape[0] // 256, False),
    Q5_K: lambda s, d: _deq_q45_k(s, d, d.shape[0] // 256, True),
    Q6_K: lambda s, d: _deq_q6_k(s, d, d.shape[0] // 256),
    Q8_0: lambda s, d: _deq_q8_0(s, d, d.shape[0] // 32),
    Q4_0: lambda s, d: _deq_q4(s, d, d.shape[0] // 32, False),
    Q4_1: lambda s, d: _deq_q4(s, d, d.shape[0] // 32, True),
    Q5_0: lambda s, d: _deq_q5(s, d, d.shape[0] // 32, False),
    Q5_1: lambda s, d: _deq_q5(s, d, d.shape[0] // 32, True),
    Q3_K: lambda s, d: _deq_q3_k(s, d, d.shape[0] // 256),
    Q2_K: lambda s, d: _deq_q2_k(s, d, d.shape[0] // 256),
    F16: lambda s, d: _deq_f16(s, d, d.shape[0]),
    BF16: lambda s, d: _deq_bf16(s, d, d.shape[0]),
    F32: lambda s, d: _deq_f32(s, d, d.shape[0]),
}


def decode_rows(qtype: int, rows: np.ndarray, row_ids: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = decode(rows[row_ids[i]])`` one row at a time (token embeddings: a few rows a
    call, each a few microseconds)."""
    decode = _ROW_DECODERS[int(qtype)]
    for i, r in enumerate(row_ids):
        decode(rows[r], out[i])


def dequantize(data: np.ndarray, qtype: int, row_len: int) -> np.ndarray:
    """Decode a whole tensor given as raw bytes into float32 ``[n_rows, row_len]`` (norm weights,
    tests, small tensors). F32/F16/BF16 are converted by numpy (nothing to compile at load)."""
    qtype = int(qtype)
    bs, ts = block_size(qtype), type_size(qtype)
    row_bytes = row_len // bs * ts
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype in (F32, F16, BF16):
        if qtype == F32:
            out = raw.view("<f4").astype(np.float32)
        elif qtype == F16:
            out = raw.view("<f2").astype(np.float32)
        else:
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return out.reshape(-1, row_len)
    rows = raw.reshape(-1, row_bytes)
    out = np.empty((rows.shape[0], row_len), dtype=np.float32)
    dequant_row_range(qtype, rows, 0, out)
    return out


#: byte offsets of the float16 scale fields inside one block of each quantized type
SCALE_FIELDS = {Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2), Q8_0: (0,),
                Q2_K: (80, 82), Q3_K: (108,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,)}


def nonfinite(qtype: int, data: np.ndarray) -> bool:
    """Whether a tensor's stored values hold a NaN or an infinity: the elements of F32/F16/BF16
    tensors, the float16 scales of quantized blocks (their quants are integers). One strided read
    of the tensor; meant for diagnosing a forward that produced non-finite logits."""
    if qtype == F32:
        return not np.isfinite(data.view(np.float32)).all()
    if qtype == F16:
        return not np.isfinite(data.view(np.float16)).all()
    if qtype == BF16:
        return bool(((data.view(np.uint16) & 0x7F80) == 0x7F80).any())
    fields = SCALE_FIELDS.get(qtype)
    if fields is None:
        return False
    blocks = data.reshape(-1, type_size(qtype))
    # a float16 is NaN or infinite when its exponent bits are all ones: bits 2-6 of the high byte
    return any(((blocks[:, o + 1] & 0x7C) == 0x7C).any() for o in fields)
