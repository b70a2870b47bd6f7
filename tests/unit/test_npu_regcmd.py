"""regcmd words and tiling plans: golden values from public sources and plan invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosenblatt.npu import hw_assumptions as hw
from rosenblatt.npu import plan as P
from rosenblatt.npu import registers as R
from rosenblatt.npu import regcmd


def test_word_encoding():
    # §3: word = target << 48 | value << 16 | reg
    assert R.encode(0x0201, 0x1070, 0x12345670) == 0x0201_1234_5670_1070
    assert R.op_marker() == 0x0041_0000_0000_0000
    assert R.op_enable(0x1D) == 0x0081_0000_001D_0008
    assert R.decode(0x1001_0000_07FE_4050) == (0x1001, 0x4050, 0x7FE)
    with pytest.raises(ValueError):
        R.encode(0x0201, 0x1070, 1 << 32)


def test_field_overflow_is_refused_by_the_builder():
    with pytest.raises(ValueError, match="DATAIN_HEIGHT"):
        R.CNA_DATA_SIZE0.pack(DATAIN_WIDTH=1, DATAIN_HEIGHT=2048)
    with pytest.raises(ValueError, match="outside its fields"):
        R.write(R.CNA_DATA_SIZE0, 1 << 11)


def _task_values(M, K, N):
    p = P.plan_gemm(M, K, N)
    assert p.task_count == 1
    regs = regcmd.task_registers(p.tasks[0], p, 0x10000, 0x20000, 0x30000)
    return p, {reg.offset: v for reg, v in regs}


def test_single_task_matches_mtx512_int8_matmul():
    """Register values of mtx512's raw int8 matmul (reference §4.7) for M=32, K=64, N=32."""
    M, K, N = 32, 64, 32
    p, v = _task_values(M, K, N)
    assert v[R.CNA_CONV_CON1.offset] == 0
    assert v[R.CNA_CONV_CON2.offset] == (M + 1) << 4
    assert v[R.CNA_DATA_SIZE0.offset] == (1 << 16) | M
    assert v[R.CNA_DATA_SIZE1.offset] == ((K - 1) << 16) | K
    assert v[R.CNA_DATA_SIZE2.offset] == 1
    assert v[R.CNA_DATA_SIZE3.offset] == M
    assert v[R.CNA_WEIGHT_SIZE0.offset] == K * N
    assert v[R.CNA_WEIGHT_SIZE1.offset] == K
    assert v[R.CNA_WEIGHT_SIZE2.offset] == 0x01010000 | N
    assert v[R.CNA_CBUF_CON1.offset] == -(-K // 64)
    assert v[R.CNA_CVT_CON0.offset] == 0xB
    assert v[R.CNA_DMA_CON0.offset] == 0x000F000F
    assert v[R.CNA_DMA_CON1.offset] == 4
    assert v[R.CNA_DMA_CON2.offset] == 4 * (M // 4 - 1)
    assert v[R.CNA_FC_DATA_SIZE0.offset] == (1 << 16) | M
    assert v[R.CNA_FC_DATA_SIZE1.offset] == K
    assert v[R.CORE_DATAOUT_SIZE_0.offset] == (M - 1) << 16
    assert v[R.CORE_DATAOUT_SIZE_1.offset] == N - 1
    assert v[R.DPU_FEATURE_MODE_CFG.offset] == 0x1E4
    assert v[R.DPU_DATA_FORMAT.offset] == 0x80000000
    assert v[R.DPU_DST_SURF_STRIDE.offset] == M * 16
    assert v[R.DPU_DATA_CUBE_HEIGHT.offset] == M - 1
    assert v[R.DPU_DATA_CUBE_CHANNEL.offset] == ((N - 1) << 16) | (N - 1)
    assert v[R.DPU_BS_CFG.offset] == 0x53
    assert v[R.DPU_BS_OW_CFG.offset] == 0x7FE
    assert v[R.DPU_BN_CFG.offset] == 0x53
    assert v[R.DPU_EW_CFG.offset] == 0x383
    assert v[R.DPU_OUT_CVT_SCALE.offset] == 1
    assert v[R.DPU_OUT_CVT_SHIFT.offset] == 0
    assert v[R.DPU_SURFACE_ADD.offset] == (8 * M) << 4
    assert v[R.CNA_FEATURE_DATA_ADDR.offset] == 0x10000
    assert v[R.CNA_DCOMP_ADDR0.offset] == 0x20000
    assert v[R.DPU_DST_BASE_ADDR.offset] == 0x30000


def test_mesa_rdma_block_when_enabled():
    _, v = _task_values(4, 32, 32)
    if hw.PROGRAM_DPU_RDMA:
        assert v[R.RDMA_FEATURE_MODE_CFG.offset] == 0x7810  # burst 15 + MRDMA_DISABLE (Mesa)
        assert v[R.RDMA_ERDMA_CFG.offset] == 1
        assert v[R.RDMA_WEIGHT.offset] == 0x01010101
    else:
        assert R.RDMA_FEATURE_MODE_CFG.offset not in v


def test_task_words_tail_and_parity():
    p = P.plan_gemm(4, 32, 32)
    w = regcmd.task_words(p.tasks[0], p, 0, 0x1000, 0x2000)
    assert w.dtype == np.uint64
    assert len(w) % 2 == 0
    assert [int(x) for x in w[-4:]] == [0, 0x0101_0000_0000_0014, 0x0041_0000_0000_0000,
                                         0x0081_0000_0000_0008 | (hw.OP_ENABLE_MASK << 16)]
    # every register written exactly once, none of them a PC register
    offs = [int(x) & 0xFFFF for x in w[:-4] if int(x)]
    assert len(offs) == len(set(offs))
    assert all(off >= 0x1000 for off in offs)


def test_program_builder_alignment_and_amounts():
    b = regcmd.ProgramBuilder()
    t1 = b.add(np.arange(1, 12, dtype=np.uint64))  # 11 words
    t2 = b.add(np.arange(1, 5, dtype=np.uint64))
    assert t1.offset == 0 and t1.count == 11
    assert t2.offset % hw.REGCMD_TASK_ALIGN == 0 and t2.offset >= 88
    data = b.to_bytes()
    assert data.size == b.nbytes
    assert int(data[t2.offset : t2.offset + 8].view("<u8")[0]) == 1
    assert regcmd.regcmd_amount(130) == 64  # Mesa's 130-word task
    assert regcmd.regcmd_amount(11) == 5
    with pytest.raises(ValueError):
        b.add(np.zeros(0, np.uint64))


def test_k_tiling_depends_on_k_only_and_fits():
    t = P.plan_k_tiling(8960)
    assert [kt for _, kt in t.tiles] == [3008, 3008, 2944]
    assert P.plan_k_tiling(1536).tiles == ((0, 1536),)
    for M in (1, 7, 128, 512):
        assert P.plan_gemm(M, 8960, 256).ktiling is t


def _check_plan(p):
    covered = np.zeros((p.ktiling.count, p.Mp, p.Np), dtype=np.int32)
    for job_index, job in enumerate(p.jobs):
        weights = {(p.tasks[i].k0, p.tasks[i].n0, p.tasks[i].nt) for i in job}
        assert len(weights) == 1, "tasks of a job share one weight slice"
        for pos, i in enumerate(job):
            t = p.tasks[i]
            assert t.job == job_index
            assert t.weight_reuse == (pos > 0 and hw.WEIGHT_REUSE_WITHIN_JOB and t.weights_resident)
            assert (t.data_banks, t.weight_banks) == (p.tasks[job[0]].data_banks, p.tasks[job[0]].weight_banks)
    for t in p.tasks:
        assert t.mt % hw.ROW_ALIGN == 0 and t.m0 % hw.ROW_ALIGN == 0
        assert t.nt % 32 == 0 and t.kt % 32 == 0 and t.n0 % 32 == 0
        assert 1 <= t.mt <= hw.MAX_ROWS_PER_TASK and t.nt <= P.MAX_KERNELS_PER_TASK
        assert t.data_banks + t.weight_banks <= hw.CBUF_BANKS
        assert hw.cbuf_data_banks(1, t.mt, t.kt) <= t.data_banks
        # one 32-kernel weight group fits its banks; whole weights beyond them stream
        assert hw.cbuf_weight_banks(t.kt * hw.WEIGHT_KERNEL_GROUP) <= t.weight_banks
        assert t.weights_resident == (hw.cbuf_weight_banks(t.kt * t.nt) <= t.weight_banks)
        assert t.kt <= hw.MAX_BYTES_PER_KERNEL
        covered[t.k_index, t.m0 : t.m0 + t.mt, t.n0 : t.n0 + t.nt] += 1
        # the registers of every task fit their fields (the builder raises otherwise)
        regcmd.task_registers(t, p, 0, 0x4000_0000, 0x8000_0000)
    assert (covered == 1).all(), "each output element of each K tile is written exactly once"


@pytest.mark.parametrize("M,K,N", [(1, 1536, 1536), (1, 1536, 256), (128, 1536, 8960), (128, 8960, 1536),
                                   (512, 1536, 8960), (7, 100, 33), (512, 32, 8960), (544, 544, 4096),
                                   (1, 4096, 4096), (1024, 64, 64), (600, 11000, 9000)])
def test_plans_of_interesting_shapes(M, K, N):
    _check_plan(P.plan_gemm(M, K, N))


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 600), K=st.integers(1, 20000), N=st.integers(1, 10000))
@pytest.mark.slow
def test_plans_fit_the_hardware(M, K, N):
    _check_plan(P.plan_gemm(M, K, N))


def test_jobs_stay_within_the_time_budget():
    p = P.plan_gemm(512, 8960, 1536)
    for job in p.jobs:
        seconds = sum(P._task_seconds(p.tasks[i].mt, p.tasks[i].nt, p.tasks[i].kt, True) for i in job)
        assert seconds <= hw.JOB_TIME_BUDGET_S + 1e-3
