"""The simulator refuses what the hardware would fault or hang on (one test per refusal).

Every refusal is seen the way the kernel shows it: SUBMIT returns normally, the job never
completes (PREP_BO -ETIMEDOUT), and the device layer raises ``NPUJobError`` naming the fault.
The tampered programs start from a correct GEMM program (checked to run first) and change one
thing, so each test shows exactly that one thing is refused, never silently computed.
"""

import errno

import numpy as np
import pytest

from rosenblatt.npu import JobSpec, NPUJobError, NPUSubmitError, matmul_int8, open_device
from rosenblatt.npu import registers as R
from rosenblatt.npu.gemm import GemmRun, prepare_weights


@pytest.fixture
def dev():
    d = open_device(sim=True)
    yield d
    d.close()


def _stage(dev, M=8, K=64, N=64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    w = prepare_weights(dev, b)
    return GemmRun(dev, a, w), a, b


def _index(words, reg):
    hits = [i for i, x in enumerate(words) if int(x) & 0xFFFF == reg.offset and (int(x) >> 48) == R.target_for(reg)]
    assert len(hits) == 1, reg.qualname
    return hits[0]


def set_reg(words, reg, value):
    """Replace the word writing ``reg`` by a raw write of ``value`` (no field checks)."""
    words = words.copy()
    words[_index(words, reg)] = R.encode(R.target_for(reg), reg.offset, value)
    return words


def drop_reg(words, reg):
    words = words.copy()
    words[_index(words, reg)] = 0
    return words


def get_reg(words, reg):
    return (int(words[_index(words, reg)]) >> 16) & 0xFFFFFFFF


def expect_fault(run, code, *, jobs=None, validate=False):
    """Submit (which must not raise) and see the job fail with ``code``."""
    if jobs is None:
        run.submit(validate=validate)
    else:
        run.device.submit(jobs, validate=validate)
    with pytest.raises(NPUJobError) as info:
        run.wait(timeout_s=1.0)
    err = info.value
    assert err.code == code, str(err)
    assert err.errno in (errno.ETIMEDOUT, None)
    assert code in str(err)
    return err


def test_untampered_program_runs(dev):
    run, a, b = _stage(dev)
    run.submit()
    run.wait()
    np.testing.assert_array_equal(run.result(), a.astype(np.int32) @ b.astype(np.int32))


# --- addresses outside the fd's BOs -----------------------------------------------------------
@pytest.mark.parametrize(
    "reg,what",
    [(R.CNA_FEATURE_DATA_ADDR, "CNA feature read"), (R.CNA_DCOMP_ADDR0, "CNA weight read"),
     (R.DPU_DST_BASE_ADDR, "DPU output write")],
)
def test_refuses_address_outside_bos(dev, reg, what):
    run, _, _ = _stage(dev)
    run.task_words[0] = set_reg(run.task_words[0], reg, 0xF000_0000)
    err = expect_fault(run, "iova-unmapped")
    assert what in str(err) and "0xf0000000" in str(err)


def test_refuses_access_running_past_the_last_bo(dev):
    run, _, _ = _stage(dev)
    run.write_program()  # every BO of the run exists now
    end = max(bo.iova + -(-bo.size // 4096) * 4096 for bo in dev._bos.values())
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_FEATURE_DATA_ADDR, end - 32)
    run.write_program()
    err = expect_fault(run, "iova-unmapped")
    assert f"{end:#x}" in str(err)


def test_refuses_a_closed_bo(dev):
    run, _, _ = _stage(dev)
    run.write_program()
    jobs = run.jobs()
    run.weights.close()  # GEM_CLOSE unmaps its IOVA
    for job in jobs:
        job.in_bos = [run.feature]
    expect_fault(run, "iova-unmapped", jobs=jobs)


def test_refuses_regcmd_outside_bos(dev):
    run, _, _ = _stage(dev)
    jobs = run.jobs()
    jobs[0].tasks[0] = (0xFFFF_0000, jobs[0].tasks[0][1])
    err = expect_fault(run, "iova-unmapped", jobs=jobs)
    assert "regcmd fetch" in str(err)


# --- regcmd buffer ---------------------------------------------------------------------------------
def test_refuses_misaligned_regcmd(dev):
    run, _, _ = _stage(dev)
    jobs = run.jobs()
    iova, count = jobs[0].tasks[0]
    jobs[0].tasks[0] = (iova + 8, count)
    with pytest.raises(NPUSubmitError, match="16-byte aligned"):
        dev.submit(jobs)  # the device layer refuses it itself ...
    expect_fault(run, "regcmd-misaligned", jobs=jobs)  # ... and the NPU would not run it


def test_refuses_regcmd_count_beyond_pc_field(dev):
    run, _, _ = _stage(dev)
    jobs = run.jobs()
    jobs[0].tasks[0] = (jobs[0].tasks[0][0], 2 * 0x10000 + 2)
    with pytest.raises(NPUSubmitError, match="PC_DATA_AMOUNT"):
        dev.submit(jobs)
    expect_fault(run, "regcmd-count", jobs=jobs)


def test_refuses_task_without_op_enable(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-1] = 0
    err = expect_fault(run, "no-op-enable")
    assert "hangs" in str(err)


def test_refuses_count_that_leaves_out_the_tail(dev):
    # under rocket the tail must be counted in regcmd_count, else op-enable is never fetched
    run, _, _ = _stage(dev)
    jobs = run.jobs()
    jobs[0].tasks[0] = (jobs[0].tasks[0][0], jobs[0].tasks[0][1] - 4)
    expect_fault(run, "no-op-enable", jobs=jobs)


def test_refuses_op_enable_without_marker(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-2] = 0
    expect_fault(run, "op-marker")


def test_refuses_task_without_dpu(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-1] = R.op_enable(R.OPEN_CNA | R.OPEN_CORE)
    err = expect_fault(run, "no-dpu")
    assert "never completes" in str(err)


def test_refuses_words_after_op_enable(dev):
    run, _, _ = _stage(dev)
    extra = np.array([R.write(R.DPU_OFFSET_PEND, 0), 0], dtype=np.uint64)
    run.task_words[0] = np.concatenate([run.task_words[0], extra])
    expect_fault(run, "trailing-words")


def test_refuses_unknown_register_and_wrong_target(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][0] = R.encode(R.TARGET_CNA, 0x1FFC, 0)
    expect_fault(run, "unknown-register")
    run2, _, _ = _stage(dev, seed=1)
    run2.task_words[0][0] = R.encode(R.TARGET_DPU, R.CNA_CONV_CON1.offset, 0)  # CNA reg via DPU target
    expect_fault(run2, "unknown-register")


# --- CBUF --------------------------------------------------------------------------------------------
def test_refuses_more_than_twelve_banks(dev):
    run, _, _ = _stage(dev)
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_CBUF_CON0, R.CNA_CBUF_CON0.pack(DATA_BANK=6, WEIGHT_BANK=7))
    err = expect_fault(run, "cbuf-banks")
    assert "6 data + 7 weight" in str(err)


def test_refuses_input_larger_than_its_banks(dev):
    run, _, _ = _stage(dev, M=64, K=1536, N=32)  # 64 rows x 1536 channels need 3 banks
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_CBUF_CON0, R.CNA_CBUF_CON0.pack(DATA_BANK=1, WEIGHT_BANK=11))
    expect_fault(run, "cbuf-overflow")


