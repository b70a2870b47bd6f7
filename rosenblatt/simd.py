"""Integer-SIMD decode kernels, written in LLVM IR and compiled at import with llvmlite.

numba widens every small integer to int64, so its loops over int8 quants run on 4 lanes;
llama.cpp's speed comes from 8/16-bit integer SIMD. These kernels are therefore written directly
as LLVM vector IR — llvmlite ships with numba, so this is still no C extension — and compiled
for the host CPU (AVX2 on x86, NEON on the A76), then called through ctypes, which releases
the GIL so the backend's threads run them in parallel.

Scheme (llama.cpp's): activations are quantized per 32 values to int8 with a float scale
(``quantize_activations``); a block's dot product is an integer sum of int8 x int8 (or 4/6-bit)
products, scaled once per block. Results match the numpy emulation in the tests to float32
rounding, and match llama.cpp's logits to the fixtures' tolerance.

Each kernel computes ``out[r] = dot(row r, x)`` for rows ``[r0, r1)``:
``void mv_<type>(i8* w, i64 row_bytes, i64 r0, i64 r1, i64 nb32, i8* xq, float* xd, float* xs, float* out)``
with ``xq`` the int8 activations, ``xd`` their scale per 32, ``xs`` = ``xd * sum(xq)`` per 32.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from numba import njit

from .quants import Q4_0, Q4_1, Q4_K, Q6_K, Q8_0

_HEADER = """
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare i32 @llvm.vector.reduce.add.v32i32(<32 x i32>)
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
"""

# The loop skeleton every kernel shares: rows r0..r1, and per row the blocks; %BODY computes the
# float contribution %contrib of block %b from the row pointer %row.
_SKELETON = """
define void @mv_{name}(i8* %w, i64 %row_bytes, i64 %r0, i64 %r1, i64 %nb32, i8* %xq, float* %xd, float* %xs, float* %out) {{
entry:
  %nblk = udiv i64 %nb32, {per}
  %empty = icmp sge i64 %r0, %r1
  br i1 %empty, label %exit, label %rowloop
rowloop:
  %r = phi i64 [%r0, %entry], [%rnext, %rowend]
  %roff = mul i64 %r, %row_bytes
  %row = getelementptr i8, i8* %w, i64 %roff
  br label %bloop
bloop:
  %b = phi i64 [0, %rowloop], [%bnext, %bloop]
  %acc = phi float [0.0, %rowloop], [%acc1, %bloop]
  %bp = getelementptr i8, i8* %row, i64 0
{body}
  %acc1 = fadd float %acc, %contrib
  %bnext = add i64 %b, 1
  %bdone = icmp eq i64 %bnext, %nblk
  br i1 %bdone, label %rowend, label %bloop
rowend:
  %op = getelementptr float, float* %out, i64 %r
  store float %acc1, float* %op
  %rnext = add i64 %r, 1
  %rdone = icmp eq i64 %rnext, %r1
  br i1 %rdone, label %exit, label %rowloop
exit:
  ret void
}}
"""


class _IR:
    """A tiny emitter of SSA lines with fresh names."""

    def __init__(self):
        self.lines: list[str] = []
        self.n = 0

    def __call__(self, expr: str) -> str:
        self.n += 1
        name = f"%t{self.n}"
        self.lines.append(f"  {name} = {expr}")
        return name

    def load_vec(self, base: str, offset: str, n: int) -> str:
        p = self(f"getelementptr i8, i8* {base}, i64 {offset}")
        vp = self(f"bitcast i8* {p} to <{n} x i8>*")
        return self(f"load <{n} x i8>, <{n} x i8>* {vp}, align 1")

    def half(self, base: str, offset: str) -> str:
        p = self(f"getelementptr i8, i8* {base}, i64 {offset}")
        hp = self(f"bitcast i8* {p} to half*")
        h = self(f"load half, half* {hp}, align 1")
        return self(f"fpext half {h} to float")

    def f32_at(self, arr: str, index: str) -> str:
        p = self(f"getelementptr float, float* {arr}, i64 {index}")
        return self(f"load float, float* {p}")

    def byte(self, base: str, offset: str) -> str:
        p = self(f"getelementptr i8, i8* {base}, i64 {offset}")
        return self(f"load i8, i8* {p}")

    def splat8(self, value: int, n: int) -> str:
        return "<" + ", ".join([f"i8 {value}"] * n) + ">"

    def dot(self, a: str, b: str, n: int, a_signed: bool) -> str:
        """sum(a[i] * b[i]) as i32; a: <n x i8> (signed or unsigned), b: <n x i8> signed."""
        a32 = self(f"{'sext' if a_signed else 'zext'} <{n} x i8> {a} to <{n} x i32>")
        b32 = self(f"sext <{n} x i8> {b} to <{n} x i32>")
        p = self(f"mul <{n} x i32> {a32}, {b32}")
        return self(f"call i32 @llvm.vector.reduce.add.v{n}i32(<{n} x i32> {p})")

    def halves(self, v: str) -> tuple[str, str]:
        lo = self(f"shufflevector <32 x i8> {v}, <32 x i8> undef, <16 x i32> <{', '.join(f'i32 {i}' for i in range(16))}>")
        hi = self(f"shufflevector <32 x i8> {v}, <32 x i8> undef, <16 x i32> <{', '.join(f'i32 {i}' for i in range(16, 32))}>")
        return lo, hi


def _body_q8_0() -> str:
    e = _IR()
    boff = e("mul i64 %b, 34")
    d = e.half("%row", boff)
    qoff = e(f"add i64 {boff}, 2")
    q = e.load_vec("%row", qoff, 32)
    xoff = e("mul i64 %b, 32")
    x = e.load_vec("%xq", xoff, 32)
    s = e.dot(q, x, 32, True)
    sf = e(f"sitofp i32 {s} to float")
    dx = e.f32_at("%xd", "%b")
    t = e(f"fmul float {d}, {dx}")
    e.lines.append(f"  %contrib = fmul float {sf}, {t}")
    return "\n".join(e.lines)


def _body_q4(has_min: bool) -> str:
    e = _IR()
    bsize, qo = (20, 4) if has_min else (18, 2)
    boff = e(f"mul i64 %b, {bsize}")
    d = e.half("%row", boff)
    qoff = e(f"add i64 {boff}, {qo}")
    q = e.load_vec("%row", qoff, 16)
    lo = e(f"and <16 x i8> {q}, {e.splat8(15, 16)}")
    hi = e(f"lshr <16 x i8> {q}, {e.splat8(4, 16)}")
    xoff = e("mul i64 %b, 32")
    x0 = e.load_vec("%xq", xoff, 16)
    xoff16 = e(f"add i64 {xoff}, 16")
    x1 = e.load_vec("%xq", xoff16, 16)
    s0 = e.dot(lo, x0, 16, False)
    s1 = e.dot(hi, x1, 16, False)
    s = e(f"add i32 {s0}, {s1}")
    sf = e(f"sitofp i32 {s} to float")
    dx = e.f32_at("%xd", "%b")
    t = e(f"fmul float {d}, {dx}")
    if has_min:
        m = e.half("%row", e(f"add i64 {boff}, 2"))
        xs = e.f32_at("%xs", "%b")
        a = e(f"fmul float {sf}, {t}")
        mm = e(f"fmul float {m}, {xs}")
        e.lines.append(f"  %contrib = fadd float {a}, {mm}")
    else:   # (q - 8) * x = q*x - 8*x, and sum(x) over the block is xs / dx in integer units
        xs = e.f32_at("%xs", "%b")
        a = e(f"fmul float {sf}, {t}")
        eight = e(f"fmul float {d}, {xs}")
        corr = e(f"fmul float {eight}, 8.0")
        e.lines.append(f"  %contrib = fsub float {a}, {corr}")
    return "\n".join(e.lines)


def _body_q4_k() -> str:
    e = _IR()
    boff = e("mul i64 %b, 144")
    d = e.half("%row", boff)
    dmin = e.half("%row", e(f"add i64 {boff}, 2"))
    sc = [e(f"zext i8 {e.byte('%row', e(f'add i64 {boff}, {4 + i}'))} to i32") for i in range(12)]

    def scale_min(j):
        if j < 4:
            s = e(f"and i32 {sc[j]}, 63")
            m = e(f"and i32 {sc[j + 4]}, 63")
        else:
            a = e(f"and i32 {sc[j + 4]}, 15")
            b = e(f"lshr i32 {sc[j - 4]}, 2")
            b2 = e(f"and i32 {b}, 48")
            s = e(f"or i32 {a}, {b2}")
            c = e(f"lshr i32 {sc[j + 4]}, 4")
            f = e(f"lshr i32 {sc[j]}, 2")
            f2 = e(f"and i32 {f}, 48")
            m = e(f"or i32 {c}, {f2}")
        return s, m

    total_q = None
    total_m = None
    for c in range(4):
        q = e.load_vec("%row", e(f"add i64 {boff}, {16 + 32 * c}"), 32)
        lo = e(f"and <32 x i8> {q}, {e.splat8(15, 32)}")
        hi = e(f"lshr <32 x i8> {q}, {e.splat8(4, 32)}")
        for j, part in ((2 * c, lo), (2 * c + 1, hi)):
            xb = e(f"add i64 {e('mul i64 %b, 8')}, {j}")
            x = e.load_vec("%xq", e(f"mul i64 {xb}, 32"), 32)
            s = e.dot(part, x, 32, False)
            scj, mj = scale_min(j)
            dx = e.f32_at("%xd", xb)
            xs = e.f32_at("%xs", xb)
            si = e(f"mul i32 {s}, {scj}")
            qf = e(f"fmul float {e(f'sitofp i32 {si} to float')}, {dx}")
            mf = e(f"fmul float {e(f'sitofp i32 {mj} to float')}, {xs}")
            total_q = qf if total_q is None else e(f"fadd float {total_q}, {qf}")
            total_m = mf if total_m is None else e(f"fadd float {total_m}, {mf}")
    a = e(f"fmul float {d}, {total_q}")
    b = e(f"fmul float {dmin}, {total_m}")
    e.lines.append(f"  %contrib = fsub float {a}, {b}")
    return "\n".join(e.lines)


def _body_q6_k() -> str:
    e = _IR()
    boff = e("mul i64 %b, 210")
    d = e.half("%row", e(f"add i64 {boff}, 208"))
    total = None
    for h in range(2):
        a = e.load_vec("%row", e(f"add i64 {boff}, {64 * h}"), 32)
        c = e.load_vec("%row", e(f"add i64 {boff}, {64 * h + 32}"), 32)
        hb = e.load_vec("%row", e(f"add i64 {boff}, {128 + 32 * h}"), 32)
        parts = []
        for k, (src, shift_lo, hshift) in enumerate(((a, None, 0), (c, None, 2), (a, 4, 4), (c, 4, 6))):
            low = e(f"lshr <32 x i8> {src}, {e.splat8(shift_lo, 32)}") if shift_lo else \
                e(f"and <32 x i8> {src}, {e.splat8(15, 32)}")
            hs = e(f"lshr <32 x i8> {hb}, {e.splat8(hshift, 32)}") if hshift else hb
            h2 = e(f"and <32 x i8> {hs}, {e.splat8(3, 32)}")
            h3 = e(f"shl <32 x i8> {h2}, {e.splat8(4, 32)}")
            q = e(f"or <32 x i8> {low}, {h3}")
            qs = e(f"sub <32 x i8> {q}, {e.splat8(32, 32)}")
            parts.append((k, qs))
        for k, qs in parts:
            xb = e(f"add i64 {e('mul i64 %b, 8')}, {4 * h + k}")
            x = e.load_vec("%xq", e(f"mul i64 {xb}, 32"), 32)
            qlo, qhi = e.halves(qs)
            xlo, xhi = e.halves(x)
            s_lo = e.dot(qlo, xlo, 16, True)
            s_hi = e.dot(qhi, xhi, 16, True)
            sc_lo = e(f"sext i8 {e.byte('%row', e(f'add i64 {boff}, {192 + 8 * h + 2 * k}'))} to i32")
            sc_hi = e(f"sext i8 {e.byte('%row', e(f'add i64 {boff}, {192 + 8 * h + 2 * k + 1}'))} to i32")
            s = e(f"add i32 {e(f'mul i32 {s_lo}, {sc_lo}')}, {e(f'mul i32 {s_hi}, {sc_hi}')}")
            dx = e.f32_at("%xd", xb)
            f = e(f"fmul float {e(f'sitofp i32 {s} to float')}, {dx}")
            total = f if total is None else e(f"fadd float {total}, {f}")
    e.lines.append(f"  %contrib = fmul float {d}, {total}")
    return "\n".join(e.lines)


#: ggml type -> (kernel name, 32-value activation blocks per weight block, IR body)
_KERNELS = {
    Q8_0: ("q8_0", 1, _body_q8_0),
    Q4_0: ("q4_0", 1, lambda: _body_q4(False)),
    Q4_1: ("q4_1", 1, lambda: _body_q4(True)),
    Q4_K: ("q4_k", 8, _body_q4_k),
    Q6_K: ("q6_k", 8, _body_q6_k),
}
SIMD_TYPES = frozenset(_KERNELS)

_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_lock = threading.Lock()
_compiled: dict | None = None
_engine = None      # keeps the JIT (and so the code) alive


def kernels() -> dict:
    """ggml type -> ctypes function, compiled on first use; {} if LLVM cannot build them here."""
    global _compiled, _engine
    with _lock:
        if _compiled is not None:
            return _compiled
        try:
            import llvmlite.binding as llvm
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            ir = _HEADER + "".join(_SKELETON.format(name=n, per=per, body=body()) for n, per, body in _KERNELS.values())
            mod = llvm.parse_assembly(ir)
            mod.verify()
            target = llvm.Target.from_default_triple()
            tm = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                              features=llvm.get_host_cpu_features().flatten(), opt=3)
            _engine = llvm.create_mcjit_compiler(mod, tm)
            _engine.finalize_object()
            _compiled = {qt: _FN(_engine.get_function_address(f"mv_{n}")) for qt, (n, _, _) in _KERNELS.items()}
        except Exception:   # no usable LLVM target: the numba float kernels remain
            _compiled = {}
        return _compiled


@njit(cache=True)
def _quantize_rows(x, q, d, s):
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
                v = x[m, 32 * b + i] * inv
                r = np.floor(abs(v) + np.float32(0.5))            # roundf: half away from zero
                qi = np.int8(r if v >= 0 else -r)
                q[m, 32 * b + i] = qi
                total += qi
            d[m, b] = db
            s[m, b] = db * np.float32(total)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 32 values: int8 q = round(x / d) with d = max|x| / 127 (round half away from zero, as
    llama.cpp's roundf); returns (q int8 [M, K], d float32 [M, K/32], d * sum(q) float32 [M, K/32])."""
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    d = np.empty((m, k // 32), dtype=np.float32)
    s = np.empty((m, k // 32), dtype=np.float32)
    _quantize_rows(x, q, d, s)
    return q, d, s


def matvec(qtype: int, rows: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray,
           out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] for r in [r0, r1) (one activation row); releases the GIL while it runs."""
    kernels()[qtype](rows.ctypes.data, rows.shape[1], r0, r1, xd.shape[0], xq.ctypes.data, xd.ctypes.data,
                     xs.ctypes.data, out.ctypes.data)
