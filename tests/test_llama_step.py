"""The fused one-token step (rosenblatt/models/llama_step.py) against the per-operation forward."""

from __future__ import annotations

import numpy as np
import pytest

from rosenblatt import Engine
from rosenblatt.models.llama_step import DecodePlan

from conftest import MICRO_MODELS, micro_path, smollm2_path

PROMPT, STEPS = [1, 5, 9, 20, 33], [7, 41, 2, 60, 11, 3]


def _decode(engine, fused: bool) -> list[np.ndarray]:
    """Logits of each step token after the prompt, fused or (while profiling) op by op."""
    engine.model.profile = None if fused else {}
    try:
        engine.reset()
        engine.eval(PROMPT, logits="none")
        return [engine.eval([t])[0].copy() for t in STEPS]
    finally:
        engine.model.profile = None


FUSED = [n for n in MICRO_MODELS if not n.endswith(("q2_k", "q3_k_m", "f16", "bf16", "f32"))]


@pytest.mark.parametrize("name", FUSED)
def test_fused_step_is_bit_identical_to_the_per_operation_forward(name):
    engine = Engine.load(micro_path(name), n_ctx=64, threads=2)
    fused = _decode(engine, fused=True)
    plan = engine.model._plan[1]
    assert isinstance(plan, DecodePlan)                       # it ran fused,
    assert plan.threads == 2 and plan.with_output and (plan.nchunk >= 2).all()   # every product shared
    plain = _decode(engine, fused=False)
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert np.array_equal(a, b), (name, step, float(np.abs(a - b).max()))
    # and the caches hold the same keys/values
    fused_cache = [k.copy() for k in engine.cache.k]
    _decode(engine, fused=True)
    assert all(np.array_equal(a, b) for a, b in zip(fused_cache, engine.cache.k))


def test_fused_step_on_smollm2_with_threads_split():
    """A real model whose larger products are split over two threads inside the fused call."""
    engine = Engine.load(smollm2_path(), n_ctx=64, threads=2)
    fused = _decode(engine, fused=True)
    plan = engine.model._plan[1]
    assert plan is not None and plan.threads == 2 and (plan.nchunk > 2).any()
    plain = _decode(engine, fused=False)
    assert all(np.array_equal(a, b) for a, b in zip(fused, plain))


@pytest.mark.parametrize("name", ["qwen2-micro-q2_k", "qwen2-micro-f16", "llama-micro-f16"])
def test_types_without_int8_kernels_run_op_by_op(name):
    engine = Engine.load(micro_path(name), n_ctx=64)
    engine.eval([1, 2, 3])
    engine.eval([4])
    assert engine.model._plan == ("int8", None)


def _one_step(engine):
    engine.reset()
    engine.eval([1, 2])
    engine.eval([3])


def test_plan_follows_the_backends_kernel_choice():
    engine = Engine.load(micro_path("qwen2-micro-q4_k_m"), n_ctx=64)
    _one_step(engine)
    assert engine.model._plan[1] is not None
    engine.model.backend.kernels = "float"        # exact float kernels: no int8 groups, no plan
    _one_step(engine)
    assert engine.model._plan == ("float", None)
    engine.model.backend.kernels = "int8"
    _one_step(engine)
    assert engine.model._plan[1] is not None


def test_npu_backend_fuses_only_when_one_row_products_stay_on_the_cpu():
    cpu_decode = Engine.load(micro_path("llama-micro-q4_0"), device="npu-sim", n_ctx=64)
    _one_step(cpu_decode)
    assert cpu_decode.model.backend.min_rows > 1 and cpu_decode.model._plan[1] is not None
    all_npu = Engine.load(micro_path("llama-micro-q4_0"), device="npu-sim", n_ctx=64, npu_min_rows=0)
    _one_step(all_npu)
    assert all_npu.model._plan[1] is None


def test_fused_step_when_the_runtime_has_fewer_threads_than_the_plan():
    """The step's region asks for the backend's threads; with numba limited to one, its two
    shares run one after the other on one thread (the second finds every chunk taken)."""
    import numba
    engine = Engine.load(smollm2_path(), n_ctx=64, threads=2)
    two = _decode(engine, fused=True)
    assert engine.model._plan[1].threads == 2
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = _decode(engine, fused=True)
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
