"""Block decoding bit-exact against gguf.quants; quantized matmul against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from rosenblatt.backends.cpu import CPUBackend
from rosenblatt.gguf.file import TensorInfo
from rosenblatt.gguf.quants import SUPPORTED_TYPES, dequantize

from support import FP16_FIELDS, finite_f16_bits, random_blocks

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

def test_every_listed_type_is_supported():
    assert set(TYPES) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qtype):
    rng = np.random.default_rng(1000 + int(qtype))
    bs, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 1024 if bs > 1 else 1024 * 32
    data = random_blocks(rng, qtype, n_blocks)
    row_len = 256 if bs == 1 else bs * 4
    ours = dequantize(data, int(qtype), row_len).reshape(-1)
    ref = np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(-1)
    assert ours.shape == ref.shape
    assert np.isfinite(ref).all()
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, f"{qtype.name}: {diff.size} elements differ, first at {diff[0]}: {ours[diff[0]]} vs {ref[diff[0]]}"


def make_weight(rng, qtype, n_out, n_in):
    bs, ts = GGML_QUANT_SIZES[qtype]
    data = random_blocks(rng, qtype, n_out * n_in // bs, small=True)
    return TensorInfo("w", qtype, (n_in, n_out), data)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_matmul_against_float64(qtype, m):
    rng = np.random.default_rng(7 * int(qtype) + m)
    n_out, n_in = 96, 768
    t = make_weight(rng, qtype, n_out, n_in)
    backend = CPUBackend(kernels="float")
    w = backend.prepare(t)
    x = rng.standard_normal((m, n_in)).astype(np.float32)
    y = backend.matmul(x, w)
    W = np.asarray(gguf_dequantize(t.data, qtype), dtype=np.float64).reshape(n_out, n_in)
    ref = x.astype(np.float64) @ W.T
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert y.dtype == np.float32 and y.shape == (m, n_out)
    assert rel <= 1e-5, f"{qtype.name} M={m}: relative error {rel:.2e}"


def test_matmul_row_regimes_agree():
    """The decode kernel (M < 8) and the BLAS band path (M >= 8) compute the same product."""
    rng = np.random.default_rng(5)
    t = make_weight(rng, T.Q4_K, 1000, 512)  # several bands and a ragged last one
    b = CPUBackend(kernels="float")
    w = b.prepare(t)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    y_blas = b.matmul(x, w)
    y_rows = np.concatenate([b.matmul(x[i:i + 1], w) for i in range(9)])
    np.testing.assert_allclose(y_blas, y_rows, rtol=1e-5, atol=1e-5 * np.abs(y_rows).max())


def test_embedding_rows_decode_only_requested():
    rng = np.random.default_rng(9)
    t = make_weight(rng, T.Q6_K, 50, 256)
    b = CPUBackend(kernels="float")
    w = b.prepare(t)
    ids = np.array([3, 0, 49, 3])
    W = np.asarray(gguf_dequantize(t.data, T.Q6_K), dtype=np.float32).reshape(50, 256)
    assert np.array_equal(b.embed(w, ids), W[ids])


@pytest.mark.parametrize("m", [1, 5, 40])
def test_grouped_products_equal_single_ones(m):
    """matmul_many (q/k/v, gate/up): one quantization and one region on the int8 kernels when the
    types share an activation format, per-matrix products otherwise — the same numbers."""
    rng = np.random.default_rng(11 + m)
    b = CPUBackend(threads=2)
    ws = [b.prepare(make_weight(rng, qt, n, 512)) for qt, n in
          ((T.Q4_K, 96), (T.Q6_K, 32), (T.Q4_K, 32), (T.Q8_0, 64), (T.Q3_K, 16))]
    x = rng.standard_normal((m, 512)).astype(np.float32)
    for group in (ws[:3], ws[:2], ws[3:4], ws[2:5]):        # K-quants; one Q8_0; mixed: per matrix
        got = b.matmul_many(x, tuple(group))
        for w, y in zip(group, got):
            assert y.shape == (m, w.n_out)
            np.testing.assert_array_equal(y, b.matmul(x, w))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_row_by_row_decoding_is_bit_exact(qtype):
    """decode_rows (embeddings: only that type's decoder, called per row) against gguf.quants."""
    from rosenblatt.gguf.quants import decode_rows
    rng = np.random.default_rng(2000 + int(qtype))
    k = 256
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows = random_blocks(rng, qtype, 9 * k // bs).reshape(9, k // bs * ts)
    ids = np.array([3, 0, 8, 3], np.int64)
    ours = np.full((4, k), np.nan, np.float32)
    decode_rows(int(qtype), rows, ids, ours)
    ref = np.asarray(gguf_dequantize(rows[ids].reshape(-1), qtype), dtype=np.float32).reshape(4, k)
    assert np.isfinite(ref).all() and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
