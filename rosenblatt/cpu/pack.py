"""Weights repacked at load for the packed kernels: eight rows interleaved per block
(layouts in :mod:`.ir`; the CPU backend calls :func:`pack` on the types that have them)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ir import PACKED_BLOCK
from ..gguf.quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, Q8_0


@njit(parallel=True, nogil=True, cache=True)
def _pack_q4_k(rows, out):
    """Q4_K rows [8G, nblk * 144] -> out [G, nblk * PACKED_BLOCK] (the layout above)."""
    nblk = rows.shape[1] // 144
    for g in prange(out.shape[0]):
        for b in range(nblk):
            o, s = b * 1184, b * 144
            for r in range(8):
                src = rows[8 * g + r]
                for t in range(2):
                    out[g, o + 2 * r + t] = src[s + t]                  # d
                    out[g, o + 16 + 2 * r + t] = src[s + 2 + t]         # dmin
                for j in range(4):
                    a, m, c = src[s + 4 + j], src[s + 8 + j], src[s + 12 + j]
                    out[g, o + 32 + 8 * j + r] = a & 63
                    out[g, o + 32 + 8 * (j + 4) + r] = (c & 15) | ((a >> 6) << 4)
                    out[g, o + 96 + 8 * j + r] = m & 63
                    out[g, o + 96 + 8 * (j + 4) + r] = (c >> 4) | ((m >> 6) << 4)
                for cc in range(4):
                    for c in range(4):
                        dst = o + 160 + ((cc * 4 + c) * 2 + r // 4) * 32 + (r % 4) * 8
                        out[g, dst:dst + 8] = src[s + 16 + 32 * cc + 8 * c:s + 24 + 32 * cc + 8 * c]


@njit(parallel=True, nogil=True, cache=True)
def _pack_q8_0(rows, out):
    """Q8_0 rows [8G, nblk * 34] -> out [G, nblk * 272]: per block the slices [c][h] (rows
    4h..4h+3, quants 8c..8c+7, each + 128 as an unsigned byte), then d[8]."""
    nblk = rows.shape[1] // 34
    for g in prange(out.shape[0]):
        for b in range(nblk):
            o, s = b * 272, b * 34
            for r in range(8):
                src = rows[8 * g + r]
                out[g, o + 256 + 2 * r] = src[s]
                out[g, o + 257 + 2 * r] = src[s + 1]
                for c in range(4):
                    dst = o + (c * 2 + r // 4) * 32 + (r % 4) * 8
                    for t in range(8):
                        out[g, dst + t] = src[s + 2 + 8 * c + t] ^ 128


@njit(parallel=True, nogil=True, cache=True)
def _pack_nibbles(rows, out, bsize, scales, five):
    """Q4_0 (``bsize`` 18, ``scales`` 1: d) / Q4_1 (20, 2: d, m) rows, and with ``five`` Q5_0 (22,
    1) / Q5_1 (24, 2), [8G, nblk * bsize] -> out [G, nblk * (128 + 32 * five + 16 * scales)]: per
    block the 4-bit slices (quants 8c..8c+7 of rows 4h..4h+3; slice c in the low nibbles of the 32
    bytes at (c % 2 * 2 + h) * 32, slice c + 2 in their high nibbles); Q5_x's fifth bits (slice s
    of rows 4h..4h+3 at 128 + (s * 2 + h) * 4: row 4h + r's byte s of the block's 32-bit qh); then
    d[8] (and m[8]). A row-major block: the scales, Q5_x's qh (bit i: quant i's fifth bit), the 16
    bytes of nibbles (quant i in byte i % 16's low (i < 16) or high nibble)."""
    nblk = rows.shape[1] // bsize
    quants = 160 if five else 128
    osize = quants + 16 * scales
    qh_at = 2 * scales
    qs_at = qh_at + (4 if five else 0)
    for g in prange(out.shape[0]):
        for b in range(nblk):
            o, s = b * osize, b * bsize
            for r in range(8):
                src = rows[8 * g + r]
                for t in range(2 * scales):
                    out[g, o + quants + 16 * (t // 2) + 2 * r + t % 2] = src[s + t]
                if five:
                    for sl in range(4):
                        out[g, o + 128 + (sl * 2 + r // 4) * 4 + r % 4] = src[s + qh_at + sl]
                for c in range(2):
                    dst = o + (c * 2 + r // 4) * 32 + (r % 4) * 8
                    for t in range(8):
                        lo, hi = 8 * c + t, 8 * (c + 2) + t          # quants of slices c and c + 2
                        qlo = src[s + qs_at + lo % 16] >> (4 * (lo // 16)) & 15
                        qhi = src[s + qs_at + hi % 16] >> (4 * (hi // 16)) & 15
                        out[g, dst + t] = qlo | (qhi << 4)


@njit(parallel=True, nogil=True, cache=True)
def _pack_q6_k(rows, out):
    """Q6_K rows [8G, nblk * 210] -> out [G, nblk * 1680] (the layout in :mod:`.ir`). A row-major
    block: ql[128], qh[64], scales[16] (int8), d (f16); quant h * 128 + r has the low bits
    (ql[64h + r % 64] >> 4 * (r // 64)) & 15 and the top bits (qh[32h + r % 32] >> 2 * (r // 32)) & 3."""
    nblk = rows.shape[1] // 210
    for g in prange(out.shape[0]):
        q = np.empty((8, 256), np.uint8)
        og = out[g]
        for b in range(nblk):
            o, s = b * 1680, b * 210
            for r in range(8):
                src, qr = rows[8 * g + r, s:s + 210], q[r]
                for h in range(2):          # quants 128h + l + {0, 32, 64, 96} share their bytes
                    for l in range(32):
                        a, c, hb = src[64 * h + l], src[64 * h + 32 + l], src[128 + 32 * h + l]
                        e = 128 * h + l
                        qr[e] = (a & 15) | ((hb & 3) << 4)
                        qr[e + 32] = (c & 15) | (((hb >> 2) & 3) << 4)
                        qr[e + 64] = (a >> 4) | (((hb >> 4) & 3) << 4)
                        qr[e + 96] = (c >> 4) | (((hb >> 6) & 3) << 4)
                for j in range(16):
                    og[o + 1536 + 8 * j + r] = src[192 + j]
                og[o + 1664 + 2 * r] = src[208]
                og[o + 1665 + 2 * r] = src[209]
            for j in range(16):
                dst = og[o + 96 * j:o + 96 * j + 96]
                for r in range(8):
                    qr = q[r, 16 * j:16 * j + 16]
                    for t in range(4):
                        r3 = qr[12 + t]
                        dst[4 * r + t] = qr[t] | ((r3 & 3) << 6)
                        dst[32 + 4 * r + t] = qr[4 + t] | (((r3 >> 2) & 3) << 6)
                        dst[64 + 4 * r + t] = qr[8 + t] | ((r3 >> 4) << 6)


def _pack_q4_0(rows, out):
    _pack_nibbles(rows, out, 18, 1, False)


def _pack_q4_1(rows, out):
    _pack_nibbles(rows, out, 20, 2, False)


def _pack_q5_0(rows, out):
    _pack_nibbles(rows, out, 22, 1, True)


def _pack_q5_1(rows, out):
    _pack_nibbles(rows, out, 24, 2, True)


#: packed type -> (bytes of one of its blocks in a GGUF row, the function that packs its rows)
_PACKERS = {Q4_K: (144, _pack_q4_k), Q8_0: (34, _pack_q8_0), Q4_0: (18, _pack_q4_0), Q4_1: (20, _pack_q4_1),
            Q5_0: (22, _pack_q5_0), Q5_1: (24, _pack_q5_1), Q6_K: (210, _pack_q6_k)}


class Packed:
    """A matrix's rows in a packed kernel's layout (:data:`PACKED_BLOCK`): ``data`` [N / 8,
    blocks * PACKED_BLOCK] uint8, ``n`` rows of type ``qtype``."""

    def __init__(self, qtype: int, data: np.ndarray, n: int):
        self.qtype, self.data, self.n = qtype, data, n


#: source bytes packed per call: a large matrix is packed piece by piece, each piece's file pages
#: released before the next (gemma-3-270m's 178 MB embedding matrix otherwise held its file
#: pages and its packed copy at once: peak RSS 513 MB against 429 after the load)
PACK_PIECE_BYTES = 1 << 24


def pack(qtype: int, rows: np.ndarray, release=None) -> Packed | None:
    """``rows`` (a matrix's blocks, row-major) in the packed layout, or None where there is no
    packed kernel for the type or the row count is not a multiple of 8. ``release(piece)`` is
    called on each piece of ``rows`` once packed (the backend lets the file's pages go)."""
    if qtype not in PACKED_BLOCK or rows.shape[0] % 8 or rows.shape[0] == 0:
        return None
    block_bytes, packer = _PACKERS[qtype]
    nblk = rows.shape[1] // block_bytes
    shape = (rows.shape[0] // 8, nblk * PACKED_BLOCK[qtype])
    raw = np.empty(shape[0] * shape[1] + 64, np.uint8)      # on a cache line: no load straddles two
    start = -raw.ctypes.data % 64
    out = raw[start:start + shape[0] * shape[1]].reshape(shape)
    step = max(1, PACK_PIECE_BYTES // (8 * rows.shape[1]))   # groups of 8 rows a piece
    for g0 in range(0, shape[0], step):
        g1 = min(shape[0], g0 + step)
        packer(rows[8 * g0:8 * g1], out[g0:g1])
        if release is not None:
            release(rows[8 * g0:8 * g1])
    return Packed(qtype, out, rows.shape[0])
