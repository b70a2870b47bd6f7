"""Which instruction set the integer kernels are built for, decided from what the kernel says.

LLVM's own host detection is not enough: on Linux/AArch64 it maps only a few of
``/proc/cpuinfo``'s feature names (llvmlite 0.50's LLVM 22 reports a Cortex-A76 as
``+aes,+crc,+fp-armv8,+lse,+neon,+sha2`` and never ``+dotprod``), so the A76's ``sdot`` kernels
would never be chosen. The operating system's answer is used instead:

* Linux/AArch64: ``getauxval(AT_HWCAP)`` / ``AT_HWCAP2`` (the bits the kernel sets from the CPU's
  ID registers; ``HWCAP_ASIMDDP`` is the dot-product extension, ``HWCAP2_I8MM`` the int8 matrix
  multiply of later cores), else the ``Features`` line of ``/proc/cpuinfo`` (the same bits, by
  name). Bit positions: the kernel's ``arch/arm64/include/uapi/asm/hwcap.h``.
* x86: the ``flags`` line of ``/proc/cpuinfo`` (``avx2``, ``avx512_vnni``, ``avx_vnni``), else
  LLVM's host features (which are reliable there).

``ROSENBLATT_ISA`` forces an ISA (tests, bug reports); one this CPU cannot run is a clear
:class:`IsaError`, never an illegal instruction. ``python -m rosenblatt info --cpu`` prints the
choice and why.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

from ..errors import RosenblattError

#: every kernel flavour (see :mod:`rosenblatt.cpu`): the host's SIMD ones, the plain-IR one, and
#: the sdot kernels' structure with the dot product written in plain IR (runs anywhere)
ISAS = ("avx2", "sdot", "portable", "sdot-emulated")
ENV = "ROSENBLATT_ISA"

AT_HWCAP, AT_HWCAP2 = 16, 26
#: AArch64 hwcap bits -> the names /proc/cpuinfo gives them (the ones the kernels care about)
HWCAP_BITS = {1: "asimd", 8: "atomics", 20: "asimddp", 22: "sve"}
HWCAP2_BITS = {1: "sve2", 13: "i8mm", 14: "bf16"}
#: LLVM's x86 host-feature names -> /proc/cpuinfo's
_LLVM_X86 = {"avx2": "avx2", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx512bw": "avx512bw",
             "avx512f": "avx512f"}


class IsaError(RosenblattError):
    """A kernel ISA that cannot run on this CPU was asked for."""


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers, as the operating system reports it."""
    machine: str                # "aarch64", "x86_64", ...
    features: frozenset         # feature names as /proc/cpuinfo spells them
    source: str                 # where they were read

    @property
    def arch(self) -> str:
        m = self.machine.lower()
        if m in ("aarch64", "arm64"):
            return "aarch64"
        if m in ("x86_64", "amd64", "i686", "i386"):
            return "x86"
        return m

    def runnable(self) -> tuple[str, ...]:
        """The ISAs whose kernels this CPU can execute, best first."""
        best = []
        if self.arch == "x86" and "avx2" in self.features:
            best.append("avx2")
        if self.arch == "aarch64" and "asimddp" in self.features:
            best.append("sdot")
        return tuple(best) + ("portable", "sdot-emulated")


#: the features worth showing in a report (what the kernels use or could use)
NOTABLE = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "asimd", "atomics", "asimddp", "i8mm",
           "bf16", "sve", "sve2")


@dataclass(frozen=True)
class IsaChoice:
    isa: str
    reason: str
    cpu: CpuInfo

    def report(self) -> list[tuple[str, str]]:
        """(label, text) rows for ``info --cpu`` and bug reports."""
        import llvmlite.binding as llvm
        notable = [f for f in NOTABLE if f in self.cpu.features]
        return [("machine", self.cpu.machine),
                ("cpu features", f"{' '.join(notable) or 'none of note'} (from {self.cpu.source})"),
                ("llvm target", f"{llvm.get_host_cpu_name()}, LLVM {'.'.join(map(str, llvm.llvm_version_info))}"),
                ("kernel isa", f"{self.isa}: {self.reason}"),
                ("runnable isas", ", ".join(self.cpu.runnable()) + f" (force one with {ENV})")]


