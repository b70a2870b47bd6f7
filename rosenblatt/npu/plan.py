"""GEMM tiling: how C[M, N] = A[M, K] @ B[K, N] is cut into NPU tasks and jobs (stage 1).

Nothing here touches memory or registers. The plan says, for every task, which rows of A,
which kernels (columns of B) and which channels (K range) it covers, where those live relative
to the start of the packed feature / weight / output buffers, and how the 12 CBUF banks are
split. ``regcmd`` turns a task into register writes, ``layout`` packs the data, ``gemm`` runs it.

Rules (named constants in ``hw_assumptions``):

* K is padded to 32 and N to 32 (weight blocks), M to 4 (feature rows, ROW_ALIGN).
* What a task needs (``hw_assumptions``, weight streaming): its input rows (a multiple of
  ROW_ALIGN) fit the data banks (+ DATA_BANK_MARGIN), one 32-kernel weight group (32*K bytes)
  fits the weight banks -- the rest of the weights streams through them --, bytes per kernel
  <= 32 KiB, <= MAX_ROWS_PER_TASK rows and <= 8192 kernels (field limits below).
* K tiling depends on K only, so weights can be packed once and reused for any M: the fewest
  K tiles such that a task of ``K_TILE_MIN_ROWS`` rows and one weight group fits. The hardware
  itself needs no K split until a group and ROW_ALIGN rows no longer fit (K of about 9 K); we
  split earlier, at 64 rows, because streamed weights are fetched again for every task: at
  K = 8960 an unsplit task holds only 4 rows, so M = 128 would take 32 tasks re-streaming all
  13.8 MB of weights each, where 3 K tiles take 6 tasks and 2 weight passes. Partial products
  of K tiles land in separate output regions and are summed in int32 on the CPU.
* For a given M, the fewest tasks the CBUF allows: among every (rows per task, kernels per task)
  choice that fits, the smallest task count wins, the cost model of ``hw_assumptions`` breaks
  ties.
* A job is the M tiles of one (K tile, N tile) weight slice. If that slice fits the weight
  banks whole it stays resident and the tasks after the first set WEIGHT_REUSE; streamed
  weights are fetched again by every task. Jobs are cut short if their estimated run time
  would exceed ``JOB_TIME_BUDGET_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import hw_assumptions as hw
from .errors import NPUPlanError
from .layout import align

#: Rows a K tile must leave room for (with one weight group); see module docstring.
K_TILE_MIN_ROWS = 64
#: Field limits (docs/npu-reference.md §6): DPU cube channel 13 bits (-1), weight kernels 14
#: bits, CNA DATAIN_CHANNEL 16 bits; K beyond this would overflow int32 partial sums.
MAX_KERNELS_PER_TASK = 8192
MAX_CHANNELS_PER_TASK = 32768
MAX_K = (1 << 17) - 1  # 2**14 * K stays below 2**31


@dataclass(frozen=True)
class KTiling:
    K: int
    Kp: int
    tiles: tuple  # ((k0, kt), ...) with kt a multiple of 32, covering [0, Kp)

    @property
    def count(self) -> int:
        return len(self.tiles)

    @property
    def max_kt(self) -> int:
        return max(kt for _, kt in self.tiles)


@dataclass(frozen=True)
class GemmTask:
    index: int
    job: int
    m0: int
    mt: int
    n0: int
    nt: int
    k_index: int
    k0: int
    kt: int
    data_banks: int
    weight_banks: int
    weight_reuse: bool
    weights_resident: bool  # the task's whole weights fit its weight banks (else they stream)
    feature_offset: int  # bytes from the start of the packed feature buffer
    weight_offset: int  # bytes from the start of the packed weight buffer
    output_offset: int  # bytes from the start of the output buffer


@dataclass(frozen=True)
class GemmPlan:
    M: int
    K: int
    N: int
    Mp: int
    Kp: int
    Np: int
    ktiling: KTiling
    rows_per_task: int
    kernels_per_task: int
    tasks: tuple
    jobs: tuple  # tuple of tuples of task indices
    feature_bytes: int
    output_region_bytes: int
    estimated_seconds: float

    @property
    def output_bytes(self) -> int:
        return self.output_region_bytes * self.ktiling.count

    @property
    def task_count(self) -> int:
        return len(self.tasks)

    @property
    def job_count(self) -> int:
        return len(self.jobs)


def _fits(rows: int, kernels: int, kt: int, margin: int = hw.DATA_BANK_MARGIN) -> bool:
    data = hw.cbuf_data_banks(1, rows, kt) + margin
    weight = hw.cbuf_weight_banks_min(kt, kernels)
    return data + weight <= hw.CBUF_BANKS and kt <= hw.MAX_BYTES_PER_KERNEL


def bank_split(rows: int, kernels: int, kt: int) -> tuple[int, int]:
    """(DATA_BANK, WEIGHT_BANK) for a task: data gets what it needs plus the margin (as far
    as the weights leave room), weights get the rest of the 12 banks (at least one weight
    group; whole weights beyond that stream)."""
    need_w = hw.cbuf_weight_banks_min(kt, kernels)
    data = hw.cbuf_data_banks(1, rows, kt)
    data = min(data + hw.DATA_BANK_MARGIN, hw.CBUF_BANKS - need_w)
    if data < hw.cbuf_data_banks(1, rows, kt) or need_w > hw.CBUF_BANKS - data:
        raise NPUPlanError(f"task of {rows} rows x {kernels} kernels x {kt} channels does not fit the CBUF")
    return data, hw.CBUF_BANKS - data


@lru_cache(maxsize=256)
def plan_k_tiling(K: int) -> KTiling:
    """Fewest equal K tiles (multiples of 32) such that K_TILE_MIN_ROWS rows and one weight
    group of a tile fit the CBUF."""
    if K < 1 or K > MAX_K:
        raise NPUPlanError(f"K = {K} is outside 1..{MAX_K}")
    Kp = align(K, hw.WEIGHT_CHANNEL_CHUNK)
    for n in range(1, Kp // hw.WEIGHT_CHANNEL_CHUNK + 1):
        kt = align(-(-Kp // n), hw.WEIGHT_CHANNEL_CHUNK)
        if kt <= MAX_CHANNELS_PER_TASK and _fits(K_TILE_MIN_ROWS, hw.WEIGHT_KERNEL_GROUP, kt):
            tiles, k0 = [], 0
            while k0 < Kp:
                step = min(kt, Kp - k0)
                tiles.append((k0, step))
                k0 += step
            return KTiling(K, Kp, tuple(tiles))
    raise NPUPlanError(f"K = {K} cannot be tiled")  # pragma: no cover - n = Kp/32 always fits


def _max_rows(kernels: int, kt: int, limit: int) -> int:
    """Largest multiple of ROW_ALIGN <= limit that fits with ``kernels`` kernels (0 if none)."""
    lo, hi = 0, limit // hw.ROW_ALIGN
    while lo < hi:  # binary search on multiples of ROW_ALIGN
        mid = (lo + hi + 1) // 2
        if _fits(mid * hw.ROW_ALIGN, kernels, kt):
            lo = mid
        else:
            hi = mid - 1
    return lo * hw.ROW_ALIGN


def _resident(rows: int, kernels: int, kt: int) -> bool:
    """Whether a task's whole weights stay in its weight banks (WEIGHT_REUSE possible)."""
    _, wbanks = bank_split(rows, kernels, kt)
    return hw.cbuf_weights_resident(kt, kernels, wbanks)


