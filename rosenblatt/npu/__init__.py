"""RK3588 NPU through the mainline ``rocket`` DRM accel driver, in pure Python.

Layers: ``uapi`` (ctypes ABI) -> ``device`` (BOs, syncs, SUBMIT over a transport) ->
``plan`` (tiling) -> ``regcmd`` (register-command words) -> ``layout`` (data packing) ->
``gemm`` (INT8 GEMM); ``simulator`` stands behind the same ioctl boundary when there is no
board; ``hw_assumptions`` holds every unconfirmed hardware assumption; ``probe`` is the
diagnostic. The package knows nothing about what the matrices mean.

Public entry points::

    dev = open_device(sim=True)          # or sim=False on a board with /dev/accel/accel0
    c = matmul_int8(a, b, dev)           # int8 [M,K] @ int8 [K,N] -> int32 [M,N], bit-exact
    dev.stats.last                       # tasks, jobs, submits of that call
    w = prepare_weights(dev, b)          # B packed once into a resident BO
    c = matmul_int8_prepared(a, w, dev)  # reuse it with any A
    cs = matmul_int8_batch([(a1, w1), (a2, w2)], dev)   # several products, one SUBMIT
    run_gemm_graph([GemmNode(w, a), GemmNode(w2, make_a2, deps=(0,))], dev)  # one SUBMIT per level
"""

from __future__ import annotations

from .device import BufferObject, CallStats, JobSpec, NPUStats, RocketDevice
from .errors import (
    NPUDeviceError,
    NPUError,
    NPUJobError,
    NPUPlanError,
    NPUSubmitError,
    NPUUnavailableError,
)
from .gemm import PreparedWeights, matmul_int8, matmul_int8_batch, matmul_int8_prepared, prepare_weights
from .graph import GemmNode, run_gemm_graph, submit_levels
from .cost import CPUCost, NPUCost, cpu_gemm_cost, crossover, npu_gemm_cost


def open_device(sim: bool = False, path: str | None = None, *, npu=None) -> RocketDevice:
    """A :class:`RocketDevice` on the real driver (``/dev/accel/accel*``, or ``path``) or, with
    ``sim=True``, the same class over the register-level simulator (``npu`` may pass a
    :class:`~rosenblatt.npu.simulator.SimulatedNPU` to share one between devices)."""
    if sim:
        from .simulator import SimulatedNPU

        return RocketDevice((npu or SimulatedNPU()).open())
    return RocketDevice.open(path)


__all__ = [
    "BufferObject",
    "CPUCost",
    "CallStats",
    "GemmNode",
    "JobSpec",
    "NPUDeviceError",
    "NPUCost",
    "NPUError",
    "NPUJobError",
    "NPUPlanError",
    "NPUStats",
    "NPUSubmitError",
    "NPUUnavailableError",
    "PreparedWeights",
    "RocketDevice",
    "matmul_int8",
    "matmul_int8_batch",
    "matmul_int8_prepared",
    "run_gemm_graph",
    "submit_levels",
    "prepare_weights",
    "open_device",
    "npu_gemm_cost",
    "cpu_gemm_cost",
    "crossover",
]
