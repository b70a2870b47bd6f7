"""Integer-SIMD matmul kernels, written in LLVM IR and compiled with llvmlite on first use.

numba widens every small integer to int64, so its loops over int8 quants run on 4 lanes;
llama.cpp's speed comes from 8/16-bit integer SIMD. These kernels are therefore written directly
as LLVM vector IR — llvmlite ships with numba, so this is still no C extension — and compiled
for the host CPU (the machine code is cached beside numba's cache, as numba caches its own), then
called through numba (``KernelGroup``) or ctypes.

Scheme (llama.cpp's): the activations are quantized to int8, and a block's dot product is an
integer sum of int8 x 4/6/8-bit products, scaled once. Two activation formats, as in ggml:

* ``Q8_32`` for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 (ggml's Q8_0/Q8_1): a float scale per 32 values and
  ``scale * sum(q)`` per 32; each block's integer dot (one exact integer) is scaled into one
  float per row.
* ``Q8_256`` for the K-quants (ggml's Q8_K): one float scale per 256 values and the integer sum
  of every 16 values. The products of a whole super-block, weighted by its 6/8-bit sub-block
  scales, are summed in 32-bit integer lanes; minimums and offsets come from the 16-sums.

On x86 two AVX2 primitives carry the arithmetic: ``vpmaddubsw`` (unsigned x signed bytes,
adjacent pairs summed to int16) and ``vpmaddwd`` (int16 x int16, adjacent pairs summed to
int32); value ranges never reach int16 saturation (2 x 63 x 127 < 32767; Q8_0 weights run as
|w| x sign-adjusted x, 2 x 128 x 127). On AArch64 with the dot-product extension (the A76) it is
``sdot`` (4 byte products summed into each int32 lane). Elsewhere the same arithmetic is plain
widen-multiply-add IR left to LLVM. All forms compute the same integers in the same lanes
(lane j of a 32-product dot holds products 4j..4j+3), scale them with fused multiply-adds and
sum the lanes in one fixed order, so every ISA gives bit-identical floats and a model's output
does not depend on the machine: the tests compare the host's, the portable one and the sdot
structure with the dot product in plain IR bit for bit, and lower the sdot module for the A76
(the emulated A76 lane, scripts/arm-check, runs the real instruction).

Each kernel computes ``out[m, r] = dot(row r, x[m])`` for rows ``[r0, r1)`` and ``m_rows``
activation rows; the weight row is read once per ``m`` loop, so it stays in L1 for prefill.

Q4_K, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 also have packed kernels (x86; all but Q4_K where
VNNI's vpdpbusd exists; plain IR for the tests): the CPU backend repacks their matrices at load,
eight rows interleaved (:func:`pack`), which roughly doubles the products per instruction (see the
layouts' comments below). Packed and row-major kernels give the same floats: each row's block
(32-quant types) or super-block (Q4_K, Q6_K) is one exact integer in every layout and ISA, scaled
into one float (the 32-quant types keep their second accumulator, Q4_x/Q5_x's offsets, the same
way).
"""

from __future__ import annotations

import functools

from .isa import ISAS
from ..gguf.quants import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0

Q8_32, Q8_256 = 32, 256
#: bytes per activation block: the int8 quants, then the float32 scale, then the sums (float32
#: scale * sum(q) for Q8_32; int16 sum(q) per 16 for Q8_256), padded to a 64-byte multiple
ACT_BLOCK = {Q8_32: 64, Q8_256: 320}

_HEADER = """
declare float @llvm.fma.f32(float, float, float)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)
declare void @llvm.masked.store.v8f32.p0(<8 x float>, <8 x float>*, i32, <8 x i1>)
declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <8 x i32>, <8 x i32>)
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)
declare void @llvm.prefetch.p0(i8*, i32, i32, i32)
declare <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)
"""

# The loops inside a weight row (or a packed group of 8): activation rows 0..m_rows, {R} at a
# time, blocks 0..nblk; the two skeletons below differ only in how they walk the weight rows.
_M_LOOPS = """mloop:
  %m = phi i64 [0, %rowloop], [%mnext, %mend]
{pointers}
  br label %bloop
bloop:
  %b = phi i64 [0, %mloop], [%bnext, %bloop]
{phis}
{body}
  %bnext = add i64 %b, 1
  %bdone = icmp eq i64 %bnext, %nblk
  br i1 %bdone, label %mend, label %bloop
mend:
{stores}
  %mnext = add i64 %m, {R}
  %mdone = icmp sge i64 %mnext, %m_rows
  br i1 %mdone, label %rowend, label %mloop
"""

# The loop skeleton every kernel shares: rows r0..r1; activation rows 0..m_rows, {R} at a time
# (m_rows a multiple of {R}); blocks 0..nblk. For activation row i of the group, the body of block
# %b reads the weight row %row and the activation row %x{i} (i8*, blocks of ACT_BLOCK bytes, see
# quantize_activations), and updates the accumulators %accv{i} (<8 x float>) and %accs{i}
# (float); each result is sum(accv) + {cs} * accs. The weight block is unpacked once for the
# {R} rows. Strides in bytes.
_SKELETON = """
define void @mm{R}{tag}_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nblk, i64 %m_rows,
                       i8* %x_, i64 %sx, float* %out_, i64 %so) {{
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
""" + _M_LOOPS + """rowend:
  %rnext = add i64 %r, 1
  %rdone = icmp eq i64 %rnext, %r1
  br i1 %rdone, label %exit, label %rowloop
exit:
  ret void
}}
"""

_POINTERS = """  %m{i} = add i64 %m, {i}
  %ox{i} = mul i64 %m{i}, %sx
  %x{i} = getelementptr i8, i8* %x_, i64 %ox{i}"""

_PHIS = """  %accv{i} = phi <8 x float> [zeroinitializer, %mloop], [{accv1}, %bloop]
  %accs{i} = phi float [0.0, %mloop], [{accs1}, %bloop]"""

# The 8 float lanes are summed in one fixed order, the same on every target (a "reassoc"
# reduction is free to pick a target's own order, and x86 and AArch64 pick differently):
# lanes k + k+4, then (0+2) + (1+3).
_STORES = """  %vlo{i} = shufflevector <8 x float> {accv1}, <8 x float> undef, <4 x i32> <i32 0, i32 1, i32 2, i32 3>
  %vhi{i} = shufflevector <8 x float> {accv1}, <8 x float> undef, <4 x i32> <i32 4, i32 5, i32 6, i32 7>
  %v4{i} = fadd <4 x float> %vlo{i}, %vhi{i}
  %v2a{i} = shufflevector <4 x float> %v4{i}, <4 x float> undef, <2 x i32> <i32 0, i32 1>
  %v2b{i} = shufflevector <4 x float> %v4{i}, <4 x float> undef, <2 x i32> <i32 2, i32 3>
  %v2{i} = fadd <2 x float> %v2a{i}, %v2b{i}
  %v1a{i} = extractelement <2 x float> %v2{i}, i32 0
  %v1b{i} = extractelement <2 x float> %v2{i}, i32 1
  %vsum{i} = fadd float %v1a{i}, %v1b{i}
  %ssum{i} = fmul float {accs1}, {cs}
  %total{i} = fadd float %vsum{i}, %ssum{i}
  %oo{i} = mul i64 %m{i}, %so
  %orow{i} = getelementptr float, float* %out_, i64 %oo{i}
  %op{i} = getelementptr float, float* %orow{i}, i64 %r
  store float %total{i}, float* %op{i}"""


def _vec(ty: str, values) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# the 32-quant types' rows: a float accumulated once per block (the block's exact integer dot
# times d x d_x) and the second accumulator, stored as accv + {cs} * accs
_PHIS_Q32 = """  %accv{i} = phi float [0.0, %mloop], [{accv1}, %bloop]
  %accs{i} = phi float [0.0, %mloop], [{accs1}, %bloop]"""
_STORES_Q32 = """  %ssum{i} = fmul float {accs1}, {cs}
  %total{i} = fadd float {accv1}, %ssum{i}
  %oo{i} = mul i64 %m{i}, %so
  %orow{i} = getelementptr float, float* %out_, i64 %oo{i}
  %op{i} = getelementptr float, float* %orow{i}, i64 %r
  store float %total{i}, float* %op{i}"""

# the K-quants' rows: a float accumulated once per super-block (see _body_q45_k), stored as it is
_PHIS_SCALAR = """  %accs{i} = phi float [0.0, %mloop], [{accs1}, %bloop]"""
_STORES_SCALAR = """  %oo{i} = mul i64 %m{i}, %so
  %orow{i} = getelementptr float, float* %out_, i64 %oo{i}
  %op{i} = getelementptr float, float* %orow{i}, i64 %r
  store float {accs1}, float* %op{i}"""


