"""``npu-probe``: is the RK3588 NPU usable here through mainline ``rocket``, and does it compute
INT8 GEMMs bit-exactly?

Sections: kernel and module state, ``/dev/accel`` nodes and their DRM_IOCTL_VERSION, device-tree
NPU cores and their status, NPU clock / power-domain / runtime-PM state where sysfs or debugfs
shows it, a self-test of int8 GEMMs chosen to exercise every assumption of ``hw_assumptions``
(compared bit-exactly with numpy, first differing element printed), and a micro-benchmark
(GOP/s, per-submit latency). Which of the disputed assumptions the board needs (spare data
bank, weight reuse, DPU_RDMA programming, QD_EN, ...) is ``--selftest``'s experiment
(``rosenblatt.npu.selftest``); the former ``--explore`` is a deprecated alias of it.

Exit codes: 0 all good, 1 self-test mismatch, 2 no device or driver, 3 device error/timeout.
``--selftest`` runs ``rosenblatt.npu.selftest`` (variants of the disputed settings) instead.
"""

from __future__ import annotations

import contextlib
import glob
import json as _json
import os
import platform
import sys
import time

import numpy as np

from . import hw_assumptions as hw
from . import plan as _plan
from .errors import NPUDeviceError, NPUError, NPUJobError, NPUUnavailableError

EXIT_OK, EXIT_MISMATCH, EXIT_NO_DEVICE, EXIT_DEVICE_ERROR = 0, 1, 2, 3
DT_COMPATIBLE = "rockchip,rk3588-rknn-core"

#: (M, K, N, what it exercises)
SELF_TEST_SHAPES = [
    (4, 32, 32, "one task, one job"),
    (1, 1536, 256, "M=1 padded to ROW_ALIGN rows"),
    (7, 100, 33, "M, K, N all padded (K to 32, N to a 32-kernel group)"),
    (64, 1536, 1536, "one task streaming 3 MB of weights through its weight banks (one group resident)"),
    (1040, 64, 64, "three row tiles sharing resident weights (WEIGHT_REUSE)"),
    (128, 1536, 256, "bank split near the CBUF limit (DATA_BANK_MARGIN)"),
    (16, 8960, 256, "three K tiles summed on the CPU; 3008-channel tasks"),
    (512, 32, 96, "512 rows per task (MAX_ROWS_PER_TASK, FEATURE_GRAINS)"),
]

def _read(path: str, limit: int = 1 << 16) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return None


def system_info() -> dict:
    modules = _read("/proc/modules") or ""
    loaded_module = any(line.split(" ", 1)[0] == "rocket" for line in modules.splitlines())
    sys_module = os.path.isdir("/sys/module/rocket")
    bound = sorted(os.path.basename(p) for p in glob.glob("/sys/bus/platform/drivers/rocket/*")
                   if os.path.islink(p) and ":" not in os.path.basename(p) and "." in os.path.basename(p))
    return {
        "kernel": platform.release(),
        "kernel_ok": _kernel_at_least(platform.release(), (6, 18)),
        "machine": platform.machine(),
        "rocket_module_loaded": loaded_module,
        "rocket_in_sys_module": sys_module,  # also true when built in
        "rocket_bound_devices": bound,
    }


def _kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= want


def accel_nodes() -> list[dict]:
    from .device import KernelTransport, RocketDevice

    nodes = []
    for path in sorted(glob.glob("/dev/accel/accel*")):
        entry = {"path": path}
        name = os.path.basename(path)
        drv = os.path.realpath(f"/sys/class/accel/{name}/device/driver")
        entry["sysfs_driver"] = os.path.basename(drv) if os.path.exists(drv) else None
        try:
            dev = RocketDevice(KernelTransport(path), check_driver=False)
            entry["version"] = dev.version
            dev.close()
        except OSError as e:
            entry["error"] = f"open failed: {e.strerror}"
        except NPUError as e:
            entry["error"] = str(e)
        nodes.append(entry)
    return nodes