def test_refuses_weight_group_larger_than_its_banks(dev):
    run, _, _ = _stage(dev, M=4, K=1536, N=64)  # one 32-kernel group of 1536 channels: 48 KiB, 2 banks
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_CBUF_CON0, R.CNA_CBUF_CON0.pack(DATA_BANK=11, WEIGHT_BANK=1))
    err = expect_fault(run, "cbuf-overflow")
    assert "group" in str(err)


def test_streams_weights_larger_than_their_banks(dev):
    # 384 KiB of weights (12 banks' worth) through 2 weight banks: each 48 KiB group fits
    run, a, b = _stage(dev, M=4, K=1536, N=256)
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_CBUF_CON0, R.CNA_CBUF_CON0.pack(DATA_BANK=10, WEIGHT_BANK=2))
    run.submit()
    run.wait()
    np.testing.assert_array_equal(run.result(), a.astype(np.int32) @ b.astype(np.int32))


def test_refuses_weight_reuse_of_streamed_weights(dev):
    # 256 x 1536 x 256: 2 M tiles in one job, the 384 KiB of weights stream (not resident)
    run, _, _ = _stage(dev, M=256, K=1536, N=256)
    assert run.plan.job_count == 1 and run.plan.task_count == 2
    assert not any(t.weights_resident or t.weight_reuse for t in run.plan.tasks)
    cb = get_reg(run.task_words[1], R.CNA_CBUF_CON0)
    run.task_words[1] = set_reg(run.task_words[1], R.CNA_CBUF_CON0, cb | R.CNA_CBUF_CON0.pack(WEIGHT_REUSE=1))
    err = expect_fault(run, "weight-reuse")
    assert "streamed" in str(err)


