"""Integer-SIMD decode kernels (LLVM IR via llvmlite) against a numpy emulation and llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from rosenblatt import Engine
from rosenblatt import cpu as simd
from rosenblatt.cpu import build

from support import MICRO_MODELS, a76_assembly, load_reference, micro_path
from support import random_blocks

SIMD = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


def test_kernels_compile_for_this_cpu():
    packed = {("packed", qt) for qt in simd.PACKED_BLOCK}
    host = set(simd.kernels())
    assert {k for k in host if not isinstance(k, tuple)} == {int(t) for t in SIMD}
    assert host - {int(t) for t in SIMD} <= packed
    if simd.host_isa() in simd.PACKED_ISAS:     # Q4_K always; Q8_0 with VNNI (this x86 has AVX-512 VNNI?)
        assert ("packed", int(T.Q4_K)) in host
    assert set(simd.kernels("portable")) == {int(t) for t in SIMD} | packed
    assert set(simd.kernels("sdot-emulated")) == {int(t) for t in SIMD}


def test_sdot_kernels_compile_for_the_a76():
    """The board's path lowers for AArch64 (cortex-a76, +dotprod) to sdot instructions; llvmlite's
    LLVM carries every target, so this runs on x86 too (the code itself cannot run here: its
    arithmetic is tested as "sdot-emulated")."""
    asm = a76_assembly(simd.module_ir("sdot"), features="+neon,+dotprod")
    for t in SIMD:
        for rows in (1, simd.ROWS):
            assert f"mm{rows}_{t.name.lower()}:" in asm
    body = asm.split("mm1_q4_k:")[1].split(".Lfunc_end")[0]
    # 256 products: 16 sdot (2 per 32); widening multiplies only for the mins (the portable IR: 68)
    assert body.count("sdot") >= 16 and body.count("smull") <= 8


@pytest.mark.parametrize("fmt", [simd.Q8_32, simd.Q8_256], ids=["q8_32", "q8_256"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_activation_gives_its_block_a_nan_scale(fmt, bad):
    """NaN or inf in a block: that block's scale is NaN (products stay non-finite instead of
    becoming finite noise); every other block is quantized exactly as without it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    clean = simd.quantize_activations(x, fmt)
    x[1, fmt + 5] = bad                              # block 1 of row 1
    a = simd.quantize_activations(x, fmt)
    assert np.isnan(a.d[1, 1])
    keep = np.ones(a.d.shape, bool)
    keep[1, 1] = False
    assert np.array_equal(a.d[keep], clean.d[keep])
    assert np.array_equal(a.q.reshape(2, -1, fmt)[keep], clean.q.reshape(2, -1, fmt)[keep])


