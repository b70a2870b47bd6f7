"""RocketDevice over the simulator transport: ioctl semantics, syncs, deadlines, user pointers."""

import ctypes
import errno
import glob
import time

import numpy as np
import pytest

from rosenblatt.npu import (
    JobSpec,
    NPUDeviceError,
    NPUJobError,
    NPUUnavailableError,
    RocketDevice,
    open_device,
    uapi,
)
from rosenblatt.npu.gemm import GemmRun, prepare_weights
from rosenblatt.npu.simulator import MMAP_OFFSET_START, SimulatedNPU


@pytest.fixture
def dev():
    d = open_device(sim=True)
    yield d
    d.close()


def _operands(M=8, K=64, N=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, (M, K), dtype=np.int8), rng.integers(-128, 128, (K, N), dtype=np.int8)


def test_version_through_the_ioctl(dev):
    assert dev.version["name"] == "rocket"
    assert dev.version["desc"] == "rocket DRM"
    assert dev.is_simulated


def test_wrong_driver_is_refused():
    class NotRocket:
        kind = "simulator"
        describe = "fake node"
        closed = False

        def __init__(self):
            self.inner = SimulatedNPU().open()

        def ioctl(self, request, arg):
            self.inner.ioctl(request, arg)
            if request == uapi.DRM_IOCTL_VERSION:
                v = uapi.drm_version.from_buffer(arg)
                if v.name:
                    ctypes.memmove(v.name, b"i915\0\0", min(6, v.name_len))
                v.name_len = 4

        def close(self):
            self.closed = True

    t = NotRocket()
    with pytest.raises(NPUUnavailableError, match="'i915', not 'rocket'"):
        RocketDevice(t)
    assert t.closed


@pytest.mark.skipif(bool(glob.glob("/dev/accel/accel*")), reason="this machine has an accel node")
def test_no_device_is_reported_plainly():
    with pytest.raises(NPUUnavailableError, match="no /dev/accel/accel"):
        open_device(sim=False)


def test_missing_node_path_is_reported():
    with pytest.raises(NPUUnavailableError, match="/nonexistent/accel9"):
        RocketDevice.open("/nonexistent/accel9")


def test_bo_allocation_is_page_aligned_first_fit(dev):
    a = dev.create_bo(100)
    b = dev.create_bo(5000)
    c = dev.create_bo(4096)
    assert (a.iova, b.iova, c.iova) == (0x0, 0x1000, 0x3000)
    assert a.mmap_offset >= MMAP_OFFSET_START and len({a.mmap_offset, b.mmap_offset, c.mmap_offset}) == 3
    b.close()
    d = dev.create_bo(8192)
    assert d.iova == 0x1000  # the hole left by b
    with pytest.raises(NPUDeviceError, match="BO size"):
        dev.create_bo(0)


def test_mapping_is_the_cpu_view_and_sync_moves_data(dev):
    """FINI_BO copies the CPU view to the device, PREP_BO the device view back: a missing
    sync shows as stale data, as on the non-coherent board."""
    a, b = _operands()
    w = prepare_weights(dev, b)
    run = GemmRun(dev, a, w)  # packs and FINIs A
    a2, _ = _operands(seed=7)
    from rosenblatt.npu import layout

    run.feature.write(layout.pack_feature(a2, run.plan.Mp, run.plan.Kp))  # no FINI_BO
    run.submit()
    stale = run.output.read(np.int32, 16).copy()  # read before PREP_BO: not synced yet
    run.wait()
    c = run.result()
    np.testing.assert_array_equal(c, a.astype(np.int32) @ b.astype(np.int32))  # the NPU saw A
    assert not stale.any()
    assert not np.array_equal(c, a2.astype(np.int32) @ b.astype(np.int32))


def test_prep_bo_deadline_is_absolute(dev):
    npu = SimulatedNPU(timing=400.0)  # stretch the modelled run time to ~0.3 s
    d = open_device(sim=True, npu=npu)
    try:
        a, b = _operands(M=64, K=1536, N=1536)
        w = prepare_weights(d, b)
        run = GemmRun(d, a, w)
        run.submit()
        # a relative timeout (a duration, not a CLOCK_MONOTONIC time) is in the past: -EBUSY
        rel = uapi.drm_rocket_prep_bo(handle=run.output.handle, timeout_ns=200_000_000)
        with pytest.raises(OSError) as info:
            d.transport.ioctl(uapi.DRM_IOCTL_ROCKET_PREP_BO, rel)
        assert info.value.errno == errno.EBUSY
        # an absolute deadline before completion: -ETIMEDOUT after waiting until it
        t0 = time.monotonic()
        with pytest.raises(NPUJobError) as info:
            run.output.wait(timeout_s=0.02)
        assert info.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 >= 0.015
        # the device layer's absolute deadline waits for completion
        run.wait(timeout_s=5.0)
        np.testing.assert_array_equal(run.result(), a.astype(np.int32) @ b.astype(np.int32))
    finally:
        d.close()


