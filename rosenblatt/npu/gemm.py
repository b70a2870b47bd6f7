"""INT8 GEMM on the NPU: plan -> pack -> regcmd -> submit -> wait -> unpack (stage 3).

``prepare_weights`` packs B[K, N] once into a resident BO (the layout depends on K's tiling
only, not on M). ``GemmRun`` stages one product with a given A: it packs A into the feature
scratch BO, builds every task's regcmd words (``task_words``, a list a test may tamper with),
then ``write_program`` / ``submit`` / ``wait`` / ``result`` run it. ``matmul_int8`` and
``matmul_int8_prepared`` do all of that and record the task/job counts on ``device.stats``.

``GemmBatch`` / ``matmul_int8_batch`` put several independent products (each with its own prepared
weights) into **one** SUBMIT: every product gets its own page-aligned region of the feature and
output scratch BOs and its own jobs; the jobs run in array order on the fd's one scheduler entity
(``hw_assumptions.JOBS_RUN_IN_SUBMIT_ORDER``) and one PREP_BO on the shared output BO waits for
the last of them.
"""

from __future__ import annotations

import time

import numpy as np

from . import layout
from . import plan as planmod
from .device import CallStats, JobSpec, RocketDevice, estimate_job_timeout
from .errors import NPUError, NPUJobError, NPUPlanError
from .regcmd import ProgramBuilder, task_words


class PreparedWeights:
    """An int8 B[K, N] packed into the NPU weight layout, resident in its own BO."""

    def __init__(self, device: RocketDevice, b: np.ndarray):
        b = _check_matrix(b, "b")
        self.device = device
        self.K, self.N = b.shape
        self.ktiling = planmod.plan_k_tiling(self.K)
        self.Np = layout.align(self.N, layout.GROUP)
        packed, self.k_offsets = layout.pack_weights(b, self.ktiling.tiles, self.Np)
        self.nbytes = packed.size
        self.bo = device.create_bo(packed.size)
        self.bo.write(packed)
        self.bo.sync_for_device()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.K, self.N)

    def close(self) -> None:
        if not self.bo.closed:
            self.bo.close()

    def __enter__(self) -> "PreparedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PreparedWeights(K={self.K}, N={self.N}, k_tiles={self.ktiling.count}, bytes={self.nbytes})"


def _check_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise NPUPlanError(f"{name} must be int8, got {x.dtype}")
    if x.ndim != 2 or 0 in x.shape:
        raise NPUPlanError(f"{name} must be a non-empty 2-D matrix, got shape {x.shape}")
    return x


def _check_pair(device: RocketDevice, a, weights: PreparedWeights) -> np.ndarray:
    """``a`` as an int8 matrix that can multiply ``weights`` (prepared on ``device``, still open)."""
    a = _check_matrix(a, "a")
    if weights.device is not device:
        raise NPUPlanError("the weights were prepared on another device")
    if weights.bo.closed:
        raise NPUPlanError("the weights BO has been closed")
    if a.shape[1] != weights.K:
        raise NPUPlanError(f"a is {a.shape}, weights are {weights.shape}: K differs")
    return a


def prepare_weights(device: RocketDevice, b: np.ndarray) -> PreparedWeights:
    return PreparedWeights(device, b)