def test_refuses_weight_reuse_without_resident_weights(dev):
    run, _, _ = _stage(dev)
    cb = get_reg(run.task_words[0], R.CNA_CBUF_CON0)
    run.task_words[0] = set_reg(run.task_words[0], R.CNA_CBUF_CON0, cb | R.CNA_CBUF_CON0.pack(WEIGHT_REUSE=1))
    expect_fault(run, "weight-reuse")


def test_weight_reuse_within_a_job_is_honoured(dev):
    # 1040 x 64 x 64 runs 3 M tiles in one job; the 4 KiB of weights stay resident and tasks
    # 2..3 reuse them
    rng = np.random.default_rng(9)
    a = rng.integers(-128, 128, (1040, 64), dtype=np.int8)
    b = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    w = prepare_weights(dev, b)
    run = GemmRun(dev, a, w)
    assert any(t.weight_reuse for t in run.plan.tasks)
    run.submit()
    run.wait()
    np.testing.assert_array_equal(run.result(), a.astype(np.int32) @ b.astype(np.int32))


# --- precision, mode, field ranges ----------------------------------------------------------------
@pytest.mark.parametrize(
    "reg,value",
    [(R.CNA_CONV_CON1, R.CNA_CONV_CON1.pack(IN_PRECISION=R.PREC_FP16, PROC_PRECISION=R.PREC_FP16)),
     (R.CORE_MISC_CFG, R.CORE_MISC_CFG.pack(PROC_PRECISION=R.PREC_INT16)),
     (R.DPU_DATA_FORMAT, R.DPU_DATA_FORMAT.pack(OUT_PRECISION=R.PREC_INT8))],
    ids=["cna-fp16", "core-int16", "dpu-int8-out"],
)
def test_refuses_unsupported_precision(dev, reg, value):
    run, _, _ = _stage(dev)
    run.task_words[0] = set_reg(run.task_words[0], reg, value)
    expect_fault(run, "unsupported-precision")


@pytest.mark.parametrize(
    "reg,value",
    [(R.CNA_CONV_CON1, R.CNA_CONV_CON1.pack(CONV_MODE=3)),  # depthwise
     (R.DPU_BS_CFG, 0x20150),  # Mesa's bias add
     (R.DPU_BS_OW_CFG, R.DPU_BS_OW_CFG.pack(SIZE_E_2=7, SIZE_E_1=7, SIZE_E_0=7)),  # CPEND on
     (R.DPU_OUT_CVT_SCALE, R.DPU_OUT_CVT_SCALE.pack(OUT_CVT_SCALE=16449)),  # requantisation
     (R.CNA_CONV_CON3, R.CNA_CONV_CON3.pack(CONV_X_STRIDE=2, CONV_Y_STRIDE=2))],
    ids=["depthwise", "bias", "cpend", "requant", "stride2"],
)
def test_refuses_unsupported_mode(dev, reg, value):
    run, _, _ = _stage(dev)
    run.task_words[0] = set_reg(run.task_words[0], reg, value)
    expect_fault(run, "unsupported-mode")


def test_refuses_ppu_in_op_enable(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-1] = R.op_enable(R.OPEN_CNA | R.OPEN_CORE | R.OPEN_DPU | R.OPEN_PPU)
    expect_fault(run, "unsupported-mode")


@pytest.mark.parametrize(
    "reg,value",
    [(R.CNA_DATA_SIZE0, (1 << 16) | 2048),  # height 2048 spills out of its 11-bit field
     (R.CNA_WEIGHT_SIZE2, 0x01010000),  # zero kernels
     (R.DPU_DATA_CUBE_CHANNEL, 1 << 13)],  # 8192 spills into a reserved bit
    ids=["height-overflow", "zero-kernels", "channel-overflow"],
)
def test_refuses_field_out_of_range(dev, reg, value):
    run, _, _ = _stage(dev)
    run.task_words[0] = set_reg(run.task_words[0], reg, value)
    expect_fault(run, "field-range")


