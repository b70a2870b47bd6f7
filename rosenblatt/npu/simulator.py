"""A register-level simulator of the RK3588 NPU behind the rocket ioctl boundary.

``SimulatedNPU`` is the hardware (three cores, each with a register file and CBUF weight
residency); ``SimulatedNPU.open()`` gives a ``SimFile``, the counterpart of an open
``/dev/accel/accel0``: it takes the same ioctl request numbers and struct bytes as the kernel
and owns the fd's BOs and their NPU address space. ``RocketDevice`` drives it exactly as it
drives the kernel.

What it models (docs/npu-reference.md §1, §2, §9):

* Memory: per-fd BOs at page-aligned IOVAs (first fit from 0, as the driver's drm_mm does),
  fake mmap offsets, and two copies of each BO: the CPU's (what ``mmap`` shows) and the
  device's (what the NPU reads and writes). FINI_BO copies CPU -> device, PREP_BO copies device
  -> CPU (always, even on timeout, like ``dma_sync_sgtable_for_cpu``): a missing sync shows.
* SUBMIT as ``rocket_ioctl_submit``: struct sizes and ``reserved`` checked, job/task/handle
  arrays read *through the user pointers* (``ctypes.string_at``), per-job errors dropped
  silently (SUBMIT still returns 0; the simulator logs them). Each accepted job runs its tasks
  in order on one core, the way ``rocket_job_hw_submit`` kicks them: the kernel's MMIO writes
  go to the PC registers, the PC fetches ``2 * ((count + 1) / 2)`` words from the regcmd IOVA,
  register writes land in the core's register file, and the op-enable word runs
  CNA -> CORE -> DPU from the registers written by this task and the bytes in the BOs.
* Completion: a job's out-BO fence signals at a modelled time (task overhead + MACs at the
  DT's 200 MHz); PREP_BO honours the absolute CLOCK_MONOTONIC deadline (0 or past: -EBUSY,
  reached first: -ETIMEDOUT). A job that faults never signals: PREP_BO on its out BOs reports
  -ETIMEDOUT at once (the wait is compressed: the result would be the same after the
  deadline) and the fault is in the fd's log (``take_faults``).

What it refuses (fault codes): ``iova-unmapped`` (a regcmd, feature, weight or output access
outside the fd's BOs: an IOMMU fault), ``regcmd-misaligned``, ``regcmd-count``,
``no-op-enable``, ``op-marker``, ``no-dpu`` (no DPU in the op-enable mask: no interrupt),
``cbuf-banks`` (data + weight banks > 12 or zero), ``cbuf-overflow`` (the input does not fit
its data banks, one 32-kernel weight group does not fit the weight banks -- whole weights
larger than the banks stream through them (``hw.STREAM_WEIGHTS``) --, bytes/kernel > 32 KiB), ``unsupported-precision``, ``unsupported-mode``,
``field-range`` (bits outside a register's fields, zero sizes), ``inconsistent`` (registers
that disagree, e.g. DPU cube vs CORE output), ``register-unwritten`` (a register the task
relies on was not written in it), ``unknown-register``/``unknown-target``, ``trailing-words``,
``weight-reuse`` (WEIGHT_REUSE without those weights resident: other weights, none, or
streamed ones), ``dst-misaligned``,
``job-rejected`` (what the kernel itself drops: no tasks, regcmd_count 0, bad handle),
``bo-busy`` (FINI_BO of a BO that a job the CPU has not yet waited for reads or writes: the
kernel fences only out-BOs, so the CPU's new bytes race the NPU; the jobs in flight are then
treated as failed, ``hw.IN_BO_FENCES``).

Job order: one fd's jobs run one at a time in submit order (``hw.JOBS_RUN_IN_SUBMIT_ORDER``);
a job starts when the previous one of the fd has finished (which also covers its in-BOs' write
fences and its out-BOs' fences, all from this fd); PREP_BO that returns 0 tells the CPU that the
BO's last writer and every earlier job of the fd are done.

Arithmetic: int8 x int8 products summed in float64 BLAS. Every partial sum is an integer below
2**14 * 65536 < 2**53 in magnitude, so the float64 result is exact, and equal to the int32
accumulator of the MAC array (which it also cannot overflow).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import time
from dataclasses import dataclass

import numpy as np

from . import hw_assumptions as hw
from . import registers as R
from . import uapi

PAGE = 4096
#: DRM_FILE_PAGE_OFFSET_START on 64-bit: fake mmap offsets start above 4 GiB.
MMAP_OFFSET_START = 0x1_0000_0000
IOVA_LIMIT = 1 << 32
DRIVER_DESC = "rocket DRM"


@dataclass
class SimFault:
    code: str
    message: str
    job: int | None = None
    task: int | None = None

    def __str__(self) -> str:
        where = "" if self.job is None else f"job {self.job}" + ("" if self.task is None else f" task {self.task}")
        return f"[{self.code}] {where}: {self.message}" if where else f"[{self.code}] {self.message}"


class _Fault(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class SimBO:
    def __init__(self, handle: int, size: int, iova: int, offset: int):
        self.handle = handle
        self.size = size
        self.mapped = -(-size // PAGE) * PAGE
        self.iova = iova
        self.offset = offset
        self.cpu = np.zeros(self.mapped, dtype=np.uint8)  # what mmap() shows
        self.dev = np.zeros(self.mapped, dtype=np.uint8)  # what the NPU sees
        self.fence_ns = 0  # CLOCK_MONOTONIC time the last writing job completes
        self.dead = False  # a job writing it faulted: its fence never signals
        self.last_writer = -1  # seq of the last job that listed it as an out-BO
        self.last_user = -1  # seq of the last job whose tasks read or wrote its bytes


class SimCore:
    def __init__(self, index: int):
        self.index = index
        self.regs: dict[int, int] = {}
        self.cbuf_weights: tuple | None = None  # (key, matrix) of the resident weights

    def reset(self) -> None:
        """What rocket_core_reset does after a timeout: registers and CBUF are gone."""
        self.regs.clear()
        self.cbuf_weights = None


def _blas_limit(threads: int | None):
    """Context limiting BLAS threads while the simulator computes (OpenBLAS's own threads
    thrash on a small, shared machine); a no-op without ``threadpoolctl``."""
    if not threads:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


class SimulatedNPU:
    """The NPU: ``num_cores`` cores. ``timing`` scales the modelled run time after which a job's
    fence signals (1.0: the cost model at the DT clock; 0: at once; tests use large values to
    make a job visibly busy). ``blas_threads`` caps the BLAS threads of the simulator's
    arithmetic (None: no cap)."""

    def __init__(self, num_cores: int = 3, *, timing: float = 1.0, blas_threads: int | None = 1):
        self.cores = [SimCore(i) for i in range(num_cores)]
        self.timing = timing
        self.blas_threads = blas_threads
        self.tasks_run = 0

    def open(self) -> "SimFile":
        return SimFile(self)


class SimFile:
    """One open file of the simulated ``/dev/accel/accel0`` (the transport ``RocketDevice`` uses)."""

    kind = "simulator"
    describe = "simulated /dev/accel/accel0 (rocket uapi)"

    def __init__(self, npu: SimulatedNPU):
        self.npu = npu
        self.bos: dict[int, SimBO] = {}
        self._starts: list[int] = []  # sorted IOVA starts
        self._by_start: dict[int, SimBO] = {}
        self._by_offset: dict[int, SimBO] = {}
        self._next_handle = 1
        self._next_offset = MMAP_OFFSET_START
        self._busy_until = 0
        self._job_seq = 0
        self._running = -1  # seq of the job whose tasks are executing
        self._waited = -1  # every job up to this seq is known complete to the CPU (a PREP_BO returned 0)
        self._in_flight: list[tuple[int, list]] = []  # (seq, out BOs) of jobs not yet waited for
        self.faults: list[SimFault] = []
        self._pending: list[SimFault] = []
        self.closed = False
        # one scheduler entity per fd; the simulator keeps it on core 0 ([inferred] per-fd
        # serialisation, docs/npu-reference.md §1.4)
        self.core = npu.cores[0]

    # --- transport interface -------------------------------------------------------------------
    def ioctl(self, request: int, arg) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "file is closed")
        mv = memoryview(arg).cast("B")
        if uapi.ioc_type(request) != uapi.DRM_IOCTL_BASE or uapi.ioc_size(request) != mv.nbytes:
            raise OSError(errno.ENOTTY, "not a DRM ioctl of this size")
        handler = {
            uapi.DRM_IOCTL_VERSION: self._version,
            uapi.DRM_IOCTL_GEM_CLOSE: self._gem_close,
            uapi.DRM_IOCTL_ROCKET_CREATE_BO: self._create_bo,
            uapi.DRM_IOCTL_ROCKET_SUBMIT: self._submit,
            uapi.DRM_IOCTL_ROCKET_PREP_BO: self._prep_bo,
            uapi.DRM_IOCTL_ROCKET_FINI_BO: self._fini_bo,
        }.get(request)
        if handler is None:
            raise OSError(errno.EINVAL, "unknown DRM ioctl")
        handler(mv)

    def mmap(self, offset: int, size: int):
        bo = self._by_offset.get(offset)
        if bo is None or bo.handle not in self.bos:
            raise OSError(errno.EACCES, "no BO at that mmap offset")
        if size > bo.mapped:
            raise OSError(errno.EINVAL, "mapping larger than the BO")
        return memoryview(bo.cpu)[:size]

    def take_faults(self) -> list[SimFault]:
        out, self._pending = self._pending, []
        return out

    def describe_timeout(self) -> str:
        return "no fault recorded"

    def close(self) -> None:
        self.bos.clear()
        self._starts.clear()
        self._by_start.clear()
        self._by_offset.clear()
        self.closed = True

    # --- ioctls --------------------------------------------------------------------------------
    @staticmethod
    def _store(mv: memoryview, struct) -> None:
        mv[:] = bytes(struct)

    def _version(self, mv: memoryview) -> None:
        v = uapi.drm_version.from_buffer_copy(mv)
        v.version_major = v.version_minor = v.version_patchlevel = 0
        for key, text in (("name", uapi.DRIVER_NAME), ("date", "0"), ("desc", DRIVER_DESC)):
            data = text.encode()
            ptr, room = getattr(v, key), getattr(v, key + "_len")
            if ptr and room:
                ctypes.memmove(ptr, data, min(room, len(data)))  # copy_to_user
            setattr(v, key + "_len", len(data))
        self._store(mv, v)

    def _alloc_iova(self, mapped: int) -> int:
        pos = 0
        for start in self._starts:
            if start - pos >= mapped:
                break
            bo = self._by_start[start]
            pos = max(pos, bo.iova + bo.mapped)
        if pos + mapped > IOVA_LIMIT:
            raise OSError(errno.ENOSPC, "NPU address space exhausted")
        return pos

    def _create_bo(self, mv: memoryview) -> None:
        req = uapi.drm_rocket_create_bo.from_buffer_copy(mv)
        if req.size == 0:
            raise OSError(errno.EINVAL, "zero-sized BO")
        mapped = -(-req.size // PAGE) * PAGE
        iova = self._alloc_iova(mapped)
        bo = SimBO(self._next_handle, req.size, iova, self._next_offset)
        self._next_handle += 1
        self._next_offset += mapped
        self.bos[bo.handle] = bo
        bisect.insort(self._starts, iova)
        self._by_start[iova] = bo
        self._by_offset[bo.offset] = bo
        req.handle, req.dma_address, req.offset = bo.handle, bo.iova, bo.offset
        self._store(mv, req)

    def _lookup(self, handle: int) -> SimBO:
        bo = self.bos.get(handle)
        if bo is None:
            raise OSError(errno.ENOENT, f"no BO with handle {handle}")
        return bo

    def _gem_close(self, mv: memoryview) -> None:
        req = uapi.drm_gem_close.from_buffer_copy(mv)
        bo = self.bos.pop(req.handle, None)
        if bo is None:
            raise OSError(errno.EINVAL, f"no BO with handle {req.handle}")
        self._starts.remove(bo.iova)
        del self._by_start[bo.iova]
        del self._by_offset[bo.offset]

    def _fini_bo(self, mv: memoryview) -> None:
        req = uapi.drm_rocket_fini_bo.from_buffer_copy(mv)
        if req.reserved:
            raise OSError(errno.EINVAL, "reserved must be 0")
        bo = self._lookup(req.handle)
        if bo.last_user > self._waited:
            fault = SimFault(
                "bo-busy",
                f"FINI_BO of BO {bo.handle} while job {bo.last_user} (not yet waited for) uses it: the kernel "
                "attaches fences to out-BOs only, so the CPU's new bytes race the NPU; PREP_BO an out-BO "
                "of that job (or a later one) first", bo.last_user)
            self._log(fault)
            for seq, outs in self._in_flight:  # what they compute is undefined now
                if seq > self._waited:
                    for out in outs:
                        out.dead = True
        bo.dev[:] = bo.cpu  # dma_sync_sgtable_for_device

    def _prep_bo(self, mv: memoryview) -> None:
        req = uapi.drm_rocket_prep_bo.from_buffer_copy(mv)
        if req.reserved:
            raise OSError(errno.EINVAL, "reserved must be 0")
        bo = self._lookup(req.handle)
        deadline = req.timeout_ns
        now = time.monotonic_ns()
        err = 0
        if bo.dead:
            err = errno.EBUSY if deadline <= now else errno.ETIMEDOUT
        elif now < bo.fence_ns:
            if deadline <= now:
                err = errno.EBUSY  # poll (0 or a past deadline, e.g. a relative timeout)
            elif deadline < bo.fence_ns:
                time.sleep((deadline - now) / 1e9)
                err = errno.ETIMEDOUT
            else:
                time.sleep((bo.fence_ns - now) / 1e9)
        bo.cpu[:] = bo.dev  # dma_sync_sgtable_for_cpu, done even on timeout
        if err:
            raise OSError(err, "PREP_BO")
        if bo.last_writer > self._waited:  # its fence and, in order, every earlier job's have signalled
            self._waited = bo.last_writer
            self._in_flight = [(s, o) for s, o in self._in_flight if s > self._waited]

    def _submit(self, mv: memoryview) -> None:
        args = uapi.drm_rocket_submit.from_buffer_copy(mv)
        if args.job_count == 0:
            return
        if args.job_struct_size < ctypes.sizeof(uapi.drm_rocket_job):
            raise OSError(errno.EINVAL, "job_struct_size too small")
        if args.reserved:
            raise OSError(errno.EINVAL, "reserved must be 0")
        if not args.jobs:
            raise OSError(errno.EFAULT, "jobs pointer is NULL")
        raw = ctypes.string_at(args.jobs, args.job_count * args.job_struct_size)  # copy_from_user
        size = ctypes.sizeof(uapi.drm_rocket_job)
        jobs = [
            uapi.drm_rocket_job.from_buffer_copy(raw[i * args.job_struct_size : i * args.job_struct_size + size])
            for i in range(args.job_count)
        ]
        with _blas_limit(self.npu.blas_threads):
            for job in jobs:  # the per-job result is discarded, as in rocket_ioctl_submit
                self._submit_job(job)

    # --- jobs ----------------------------------------------------------------------------------
    def _log(self, fault: SimFault) -> None:
        self.faults.append(fault)
        self._pending.append(fault)

    def _read_handles(self, ptr: int, count: int) -> list[int]:
        if count == 0:
            return []
        if not ptr:
            raise OSError(errno.EFAULT, "handle array pointer is NULL")
        return list(np.frombuffer(ctypes.string_at(ptr, 4 * count), dtype="<u4"))

    def _submit_job(self, job) -> None:
        seq = self._job_seq
        self._job_seq += 1
        try:
            if job.task_count == 0:
                raise OSError(errno.EINVAL, "task_count is 0")
            if job.task_struct_size < ctypes.sizeof(uapi.drm_rocket_task):
                raise OSError(errno.EINVAL, "task_struct_size too small")
            if not job.tasks:
                raise OSError(errno.EFAULT, "tasks pointer is NULL")
            tasks = []
            for i in range(job.task_count):
                t = uapi.drm_rocket_task.from_buffer_copy(
                    ctypes.string_at(job.tasks + i * job.task_struct_size, ctypes.sizeof(uapi.drm_rocket_task))
                )
                if t.regcmd_count == 0:
                    raise OSError(errno.EINVAL, f"task {i} has regcmd_count 0")
                tasks.append((t.regcmd, t.regcmd_count))
            ins = [self._lookup(int(h)) for h in self._read_handles(job.in_bo_handles, job.in_bo_handle_count)]
            outs = [self._lookup(int(h)) for h in self._read_handles(job.out_bo_handles, job.out_bo_handle_count)]
        except OSError as e:
            self._log(SimFault(
                "job-rejected",
                f"the kernel drops this job ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}); "
                "SUBMIT still returned 0 and no fence was attached", seq))
            return
        del ins  # read dependencies: jobs of one fd already run in order here (hw.JOBS_RUN_IN_SUBMIT_ORDER)
        now = time.monotonic_ns()
        start = max(now, self._busy_until)  # after the previous job of the fd, hence after its fences
        for bo in outs:
            bo.last_writer = bo.last_user = seq
        self._in_flight.append((seq, outs))
        self._running = seq
        seconds = 0.0
        core = self.core
        for i, (regcmd, count) in enumerate(tasks):
            try:
                seconds += self._run_task(core, seq, regcmd, count)
            except _Fault as f:
                self._log(SimFault(f.code, f.message, seq, i))
                core.reset()
                for bo in outs:
                    bo.dead = True
                return
        done = start + int(seconds * 1e9 * self.npu.timing)
        self._busy_until = done
        for bo in outs:
            bo.fence_ns = max(bo.fence_ns, done)

    # --- memory as the NPU sees it ----------------------------------------------------------------
    def _span(self, iova: int, nbytes: int, what: str) -> list[tuple[SimBO, int, int]]:
        """(bo, offset in bo, length) pieces covering [iova, iova + nbytes) or an IOMMU fault."""
        if iova < 0 or nbytes <= 0 or iova + nbytes > IOVA_LIMIT:
            raise _Fault("iova-unmapped", f"{what}: {iova:#x}+{nbytes} is outside the 32-bit NPU address space")
        pieces, pos, end = [], iova, iova + nbytes
        while pos < end:
            i = bisect.bisect_right(self._starts, pos) - 1
            bo = self._by_start[self._starts[i]] if i >= 0 else None
            if bo is None or pos >= bo.iova + bo.mapped:
                raise _Fault(
                    "iova-unmapped",
                    f"{what}: address {pos:#x} (range {iova:#x}..{end:#x}) is not in any BO of this fd "
                    "(IOMMU fault: the job would hang until the 500 ms timeout)",
                )
            take = min(end, bo.iova + bo.mapped) - pos
            pieces.append((bo, pos - bo.iova, take))
            bo.last_user = max(bo.last_user, self._running)
            pos += take
        return pieces

    def _window(self, iova: int, nbytes: int, what: str):
        """A uint8 array over [iova, iova + nbytes) of device memory and a write-back function
        (None when the range lies in one BO and the array is a view of it)."""
        pieces = self._span(iova, nbytes, what)
        if len(pieces) == 1:
            bo, off, n = pieces[0]
            return bo.dev[off : off + n], None
        buf = np.concatenate([bo.dev[off : off + n] for bo, off, n in pieces])

        def writeback() -> None:
            pos = 0
            for bo, off, n in pieces:
                bo.dev[off : off + n] = buf[pos : pos + n]
                pos += n

        return buf, writeback

    def _strided(self, base: int, shape, strides, dtype, what: str):
        itemsize = np.dtype(dtype).itemsize
        if any(s < 0 for s in strides):
            raise _Fault("unsupported-mode", f"{what}: negative strides are not modelled")
        extent = sum((n - 1) * s for n, s in zip(shape, strides)) + itemsize
        buf, writeback = self._window(base, extent, what)
        return np.ndarray(shape, dtype=dtype, buffer=buf, offset=0, strides=strides), writeback

    # --- one task -----------------------------------------------------------------------------------
    def _run_task(self, core: SimCore, job: int, regcmd: int, count: int) -> float:
        pc = core.regs
        # rocket_job_hw_submit's MMIO writes
        sptr = 0xE | (0x10000000 * core.index)
        pc[R.PC_BASE_ADDRESS.offset] = 1
        pc[R.CNA_S_POINTER.offset] = sptr
        pc[R.CORE_S_POINTER.offset] = sptr
        pc[R.PC_BASE_ADDRESS.offset] = regcmd & 0xFFFFFFFF
        amount = (count + 1) // 2 - 1
        pc[R.PC_REGISTER_AMOUNTS.offset] = amount & 0xFFFF
        pc[R.PC_INTERRUPT_MASK.offset] = R.IRQ_DPU_0 | R.IRQ_DPU_1
        pc[R.PC_INTERRUPT_CLEAR.offset] = R.IRQ_DPU_0 | R.IRQ_DPU_1
        pc[R.PC_INTERRUPT_RAW_STATUS.offset] = 0
        pc[R.PC_TASK_CON.offset] = 0x7001
        pc[R.PC_TASK_DMA_BASE_ADDR.offset] = 0
        pc[R.PC_OPERATION_ENABLE.offset] = 1
        # the PC fetches from PC_SOURCE_ADDR (bits 31:4); bit 0 would select slave mode
        if regcmd & 0xF:
            raise _Fault("regcmd-misaligned",
                         f"regcmd IOVA {regcmd:#x} is not 16-byte aligned (PC_SOURCE_ADDR drops bits 3:0)")
        if amount > 0xFFFF:
            raise _Fault("regcmd-count",
                         f"regcmd_count {count} does not fit the 16-bit PC_DATA_AMOUNT ({amount:#x})")
        nwords = 2 * (amount + 1)
        raw, _ = self._window(regcmd, 8 * nwords, "regcmd fetch")
        words = raw.view("<u8")
        targets = (words >> np.uint64(48)).tolist()
        values = ((words >> np.uint64(16)) & np.uint64(0xFFFFFFFF)).tolist()
        offsets = (words & np.uint64(0xFFFF)).tolist()

        written: dict[int, int] = {}
        op_mask = None
        marker = False
        for i in range(nwords):
            t, off, val = targets[i], offsets[i], values[i]
            if op_mask is not None:
                if t or off or val:
                    raise _Fault("trailing-words", f"word {i} ({t:#06x}/{off:#06x}) follows the op-enable word")
                continue
            if t == 0:
                if off or val:
                    raise _Fault("unknown-target", f"word {i} has target 0 but writes {val:#x} to {off:#06x}")
                continue
            if t == R.TARGET_OP_MARKER:
                if off or val:
                    raise _Fault("unknown-register", f"word {i}: the 0x0041 marker carries {val:#x}/{off:#06x}")
                marker = True
                continue
            if t == R.TARGET_OP_ENABLE:
                if off != R.PC_OPERATION_ENABLE.offset:
                    raise _Fault("unknown-register", f"word {i}: op-enable word addresses {off:#06x}")
                if not marker:
                    raise _Fault("op-marker", f"word {i}: op-enable is not preceded by the 0x0041 marker word")
                op_mask = val
                continue
            block = R.TARGET_BLOCKS.get(t)
            if block is None:
                raise _Fault("unknown-target", f"word {i}: unknown target {t:#06x}")
            name, lo, hi = block
            if not lo <= off < hi:
                raise _Fault("unknown-register", f"word {i}: register {off:#06x} written through the {name} target")
            if t == R.TARGET_PC:
                if off not in (R.PC_BASE_ADDRESS.offset, R.PC_REGISTER_AMOUNTS.offset):
                    raise _Fault("unknown-register", f"word {i}: PC register {off:#06x} is not writable from a regcmd")
                continue  # chaining registers: unused with TASK_NUMBER = 1
            reg = R.lookup(off)
            if reg is None:
                raise _Fault("unknown-register", f"word {i}: {name} register {off:#06x} is not modelled")
            if val & ~reg.valid_mask & 0xFFFFFFFF:
                raise _Fault("field-range",
                             f"{reg.qualname} = {val:#x} sets bits outside its fields (a value overflowed its field)")
            written[off] = val
            pc[off] = val
        if op_mask is None:
            raise _Fault("no-op-enable",
                         f"no op-enable word in the {nwords} fetched words: nothing starts, the job hangs")
        seconds = self._execute(core, job, written, op_mask)
        pc[R.PC_INTERRUPT_RAW_STATUS.offset] = R.IRQ_DPU_0
        # the kernel's IRQ thread: OPERATION_ENABLE = 0, clear everything
        pc[R.PC_OPERATION_ENABLE.offset] = 0
        pc[R.PC_INTERRUPT_RAW_STATUS.offset] = 0
        self.npu.tasks_run += 1
        return seconds

    def _execute(self, core: SimCore, job: int, w: dict[int, int], mask: int) -> float:
        def val(reg: R.Reg) -> int:
            try:
                return w[reg.offset]
            except KeyError:
                raise _Fault("register-unwritten",
                             f"{reg.qualname} is used by this task but not written in it "
                             "(register state left by an earlier task is not relied on)") from None

        def f(reg: R.Reg, name: str) -> int:
            return reg.get(val(reg), name)

        def require(cond: bool, code: str, msg: str) -> None:
            if not cond:
                raise _Fault(code, msg)

        # --- op-enable mask ---
        require(not mask & ~R.OPEN_ALL, "field-range", f"op-enable mask {mask:#x} has unknown bits")
        require(bool(mask & R.OPEN_DPU), "no-dpu",
                f"op-enable mask {mask:#x} does not start the DPU: no DPU interrupt, the job never completes")
        require(not mask & (R.OPEN_PPU | R.OPEN_PPU_RDMA), "unsupported-mode",
                f"op-enable mask {mask:#x} starts the PPU (not modelled)")
        require(mask & R.OPEN_CNA and mask & R.OPEN_CORE, "unsupported-mode",
                f"op-enable mask {mask:#x}: only CNA+CORE+DPU convolution tasks are modelled")

        # --- CNA ---
        require(f(R.CNA_CONV_CON1, "CONV_MODE") == 0, "unsupported-mode",
                f"CNA.CONV_CON1.CONV_MODE = {f(R.CNA_CONV_CON1, 'CONV_MODE')} (only direct convolution)")
        for fld in ("IN_PRECISION", "PROC_PRECISION"):
            p = f(R.CNA_CONV_CON1, fld)
            require(p == R.PREC_INT8, "unsupported-precision",
                    f"CNA.CONV_CON1.{fld} = {R.PREC_NAMES.get(p, p)} (only int8 is modelled)")
        for fld in ("NONALIGN_DMA", "GROUP_LINE_OFF", "DECONV", "ARGB_IN"):
            require(f(R.CNA_CONV_CON1, fld) == 0, "unsupported-mode", f"CNA.CONV_CON1.{fld} is set")
        c3 = val(R.CNA_CONV_CON3)
        require(R.CNA_CONV_CON3.get(c3, "CONV_X_STRIDE") == 1 and R.CNA_CONV_CON3.get(c3, "CONV_Y_STRIDE") == 1,
                "unsupported-mode", "CNA.CONV_CON3: only stride 1 is modelled")
        require(c3 & ~R.CNA_CONV_CON3.pack(CONV_X_STRIDE=7, CONV_Y_STRIDE=7) == 0, "unsupported-mode",
                "CNA.CONV_CON3: NN_MODE, dilation and deconvolution are not modelled")
        W = f(R.CNA_DATA_SIZE0, "DATAIN_WIDTH")
        H = f(R.CNA_DATA_SIZE0, "DATAIN_HEIGHT")
        C = f(R.CNA_DATA_SIZE1, "DATAIN_CHANNEL")
        c_real = f(R.CNA_DATA_SIZE1, "DATAIN_CHANNEL_REAL") + 1
        require(W > 0 and H > 0 and C > 0, "field-range", f"CNA input cube {W}x{H}x{C} is empty")
        require(C % hw.WEIGHT_CHANNEL_CHUNK == 0, "unsupported-mode",
                f"CNA.DATA_SIZE1.DATAIN_CHANNEL = {C} is not a multiple of {hw.WEIGHT_CHANNEL_CHUNK} "
                "(the partial weight chunk layout is unconfirmed)")
        require(c_real == C, "unsupported-mode",
                f"CNA.DATA_SIZE1: DATAIN_CHANNEL_REAL+1 = {c_real} != DATAIN_CHANNEL = {C} (channel padding not modelled)")
        grains = f(R.CNA_CONV_CON2, "FEATURE_GRAINS")
        require(grains >= 3, "field-range", f"CNA.CONV_CON2.FEATURE_GRAINS = {grains} < kernel_h + stride_y + 1")
        require(f(R.CNA_DATA_SIZE2, "DATAOUT_WIDTH") == W, "inconsistent",
                "CNA.DATA_SIZE2.DATAOUT_WIDTH != input width (1x1, stride 1)")
        require(f(R.CNA_DATA_SIZE3, "DATAOUT_ATOMICS") == W * H and f(R.CNA_DATA_SIZE3, "SURF_MODE") == 0,
                "inconsistent", f"CNA.DATA_SIZE3.DATAOUT_ATOMICS != {W}*{H}")
        kw, kh = f(R.CNA_WEIGHT_SIZE2, "WEIGHT_WIDTH"), f(R.CNA_WEIGHT_SIZE2, "WEIGHT_HEIGHT")
        Nk = f(R.CNA_WEIGHT_SIZE2, "WEIGHT_KERNELS")
        require((kw, kh) == (1, 1), "unsupported-mode", f"{kw}x{kh} kernels (only 1x1 is modelled)")
        require(Nk > 0, "field-range", "CNA.WEIGHT_SIZE2.WEIGHT_KERNELS = 0")
        require(Nk % hw.WEIGHT_KERNEL_GROUP == 0, "unsupported-mode",
                f"WEIGHT_KERNELS = {Nk} is not a multiple of {hw.WEIGHT_KERNEL_GROUP} "
                "(the partial kernel group layout is unconfirmed)")
        per_kernel = f(R.CNA_WEIGHT_SIZE1, "WEIGHT_BYTES_PER_KERNEL")
        wbytes = val(R.CNA_WEIGHT_SIZE0)
        require(per_kernel == C, "inconsistent", f"WEIGHT_BYTES_PER_KERNEL = {per_kernel} != {C} channels")
        require(wbytes == C * Nk, "inconsistent", f"WEIGHT_BYTES = {wbytes} != {C} x {Nk}")
        require(per_kernel <= hw.MAX_BYTES_PER_KERNEL, "cbuf-overflow",
                f"{per_kernel} bytes per kernel exceed one CBUF bank")
        cb = val(R.CNA_CBUF_CON0)
        dbank, wbank = R.CNA_CBUF_CON0.get(cb, "DATA_BANK"), R.CNA_CBUF_CON0.get(cb, "WEIGHT_BANK")
        require(dbank > 0 and wbank > 0 and dbank + wbank <= hw.CBUF_BANKS, "cbuf-banks",
                f"CBUF_CON0 assigns {dbank} data + {wbank} weight banks (1..{hw.CBUF_BANKS} in total, each > 0)")
        require(R.CNA_CBUF_CON0.get(cb, "DATA_REUSE") == 0 and R.CNA_CBUF_CON0.get(cb, "FC_DATA_BANK") == 0,
                "unsupported-mode", "CBUF_CON0: DATA_REUSE / FC_DATA_BANK are not modelled")
        need = hw.cbuf_data_banks(W, H, C)
        require(need <= dbank, "cbuf-overflow", f"input {W}x{H}x{C} needs {need} CBUF banks, {dbank} assigned")
        need_w = hw.cbuf_weight_banks_min(per_kernel, Nk)
        require(need_w <= wbank, "cbuf-overflow",
                f"{wbytes} weight bytes ({per_kernel} per kernel) need at least {need_w} CBUF banks "
                f"(one {hw.WEIGHT_KERNEL_GROUP}-kernel group; the rest streams), {wbank} assigned"
                if hw.STREAM_WEIGHTS else
                f"{wbytes} weight bytes need {need_w} CBUF banks, {wbank} assigned")
        resident = hw.cbuf_weights_resident(per_kernel, Nk, wbank)
        require(f(R.CNA_CBUF_CON1, "DATA_ENTRIES") == hw.cbuf_data_entries(W, C), "inconsistent",
                f"CBUF_CON1.DATA_ENTRIES = {f(R.CNA_CBUF_CON1, 'DATA_ENTRIES')} != {hw.cbuf_data_entries(W, C)}")
        require(f(R.CNA_CVT_CON0, "CVT_BYPASS") == 1, "unsupported-mode", "CNA input conversion (CVT) is not modelled")
        require(f(R.CNA_CVT_CON0, "DATA_SIGN") == 1, "unsupported-precision", "unsigned int8 input is not modelled")
        for reg in (R.CNA_FC_CON0, R.CNA_FC_CON1, R.CNA_FC_CON2, R.CNA_PAD_CON0, R.CNA_DCOMP_CTRL,
                    R.CNA_DCOMP_REGNUM, R.CNA_CVT_CON5):
            require(val(reg) == 0, "unsupported-mode", f"{reg.qualname} = {val(reg):#x} (only 0 is modelled)")
        require(f(R.CNA_FC_DATA_SIZE0, "DMA_WIDTH") == W and f(R.CNA_FC_DATA_SIZE0, "DMA_HEIGHT") == H
                and f(R.CNA_FC_DATA_SIZE1, "DMA_CHANNEL") == C, "inconsistent",
                "CNA.FC_DATA_SIZE0/1 disagree with DATA_SIZE0/1")
        line_stride = f(R.CNA_DMA_CON1, "LINE_STRIDE")
        surf_stride = f(R.CNA_DMA_CON2, "SURF_STRIDE")
        if surf_stride & (1 << 27):
            surf_stride -= 1 << 28
        line_bytes = hw.cna_line_bytes(line_stride)
        plane_bytes = hw.cna_plane_bytes(line_stride, surf_stride)
        require(line_bytes >= 16 * W and (C <= 16 or plane_bytes >= line_bytes * (H - 1) + 16 * W),
                "inconsistent", f"CNA strides (line {line_bytes} B, plane {plane_bytes} B) overlap rows or planes")
        feat_addr = val(R.CNA_FEATURE_DATA_ADDR)
        wgt_addr = val(R.CNA_DCOMP_ADDR0)

        # --- CORE ---
        p = f(R.CORE_MISC_CFG, "PROC_PRECISION")
        require(p == R.PREC_INT8, "unsupported-precision", f"CORE.MISC_CFG.PROC_PRECISION = {R.PREC_NAMES.get(p, p)}")
        require(f(R.CORE_MISC_CFG, "DW_EN") == 0, "unsupported-mode", "CORE depthwise mode is not modelled")
        require(f(R.CORE_DATAOUT_SIZE_0, "DATAOUT_HEIGHT") + 1 == H and f(R.CORE_DATAOUT_SIZE_0, "DATAOUT_WIDTH") + 1 == W,
                "inconsistent", "CORE.DATAOUT_SIZE_0 != CNA input size (1x1, stride 1)")
        require(f(R.CORE_DATAOUT_SIZE_1, "DATAOUT_CHANNEL") + 1 == Nk, "inconsistent",
                "CORE.DATAOUT_SIZE_1.DATAOUT_CHANNEL + 1 != WEIGHT_KERNELS")
        require(f(R.CORE_CLIP_TRUNCATE, "CLIP_TRUNCATE") == 0, "unsupported-mode",
                "CORE.CLIP_TRUNCATE (accumulator shift) is not modelled")
        val(R.CORE_3030)

        # --- DPU ---
        fm = val(R.DPU_FEATURE_MODE_CFG)
        require(R.DPU_FEATURE_MODE_CFG.get(fm, "FLYING_MODE") == 0 and R.DPU_FEATURE_MODE_CFG.get(fm, "CONV_MODE") == 0,
                "unsupported-mode", "DPU.FEATURE_MODE_CFG: only on-the-fly input from a direct convolution is modelled")
        require(R.DPU_FEATURE_MODE_CFG.get(fm, "OUTPUT_MODE") == 2, "unsupported-mode",
                "DPU.FEATURE_MODE_CFG.OUTPUT_MODE must send the result to memory (2)")
        require(fm & ~R.DPU_FEATURE_MODE_CFG.pack(BURST_LEN=15, OUTPUT_MODE=3) == 0, "unsupported-mode",
                "DPU.FEATURE_MODE_CFG: TP/COMB/RGP/NONALIGN/SURF_LEN are not modelled")
        df = val(R.DPU_DATA_FORMAT)
        op = R.DPU_DATA_FORMAT.get(df, "OUT_PRECISION")
        require(op == R.PREC_INT32, "unsupported-precision",
                f"DPU.DATA_FORMAT.OUT_PRECISION = {R.PREC_NAMES.get(op, op)} (only raw int32 output is modelled)")
        require(R.DPU_DATA_FORMAT.get(df, "IN_PRECISION") == R.PREC_INT8
                and R.DPU_DATA_FORMAT.get(df, "PROC_PRECISION") == R.PREC_INT8, "unsupported-precision",
                "DPU.DATA_FORMAT: input/processing precision must be int8")
        require(R.DPU_DATA_FORMAT.get(df, "MC_SURF_OUT") == 0, "unsupported-mode", "DPU MC_SURF_OUT is not modelled")
        dst = val(R.DPU_DST_BASE_ADDR)
        require(dst % 16 == 0, "dst-misaligned",
                f"DPU.DST_BASE_ADDR {dst:#x} is not 16-byte aligned (bits 3:0 are read-only)")
        surf = val(R.DPU_DST_SURF_STRIDE)
        require(f(R.DPU_DATA_CUBE_WIDTH, "WIDTH") + 1 == W and f(R.DPU_DATA_CUBE_HEIGHT, "HEIGHT") + 1 == H
                and f(R.DPU_DATA_CUBE_HEIGHT, "MINMAX_CTL") == 0, "inconsistent",
                "DPU data cube width/height != CORE output")
        ch = f(R.DPU_DATA_CUBE_CHANNEL, "CHANNEL") + 1
        require(ch == Nk, "inconsistent", f"DPU.DATA_CUBE_CHANNEL.CHANNEL + 1 = {ch} != {Nk} kernels")
        require(f(R.DPU_DATA_CUBE_CHANNEL, "ORIG_CHANNEL") + 1 == ch, "unsupported-mode",
                "DPU ORIG_CHANNEL != CHANNEL (OFFSET_PEND channel padding is not modelled)")
        require(val(R.DPU_DATA_CUBE_NOTCH_ADDR) == 0, "unsupported-mode", "DPU output line notch is not modelled")
        require(f(R.DPU_BS_CFG, "BYPASS") == 1, "unsupported-mode", "DPU BS stage (bias/ALU) is not modelled")
        require(f(R.DPU_BN_CFG, "BYPASS") == 1, "unsupported-mode", "DPU BN stage is not modelled")
        require(f(R.DPU_EW_CFG, "EW_BYPASS") == 1, "unsupported-mode", "DPU EW stage is not modelled")
        ow = val(R.DPU_BS_OW_CFG)
        require(R.DPU_BS_OW_CFG.get(ow, "OD_BYPASS") == 1, "unsupported-mode",
                "DPU.BS_OW_CFG.OD_BYPASS = 0 (the CPEND / OW_OP path is not modelled)")
        sizes = {R.DPU_BS_OW_CFG.get(ow, k) for k in ("SIZE_E_0", "SIZE_E_1", "SIZE_E_2")}
        require(sizes == {hw.SIZE_E_INT32}, "inconsistent",
                f"DPU.BS_OW_CFG.SIZE_E = {sorted(sizes)}, int32 output uses {hw.SIZE_E_INT32}")
        require(f(R.DPU_WDMA_SIZE_0, "CHANNEL_WDMA") + 1 == Nk and f(R.DPU_WDMA_SIZE_1, "HEIGHT_WDMA") + 1 == H
                and f(R.DPU_WDMA_SIZE_1, "WIDTH_WDMA") + 1 == W, "inconsistent", "DPU WDMA size != data cube")
        require(val(R.DPU_OUT_CVT_OFFSET) == 0 and f(R.DPU_OUT_CVT_SCALE, "OUT_CVT_SCALE") == 1
                and f(R.DPU_OUT_CVT_SCALE, "FP32TOFP16_EN") == 0 and f(R.DPU_OUT_CVT_SHIFT, "OUT_CVT_SHIFT") == 0
                and f(R.DPU_OUT_CVT_SHIFT, "MINUS_EXP") == 0, "unsupported-mode",
                "DPU output conversion is not the identity (requantisation is not modelled)")
        require(f(R.DPU_SURFACE_ADD, "SURF_ADD") == (surf >> 4) * hw.SURFACE_ADD_FACTOR_INT32, "inconsistent",
                f"DPU.SURFACE_ADD = {f(R.DPU_SURFACE_ADD, 'SURF_ADD')}, int32 output with a {surf}-byte plane "
                f"uses {(surf >> 4) * hw.SURFACE_ADD_FACTOR_INT32}")
        require(surf >= 16 * W * H, "inconsistent", f"DPU.DST_SURF_STRIDE {surf} B overlaps the {W}x{H} planes")

        # --- DPU_RDMA: may be enabled, but must read nothing ---
        if mask & R.OPEN_DPU_RDMA:
            require(f(R.RDMA_FEATURE_MODE_CFG, "MRDMA_DISABLE") == 1 and f(R.RDMA_ERDMA_CFG, "ERDMA_DISABLE") == 1
                    and f(R.RDMA_BRDMA_CFG, "BRDMA_DATA_USE") == 0 and f(R.RDMA_NRDMA_CFG, "NRDMA_DATA_USE") == 0,
                    "unsupported-mode", "DPU_RDMA reads an operand (bias/BN/element-wise inputs are not modelled)")
            require(f(R.RDMA_DATA_CUBE_WIDTH, "WIDTH") + 1 == W and f(R.RDMA_DATA_CUBE_HEIGHT, "HEIGHT") + 1 == H
                    and f(R.RDMA_DATA_CUBE_CHANNEL, "CHANNEL") + 1 == Nk, "inconsistent",
                    "DPU_RDMA data cube != DPU data cube")

        # --- data: feature (CNA feature DMA) ---
        feat, _ = self._strided(feat_addr, (C // 16, H, W, 16), (plane_bytes, line_bytes, 16, 1), np.int8,
                                "CNA feature read")
        x = feat.transpose(1, 2, 0, 3).reshape(H * W, C).astype(np.float64)

        # --- weights (CNA weight DMA, or the copy resident in the CBUF) ---
        key = (id(self), job, wgt_addr, wbytes, dbank, wbank)
        if R.CNA_CBUF_CON0.get(cb, "WEIGHT_REUSE"):
            held = core.cbuf_weights
            require(held is not None and held[0] == key, "weight-reuse",
                    "CBUF_CON0.WEIGHT_REUSE is set but the CBUF does not hold these weights "
                    "(the previous task of this job on this core loaded other weights, none, or "
                    "streamed weights larger than its weight banks)")
            wmat = held[1]
        else:
            raw, _ = self._window(wgt_addr, wbytes, "CNA weight read")
            blocks = raw.view(np.int8).reshape(Nk // 32, C // 32, 32, 32)  # [ng, kc, nn, kk]
            wmat = blocks.transpose(0, 2, 1, 3).reshape(Nk, C).astype(np.float64)
            # weights that fit their banks whole stay resident; streamed ones leave only their
            # last groups behind, which no later task can reuse
            core.cbuf_weights = (key, wmat) if resident else None

        # --- CORE: int8 x int8 products, exact int32 accumulation ---
        acc = (x @ wmat.T).astype(np.int32)  # exact: |acc| <= 2**14 * C < 2**31

        # --- DPU write DMA: int32, 4 channels per 16-byte atom ---
        out, writeback = self._strided(dst, (Nk // 4, H, W, 4), (surf, 16 * W, 16, 4), "<i4", "DPU output write")
        out[...] = acc.reshape(H, W, Nk // 4, 4).transpose(2, 0, 1, 3)
        if writeback is not None:
            writeback()
        macs = H * W * C * Nk
        return hw.TASK_OVERHEAD_S + macs / (hw.NPU_CLOCK_HZ * hw.MACS_PER_CYCLE)
