"""Register-command (regcmd) programs for INT8 x INT8 -> INT32 GEMM tasks (stage 2).

A GEMM task is a 1x1 convolution of a feature cube of width 1, height ``mt`` (rows of A) and
``kt`` channels (a K range) with ``nt`` kernels (columns of B), written by the DPU as raw int32
(no bias, no requantisation: the configuration reported bit-exact on hardware,
docs/npu-reference.md §4.7 and §7.2). :func:`task_registers` lists the register writes in
program order; :func:`task_words` turns them into 64-bit words with the tail
(``0``, ``PC REGISTER_AMOUNTS = 0``, the 0x0041 marker, op-enable); :class:`ProgramBuilder`
lays the tasks of a plan out in one regcmd buffer (each task 64-byte aligned) and gives each
task's IOVA and ``regcmd_count`` for SUBMIT.

Every register the task relies on is written in the task itself: the kernel does not reset
register state between tasks and the simulator refuses a task that leans on an old value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import hw_assumptions as hw
from . import registers as R
from .plan import GemmPlan, GemmTask

#: Fixed DPU/CNA settings (values checked against mtx512's int8 matmul in the tests).
_DMA_BURST = 15


def task_registers(
    task: GemmTask, plan: GemmPlan, feature_iova: int, weight_iova: int, output_iova: int
) -> list[tuple[R.Reg, int]]:
    """Register writes (in program order) of one GEMM task. Addresses are absolute IOVAs of
    the packed feature buffer, the packed weight buffer and the output buffer."""
    mt, nt, kt, Mp = task.mt, task.nt, task.kt, plan.Mp
    rows_plane = Mp * hw.FEATURE_ATOM_BYTES  # one 16-channel plane of the whole A
    out_plane = Mp * 16  # one 4-channel int32 plane of the whole C
    line = hw.cna_line_stride(1)
    surf = hw.cna_surf_stride(1, rows_plane)
    feat = feature_iova + task.feature_offset
    wgt = weight_iova + task.weight_offset
    dst = output_iova + task.output_offset
    for name, addr in (("feature", feat), ("weight", wgt), ("output", dst)):
        if not 0 <= addr < (1 << 32):
            raise ValueError(f"{name} IOVA {addr:#x} is outside the 32-bit NPU address space")
    regs: list[tuple[R.Reg, int]] = []
    w = regs.append

    w((R.DPU_S_POINTER, R.DPU_S_POINTER.pack(POINTER_PP_MODE=1, EXECUTER_PP_EN=1, POINTER_PP_EN=1)))
    if hw.PROGRAM_DPU_RDMA:
        w((R.RDMA_S_POINTER, R.RDMA_S_POINTER.pack(POINTER_PP_MODE=1, EXECUTER_PP_EN=1, POINTER_PP_EN=1)))
    # --- CNA: input feature, weights, CBUF ---------------------------------------------
    w((R.CNA_CONV_CON1, R.CNA_CONV_CON1.pack(PROC_PRECISION=R.PREC_INT8, IN_PRECISION=R.PREC_INT8, CONV_MODE=0)))
    w((R.CNA_CONV_CON2, R.CNA_CONV_CON2.pack(KERNEL_GROUP=0, FEATURE_GRAINS=hw.feature_grains(mt))))
    w((R.CNA_CONV_CON3, R.CNA_CONV_CON3.pack(CONV_Y_STRIDE=1, CONV_X_STRIDE=1)))
    w((R.CNA_DATA_SIZE0, R.CNA_DATA_SIZE0.pack(DATAIN_WIDTH=1, DATAIN_HEIGHT=mt)))
    w((R.CNA_DATA_SIZE1, R.CNA_DATA_SIZE1.pack(DATAIN_CHANNEL_REAL=kt - 1, DATAIN_CHANNEL=kt)))
    w((R.CNA_DATA_SIZE2, R.CNA_DATA_SIZE2.pack(DATAOUT_WIDTH=1)))
    w((R.CNA_DATA_SIZE3, R.CNA_DATA_SIZE3.pack(DATAOUT_ATOMICS=mt)))
    w((R.CNA_WEIGHT_SIZE0, R.CNA_WEIGHT_SIZE0.pack(WEIGHT_BYTES=kt * nt)))
    w((R.CNA_WEIGHT_SIZE1, R.CNA_WEIGHT_SIZE1.pack(WEIGHT_BYTES_PER_KERNEL=kt)))
    w((R.CNA_WEIGHT_SIZE2, R.CNA_WEIGHT_SIZE2.pack(WEIGHT_WIDTH=1, WEIGHT_HEIGHT=1, WEIGHT_KERNELS=nt)))
    w((R.CNA_CBUF_CON0, R.CNA_CBUF_CON0.pack(
        WEIGHT_REUSE=int(task.weight_reuse), WEIGHT_BANK=task.weight_banks, DATA_BANK=task.data_banks)))
    w((R.CNA_CBUF_CON1, R.CNA_CBUF_CON1.pack(DATA_ENTRIES=hw.cbuf_data_entries(1, kt))))
    w((R.CNA_CVT_CON0, R.CNA_CVT_CON0.pack(DATA_SIGN=1, CVT_TYPE=1, CVT_BYPASS=1)))
    for reg in (R.CNA_CVT_CON1, R.CNA_CVT_CON2, R.CNA_CVT_CON3, R.CNA_CVT_CON4):
        w((reg, reg.pack(CVT_SCALE=1)))
    w((R.CNA_FC_CON0, 0))
    w((R.CNA_FC_CON1, 0))
    w((R.CNA_PAD_CON0, 0))
    w((R.CNA_FEATURE_DATA_ADDR, feat))
    w((R.CNA_FC_CON2, 0))
    w((R.CNA_DMA_CON0, R.CNA_DMA_CON0.pack(WEIGHT_BURST_LEN=_DMA_BURST, DATA_BURST_LEN=_DMA_BURST)))
    w((R.CNA_DMA_CON1, R.CNA_DMA_CON1.pack(LINE_STRIDE=line)))
    w((R.CNA_DMA_CON2, R.CNA_DMA_CON2.pack(SURF_STRIDE=surf & 0x0FFFFFFF)))
    w((R.CNA_FC_DATA_SIZE0, R.CNA_FC_DATA_SIZE0.pack(DMA_WIDTH=1, DMA_HEIGHT=mt)))
    w((R.CNA_FC_DATA_SIZE1, R.CNA_FC_DATA_SIZE1.pack(DMA_CHANNEL=kt)))
    w((R.CNA_DCOMP_CTRL, 0))
    w((R.CNA_DCOMP_REGNUM, 0))
    w((R.CNA_DCOMP_ADDR0, wgt))
    for reg in R.CNA_DCOMP_AMOUNT:
        w((reg, 0))
    w((R.CNA_CVT_CON5, 0))
    w((R.CNA_PAD_CON1, 0))
    # --- CORE: int8 MAC, int32 accumulate, no truncation --------------------------------
    w((R.CORE_MISC_CFG, R.CORE_MISC_CFG.pack(PROC_PRECISION=R.PREC_INT8, QD_EN=hw.CORE_QD_EN)))
    w((R.CORE_DATAOUT_SIZE_0, R.CORE_DATAOUT_SIZE_0.pack(DATAOUT_HEIGHT=mt - 1, DATAOUT_WIDTH=0)))
    w((R.CORE_DATAOUT_SIZE_1, R.CORE_DATAOUT_SIZE_1.pack(DATAOUT_CHANNEL=nt - 1)))
    w((R.CORE_CLIP_TRUNCATE, 0))
    w((R.CORE_3030, 0))
    # --- DPU: everything bypassed, raw int32 to memory ----------------------------------
    w((R.DPU_FEATURE_MODE_CFG, R.DPU_FEATURE_MODE_CFG.pack(BURST_LEN=_DMA_BURST, CONV_MODE=0, OUTPUT_MODE=2, FLYING_MODE=0)))
    w((R.DPU_DATA_FORMAT, R.DPU_DATA_FORMAT.pack(OUT_PRECISION=R.PREC_INT32, IN_PRECISION=R.PREC_INT8, PROC_PRECISION=R.PREC_INT8)))
    w((R.DPU_OFFSET_PEND, 0))
    w((R.DPU_DST_BASE_ADDR, dst))
    w((R.DPU_DST_SURF_STRIDE, R.DPU_DST_SURF_STRIDE.pack(DST_SURF_STRIDE=out_plane >> 4)))
    w((R.DPU_DATA_CUBE_WIDTH, R.DPU_DATA_CUBE_WIDTH.pack(WIDTH=0)))
    w((R.DPU_DATA_CUBE_HEIGHT, R.DPU_DATA_CUBE_HEIGHT.pack(HEIGHT=mt - 1)))
    w((R.DPU_DATA_CUBE_NOTCH_ADDR, 0))
    w((R.DPU_DATA_CUBE_CHANNEL, R.DPU_DATA_CUBE_CHANNEL.pack(ORIG_CHANNEL=nt - 1, CHANNEL=nt - 1)))
    bypass = dict(RELU_BYPASS=1, MUL_BYPASS=1, ALU_BYPASS=1, BYPASS=1)
    w((R.DPU_BS_CFG, R.DPU_BS_CFG.pack(**bypass)))
    w((R.DPU_BS_ALU_CFG, 0))
    w((R.DPU_BS_MUL_CFG, 0))
    w((R.DPU_BS_RELUX_CMP_VALUE, 0))
    se = hw.SIZE_E_INT32
    w((R.DPU_BS_OW_CFG, R.DPU_BS_OW_CFG.pack(SIZE_E_2=se, SIZE_E_1=se, SIZE_E_0=se, OD_BYPASS=1)))
    w((R.DPU_BS_OW_OP, 0))
    w((R.DPU_WDMA_SIZE_0, R.DPU_WDMA_SIZE_0.pack(CHANNEL_WDMA=nt - 1)))
    w((R.DPU_WDMA_SIZE_1, R.DPU_WDMA_SIZE_1.pack(HEIGHT_WDMA=mt - 1, WIDTH_WDMA=0)))
    w((R.DPU_BN_CFG, R.DPU_BN_CFG.pack(**bypass)))
    w((R.DPU_BN_ALU_CFG, 0))
    w((R.DPU_BN_MUL_CFG, 0))
    w((R.DPU_BN_RELUX_CMP_VALUE, 0))
    w((R.DPU_EW_CFG, R.DPU_EW_CFG.pack(EW_RELU_BYPASS=1, EW_OP_CVT_BYPASS=1, EW_LUT_BYPASS=1,
                                       EW_OP_BYPASS=1, EW_BYPASS=1)))
    w((R.DPU_EW_CVT_OFFSET_VALUE, 0))
    w((R.DPU_EW_CVT_SCALE_VALUE, R.DPU_EW_CVT_SCALE_VALUE.pack(EW_OP_CVT_SCALE=1)))
    w((R.DPU_EW_RELUX_CMP_VALUE, 0))
    w((R.DPU_OUT_CVT_OFFSET, 0))
    w((R.DPU_OUT_CVT_SCALE, R.DPU_OUT_CVT_SCALE.pack(OUT_CVT_SCALE=1)))
    w((R.DPU_OUT_CVT_SHIFT, 0))
    for reg in R.DPU_EW_OP_VALUE:
        w((reg, 0))
    w((R.DPU_SURFACE_ADD, R.DPU_SURFACE_ADD.pack(SURF_ADD=(out_plane >> 4) * hw.SURFACE_ADD_FACTOR_INT32)))
    w((R.DPU_40C4, 0))
    for reg in R.DPU_LUT:
        w((reg, 0))
    # --- DPU_RDMA: programmed with every read disabled (no bias, no element-wise input) --
    if hw.PROGRAM_DPU_RDMA:
        w((R.RDMA_DATA_CUBE_WIDTH, R.RDMA_DATA_CUBE_WIDTH.pack(WIDTH=0)))
        w((R.RDMA_DATA_CUBE_HEIGHT, R.RDMA_DATA_CUBE_HEIGHT.pack(HEIGHT=mt - 1)))
        w((R.RDMA_DATA_CUBE_CHANNEL, R.RDMA_DATA_CUBE_CHANNEL.pack(CHANNEL=nt - 1)))
        w((R.RDMA_SRC_BASE_ADDR, 0))
        w((R.RDMA_BRDMA_CFG, 0))
        w((R.RDMA_BS_BASE_ADDR, 0))
        w((R.RDMA_NRDMA_CFG, 0))
        w((R.RDMA_BN_BASE_ADDR, 0))
        w((R.RDMA_ERDMA_CFG, R.RDMA_ERDMA_CFG.pack(ERDMA_DISABLE=1)))
        w((R.RDMA_EW_BASE_ADDR, 0))
        w((R.RDMA_EW_SURF_STRIDE, 0))
        w((R.RDMA_FEATURE_MODE_CFG, R.RDMA_FEATURE_MODE_CFG.pack(BURST_LEN=_DMA_BURST, MRDMA_DISABLE=1)))
        w((R.RDMA_SRC_DMA_CFG, 0))
        w((R.RDMA_SURF_NOTCH, 0))
        w((R.RDMA_PAD_CFG, 0))
        w((R.RDMA_WEIGHT, R.RDMA_WEIGHT.pack(E_WEIGHT=1, N_WEIGHT=1, B_WEIGHT=1, M_WEIGHT=1)))
        w((R.RDMA_EW_SURF_NOTCH, 0))
    return regs


def tail_words(op_mask: int | None = None) -> list[int]:
    """The four closing words: no-op, PC REGISTER_AMOUNTS = 0 (no chained task: under rocket
    the kernel kicks every task itself), the mandatory marker, and op-enable with the unit mask."""
    if op_mask is None:
        op_mask = hw.OP_ENABLE_MASK
    return [0, R.write(R.PC_REGISTER_AMOUNTS, 0), R.op_marker(), R.op_enable(op_mask)]


def words_from_registers(regs: list[tuple[R.Reg, int]], op_mask: int | None = None) -> np.ndarray:
    body = [R.write(reg, value) for reg, value in regs]
    if hw.REGCMD_EVEN_COUNT and (len(body) + 4) % 2:
        body.append(0)  # keep the count even: the PC fetches whole pairs of words
    return np.array(body + tail_words(op_mask), dtype=np.uint64)


def task_words(task: GemmTask, plan: GemmPlan, feature_iova: int, weight_iova: int, output_iova: int) -> np.ndarray:
    """The complete regcmd of one task (uint64 words, tail included)."""
    return words_from_registers(task_registers(task, plan, feature_iova, weight_iova, output_iova))


def regcmd_amount(count: int) -> int:
    """PC REGISTER_AMOUNTS the kernel programs for ``count`` words (rocket_job_hw_submit)."""
    return (count + 1) // 2 - 1


@dataclass
class TaskProgram:
    offset: int  # byte offset in the regcmd buffer
    count: int  # regcmd_count (words)


class ProgramBuilder:
    """Lays task regcmds out back to back in one buffer, each aligned to REGCMD_TASK_ALIGN."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.tasks: list[TaskProgram] = []
        self._pos = 0

    def add(self, words: np.ndarray) -> TaskProgram:
        words = np.asarray(words, dtype=np.uint64)
        if words.size == 0:
            raise ValueError("empty regcmd")
        if words.size > 2 * 0x10000:
            raise ValueError(f"regcmd of {words.size} words overflows the 16-bit PC_DATA_AMOUNT")
        pad = (-self._pos) % hw.REGCMD_TASK_ALIGN
        if pad:
            self._chunks.append(np.zeros(pad // 8, dtype=np.uint64))
            self._pos += pad
        prog = TaskProgram(self._pos, int(words.size))
        self._chunks.append(words)
        self._pos += words.size * 8
        self.tasks.append(prog)
        return prog

    @property
    def nbytes(self) -> int:
        return self._pos

    def to_bytes(self) -> np.ndarray:
        """The whole buffer as little-endian bytes (uint8)."""
        if not self._chunks:
            return np.zeros(0, dtype=np.uint8)
        return np.concatenate(self._chunks).astype("<u8").view(np.uint8)
