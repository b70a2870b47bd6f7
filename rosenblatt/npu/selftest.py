"""``probe --selftest``: the board's experiment on the disputed register settings.

The public sources disagree on a few settings of the int8 GEMM program (docs/npu-reference.md
§10, §11; ``hw_assumptions``): op-enable 0x1D with DPU_RDMA programmed (reads off) or 0x0D
without it, exact or +1 data banks, M = 1 as one row or padded to 4, CORE.MISC_CFG.QD_EN 0 or 1,
weights streamed through one task or split into tasks whose weights fit, WEIGHT_REUSE on the later
tasks of a job or every task loading its weights (this group and ``data_banks``/``op_enable``/
``qd_en`` are what the former ``probe --explore`` switched). Each *variant* runs the
hardware recipe (mtx512's int8 GEMM, as ``regcmd`` builds it) with one setting switched, on a
small GEMM chosen to exercise that setting, on a fresh device (a new fd: its own IOMMU domain and
BOs), with a bounded wait, and compares every output element bit-exactly with numpy's
int8 -> int32 GEMM.

Status per variant: ``pass``; ``mismatch`` (first differing element in the details);
``timeout`` (PREP_BO ran out, or returned 0 but the output BO still holds the sentinel the
self-test wrote into it: the job never wrote its output); ``refused`` (the simulator named a
fault, e.g. ``register-unwritten``); ``error`` (any other NPU or program-building error).

A hung job cannot hang the process: PREP_BO is given an absolute deadline
(``device.estimate_job_timeout``: every job is either done or reset by the kernel within
JOB_TIMEOUT_S). On the board the kernel's scheduler times the job out after 500 ms, logs
"NPU job timed out", asserts the core's ``srst_a``/``srst_h`` resets for 10 µs and restarts the
scheduler (docs/npu-reference.md §1.4); userspace sees only PREP_BO's -ETIMEDOUT or a fence that
signalled without output, which the sentinel catches. The next variant opens a new fd.

From the results, per group of variants the first *candidate* that passed (the project's
default is listed first) is chosen; on hardware the choice is stored per board (device-tree
compatible) in the variant file that ``hw_assumptions`` applies at import.
"""

from __future__ import annotations

import contextlib
import datetime
import json as _json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import hw_assumptions as hw
from . import registers as R
from .errors import NPUError, NPUJobError, NPUUnavailableError

EXIT_OK, EXIT_FAILED, EXIT_NO_DEVICE = 0, 1, 2
SENTINEL_BYTE = 0xA5
SENTINEL_INT32 = np.frombuffer(bytes([SENTINEL_BYTE]) * 4, dtype="<i4")[0]
REPORT_NAME = "npu-selftest-{mode}.json"


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    settings: dict  # switched hw_assumptions names (the other disputed settings keep their defaults)
    shape: tuple  # (M, K, N)
    exercises: str
    sim_expect: str = "pass"  # what the simulator does with it: "pass" or "refused:<fault code>"
    patch: str | None = None  # a word-level change the settings cannot express (see PATCHES)
    candidate: bool = True  # may be chosen for the engine

    def full_settings(self) -> dict:
        return {**hw.DEFAULTS, **self.settings}


def _rdma(on: bool) -> dict:
    return {"PROGRAM_DPU_RDMA": on, "OP_ENABLE_MASK": 0x1D if on else 0x0D}


