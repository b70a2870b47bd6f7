"""The kernel module compiled for this CPU: llvmlite turns :mod:`.ir`'s text into machine code
(kept in an object cache beside numba's, so a second start reads it back) and hands out the
kernels as ctypes functions per instruction set."""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading

from .ir import _KERNELS, _PACKED_KERNELS, _PACKED_MODULES, ROWS, WIDE, module_ir, packed_types
from .isa import ISAS, IsaError, host_choice, target_features

_FN = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int64]
                               + [ctypes.c_void_p, ctypes.c_int64]))
_lock = threading.Lock()
_compiled: dict[str, dict] = {}
_dots: dict[str, int] = {}
_variant: dict[str, tuple[bool, bool]] = {}     # isa -> (vnni, zmm) of its compiled module
_engines = []      # keep the JITs (and so the code) alive
#: packed Q4_K's 8-row kernel in 512-bit registers where the CPU has AVX-512 VNNI + BW + VL: 1 on,
#: 0 off (the 256-bit form AVX-VNNI-only CPUs run; the same integers either way); unset, on but
#: for AMD's Zen cores, where 512-bit kernel bodies measured slower (docs/performance.md, session 7)
ZMM_ENV = "ROSENBLATT_ZMM"


def _zmm_choice(flags: set, cpu: str) -> bool:
    """Whether the module's packed Q4_K 8-row kernel uses 512-bit registers (see :data:`ZMM_ENV`)."""
    if not {"+avx512vnni", "+avx512bw", "+avx512vl"} <= flags:
        return False
    forced = os.environ.get(ZMM_ENV)
    return forced != "0" if forced in ("0", "1") else not cpu.startswith("znver")


def host_isa() -> str:
    """The instruction set the kernels are compiled for on this machine (:data:`ISAS`), as
    :mod:`rosenblatt.cpu.isa` decides it from the operating system's report (or ``$ROSENBLATT_ISA``)."""
    return host_choice().isa


_misched_off = False


def _disable_machine_scheduler(llvm) -> None:
    """LLVM's pre-register-allocation machine scheduler hoists the unpacked weight vectors of all
    sub-blocks ahead of the 4 activation rows and spills them: the Q4_K 4-row loop makes 78
    stack accesses per super-block with it, 18 without (in-cache rate ~35 -> ~45 G MAC/s per
    core). There is no per-function switch, so this turns it off for the process's LLVM once,
    before the kernels compile; only code compiled later is affected (numba functions missing
    from the cache), and an out-of-order core barely depends on that schedule."""
    global _misched_off
    if not _misched_off:
        llvm.set_option("", "-enable-misched=false")
        _misched_off = True