def test_refuses_op_enable_with_unknown_bits(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-1] = R.op_enable(0x1D | 0x100)
    expect_fault(run, "field-range")


def test_refuses_inconsistent_registers(dev):
    run, _, _ = _stage(dev, N=64)
    run.task_words[0] = set_reg(run.task_words[0], R.DPU_DATA_CUBE_CHANNEL, (31 << 16) | 31)
    err = expect_fault(run, "inconsistent")
    assert "DATA_CUBE_CHANNEL" in str(err)


def test_refuses_misaligned_output(dev):
    run, _, _ = _stage(dev)
    dst = get_reg(run.task_words[0], R.DPU_DST_BASE_ADDR)
    run.task_words[0] = set_reg(run.task_words[0], R.DPU_DST_BASE_ADDR, dst + 4)
    expect_fault(run, "dst-misaligned")


def test_refuses_relying_on_a_register_from_an_earlier_task(dev):
    # run a good GEMM first, so the core's register file holds every value the task needs ...
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (8, 64), dtype=np.int8)
    b = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    matmul_int8(a, b, dev)
    # ... then leave one out: it is still in the register file, but the task did not write it
    run, _, _ = _stage(dev)
    run.task_words[0] = drop_reg(run.task_words[0], R.DPU_DST_SURF_STRIDE)
    err = expect_fault(run, "register-unwritten")
    assert "DPU.DST_SURF_STRIDE" in str(err)


# --- what the kernel itself drops (SUBMIT still returns 0) ------------------------------------------
def test_kernel_drops_job_without_tasks(dev):
    run, _, _ = _stage(dev)
    jobs = [JobSpec(tasks=[], in_bos=[run.feature], out_bos=[run.output])]
    with pytest.raises(NPUSubmitError, match="no tasks"):
        dev.submit(jobs)
    dev.submit(jobs, validate=False)  # returns normally, like the kernel
    with pytest.raises(NPUJobError) as info:
        run.wait(timeout_s=1.0)
    assert info.value.code == "job-rejected" and "SUBMIT still returned 0" in str(info.value)


def test_kernel_drops_job_with_zero_regcmd_count(dev):
    run, _, _ = _stage(dev)
    jobs = run.jobs()
    jobs[0].tasks[0] = (jobs[0].tasks[0][0], 0)
    with pytest.raises(NPUSubmitError, match="regcmd_count 0"):
        dev.submit(jobs)
    dev.submit(jobs, validate=False)
    with pytest.raises(NPUJobError) as info:
        run.wait(timeout_s=1.0)
    assert info.value.code == "job-rejected"


def test_device_recovers_after_a_fault(dev):
    run, _, _ = _stage(dev)
    run.task_words[0][-1] = 0
    expect_fault(run, "no-op-enable")
    rng = np.random.default_rng(4)
    a = rng.integers(-128, 128, (7, 100), dtype=np.int8)
    b = rng.integers(-128, 128, (100, 33), dtype=np.int8)
    np.testing.assert_array_equal(matmul_int8(a, b, dev), a.astype(np.int32) @ b.astype(np.int32))


def test_cpu_write_to_an_input_of_a_job_not_yet_waited_for(dev):
    """The kernel fences out-BOs only (hw.IN_BO_FENCES): rewriting a job's input before waiting
    on its output races the NPU. The simulator refuses it: the job in flight never completes."""
    run, a, b = _stage(dev)
    run.submit()
    run.feature.write(np.zeros(8, np.uint8))
    run.feature.sync_for_device()                   # FINI_BO of the feature BO the job reads
    with pytest.raises(NPUJobError) as e:
        run.wait(0.5)
    assert e.value.code == "bo-busy"
    # after a wait the same write is legal
    run2, a2, b2 = _stage(dev, seed=1)
    run2.submit()
    run2.wait()
    run2.feature.write(np.zeros(8, np.uint8))
    run2.feature.sync_for_device()
    assert not dev.transport.take_faults()
