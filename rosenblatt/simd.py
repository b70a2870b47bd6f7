"""Integer-SIMD matmul kernels, written in LLVM IR and compiled at import with llvmlite.

numba widens every small integer to int64, so its loops over int8 quants run on 4 lanes;
llama.cpp's speed comes from 8/16-bit integer SIMD. These kernels are therefore written directly
as LLVM vector IR — llvmlite ships with numba, so this is still no C extension — and compiled
for the host CPU, then called through ctypes, which releases the GIL so the backend's threads
run them in parallel.

Scheme (llama.cpp's): the activations are quantized to int8, and a block's dot product is an
integer sum of int8 x 4/6/8-bit products, scaled once. Two activation formats, as in ggml:

* ``Q8_32`` for Q8_0/Q4_0/Q4_1 (ggml's Q8_0/Q8_1): a float scale per 32 values and
  ``scale * sum(q)`` per 32; each block's integer dot is scaled into a float vector accumulator.
* ``Q8_256`` for the K-quants (ggml's Q8_K): one float scale per 256 values and the integer sum
  of every 16 values. The products of a whole super-block, weighted by its 6/8-bit sub-block
  scales, are summed in 32-bit integer lanes; minimums and offsets come from the 16-sums.

Two primitives carry the arithmetic: ``maddubs`` (unsigned x signed bytes, adjacent pairs summed
to int16) and ``madd`` (int16 x int16, adjacent pairs summed to int32). With AVX2 they are the
``vpmaddubsw``/``vpmaddwd`` instructions; elsewhere (the A76) they are written as plain
widen-multiply-add IR and left to LLVM. Value ranges never reach int16 saturation
(2 x 63 x 127 < 32767), so both forms compute the same integers — the tests compile both.

Each kernel computes ``out[m, r] = dot(row r, x[m])`` for rows ``[r0, r1)`` and ``m_rows``
activation rows; the weight row is read once per ``m`` loop, so it stays in L1 for prefill.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from numba import njit, prange

from .quants import Q4_0, Q4_1, Q4_K, Q6_K, Q8_0

Q8_32, Q8_256 = 32, 256

_HEADER = """
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)
declare <8 x float> @llvm.fmuladd.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)
"""

# The loop skeleton every kernel shares: rows r0..r1, activation rows 0..m_rows, blocks 0..nblk.
# The body of block %b reads the weight row %row and the activations %xq (i8*), %xa (float*),
# %xb (i8*), and updates the accumulators %accv (<8 x float>) and %accs (float);
# the result is sum(accv) + {cs} * accs. Strides are in bytes.
_SKELETON = """
define void @mm_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nblk, i64 %m_rows,
                       i8* %xq0, i8* %xa0, i8* %xb0, i64 %sq, i64 %sa, i64 %sb, float* %out0, i64 %so) {{
entry:
  %empty_r = icmp sge i64 %r0, %r1
  %empty_m = icmp sle i64 %m_rows, 0
  %empty = or i1 %empty_r, %empty_m
  br i1 %empty, label %exit, label %rowloop
rowloop:
  %r = phi i64 [%r0, %entry], [%rnext, %rowend]
  %roff = mul i64 %r, %row_bytes
  %row = getelementptr i8, i8* %w, i64 %roff
  br label %mloop
mloop:
  %m = phi i64 [0, %rowloop], [%mnext, %mend]
  %oq = mul i64 %m, %sq
  %xq = getelementptr i8, i8* %xq0, i64 %oq
  %oa = mul i64 %m, %sa
  %xa8 = getelementptr i8, i8* %xa0, i64 %oa
  %xa = bitcast i8* %xa8 to float*
  %ob = mul i64 %m, %sb
  %xb = getelementptr i8, i8* %xb0, i64 %ob
  br label %bloop
bloop:
  %b = phi i64 [0, %mloop], [%bnext, %bloop]
  %accv = phi <8 x float> [zeroinitializer, %mloop], [{accv1}, %bloop]
  %accs = phi float [0.0, %mloop], [{accs1}, %bloop]
{body}
  %bnext = add i64 %b, 1
  %bdone = icmp eq i64 %bnext, %nblk
  br i1 %bdone, label %mend, label %bloop
mend:
  %vsum = call reassoc float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> {accv1})
  %ssum = fmul float {accs1}, {cs}
  %total = fadd float %vsum, %ssum
  %oo = mul i64 %m, %so
  %orow = getelementptr float, float* %out0, i64 %oo
  %op = getelementptr float, float* %orow, i64 %r
  store float %total, float* %op
  %mnext = add i64 %m, 1
  %mdone = icmp eq i64 %mnext, %m_rows
  br i1 %mdone, label %rowend, label %mloop
rowend:
  %rnext = add i64 %r, 1
  %rdone = icmp eq i64 %rnext, %r1
  br i1 %rdone, label %exit, label %rowloop
exit:
  ret void
}}
"""


def _vec(ty: str, values) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


def _mask(indices) -> str:
    indices = list(indices)
    return f"<{len(indices)} x i32> " + _vec("i32", indices)


class _IR:
    """A tiny emitter of SSA lines with fresh names; ``x86`` selects the AVX2 intrinsics."""

    def __init__(self, x86: bool):
        self.lines: list[str] = []
        self.n = 0
        self.x86 = x86

    def __call__(self, expr: str) -> str:
        self.n += 1
        name = f"%t{self.n}"
        self.lines.append(f"  {name} = {expr}")
        return name

    def ptr(self, base: str, offset, ty: str) -> str:
        p = self(f"getelementptr i8, i8* {base}, i64 {offset}")
        return self(f"bitcast i8* {p} to {ty}*")

    def load(self, base: str, offset, ty: str) -> str:
        return self(f"load {ty}, {ty}* {self.ptr(base, offset, ty)}, align 1")

    def half(self, base: str, offset) -> str:
        return self(f"fpext half {self.load(base, offset, 'half')} to float")

    def byte_i32(self, base: str, offset, signed=False) -> str:
        return self(f"{'sext' if signed else 'zext'} i8 {self.load(base, offset, 'i8')} to i32")

    def f32_at(self, arr: str, index: str) -> str:
        p = self(f"getelementptr float, float* {arr}, i64 {index}")
        return self(f"load float, float* {p}")

    def splat(self, ty: str, n: int, scalar: str) -> str:
        v = self(f"insertelement <{n} x {ty}> undef, {ty} {scalar}, i32 0")
        return self(f"shufflevector <{n} x {ty}> {v}, <{n} x {ty}> undef, <{n} x i32> zeroinitializer")

    def bytes_(self, value: int, n: int = 32) -> str:
        return _vec("i8", [value] * n)

    def _pairs(self, ty: str, n: int, prod: str) -> str:
        """adjacent pairs of an <n x ty> vector summed: <n/2 x ty>"""
        ev = self(f"shufflevector <{n} x {ty}> {prod}, <{n} x {ty}> undef, {_mask(range(0, n, 2))}")
        od = self(f"shufflevector <{n} x {ty}> {prod}, <{n} x {ty}> undef, {_mask(range(1, n, 2))}")
        return self(f"add <{n // 2} x {ty}> {ev}, {od}")

    def maddubs(self, u: str, s: str) -> str:
        """<32 x i8> unsigned u, signed s -> <16 x i16> sums of adjacent products"""
        if self.x86:
            return self(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> {u}, <32 x i8> {s})")
        a = self(f"zext <32 x i8> {u} to <32 x i16>")
        b = self(f"sext <32 x i8> {s} to <32 x i16>")
        return self._pairs("i16", 32, self(f"mul <32 x i16> {a}, {b}"))

    def maddss(self, a: str, s: str) -> str:
        """<32 x i8> signed a, signed s -> <16 x i16> (AVX2: the sign trick, |a| x sign(s, a))"""
        if self.x86:
            absa = self(f"call <32 x i8> @llvm.abs.v32i8(<32 x i8> {a}, i1 false)")
            sgn = self(f"call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> {s}, <32 x i8> {a})")
            return self.maddubs(absa, sgn)
        a16 = self(f"sext <32 x i8> {a} to <32 x i16>")
        b16 = self(f"sext <32 x i8> {s} to <32 x i16>")
        return self._pairs("i16", 32, self(f"mul <32 x i16> {a16}, {b16}"))

    def madd(self, a: str, b: str) -> str:
        """<16 x i16> x <16 x i16> -> <8 x i32> sums of adjacent products"""
        if self.x86:
            return self(f"call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {a}, <16 x i16> {b})")
        a32 = self(f"sext <16 x i16> {a} to <16 x i32>")
        b32 = self(f"sext <16 x i16> {b} to <16 x i32>")
        return self._pairs("i32", 16, self(f"mul <16 x i32> {a32}, {b32}"))

    def lshr_bytes(self, v: str, n: int) -> str:
        return self(f"lshr <32 x i8> {v}, {self.bytes_(n)}")

    def and_bytes(self, v: str, n: int) -> str:
        return self(f"and <32 x i8> {v}, {self.bytes_(n)}")

    def fma_acc(self, ivec: str, scale: str, acc: str) -> str:
        """acc + float(ivec) * scale  (<8 x i32>, scalar float, <8 x float>)"""
        f = self(f"sitofp <8 x i32> {ivec} to <8 x float>")
        return self(f"call <8 x float> @llvm.fmuladd.v8f32(<8 x float> {f}, <8 x float> {self.splat('float', 8, scale)}, "
                    f"<8 x float> {acc})")

    def finish(self, accv: str, accs: str) -> tuple[str, str, str]:
        return "\n".join(self.lines), accv, accs


_ONES16 = _vec("i16", [1] * 16)


def _body_q32(kind: str, x86: bool) -> str:
    """Q8_0 / Q4_0 / Q4_1 against Q8_32 activations: float accumulation per 32-value block."""
    e = _IR(x86)
    bsize = {"q8_0": 34, "q4_0": 18, "q4_1": 20}[kind]
    boff = e(f"mul i64 %b, {bsize}")
    d = e.half("%row", boff)
    x = e.load("%xq", e("mul i64 %b, 32"), "<32 x i8>")
    if kind == "q8_0":
        q = e.load("%row", e(f"add i64 {boff}, 2"), "<32 x i8>")
        p16 = e.maddss(q, x)
    else:
        q = e.load("%row", e(f"add i64 {boff}, {4 if kind == 'q4_1' else 2}"), "<16 x i8>")
        lo = e(f"and <16 x i8> {q}, {e.bytes_(15, 16)}")
        hi = e(f"lshr <16 x i8> {q}, {e.bytes_(4, 16)}")
        q32 = e(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, {_mask(range(32))}")
        p16 = e.maddubs(q32, x)
    p32 = e.madd(p16, _ONES16)
    dx = e.f32_at("%xa", "%b")
    accv = e.fma_acc(p32, e(f"fmul float {d}, {dx}"), "%accv")
    xbf = e(f"bitcast i8* %xb to float*")
    xs = e.f32_at(xbf, "%b")                              # scale * sum(q) of the block
    if kind == "q8_0":
        accs = "%accs"
    else:                                                 # Q4_0: -8 * d * sum(x); Q4_1: m * sum(x)
        f = e.half("%row", e(f"add i64 {boff}, 2")) if kind == "q4_1" else d
        accs = e(f"call float @llvm.fmuladd.f32(float {f}, float {xs}, float %accs)")
    return e.finish(accv, accs)


def _body_q4_k(x86: bool) -> str:
    """Q4_K against Q8_256: sum_j sc_j * dot_j in int32 lanes; mins from the 16-sums."""
    e = _IR(x86)
    boff = e("mul i64 %b, 144")
    d = e.half("%row", boff)
    dmin = e.half("%row", e(f"add i64 {boff}, 2"))
    sc = [e.byte_i32("%row", e(f"add i64 {boff}, {4 + i}")) for i in range(12)]

    def scale_min(j):
        if j < 4:
            return e(f"and i32 {sc[j]}, 63"), e(f"and i32 {sc[j + 4]}, 63")
        s_lo = e(f"and i32 {sc[j + 4]}, 15")
        s_hi = e(f"and i32 {e(f'lshr i32 {sc[j - 4]}, 2')}, 48")
        m_lo = e(f"lshr i32 {sc[j + 4]}, 4")
        m_hi = e(f"and i32 {e(f'lshr i32 {sc[j]}, 2')}, 48")
        s = e(f"or i32 {s_lo}, {s_hi}")
        m = e(f"or i32 {m_lo}, {m_hi}")
        return s, m

    xbase = e("mul i64 %b, 256")
    sumi = "zeroinitializer"
    mins = []
    for c in range(4):
        q = e.load("%row", e(f"add i64 {boff}, {16 + 32 * c}"), "<32 x i8>")
        for j, part in ((2 * c, e.and_bytes(q, 15)), (2 * c + 1, e.lshr_bytes(q, 4))):
            s, m = scale_min(j)
            mins.append(m)
            x = e.load("%xq", e(f"add i64 {xbase}, {32 * j}"), "<32 x i8>")
            p16 = e.maddubs(part, x)
            sv = e.splat("i16", 16, e(f"trunc i32 {s} to i16"))
            sumi = e(f"add <8 x i32> {sumi}, {e.madd(p16, sv)}")
    mv = "undef"
    for j, m in enumerate(mins):
        mv = e(f"insertelement <8 x i16> {mv}, i16 {e(f'trunc i32 {m} to i16')}, i32 {j}")
    mv16 = e(f"shufflevector <8 x i16> {mv}, <8 x i16> undef, {_mask(i // 2 for i in range(16))}")
    bs = e.load("%xb", e("mul i64 %b, 32"), "<16 x i16>")
    summ = e(f"call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> {e.madd(bs, mv16)})")
    dx = e.f32_at("%xa", "%b")
    accv = e.fma_acc(sumi, e(f"fmul float {d}, {dx}"), "%accv")
    mterm = e(f"fmul float {e(f'fmul float {dmin}, {dx}')}, {e(f'sitofp i32 {summ} to float')}")
    return e.finish(accv, e(f"fadd float %accs, {mterm}"))


def _body_q6_k(x86: bool) -> str:
    """Q6_K against Q8_256: unsigned 6-bit quants, sum_i sc_i * dot_i in int32; -32 from the 16-sums."""
    e = _IR(x86)
    boff = e("mul i64 %b, 210")
    d = e.half("%row", e(f"add i64 {boff}, 208"))
    scv = e(f"sext <16 x i8> {e.load('%row', e(f'add i64 {boff}, 192'), '<16 x i8>')} to <16 x i16>")
    xbase = e("mul i64 %b, 256")
    sumi = "zeroinitializer"
    for h in range(2):
        a = e.load("%row", e(f"add i64 {boff}, {64 * h}"), "<32 x i8>")
        c = e.load("%row", e(f"add i64 {boff}, {64 * h + 32}"), "<32 x i8>")
        hb = e.load("%row", e(f"add i64 {boff}, {128 + 32 * h}"), "<32 x i8>")
        for k, (src, shift_lo, hshift) in enumerate(((a, 0, 0), (c, 0, 2), (a, 4, 4), (c, 4, 6))):
            low = e.lshr_bytes(src, 4) if shift_lo else e.and_bytes(src, 15)
            hs = e.lshr_bytes(hb, hshift) if hshift else hb
            q = e(f"or <32 x i8> {low}, {e(f'shl <32 x i8> {e.and_bytes(hs, 3)}, {e.bytes_(4)}')}")
            x = e.load("%xq", e(f"add i64 {xbase}, {128 * h + 32 * k}"), "<32 x i8>")
            j = 8 * h + 2 * k
            sv = e(f"shufflevector <16 x i16> {scv}, <16 x i16> undef, {_mask([j] * 8 + [j + 1] * 8)}")
            sumi = e(f"add <8 x i32> {sumi}, {e.madd(e.maddubs(q, x), sv)}")
    bs = e.load("%xb", e("mul i64 %b, 32"), "<16 x i16>")
    corr = e(f"call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> {e.madd(bs, scv)})")
    t = e(f"fmul float {d}, {e.f32_at('%xa', '%b')}")
    accv = e.fma_acc(sumi, t, "%accv")
    return e.finish(accv, e(f"call float @llvm.fmuladd.f32(float {t}, float {e(f'sitofp i32 {corr} to float')}, float %accs)"))


#: ggml type -> (kernel name, activation format, IR body, factor of the scalar accumulator)
_KERNELS = {
    Q8_0: ("q8_0", Q8_32, lambda x86: _body_q32("q8_0", x86), "0.0"),
    Q4_0: ("q4_0", Q8_32, lambda x86: _body_q32("q4_0", x86), "-8.0"),
    Q4_1: ("q4_1", Q8_32, lambda x86: _body_q32("q4_1", x86), "1.0"),
    Q4_K: ("q4_k", Q8_256, _body_q4_k, "-1.0"),
    Q6_K: ("q6_k", Q8_256, _body_q6_k, "-32.0"),
}
SIMD_TYPES = frozenset(_KERNELS)
#: ggml type -> activation format its kernel reads
ACT_FORMAT = {qt: fmt for qt, (_, fmt, _, _) in _KERNELS.items()}

_FN = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3
                               + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]))
_lock = threading.Lock()
_compiled: dict[bool | None, dict] = {}
_engines = []      # keep the JITs (and so the code) alive


def _host_has_avx2() -> bool:
    import llvmlite.binding as llvm
    return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")


def module_ir(x86: bool) -> str:
    return (_HEADER + "declare float @llvm.fmuladd.f32(float, float, float)\n"
            + "".join(_kernel_ir(n, cs, body(x86)) for n, _, body, cs in _KERNELS.values()))


def _kernel_ir(name: str, cs: str, body: tuple[str, str, str]) -> str:
    lines, accv1, accs1 = body
    return _SKELETON.format(name=name, cs=cs, body=lines, accv1=accv1, accs1=accs1)


def kernels(x86: bool | None = None) -> dict:
    """ggml type -> ctypes function, compiled on first use; {} if LLVM cannot build them here.

    ``x86`` None: AVX2 intrinsics when the host has AVX2, the portable IR otherwise;
    True/False forces one (tests compile both)."""
    with _lock:
        if x86 in _compiled:
            return _compiled[x86]
        try:
            import llvmlite.binding as llvm
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            use_x86 = _host_has_avx2() if x86 is None else x86
            mod = llvm.parse_assembly(module_ir(use_x86))
            mod.verify()
            target = llvm.Target.from_default_triple()
            tm = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                              features=llvm.get_host_cpu_features().flatten(), opt=3)
            engine = llvm.create_mcjit_compiler(mod, tm)
            engine.finalize_object()
            _engines.append(engine)
            fns = {qt: _FN(engine.get_function_address(f"mm_{n}")) for qt, (n, _, _, _) in _KERNELS.items()}
        except Exception:   # no usable LLVM target: the numba float kernels remain
            fns = {}
        _compiled[x86] = fns
        return fns


@njit(cache=True)
def _round_half_away(v):
    r = np.floor(abs(v) + np.float32(0.5))
    return np.int8(r if v >= 0 else -r)


@njit(cache=True)
def _quantize_32(x, q, d, s):
    m_rows, k = x.shape
    for m in range(m_rows):
        for b in range(k // 32):
            amax = np.float32(0.0)
            for i in range(32):
                amax = max(amax, abs(x[m, 32 * b + i]))
            db = amax / np.float32(127.0)
            inv = np.float32(1.0) / db if db > 0 else np.float32(0.0)
            total = 0
            for i in range(32):
                qi = _round_half_away(x[m, 32 * b + i] * inv)
                q[m, 32 * b + i] = qi
                total += qi
            d[m, b] = db
            s[m, b] = db * np.float32(total)


@njit(cache=True)
def _quantize_256(x, q, d, s):
    m_rows, k = x.shape
    for m in range(m_rows):
        for b in range(k // 256):
            amax = np.float32(0.0)
            for i in range(256):
                amax = max(amax, abs(x[m, 256 * b + i]))
            db = amax / np.float32(127.0)
            inv = np.float32(1.0) / db if db > 0 else np.float32(0.0)
            for g in range(16):
                total = 0
                for i in range(16 * g, 16 * g + 16):
                    qi = _round_half_away(x[m, 256 * b + i] * inv)
                    q[m, 256 * b + i] = qi
                    total += qi
                s[m, 16 * b + g] = total
            d[m, b] = db


def quantize_activations(x: np.ndarray, fmt: int = Q8_32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize float32 activations [M, K] for the kernels.

    Per ``fmt`` values (32 or 256): int8 q = round(x / d) with d = max|x| / 127 (round half away
    from zero, as llama.cpp's roundf). Returns (q int8 [M, K], d float32 [M, K/fmt], sums) with
    sums = d * sum(q) per 32 (float32 [M, K/32]) for Q8_32, and sum(q) per 16 (int16 [M, K/16])
    for Q8_256."""
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    if fmt == Q8_32:
        d = np.empty((m, k // 32), dtype=np.float32)
        s = np.empty((m, k // 32), dtype=np.float32)
        _quantize_32(x, q, d, s)
    else:
        d = np.empty((m, k // 256), dtype=np.float32)
        s = np.empty((m, k // 16), dtype=np.int16)
        _quantize_256(x, q, d, s)
    return q, d, s


@njit(parallel=True, nogil=True, cache=True)
def _matmul_parallel(fn, w, row_bytes, r0, r1, nblk, m_rows, xq, xa, xb, sq, sa, sb, out, so, parts):
    """The row range split in ``parts`` equal shares run on numba's threads (one region)."""
    n = r1 - r0
    for p in prange(parts):
        fn(w, row_bytes, r0 + n * p // parts, r0 + n * (p + 1) // parts, nblk, m_rows, xq, xa, xb, sq, sa, sb, out, so)


def matmul(qtype: int, rows: np.ndarray, acts: tuple[np.ndarray, np.ndarray, np.ndarray],
           out: np.ndarray, r0: int, r1: int, fns: dict | None = None, parts: int = 1) -> None:
    """out[m, r] = dot(rows[r], x[m]) for r in [r0, r1) and every activation row m of ``acts``
    (from :func:`quantize_activations` with the type's :data:`ACT_FORMAT`); ``out`` is float32
    [M, N] C-contiguous. ``parts`` > 1 splits the rows over numba's threads. Releases the GIL."""
    xq, xd, xs = acts
    fn = (fns or kernels())[qtype]
    block = 256 if ACT_FORMAT[qtype] == Q8_256 else 32
    args = (rows.ctypes.data, rows.strides[0], r0, r1, xq.shape[1] // block, xq.shape[0],
            xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, xq.strides[0], xd.strides[0], xs.strides[0],
            out.ctypes.data, out.strides[0] // 4)
    if parts > 1:
        _matmul_parallel(fn, *args, parts)
    else:
        fn(*args)