def device_tree_cores() -> list[dict]:
    roots = [r for r in ("/proc/device-tree", "/sys/firmware/devicetree/base") if os.path.isdir(r)]
    cores = []
    if not roots:
        return cores
    for dirpath, dirnames, filenames in os.walk(roots[0]):
        if "compatible" not in filenames:
            continue
        compat = (_read(os.path.join(dirpath, "compatible")) or "").split("\0")
        if DT_COMPATIBLE in compat:
            status = (_read(os.path.join(dirpath, "status")) or "okay").strip("\0\n")
            cores.append({"node": dirpath[len(roots[0]):] or "/", "status": status})
        if len(cores) > 8:
            break
    return cores


def clocks_and_power() -> dict:
    out: dict = {}
    clk = _read("/sys/kernel/debug/clk/clk_summary", 1 << 20)
    if clk is not None:
        out["clk_summary_npu"] = [line.strip() for line in clk.splitlines() if "npu" in line.lower()][:20]
    else:
        out["clk_summary_npu"] = "unavailable (needs root and debugfs)"
    pd = _read("/sys/kernel/debug/pm_genpd/pm_genpd_summary", 1 << 20)
    if pd is not None:
        out["power_domains_npu"] = [line.strip() for line in pd.splitlines() if "npu" in line.lower()][:20]
    else:
        out["power_domains_npu"] = "unavailable (needs root and debugfs)"
    rpm = {}
    for p in glob.glob("/sys/bus/platform/devices/*npu*/power/runtime_status"):
        rpm[p.split("/")[5]] = (_read(p) or "").strip()
    out["runtime_pm"] = rpm
    return out


@contextlib.contextmanager
def assumptions(**overrides):
    """Temporarily switch ``hw_assumptions`` values (and drop the cached plans)."""
    saved = {k: getattr(hw, k) for k in overrides}
    try:
        for k, v in overrides.items():
            setattr(hw, k, v)
        _plan.plan_k_tiling.cache_clear()
        _plan.plan_gemm.cache_clear()
        yield
    finally:
        for k, v in saved.items():
            setattr(hw, k, v)
        _plan.plan_k_tiling.cache_clear()
        _plan.plan_gemm.cache_clear()


def self_test(dev, shapes=SELF_TEST_SHAPES, seed: int = 1234) -> dict:
    from .gemm import matmul_int8

    rng = np.random.default_rng(seed)
    results, status = [], "ok"
    for M, K, N, what in shapes:
        a = rng.integers(-128, 128, (M, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, N), dtype=np.int8)
        entry = {"shape": [M, K, N], "exercises": what}
        t0 = time.perf_counter()
        try:
            c = matmul_int8(a, b, dev)
            seconds = time.perf_counter() - t0
        except NPUJobError as e:
            entry.update(result="timeout", error=str(e))
            status = "error"
            results.append(entry)
            continue
        except NPUError as e:
            entry.update(result="error", error=str(e))
            status = "error"
            results.append(entry)
            continue
        ref = a.astype(np.int32) @ b.astype(np.int32)
        entry.update(seconds=round(seconds, 4), tasks=dev.stats.last.tasks, jobs=dev.stats.last.jobs)
        diff = np.argwhere(c != ref)
        if diff.size:
            i, j = (int(x) for x in diff[0])
            entry.update(result="mismatch", mismatches=int(diff.shape[0]),
                         first_difference={"row": i, "col": j, "npu": int(c[i, j]), "expected": int(ref[i, j])})
            if status == "ok":
                status = "mismatch"
        else:
            entry["result"] = "ok"
        results.append(entry)
    return {"status": status, "cases": results}