def test_submit_reads_arrays_through_user_pointers_with_larger_stride(dev):
    """job_struct_size / task_struct_size larger than the kernel's structs: the other side must
    walk the user arrays with the caller's stride and copy only its own struct size."""
    a, b = _operands()
    w = prepare_weights(dev, b)
    run = GemmRun(dev, a, w)
    run.write_program()
    (job,) = run.jobs()

    class PaddedTask(ctypes.Structure):
        _fields_ = [("task", uapi.drm_rocket_task), ("junk", ctypes.c_uint64)]

    class PaddedJob(ctypes.Structure):
        _fields_ = [("job", uapi.drm_rocket_job), ("junk", ctypes.c_uint64 * 3)]

    tasks = (PaddedTask * len(job.tasks))()
    for i, (iova, count) in enumerate(job.tasks):
        tasks[i].task.regcmd, tasks[i].task.regcmd_count, tasks[i].junk = iova, count, 0xDEADBEEF
    ins = (ctypes.c_uint32 * 2)(run.feature.handle, w.bo.handle)
    outs = (ctypes.c_uint32 * 1)(run.output.handle)
    jobs = (PaddedJob * 1)()
    j = jobs[0].job
    j.tasks, j.in_bo_handles, j.out_bo_handles = ctypes.addressof(tasks), ctypes.addressof(ins), ctypes.addressof(outs)
    j.task_count, j.task_struct_size = len(job.tasks), ctypes.sizeof(PaddedTask)
    j.in_bo_handle_count, j.out_bo_handle_count = 2, 1
    jobs[0].junk[0] = 0xFFFFFFFF
    sub = uapi.drm_rocket_submit(jobs=ctypes.addressof(jobs), job_count=1, job_struct_size=ctypes.sizeof(PaddedJob))
    dev._ioctl(uapi.DRM_IOCTL_ROCKET_SUBMIT, sub)
    run.wait()
    np.testing.assert_array_equal(run.result(), a.astype(np.int32) @ b.astype(np.int32))


@pytest.mark.parametrize(
    "field,value",
    [("reserved", 1), ("job_struct_size", 32)],
)
def test_submit_argument_errors(dev, field, value):
    jobs = (uapi.drm_rocket_job * 1)()
    sub = uapi.drm_rocket_submit(jobs=ctypes.addressof(jobs), job_count=1, job_struct_size=40)
    setattr(sub, field, value)
    with pytest.raises(NPUDeviceError, match="DRM_IOCTL_ROCKET_SUBMIT failed: EINVAL") as info:
        dev._ioctl(uapi.DRM_IOCTL_ROCKET_SUBMIT, sub)
    assert info.value.errno == errno.EINVAL


def test_sync_and_close_argument_errors(dev):
    bo = dev.create_bo(64)
    with pytest.raises(NPUDeviceError, match="FINI_BO failed: EINVAL"):
        dev._ioctl(uapi.DRM_IOCTL_ROCKET_FINI_BO, uapi.drm_rocket_fini_bo(handle=bo.handle, reserved=1))
    with pytest.raises(NPUDeviceError, match="PREP_BO failed: EINVAL"):
        dev._ioctl(uapi.DRM_IOCTL_ROCKET_PREP_BO, uapi.drm_rocket_prep_bo(handle=bo.handle, reserved=1))
    with pytest.raises(NPUDeviceError, match="FINI_BO failed: ENOENT"):
        dev._ioctl(uapi.DRM_IOCTL_ROCKET_FINI_BO, uapi.drm_rocket_fini_bo(handle=999))
    with pytest.raises(NPUDeviceError, match="GEM_CLOSE failed: EINVAL"):
        dev._ioctl(uapi.DRM_IOCTL_GEM_CLOSE, uapi.drm_gem_close(handle=999))
    bo.wait()  # an idle BO: PREP_BO returns at once
    bo.close()
    with pytest.raises(NPUDeviceError, match="closed"):
        bo.array


def test_empty_submit_is_a_no_op(dev):
    dev.submit([])
    assert dev.transport.take_faults() == []


def test_stats_accumulate(dev):
    from rosenblatt.npu import matmul_int8

    a, b = _operands(M=64, K=1536, N=256)
    matmul_int8(a, b, dev)
    first = dev.stats.last
    matmul_int8(a[:4], b, dev)
    assert dev.stats.calls == 2
    assert dev.stats.tasks == first.tasks + dev.stats.last.tasks
    assert dev.stats.jobs == first.jobs + dev.stats.last.jobs
    assert dev.stats.submits == 2


def test_context_manager_closes_everything():
    with open_device(sim=True) as d:
        bo = d.create_bo(4096)
        t = d.transport
    assert d.closed and bo.closed and t.closed
    with pytest.raises(NPUDeviceError, match="closed"):
        d.create_bo(64)


def test_jobs_referencing_foreign_bos_are_refused(dev):
    other = open_device(sim=True)
    try:
        foreign = other.create_bo(64)
        from rosenblatt.npu import NPUSubmitError

        with pytest.raises(NPUSubmitError, match="not open on this device"):
            dev.submit([JobSpec(tasks=[(0, 2)], in_bos=[foreign], out_bos=[])])
    finally:
        other.close()
