"""A cost model on paper: predicted seconds of an int8 GEMM on the NPU (from the plan) and on the
four Cortex-A76 cores, and the M above which the NPU wins. Nothing here has been measured on a board.

Plain functions of shapes (M, K, N); what the matrices mean is the caller's business. Every
constant names its status and source in the style of ``hw_assumptions`` ([code] read in a driver
source, [empirical] reported from hardware by a third party, [inferred] derived, unconfirmed);
the NPU's own constants (clock, MAC array, per-task/per-job overheads, DMA rate, CPU cost of
summing K-split partials) are ``hw_assumptions``' and are not repeated here.

NPU model (one GEMM = the tasks of ``plan.plan_gemm``)::

    task  = TASK_OVERHEAD_S + rows*kernels*K_tile / (clock * MACS_PER_CYCLE)
            + (rows*K_tile + rows*kernels*4 + [K_tile*kernels unless WEIGHT_REUSE]) / DMA_BYTES_PER_S
    job   = its tasks + JOB_OVERHEAD_S                 (jobs spread over NPU_CORES cores)
    gemm  = busiest core + (K tiles - 1) * M * N * CPU_SUM_S_PER_ELEMENT   (K-split sums on the CPU)

i.e. the planner's own estimate (``GemmPlan.estimated_seconds``) task by task, with compute, DMA
and fixed costs added (no overlap assumed) and only compute scaling with the clock.

CPU model::

    gemm = max(M*K*N / (CPU_CORES * CPU_CLOCK_HZ * CPU_SDOT_MACS_PER_CYCLE * CPU_EFFICIENCY),
               (K*N + M*K + 4*M*N) / CPU_DRAM_BYTES_PER_S)

the larger of a compute bound (int8 ``sdot`` at a derated peak) and a weight-streaming bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import hw_assumptions as hw
from .plan import plan_gemm

# --- NPU ------------------------------------------------------------------------------------
#: [code] the firmware's NPU clock has rate steps up to 1 GHz (TF-A rk3588_clk.c); [empirical]
#: the vendor kernel runs the NPU up to 1 GHz (sbc-bench, Radxa-Rock-5B). Mainline assigns
#: hw.NPU_CLOCK_HZ (200 MHz) and has no devfreq: 1 GHz needs a DT/clock change.
NPU_MAX_CLOCK_HZ = 1_000_000_000
#: [inferred] cores one process's jobs run on: one drm_sched entity per fd runs its jobs in order
#: on one core (docs/npu.md open question 8). 3 (the RK3588's cores) is the ceiling if one fd
#: per core gives three-core throughput.
NPU_CORES = 1
NPU_CORES_MAX = 3
#: [inferred] what scales with the clock: the MAC array only. DMA rate and per-task/per-job
#: costs are taken as clock-independent (DRAM, AXI and the kernel's IRQ path): G reports only
#: ~1.43x for 200 -> 600 MHz (docs/performance.md A.3), far from 3x.
DMA_SCALES_WITH_CLOCK = False
#: [empirical] G (gregordinary/rocket-userspace README, docs/performance.md A.3): resident int8
#: matmul 512x3840x4096 at 386 GOP/s at 600 MHz, i.e. 2*M*K*N/386e9 s. Kept as a check of the
#: model (``anchor_check``), not fitted to.
ANCHOR_NPU_SHAPE = (512, 3840, 4096)
ANCHOR_NPU_CLOCK_HZ = 600_000_000
ANCHOR_NPU_GOPS = 386.0

# --- CPU (4 x Cortex-A76) -------------------------------------------------------------------
#: [code] RK3588 device tree: four A76 cores (cpu4-7); use those only (docs/performance.md A.2).
CPU_CORES = 4
#: [empirical] RK3588 A76 top OPP 2.4 GHz (Rockchip datasheet; sbc-bench Rock 5B measures ~2.35).
CPU_CLOCK_HZ = 2_400_000_000
#: [inferred] int8 MACs per cycle per core with SDOT: two 128-bit ASIMD pipes (Arm Cortex-A76
#: software optimization guide: SDOT throughput 2/cycle) x 16 int8 MACs; 4 x 2.4 GHz x 32 x 2 =
#: 614 GOP/s, the peak docs/performance.md A.4 uses.
CPU_SDOT_MACS_PER_CYCLE = 32
#: [empirical] anchor for the efficiency: llama.cpp llama-bench on the four A76 cores, Gemma3-1B
#: Q8_0 (int8 x int8 sdot, the NPU's arithmetic) pp512 = 73.3 tok/s (docs/performance.md A.2).
ANCHOR_CPU_PP_TOK_S = 73.3
#: [inferred] Gemma3-1B matmul MACs per token without the lm_head (llama-bench pp computes the
#: last row's logits only): 26 layers x (q 1152x1024 + k, v 1152x256 + o 1024x1152
#: + gate, up 1152x6912 + down 6912x1152), from its published config. Attention adds ~2 % at pp512.
ANCHOR_CPU_MACS_PER_TOKEN = 26 * (1152 * 1024 + 2 * 1152 * 256 + 1024 * 1152 + 3 * 1152 * 6912)
#: [inferred] fraction of the sdot peak a prefill GEMM reaches: the anchor's MAC rate / peak
#: (~0.17). llama.cpp's repacked Q4_0 path reaches ~2.2x that (Gemma3-1B Q4_0 164.7 pp),
#: so CPU_EFFICIENCY_Q4_0 is the optimistic CPU.
CPU_EFFICIENCY = ANCHOR_CPU_PP_TOK_S * ANCHOR_CPU_MACS_PER_TOKEN / (CPU_CORES * CPU_CLOCK_HZ * CPU_SDOT_MACS_PER_CYCLE)
CPU_EFFICIENCY_Q4_0 = CPU_EFFICIENCY * 164.7 / 73.3
#: [empirical]/[inferred] practical four-core DRAM read rate: STREAM copy ~22 GB/s measured on
#: RK3588 (docs/performance.md A.4); 20 GB/s is the figure used there for decode.
CPU_DRAM_BYTES_PER_S = 20e9
#: int8 weights on both sides, so the two devices stream the same bytes (a Q4 CPU streams ~half).
CPU_WEIGHT_BYTES_PER_ELEMENT = 1.0


@dataclass(frozen=True)
class NPUCost:
    M: int
    K: int
    N: int
    clock_hz: float
    cores: int
    tasks: int
    jobs: int
    k_tiles: int
    macs: int  # M*K*N, the useful MACs
    padded_macs: int  # what the tasks compute (rows padded to 4, K and N to 32)
    bytes_moved: int  # DMA: features + int32 outputs + weights each time they are fetched
    compute_s: float
    dma_s: float
    overhead_s: float  # task and job fixed costs
    cpu_sum_s: float  # summing K-split partials on the CPU
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CPUCost:
    M: int
    K: int
    N: int
    macs: int
    bytes_moved: int
    compute_s: float
    memory_s: float
    seconds: float
    bound: str  # "compute" or "memory"

    def as_dict(self) -> dict:
        return asdict(self)


def npu_gemm_cost(M: int, K: int, N: int, clock_hz: float = hw.NPU_CLOCK_HZ, cores: int = NPU_CORES) -> NPUCost:
    """Predicted NPU seconds of an M x K x N int8 GEMM (int32 out), task by task from its plan."""
    plan = plan_gemm(M, K, N)
    dma_rate = hw.DMA_BYTES_PER_S * (clock_hz / hw.NPU_CLOCK_HZ if DMA_SCALES_WITH_CLOCK else 1.0)
    mac_rate = clock_hz * hw.MACS_PER_CYCLE
    padded = moved = 0
    compute = dma = overhead = 0.0
    job_seconds = []
    for job in plan.jobs:
        js = hw.JOB_OVERHEAD_S
        overhead += hw.JOB_OVERHEAD_S
        for i in job:
            t = plan.tasks[i]
            macs = t.mt * t.nt * t.kt
            nbytes = t.mt * t.kt + t.mt * t.nt * 4 + (0 if t.weight_reuse else t.kt * t.nt)
            padded += macs
            moved += nbytes
            compute += macs / mac_rate
            dma += nbytes / dma_rate
            overhead += hw.TASK_OVERHEAD_S
            js += hw.TASK_OVERHEAD_S + macs / mac_rate + nbytes / dma_rate
        job_seconds.append(js)
    loads = [0.0] * max(1, cores)
    for js in job_seconds:  # jobs in submit order to the least busy core
        loads[loads.index(min(loads))] += js
    cpu_sum = (plan.ktiling.count - 1) * M * N * hw.CPU_SUM_S_PER_ELEMENT
    return NPUCost(M=M, K=K, N=N, clock_hz=clock_hz, cores=cores, tasks=plan.task_count, jobs=plan.job_count,
                   k_tiles=plan.ktiling.count, macs=M * K * N, padded_macs=padded, bytes_moved=moved,
                   compute_s=compute, dma_s=dma, overhead_s=overhead, cpu_sum_s=cpu_sum,
                   seconds=max(loads) + cpu_sum)


def cpu_gemm_cost(M: int, K: int, N: int, efficiency: float = CPU_EFFICIENCY, cores: int = CPU_CORES,
                  clock_hz: float = CPU_CLOCK_HZ, bytes_per_s: float = CPU_DRAM_BYTES_PER_S) -> CPUCost:
    """Predicted A76 seconds of an M x K x N int8 GEMM: max(compute bound, memory bound)."""
    macs = M * K * N
    compute = macs / (cores * clock_hz * CPU_SDOT_MACS_PER_CYCLE * efficiency)
    nbytes = int(K * N * CPU_WEIGHT_BYTES_PER_ELEMENT) + M * K + 4 * M * N
    memory = nbytes / bytes_per_s
    return CPUCost(M=M, K=K, N=N, macs=macs, bytes_moved=nbytes, compute_s=compute, memory_s=memory,
                   seconds=max(compute, memory), bound="compute" if compute >= memory else "memory")


def _npu_wins(M: int, K: int, N: int, clock_hz: float, npu_rows_per_row: int, cores: int, efficiency: float) -> bool:
    return (npu_gemm_cost(M * npu_rows_per_row, K, N, clock_hz, cores).seconds
            < cpu_gemm_cost(M, K, N, efficiency).seconds)


def crossover(K: int, N: int, clock_hz: float = hw.NPU_CLOCK_HZ, *, npu_rows_per_row: int = 1,
              cores: int = NPU_CORES, efficiency: float = CPU_EFFICIENCY, m_max: int = 1 << 16) -> int | None:
    """Smallest M (rows of the CPU operand) at which the NPU's predicted time is below the CPU's,
    with the NPU GEMM running ``npu_rows_per_row`` rows per row (e.g. 2 for two int8 activation
    terms). Doubling then bisection: at the result M the NPU wins and at M - 1 it does not.
    None if the NPU does not win up to ``m_max``; 1 if it already wins at one row."""
    args = (K, N, clock_hz, npu_rows_per_row, cores, efficiency)
    if _npu_wins(1, *args):
        return 1
    lo, hi = 1, 2
    while not _npu_wins(hi, *args):
        lo, hi = hi, hi * 2
        if hi > m_max:
            return None
    while hi - lo > 1:  # invariant: the NPU loses at lo and wins at hi
        mid = (lo + hi) // 2
        if _npu_wins(mid, *args):
            hi = mid
        else:
            lo = mid
    return hi


def anchor_check() -> dict:
    """The model's time for G's published NPU matmul (ANCHOR_NPU_*) next to the published one."""
    M, K, N = ANCHOR_NPU_SHAPE
    published = 2 * M * K * N / (ANCHOR_NPU_GOPS * 1e9)
    out = {"shape": [M, K, N], "clock_hz": ANCHOR_NPU_CLOCK_HZ, "published_s": published}
    for cores in (1, NPU_CORES_MAX):
        out[f"model_s_{cores}_core"] = npu_gemm_cost(M, K, N, ANCHOR_NPU_CLOCK_HZ, cores).seconds
    return out


def constants() -> dict:
    """Every constant the two models use (for reports)."""
    return {
        "npu_clock_hz": hw.NPU_CLOCK_HZ, "npu_max_clock_hz": NPU_MAX_CLOCK_HZ, "npu_macs_per_cycle": hw.MACS_PER_CYCLE,
        "npu_cores": NPU_CORES, "npu_task_overhead_s": hw.TASK_OVERHEAD_S, "npu_job_overhead_s": hw.JOB_OVERHEAD_S,
        "npu_dma_bytes_per_s": hw.DMA_BYTES_PER_S, "npu_dma_scales_with_clock": DMA_SCALES_WITH_CLOCK,
        "cpu_sum_s_per_element": hw.CPU_SUM_S_PER_ELEMENT,
        "cpu_cores": CPU_CORES, "cpu_clock_hz": CPU_CLOCK_HZ, "cpu_sdot_macs_per_cycle": CPU_SDOT_MACS_PER_CYCLE,
        "cpu_efficiency": CPU_EFFICIENCY, "cpu_efficiency_q4_0": CPU_EFFICIENCY_Q4_0,
        "cpu_dram_bytes_per_s": CPU_DRAM_BYTES_PER_S,
    }
