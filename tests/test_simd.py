"""Integer-SIMD decode kernels (LLVM IR via llvmlite) against a numpy emulation and llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from rosenblatt import Engine, simd

from conftest import MICRO_MODELS, load_reference, micro_path
from test_quants import random_blocks

SIMD = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]


def test_kernels_compile_for_this_cpu():
    assert set(simd.kernels()) == {int(t) for t in SIMD}
    assert set(simd.kernels(x86=False)) == {int(t) for t in SIMD}       # the portable IR (the A76's)


def _reference_quantization(x, n):
    xb = x.reshape(x.shape[0], -1, n).astype(np.float64)
    dd = np.abs(xb).max(-1) / 127
    v = np.divide(xb, dd[..., None], out=np.zeros_like(xb), where=dd[..., None] > 0)
    ref = np.where(v >= 0, np.floor(v + 0.5), -np.floor(-v + 0.5))     # roundf: half away from zero
    return ref.astype(np.int8).reshape(x.shape), dd


def test_activation_quantization_is_llamacpps_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1, :256] = 0.0                                    # an all-zero block: d = 0, q = 0
    x[2, 3] = x[2, 7] = -np.abs(x[2, :256]).max() * 1.5  # a tie at the block maximum, negative
    q, d, s = simd.quantize_activations(x, simd.Q8_32)
    ref, dd = _reference_quantization(x, 32)
    assert np.array_equal(q, ref)
    assert np.allclose(d, dd, rtol=1e-6) and (d[1, 0] == 0)
    assert np.allclose(s, d * q.reshape(3, -1, 32).sum(-1), rtol=1e-6)
    q, d, s = simd.quantize_activations(x, simd.Q8_256)
    ref, dd = _reference_quantization(x, 256)
    assert np.array_equal(q, ref) and s.dtype == np.int16
    assert np.allclose(d, dd, rtol=1e-6) and (d[1, 0] == 0)
    assert np.array_equal(s, q.reshape(3, -1, 16).sum(-1))


@pytest.mark.parametrize("x86", [None, False], ids=["host", "portable"])
@pytest.mark.parametrize("qtype", SIMD, ids=lambda t: t.name)
def test_kernel_equals_numpy_emulation(qtype, x86):
    """dot(W, dequant(quant(x))) in float64 — the kernel computes exactly the scheme; for one
    and several activation rows, split row ranges and numba's parallel split."""
    fns = simd.kernels(x86)
    rng = np.random.default_rng(int(qtype))
    n, k, m = 300, 1024, 3
    bs, ts = GGML_QUANT_SIZES[qtype]
    data = random_blocks(rng, qtype, n * k // bs, small=True)
    rows = data.reshape(n, k // bs * ts)
    x = rng.standard_normal((m, k)).astype(np.float32)
    fmt = simd.ACT_FORMAT[int(qtype)]
    acts = simd.quantize_activations(x, fmt)
    W = np.asarray(gguf_dequantize(data, qtype), np.float64).reshape(n, k)
    xq, xd, _ = acts
    xdeq = (xq.astype(np.float64).reshape(m, -1, fmt) * xd[..., None].astype(np.float64)).reshape(m, k)
    ref = xdeq @ W.T
    exact = x.astype(np.float64) @ W.T
    for rows_m in (1, m):
        out = np.full((rows_m, n), np.nan, np.float32)
        sub = tuple(a[:rows_m] for a in acts)
        simd.matmul(int(qtype), rows, sub, out, 0, 150, fns)
        simd.matmul(int(qtype), rows, sub, out, 150, n, fns, parts=2)       # two row ranges, as the threads do
        assert np.abs(out - ref[:rows_m]).max() <= 1e-5 * np.abs(ref).max()
        # and it is the float product up to the activation rounding (~0.5/127 per value)
        assert np.abs(out - exact[:rows_m]).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("name", [n for n in MICRO_MODELS if n.split("-micro-")[1] in
                                  ("q8_0", "q4_0", "q4_1", "q4_k_m", "q6_k")])
def test_int8_decode_matches_llamacpp_generation_rows(name):
    """llama.cpp made gen_logits one decode call per token with int8 activations; so do we."""
    meta, L, G, tol = load_reference(name)
    e = Engine.load(micro_path(name), n_ctx=64)
    assert e.model.backend.decode_kernels == "int8"
    e.eval(meta["prompt_ids"][:-1], logits="none")
    rows = [e.eval(meta["prompt_ids"][-1:])[0]]
    for tok in meta["greedy_ids"][:15]:
        rows.append(e.eval([tok])[0])                    # M = 1: the int8 kernels
    d = np.array(rows, np.float64) - G
    assert np.sqrt((d ** 2).mean()) <= tol["rms"] and np.abs(d).max() <= tol["max"]
    assert int((np.argmax(rows, -1) != G.argmax(-1)).sum()) <= tol["max_flips"]
