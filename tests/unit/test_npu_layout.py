"""Data packers against element-by-element formulas (docs/npu-reference.md §5)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosenblatt.npu import layout


def rand_i8(rng, shape):
    return rng.integers(-128, 128, shape, dtype=np.int8)


def test_feature_byte_formula():
    rng = np.random.default_rng(1)
    a = rand_i8(rng, (7, 40))
    rows, ch = 8, 48
    buf = layout.pack_feature(a, rows, ch)
    assert buf.size == rows * ch
    for m in range(rows):
        for k in range(ch):
            want = a[m, k] if m < 7 and k < 40 else 0
            assert buf[(k // 16) * 16 * rows + 16 * m + (k % 16)] == want


def test_weight_byte_formula():
    rng = np.random.default_rng(2)
    b = rand_i8(rng, (70, 45))  # K x N
    kt, kern = 96, 64
    buf = layout.pack_weights_tile(b, kt, kern)
    assert buf.size == kt * kern
    for n in range(kern):
        for k in range(kt):
            want = b[k, n] if k < 70 and n < 45 else 0
            off = (n // 32) * 32 * kt + (k // 32) * 32 * 32 + (n % 32) * 32 + (k % 32)
            assert buf[off] == want


def test_weight_k_tiles_are_concatenated():
    rng = np.random.default_rng(3)
    b = rand_i8(rng, (100, 32))
    tiles = [(0, 64), (64, 64)]
    buf, offsets = layout.pack_weights(b, tiles, 32)
    assert offsets == [0, 64 * 32]
    np.testing.assert_array_equal(layout.unpack_weights_tile(buf[:2048], 64, 32), b[:64])
    second = layout.unpack_weights_tile(buf[2048:], 64, 32)
    np.testing.assert_array_equal(second[:36], b[64:])
    assert not second[36:].any()


def test_output_word_formula():
    rng = np.random.default_rng(4)
    c = rng.integers(-(2**31), 2**31, (5, 12), dtype=np.int64).astype(np.int32)
    rows, ch = 8, 32
    words = layout.pack_output(c, rows, ch)
    for m in range(rows):
        for n in range(ch):
            want = c[m, n] if m < 5 and n < 12 else 0
            assert words[(n // 4) * 4 * rows + 4 * m + (n % 4)] == want
    np.testing.assert_array_equal(layout.unpack_output(words, rows, ch)[:5, :12], c)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 100), n=st.integers(1, 80))
def test_roundtrips(m, k, n):
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    rows, kp, np_ = layout.align(m, 4), layout.align(k, 32), layout.align(n, 32)
    a = rand_i8(rng, (m, k))
    np.testing.assert_array_equal(layout.unpack_feature(layout.pack_feature(a, rows, kp), rows, kp)[:m, :k], a)
    b = rand_i8(rng, (k, n))
    np.testing.assert_array_equal(layout.unpack_weights_tile(layout.pack_weights_tile(b, kp, np_), kp, np_)[:k, :n], b)


def test_packers_refuse_bad_padding():
    a = np.zeros((5, 20), np.int8)
    with pytest.raises(ValueError):
        layout.pack_feature(a, 4, 32)  # fewer rows than A has
    with pytest.raises(ValueError):
        layout.pack_feature(a, 8, 24)  # channels not a multiple of the 16-byte atom
    with pytest.raises(ValueError):
        layout.pack_weights_tile(np.zeros((20, 5), np.int8), 48, 32)  # K tile not a multiple of 32
