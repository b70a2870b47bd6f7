"""``RocketDevice``: buffer objects, syncs and job submission over the rocket DRM accel uapi.

The device builds the same ioctl argument bytes whatever is on the other side; only the
*transport* differs:

* :class:`KernelTransport` opens ``/dev/accel/accelN`` and uses ``fcntl.ioctl`` on the fd and
  ``mmap`` of the BO's fake offset, i.e. the real ``rocket`` driver.
* ``SimFile`` (``simulator.py``) takes the same request numbers and the same struct bytes, reads
  the job/task/handle arrays through the user pointers inside them (as the kernel's
  ``copy_from_user`` does), and gives its own BO memory in place of ``mmap``.

A transport has ``ioctl(request, buffer)`` (raises ``OSError`` with the errno, writes the
output fields back into ``buffer``), ``mmap(offset, size)`` (a writable buffer), ``close()``,
``take_faults()`` (fault records it can name; the kernel's is always empty) and ``describe``.

Syncing follows the driver: FINI_BO (``dma_sync_sgtable_for_device``) after CPU writes and
before SUBMIT; PREP_BO with an *absolute* CLOCK_MONOTONIC deadline (it waits for the BO's write
fences, then ``dma_sync_sgtable_for_cpu``) before CPU reads. The kernel's SUBMIT returns 0 even
for a job it drops, so :meth:`RocketDevice.submit` validates every job first.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import glob
import mmap
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import hw_assumptions as hw
from . import uapi
from .errors import NPUDeviceError, NPUJobError, NPUSubmitError, NPUUnavailableError

ACCEL_GLOB = "/dev/accel/accel*"


class KernelTransport:
    """The real driver: an open ``/dev/accel/accelN`` fd."""

    kind = "kernel"

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, request: int, arg) -> None:
        fcntl.ioctl(self.fd, request, arg, True)

    def mmap(self, offset: int, size: int):
        return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def take_faults(self) -> list:
        return []

    def describe_timeout(self) -> str:
        return "the kernel logs 'NPU job timed out' in dmesg when a job hangs"

    @property
    def describe(self) -> str:
        return self.path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class CallStats:
    """What one GEMM call (or one explicit submit) cost."""

    tasks: int = 0
    jobs: int = 0
    submits: int = 0
    k_tiles: int = 0
    m_tiles: int = 0
    n_tiles: int = 0
    seconds: float = 0.0
    gemms: int = 1  # products in this submit (several for a batch)


@dataclass
class NPUStats:
    calls: int = 0  # products (GEMMs); a batch counts each of its products
    tasks: int = 0
    jobs: int = 0
    submits: int = 0
    last: CallStats = field(default_factory=CallStats)

    def record(self, call: CallStats) -> None:
        self.calls += call.gemms
        self.tasks += call.tasks
        self.jobs += call.jobs
        self.submits += call.submits
        self.last = call


class BufferObject:
    """One GEM BO: handle, NPU address (IOVA), size, and a CPU mapping as a uint8 array."""

    def __init__(self, device: "RocketDevice", handle: int, size: int, iova: int, mmap_offset: int):
        self.device = device
        self.handle = handle
        self.size = size
        self.iova = iova
        self.mmap_offset = mmap_offset
        self._map = None
        self._array: np.ndarray | None = None
        self.closed = False

    @property
    def array(self) -> np.ndarray:
        """The CPU mapping (uint8). Sync before the NPU reads (``sync_for_device``) and before
        the CPU reads what the NPU wrote (``wait``)."""
        if self.closed:
            raise NPUDeviceError(f"BO {self.handle} is closed")
        if self._array is None:
            self._map = self.device._mmap(self)
            self._array = np.frombuffer(self._map, dtype=np.uint8, count=self.size)
        return self._array

    def write(self, data: np.ndarray, offset: int = 0) -> None:
        src = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if offset < 0 or offset + src.size > self.size:
            raise NPUDeviceError(f"write of {src.size} bytes at {offset} overruns BO of {self.size}")
        self.array[offset : offset + src.size] = src

    def read(self, dtype, count: int, offset: int = 0) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * count
        if offset < 0 or offset + nbytes > self.size:
            raise NPUDeviceError(f"read of {nbytes} bytes at {offset} overruns BO of {self.size}")
        return self.array[offset : offset + nbytes].view(dtype)

    def sync_for_device(self) -> None:
        self.device.fini_bo(self)

    def wait(self, timeout_s: float = 2.0) -> None:
        self.device.prep_bo(self, timeout_s)

    def _unmap(self) -> None:
        self._array = None
        m, self._map = self._map, None
        if m is not None:
            try:
                if hasattr(m, "close"):
                    m.close()
                elif hasattr(m, "release"):
                    m.release()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when that does

    def close(self) -> None:
        if not self.closed:
            self.device.close_bo(self)

    def __repr__(self) -> str:
        return f"BufferObject(handle={self.handle}, iova={self.iova:#x}, size={self.size})"


@dataclass
class JobSpec:
    """One job: its tasks as (regcmd IOVA, regcmd_count) and the BOs it reads and writes."""

    tasks: list
    in_bos: list
    out_bos: list


class RocketDevice:
    """The rocket NPU (or the simulator) behind one open file."""

    def __init__(self, transport, *, check_driver: bool = True):
        self.transport = transport
        self.stats = NPUStats()
        self._bos: dict[int, BufferObject] = {}
        self._keepalive: tuple = ()
        self._scratch: dict[str, BufferObject] = {}
        self.closed = False
        try:
            self.version = self.query_version()
            if check_driver and self.version["name"] != uapi.DRIVER_NAME:
                raise NPUUnavailableError(
                    f"{transport.describe} is driven by {self.version['name']!r}, not {uapi.DRIVER_NAME!r}"
                )
        except BaseException:
            transport.close()
            raise

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | None = None) -> "RocketDevice":
        """Open ``path`` or the first ``/dev/accel/accel*`` node whose driver is ``rocket``."""
        paths = [path] if path else sorted(glob.glob(ACCEL_GLOB))
        if not paths:
            raise NPUUnavailableError(
                "no /dev/accel/accel* node: the rocket driver is not loaded or this is not an RK3588"
            )
        problems = []
        for p in paths:
            try:
                return cls(KernelTransport(p))
            except NPUUnavailableError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{p}: {e.strerror}")
            except NPUDeviceError as e:
                problems.append(f"{p}: {e}")
        raise NPUUnavailableError("no rocket NPU device: " + "; ".join(problems))

    # --- raw ioctls -------------------------------------------------------------------------
    def _ioctl(self, request: int, arg) -> None:
        if self.closed:
            raise NPUDeviceError("device is closed")
        try:
            self.transport.ioctl(request, arg)
        except OSError as e:
            name = uapi.REQUEST_NAMES.get(request, hex(request))
            err = e.errno or 0
            raise NPUDeviceError(
                f"{name} failed: {_errno.errorcode.get(err, err)} ({os.strerror(err)})", err
            ) from None

    def query_version(self) -> dict:
        """DRM_IOCTL_VERSION: driver name, description and version numbers."""
        v = uapi.drm_version()
        self._ioctl(uapi.DRM_IOCTL_VERSION, v)  # first call: lengths only
        bufs = {k: ctypes.create_string_buffer(max(getattr(v, k + "_len"), 1)) for k in ("name", "date", "desc")}
        v2 = uapi.drm_version()
        for k, b in bufs.items():
            setattr(v2, k + "_len", len(b))
            setattr(v2, k, ctypes.addressof(b))
        self._ioctl(uapi.DRM_IOCTL_VERSION, v2)
        out = {k: bufs[k].raw[: min(getattr(v2, k + "_len"), len(bufs[k]))].decode(errors="replace").rstrip("\0") for k in bufs}
        out.update(major=v2.version_major, minor=v2.version_minor, patchlevel=v2.version_patchlevel)
        return out

    def create_bo(self, size: int) -> BufferObject:
        if not 0 < size < (1 << 32):
            raise NPUDeviceError(f"BO size {size} is outside 1..4 GiB")
        req = uapi.drm_rocket_create_bo(size=size)
        self._ioctl(uapi.DRM_IOCTL_ROCKET_CREATE_BO, req)
        bo = BufferObject(self, req.handle, size, req.dma_address, req.offset)
        self._bos[bo.handle] = bo
        return bo

    def _mmap(self, bo: BufferObject):
        try:
            return self.transport.mmap(bo.mmap_offset, bo.size)
        except OSError as e:
            raise NPUDeviceError(f"mmap of BO {bo.handle} failed: {e.strerror}", e.errno) from None

    def fini_bo(self, bo: BufferObject) -> None:
        """Hand the BO to the device after CPU writes (cache clean)."""
        self._ioctl(uapi.DRM_IOCTL_ROCKET_FINI_BO, uapi.drm_rocket_fini_bo(handle=bo.handle))

    def prep_bo(self, bo: BufferObject, timeout_s: float = 2.0) -> None:
        """Wait (until now + ``timeout_s``) for the jobs writing ``bo``, then hand it to the CPU.

        Raises :class:`NPUJobError` if they do not complete, naming the faults the transport
        knows of; also if the transport logged a fault for a job that never got a fence.
        """
        deadline = time.monotonic_ns() + int(timeout_s * 1e9)  # absolute CLOCK_MONOTONIC
        req = uapi.drm_rocket_prep_bo(handle=bo.handle, reserved=0, timeout_ns=deadline)
        try:
            self._ioctl(uapi.DRM_IOCTL_ROCKET_PREP_BO, req)
        except NPUDeviceError as e:
            if e.errno in (_errno.ETIMEDOUT, _errno.EBUSY):
                faults = self.transport.take_faults()
                what = "; ".join(str(f) for f in faults) or self.transport.describe_timeout()
                raise NPUJobError(
                    f"NPU job writing BO {bo.handle} did not complete within {timeout_s:g} s "
                    f"({_errno.errorcode[e.errno]}): {what}", faults, e.errno
                ) from None
            raise
        faults = self.transport.take_faults()
        if faults:
            raise NPUJobError("NPU job failed: " + "; ".join(str(f) for f in faults), faults)

    def close_bo(self, bo: BufferObject) -> None:
        bo._unmap()
        bo.closed = True
        self._bos.pop(bo.handle, None)
        if not self.closed:
            self._ioctl(uapi.DRM_IOCTL_GEM_CLOSE, uapi.drm_gem_close(handle=bo.handle))

    # --- submission ---------------------------------------------------------------------------
    def _validate(self, jobs: list[JobSpec]) -> None:
        for j, job in enumerate(jobs):
            if not job.tasks:
                raise NPUSubmitError(f"job {j} has no tasks (the kernel would drop it silently)")
            for t, (iova, count) in enumerate(job.tasks):
                if count <= 0:
                    raise NPUSubmitError(f"job {j} task {t}: regcmd_count {count} (must be > 0)")
                if count > 2 * 0x10000:
                    raise NPUSubmitError(f"job {j} task {t}: regcmd_count {count} overflows PC_DATA_AMOUNT")
                if iova % 16:
                    raise NPUSubmitError(f"job {j} task {t}: regcmd IOVA {iova:#x} is not 16-byte aligned")
                if not 0 <= iova < (1 << 32):
                    raise NPUSubmitError(f"job {j} task {t}: regcmd IOVA {iova:#x} is not a 32-bit address")
            for bo in list(job.in_bos) + list(job.out_bos):
                if bo.closed or self._bos.get(bo.handle) is not bo:
                    raise NPUSubmitError(f"job {j} names BO {bo.handle}, which is not open on this device")

    def submit(self, jobs: list[JobSpec], *, validate: bool = True) -> None:
        """One DRM_IOCTL_ROCKET_SUBMIT carrying ``jobs`` (each runs its tasks in order on one
        core). ``validate=False`` skips the userspace checks (tests use it to see what the
        other side does with a bad job)."""
        if validate:
            self._validate(jobs)
        task_arrays, in_arrays, out_arrays = [], [], []
        job_array = (uapi.drm_rocket_job * max(len(jobs), 1))()
        for i, job in enumerate(jobs):
            tasks = (uapi.drm_rocket_task * max(len(job.tasks), 1))()
            for t, (iova, count) in enumerate(job.tasks):
                tasks[t].regcmd = iova
                tasks[t].regcmd_count = count
            ins = (ctypes.c_uint32 * max(len(job.in_bos), 1))(*[b.handle for b in job.in_bos])
            outs = (ctypes.c_uint32 * max(len(job.out_bos), 1))(*[b.handle for b in job.out_bos])
            task_arrays.append(tasks)
            in_arrays.append(ins)
            out_arrays.append(outs)
            jd = job_array[i]
            jd.tasks = ctypes.addressof(tasks)
            jd.in_bo_handles = ctypes.addressof(ins)
            jd.out_bo_handles = ctypes.addressof(outs)
            jd.task_count = len(job.tasks)
            jd.task_struct_size = ctypes.sizeof(uapi.drm_rocket_task)
            jd.in_bo_handle_count = len(job.in_bos)
            jd.out_bo_handle_count = len(job.out_bos)
        sub = uapi.drm_rocket_submit(
            jobs=ctypes.addressof(job_array), job_count=len(jobs),
            job_struct_size=ctypes.sizeof(uapi.drm_rocket_job), reserved=0,
        )
        # Everything the kernel reads through the pointers stays referenced until the next
        # submit (the kernel copies during the call; the references make that obviously safe).
        self._keepalive = (sub, job_array, task_arrays, in_arrays, out_arrays)
        self._ioctl(uapi.DRM_IOCTL_ROCKET_SUBMIT, sub)

    # --- scratch buffers reused across calls ---------------------------------------------------
    def scratch(self, name: str, size: int) -> BufferObject:
        """A BO of at least ``size`` bytes kept for reuse under ``name`` (grown as needed)."""
        bo = self._scratch.get(name)
        if bo is None or bo.closed or bo.size < size:
            if bo is not None and not bo.closed:
                bo.close()
            bo = self.create_bo(max(size, 4096) if bo is None else max(size, bo.size * 2))
            self._scratch[name] = bo
        return bo

    def drop_scratch(self) -> None:
        """Forget the scratch BOs (after a failed job their fences may never signal)."""
        for bo in self._scratch.values():
            if not bo.closed:
                try:
                    bo.close()
                except NPUDeviceError:
                    pass
        self._scratch.clear()

    # --- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        for bo in list(self._bos.values()):
            try:
                bo.close()
            except NPUDeviceError:
                pass
        self._scratch.clear()
        self.closed = True
        self.transport.close()

    def __enter__(self) -> "RocketDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_simulated(self) -> bool:
        return getattr(self.transport, "kind", "") == "simulator"

    def __repr__(self) -> str:
        return f"RocketDevice({self.transport.describe})"


def estimate_job_timeout(jobs: int, seconds: float = 0.0) -> float:
    """A PREP_BO timeout for ``jobs`` queued jobs: each one completes or is reset by the kernel
    within JOB_TIMEOUT_S of starting, so this bounds the wait whatever the real speed is."""
    return max(2.0, jobs * hw.JOB_TIMEOUT_S + 1.0, 4 * seconds)
