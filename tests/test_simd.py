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


def test_activation_quantization_is_llamacpps_q8_0_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, :32] = 0.0                                     # an all-zero block: d = 0, q = 0
    x[2, 3] = x[2, 7] = -np.abs(x[2, :32]).max() * 1.5  # a tie at the block maximum, negative
    q, d, s = simd.quantize_activations(x)
    xb = x.reshape(3, 8, 32).astype(np.float64)
    dd = np.abs(xb).max(-1) / 127
    v = np.divide(xb, dd[..., None], out=np.zeros_like(xb), where=dd[..., None] > 0)
    ref = np.where(v >= 0, np.floor(v + 0.5), -np.floor(-v + 0.5))     # roundf: half away from zero
    assert np.array_equal(q.reshape(3, 8, 32), ref.astype(np.int8))
    assert np.allclose(d, dd, rtol=1e-6) and (d[1, 0] == 0)
    assert np.allclose(s, d * q.reshape(3, 8, 32).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("qtype", SIMD, ids=lambda t: t.name)
def test_kernel_equals_numpy_emulation(qtype):
    """dot(W, dequant(quant(x))) in float64 — the kernel computes exactly the scheme."""
    rng = np.random.default_rng(int(qtype))
    n, k = 300, 1024
    bs, ts = GGML_QUANT_SIZES[qtype]
    data = random_blocks(rng, qtype, n * k // bs, small=True)
    rows = data.reshape(n, k // bs * ts)
    x = rng.standard_normal((1, k)).astype(np.float32)
    xq, xd, xs = simd.quantize_activations(x)
    out = np.full(n, np.nan, np.float32)
    simd.matvec(int(qtype), rows, xq[0], xd[0], xs[0], out, 0, 150)
    simd.matvec(int(qtype), rows, xq[0], xd[0], xs[0], out, 150, n)     # two row ranges, as the threads do
    W = np.asarray(gguf_dequantize(data, qtype), np.float64).reshape(n, k)
    xdeq = (xq.astype(np.float64).reshape(-1, 32) * xd[0][:, None].astype(np.float64)).reshape(k)
    ref = W @ xdeq
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    # and it is the float product up to the activation rounding (~0.5/127 per value)
    exact = W @ x[0].astype(np.float64)
    assert np.abs(out - exact).max() <= 0.02 * np.abs(exact).max()


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