class GemmRun:
    """One staged C = A @ B on ``device`` with prepared weights."""

    def __init__(self, device: RocketDevice, a: np.ndarray, weights: PreparedWeights):
        a = _check_pair(device, a, weights)
        self.device = device
        self.weights = weights
        self.M = a.shape[0]
        self.plan = planmod.plan_gemm(self.M, weights.K, weights.N)
        p = self.plan
        self.feature = device.scratch("feature", p.feature_bytes)
        self.output = device.scratch("output", p.output_bytes)
        self.feature.write(layout.pack_feature(a, p.Mp, p.Kp))
        self.feature.sync_for_device()
        self.task_words = [
            task_words(t, p, self.feature.iova, weights.bo.iova, self.output.iova) for t in p.tasks
        ]
        self.program = None
        self.regcmd = None

    def write_program(self) -> None:
        builder = ProgramBuilder()
        for words in self.task_words:
            builder.add(words)
        self.regcmd = self.device.scratch("regcmd", builder.nbytes)
        self.regcmd.write(builder.to_bytes())
        self.regcmd.sync_for_device()
        self.program = builder.tasks

    def jobs(self) -> list[JobSpec]:
        if self.program is None:
            self.write_program()
        base = self.regcmd.iova
        return [
            JobSpec(
                tasks=[(base + self.program[i].offset, self.program[i].count) for i in job],
                in_bos=[self.feature, self.weights.bo],
                out_bos=[self.output],
            )
            for job in self.plan.jobs
        ]

    def submit(self, *, validate: bool = True) -> None:
        self.device.submit(self.jobs(), validate=validate)

    def wait(self, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            timeout_s = estimate_job_timeout(self.plan.job_count, self.plan.estimated_seconds)
        try:
            self.output.wait(timeout_s)
        except NPUJobError:
            # the out BO's fence may never signal: do not reuse these scratch BOs
            self.device.drop_scratch()
            raise

    def result(self) -> np.ndarray:
        p = self.plan
        words = p.Mp * p.Np
        acc = None
        for k in range(p.ktiling.count):
            region = self.output.read(np.int32, words, k * p.output_region_bytes)
            c = layout.unpack_output(region, p.Mp, p.Np)[: self.M, : self.weights.N]
            acc = c.copy() if acc is None else acc + c  # int32 K-split accumulation on the CPU
        return np.ascontiguousarray(acc, dtype=np.int32)

    def stats(self, seconds: float) -> CallStats:
        p = self.plan
        return CallStats(
            tasks=p.task_count, jobs=p.job_count, submits=1, k_tiles=p.ktiling.count,
            m_tiles=-(-p.Mp // p.rows_per_task), n_tiles=-(-p.Np // p.kernels_per_task), seconds=seconds,
        )


#: byte alignment of each product's region in a batch's feature and output BOs ([inferred]: a
#: page keeps every region's base as aligned as a BO's own IOVA)
BATCH_REGION_ALIGN = 4096


class GemmBatch:
    """Several C_i = A_i @ B_i (each B_i prepared on ``device``) staged for one SUBMIT."""

    def __init__(self, device: RocketDevice, items):
        items = list(items)
        if not items:
            raise NPUPlanError("an empty batch")
        self.device = device
        self.arrays, self.weights, self.plans = [], [], []
        for a, w in items:
            a = _check_pair(device, a, w)
            self.arrays.append(a)
            self.weights.append(w)
            self.plans.append(planmod.plan_gemm(a.shape[0], w.K, w.N))
        self.feature_offsets, self.output_offsets = [], []
        fsize = osize = 0
        for p in self.plans:
            self.feature_offsets.append(fsize)
            self.output_offsets.append(osize)
            fsize += layout.align(p.feature_bytes, BATCH_REGION_ALIGN)
            osize += layout.align(p.output_bytes, BATCH_REGION_ALIGN)
        self.feature = device.scratch("feature", fsize)
        self.output = device.scratch("output", osize)
        for a, p, off in zip(self.arrays, self.plans, self.feature_offsets):
            self.feature.write(layout.pack_feature(a, p.Mp, p.Kp), off)
        self.feature.sync_for_device()
        builder = ProgramBuilder()
        self.first_task = []
        for w, p, fo, oo in zip(self.weights, self.plans, self.feature_offsets, self.output_offsets):
            self.first_task.append(len(builder.tasks))
            for t in p.tasks:
                builder.add(task_words(t, p, self.feature.iova + fo, w.bo.iova, self.output.iova + oo))
        self.regcmd = device.scratch("regcmd", builder.nbytes)
        self.regcmd.write(builder.to_bytes())
        self.regcmd.sync_for_device()
        self.program = builder.tasks

    @property
    def job_count(self) -> int:
        return sum(p.job_count for p in self.plans)

    def jobs(self) -> list[JobSpec]:
        base = self.regcmd.iova
        out = []
        for w, p, first in zip(self.weights, self.plans, self.first_task):
            for job in p.jobs:
                out.append(JobSpec(
                    tasks=[(base + self.program[first + i].offset, self.program[first + i].count) for i in job],
                    in_bos=[self.feature, w.bo], out_bos=[self.output]))
        return out

    def submit(self, *, validate: bool = True) -> None:
        self.device.submit(self.jobs(), validate=validate)

    def wait(self, timeout_s: float | None = None) -> None:
        """PREP_BO on the shared output BO: it waits for the last job's fence, and the fences of
        one fd's jobs signal in order, so every product is then complete."""
        if timeout_s is None:
            timeout_s = estimate_job_timeout(self.job_count, sum(p.estimated_seconds for p in self.plans))
        try:
            self.output.wait(timeout_s)
        except NPUJobError:
            self.device.drop_scratch()
            raise

    def results(self) -> list[np.ndarray]:
        out = []
        for a, w, p, off in zip(self.arrays, self.weights, self.plans, self.output_offsets):
            words = p.Mp * p.Np
            acc = None
            for k in range(p.ktiling.count):
                region = self.output.read(np.int32, words, off + k * p.output_region_bytes)
                c = layout.unpack_output(region, p.Mp, p.Np)[: a.shape[0], : w.N]
                acc = c.copy() if acc is None else acc + c
            out.append(np.ascontiguousarray(acc, dtype=np.int32))
        return out

    def stats(self, seconds: float) -> CallStats:
        ps = self.plans
        return CallStats(
            tasks=sum(p.task_count for p in ps), jobs=self.job_count, submits=1,
            k_tiles=max(p.ktiling.count for p in ps),
            m_tiles=sum(-(-p.Mp // p.rows_per_task) for p in ps),
            n_tiles=sum(-(-p.Np // p.kernels_per_task) for p in ps), seconds=seconds, gemms=len(ps))


def matmul_int8_batch(items, device: RocketDevice) -> list[np.ndarray]:
    """``[A_i @ B_i]`` (int32) for ``items`` = [(a_i int8 [M_i, K_i], PreparedWeights B_i), ...],
    all in **one** SUBMIT (one job list, the products' jobs in item order). Bit-exact like
    :func:`matmul_int8_prepared`; ``device.stats.last.gemms`` is the number of products."""
    t0 = time.perf_counter()
    batch = GemmBatch(device, items)
    batch.submit()
    batch.wait()
    out = batch.results()
    device.stats.record(batch.stats(time.perf_counter() - t0))
    return out


def matmul_int8_prepared(a: np.ndarray, weights: PreparedWeights, device: RocketDevice | None = None) -> np.ndarray:
    """C = A @ B (int32) on the NPU, with B prepared by ``device.prepare_weights``."""
    device = device or weights.device
    t0 = time.perf_counter()
    run = GemmRun(device, a, weights)
    run.submit()
    run.wait()
    c = run.result()
    device.stats.record(run.stats(time.perf_counter() - t0))
    return c


def matmul_int8(a: np.ndarray, b: np.ndarray, device: RocketDevice) -> np.ndarray:
    """C = A @ B on the NPU: ``a`` int8 [M, K], ``b`` int8 [K, N] -> int32 [M, N], bit-exact
    with ``a.astype(int32) @ b.astype(int32)``. Task/job counts: ``device.stats.last``."""
    a = _check_matrix(a, "a")
    b = _check_matrix(b, "b")
    if a.shape[1] != b.shape[0]:
        raise NPUPlanError(f"shapes {a.shape} and {b.shape} do not multiply")
    with PreparedWeights(device, b) as w:
        return matmul_int8_prepared(a, w, device)


__all__ = ["GemmBatch", "GemmRun", "matmul_int8_batch", "NPUError", "PreparedWeights", "matmul_int8", "matmul_int8_prepared", "prepare_weights"]
