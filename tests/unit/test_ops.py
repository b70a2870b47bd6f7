"""The numba kernels of rosenblatt.cpu.ops (and the llama.py functions built on them) against float64 numpy.

Inputs are float32; the references compute in float64 from the same float32 values, so the
differences are the kernels' own float32 rounding. EPS is float32's unit roundoff (2^-24); each
tolerance counts the roundings the kernel does.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from rosenblatt.cpu import ops
from rosenblatt.models.gemma3 import gelu_mul
from rosenblatt.models.llama import apply_rope, attention, rms_norm, silu_mul

EPS = 2.0 ** -24


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@njit(cache=False)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.exp(x[i])


def test_exp_within_2_ulp():
    x = np.concatenate([np.linspace(-104, 89, 400_001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3, -103.9, 88.73, -104.0,
                                    -1e4, 1e4, -np.inf, np.inf])])
    out = np.empty_like(x)
    _exp_all(x, out)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    ulp = np.spacing(ref[normal].astype(np.float32)).astype(np.float64)     # the ulp at the exact value
    assert (np.abs(out[normal] - ref[normal]) <= 2 * ulp).all()
    sub = ref < np.finfo(np.float32).tiny                  # subnormal results: 1 subnormal step + rounding
    assert (np.abs(out[sub] - ref[sub]) <= 2 * 2.0 ** -149).all()
    assert (out[ref > np.finfo(np.float32).max] == np.inf).all()
    assert out[x == -np.inf][0] == 0.0
    assert np.isnan(_exp_nan())


def _exp_nan():
    out = np.empty(1, np.float32)
    _exp_all(np.float32([np.nan]), out)
    return out[0]


@pytest.mark.parametrize("shape,eps", [((1, 1536), 1e-6), ((7, 640), 1e-6), ((12, 256), 1e-6), ((5, 1001), 1e-5)])
def test_rms_norm(shape, eps):
    rng = np.random.default_rng(1)
    x, w = rand(rng, *shape, scale=3.0), rand(rng, shape[1])
    x[0, :3] = 0.0
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w
    out = rms_norm(x, w, eps)
    assert out.dtype == np.float32 and out.shape == x.shape
    # products only, so relative errors add: mean (float64 sum, rounded once), + eps, sqrt, 1/., x*r, *w
    np.testing.assert_allclose(out, ref, rtol=6 * EPS, atol=0)


def test_rms_norm_all_zero_row_is_zero():
    x = np.zeros((2, 64), np.float32)
    x[1] = 1.0
    out = rms_norm(x, np.ones(64, np.float32), 1e-6)
    assert (out[0] == 0).all() and np.allclose(out[1], 1.0, rtol=1e-6)


def rope_reference(x, cos, sin, rope_dim, neox):
    out = x.astype(np.float64)
    c, s = cos.astype(np.float64)[:, None, :], sin.astype(np.float64)[:, None, :]
    half = rope_dim // 2
    a = np.arange(half) if neox else 2 * np.arange(half)
    b = a + half if neox else a + 1
    x0, x1 = out[..., a].copy(), out[..., b].copy()
    out[..., a] = x0 * c - x1 * s
    out[..., b] = x0 * s + x1 * c
    return out


@pytest.mark.parametrize("t,heads,head_dim,rope_dim,neox", [
    (1, 12, 128, 128, True),        # qwen2 decode
    (5, 2, 128, 128, True),
    (3, 9, 64, 64, False),          # llama (smollm2) layout
    (2, 4, 256, 256, True),         # gemma3
    (4, 3, 128, 64, True),          # partial rotary
    (4, 3, 128, 64, False),
])
def test_apply_rope(t, heads, head_dim, rope_dim, neox):
    rng = np.random.default_rng(2)
    x = rand(rng, t, heads, head_dim)
    angles = rng.uniform(0, 2 * np.pi, (t, rope_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    ref = rope_reference(x, cos, sin, rope_dim, neox)
    y = x.copy()
    assert apply_rope(y, cos, sin, rope_dim, neox) is None
    # each output is a*c -+ b*s: 2 products and a sum, each rounded once; with cancellation only an
    # absolute bound holds: EPS (|ac| + |bs|) + EPS |ac -+ bs| <= 4 EPS max|x|
    bound = 4 * EPS * np.abs(x).max()
    assert np.abs(y - ref).max() <= bound
    assert (y[..., rope_dim:] == x[..., rope_dim:]).all()       # dimensions past rope_dim untouched


@pytest.mark.parametrize("shape", [(1, 8960), (3, 2048), (2, 17), (9, 300)])     # 9 rows: the parallel kernel
def test_silu_mul(shape):
    rng = np.random.default_rng(3)
    gate, up = rand(rng, *shape, scale=4.0), rand(rng, *shape)
    gate[0, :8] = [0.0, -0.0, 50.0, -50.0, 90.0, -90.0, 1e4, -1e4]       # exp over/underflow on either side
    g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g64 / (1.0 + np.exp(-g64)) * u64
    out = silu_mul(gate, up)
    assert out.dtype == np.float32 and out.shape == gate.shape
    # exp(-gate) overflows float32 for gate < -88.72 (as with numpy's float32 exp): result 0 for a true
    # value below 1e-33; elsewhere relative: exp's 2 ulp (4 EPS), then 1 + e, the division, the product
    flushed = gate < -88.72
    assert (out[flushed] == 0).all() and (np.abs(ref[flushed]) < 1e-33).all()
    np.testing.assert_allclose(out[~flushed], ref[~flushed], rtol=7 * EPS, atol=0)


@pytest.mark.parametrize("shape", [(1, 2048), (3, 640), (2, 17), (9, 300)])     # 9 rows: the parallel kernel
def test_gelu_mul(shape):
    """gemma3's gating as ggml computes it (ggml_vec_geglu_f32 with GGML_GELU_FP16): 0 at or below
    -10, gate * up at or above 10, and between them gelu's tanh approximation at the gate rounded
    to float16, rounded to float16 itself, times up in float32. Reference: numpy's float16
    conversions and float64 tanh."""
    rng = np.random.default_rng(4)
    gate, up = rand(rng, *shape, scale=4.0), rand(rng, *shape)
    gate[0, :12] = [0.0, -0.0, 5.0, -5.0, 9.0, -9.0, 1e4, -1e4, 10.0, -10.0, 3e-6, -7e-8]   # cut-offs, subnormal halves
    # float16 ties: halfway between two float16 neighbours in [1, 2) (spacing 2^-10; round to
    # even), and just beside
    h = np.float16(1.2345).astype(np.float64)
    tie = h + 2.0 ** -11
    assert tie == (h + np.nextafter(np.float16(h), np.float16(2)).astype(np.float64)) / 2      # a true tie
    gate.flat[12:15] = [tie, np.nextafter(np.float32(tie), np.float32(0)), -tie]
    x = gate.astype(np.float16).astype(np.float64)
    table = (0.5 * x * (1.0 + np.tanh(np.sqrt(2 / np.pi) * x * (1.0 + 0.044715 * x * x)))).astype(np.float16)
    ref = table.astype(np.float32) * up
    ref = np.where(gate <= -10, np.float32(0), np.where(gate >= 10, gate * up, ref))
    out = gelu_mul(gate, up)
    assert out.dtype == np.float32 and out.shape == gate.shape
    assert np.array_equal(out, ref)
    # the tanh approximation itself, within float16's rounding of input and output
    g64 = gate.astype(np.float64)
    exact = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3))) * up
    inside = np.abs(gate) < 10
    assert (np.abs(out - exact)[inside] <= 3e-3 * np.abs(up[inside]) * (1 + np.abs(g64[inside]))).all()


@pytest.mark.parametrize("use_gelu", [False, True])
def test_gate_row_is_the_gating_bit_for_bit(use_gelu):
    """The fused step's gating of a gate/up row (halves side by side) gives silu_mul / gelu_mul's bits."""
    from rosenblatt.cpu import ops
    rng = np.random.default_rng(5)
    gu = rand(rng, 3, 2 * 1000, scale=4.0)
    out = np.zeros((3, 1000), np.float32)
    for t in range(3):
        ops.gate_row(gu, t, 1000, ops.GELU_F16 if use_gelu else np.zeros(0, np.float32), out)
    ref = (gelu_mul if use_gelu else silu_mul)(np.ascontiguousarray(gu[:, :1000]), np.ascontiguousarray(gu[:, 1000:]))
    assert np.array_equal(out, ref)


def attention_reference(q, k_cache, v_cache, start, n_kv, window=0, scale=None):
    """Every query position start+t against keys [pos-window+1 (or 0), pos], float64, head by head."""
    t, h, hd = q.shape
    scale = 1 / np.sqrt(hd) if scale is None else scale
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k_cache, v_cache))
    out = np.zeros((t, h, v_cache.shape[2]))
    for i in range(t):
        pos = start + i
        lo = max(0, pos - window + 1) if window else 0
        for head in range(h):
            kv = head // (h // n_kv)
            s = k64[kv, lo:pos + 1] @ q64[i, head] * np.float32(scale)
            p = np.exp(s - s.max())
            out[i, head] = p / p.sum() @ v64[kv, lo:pos + 1]
    return out.reshape(t, -1)


ATTENTION_CASES = [   # heads, kv heads, head_dim, head_dim_v, start, window, scale
    (12, 2, 128, 128, 0, 0, None),          # qwen2-1.5B shape, first position
    (12, 2, 128, 128, 6, 0, None),
    (12, 2, 128, 128, 102, 0, None),
    (9, 3, 64, 64, 40, 0, None),            # smollm2 shape
    (4, 4, 32, 16, 17, 0, None),            # no grouping, hd_v != hd
    (4, 1, 256, 256, 700, 512, 0.0625),     # gemma3 local layer: sliding window, explicit scale
    (4, 1, 256, 256, 300, 512, 0.0625),     # ... window not full yet
    (4, 1, 256, 256, 700, 0, 0.05),         # gemma3 global layer
]


def attention_inputs(seed, h, n_kv, hd, hd_v, start, t):
    rng = np.random.default_rng(seed)
    n_ctx = start + t + 9               # cache positions past the queries hold junk the kernel must not read
    return rand(rng, t, h, hd), rand(rng, n_kv, n_ctx, hd), rand(rng, n_kv, n_ctx, hd_v)


def attention_tolerance(v):
    """The output is a convex combination of values |v| <= vmax. Each weight carries a few float32
    roundings (dot product, scale, exp's 2 ulp, normalisation) and the weighted sum a few more;
    16 EPS vmax bounds them with room for the summation order (observed: about 2 EPS vmax)."""
    return 16 * EPS * np.abs(v).max()


@pytest.mark.parametrize("h,n_kv,hd,hd_v,start,window,scale", ATTENTION_CASES)
def test_attention_decode(h, n_kv, hd, hd_v, start, window, scale):
    q, k, v = attention_inputs(4, h, n_kv, hd, hd_v, start, 1)
    ref = attention_reference(q, k, v, start, n_kv, window, scale)
    out = attention(q, k, v, start, n_kv, window, scale)
    assert out.shape == (1, h * hd_v) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= attention_tolerance(v)


@pytest.mark.parametrize("h,n_kv,hd,hd_v,start,window,scale", ATTENTION_CASES[1::2])
def test_attention_batch(h, n_kv, hd, hd_v, start, window, scale):
    """Several queries (prefill) take the numpy path; same reference."""
    q, k, v = attention_inputs(5, h, n_kv, hd, hd_v, start, 7)
    ref = attention_reference(q, k, v, start, n_kv, window, scale)
    out = attention(q, k, v, start, n_kv, window, scale)
    assert out.shape == (7, h * hd_v)
    assert np.abs(out - ref).max() <= attention_tolerance(v)


def test_attention_decode_equals_batch_rows():
    """Decoding position by position gives the rows of one batched call (up to rounding)."""
    q, k, v = attention_inputs(6, 4, 1, 256, 256, 500, 30)
    batch = attention(q, k, v, 500, 1, 512, 0.0625)
    steps = np.concatenate([attention(q[i:i + 1], k, v, 500 + i, 1, 512, 0.0625) for i in range(30)])
    np.testing.assert_allclose(steps, batch, rtol=0, atol=attention_tolerance(v))


@pytest.mark.parametrize("h,n_kv,hd,hd_v,start,window,scale", ATTENTION_CASES)
def test_attention_scores_kernel_gives_the_plain_loops_bits(h, n_kv, hd, hd_v, start, window, scale):
    """The vector dot-product kernel of the scores (simd's dots_f32) is ops._dot8's operations in
    one register: the same bits as the plain loop, on every ISA (the A76 lane runs this too)."""
    from rosenblatt.cpu import ops
    assert ops.dots_kernel() != 0
    q, k, v = attention_inputs(7, h, n_kv, hd, hd_v, start, 1)
    lo = max(0, start - window + 1) if window else 0
    out = [np.full((h, hd_v), np.nan, np.float32) for _ in range(2)]
    for o, dots in zip(out, (ops.dots_kernel(), 0)):
        ops.attention_decode(q[0], k, v, n_kv, lo, start + 1, np.float32(scale or hd ** -0.5), o, dots)
    assert np.array_equal(out[0], out[1])