def cpuinfo_features(text: str, machine: str) -> frozenset:
    """Feature names of the first processor in a ``/proc/cpuinfo`` text (``Features`` on
    AArch64, ``flags`` on x86)."""
    key = "features" if machine.lower() in ("aarch64", "arm64") else "flags"
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == key:
            return frozenset(value.split())
    return frozenset()


def hwcap_features(hwcap: int, hwcap2: int) -> frozenset:
    """AArch64 ``AT_HWCAP``/``AT_HWCAP2`` words -> feature names."""
    return frozenset([n for b, n in HWCAP_BITS.items() if hwcap >> b & 1]
                     + [n for b, n in HWCAP2_BITS.items() if hwcap2 >> b & 1])


def _getauxval() -> tuple[int, int] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.getauxval
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hwcap, hwcap2 = fn(AT_HWCAP), fn(AT_HWCAP2)
    return (hwcap, hwcap2) if hwcap else None


def _read_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _llvm_features() -> frozenset:
    import llvmlite.binding as llvm
    flat = llvm.get_host_cpu_features().flatten().split(",")
    return frozenset(_LLVM_X86.get(f[1:], f[1:]) for f in flat if f.startswith("+"))


def detect_cpu(machine: str | None = None) -> CpuInfo:
    machine = machine or platform.machine()
    is_arm = machine.lower() in ("aarch64", "arm64")
    if is_arm and platform.system() == "Linux":
        aux = _getauxval()
        if aux is not None:
            return CpuInfo(machine, hwcap_features(*aux), "getauxval(AT_HWCAP, AT_HWCAP2)")
    text = _read_cpuinfo()
    feats = cpuinfo_features(text, machine) if text else frozenset()
    if feats:
        return CpuInfo(machine, feats, "/proc/cpuinfo")
    return CpuInfo(machine, _llvm_features(), "LLVM host features")


def choose(cpu: CpuInfo, forced: str | None = None) -> IsaChoice:
    """The ISA to build the kernels for: ``forced`` (``$ROSENBLATT_ISA``) if this CPU runs it,
    else the best it runs."""
    runnable = cpu.runnable()
    if forced:
        if forced not in ISAS:
            raise IsaError(f"{ENV}={forced}: not a kernel ISA (one of {', '.join(ISAS)})")
        if forced not in runnable:
            raise IsaError(f"{ENV}={forced}: this CPU ({cpu.machine}) cannot run it; it runs "
                           f"{', '.join(runnable)}")
        return IsaChoice(forced, f"forced by {ENV}", cpu)
    isa = runnable[0]
    why = {"avx2": "avx2 (vpmaddubsw/vpmaddwd)", "sdot": "asimddp (sdot)"}
    if isa in why:
        reason = f"{why[isa]} reported by {cpu.source}"
    else:
        wanted = "avx2" if cpu.arch == "x86" else "asimddp" if cpu.arch == "aarch64" else "a SIMD kernel set"
        reason = f"no {wanted} reported by {cpu.source}: plain LLVM IR kernels"
    return IsaChoice(isa, reason, cpu)


@lru_cache(maxsize=None)
def host_choice() -> IsaChoice:
    """This process's choice (read once; the environment variable is read then)."""
    return choose(detect_cpu(), os.environ.get(ENV) or None)


def target_features(isa: str, host_features: str) -> str:
    """LLVM target features to compile ``isa``'s module with: the host's, plus what the ISA's
    instructions need, so that no CPU name (``generic`` included) leaves them unselectable."""
    extra = {"sdot": "+neon,+dotprod", "avx2": "+avx2"}.get(isa)
    return ",".join(f for f in (host_features, extra) if f)