def benchmark(dev, repeats: int = 3) -> dict:
    from .gemm import matmul_int8_prepared, prepare_weights

    rng = np.random.default_rng(7)
    M, K, N = 128, 1536, 1536
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    with prepare_weights(dev, b) as w:
        matmul_int8_prepared(a, w, dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            matmul_int8_prepared(a, w, dev)
        dt = (time.perf_counter() - t0) / repeats
        tasks, jobs = dev.stats.last.tasks, dev.stats.last.jobs
    small_b = rng.integers(-128, 128, (32, 32), dtype=np.int8)
    small_a = rng.integers(-128, 128, (4, 32), dtype=np.int8)
    with prepare_weights(dev, small_b) as w:
        matmul_int8_prepared(small_a, w, dev)
        lat = []
        for _ in range(max(5, repeats * 3)):
            t0 = time.perf_counter()
            matmul_int8_prepared(small_a, w, dev)
            lat.append(time.perf_counter() - t0)
    return {
        "gemm": [M, K, N], "tasks": tasks, "jobs": jobs,
        "seconds": round(dt, 5), "gops": round(2 * M * K * N / dt / 1e9, 3),
        "submit_latency_ms": {"min": round(min(lat) * 1e3, 3), "median": round(float(np.median(lat)) * 1e3, 3)},
        "model_peak_gops": round(2 * hw.NPU_CLOCK_HZ * hw.MACS_PER_CYCLE / 1e9, 1),
    }


def assumption_table() -> dict:
    names = ["CBUF_BANKS", "CBUF_BANK_BYTES", "DATA_BANK_MARGIN", "MAX_BYTES_PER_KERNEL", "WEIGHT_REUSE_WITHIN_JOB",
             "ROW_ALIGN", "MAX_ROWS_PER_TASK", "WEIGHT_KERNEL_GROUP", "WEIGHT_CHANNEL_CHUNK", "SIZE_E_INT32",
             "SURFACE_ADD_FACTOR_INT32", "PROGRAM_DPU_RDMA", "OP_ENABLE_MASK", "CORE_QD_EN", "NPU_CLOCK_HZ"]
    return {n: getattr(hw, n) for n in names}


def _collect(sim: bool, bench: bool) -> tuple[dict, int]:
    from . import open_device

    report: dict = {"mode": "simulator" if sim else "hardware", "system": system_info()}
    report["accel_nodes"] = accel_nodes()
    report["device_tree"] = device_tree_cores()
    report["clocks_power"] = clocks_and_power()
    report["assumptions"] = assumption_table()

    def open_dev():
        return open_device(sim=sim)

    try:
        dev = open_dev()
    except NPUUnavailableError as e:
        report["device"] = {"error": str(e)}
        report["verdict"] = (
            "no RK3588 NPU here: " + str(e)
            + ("" if report["system"]["rocket_in_sys_module"] else "; the rocket module is not loaded")
            + " (npu-probe --sim runs the probe against the simulator)"
        )
        return report, EXIT_NO_DEVICE
    except (NPUDeviceError, OSError) as e:
        report["device"] = {"error": str(e)}
        report["verdict"] = f"the NPU device failed to open: {e}"
        return report, EXIT_DEVICE_ERROR
    with dev:
        report["device"] = {"node": dev.transport.describe, "version": dev.version}
        st = self_test(dev)
        report["self_test"] = st
        if st["status"] == "ok" and bench:
            try:
                report["benchmark"] = benchmark(dev)
            except NPUError as e:
                report["benchmark"] = {"error": str(e)}
                st["status"] = "error"
    if st["status"] == "mismatch":
        code, verdict = EXIT_MISMATCH, "self-test MISMATCH: the NPU result differs from numpy"
    elif st["status"] != "ok":
        code, verdict = EXIT_DEVICE_ERROR, "device error or timeout during the self-test"
    else:
        code, verdict = EXIT_OK, "all good: int8 GEMMs are bit-exact"
    report["verdict"] = verdict
    return report, code


def _print_text(report: dict, out) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    s = report["system"]
    p(f"npu-probe ({report['mode']})")
    p(f"  kernel            {s['kernel']} ({s['machine']}){'' if s['kernel_ok'] else '  [rocket needs >= 6.18]'}")
    p(f"  rocket module     loaded={s['rocket_module_loaded']} /sys/module/rocket={s['rocket_in_sys_module']}"
      f" bound={', '.join(s['rocket_bound_devices']) or 'none'}")
    nodes = report["accel_nodes"]
    if not nodes:
        p("  /dev/accel        no accel nodes")
    for n in nodes:
        v = n.get("version")
        p(f"  {n['path']:<17} " + (f"driver {v['name']!r} ({v['desc']}) {v['major']}.{v['minor']}" if v else n.get("error", "?")))
    dt = report["device_tree"]
    p("  device tree       " + (", ".join(f"{c['node']} [{c['status']}]" for c in dt) or f"no {DT_COMPATIBLE} nodes"))
    cp = report["clocks_power"]
    for key in ("clk_summary_npu", "power_domains_npu"):
        val = cp[key]
        p(f"  {key:<17} " + (val if isinstance(val, str) else ("; ".join(val) or "no npu entries")))
    if cp["runtime_pm"]:
        p("  runtime PM        " + ", ".join(f"{k}={v}" for k, v in cp["runtime_pm"].items()))
    dev = report.get("device", {})
    p(f"  device            {dev.get('node', dev.get('error'))}")
    st = report.get("self_test")
    if st:
        p("  self-test:")
        for c in st["cases"]:
            M, K, N = c["shape"]
            line = f"    {M:>4} x {K:>5} x {N:>5}  {c['result']:<8}"
            if "tasks" in c:
                line += f" tasks={c['tasks']:<4} jobs={c['jobs']:<4} {c['seconds']:.3f}s"
            if c["result"] == "mismatch":
                fd = c["first_difference"]
                line += (f"  {c['mismatches']} elements differ; first C[{fd['row']},{fd['col']}] = {fd['npu']}"
                         f", expected {fd['expected']}")
            elif "error" in c:
                line += "  " + c["error"]
            p(line + f"   ({c['exercises']})")
    bm = report.get("benchmark")
    if bm and "gops" in bm:
        p(f"  benchmark         {bm['gemm'][0]}x{bm['gemm'][1]}x{bm['gemm'][2]}: {bm['gops']} GOP/s "
          f"({bm['seconds'] * 1e3:.2f} ms, {bm['tasks']} tasks / {bm['jobs']} jobs; model peak "
          f"{bm['model_peak_gops']} GOP/s); submit latency min {bm['submit_latency_ms']['min']} ms, "
          f"median {bm['submit_latency_ms']['median']} ms")
    p(f"  verdict           {report['verdict']}")


def run_probe(sim: bool = False, json: bool = False, *, bench: bool = True, out=None,
              check=None) -> int:
    """Run the probe, print a report (text or JSON) and return the exit code.

    ``check(report)``, if given, sees the finished report (its ``exit_code`` included) and returns
    ``(lines, exit_code)``: the lines are printed after the verdict (the JSON's ``"checks"``) and
    the exit code replaces the probe's (the CLI checks the board file's expectations this way)."""
    out = out or sys.stdout
    try:
        report, code = _collect(sim, bench)
    except NPUError as e:  # pragma: no cover - every expected error is caught in _collect
        report, code = {"verdict": f"device error: {e}"}, EXIT_DEVICE_ERROR
    report["exit_code"] = code
    if check is not None:
        report["checks"], code = check(report)
        report["exit_code"] = code
    if json:
        print(_json.dumps(report, indent=2, default=str), file=out)
    else:
        _print_text(report, out)
        for line in report.get("checks", ()):
            print(f"  {line}", file=out)
    return code


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="npu-probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", action="store_true", help="run everything against the register-level simulator")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--explore", action="store_true", help=argparse.SUPPRESS)  # deprecated: --selftest
    ap.add_argument("--no-bench", action="store_true", help="skip the micro-benchmark")
    ap.add_argument("--selftest", action="store_true",
                    help="run the disputed-settings variants instead (rosenblatt.npu.selftest; see docs/npu.md)")
    ap.add_argument("--report", metavar="PATH", help="with --selftest: where to write the JSON report")
    args = ap.parse_args(argv)
    if args.explore:
        print("npu-probe: --explore is deprecated and superseded by --selftest (the same switched "
              "assumptions as variants, and more); running --selftest", file=sys.stderr)
        args.selftest = True
    if args.selftest:
        from .selftest import main_selftest

        return main_selftest(sim=args.sim, json=args.json, report_path=args.report)
    return run_probe(sim=args.sim, json=args.json, bench=not args.no_bench)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
