"""rosenblatt.cpu.isa: the kernel ISA from the operating system's report, forced ISAs, and the sdot
module compiling whatever LLVM calls the CPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from rosenblatt.cpu import isa
from rosenblatt import cpu as simd

from support import FIXTURES

CPUINFO = FIXTURES / "cpuinfo"
X86_FLAGS = "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni\n"


def test_rk3588_cpuinfo_gives_sdot_and_an_a72_the_portable_kernels():
    rk = isa.cpuinfo_features((CPUINFO / "rk3588.txt").read_text(), "aarch64")
    assert {"asimd", "asimddp", "atomics"} <= rk
    assert isa.choose(isa.CpuInfo("aarch64", rk, "test")).isa == "sdot"
    a72 = isa.cpuinfo_features((CPUINFO / "cortex-a72.txt").read_text(), "aarch64")
    assert "asimd" in a72 and "asimddp" not in a72
    choice = isa.choose(isa.CpuInfo("aarch64", a72, "test"))
    assert choice.isa == "portable" and "no asimddp" in choice.reason


def test_x86_flags_and_vnni_are_read():
    feats = isa.cpuinfo_features(X86_FLAGS, "x86_64")
    assert {"avx2", "avx512_vnni"} <= feats
    assert isa.choose(isa.CpuInfo("x86_64", feats, "test")).isa == "avx2"
    no_avx2 = isa.cpuinfo_features(X86_FLAGS.replace(" avx2", ""), "x86_64")
    assert isa.choose(isa.CpuInfo("x86_64", no_avx2, "test")).isa == "portable"


def test_hwcap_bits_are_the_kernels():
    """arch/arm64/include/uapi/asm/hwcap.h: HWCAP_ASIMDDP is bit 20, HWCAP2_I8MM bit 13; the
    A76 under qemu reports AT_HWCAP 0x119ffb (measured in the lane)."""
    assert isa.hwcap_features(1 << 20, 0) == {"asimddp"}
    assert isa.hwcap_features(0, 1 << 13) == {"i8mm"}
    assert {"asimd", "atomics", "asimddp"} <= isa.hwcap_features(0x119FFB, 0)
    assert "asimddp" not in isa.hwcap_features(0x119FFB & ~(1 << 20), 0)


def test_forcing_an_isa():
    x86 = isa.CpuInfo("x86_64", frozenset({"avx2"}), "test")
    assert isa.choose(x86, "portable").isa == "portable"
    assert isa.choose(x86, "sdot-emulated").reason == "forced by ROSENBLATT_ISA"
    with pytest.raises(isa.IsaError, match="ROSENBLATT_ISA=sdot: this CPU .* cannot run it"):
        isa.choose(x86, "sdot")
    with pytest.raises(isa.IsaError, match="not a kernel ISA"):
        isa.choose(x86, "neon")


def _expected_host_isa() -> str:
    """What this machine must get, from an independent reading of /proc/cpuinfo (or what the
    A76 lane says it emulates)."""
    if os.environ.get("ROSENBLATT_EXPECT_ISA"):
        return os.environ["ROSENBLATT_EXPECT_ISA"]
    text = open("/proc/cpuinfo").read()
    words = set(text.split())
    if platform.machine() == "x86_64":
        return "avx2" if "avx2" in words else "portable"
    return "sdot" if "asimddp" in words else "portable"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo")
def test_host_isa_is_what_the_cpu_offers():
    assert simd.host_isa() == _expected_host_isa()
    # and those are the kernels the engine uses
    assert simd.kernels() is simd.kernels(_expected_host_isa())


def test_an_isa_the_cpu_lacks_is_an_error_not_sigill():
    other = "sdot" if platform.machine() == "x86_64" else "avx2"
    with pytest.raises(isa.IsaError, match=f"the {other} kernels cannot run on this CPU"):
        simd.kernels(other)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cli_prints_the_choice_and_refuses_a_bad_forced_isa():
    ok = subprocess.run([sys.executable, "-m", "rosenblatt", "info", "--cpu"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"kernel isa     {_expected_host_isa()}: " in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rosenblatt", "info", "--cpu"], capture_output=True, text=True,
                         env={**os.environ, "ROSENBLATT_ISA": "avx512"}, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "ROSENBLATT_ISA=avx512: not a kernel ISA" in bad.stderr


def test_forced_portable_is_used_by_the_engine():
    r = _run("""
        from rosenblatt import cpu as simd
        print(simd.host_isa(), simd.kernels() is simd.kernels("portable"))
    """, ROSENBLATT_ISA="portable")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["portable", "True"]


def test_sdot_module_compiles_for_a_generic_aarch64_cpu():
    """With LLVM's CPU name 'generic' the sdot intrinsic has no instruction unless the module is
    compiled with +dotprod; LLVM then aborts the process (uncatchable), so this runs in a child."""
    r = _run("""
        import llvmlite.binding as llvm
        from rosenblatt.cpu import isa
        from rosenblatt import cpu as simd
        llvm.initialize_all_targets(); llvm.initialize_all_asmprinters()
        triple = "aarch64-unknown-linux-gnu"
        tm = llvm.Target.from_triple(triple).create_target_machine(
            cpu="generic", features=isa.target_features("sdot", "+neon"), opt=3)
        m = llvm.parse_assembly(simd.module_ir("sdot")); m.triple = triple
        print(tm.emit_assembly(m).count("sdot\\t"))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) >= 16