def _task_seconds(rows: int, kernels: int, kt: int, load_weights: bool) -> float:
    macs = rows * kernels * kt
    dma = rows * kt + rows * kernels * 4 + (kt * kernels if load_weights else 0)
    return (
        hw.TASK_OVERHEAD_S
        + macs / (hw.NPU_CLOCK_HZ * hw.MACS_PER_CYCLE)
        + dma / hw.DMA_BYTES_PER_S
    )


def _split(total: int, maximum: int, unit: int) -> tuple[int, int]:
    """(count, size): fewest pieces of at most ``maximum`` (a multiple of ``unit``), balanced."""
    count = -(-total // maximum)
    size = align(-(-total // count), unit)
    return -(-total // size), size


@lru_cache(maxsize=1024)
def plan_gemm(M: int, K: int, N: int) -> GemmPlan:
    """The tiling of an M x K x N int8 GEMM (see module docstring)."""
    if M < 1 or N < 1:
        raise NPUPlanError(f"empty GEMM {M}x{K}x{N}")
    kt_plan = plan_k_tiling(K)
    Mp = align(M, hw.ROW_ALIGN)
    Np = align(N, hw.WEIGHT_KERNEL_GROUP)
    kt_max = kt_plan.max_kt
    row_limit = min(Mp, hw.MAX_ROWS_PER_TASK)

    best = None
    for nt_cap in range(hw.WEIGHT_KERNEL_GROUP, min(Np, MAX_KERNELS_PER_TASK) + 1, hw.WEIGHT_KERNEL_GROUP):
        rows_cap = _max_rows(nt_cap, kt_max, row_limit)
        if rows_cap == 0:
            break  # more kernels only leave less room
        n_n, nt = _split(Np, nt_cap, hw.WEIGHT_KERNEL_GROUP)
        n_m, mt = _split(Mp, rows_cap, hw.ROW_ALIGN)
        seconds = 0.0
        for _, kt in kt_plan.tiles:
            reuse = hw.WEIGHT_REUSE_WITHIN_JOB and _resident(mt, nt, kt)
            first = _task_seconds(mt, nt, kt, True)
            rest = _task_seconds(mt, nt, kt, not reuse)
            seconds += n_n * (first + (n_m - 1) * rest + hw.JOB_OVERHEAD_S)
        seconds += (kt_plan.count - 1) * M * N * hw.CPU_SUM_S_PER_ELEMENT
        key = (n_n * n_m, seconds)
        if best is None or key < best[0]:
            best = (key, mt, nt, n_m, n_n)
    if best is None:
        raise NPUPlanError(f"no task shape fits the CBUF for {M}x{K}x{N}")
    (_, seconds), mt, nt, n_m, n_n = best

    region = Mp * Np * 4
    weight_offsets, pos = [], 0
    for _, kt in kt_plan.tiles:
        weight_offsets.append(pos)
        pos += kt * Np

    tasks, jobs = [], []
    for ki, (k0, kt) in enumerate(kt_plan.tiles):
        for n0 in range(0, Np, nt):
            ntile = min(nt, Np - n0)
            m_starts = list(range(0, Mp, mt))
            job_rows = min(mt, Mp)
            dbanks, wbanks = bank_split(job_rows, ntile, kt)
            resident = hw.cbuf_weights_resident(kt, ntile, wbanks)
            can_reuse = resident and hw.WEIGHT_REUSE_WITHIN_JOB
            current: list[int] = []
            budget = 0.0
            for m0 in m_starts:
                mtile = min(mt, Mp - m0)
                cost = _task_seconds(mtile, ntile, kt, not (current and can_reuse))
                if current and budget + cost > hw.JOB_TIME_BUDGET_S:
                    jobs.append(tuple(current))
                    current, budget = [], 0.0
                    cost = _task_seconds(mtile, ntile, kt, True)
                reuse = bool(current) and can_reuse
                idx = len(tasks)
                tasks.append(
                    GemmTask(
                        index=idx, job=len(jobs), m0=m0, mt=mtile, n0=n0, nt=ntile,
                        k_index=ki, k0=k0, kt=kt, data_banks=dbanks, weight_banks=wbanks,
                        weight_reuse=reuse, weights_resident=resident,
                        feature_offset=k0 * Mp + m0 * hw.FEATURE_ATOM_BYTES,
                        weight_offset=weight_offsets[ki] + n0 * kt,
                        output_offset=ki * region + (n0 // hw.OUT_INT32_PER_ATOM) * 16 * Mp + m0 * 16,
                    )
                )
                current.append(idx)
                budget += cost
            jobs.append(tuple(current))
    return GemmPlan(
        M=M, K=K, N=N, Mp=Mp, Kp=kt_plan.Kp, Np=Np, ktiling=kt_plan,
        rows_per_task=mt, kernels_per_task=nt, tasks=tuple(tasks), jobs=tuple(jobs),
        feature_bytes=Mp * kt_plan.Kp, output_region_bytes=region, estimated_seconds=seconds,
    )


def weight_bytes(ktiling: KTiling, N: int) -> int:
    return ktiling.Kp * align(N, hw.WEIGHT_KERNEL_GROUP)