#: In each group the project's default comes first: it is chosen whenever it passes.
VARIANTS = [
    Variant("op-enable-0x1D", "op_enable", _rdma(True), (8, 256, 64),
            "Mesa/G: DPU_RDMA programmed with every read disabled, op-enable CNA+CORE+DPU+DPU_RDMA (default)"),
    Variant("op-enable-0x0D", "op_enable", _rdma(False), (8, 256, 64),
            "mtx512/allbilly: no DPU_RDMA writes, op-enable CNA+CORE+DPU (G: times out on mainline)"),
    Variant("op-enable-0x1D-rdma-unprogrammed", "op_enable", {"PROGRAM_DPU_RDMA": False, "OP_ENABLE_MASK": 0x1D},
            (8, 256, 64), "control: DPU_RDMA enabled but not programmed (runs on stale/reset registers)",
            sim_expect="refused:register-unwritten", candidate=False),
    Variant("data-banks+1", "data_banks", {"DATA_BANK_MARGIN": 1}, (320, 1024, 64),
            "G: one spare data bank (11 for a 10-bank input) (default)"),
    Variant("data-banks-exact", "data_banks", {"DATA_BANK_MARGIN": 0}, (320, 1024, 64),
            "mtx512: the input fills its 10 data banks exactly (G: corrupted tail rows)"),
    Variant("data-banks-by-bytes", "data_banks", {"DATA_BANK_MARGIN": 0}, (512, 32, 64),
            "control: mtx512's ceil(M*K/32 KiB) = 1 data bank where Mesa's entry estimate needs 2",
            sim_expect="refused:cbuf-overflow", patch="data_banks_by_bytes", candidate=False),
    Variant("m1-padded-to-4", "rows", {"ROW_ALIGN": 4}, (1, 512, 64),
            "G: M = 1 padded to 4 rows (default)"),
    Variant("m1-one-row", "rows", {"ROW_ALIGN": 1}, (1, 512, 64),
            "mtx512: M = 1 as one row, SURF_STRIDE -3, FEATURE_GRAINS 2 (G: broken on rocket; the simulator "
            "follows the TRM's kernel_h + stride_y + 1 = 3 minimum)", sim_expect="refused:field-range", candidate=False),
    Variant("qd-en-1", "qd_en", {"CORE_QD_EN": 1}, (8, 256, 64), "mtx512/G: CORE.MISC_CFG.QD_EN = 1 (default)"),
    Variant("qd-en-0", "qd_en", {"CORE_QD_EN": 0}, (8, 256, 64), "Mesa/reference §4.7: QD_EN = 0"),
    Variant("weights-streamed-one-task", "weights", {"STREAM_WEIGHTS": True}, (32, 1024, 1024),
            "mtx512: 1 MiB of weights streamed through one task's weight banks (default)"),
    Variant("weights-split-resident", "weights", {"STREAM_WEIGHTS": False}, (32, 1024, 1024),
            "Mesa-style: N split into tasks whose weights fit their banks whole"),
    Variant("weight-reuse-on", "weight_reuse", {"WEIGHT_REUSE_WITHIN_JOB": True}, (1040, 64, 64),
            "Mesa: three row tiles in one job, the later two with WEIGHT_REUSE on the resident weights (default)"),
    Variant("weight-reuse-off", "weight_reuse", {"WEIGHT_REUSE_WITHIN_JOB": False}, (1040, 64, 64),
            "every task loads its weights again (no WEIGHT_REUSE)"),
]