def _cache_dir() -> str | None:
    """Where compiled kernel objects are kept: beside numba's cache of this package (its
    ``__pycache__``, or ``$NUMBA_CACHE_DIR``), else the user's cache directory; None if none is
    writable."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ["NUMBA_CACHE_DIR"]] if os.environ.get("NUMBA_CACHE_DIR") else []
    candidates += [os.path.join(here, "__pycache__"),
                   os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rosenblatt")]
    for d in candidates:
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return None


class _ObjectCache:
    """MCJIT object cache for one kernel module: the machine code of an identical compile (same
    IR, LLVM, CPU name and features, options) is read back instead of being generated again
    (~0.3 s and ~25 MiB of LLVM code pages touched at start-up). Files carry a SHA-256 of their
    content; an unreadable, truncated or mismatching file is ignored and rewritten."""

    def __init__(self, key_text: str):
        self.key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
        d = _cache_dir()
        self.path = os.path.join(d, f"simd-kernels-{self.key}.o") if d else None
        self.hit = False

    def load(self, _module) -> bytes | None:
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        digest, data = blob[:32], blob[32:]
        if len(blob) <= 32 or hashlib.sha256(data).digest() != digest:
            return None
        self.hit = True
        return data

    def store(self, _module, data: bytes) -> None:
        if self.path is None or self.hit:
            return
        try:        # written whole under a temporary name, then renamed into place
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".simd-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(data).digest() + data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError:
            pass


def kernels(isa: str | None = None) -> dict:
    """ggml type -> (one-row kernel, multi-row kernel: any multiple of ROWS rows) as ctypes functions, compiled on first
    use (or read from the object cache); {} if LLVM cannot build them here.

    ``isa`` None: :func:`host_isa`; or one of :data:`ISAS` that this CPU can run (tests compile
    "portable" and "sdot-emulated" beside the host's); any other is an :class:`IsaError`."""
    isa = isa or host_isa()
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa not in host_choice().cpu.runnable():
        raise IsaError(f"the {isa} kernels cannot run on this CPU (it runs {', '.join(host_choice().cpu.runnable())})")
    with _lock:
        if isa not in _compiled:
            try:
                _compiled[isa] = _compile(isa)[0]
            except Exception:   # no usable LLVM target: the numba float kernels remain
                _compiled[isa] = {}
        return _compiled[isa]


def forms(isa: str | None = None) -> str:
    """What ``isa``'s compiled module multiplies with (``info --cpu``): e.g. "vpdpbusd (VNNI),
    packed Q4_K's 8-row pass in 512-bit registers"; compiles the module if it is not yet."""
    isa = isa or host_isa()
    if not kernels(isa):
        return "none (LLVM cannot build the kernels here)"
    vnni, zmm = _variant[isa]
    if vnni:
        return "vpdpbusd (VNNI)" + (", packed Q4_K's 8-row pass in 512-bit registers" if zmm else "")
    return {"avx2": "vpmaddubsw/vpmaddwd", "sdot": "sdot"}.get(isa, "plain IR")


def uses_zmm(isa: str | None = None) -> bool:
    """Whether ``isa``'s compiled module runs packed Q4_K's 8-row pass in 512-bit registers (see
    :data:`ZMM_ENV`)."""
    isa = isa or host_isa()
    return bool(kernels(isa)) and _variant[isa][1]


def dots_address(isa: str | None = None) -> int:
    """Address of the float dot-product kernel of ``isa``'s module (:data:`_DOTS_IR`; ops passes
    it to :func:`rosenblatt.cpu.ops.attention_decode`), 0 where LLVM cannot build the module here."""
    isa = isa or host_isa()
    kernels(isa)
    return _dots.get(isa, 0)


def _compile(isa: str) -> tuple[dict, "_ObjectCache"]:
    """Build the kernel module for ``isa``: its functions, and the object cache it went through."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    _disable_machine_scheduler(llvm)
    cpu, features = llvm.get_host_cpu_name(), target_features(isa, llvm.get_host_cpu_features().flatten())
    flags = set(features.split(","))
    vnni = isa == "avx2" and ("+avxvnni" in flags or {"+avx512vnni", "+avx512vl"} <= flags)
    zmm = vnni and _zmm_choice(flags, cpu)
    ir_text = module_ir(isa, vnni, zmm)
    if not llvm.get_default_triple().startswith(("aarch64", "arm64")) and "+fma" not in features.split(","):
        # no fused multiply-add here (pre-Haswell x86): an fma would be a libm call per block;
        # these results then round differently from every other machine's
        ir_text = ir_text.replace("@llvm.fma.", "@llvm.fmuladd.")
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    target = llvm.Target.from_default_triple()
    tm = target.create_target_machine(cpu=cpu, features=features, opt=3)
    engine = llvm.create_mcjit_compiler(mod, tm)
    cache = _ObjectCache("\n".join([ir_text, repr(llvm.llvm_version_info), target.triple, cpu, features,
                                    "opt=3 -enable-misched=false"]))
    engine.set_object_cache(cache.store, cache.load)
    engine.finalize_object()
    _engines.append(engine)
    _variant[isa] = (vnni, zmm)
    multi = "mmw" if isa in WIDE else f"mm{ROWS}"
    fns = {qt: (_FN(engine.get_function_address(f"mm1_{n}")), _FN(engine.get_function_address(f"{multi}_{n}")))
           for qt, (n, _, _, _) in _KERNELS.items()}
    if isa in _PACKED_MODULES:    # ("packed", type): the kernels of rows in :func:`pack`'s layout
        fns.update({("packed", qt): (_FN(engine.get_function_address(f"px1_{_PACKED_KERNELS[qt][0]}")),
                                     _FN(engine.get_function_address(f"pxw_{_PACKED_KERNELS[qt][0]}")))
                    for qt in packed_types(isa, vnni)})
    _dots[isa] = engine.get_function_address("dots_f32")
    return fns, cache