def _mask(indices) -> str:
    indices = list(indices)
    return f"<{len(indices)} x i32> " + _vec("i32", indices)


#: instruction sets the kernels are written for: "avx2" (x86 intrinsics), "sdot" (AArch64 dot
#: product, the A76's), "portable" (plain IR, any LLVM target); "sdot-emulated" is the sdot
#: structure with the dot product in plain IR, so that tests run it on any CPU


class _IR:
    """A tiny emitter of SSA lines with fresh names, for one instruction set (:data:`ISAS`)."""

    def __init__(self, isa: str):
        self.lines: list[str] = []
        self.n = 0
        isa, *extra = isa.split("+")
        self.vnni = "vnni" in extra          # "avx2+vnni": vpdpbusd may be used (AVX-512 VNNI or AVX-VNNI)
        self.prefetching = "prefetch" in extra   # "+prefetch": the weight-streaming form (:meth:`prefetch`)
        self.zmm = "zmm" in extra and self.vnni   # "+zmm": 512-bit bodies where written (AVX-512 VNNI + BW)
        self.isa = isa
        self.x86 = isa == "avx2"
        self.sdot = isa in ("sdot", "sdot-emulated")

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

    def prefetch(self, base: str, offset, nbytes: int) -> None:
        """In the prefetching kernels only: ask for the ``nbytes`` weight bytes :data:`PREFETCH_AHEAD`
        past ``base`` + ``offset``, a line at a time (a hint: no fault, no effect on any result)."""
        if not self.prefetching:
            return
        for line in range(0, nbytes, 64):
            p = self(f"getelementptr i8, i8* {base}, i64 {self(f'add i64 {offset}, {PREFETCH_AHEAD + line}')}")
            self.lines.append(f"  call void @llvm.prefetch.p0(i8* {p}, i32 0, i32 3, i32 1)")

    def half(self, base: str, offset) -> str:
        return self(f"fpext half {self.load(base, offset, 'half')} to float")

    def act(self, i: int, fmt: int, field: str, offset: int = 0, ty: str = "<32 x i8>") -> str:
        """Field "q" (at ``offset``), "d" or "s" of activation block %b of row i (fmt Q8_32/Q8_256)."""
        blk = self(f"mul i64 %b, {ACT_BLOCK[fmt]}")
        at = {"q": offset, "d": fmt, "s": fmt + 4}[field]
        return self.load(f"%x{i}", self(f"add i64 {blk}, {at}"), {"d": "float", "s": ty}.get(field, ty))

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

    def _wide_pairs(self, a: str, a_ext: str, s: str) -> str:
        """Plain IR for <32 x i8> a (widened with ``a_ext``) x signed s, adjacent pairs summed: <16 x i16>"""
        a16 = self(f"{a_ext} <32 x i8> {a} to <32 x i16>")
        s16 = self(f"sext <32 x i8> {s} to <32 x i16>")
        return self._pairs("i16", 32, self(f"mul <32 x i16> {a16}, {s16}"))

    def maddubs(self, u: str, s: str) -> str:
        """<32 x i8> unsigned u, signed s -> <16 x i16> sums of adjacent products"""
        if self.x86:
            return self(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> {u}, <32 x i8> {s})")
        return self._wide_pairs(u, "zext", s)

    def signed_weights(self, a: str):
        """Prepare signed weight bytes for :meth:`maddss` / :meth:`dot32` (AVX2: |a| once for all rows)."""
        if self.x86:
            return a, self(f"call <32 x i8> @llvm.abs.v32i8(<32 x i8> {a}, i1 false)")
        return a, None

    def maddss(self, wa, s: str) -> str:
        """signed weights (from :meth:`signed_weights`) x <32 x i8> signed s -> <16 x i16>;
        AVX2: the sign trick, |a| x sign(s, a)"""
        a, absa = wa
        if self.x86:
            sgn = self(f"call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> {s}, <32 x i8> {a})")
            return self.maddubs(absa, sgn)
        return self._wide_pairs(a, "sext", s)

    def madd(self, a: str, b: str) -> str:
        """<16 x i16> x <16 x i16> -> <8 x i32> sums of adjacent products"""
        if self.x86:
            return self(f"call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {a}, <16 x i16> {b})")
        a32 = self(f"sext <16 x i16> {a} to <16 x i32>")
        b32 = self(f"sext <16 x i16> {b} to <16 x i32>")
        return self._pairs("i32", 16, self(f"mul <16 x i32> {a32}, {b32}"))

    def dot4(self, acc: str, a: str, b: str) -> str:
        """<4 x i32> acc + sums of 4 adjacent products of <16 x i8> a, b (signed): AArch64 sdot."""
        if self.isa == "sdot":
            return self(f"call <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32> {acc}, <16 x i8> {a}, <16 x i8> {b})")
        p = self(f"mul <16 x i32> {self(f'sext <16 x i8> {a} to <16 x i32>')}, {self(f'sext <16 x i8> {b} to <16 x i32>')}")
        quarters = [self(f"shufflevector <16 x i32> {p}, <16 x i32> undef, {_mask(range(k, 16, 4))}") for k in range(4)]
        total = acc
        for q in quarters:
            total = self(f"add <4 x i32> {total}, {q}")
        return total

    def udot4(self, u: str, s: str, acc: str = "zeroinitializer") -> str:
        """<8 x i32> ``acc`` + sums of 4 adjacent products of unsigned bytes ``u`` and signed
        bytes ``s`` (<32 x i8>), exact: vpdpbusd on x86 with VNNI, else plain IR"""
        if self.vnni:
            args = [self(f"bitcast <32 x i8> {v} to <8 x i32>") for v in (u, s)]
            return self(f"call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> {acc}, <8 x i32> {args[0]}, <8 x i32> {args[1]})")
        p = self(f"mul <32 x i32> {self(f'zext <32 x i8> {u} to <32 x i32>')}, {self(f'sext <32 x i8> {s} to <32 x i32>')}")
        total = acc
        for k in range(4):
            total = self(f"add <8 x i32> {total}, {self(f'shufflevector <32 x i32> {p}, <32 x i32> undef, {_mask(range(k, 32, 4))}')}")
        return total

    def _halves16(self, v: str) -> tuple[str, str]:
        lo = self(f"shufflevector <32 x i8> {v}, <32 x i8> undef, {_mask(range(16))}")
        hi = self(f"shufflevector <32 x i8> {v}, <32 x i8> undef, {_mask(range(16, 32))}")
        return lo, hi

    def _join8(self, lo: str, hi: str) -> str:
        """two <4 x i32> -> <8 x i32>. In :meth:`dot32` the sdot sums of bytes 0-15 in lanes 0-3
        and of bytes 16-31 in lanes 4-7: lane j holds products 4j..4j+3, as the x86 and portable
        kernels' lane j does, so every ISA hands the same integers to the same float lanes"""
        return self(f"shufflevector <4 x i32> {lo}, <4 x i32> {hi}, {_mask(range(8))}")

    def dot32(self, w, x: str, signed: bool = False) -> str:
        """Sum of the 32 products of weight bytes ``w`` (unsigned 0..127, or the result of
        :meth:`signed_weights` when ``signed``) and activation bytes ``x``, spread over the
        lanes of an <8 x i32>."""
        if self.sdot:
            wl, wh = self._halves16(w[0] if signed else w)
            xl, xh = self._halves16(x)
            return self._join8(self.dot4("zeroinitializer", wl, xl), self.dot4("zeroinitializer", wh, xh))
        p16 = self.maddss(w, x) if signed else self.maddubs(w, x)
        return self.madd(p16, _ONES16)

    def dot32s(self, w: str, x: str, scales: str, n_scales: int, j_lo: int, j_hi: int) -> str:
        """Like :meth:`dot32` (unsigned weights) with the first 16 products weighted by lane
        ``j_lo`` and the last 16 by lane ``j_hi`` of the <n_scales x i16> ``scales``."""
        if self.sdot:
            wl, wh = self._halves16(w)
            xl, xh = self._halves16(x)
            lanes = lambda j: self.splat("i32", 4, self(f"sext i16 {self(f'extractelement <{n_scales} x i16> {scales}, i32 {j}')} to i32"))
            # compact: lane k sums products 4k..4k+3 and 16+4k..16+4k+3, upper lanes zero (the
            # K-quant bodies fold the other ISAs' lanes the same way, see fma_acc_folded)
            if j_lo == j_hi:
                t = self.dot4(self.dot4("zeroinitializer", wl, xl), wh, xh)
                return self._join8(self(f"mul <4 x i32> {t}, {lanes(j_lo)}"), "zeroinitializer")
            tl = self(f"mul <4 x i32> {self.dot4('zeroinitializer', wl, xl)}, {lanes(j_lo)}")
            th = self(f"mul <4 x i32> {self.dot4('zeroinitializer', wh, xh)}, {lanes(j_hi)}")
            return self._join8(self(f"add <4 x i32> {tl}, {th}"), "zeroinitializer")
        sv = self(f"shufflevector <{n_scales} x i16> {scales}, <{n_scales} x i16> undef, {_mask([j_lo] * 8 + [j_hi] * 8)}")
        return self.madd(self.maddubs(w, x), sv)

    def lshr_bytes(self, v: str, n: int) -> str:
        return self(f"lshr <32 x i8> {v}, {self.bytes_(n)}")

    def and_bytes(self, v: str, n: int) -> str:
        return self(f"and <32 x i8> {v}, {self.bytes_(n)}")

    def fma_acc_folded(self, a: str, scale_a: str, b: str, scale_b: str, acc: str) -> str:
        """Q5_K's once-per-super-block step: lanes k and k+4 of the integer vectors
        ``a`` and ``b`` added (exact), which puts any ISA's lanes into the sdot kernels' compact
        form (:meth:`dot32s`); then float lanes 0-3 take ``a`` x ``scale_a`` and lanes 4-7 ``b``
        x ``scale_b`` (llama.cpp's row-major AVX2 dot keeps float lanes the same way). One
        cross-lane shuffle pair on x86, none on NEON."""
        lo = self(f"shufflevector <8 x i32> {a}, <8 x i32> {b}, {_mask([0, 1, 2, 3, 8, 9, 10, 11])}")
        hi = self(f"shufflevector <8 x i32> {a}, <8 x i32> {b}, {_mask([4, 5, 6, 7, 12, 13, 14, 15])}")
        scales = self(f"insertelement <8 x float> {self.splat('float', 8, scale_a)}, float {scale_b}, i32 4")
        scales = self(f"shufflevector <8 x float> {scales}, <8 x float> undef, {_mask([0] * 4 + [4] * 4)}")
        return self._fma(self(f"add <8 x i32> {lo}, {hi}"), scales, acc)

    def reduce(self, v: str) -> str:
        """the exact int32 sum of the lanes of an <8 x i32>"""
        return self(f"call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> {v})")

    def fma_int(self, total: str, scale: str, acc: str) -> str:
        """acc + float(total) * scale, fused: the K-quants' one step per super-block and row"""
        return self(f"call float @llvm.fma.f32(float {self(f'sitofp i32 {total} to float')}, float {scale}, float {acc})")

    def fma8(self, total: str, scale: str, acc: str) -> str:
        """:meth:`fma_int` for 8 rows at once: <8 x i32>, <8 x float>, <8 x float>"""
        return self._fma(total, scale, acc)

    def _fma(self, ivec: str, scales: str, acc: str) -> str:
        f = self(f"sitofp <8 x i32> {ivec} to <8 x float>")
        return self(f"call <8 x float> @llvm.fma.v8f32(<8 x float> {f}, <8 x float> {scales}, <8 x float> {acc})")

    def finish(self, accs: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
        """The body's lines and, per activation row, its updated (accv, accs)."""
        return "\n".join(self.lines), accs


_ONES16 = _vec("i16", [1] * 16)


def _body_q32(kind: str, isa: str, rows: int):
    """Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 against Q8_32 activations: float accumulation per block."""
    e = _IR(isa)
    bsize, qs_at, qh_at = {"q8_0": (34, 2, None), "q4_0": (18, 2, None), "q4_1": (20, 4, None),
                           "q5_0": (22, 6, 2), "q5_1": (24, 8, 4)}[kind]
    boff = e(f"mul i64 %b, {bsize}")
    d = e.half("%row", boff)
    if kind == "q8_0":
        wq = e.signed_weights(e.load("%row", e(f"add i64 {boff}, {qs_at}"), "<32 x i8>"))
        factor = None
    else:
        q = e.load("%row", e(f"add i64 {boff}, {qs_at}"), "<16 x i8>")
        lo = e(f"and <16 x i8> {q}, {e.bytes_(15, 16)}")
        hi = e(f"lshr <16 x i8> {q}, {e.bytes_(4, 16)}")
        wq = e(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, {_mask(range(32))}")
        if qh_at is not None:        # bit i of the 32-bit qh is the 5th bit of element i
            bits = e(f"bitcast i32 {e.load('%row', e(f'add i64 {boff}, {qh_at}'), 'i32')} to <32 x i1>")
            fifth = e(f"shl <32 x i8> {e(f'zext <32 x i1> {bits} to <32 x i8>')}, {e.bytes_(4)}")
            wq = e(f"or <32 x i8> {wq}, {fifth}")
        # Q4_0/Q5_0: -8/-16 * d * sum(x) (the skeleton's factor); Q4_1/Q5_1: m * sum(x)
        factor = e.half("%row", e(f"add i64 {boff}, 2")) if kind in ("q4_1", "q5_1") else d
    accs = []
    for i in range(rows):
        x = e.act(i, Q8_32, "q")
        p32 = e.dot32(wq, x, signed=kind == "q8_0")
        dx = e.act(i, Q8_32, "d")
        # the block's 32 products as one exact integer, scaled into one float a row
        isum = e(f"sitofp i32 {e(f'call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> {p32})')} to float")
        accv = e(f"call float @llvm.fma.f32(float {isum}, float {e(f'fmul float {d}, {dx}')}, float %accv{i})")
        if factor is None:
            accs.append((accv, f"%accs{i}"))
            continue
        xs = e.act(i, Q8_32, "s", ty="float")                     # scale * sum(q) of the block
        accs.append((accv, e(f"call float @llvm.fma.f32(float {factor}, float {xs}, float %accs{i})")))
    return e.finish(accs)


def _body_q45_k(isa: str, rows: int, five: bool):
    """Q4_K / Q5_K against Q8_256: sum_j sc_j * dot_j in int32 lanes, minus sum_j m_j * (16-sums).
    Q5_K adds qh[32] before the nibbles: bit j of qh[l] is the 5th bit of element l of sub-block j."""
    e = _IR(isa)
    boff = e(f"mul i64 %b, {176 if five else 144}")
    e.prefetch("%row", boff, 176 if five else 144)
    d = e.half("%row", boff)
    dmin = e.half("%row", e(f"add i64 {boff}, 2"))
    # the 12 scale bytes a|b|c (4 each) hold 6-bit scales and mins: j < 4: a_j & 63, b_j & 63;
    # j >= 4: (c & 15) | (a >> 6) << 4 and (c >> 4) | (b >> 6) << 4
    a, b_, c = (e.load("%row", e(f"add i64 {boff}, {4 + 4 * i}"), "<4 x i8>") for i in range(3))
    v4 = lambda n: _vec("i8", [n] * 4)
    hi2 = lambda v: e(f"shl <4 x i8> {e(f'lshr <4 x i8> {v}, {v4(6)}')}, {v4(4)}")
    sc_lo = e(f"and <4 x i8> {a}, {v4(63)}")
    sc_hi = e(f"or <4 x i8> {e(f'and <4 x i8> {c}, {v4(15)}')}, {hi2(a)}")
    mn_lo = e(f"and <4 x i8> {b_}, {v4(63)}")
    mn_hi = e(f"or <4 x i8> {e(f'lshr <4 x i8> {c}, {v4(4)}')}, {hi2(b_)}")
    sc8 = e(f"shufflevector <4 x i8> {sc_lo}, <4 x i8> {sc_hi}, {_mask(range(8))}")
    mn8 = e(f"shufflevector <4 x i8> {mn_lo}, <4 x i8> {mn_hi}, {_mask(range(8))}")
    sc16 = e(f"zext <8 x i8> {sc8} to <8 x i16>")
    mn16 = e(f"shufflevector <8 x i16> {e(f'zext <8 x i8> {mn8} to <8 x i16>')}, <8 x i16> undef, "
             f"{_mask(i // 2 for i in range(16))}")        # each min twice: it weighs two 16-sums
    sumi = ["zeroinitializer"] * rows
    qh = e.load("%row", e(f"add i64 {boff}, 16"), "<32 x i8>") if five else None
    for cc in range(4):
        q = e.load("%row", e(f"add i64 {boff}, {(48 if five else 16) + 32 * cc}"), "<32 x i8>")
        for j, part in ((2 * cc, e.and_bytes(q, 15)), (2 * cc + 1, e.lshr_bytes(q, 4))):
            if five:
                bit = e.and_bytes(e.lshr_bytes(qh, j) if j else qh, 1)
                part = e(f"or <32 x i8> {part}, {e(f'shl <32 x i8> {bit}, {e.bytes_(4)}')}")
            for i in range(rows):
                dot = e.dot32s(part, e.act(i, Q8_256, "q", 32 * j), sc16, 8, j, j)
                sumi[i] = e(f"add <8 x i32> {sumi[i]}, {dot}")
    accs = []
    for i in range(rows):
        mins = e.madd(e.act(i, Q8_256, "s", ty="<16 x i16>"), mn16)
        dx = e.act(i, Q8_256, "d")
        if five:        # float lanes, as llama.cpp's row-major dot
            accv = e.fma_acc_folded(sumi[i], e(f"fmul float {d}, {dx}"),
                                    mins, e(f"fneg float {e(f'fmul float {dmin}, {dx}')}"), f"%accv{i}")
            accs.append((accv, f"%accs{i}"))
            continue
        # Q4_K: one exact integer a row and super-block, as the packed kernels (and llama.cpp's
        # repacked ones) compute it: the same floats from either layout
        acc = e.fma_int(e.reduce(sumi[i]), e(f"fmul float {d}, {dx}"), f"%accs{i}")
        acc = e.fma_int(e.reduce(mins), e(f"fneg float {e(f'fmul float {dmin}, {dx}')}"), acc)
        accs.append((None, acc))
    return e.finish(accs)


def _body_q6_k(isa: str, rows: int):
    """Q6_K against Q8_256: unsigned 6-bit quants, sum_i sc_i * dot_i in int32; -32 from the 16-sums;
    one exact integer a row and super-block (|sum| < 2^29), scaled into one float."""
    e = _IR(isa)
    boff = e("mul i64 %b, 210")
    e.prefetch("%row", boff, 210)
    d = e.half("%row", e(f"add i64 {boff}, 208"))
    scv = e(f"sext <16 x i8> {e.load('%row', e(f'add i64 {boff}, 192'), '<16 x i8>')} to <16 x i16>")
    sumi = ["zeroinitializer"] * rows
    for h in range(2):
        a = e.load("%row", e(f"add i64 {boff}, {64 * h}"), "<32 x i8>")
        c = e.load("%row", e(f"add i64 {boff}, {64 * h + 32}"), "<32 x i8>")
        hb = e.load("%row", e(f"add i64 {boff}, {128 + 32 * h}"), "<32 x i8>")
        for k, (src, shift_lo, hshift) in enumerate(((a, 0, 0), (c, 0, 2), (a, 4, 4), (c, 4, 6))):
            low = e.lshr_bytes(src, 4) if shift_lo else e.and_bytes(src, 15)
            hs = e.lshr_bytes(hb, hshift) if hshift else hb
            q = e(f"or <32 x i8> {low}, {e(f'shl <32 x i8> {e.and_bytes(hs, 3)}, {e.bytes_(4)}')}")
            j = 8 * h + 2 * k
            for i in range(rows):
                dot = e.dot32s(q, e.act(i, Q8_256, "q", 128 * h + 32 * k), scv, 16, j, j + 1)
                sumi[i] = e(f"add <8 x i32> {sumi[i]}, {dot}")
    accs = []
    for i in range(rows):       # the quants are stored + 32: subtract 32 * sum_i sc_i * (16-sum i)
        corr = e.madd(e.act(i, Q8_256, "s", ty="<16 x i16>"), scv)
        corr32 = e(f"shl <8 x i32> {corr}, {_vec('i32', [5] * 8)}")
        total = e.reduce(e(f"sub <8 x i32> {sumi[i]}, {corr32}"))
        # one exact integer a row and super-block, as the packed kernel computes it
        accs.append((None, e.fma_int(total, e(f"fmul float {d}, {e.act(i, Q8_256, 'd')}"), f"%accs{i}")))
    return e.finish(accs)


# Weights repacked at load (x86): eight rows interleaved, so that one 256-bit register holds
# 8 quants of each of 4 rows and the products' lanes are rows. The four 8-quant slices of a
# 32-quant sub-block then share each lane's scale, so their pair sums add in int16 (4 x 2 x 15 x
# 127 < 32767) before one vpmaddwd applies the scales: 5 multiplying instructions per 128
# products instead of 8 (llama.cpp's repacked layout does the same). The integers of a row and
# super-block are the same as the row-major kernels' (exact sums); so are the floats.
#
# Q4_K, per group of 8 rows and super-block, PACKED_BLOCK bytes: d[8], dmin[8] (f16), the 6-bit
# scales [sub-block j][row] and mins [j][row] as bytes, then the quants as 32-byte slices
# [32-byte chunk cc][8-byte slice c][row half h]: rows 4h..4h+3, bytes 8c..8c+7 of chunk cc
# (low nibbles: sub-block 2cc, high: 2cc + 1).
#
# Q8_0, per group and block: the slices [c][h] (rows 4h..4h+3, quants 8c..8c+7, each + 128 as an
# unsigned byte), then d[8]. Q4_0 / Q4_1: the same slices as 4-bit quants, slice c in the low
# nibbles of register (c % 2, h) and slice c + 2 in its high nibbles (128 bytes), then d[8] and,
# Q4_1, m[8] (f16): the row-major blocks' bytes, rearranged. Q5_0 / Q5_1: Q4_0 / Q4_1's 128 bytes
# of nibbles, then the fifth bits (32 bytes: per slice s and row half h, 4 bytes at (s * 2 + h) * 4,
# byte r % 4 bit t for quant 8s + t of row 4h + r % 4: the bits of the register's bytes in order),
# then d[8] (and m[8]).
#
# Q6_K, per group of 8 rows and super-block (x86 with VNNI), rows in the int32 lanes: for each
# 16-quant sub-block j, four 32-byte registers R_c (byte 4r + t: quant 16j + 4c + t of row r) in
# 96 bytes at j * 96: P = R_0 | (bits 0-1 of R_3) << 6, Q = R_1 | (bits 2-3) << 6, H = R_2 | (bits
# 4-5) << 6 (so R_0..R_2 are one AND away, R_3 three shifts and an OR); then the scales
# [j][row] (int8) and d[8] (f16).
PACKED_BLOCK = {Q4_K: 1184, Q8_0: 272, Q4_0: 144, Q4_1: 160, Q5_0: 176, Q5_1: 192, Q6_K: 1680}
#: ISAs whose matrices the CPU backend packs (elsewhere it keeps the row-major blocks; the A76's
#: sdot kernels have no packed form yet)
PACKED_ISAS = ("avx2",)
#: ISAs whose module has the packed kernels: those, and the plain-IR ones (tests, any CPU)
_PACKED_MODULES = PACKED_ISAS + ("portable",)

_PACKED_SKELETON = """
define void @px{R}{tag}_{name}(i8* %w, i64 %gbytes, i64 %r0, i64 %r1, i64 %nblk, i64 %m_rows,
                       i8* %x_, i64 %sx, float* %out_, i64 %so) {{
entry:
  %empty_r = icmp sge i64 %r0, %r1
  %empty_m = icmp sle i64 %m_rows, 0
  %empty = or i1 %empty_r, %empty_m
  %g0 = lshr i64 %r0, 3
  %r1up = add i64 %r1, 7
  %g1 = lshr i64 %r1up, 3
  %r0v = insertelement <8 x i64> undef, i64 %r0, i32 0
  %r0s = shufflevector <8 x i64> %r0v, <8 x i64> undef, <8 x i32> zeroinitializer
  %r1v = insertelement <8 x i64> undef, i64 %r1, i32 0
  %r1s = shufflevector <8 x i64> %r1v, <8 x i64> undef, <8 x i32> zeroinitializer
  br i1 %empty, label %exit, label %rowloop
rowloop:
  %g = phi i64 [%g0, %entry], [%gnext, %rowend]
  %goff = mul i64 %g, %gbytes
  %row = getelementptr i8, i8* %w, i64 %goff
  %r = mul i64 %g, 8
  %rv = insertelement <8 x i64> undef, i64 %r, i32 0
  %rs = shufflevector <8 x i64> %rv, <8 x i64> undef, <8 x i32> zeroinitializer
  %idx = add <8 x i64> %rs, <i64 0, i64 1, i64 2, i64 3, i64 4, i64 5, i64 6, i64 7>
  %inlo = icmp sge <8 x i64> %idx, %r0s
  %inhi = icmp slt <8 x i64> %idx, %r1s
  %inside = and <8 x i1> %inlo, %inhi
  br label %mloop
""" + _M_LOOPS + """rowend:
  %gnext = add i64 %g, 1
  %gdone = icmp eq i64 %gnext, %g1
  br i1 %gdone, label %exit, label %rowloop
exit:
  ret void
}}
"""

_PACKED_PHIS = """  %acc{i} = phi <8 x float> [zeroinitializer, %mloop], [{a}, %bloop]"""
# the 8 rows' results go to out[m, 8g .. 8g + 7], the lanes of rows outside [r0, r1) masked off
_PACKED_STORES = """  %oo{i} = mul i64 %m{i}, %so
  %orow{i} = getelementptr float, float* %out_, i64 %oo{i}
  %op{i} = getelementptr float, float* %orow{i}, i64 %r
  %opv{i} = bitcast float* %op{i} to <8 x float>*
  call void @llvm.masked.store.v8f32.p0(<8 x float> {a}, <8 x float>* %opv{i}, i32 4, <8 x i1> %inside)"""


def _body_q4_k_packed(isa: str, rows: int):
    """Q4_K, 8 packed weight rows against ``rows`` Q8_256 activation rows: per activation row, an
    <8 x float> accumulator whose lane r is weight row 8g + r, updated once per super-block as
    the row-major kernels update their float (:meth:`_IR.fma_int`). With VNNI a sub-block's four
    slices chain through ``vpdpbusd`` (a row's two int32 lanes stay below 2^15: 16 products of
    at most 15 x 127), and one ``vpmaddwd`` against the scales with zeros in the high halves
    scales them: 12 instructions per sub-block and row half instead of 18, the same integers."""
    e = _IR(isa)
    blk = e(f"mul i64 %b, {PACKED_BLOCK[Q4_K]}")
    e.prefetch("%row", blk, PACKED_BLOCK[Q4_K])
    at = lambda off: e(f"add i64 {blk}, {off}")
    d = e(f"fpext <8 x half> {e.load('%row', blk, '<8 x half>')} to <8 x float>")
    dmin = e(f"fpext <8 x half> {e.load('%row', at(16), '<8 x half>')} to <8 x float>")
    bytes8 = lambda off: e(f"zext <8 x i8> {e.load('%row', at(off), '<8 x i8>')} to <8 x i16>")
    scales = {}

    def scale(j, h):        # <16 x i16>: lanes 4k..4k+3 the scale of row 4h + k in sub-block j
        if j not in scales:
            s8 = bytes8(32 + 8 * j)
            scales[j] = [e(f"shufflevector <8 x i16> {s8}, <8 x i16> undef, {_mask([4 * hh + l // 4 for l in range(16)])}")
                         for hh in range(2)]
        return scales[j][h]

    def scale32(j, h):      # <16 x i16>: lane 2L the scale of int32 lane L's row (4h + L // 2), 2L + 1 zero
        s = scale(j, h)
        return e(f"shufflevector <16 x i16> {s}, <16 x i16> zeroinitializer, {_mask([l if l % 2 == 0 else 16 for l in range(16)])}")

    ab = e(f"mul i64 %b, {ACT_BLOCK[Q8_256]}")
    if e.zmm:       # both row halves in one 512-bit register: the same integers, fewer instructions
        return _q4_k_packed_zmm(e, rows, at, ab, bytes8, d, dmin)
    isum = [["zeroinitializer"] * 2 for _ in range(rows)]    # per activation row and row half
    for cc in range(4):                     # unpack a chunk's 16 slices, use them for every row
        w = {}
        for c in range(4):
            for h in range(2):
                q = e.load("%row", at(160 + ((cc * 4 + c) * 2 + h) * 32), "<32 x i8>")
                w[c, h, 0], w[c, h, 1] = e.and_bytes(q, 15), e.lshr_bytes(q, 4)
        for i in range(rows):
            for j in (2 * cc, 2 * cc + 1):
                xs = [e(f"bitcast <4 x i64> {e.splat('i64', 4, e.load(f'%x{i}', e(f'add i64 {ab}, {32 * j + 8 * c}'), 'i64'))} to <32 x i8>")
                      for c in range(4)]
                for h in range(2):
                    if e.vnni:      # lanes 2k, 2k + 1: row 4h + k's 16 products each (|sum| < 2^15)
                        chain = "zeroinitializer"
                        for c in range(4):
                            chain = e.udot4(w[c, h, j % 2], xs[c], chain)
                        wide = e(f"bitcast <8 x i32> {chain} to <16 x i16>")
                        isum[i][h] = e(f"add <8 x i32> {isum[i][h]}, {e.madd(wide, scale32(j, h))}")
                        continue
                    s16 = e.maddubs(w[0, h, j % 2], xs[0])
                    for c in range(1, 4):
                        s16 = e(f"add <16 x i16> {s16}, {e.maddubs(w[c, h, j % 2], xs[c])}")
                    isum[i][h] = e(f"add <8 x i32> {isum[i][h]}, {e.madd(s16, scale(j, h))}")
    def total(i):       # lanes 2k, 2k + 1 of half h are row 4h + k's: one exact sum per row
        ev = e(f"shufflevector <8 x i32> {isum[i][0]}, <8 x i32> {isum[i][1]}, {_mask(range(0, 16, 2))}")
        od = e(f"shufflevector <8 x i32> {isum[i][0]}, <8 x i32> {isum[i][1]}, {_mask(range(1, 16, 2))}")
        return e(f"add <8 x i32> {ev}, {od}")
    return _q4_k_packed_finish(e, rows, total, ab, bytes8, d, dmin)


def _q4_k_packed_finish(e, rows, total_of, ab, bytes8, d, dmin):
    """The packed Q4_K bodies' step per super-block and activation row i: ``total_of(i)`` emits
    the row's exact sums (<8 x i32>, weight rows in lanes), then the mins against the activation
    sums, and the float accumulator takes both."""
    accs = []
    for i in range(rows):
        total = total_of(i)
        msum = "zeroinitializer"           # sum_j min_j * (16-sums 2j + 2j + 1), rows in lanes
        for j in range(8):
            mins = e(f"shufflevector <8 x i16> {bytes8(96 + 8 * j)}, <8 x i16> undef, {_mask([l // 2 for l in range(16)])}")
            pair = e.splat("i32", 8, e.load(f"%x{i}", e(f"add i64 {ab}, {Q8_256 + 4 + 4 * j}"), "i32"))
            msum = e(f"add <8 x i32> {msum}, {e.madd(mins, e(f'bitcast <8 x i32> {pair} to <16 x i16>'))}")
        dx = e.splat("float", 8, e.act(i, Q8_256, "d"))
        acc = e.fma8(total, e(f"fmul <8 x float> {d}, {dx}"), f"%acc{i}")
        acc = e.fma8(msum, e(f"fneg <8 x float> {e(f'fmul <8 x float> {dmin}, {dx}')}"), acc)
        accs.append(acc)
    return "\n".join(e.lines), accs


def _q4_k_packed_zmm(e, rows, at, ab, bytes8, d, dmin):
    """:func:`_body_q4_k_packed`'s VNNI form in 512-bit registers: a chunk's slices of both row
    halves are adjacent (64 bytes), so one ``vpdpbusd`` chain and one ``vpmaddwd`` per sub-block
    and activation row cover all 8 rows; int32 lanes 0-7 are half 0's, 8-15 half 1's, exactly the
    256-bit form's two accumulators side by side."""
    scales = {}

    def scale512(j):        # <32 x i16>: lane 16h + 2L the scale of row 4h + L // 2, odd lanes zero
        if j not in scales:
            s8 = bytes8(32 + 8 * j)
            scales[j] = e(f"shufflevector <8 x i16> {s8}, <8 x i16> zeroinitializer, "
                          f"{_mask([4 * (l // 16) + (l % 16) // 4 if l % 2 == 0 else 8 for l in range(32)])}")
        return scales[j]

    isum = ["zeroinitializer"] * rows
    for cc in range(4):
        w = {}
        for c in range(4):
            q = e.load("%row", at(160 + (cc * 4 + c) * 64), "<64 x i8>")
            w[c, 0] = e(f"bitcast <64 x i8> {e(f'and <64 x i8> {q}, {e.bytes_(15, 64)}')} to <16 x i32>")
            w[c, 1] = e(f"bitcast <64 x i8> {e(f'lshr <64 x i8> {q}, {e.bytes_(4, 64)}')} to <16 x i32>")
        for i in range(rows):
            for j in (2 * cc, 2 * cc + 1):
                chain = "zeroinitializer"
                for c in range(4):
                    x = e.splat("i64", 8, e.load(f"%x{i}", e(f"add i64 {ab}, {32 * j + 8 * c}"), "i64"))
                    x = e(f"bitcast <8 x i64> {x} to <16 x i32>")
                    chain = e(f"call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> {chain}, <16 x i32> {w[c, j % 2]}, <16 x i32> {x})")
                wide = e(f"bitcast <16 x i32> {chain} to <32 x i16>")
                prod = e(f"call <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16> {wide}, <32 x i16> {scale512(j)})")
                isum[i] = e(f"add <16 x i32> {isum[i]}, {prod}")
    # lanes 2k, 2k + 1 are row k's (k < 8): one exact sum per row
    return _q4_k_packed_finish(e, rows, lambda i: e._pairs("i32", 16, isum[i]), ab, bytes8, d, dmin)


def _body_q6_k_packed(isa: str, rows: int):
    """Q6_K, 8 packed weight rows against ``rows`` Q8_256 activation rows, rows in the int32
    lanes: per 16-quant sub-block four ``vpdpbusd`` (4 quants of each row a register) give each
    row's sub-block dot in its lane, one 32-bit multiply its scale; the -32 offsets come from the
    16-sums at the end: one exact integer a row and super-block, the row-major kernel's
    (:func:`_body_q6_k`), scaled into lane r of the accumulator."""
    e = _IR(isa)
    blk = e(f"mul i64 %b, {PACKED_BLOCK[Q6_K]}")
    e.prefetch("%row", blk, PACKED_BLOCK[Q6_K])
    at = lambda off: e(f"add i64 {blk}, {off}")
    d = e(f"fpext <8 x half> {e.load('%row', at(1664), '<8 x half>')} to <8 x float>")
    sc8 = [e.load("%row", at(1536 + 8 * j), "<8 x i8>") for j in range(16)]       # [j][row]
    ab = e(f"mul i64 %b, {ACT_BLOCK[Q8_256]}")
    isum = ["zeroinitializer"] * rows
    for j in range(16):
        p, q, h = (e.load("%row", at(96 * j + 32 * t), "<32 x i8>") for t in range(3))
        top = lambda v, to: e(f"shl <32 x i8> {e.lshr_bytes(v, 6)}, {e.bytes_(to)}") if to else e.lshr_bytes(v, 6)
        w = [e.and_bytes(v, 63) for v in (p, q, h)]
        w.append(e(f"or <32 x i8> {e(f'or <32 x i8> {top(p, 0)}, {top(q, 2)}')}, {top(h, 4)}"))
        sc = e(f"sext <8 x i8> {sc8[j]} to <8 x i32>")
        for i in range(rows):
            chain = "zeroinitializer"
            for c in range(4):      # quants 16j + 4c..16j + 4c + 3 of every row
                x = e(f"bitcast <8 x i32> {e.splat('i32', 8, e.load(f'%x{i}', e(f'add i64 {ab}, {16 * j + 4 * c}'), 'i32'))} to <32 x i8>")
                chain = e.udot4(w[c], x, chain)
            isum[i] = e(f"add <8 x i32> {isum[i]}, {e(f'mul <8 x i32> {chain}, {sc}')}")
    # sub-blocks 2p, 2p + 1 of each row side by side, for vpmaddwd against the activations' 16-sums
    pairs = [e(f"sext <16 x i8> {e(f'shufflevector <8 x i8> {sc8[2 * p]}, <8 x i8> {sc8[2 * p + 1]}, {_mask(k // 2 + 8 * (k % 2) for k in range(16))}')} to <16 x i16>")
             for p in range(8)]
    accs = []
    for i in range(rows):
        corr = "zeroinitializer"          # sum_j sc_j * (16-sum j), rows in lanes
        for p in range(8):
            bs = e.splat("i32", 8, e.load(f"%x{i}", e(f"add i64 {ab}, {Q8_256 + 4 + 4 * p}"), "i32"))
            corr = e(f"add <8 x i32> {corr}, {e.madd(pairs[p], e(f'bitcast <8 x i32> {bs} to <16 x i16>'))}")
        corr32 = e(f"shl <8 x i32> {corr}, {_vec('i32', [5] * 8)}")          # x 32
        total = e(f"sub <8 x i32> {isum[i]}, {corr32}")
        dx = e.splat("float", 8, e.act(i, Q8_256, "d"))
        accs.append(e.fma8(total, e(f"fmul <8 x float> {d}, {dx}"), f"%acc{i}"))
    return "\n".join(e.lines), accs


def _body_q32_packed(kind: str, isa: str, rows: int):
    """Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, 8 packed weight rows (unsigned bytes) against ``rows`` Q8_32 activation
    rows. The 4-product sums of the block's four slices add up in two int32 registers (row half
    h, lanes (row, j)); a row's two lanes added are its block's exact integer dot, the row-major
    kernels' integer, scaled into one float lane a row as there (:data:`_Q32_PACKED_STORES`).
    Q8_0's + 128 is taken back exactly: 128 x (4-sums of the activations) is subtracted. Q4_x and Q5_x keep
    the row-major kernels' second accumulator too, one lane a row (``factor x (scale x sum)`` per
    block: Q4_0's / Q5_0's d, times -8 / -16 at the end; Q4_1's / Q5_1's m). Q5_x's fifth bits are
    ORed into the nibbles' bytes (values 0..31)."""
    e = _IR(isa)
    size = PACKED_BLOCK[_Q32_PACKED_TYPES[kind]]
    blk = e(f"mul i64 %b, {size}")
    e.prefetch("%row", blk, size)
    five = kind in ("q5_0", "q5_1")
    quants = 256 if kind == "q8_0" else 160 if five else 128
    d = e(f"fpext <8 x half> {e.load('%row', e(f'add i64 {blk}, {quants}'), '<8 x half>')} to <8 x float>")
    factor = None
    if kind != "q8_0":
        factor = d if kind in ("q4_0", "q5_0") else \
            e(f"fpext <8 x half> {e.load('%row', e(f'add i64 {blk}, {quants + 16}'), '<8 x half>')} to <8 x float>")
    ab = e(f"mul i64 %b, {ACT_BLOCK[Q8_32]}")
    if kind == "q8_0":
        w = {(c, h): e.load("%row", e(f"add i64 {blk}, {(c * 2 + h) * 32}"), "<32 x i8>") for c in range(4) for h in range(2)}
    else:       # slice c in the low nibbles of register (c % 2, h), slice c + 2 in the high ones
        w = {}
        for c in range(2):
            for h in range(2):
                q = e.load("%row", e(f"add i64 {blk}, {(c * 2 + h) * 32}"), "<32 x i8>")
                w[c, h], w[c + 2, h] = e.and_bytes(q, 15), e.lshr_bytes(q, 4)
                for sl in (c, c + 2) if five else ():        # the fifth bits of slice sl's 32 quants
                    bits = e(f"bitcast i32 {e.load('%row', e(f'add i64 {blk}, {128 + (sl * 2 + h) * 4}'), 'i32')} "
                             "to <32 x i1>")
                    fifth = e(f"shl <32 x i8> {e(f'zext <32 x i1> {bits} to <32 x i8>')}, {e.bytes_(4)}")
                    w[sl, h] = e(f"or <32 x i8> {w[sl, h]}, {fifth}")
    accs = []
    for i in range(rows):
        scale = e(f"fmul <8 x float> {d}, {e.splat('float', 8, e.act(i, Q8_32, 'd'))}")
        chain, corr = ["zeroinitializer"] * 2, "zeroinitializer"
        for c in range(4):
            x = e(f"bitcast <4 x i64> {e.splat('i64', 4, e.load(f'%x{i}', e(f'add i64 {ab}, {8 * c}'), 'i64'))} to <32 x i8>")
            if kind == "q8_0":
                corr = e.udot4(e.bytes_(128), x, corr)
            for h in range(2):
                chain[h] = e.udot4(w[c, h], x, chain[h])
        if kind == "q8_0":          # the + 128 taken back: 128 x (4-sums of the activations), exact
            chain = [e(f"sub <8 x i32> {v}, {corr}") for v in chain]
        # lane (r % 4) * 2 + j of register h: products 4j.. of each slice of row 4h + r % 4; a
        # row's two lanes added give its block's exact integer dot, rows in lane order
        ev = e(f"shufflevector <8 x i32> {chain[0]}, <8 x i32> {chain[1]}, {_mask(range(0, 16, 2))}")
        od = e(f"shufflevector <8 x i32> {chain[0]}, <8 x i32> {chain[1]}, {_mask(range(1, 16, 2))}")
        acc = [e._fma(e(f"add <8 x i32> {ev}, {od}"), scale, f"%acc{i}")]
        if factor is not None:
            xs = e.splat("float", 8, e.act(i, Q8_32, "s", ty="float"))
            acc.append(e(f"call <8 x float> @llvm.fma.v8f32(<8 x float> {factor}, <8 x float> {xs}, <8 x float> %accs{i})"))
        accs.append(acc)
    return "\n".join(e.lines), accs


_Q32_PACKED_PHI_S = "  %accs{i} = phi <8 x float> [zeroinitializer, %mloop], [{a}, %bloop]"
# per row (lane): acc + accs x factor, the row-major kernels' sum (_STORES_Q32; Q8_0's second
# accumulator is 0)
_Q32_PACKED_SSUM = """  %ssum{i} = fmul <8 x float> {a}, {cs}"""
_Q32_PACKED_STORES = """  %rowtot{i} = fadd <8 x float> {a}, {ssum}
""" + _PACKED_STORES.replace("{a}", "%rowtot{i}")


_Q32_PACKED_TYPES = {"q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1}
#: ggml type -> (kernel name, IR body) of the packed kernels
_PACKED_KERNELS = {Q4_K: ("q4_k", _body_q4_k_packed), Q6_K: ("q6_k", _body_q6_k_packed),
                   **{qt: (n, functools.partial(_body_q32_packed, n)) for n, qt in _Q32_PACKED_TYPES.items()}}


def _packed_ir(name: str, body, isa: str, rows: int, tag: str = "") -> str:
    lines, accs = body(isa, rows)
    if isinstance(accs[0], list):       # the 32-quant types: a float accumulator an activation row (+ one)
        phis = "\n".join(_PACKED_PHIS.format(i=i, a=acc[0])
                         + ("\n" + _Q32_PACKED_PHI_S.format(i=i, a=acc[1]) if len(acc) > 1 else "")
                         for i, acc in enumerate(accs))
        cs = _KERNELS[_Q32_PACKED_TYPES[name]][3] if len(accs[0]) > 1 else None   # the row-major factor
        ssum = lambda i: f"%ssum{i}" if cs else "zeroinitializer"
        stores = "".join(_Q32_PACKED_SSUM.format(i=i, a=acc[1], cs=_vec("float", [cs] * 8)) + "\n"
                         for i, acc in enumerate(accs) if cs) \
            + "\n".join(_Q32_PACKED_STORES.format(i=i, a=acc[0], ssum=ssum(i)) for i, acc in enumerate(accs))
    else:
        phis = "\n".join(_PACKED_PHIS.format(i=i, a=a) for i, a in enumerate(accs))
        stores = "\n".join(_PACKED_STORES.format(i=i, a=a) for i, a in enumerate(accs))
    pointers = "\n".join(_POINTERS.format(i=i) for i in range(len(accs)))
    return _PACKED_SKELETON.format(name=name, R=rows, tag=tag, body=lines, pointers=pointers, phis=phis, stores=stores)


#: ggml type -> (kernel name, activation format, IR body, factor of the scalar accumulator)
_KERNELS = {
    Q8_0: ("q8_0", Q8_32, lambda isa, rows: _body_q32("q8_0", isa, rows), "0.0"),
    Q4_0: ("q4_0", Q8_32, lambda isa, rows: _body_q32("q4_0", isa, rows), "-8.0"),
    Q4_1: ("q4_1", Q8_32, lambda isa, rows: _body_q32("q4_1", isa, rows), "1.0"),
    Q5_0: ("q5_0", Q8_32, lambda isa, rows: _body_q32("q5_0", isa, rows), "-16.0"),
    Q5_1: ("q5_1", Q8_32, lambda isa, rows: _body_q32("q5_1", isa, rows), "1.0"),
    Q4_K: ("q4_k", Q8_256, lambda isa, rows: _body_q45_k(isa, rows, False), "0.0"),
    Q5_K: ("q5_k", Q8_256, lambda isa, rows: _body_q45_k(isa, rows, True), "0.0"),
    Q6_K: ("q6_k", Q8_256, _body_q6_k, "0.0"),
}
SIMD_TYPES = frozenset(_KERNELS)
#: ggml type -> activation format its kernel reads
ACT_FORMAT = {qt: fmt for qt, (_, fmt, _, _) in _KERNELS.items()}

#: activation rows per pass of the multi-row kernels (prefill); the rest run one by one
ROWS = 4
#: ISAs whose multi-row entry point takes 8 rows per pass, then 4 (x86: 8 rows' accumulators fit
#: the vector registers; in cache, Q4_K 8960 x 1536 x 64 rows: ~+6 % on one thread, ~+5-20 % on
#: two, docs/performance.md). The results do not depend on it: each row's sums are its own.
WIDE = {"avx2": 8}

# Decode of a few sequences at once (4-7 activation rows) against a matrix with a long input: the
# activation rows no longer fit L1 beside the streamed weights (4 x 8960 inputs of Q8_256 are
# 45 KB), and the hardware's prefetch stops keeping up: on the development machine (AMD EPYC, 32 KB
# L1) the 1.5B model's 4-row ffn_down took 2.2-2.5x its one-row time while gate/up (1536 inputs)
# took 1.2x. Kernels that prefetch their weights PREFETCH_AHEAD bytes ahead bring a 4-row down
# projection from ~1.05 to ~0.75 ms (Q4_K, one thread) and ~1.7 to ~1.2 ms (Q6_K); the same
# prefetch slows short inputs (gate/up -15 %) and one-row products (-5 to -50 %), so the x86
# multi-row entry takes the prefetching 4-row kernels only from PREFETCH_MIN_INPUTS inputs and for
# the 4-row pass (docs/performance.md). Results do not depend on it.
PREFETCH_AHEAD = 2048
PREFETCH_MIN_INPUTS = 4096
#: ggml types with a prefetching 4-row kernel in the wide ISAs' modules: row-major (the K-quants;
#: measured on Q6_K) and packed (measured on Q4_K, Q6_K and Q8_0)
_PREFETCHED = frozenset({Q4_K, Q5_K, Q6_K})
_PREFETCHED_PACKED = frozenset({Q4_K, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1})

_WIDE_ENTRY = """
define void @{P}w_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nblk, i64 %m_rows,
                      i8* %x_, i64 %sx, float* %out_, i64 %so) {{
entry:
{wide}
  %rest = sub i64 %m_rows, %mw
  %xoff = mul i64 %mw, %sx
  %xr = getelementptr i8, i8* %x_, i64 %xoff
  %ooff = mul i64 %mw, %so
  %outr = getelementptr float, float* %out_, i64 %ooff
{rest}
  ret void
}}
"""
_REST_CALL = """  call void @{P}{R}{tag}_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nblk, i64 %rest, i8* %xr, i64 %sx, float* %outr, i64 %so)"""
_REST_CHOICE = """  %long = icmp sge i64 %nblk, {blocks}
  br i1 %long, label %ahead, label %plain
ahead:
""" + _REST_CALL.replace("{tag}", "p") + """
  ret void
plain:
""" + _REST_CALL.replace("{tag}", "")


_WIDE_PASS = """  %mw = and i64 %m_rows, -{W}
  call void @{P}{W}_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nblk, i64 %mw, i8* %x_, i64 %sx, float* %out_, i64 %so)"""


def _wide_entry(P: str, name: str, W: int, prefetched: bool, fmt: int) -> str:
    """The multi-row entry ``{P}w_{name}``: W rows a pass, then ROWS (W == ROWS: ROWS only); the
    ROWS-row pass prefetching (``prefetched``) from PREFETCH_MIN_INPUTS inputs."""
    rest = (_REST_CHOICE.replace("{blocks}", str(PREFETCH_MIN_INPUTS // fmt)) if prefetched else _REST_CALL.replace("{tag}", ""))
    wide = _WIDE_PASS.format(P=P, name=name, W=W) if W != ROWS else "  %mw = add i64 0, 0"
    return _WIDE_ENTRY.format(P=P, name=name, wide=wide, rest=rest.format(P=P, R=ROWS, name=name))


# Float dot products of one query row with n key rows (attention scores), for ops.attention_decode:
# out[j] = sum(q[i] * k[j, i]) for i < hd (a multiple of 8), as 8 running lane sums (lane i % 8,
# a multiply then an add, never fused) combined as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)):
# exactly the operations and order of ops._dot8, in one <8 x float> register (two on NEON) instead
# of eight scalars, which LLVM does not vectorize by itself; four keys per pass share the query's
# loads and keep four independent add chains in flight, the rest go one at a time. All arguments
# are i64 (see jit.call_address).
_DOTS_LOOP = """
{L}loop:
  %{L}j = phi i64 [{j0}, %{came}], [%{L}jn, %{L}end]
{keys}
  br label %{L}i
{L}i:
  %{L}ii = phi i64 [0, %{L}loop], [%{L}in, %{L}i]
{accs}
  %{L}qp = getelementptr float, float* %q, i64 %{L}ii
  %{L}qvp = bitcast float* %{L}qp to <8 x float>*
  %{L}qv = load <8 x float>, <8 x float>* %{L}qvp, align 4
{products}
  %{L}in = add i64 %{L}ii, 8
  %{L}idone = icmp sge i64 %{L}in, %hd
  br i1 %{L}idone, label %{L}end, label %{L}i
{L}end:
{stores}
  %{L}jn = add i64 %{L}j, {step}
  %{L}jdone = icmp eq i64 %{L}jn, {stop}
  br i1 %{L}jdone, label %{after}, label %{L}loop
"""
_DOTS_KEY = """  %{L}o{c} = add i64 %{L}j, {c}
  %{L}koff{c} = mul i64 %{L}o{c}, %ks
  %{L}kaddr{c} = add i64 %k_, %{L}koff{c}
  %{L}k{c} = inttoptr i64 %{L}kaddr{c} to float*"""
_DOTS_ACC = "  %{L}acc{c} = phi <8 x float> [zeroinitializer, %{L}loop], [%{L}accn{c}, %{L}i]"
_DOTS_PRODUCT = """  %{L}kp{c} = getelementptr float, float* %{L}k{c}, i64 %{L}ii
  %{L}kvp{c} = bitcast float* %{L}kp{c} to <8 x float>*
  %{L}kv{c} = load <8 x float>, <8 x float>* %{L}kvp{c}, align 4
  %{L}p{c} = fmul <8 x float> %{L}qv, %{L}kv{c}
  %{L}accn{c} = fadd <8 x float> %{L}acc{c}, %{L}p{c}"""
_DOTS_STORE = """  %{L}lo{c} = shufflevector <8 x float> %{L}accn{c}, <8 x float> undef, <4 x i32> <i32 0, i32 1, i32 2, i32 3>
  %{L}hi{c} = shufflevector <8 x float> %{L}accn{c}, <8 x float> undef, <4 x i32> <i32 4, i32 5, i32 6, i32 7>
  %{L}s4{c} = fadd <4 x float> %{L}lo{c}, %{L}hi{c}
  %{L}a2{c} = shufflevector <4 x float> %{L}s4{c}, <4 x float> undef, <2 x i32> <i32 0, i32 1>
  %{L}b2{c} = shufflevector <4 x float> %{L}s4{c}, <4 x float> undef, <2 x i32> <i32 2, i32 3>
  %{L}s2{c} = fadd <2 x float> %{L}a2{c}, %{L}b2{c}
  %{L}e0{c} = extractelement <2 x float> %{L}s2{c}, i32 0
  %{L}e1{c} = extractelement <2 x float> %{L}s2{c}, i32 1
  %{L}t{c} = fadd float %{L}e0{c}, %{L}e1{c}
  %{L}op{c} = getelementptr float, float* %out, i64 %{L}o{c}
  store float %{L}t{c}, float* %{L}op{c}"""


def _dots_loop(L: str, keys: int, j0: str, came: str, stop: str, after: str) -> str:
    part = lambda t: "\n".join(t.format(L=L, c=c) for c in range(keys))
    return _DOTS_LOOP.format(L=L, j0=j0, came=came, stop=stop, after=after, step=keys, keys=part(_DOTS_KEY),
                             accs=part(_DOTS_ACC), products=part(_DOTS_PRODUCT), stores=part(_DOTS_STORE))


_DOTS_IR = ("""
define void @dots_f32(i64 %q_, i64 %k_, i64 %ks, i64 %n, i64 %hd, i64 %out_) {
entry:
  %q = inttoptr i64 %q_ to float*
  %out = inttoptr i64 %out_ to float*
  %n4 = and i64 %n, -4
  %has4 = icmp sgt i64 %n4, 0
  br i1 %has4, label %fourloop, label %rest
""" + _dots_loop("four", 4, "0", "entry", "%n4", "rest") + """
rest:
  %more = icmp slt i64 %n4, %n
  br i1 %more, label %oneloop, label %exit
""" + _dots_loop("one", 1, "%n4", "rest", "%n", "exit") + """
exit:
  ret void
}
""")


def packed_types(isa: str, vnni: bool = False) -> tuple[int, ...]:
    """The types with packed kernels in ``isa``'s module: Q4_K; the 32-quant types (Q8_0, Q4_x,
    Q5_x) where their 4-product dot is one instruction (x86 with VNNI) or plain IR (portable)."""
    if isa not in _PACKED_MODULES:
        return ()
    return tuple(qt for qt in _PACKED_KERNELS if qt == Q4_K or vnni or isa == "portable")


def module_ir(isa: str, vnni: bool = False, zmm: bool = False) -> str:
    """The kernel module of ``isa``; ``vnni``: the CPU has vpdpbusd (x86 only); ``zmm``: and its
    512-bit form with AVX-512 BW (packed Q4_K's 8-row kernel then uses it)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    wide = WIDE.get(isa)
    counts = (1, ROWS) + ((wide,) if wide else ())
    packed = [_PACKED_KERNELS[qt] for qt in packed_types(isa, vnni)]
    flavour = isa + ("+vnni" if vnni and isa == "avx2" else "")
    # 512-bit registers for packed Q4_K's 8-row pass only (prompts): ~+5 % prefill on the 1.5B shape
    # (Intel, AVX-512); the 1- and 4-row kernels and Q6_K's measured slower in them (docs/performance.md)
    flavour_of = lambda n, r: flavour + ("+zmm" if zmm and n == "q4_k" and r == 8 else "")   # _IR ignores it without VNNI
    ahead = {qt for qt in _PREFETCHED if wide}
    ahead_packed = {qt for qt in _PREFETCHED_PACKED if wide}
    pk = {n: qt for qt, (n, _) in _PACKED_KERNELS.items()}
    return (_HEADER + "".join(_kernel_ir(n, cs, body, isa, r) for n, _, body, cs in _KERNELS.values() for r in counts)
            + "".join(_kernel_ir(n, cs, body, isa + "+prefetch", ROWS, "p")
                      for qt, (n, _, body, cs) in _KERNELS.items() if qt in ahead)
            + "".join(_wide_entry("mm", n, wide, qt in ahead, fmt) for qt, (n, fmt, _, _) in _KERNELS.items() if wide)
            + "".join(_packed_ir(n, body, flavour_of(n, r), r) for n, body in packed for r in (1, ROWS) + (() if n in _Q32_PACKED_TYPES else (8,)))
            + "".join(_packed_ir(n, body, flavour + "+prefetch", ROWS, "p") for n, body in packed if pk[n] in ahead_packed)
            + "".join(_wide_entry("px", n, ROWS if n in _Q32_PACKED_TYPES else 8, pk[n] in ahead_packed, ACT_FORMAT[pk[n]])
                      for n, _ in packed)
            + _DOTS_IR)


def _kernel_ir(name: str, cs: str, body, isa: str, rows: int, tag: str = "") -> str:
    lines, accs = body(isa, rows)
    scalar = accs[0][0] is None         # the K-quants: one float per row, no vector accumulator
    phis, stores = (_PHIS_SCALAR, _STORES_SCALAR) if scalar else \
        (_PHIS_Q32, _STORES_Q32) if name in _Q32_PACKED_TYPES else (_PHIS, _STORES)
    fill = lambda template: "\n".join(template.format(i=i, accv1=v, accs1=a, cs=cs) for i, (v, a) in enumerate(accs))
    return _SKELETON.format(name=name, R=rows, tag=tag, body=lines, pointers=fill(_POINTERS), phis=fill(phis),
                            stores=fill(stores))