def _patch_data_banks_by_bytes(words: np.ndarray, task) -> np.ndarray:
    """CBUF_CON0 with DATA_BANK = ceil(rows*K / 32 KiB) (mtx512's count), the rest to the weights."""
    words = np.array(words, dtype=np.uint64)
    want = R.write(R.CNA_CBUF_CON0, 0)
    hits = [i for i, w in enumerate(words) if int(w) & 0xFFFF_0000_0000_FFFF == want]
    if len(hits) != 1:
        raise ValueError("CBUF_CON0 not found once in the task program")
    i = hits[0]
    old = (int(words[i]) >> 16) & 0xFFFF_FFFF
    data = max(1, -(-task.mt * task.kt // hw.CBUF_BANK_BYTES))
    new = R.CNA_CBUF_CON0.pack(WEIGHT_REUSE=R.CNA_CBUF_CON0.get(old, "WEIGHT_REUSE"),
                               WEIGHT_BANK=hw.CBUF_BANKS - data, DATA_BANK=data)
    words[i] = R.write(R.CNA_CBUF_CON0, new)
    return words


def _banks(words) -> tuple[int, int]:
    """(DATA_BANK, WEIGHT_BANK) of a task program's CBUF_CON0 write."""
    want = R.write(R.CNA_CBUF_CON0, 0)
    for w in words:
        if int(w) & 0xFFFF_0000_0000_FFFF == want:
            v = (int(w) >> 16) & 0xFFFF_FFFF
            return R.CNA_CBUF_CON0.get(v, "DATA_BANK"), R.CNA_CBUF_CON0.get(v, "WEIGHT_BANK")
    return (0, 0)


PATCHES = {"data_banks_by_bytes": _patch_data_banks_by_bytes}


@contextlib.contextmanager
def _settings(settings: dict):
    from .probe import assumptions

    with assumptions(**settings):
        yield


def run_variant(variant: Variant, open_dev, *, timeout_s: float | None = None, seed: int = 2024) -> dict:
    """Run one variant on a fresh device from ``open_dev()``; never raises an NPUError (the
    status says what happened) except NPUUnavailableError when there is no device at all."""
    from .device import estimate_job_timeout
    from .gemm import GemmRun, PreparedWeights

    M, K, N = variant.shape
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    entry = {"name": variant.name, "group": variant.group, "settings": variant.full_settings(),
             "switched": dict(variant.settings), "shape": [M, K, N], "exercises": variant.exercises,
             "patch": variant.patch, "candidate": variant.candidate, "sim_expect": variant.sim_expect}
    details: dict = {}
    status = "error"
    t0 = time.perf_counter()
    with _settings(variant.full_settings()):
        dev = open_dev()
        try:
            w = PreparedWeights(dev, b)
            run = GemmRun(dev, a, w)
            plan = run.plan
            details.update(tasks=plan.task_count, jobs=plan.job_count, regcmd_words=int(run.task_words[0].size),
                           weight_reuse_tasks=sum(bool(t.weight_reuse) for t in plan.tasks))
            if variant.patch:
                run.task_words = [PATCHES[variant.patch](wd, t) for wd, t in zip(run.task_words, plan.tasks)]
                details["patched"] = variant.patch
            details["banks"] = [list(x) for x in sorted({_banks(wd) for wd in run.task_words})]  # as submitted
            # a sentinel in the output BO shows a job that "completed" without writing anything
            run.output.write(np.full(plan.output_bytes, SENTINEL_BYTE, dtype=np.uint8))
            run.output.sync_for_device()
            wait_s = timeout_s if timeout_s is not None else estimate_job_timeout(plan.job_count, plan.estimated_seconds)
            details["wait_s"] = wait_s
            run.submit()
            try:
                run.wait(wait_s)
            except NPUJobError as e:
                if e.faults and dev.is_simulated:
                    status, details["fault"] = "refused", e.code
                else:
                    status = "timeout"
                details["error"] = str(e)
            else:
                c = run.result()
                raw = run.output.read(np.int32, plan.output_bytes // 4)
                unwritten = int(np.count_nonzero(raw == SENTINEL_INT32))
                ref = a.astype(np.int32) @ b.astype(np.int32)
                diff = np.argwhere(c != ref)
                if unwritten == raw.size:
                    status = "timeout"
                    details["error"] = ("PREP_BO returned 0 but the job never wrote its output (the kernel's "
                                        "500 ms job timeout signalled the fence; see dmesg)")
                elif diff.size:
                    i, j = (int(x) for x in diff[0])
                    status = "mismatch"
                    details.update(mismatches=int(diff.shape[0]), unwritten_words=unwritten,
                                   first_difference={"row": i, "col": j, "npu": int(c[i, j]),
                                                     "expected": int(ref[i, j])},
                                   bad_rows=sorted({int(r) for r in diff[:, 0]})[:16])
                else:
                    status = "pass"
        except NPUUnavailableError:
            raise
        except (NPUError, ValueError, OverflowError) as e:
            status, details["error"] = "error", f"{type(e).__name__}: {e}"
        finally:
            try:
                dev.close()
            except NPUError:
                pass
    details["seconds"] = round(time.perf_counter() - t0, 4)
    entry.update(status=status, details=details)
    return entry


def choose(results: list[dict]) -> dict:
    """Per group, the first candidate that passed; groups without one are 'unsettled' (their
    defaults stay). Returns {"settings", "chosen", "unsettled"}."""
    settings, chosen, unsettled = {}, {}, []
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        win = next((r for r in rs if r["candidate"] and r["status"] == "pass"), None)
        if win is None:
            unsettled.append(group)
            continue
        chosen[group] = win["name"]
        settings.update(win["switched"])
    return {"settings": settings, "chosen": chosen, "unsettled": unsettled}


def store_choice(choice: dict, key: str, path: str, *, report_path: str | None = None) -> None:
    """Write ``choice`` for board ``key`` into the variant file (other boards' entries kept)."""
    data: dict = {"version": 1, "boards": {}}
    try:
        with open(path, encoding="utf-8") as f:
            old = _json.load(f)
        if isinstance(old, dict) and isinstance(old.get("boards"), dict):
            data["boards"] = old["boards"]
    except (OSError, ValueError):
        pass
    data["boards"][key] = {
        "settings": hw.check_settings(choice["settings"]), "chosen": choice["chosen"],
        "unsettled": choice["unsettled"], "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "report": report_path,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        _json.dump(data, f, indent=2)
    os.replace(tmp, path)


def default_report_path(sim: bool) -> str:
    return os.path.join(hw.cache_dir(), REPORT_NAME.format(mode="sim" if sim else "board"))


def run_selftest(sim: bool = False, *, variants=None, open_dev=None, timeout_s: float | None = None,
                 store: bool | None = None, board: str | None = None) -> tuple[dict, int]:
    """Run every variant; returns (report, exit code). ``store`` (default: on hardware only) writes
    the choice into the variant file for ``board`` (default: the DT compatible)."""
    from . import open_device

    variants = VARIANTS if variants is None else variants
    open_dev = open_dev or (lambda: open_device(sim=sim))
    report: dict = {"mode": "simulator" if sim else "hardware", "kernel": platform.release(),
                    "board": board or hw.board_key(), "defaults": dict(hw.DEFAULTS),
                    "applied_variant": hw.APPLIED_VARIANT, "variants": []}
    try:
        for v in variants:
            r = run_variant(v, open_dev, timeout_s=timeout_s)
            expected = v.sim_expect == ("pass" if r["status"] == "pass" else
                                        f"refused:{r['details'].get('fault')}" if r["status"] == "refused" else None)
            r["matches_sim_expect"] = expected
            report["variants"].append(r)
    except NPUUnavailableError as e:
        report["error"] = str(e)
        report["verdict"] = f"no RK3588 NPU here: {e} (--sim runs the self-test against the simulator)"
        return report, EXIT_NO_DEVICE
    choice = choose(report["variants"])
    report["choice"] = choice
    if sim:
        bad = [r["name"] for r in report["variants"] if not r["matches_sim_expect"]]
        code = EXIT_FAILED if bad else EXIT_OK
        report["verdict"] = (f"simulator: {', '.join(bad)} not as expected" if bad else
                             "simulator: every variant passed or was refused as expected")
    else:
        code = EXIT_FAILED if choice["unsettled"] else EXIT_OK
        report["verdict"] = (f"no passing variant for {', '.join(choice['unsettled'])}" if choice["unsettled"]
                             else "a passing variant for every disputed setting")
    if store is None:
        store = not sim
    report["stored"] = None
    if store:
        key = report["board"]
        path = hw.variant_file()
        if key and path:
            store_choice(choice, key, path)
            report["stored"] = {"path": path, "board": key}
    return report, code


def _format_table(report: dict) -> str:
    lines = [f"npu self-test ({report['mode']}, board {report['board'] or 'unknown'})",
             f"  {'variant':<34} {'shape':<16} {'status':<9} {'sim':<28} {'tasks':>5} {'time':>7}  details"]
    for r in report["variants"]:
        d = r["details"]
        shape = "x".join(str(x) for x in r["shape"])
        extra = ""
        if r["status"] == "mismatch":
            fd = d["first_difference"]
            extra = f"{d['mismatches']} differ; first C[{fd['row']},{fd['col']}] = {fd['npu']}, expected {fd['expected']}"
        elif "fault" in d:
            extra = f"fault {d['fault']}"
        elif "error" in d:
            extra = d["error"][:100]
        sim = r["sim_expect"] + ("" if report["mode"] != "simulator" else " ok" if r["matches_sim_expect"] else " UNEXPECTED")
        lines.append(f"  {r['name']:<34} {shape:<16} {r['status']:<9} {sim:<28} {d.get('tasks', '-'):>5} "
                     f"{d.get('seconds', 0):>6.3f}s  {extra}")
    ch = report.get("choice")
    if ch:
        lines.append("  chosen: " + (", ".join(f"{g}={n}" for g, n in ch["chosen"].items()) or "nothing")
                     + (f"; unsettled: {', '.join(ch['unsettled'])}" if ch["unsettled"] else ""))
        lines.append(f"  settings: {ch['settings']}")
    st = report.get("stored")
    lines.append(f"  stored: {st['path']} [{st['board']}]" if st else
                 "  stored: no (simulator run, or no board key / variant file disabled)")
    lines.append(f"  verdict: {report['verdict']}")
    return "\n".join(lines)


def main_selftest(sim: bool = False, json: bool = False, report_path: str | None = None, out=None, **kw) -> int:
    """The CLI entry: run, write the JSON report to ``report_path`` (default under the cache dir),
    print the table (or the JSON with ``json``), return the exit code."""
    out = out or sys.stdout
    report, code = run_selftest(sim=sim, **kw)
    report["exit_code"] = code
    path = report_path or default_report_path(sim)
    report["report_path"] = path
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            _json.dump(report, f, indent=2, default=str)
    except OSError as e:
        report["report_path"] = None
        report["report_error"] = f"could not write {path}: {e.strerror}"
    if json:
        print(_json.dumps(report, indent=2, default=str), file=out)
    else:
        print(_format_table(report), file=out)
        print(f"  report: {report['report_path'] or report['report_error']}", file=out)
    return code


__all__ = ["VARIANTS", "Variant", "choose", "main_selftest", "run_selftest", "run_variant", "store_choice"]
