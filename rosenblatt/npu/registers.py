"""RK3588 NPU register map: offsets, bit fields and the regcmd word encoding.

Facts from Mesa ``src/gallium/drivers/rocket/registers.xml`` and the kernel's
``rocket_registers.h`` (identical field layouts), summarised in docs/npu-reference.md §3-4.
Only the registers the INT8 GEMM program writes, the kernel touches, or the simulator reads are
listed. A register is written by a 64-bit regcmd word::

    word = (target << 48) | (value << 16) | offset

where ``offset`` is the absolute register offset and ``target`` selects the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --- regcmd targets (§3) ---------------------------------------------------------------------
TARGET_PC = 0x0101
TARGET_CNA = 0x0201
TARGET_CORE = 0x0801
TARGET_DPU = 0x1001
TARGET_DPU_RDMA = 0x2001
TARGET_PPU = 0x4001
TARGET_PPU_RDMA = 0x8001
#: The word that must precede the op-enable word ("0x0041_xxxx" in the TRM).
TARGET_OP_MARKER = 0x0041
#: Op-enable broadcast; its register is PC OPERATION_ENABLE (0x0008), its value the unit mask.
TARGET_OP_ENABLE = 0x0081

#: Block of each register-write target: (name, first offset, end offset).
TARGET_BLOCKS = {
    TARGET_PC: ("PC", 0x0000, 0x1000),
    TARGET_CNA: ("CNA", 0x1000, 0x2000),
    TARGET_CORE: ("CORE", 0x3000, 0x4000),
    TARGET_DPU: ("DPU", 0x4000, 0x5000),
    TARGET_DPU_RDMA: ("DPU_RDMA", 0x5000, 0x6000),
    TARGET_PPU: ("PPU", 0x6000, 0x7000),
    TARGET_PPU_RDMA: ("PPU_RDMA", 0x7000, 0x8000),
}

# --- op-enable unit mask (GLOBAL OPERATION_ENABLE layout) ------------------------------------
OPEN_CNA = 1 << 0
OPEN_CORE = 1 << 2
OPEN_DPU = 1 << 3
OPEN_DPU_RDMA = 1 << 4
OPEN_PPU = 1 << 5
OPEN_PPU_RDMA = 1 << 6
OPEN_ALL = OPEN_CNA | OPEN_CORE | OPEN_DPU | OPEN_DPU_RDMA | OPEN_PPU | OPEN_PPU_RDMA

# --- precision codes (CNA/CORE/DPU) ----------------------------------------------------------
PREC_INT8 = 0
PREC_INT16 = 1
PREC_FP16 = 2
PREC_BF16 = 3
PREC_INT32 = 4
PREC_FP32 = 5
PREC_INT4 = 6
PREC_NAMES = {0: "int8", 1: "int16", 2: "fp16", 3: "bf16", 4: "int32", 5: "fp32", 6: "int4", 7: "tf32"}


@dataclass(frozen=True, eq=False)
class Reg:
    """One 32-bit register: absolute offset, name and bit fields ``{name: (low, high)}``."""

    block: str
    name: str
    offset: int
    fields: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = 0
        for lo, hi in self.fields.values():
            m |= ((1 << (hi - lo + 1)) - 1) << lo
        object.__setattr__(self, "valid_mask", m)

    @property
    def qualname(self) -> str:
        return f"{self.block}.{self.name}"

    def pack(self, **values: int) -> int:
        """Value with the named fields set; raises ValueError if one does not fit its bits."""
        word = 0
        for name, v in values.items():
            try:
                lo, hi = self.fields[name]
            except KeyError:
                raise ValueError(f"{self.qualname} has no field {name}") from None
            width = hi - lo + 1
            v = int(v)
            if not 0 <= v < (1 << width):
                raise ValueError(
                    f"{self.qualname}.{name} = {v} does not fit its {width}-bit field"
                )
            word |= v << lo
        return word

    def get(self, value: int, name: str) -> int:
        lo, hi = self.fields[name]
        return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


_REGS: dict[int, Reg] = {}


def _r(block: str, name: str, offset: int, **fields: tuple[int, int]) -> Reg:
    reg = Reg(block, name, offset, dict(fields) if fields else {"VALUE": (0, 31)})
    _REGS[offset] = reg
    return reg


_SPTR = dict(EXECUTER=(16, 16), EXECUTER_PP_CLEAR=(5, 5), POINTER_PP_CLEAR=(4, 4),
             POINTER_PP_MODE=(3, 3), EXECUTER_PP_EN=(2, 2), POINTER_PP_EN=(1, 1), POINTER=(0, 0))
_IRQ = dict(BITS=(0, 13))

# PC (kernel MMIO and regcmd chaining)
PC_OPERATION_ENABLE = _r("PC", "OPERATION_ENABLE", 0x0008, OP_EN=(0, 0))
PC_BASE_ADDRESS = _r("PC", "BASE_ADDRESS", 0x0010, PC_SOURCE_ADDR=(4, 31), PC_SEL=(0, 0))
PC_REGISTER_AMOUNTS = _r("PC", "REGISTER_AMOUNTS", 0x0014, PC_DATA_AMOUNT=(0, 15))
PC_INTERRUPT_MASK = _r("PC", "INTERRUPT_MASK", 0x0020, **_IRQ)
PC_INTERRUPT_CLEAR = _r("PC", "INTERRUPT_CLEAR", 0x0024, BITS=(0, 16))
PC_INTERRUPT_STATUS = _r("PC", "INTERRUPT_STATUS", 0x0028, **_IRQ)
PC_INTERRUPT_RAW_STATUS = _r("PC", "INTERRUPT_RAW_STATUS", 0x002C, **_IRQ)
PC_TASK_CON = _r("PC", "TASK_CON", 0x0030, RESERVED_14=(14, 14), TASK_COUNT_CLEAR=(13, 13),
                 TASK_PP_EN=(12, 12), TASK_NUMBER=(0, 11))
PC_TASK_DMA_BASE_ADDR = _r("PC", "TASK_DMA_BASE_ADDR", 0x0034, DMA_BASE_ADDR=(4, 31))
PC_TASK_STATUS = _r("PC", "TASK_STATUS", 0x003C, TASK_STATUS=(0, 27))

IRQ_DPU_0 = 1 << 8
IRQ_DPU_1 = 1 << 9
IRQ_DMA_READ_ERROR = 1 << 12
IRQ_DMA_WRITE_ERROR = 1 << 13

# CNA
CNA_S_POINTER = _r("CNA", "S_POINTER", 0x1004, **_SPTR, EXTRA_28_29=(28, 29))
CNA_CONV_CON1 = _r("CNA", "CONV_CON1", 0x100C, NONALIGN_DMA=(30, 30), GROUP_LINE_OFF=(29, 29),
                   DECONV=(16, 16), ARGB_IN=(12, 15), PROC_PRECISION=(7, 9),
                   IN_PRECISION=(4, 6), CONV_MODE=(0, 3))
CNA_CONV_CON2 = _r("CNA", "CONV_CON2", 0x1010, KERNEL_GROUP=(16, 23), FEATURE_GRAINS=(4, 13),
                   CSC_WO_EN=(2, 2), CSC_DO_EN=(1, 1), CMD_FIFO_SRST=(0, 0))
CNA_CONV_CON3 = _r("CNA", "CONV_CON3", 0x1014, NN_MODE=(28, 30), ATROUS_Y_DILATION=(21, 25),
                   ATROUS_X_DILATION=(16, 20), DECONV_Y_STRIDE=(11, 13),
                   DECONV_X_STRIDE=(8, 10), CONV_Y_STRIDE=(3, 5), CONV_X_STRIDE=(0, 2))
CNA_DATA_SIZE0 = _r("CNA", "DATA_SIZE0", 0x1020, DATAIN_WIDTH=(16, 26), DATAIN_HEIGHT=(0, 10))
CNA_DATA_SIZE1 = _r("CNA", "DATA_SIZE1", 0x1024, DATAIN_CHANNEL_REAL=(16, 29),
                    DATAIN_CHANNEL=(0, 15))
CNA_DATA_SIZE2 = _r("CNA", "DATA_SIZE2", 0x1028, DATAOUT_WIDTH=(0, 10))
CNA_DATA_SIZE3 = _r("CNA", "DATA_SIZE3", 0x102C, SURF_MODE=(22, 23), DATAOUT_ATOMICS=(0, 21))
CNA_WEIGHT_SIZE0 = _r("CNA", "WEIGHT_SIZE0", 0x1030, WEIGHT_BYTES=(0, 31))
CNA_WEIGHT_SIZE1 = _r("CNA", "WEIGHT_SIZE1", 0x1034, WEIGHT_BYTES_PER_KERNEL=(0, 18))
CNA_WEIGHT_SIZE2 = _r("CNA", "WEIGHT_SIZE2", 0x1038, WEIGHT_WIDTH=(24, 28),
                      WEIGHT_HEIGHT=(16, 20), WEIGHT_KERNELS=(0, 13))
CNA_CBUF_CON0 = _r("CNA", "CBUF_CON0", 0x1040, WEIGHT_REUSE=(13, 13), DATA_REUSE=(12, 12),
                   FC_DATA_BANK=(8, 10), WEIGHT_BANK=(4, 7), DATA_BANK=(0, 3))
CNA_CBUF_CON1 = _r("CNA", "CBUF_CON1", 0x1044, DATA_ENTRIES=(0, 13))
CNA_CVT_CON0 = _r("CNA", "CVT_CON0", 0x104C, CVT_TRUNCATE_3=(22, 27), CVT_TRUNCATE_2=(16, 21),
                  CVT_TRUNCATE_1=(10, 15), CVT_TRUNCATE_0=(4, 9), DATA_SIGN=(3, 3),
                  ROUND_TYPE=(2, 2), CVT_TYPE=(1, 1), CVT_BYPASS=(0, 0))
CNA_CVT_CON1 = _r("CNA", "CVT_CON1", 0x1050, CVT_SCALE=(16, 31), CVT_OFFSET=(0, 15))
CNA_CVT_CON2 = _r("CNA", "CVT_CON2", 0x1054, CVT_SCALE=(16, 31), CVT_OFFSET=(0, 15))
CNA_CVT_CON3 = _r("CNA", "CVT_CON3", 0x1058, CVT_SCALE=(16, 31), CVT_OFFSET=(0, 15))
CNA_CVT_CON4 = _r("CNA", "CVT_CON4", 0x105C, CVT_SCALE=(16, 31), CVT_OFFSET=(0, 15))
CNA_FC_CON0 = _r("CNA", "FC_CON0", 0x1060, FC_SKIP_DATA=(16, 31), FC_SKIP_EN=(0, 0))
CNA_FC_CON1 = _r("CNA", "FC_CON1", 0x1064, DATA_OFFSET=(0, 16))
CNA_PAD_CON0 = _r("CNA", "PAD_CON0", 0x1068, PAD_LEFT=(4, 7), PAD_TOP=(0, 3))
CNA_FEATURE_DATA_ADDR = _r("CNA", "FEATURE_DATA_ADDR", 0x1070, FEATURE_BASE_ADDR=(0, 31))
CNA_FC_CON2 = _r("CNA", "FC_CON2", 0x1074, WEIGHT_OFFSET=(0, 16))
CNA_DMA_CON0 = _r("CNA", "DMA_CON0", 0x1078, OV4K_BYPASS=(31, 31), WEIGHT_BURST_LEN=(16, 19),
                  DATA_BURST_LEN=(0, 3))
CNA_DMA_CON1 = _r("CNA", "DMA_CON1", 0x107C, LINE_STRIDE=(0, 27))
CNA_DMA_CON2 = _r("CNA", "DMA_CON2", 0x1080, SURF_STRIDE=(0, 27))
CNA_FC_DATA_SIZE0 = _r("CNA", "FC_DATA_SIZE0", 0x1084, DMA_WIDTH=(16, 29), DMA_HEIGHT=(0, 10))
CNA_FC_DATA_SIZE1 = _r("CNA", "FC_DATA_SIZE1", 0x1088, DMA_CHANNEL=(0, 15))
CNA_DCOMP_CTRL = _r("CNA", "DCOMP_CTRL", 0x1100, WT_DEC_BYPASS=(3, 3), DECOMP_CONTROL=(0, 2))
CNA_DCOMP_REGNUM = _r("CNA", "DCOMP_REGNUM", 0x1104)
CNA_DCOMP_ADDR0 = _r("CNA", "DCOMP_ADDR0", 0x1110, DECOMPRESS_ADDR0=(0, 31))
CNA_DCOMP_AMOUNT = [_r("CNA", f"DCOMP_AMOUNT{i}", 0x1140 + 4 * i) for i in range(16)]
CNA_CVT_CON5 = _r("CNA", "CVT_CON5", 0x1180, PER_CHANNEL_CVT_EN=(0, 31))
CNA_PAD_CON1 = _r("CNA", "PAD_CON1", 0x1184, PAD_VALUE=(0, 31))

# CORE
CORE_S_POINTER = _r("CORE", "S_POINTER", 0x3004, **_SPTR, EXTRA_28_29=(28, 29))
CORE_MISC_CFG = _r("CORE", "MISC_CFG", 0x3010, SOFT_GATING=(14, 19), PROC_PRECISION=(8, 10),
                   DW_EN=(1, 1), QD_EN=(0, 0))
CORE_DATAOUT_SIZE_0 = _r("CORE", "DATAOUT_SIZE_0", 0x3014, DATAOUT_HEIGHT=(16, 31),
                         DATAOUT_WIDTH=(0, 15))
CORE_DATAOUT_SIZE_1 = _r("CORE", "DATAOUT_SIZE_1", 0x3018, DATAOUT_CHANNEL=(0, 15))
CORE_CLIP_TRUNCATE = _r("CORE", "CLIP_TRUNCATE", 0x301C, ROUND_TYPE=(6, 6), CLIP_TRUNCATE=(0, 4))
#: Undocumented; Mesa and mtx512 write 0.
CORE_3030 = _r("CORE", "UNDOC_3030", 0x3030)

# DPU
DPU_S_POINTER = _r("DPU", "S_POINTER", 0x4004, **_SPTR)
DPU_FEATURE_MODE_CFG = _r("DPU", "FEATURE_MODE_CFG", 0x400C, COMB_USE=(31, 31), TP_EN=(30, 30),
                          RGP_TYPE=(26, 29), NONALIGN=(25, 25), SURF_LEN=(9, 24),
                          BURST_LEN=(5, 8), CONV_MODE=(3, 4), OUTPUT_MODE=(1, 2),
                          FLYING_MODE=(0, 0))
DPU_DATA_FORMAT = _r("DPU", "DATA_FORMAT", 0x4010, OUT_PRECISION=(29, 31), IN_PRECISION=(26, 28),
                     EW_TRUNCATE_NEG=(16, 25), BN_MUL_SHIFT_VALUE_NEG=(10, 15),
                     BS_MUL_SHIFT_VALUE_NEG=(4, 9), MC_SURF_OUT=(3, 3), PROC_PRECISION=(0, 2))
DPU_OFFSET_PEND = _r("DPU", "OFFSET_PEND", 0x4014, OFFSET_PEND=(0, 15))
DPU_DST_BASE_ADDR = _r("DPU", "DST_BASE_ADDR", 0x4020, DST_BASE_ADDR=(0, 31))
DPU_DST_SURF_STRIDE = _r("DPU", "DST_SURF_STRIDE", 0x4024, DST_SURF_STRIDE=(4, 31))
DPU_DATA_CUBE_WIDTH = _r("DPU", "DATA_CUBE_WIDTH", 0x4030, WIDTH=(0, 12))
DPU_DATA_CUBE_HEIGHT = _r("DPU", "DATA_CUBE_HEIGHT", 0x4034, MINMAX_CTL=(22, 24), HEIGHT=(0, 12))
DPU_DATA_CUBE_NOTCH_ADDR = _r("DPU", "DATA_CUBE_NOTCH_ADDR", 0x4038, NOTCH_ADDR_1=(16, 28),
                              NOTCH_ADDR_0=(0, 12))
DPU_DATA_CUBE_CHANNEL = _r("DPU", "DATA_CUBE_CHANNEL", 0x403C, ORIG_CHANNEL=(16, 28),
                           CHANNEL=(0, 12))
_BSCFG = dict(ALU_ALGO=(16, 19), ALU_SRC=(8, 8), RELUX_EN=(7, 7), RELU_BYPASS=(6, 6),
              MUL_PRELU=(5, 5), MUL_BYPASS=(4, 4), ALU_BYPASS=(1, 1), BYPASS=(0, 0))
DPU_BS_CFG = _r("DPU", "BS_CFG", 0x4040, **_BSCFG)
DPU_BS_ALU_CFG = _r("DPU", "BS_ALU_CFG", 0x4044)
DPU_BS_MUL_CFG = _r("DPU", "BS_MUL_CFG", 0x4048, MUL_OPERAND=(16, 31), MUL_SHIFT_VALUE=(8, 13),
                    TRUNCATE_SRC=(1, 1), MUL_SRC=(0, 0))
DPU_BS_RELUX_CMP_VALUE = _r("DPU", "BS_RELUX_CMP_VALUE", 0x404C)
DPU_BS_OW_CFG = _r("DPU", "BS_OW_CFG", 0x4050, RGP_CNTER=(28, 31), TP_ORG_EN=(27, 27),
                   SIZE_E_2=(8, 10), SIZE_E_1=(5, 7), SIZE_E_0=(2, 4), OD_BYPASS=(1, 1),
                   OW_SRC=(0, 0))
DPU_BS_OW_OP = _r("DPU", "BS_OW_OP", 0x4054, OW_OP=(0, 15))
DPU_WDMA_SIZE_0 = _r("DPU", "WDMA_SIZE_0", 0x4058, TP_PRECISION=(27, 27), SIZE_C_WDMA=(16, 26),
                     CHANNEL_WDMA=(0, 12))
DPU_WDMA_SIZE_1 = _r("DPU", "WDMA_SIZE_1", 0x405C, HEIGHT_WDMA=(16, 28), WIDTH_WDMA=(0, 12))
DPU_BN_CFG = _r("DPU", "BN_CFG", 0x4060, **_BSCFG)
DPU_BN_ALU_CFG = _r("DPU", "BN_ALU_CFG", 0x4064)
DPU_BN_MUL_CFG = _r("DPU", "BN_MUL_CFG", 0x4068, MUL_OPERAND=(16, 31), MUL_SHIFT_VALUE=(8, 13),
                    TRUNCATE_SRC=(1, 1), MUL_SRC=(0, 0))
DPU_BN_RELUX_CMP_VALUE = _r("DPU", "BN_RELUX_CMP_VALUE", 0x406C)
DPU_EW_CFG = _r("DPU", "EW_CFG", 0x4070, EW_CVT_TYPE=(31, 31), EW_CVT_ROUND=(30, 30),
                EW_DATA_MODE=(28, 29), EDATA_SIZE=(22, 23), EW_EQUAL_EN=(21, 21),
                EW_BINARY_EN=(20, 20), EW_ALU_ALGO=(16, 19), EW_RELUX_EN=(10, 10),
                EW_RELU_BYPASS=(9, 9), EW_OP_CVT_BYPASS=(8, 8), EW_LUT_BYPASS=(7, 7),
                EW_OP_SRC=(6, 6), EW_MUL_PRELU=(5, 5), EW_OP_TYPE=(2, 2), EW_OP_BYPASS=(1, 1),
                EW_BYPASS=(0, 0))
DPU_EW_CVT_OFFSET_VALUE = _r("DPU", "EW_CVT_OFFSET_VALUE", 0x4074)
DPU_EW_CVT_SCALE_VALUE = _r("DPU", "EW_CVT_SCALE_VALUE", 0x4078, EW_TRUNCATE=(22, 31),
                            EW_OP_CVT_SHIFT=(16, 21), EW_OP_CVT_SCALE=(0, 15))
DPU_EW_RELUX_CMP_VALUE = _r("DPU", "EW_RELUX_CMP_VALUE", 0x407C)
DPU_OUT_CVT_OFFSET = _r("DPU", "OUT_CVT_OFFSET", 0x4080, OUT_CVT_OFFSET=(0, 31))
DPU_OUT_CVT_SCALE = _r("DPU", "OUT_CVT_SCALE", 0x4084, FP32TOFP16_EN=(16, 16),
                       OUT_CVT_SCALE=(0, 15))
DPU_OUT_CVT_SHIFT = _r("DPU", "OUT_CVT_SHIFT", 0x4088, CVT_TYPE=(31, 31), CVT_ROUND=(30, 30),
                       MINUS_EXP=(12, 19), OUT_CVT_SHIFT=(0, 11))
DPU_EW_OP_VALUE = [_r("DPU", f"EW_OP_VALUE_{i}", 0x4090 + 4 * i) for i in range(8)]
DPU_SURFACE_ADD = _r("DPU", "SURFACE_ADD", 0x40C0, SURF_ADD=(4, 31))
#: Undocumented; Mesa and mtx512 write 0.
DPU_40C4 = _r("DPU", "UNDOC_40C4", 0x40C4)
DPU_LUT = [
    _r("DPU", name, off)
    for name, off in [
        ("LUT_ACCESS_CFG", 0x4100), ("LUT_ACCESS_DATA", 0x4104), ("LUT_CFG", 0x4108),
        ("LUT_INFO", 0x410C), ("LUT_LE_START", 0x4110), ("LUT_LE_END", 0x4114),
        ("LUT_LO_START", 0x4118), ("LUT_LO_END", 0x411C), ("LUT_LE_SLOPE_SCALE", 0x4120),
        ("LUT_LE_SLOPE_SHIFT", 0x4124), ("LUT_LO_SLOPE_SCALE", 0x4128),
        ("LUT_LO_SLOPE_SHIFT", 0x412C),
    ]
]

# DPU_RDMA
RDMA_S_POINTER = _r("DPU_RDMA", "S_POINTER", 0x5004, **_SPTR)
RDMA_DATA_CUBE_WIDTH = _r("DPU_RDMA", "DATA_CUBE_WIDTH", 0x500C, WIDTH=(0, 12))
RDMA_DATA_CUBE_HEIGHT = _r("DPU_RDMA", "DATA_CUBE_HEIGHT", 0x5010, EW_LINE_NOTCH_ADDR=(16, 28),
                           HEIGHT=(0, 12))
RDMA_DATA_CUBE_CHANNEL = _r("DPU_RDMA", "DATA_CUBE_CHANNEL", 0x5014, CHANNEL=(0, 12))
RDMA_SRC_BASE_ADDR = _r("DPU_RDMA", "SRC_BASE_ADDR", 0x5018)
RDMA_BRDMA_CFG = _r("DPU_RDMA", "BRDMA_CFG", 0x501C, BRDMA_DATA_USE=(1, 4))
RDMA_BS_BASE_ADDR = _r("DPU_RDMA", "BS_BASE_ADDR", 0x5020)
RDMA_NRDMA_CFG = _r("DPU_RDMA", "NRDMA_CFG", 0x5028, NRDMA_DATA_USE=(1, 4))
RDMA_BN_BASE_ADDR = _r("DPU_RDMA", "BN_BASE_ADDR", 0x502C)
RDMA_ERDMA_CFG = _r("DPU_RDMA", "ERDMA_CFG", 0x5034, ERDMA_DATA_MODE=(30, 31),
                    ERDMA_SURF_MODE=(29, 29), ERDMA_NONALIGN=(28, 28), ERDMA_DATA_SIZE=(2, 3),
                    OV4K_BYPASS=(1, 1), ERDMA_DISABLE=(0, 0))
RDMA_EW_BASE_ADDR = _r("DPU_RDMA", "EW_BASE_ADDR", 0x5038)
RDMA_EW_SURF_STRIDE = _r("DPU_RDMA", "EW_SURF_STRIDE", 0x5040, EW_SURF_STRIDE=(4, 31))
RDMA_FEATURE_MODE_CFG = _r("DPU_RDMA", "FEATURE_MODE_CFG", 0x5044, IN_PRECISION=(15, 17),
                           BURST_LEN=(11, 14), COMB_USE=(8, 10), PROC_PRECISION=(5, 7),
                           MRDMA_DISABLE=(4, 4), MRDMA_FP16TOFP32_EN=(3, 3),
                           CONV_MODE=(1, 2), FLYING_MODE=(0, 0))
RDMA_SRC_DMA_CFG = _r("DPU_RDMA", "SRC_DMA_CFG", 0x5048)
RDMA_SURF_NOTCH = _r("DPU_RDMA", "SURF_NOTCH", 0x504C, SURF_NOTCH_ADDR=(4, 31))
RDMA_PAD_CFG = _r("DPU_RDMA", "PAD_CFG", 0x5064)
RDMA_WEIGHT = _r("DPU_RDMA", "WEIGHT", 0x5068, E_WEIGHT=(24, 31), N_WEIGHT=(16, 23),
                 B_WEIGHT=(8, 15), M_WEIGHT=(0, 7))
RDMA_EW_SURF_NOTCH = _r("DPU_RDMA", "EW_SURF_NOTCH", 0x506C, EW_SURF_NOTCH=(4, 31))


def lookup(offset: int) -> Reg | None:
    """The register at an absolute offset, or None if it is not in this map."""
    return _REGS.get(offset)


def all_registers() -> list[Reg]:
    return sorted(_REGS.values(), key=lambda r: r.offset)


# --- regcmd words ----------------------------------------------------------------------------
def encode(target: int, offset: int, value: int) -> int:
    """One 64-bit regcmd word."""
    if not 0 <= target <= 0xFFFF:
        raise ValueError(f"regcmd target {target:#x} out of range")
    if not 0 <= offset <= 0xFFFF:
        raise ValueError(f"register offset {offset:#x} out of range")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"register value {value:#x} does not fit 32 bits")
    return (target << 48) | (value << 16) | offset


def decode(word: int) -> tuple[int, int, int]:
    """(target, offset, value) of a regcmd word."""
    return (word >> 48) & 0xFFFF, word & 0xFFFF, (word >> 16) & 0xFFFFFFFF


def target_for(reg: Reg) -> int:
    """The register-write target of the block ``reg`` belongs to."""
    target = _TARGET_OF_BLOCK.get(reg.block)
    if target is None or not TARGET_BLOCKS[target][1] <= reg.offset < TARGET_BLOCKS[target][2]:
        raise ValueError(f"no regcmd target writes {reg.qualname}")
    return target


_TARGET_OF_BLOCK = {name: target for target, (name, _, _) in TARGET_BLOCKS.items()}


def write(reg: Reg, value: int) -> int:
    """The regcmd word that writes ``value`` to ``reg`` (value checked against its fields)."""
    if value & ~reg.valid_mask & 0xFFFFFFFF:
        raise ValueError(f"{reg.qualname} value {value:#x} sets bits outside its fields")
    return encode(target_for(reg), reg.offset, value)


def op_marker() -> int:
    return encode(TARGET_OP_MARKER, 0, 0)


def op_enable(mask: int) -> int:
    return encode(TARGET_OP_ENABLE, PC_OPERATION_ENABLE.offset, mask)