def test_activation_quantization_is_llamacpps():
    """ggml's Q8_0 (per 32) and Q8_K (per 256) activation quantization as its SIMD paths do it,
    written out in float32 numpy: scale 127 / max|x| (Q8_K: -127 / the value of largest
    magnitude, so its d is negative), round half to even, Q8_K clamped at 127."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x[1, :256] = 0.0                                    # an all-zero block: d = 0, q = 0
    x[2, 3] = x[2, 7] = -np.abs(x[2, :256]).max() * 1.5  # a tie at the block maximum, negative
    x[3, :256] = np.arange(256) % 64 - 31.5     # max|x| 31.5 ...
    x[3, 0] = x[3, 32] = 127.0                   # ... but 127 in two blocks: scale 1, exact .5 ties
    # per 32
    a = simd.quantize_activations(x, simd.Q8_32)
    q, d, s = a.q, a.d, a.s
    xb = x.reshape(4, -1, 32)
    amax = np.abs(xb).max(-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    assert np.array_equal(q.reshape(xb.shape), np.rint(xb * inv[..., None]).astype(np.int8))
    assert q[3, 1:5].tolist() == [-30, -30, -28, -28]      # -30.5 -29.5 -28.5 -27.5: half to even
    assert np.array_equal(d, amax / np.float32(127)) and d[1, 0] == 0
    assert np.allclose(s, d * q.reshape(xb.shape).sum(-1), rtol=1e-6)
    # per 256
    a = simd.quantize_activations(x, simd.Q8_256)
    q, d, s = a.q, a.d, a.s
    xb = x.reshape(4, -1, 256)
    top = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)[..., 0]
    inv = np.divide(np.float32(-127), top, out=np.zeros_like(top), where=top != 0)
    ref = np.minimum(np.float32(127), np.rint(xb * inv[..., None])).astype(np.int8)
    assert np.array_equal(q.reshape(xb.shape), ref) and s.dtype == np.int16
    assert np.array_equal(d, np.divide(np.float32(1), inv, out=np.zeros_like(inv), where=inv != 0))
    assert d[1, 0] == 0 and (d < 0).any() and (d > 0).any()
    assert np.array_equal(s, q.reshape(4, -1, 16).sum(-1))


@pytest.mark.slow
def test_compiled_kernels_are_cached_and_a_damaged_cache_is_ignored(tmp_path, monkeypatch):
    """The second compile of a module reads its machine code back (no code generation), gives
    the same products, and a damaged file is recompiled and rewritten, never executed."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(7)
    n, k, m = 64, 512, 3
    data = random_blocks(rng, T.Q4_K, n * k // 256, small=True).reshape(n, -1)
    acts = simd.quantize_activations(rng.standard_normal((m, k)).astype(np.float32), simd.Q8_256)

    def product(fns):
        out = np.full((m, n), np.nan, np.float32)
        simd.matmul(int(T.Q4_K), data, acts, out, fns, 1)
        return out

    fresh, cache = build._compile("portable")
    assert not cache.hit and cache.path.startswith(str(tmp_path))
    stored = open(cache.path, "rb").read()
    again, cache2 = build._compile("portable")
    assert cache2.hit and cache2.path == cache.path
    expected = product(fresh)
    assert np.array_equal(product(again), expected) and np.isfinite(expected).all()
    with open(cache.path, "r+b") as f:      # one flipped byte in the machine code
        f.seek(len(stored) // 2)
        f.write(bytes([stored[len(stored) // 2] ^ 0xFF]))
    third, cache3 = build._compile("portable")
    assert not cache3.hit and open(cache.path, "rb").read() == stored
    assert np.array_equal(product(third), expected)
    # another ISA is another module, another file
    _, other = build._compile("sdot-emulated")
    assert not other.hit and other.path != cache.path


@pytest.mark.parametrize("isa", [None, "portable", "sdot-emulated"], ids=["host", "portable", "sdot"])
@pytest.mark.parametrize("qtype", SIMD, ids=lambda t: t.name)
def test_kernel_equals_numpy_emulation(qtype, isa):
    """dot(W, dequant(quant(x))) in float64 — the kernel computes exactly the scheme: one
    activation row, fewer than ROWS, ROWS at a time plus a rest, chunks of activation rows,
    one thread and numba's parallel split."""
    fns = simd.kernels(isa)
    rng = np.random.default_rng(int(qtype))
    n, k, m = 300, 1024, 2 * simd.ROWS + 1
    bs, ts = GGML_QUANT_SIZES[qtype]
    data = random_blocks(rng, qtype, n * k // bs, small=True)
    rows = data.reshape(n, k // bs * ts)
    x = rng.standard_normal((m, k)).astype(np.float32)
    fmt = simd.ACT_FORMAT[int(qtype)]
    acts = simd.quantize_activations(x, fmt)
    W = np.asarray(gguf_dequantize(data, qtype), np.float64).reshape(n, k)
    xq, xd = acts.q, acts.d
    xdeq = (xq.astype(np.float64).reshape(m, -1, fmt) * xd[..., None].astype(np.float64)).reshape(m, k)
    ref = xdeq @ W.T
    exact = x.astype(np.float64) @ W.T
    for rows_m, parts, chunk_bytes in ((1, 1, 1 << 18), (3, 2, 1 << 18), (m, 1, 1 << 18), (m, 2, k * simd.ROWS)):
        out = np.full((rows_m, n), np.nan, np.float32)
        simd.matmul(int(qtype), rows, acts[:rows_m], out, fns, parts, chunk_bytes)
        assert np.abs(out - ref[:rows_m]).max() <= 1e-5 * np.abs(ref).max()
        # and it is the float product up to the activation rounding (~0.5/127 per value)
        assert np.abs(out - exact[:rows_m]).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("k", [2048, 4608], ids=["short", "long"])
@pytest.mark.parametrize("qtype", SIMD, ids=lambda t: t.name)
def test_every_isa_gives_the_same_floats(qtype, k):
    """Not close: equal. The integer lanes, the fused multiply-adds and the order of the final
    sum are the same in every ISA's kernels, so a model's output does not depend on the machine
    (the A76 lane runs this with the real sdot instruction as the host's). Long inputs (from
    PREFETCH_MIN_INPUTS) take x86's prefetching 4-row kernels."""
    assert 2048 < simd.PREFETCH_MIN_INPUTS <= 4608
    rng = np.random.default_rng(100 + int(qtype))
    n, m = 96, simd.ROWS + 3
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows = random_blocks(rng, qtype, n * k // bs, small=True).reshape(n, k // bs * ts)
    acts = simd.quantize_activations(rng.standard_normal((m, k)).astype(np.float32) * 3, simd.ACT_FORMAT[int(qtype)])
    results = {}
    for isa in dict.fromkeys([simd.host_isa(), "portable", "sdot-emulated"]):
        out = np.empty((m, n), np.float32)
        simd.matmul(int(qtype), rows, acts, out, simd.kernels(isa))
        results[isa] = out
    first, *others = results.values()
    assert np.isfinite(first).all()
    for isa, out in results.items():
        assert np.array_equal(out.view(np.int32), first.view(np.int32)), f"{isa} differs"


def test_group_of_matrices_equals_single_products():
    """q/k/v-style: three matrices of two types sharing one activation format, one call."""
    rng = np.random.default_rng(7)
    k = 512
    mats = []
    for qtype, n in ((T.Q4_K, 64), (T.Q6_K, 16), (T.Q4_K, 16)):
        bs, ts = GGML_QUANT_SIZES[qtype]
        mats.append((int(qtype), random_blocks(rng, qtype, n * k // bs, small=True).reshape(n, k // bs * ts)))
    for m in (1, simd.ROWS + 2):
        acts = simd.quantize_activations(rng.standard_normal((m, k)).astype(np.float32), simd.Q8_256)
        group = simd.KernelGroup([qt for qt, _ in mats], [r for _, r in mats])
        y = group(acts, parts=2)
        for (qt, r), (a, b) in zip(mats, group.columns):
            single = np.empty((m, r.shape[0]), np.float32)
            simd.matmul(qt, r, acts, single)
            assert np.array_equal(y[:, a:b], single)


@pytest.mark.parametrize("name", [n for n in MICRO_MODELS if n.split("-micro-")[1] in
                                  ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")])
def test_int8_decode_matches_llamacpp_generation_rows(name):
    """llama.cpp made gen_logits one decode call per token with int8 activations; so do we."""
    meta, L, G, tol = load_reference(name)
    e = Engine.load(micro_path(name), n_ctx=64)
    assert e.model.backend.kernels == "int8"
    e.eval(meta["prompt_ids"][:-1], logits="none")
    rows = [e.eval(meta["prompt_ids"][-1:])[0]]
    for tok in meta["greedy_ids"][:15]:
        rows.append(e.eval([tok])[0])                    # M = 1: the int8 kernels
    d = np.array(rows, np.float64) - G
    assert np.sqrt((d ** 2).mean()) <= tol["rms"] and np.abs(d).max() <= tol["max"]
    assert int((np.argmax(rows, -1) != G.argmax(-1)).sum()) <= tol["max_flips"]


PACKED_HOST = simd.host_isa() in simd.PACKED_ISAS


def _matrix(rng, qtype, n, k):
    bs, ts = GGML_QUANT_SIZES[qtype]
    return random_blocks(rng, qtype, n * k // bs, small=True).reshape(n, k // bs * ts)


def _q4_k_matrix(rng, n, k):
    return _matrix(rng, T.Q4_K, n, k)


PACKED = [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def test_pack_takes_whole_groups_of_eight_rows_of_its_types():
    rng = np.random.default_rng(11)
    assert simd.pack(int(T.Q4_K), _q4_k_matrix(rng, 12, 512)) is None            # 12 % 8
    assert simd.pack(int(T.Q5_K), _matrix(rng, T.Q5_K, 16, 512)) is None         # no packed kernel
    p = simd.pack(int(T.Q4_K), _q4_k_matrix(rng, 16, 512))
    assert p.n == 16 and p.data.shape == (2, 2 * simd.PACKED_BLOCK[int(T.Q4_K)])
    # shares of a split start on a group of 8 rows, the last ends at n
    assert [simd.cut(100, p, 3) for p in range(4)] == [0, 32, 64, 100]


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_pack_in_pieces_releases_each_piece_and_gives_the_same_bytes(qtype, monkeypatch):
    """A large matrix is packed piece by piece, each piece of the source handed to ``release``
    once packed (the backend drops its file pages): together the pieces cover every row once,
    and the packed bytes are those of packing it whole."""
    import importlib
    pack_module = importlib.import_module("rosenblatt.cpu.pack")
    rng = np.random.default_rng(13)
    rows = _matrix(rng, qtype, 104, 512)
    whole = simd.pack(int(qtype), rows).data.copy()
    monkeypatch.setattr(pack_module, "PACK_PIECE_BYTES", 3 * 8 * rows.shape[1])    # 3 groups of 8 rows a piece
    pieces = []
    p = pack_module.pack(int(qtype), rows, release=lambda a: pieces.append((a.ctypes.data, a.shape[0])))
    assert np.array_equal(p.data, whole)
    starts = [(addr - rows.ctypes.data) // rows.strides[0] for addr, _ in pieces]
    assert starts == [0, 24, 48, 72, 96] and [n for _, n in pieces] == [24, 24, 24, 24, 8]


@pytest.mark.parametrize("k", [1536, 4608], ids=["short", "long"])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", [None, "portable"], ids=["host", "portable"])
def test_packed_kernels_give_the_row_major_floats(isa, qtype, k):
    """Eight rows interleaved (the backend's layout on x86; the plain-IR form runs anywhere):
    the same floats as the portable row-major kernel, bit for bit: 1, 3, 4, 8, 13 activation
    rows (the 8- and 4-row passes and the rest), split over 1-3 threads, a row range that
    starts and ends inside a group of 8, and a packed matrix beside a row-major one in a group;
    short inputs and long ones (x86's prefetching 4-row kernels, from PREFETCH_MIN_INPUTS)."""
    isa = isa or (simd.host_isa() if PACKED_HOST and ("packed", int(qtype)) in simd.kernels() else "portable")
    rng = np.random.default_rng(12)
    n = 96
    qt, fmt = int(qtype), simd.ACT_FORMAT[int(qtype)]
    rows = _matrix(rng, qtype, n, k)
    packed = simd.pack(qt, rows)
    host, portable = simd.kernels(isa), simd.kernels("portable")
    for m in (1, 3, 4, 8, 13):
        acts = simd.quantize_activations(rng.standard_normal((m, k)).astype(np.float32) * 3, fmt)
        want = simd.KernelGroup([qt], [rows], portable)(acts)
        assert np.isfinite(want).all()
        for parts in (1, 2, 3):
            got = simd.KernelGroup([qt], [packed], host)(acts, parts)
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (m, parts)
    # rows [lo, hi) not on group boundaries: the kernel computes whole groups, stores only those
    acts = simd.quantize_activations(rng.standard_normal((5, k)).astype(np.float32), fmt)
    want = simd.KernelGroup([qt], [rows], portable)(acts)
    g = simd.KernelGroup([qt], [packed], host)
    out = np.full((5, n), np.nan, np.float32)
    for lo, hi in ((3, 13), (13, 14), (14, 40), (40, 95)):
        simd.rows_kernel(g.f1[0], g.fr[0], g.w[0], g.row_bytes[0], lo, hi, k // fmt, 5, acts.buf.ctypes.data,
                         acts.buf.strides[0], out.ctypes.data, n)
    assert np.array_equal(out[:, 3:95].view(np.int32), want[:, 3:95].view(np.int32))
    assert np.isnan(out[:, :3]).all() and np.isnan(out[:, 95:]).all()
    # beside a row-major matrix of the same activation format
    other = (T.Q5_K if qt == int(T.Q6_K) else T.Q6_K) if fmt == simd.Q8_256 else T.Q4_1
    extra = _matrix(rng, other, 40, k)
    mixed = simd.KernelGroup([int(other), qt], [extra, packed], host)(acts, 2)
    want = simd.KernelGroup([int(other), qt], [extra, rows], portable)(acts)
    assert np.array_equal(mixed.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus", "minus"])
def test_packed_q4_k_at_its_integer_bounds(sign):
    """The largest sums the packed Q4_K kernels form: every quant 15, every scale and min 63, every
    activation +-127 (a row's 16 products in an int32 lane of the VNNI form, +-30480, must stay
    below 2^15 for its vpmaddwd). The host's packed kernel gives the portable row-major floats."""
    k, n = 1536, 16
    blocks = np.zeros((n, k // 256, 144), np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    blocks[..., 4:] = 0xFF                      # scales and mins 63, quants 15
    rows = blocks.reshape(n, -1)
    isa = simd.host_isa() if PACKED_HOST else "portable"
    acts = simd.quantize_activations(np.full((8, k), sign, np.float32), simd.Q8_256)
    assert np.abs(acts.buf.reshape(8, -1, 320)[:, :, :256].view(np.int8)).min() == 127
    want = simd.KernelGroup([int(T.Q4_K)], [rows], simd.kernels("portable"))(acts)
    packed = simd.pack(int(T.Q4_K), rows)
    for m in (1, 4, 8):     # the one-row kernel, the 4-row one, the 8-row one (512-bit with AVX-512)
        got = simd.KernelGroup([int(T.Q4_K)], [packed], simd.kernels(isa))(acts[0:m])
        assert np.array_equal(got.view(np.int32), want[:m].view(np.int32)), m


def test_packed_q4_k_in_256_bit_registers_where_the_host_runs_512():
    """On a CPU with AVX-512 VNNI + BW packed Q4_K's 8-row kernel keeps both row halves of a group
    in one 512-bit register (what the host tests above run); a CPU with only AVX-VNNI runs the
    256-bit form. The host's packed Q4_K tests above, run again in a second process with
    ROSENBLATT_ZMM=0, check that form against the portable kernel too."""
    if not build.uses_zmm():
        pytest.skip("this CPU runs the 256-bit form only, which the host tests above already check")
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "packed_kernels_give_the_row_major_floats and host-Q4_K or packed_q4_k_at_its_integer_bounds"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, build.ZMM_ENV: "0"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "4 passed" in proc.stdout, proc.stdout[-3000:]     # short and long inputs, both signs


def test_the_512_bit_form_compiles_for_an_avx512_cpu_anywhere():
    """The 512-bit packed Q4_K kernel's IR verifies and lowers to zmm code for an AVX-512 VNNI
    target on any host (it runs only where the CPU has it; the tests above run it there)."""
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    mod = llvm.parse_assembly(simd.module_ir("avx2", True, True))
    mod.verify()
    tm = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(
        cpu="icelake-server", features="+avx512vnni,+avx512bw,+avx512vl", opt=3)
    asm = tm.emit_assembly(mod)
    def dots(fn):           # the function's vpdpbusd lines: (on zmm registers, on ymm)
        body = asm[asm.index(f"{fn}:"):asm.index(".Lfunc_end", asm.index(f"{fn}:"))]
        lines = [ln for ln in body.splitlines() if "vpdpbusd" in ln]
        return sum("zmm" in ln for ln in lines), sum("ymm" in ln for ln in lines)
    assert dots("px8_q4_k")[0] > 0 and dots("px8_q4_k")[1] == 0
    assert dots("px1_q4_k")[0] == 0 and dots("px1_q4_k")[1] > 0      # one row stays at 256 bits


def test_packed_rows_need_their_kernels():
    rng = np.random.default_rng(13)
    packed = simd.pack(int(T.Q4_K), _q4_k_matrix(rng, 8, 256))
    with pytest.raises(ValueError, match="packed"):
        simd.KernelGroup([int(T.Q4_K)], [packed], simd.kernels("sdot-emulated"))
