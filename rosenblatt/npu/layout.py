"""Data packing between row-major numpy matrices and the NPU's memory layouts (vectorised).

* Feature (input) layout, int8, "NC1HWC2" with a 16-byte atom (docs/npu-reference.md §5.1):
  a GEMM operand A[M, K] is a feature cube of width 1, height M, K channels, stored as
  ``K/16`` planes of ``M`` atoms: byte(m, k) = (k // 16) * 16 * M + 16 * m + (k % 16).
* Weights, int8, blocks of 32 kernels x 32 channels (§5.2): kernel n is column n of B[K, N];
  within one K tile of ``kt`` channels, byte(n, k) = (n // 32) * 32 * kt + (k // 32) * 1024
  + (n % 32) * 32 + (k % 32). K tiles are stored one after another.
* Output, int32, 4 channels per 16-byte atom (§5.3): C[M, N] as ``N/4`` planes of ``M`` atoms:
  word(m, n) = (n // 4) * 4 * M + 4 * m + (n % 4).

Row counts and channel counts passed here are already padded (M to 4, K and N to 32); the
padding is zero so it adds nothing to any dot product.
"""

from __future__ import annotations

import numpy as np

from . import hw_assumptions as hw

ATOM = hw.FEATURE_ATOM_BYTES
GROUP = hw.WEIGHT_KERNEL_GROUP
CHUNK = hw.WEIGHT_CHANNEL_CHUNK
OUT_C2 = hw.OUT_INT32_PER_ATOM


def align(x: int, a: int) -> int:
    return -(-x // a) * a


def _to_atoms(a: np.ndarray, rows: int, channels: int, atom: int, dtype) -> np.ndarray:
    """A[M, C] zero-padded to [rows, channels], then channel atom by channel atom: for each group
    of ``atom`` channels, every row's ``atom`` values in turn (the feature/output surface order)."""
    m, c = a.shape
    padded = np.zeros((rows, channels), dtype=dtype)
    padded[:m, :c] = a
    return np.ascontiguousarray(padded.reshape(rows, channels // atom, atom).transpose(1, 0, 2)).reshape(-1)


def _from_atoms(v: np.ndarray, rows: int, channels: int, atom: int) -> np.ndarray:
    """Inverse of :func:`_to_atoms` (padded shape)."""
    v = v[: rows * channels]
    return np.ascontiguousarray(v.reshape(channels // atom, rows, atom).transpose(1, 0, 2)).reshape(rows, channels)


def pack_feature(a: np.ndarray, rows: int, channels: int) -> np.ndarray:
    """A[M, K] int8 -> feature bytes (int8, length channels*rows), zero-padded."""
    m, k = a.shape
    if rows < m or channels < k or channels % ATOM:
        raise ValueError(f"cannot pack {a.shape} into {rows} rows x {channels} channels")
    return _to_atoms(a, rows, channels, ATOM, np.int8)


def unpack_feature(buf: np.ndarray, rows: int, channels: int) -> np.ndarray:
    """Inverse of :func:`pack_feature` (padded shape)."""
    return _from_atoms(np.asarray(buf, dtype=np.int8), rows, channels, ATOM)


def pack_weights_tile(b_tile: np.ndarray, kt: int, kernels: int) -> np.ndarray:
    """One K tile B[k0:k0+kt', :] (int8, kt' <= kt rows) -> weight bytes, zero-padded to
    ``kt`` channels and ``kernels`` kernels."""
    k, n = b_tile.shape
    if kt % CHUNK or kernels % GROUP or k > kt or n > kernels:
        raise ValueError(f"cannot pack {b_tile.shape} into {kt} channels x {kernels} kernels")
    padded = np.zeros((kt, kernels), dtype=np.int8)
    padded[:k, :n] = b_tile
    # [kc, kk, ng, nn] -> [ng, kc, nn, kk]
    blocks = padded.reshape(kt // CHUNK, CHUNK, kernels // GROUP, GROUP).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocks).reshape(-1)


def pack_weights(b: np.ndarray, k_tiles, kernels: int) -> tuple[np.ndarray, list[int]]:
    """B[K, N] int8 -> all K tiles packed back to back; returns (bytes, byte offset per tile).

    ``k_tiles`` is a sequence of (k0, kt) with kt a multiple of 32; channels past K are zero.
    """
    parts, offsets, pos = [], [], 0
    for k0, kt in k_tiles:
        part = pack_weights_tile(b[k0 : k0 + kt], kt, kernels)
        parts.append(part)
        offsets.append(pos)
        pos += part.size
    return (np.concatenate(parts) if parts else np.zeros(0, np.int8)), offsets


def unpack_weights_tile(buf: np.ndarray, kt: int, kernels: int) -> np.ndarray:
    """Inverse of :func:`pack_weights_tile`: bytes -> B tile [kt, kernels]."""
    v = np.asarray(buf, dtype=np.int8)[: kt * kernels]
    blocks = v.reshape(kernels // GROUP, kt // CHUNK, GROUP, CHUNK)  # [ng, kc, nn, kk]
    return np.ascontiguousarray(blocks.transpose(1, 3, 0, 2)).reshape(kt, kernels)


def pack_output(c: np.ndarray, rows: int, channels: int) -> np.ndarray:
    """C[M, N] int32 -> output words (int32) in the DPU's int32 layout (for tests)."""
    return _to_atoms(c, rows, channels, OUT_C2, np.int32)


def unpack_output(words: np.ndarray, rows: int, channels: int) -> np.ndarray:
    """Output words (int32, padded rows x channels) -> row-major C [rows, channels]."""
    return _from_atoms(np.asarray(words), rows, channels, OUT_C2)
