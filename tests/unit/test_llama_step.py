"""The fused layers (rosenblatt/models/llama_step.py) against the per-operation forward: a decode
step, a prompt, and a batch of sequences at different positions."""

from __future__ import annotations

import numpy as np
import pytest

from rosenblatt import Engine
from rosenblatt.models.llama_step import FusedPlan

from support import MICRO_MODELS, micro_path, smollm2_path

PROMPT, STEPS = [1, 5, 9, 20, 33], [7, 41, 2, 60, 11, 3]


def _decode(engine, fused: bool) -> list[np.ndarray]:
    """Logits of each step token after the prompt, fused or op by op."""
    engine.model.fused = fused
    try:
        engine.reset()
        engine.eval(PROMPT, logits="none")
        return [engine.eval([t])[0].copy() for t in STEPS]
    finally:
        engine.model.fused = True


FUSED = [n for n in MICRO_MODELS if not n.endswith(("q2_k", "q3_k_m", "f16", "bf16", "f32"))]


@pytest.mark.parametrize("name", FUSED)
def test_fused_step_is_bit_identical_to_the_per_operation_forward(name):
    engine = Engine.load(micro_path(name), n_ctx=64, threads=2)
    fused = _decode(engine, fused=True)
    plan = engine.model.fused_plan()
    assert isinstance(plan, FusedPlan)                       # it ran fused,
    assert plan.threads == 2 and plan.with_output and (plan.nchunk >= 2).all()   # every product shared
    plain = _decode(engine, fused=False)
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert np.array_equal(a, b), (name, step, float(np.abs(a - b).max()))
    # and the caches hold the same keys/values
    fused_cache = [k.copy() for k in engine.cache.k]
    _decode(engine, fused=True)
    assert all(np.array_equal(a, b) for a, b in zip(fused_cache, engine.cache.k))


def test_the_profiler_wraps_the_stages_without_changing_a_bit():
    """bench's profiler passes timed wrappers of the stage functions to forward(): the op-by-op
    path, the same logits as the fused step, and every stage timed."""
    from rosenblatt.bench import timed_ops
    engine = Engine.load(micro_path("qwen2-micro-q4_k_m"), n_ctx=64, threads=2)
    fused = _decode(engine, fused=True)
    engine.reset()
    engine.eval(PROMPT, logits="none")
    seconds, model = {}, engine.model
    timed = [model.forward(np.array([t]), engine.cache, "last", ops=timed_ops(model.stage_ops(), seconds))[0]
             for t in STEPS]
    assert all(np.array_equal(a, b) for a, b in zip(fused, timed))
    assert set(seconds) == {"matmul", "attention", "norms/rope/act"} and min(seconds.values()) > 0


def test_fused_step_on_smollm2_with_threads_split():
    """A real model whose larger products are split over two threads inside the fused call."""
    engine = Engine.load(smollm2_path(), n_ctx=64, threads=2)
    fused = _decode(engine, fused=True)
    plan = engine.model.fused_plan()
    assert plan is not None and plan.threads == 2 and (plan.nchunk > 2).any()
    plain = _decode(engine, fused=False)
    assert all(np.array_equal(a, b) for a, b in zip(fused, plain))


@pytest.mark.parametrize("name", ["qwen2-micro-q2_k", "qwen2-micro-f16", "llama-micro-f16"])
def test_types_without_int8_kernels_run_op_by_op(name):
    engine = Engine.load(micro_path(name), n_ctx=64)
    engine.eval([1, 2, 3])
    engine.eval([4])
    assert engine.model.fused_plan() is None


def _one_step(engine):
    engine.reset()
    engine.eval([1, 2])
    engine.eval([3])


def test_plan_follows_the_backends_kernel_choice():
    engine = Engine.load(micro_path("qwen2-micro-q4_k_m"), n_ctx=64)
    _one_step(engine)
    assert engine.model.fused_plan() is not None
    engine.model.backend.kernels = "float"        # exact float kernels: no int8 groups, no plan
    _one_step(engine)
    assert engine.model.fused_plan() is None
    engine.model.backend.kernels = "int8"
    _one_step(engine)
    assert engine.model.fused_plan() is not None


def test_npu_backend_fuses_only_when_one_row_products_stay_on_the_cpu():
    # a fixed threshold (the cost model's own sends none of this micro model's small products)
    cpu_decode = Engine.load(micro_path("llama-micro-q4_0"), device="npu-sim", n_ctx=64, npu_min_rows=16)
    _one_step(cpu_decode)
    backend = cpu_decode.model.backend
    assert backend.min_rows > 1 and cpu_decode.model.fused_plan() is not None
    assert backend.fused_rows() == backend.min_rows - 1
    # a prompt of min_rows tokens goes op by op (as a graph), its products to the NPU
    calls = []
    on_npu = type(backend).on_npu
    type(backend).on_npu = lambda self, rows, w: calls.append((rows, on_npu(self, rows, w))) or calls[-1][1]
    try:
        cpu_decode.reset()
        cpu_decode.eval(list(range(1, backend.min_rows + 1)))
        assert calls.count((backend.min_rows, True)) >= 4 * cpu_decode.config.n_layers
        calls.clear()
        cpu_decode.eval([3])                                  # a step: fused, no product asks
        assert calls == []
    finally:
        type(backend).on_npu = on_npu
    all_npu = Engine.load(micro_path("llama-micro-q4_0"), device="npu-sim", n_ctx=64, npu_min_rows=0)
    _one_step(all_npu)
    assert all_npu.model.fused_plan() is None


def test_fused_step_when_the_runtime_has_fewer_threads_than_the_plan():
    """The step's region asks for the backend's threads; with numba limited to one, its two
    shares run one after the other on one thread (the second finds every chunk taken)."""
    import numba
    engine = Engine.load(smollm2_path(), n_ctx=64, threads=2)
    two = _decode(engine, fused=True)
    assert engine.model.fused_plan().threads == 2
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = _decode(engine, fused=True)
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))


def _prompt_logits(engine, fused: bool, chunk: int) -> np.ndarray:
    engine.model.fused = fused
    engine.prefill_chunk = chunk
    try:
        engine.reset()
        return engine.eval(PROMPT + STEPS, logits="all")
    finally:
        engine.model.fused = True


@pytest.mark.parametrize("name", ["qwen2-micro-q4_k_m", "qwen2-micro-q8_0", "llama-micro-q4_0", "llama-micro-q6_k"])
def test_fused_prompt_is_bit_identical_to_the_per_operation_forward(name):
    """A prompt through the fused layers (rows shared out over the threads), in one call or in
    chunks, gives every position's logits bit for bit as the per-operation forward does."""
    engine = Engine.load(micro_path(name), n_ctx=64, threads=2)
    plain = _prompt_logits(engine, fused=False, chunk=64)
    for chunk in (64, 4, 3):
        assert np.array_equal(_prompt_logits(engine, fused=True, chunk=chunk), plain), chunk


@pytest.mark.parametrize("name", ["qwen2-micro-q4_k_m", "llama-micro-q4_1"])
def test_batched_step_gives_each_sequence_its_own_logits(name):
    """Four sequences with prompts of different lengths, decoded together in one call per step
    (each row at its own position in its own cache slot), give each sequence the logits of
    decoding it alone."""
    engine = Engine.load(micro_path(name), n_ctx=64, threads=2)
    model = engine.model
    prompts, steps = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]], [[20, 21, 22, 23], [30, 31, 32, 33]]
    alone = []
    for i, p in enumerate(prompts):
        engine.reset()
        engine.eval(p, logits="none")
        alone.append([engine.eval([s[i]])[0] for s in steps])
    caches = model.new_caches(len(prompts))
    for p, c in zip(prompts, caches):
        model.forward(np.asarray(p), c, logits="none")
    for k, s in enumerate(steps):
        out = model.forward_batch(s, caches)
        assert out.shape == (len(prompts), engine.config.vocab_size)
        for i in range(len(prompts)):
            assert np.array_equal(out[i], alone[i][k]), (i, k)
    assert [c.length for c in caches] == [len(p) + len(steps) for p in prompts]
    # caches from separate pools still work, one sequence after another
    loose = [model.new_cache() for _ in prompts]
    for p, c in zip(prompts, loose):
        model.forward(np.asarray(p), c, logits="none")
    assert np.array_equal(model.forward_batch(steps[0], loose)[2], alone[2][0])


def test_batched_step_refuses_what_it_cannot_do():
    engine = Engine.load(micro_path("qwen2-micro-q4_k_m"), n_ctx=8)
    caches = engine.model.new_caches(2)
    with pytest.raises(ValueError, match="2 tokens for 1 caches"):
        engine.model.forward_batch([1, 2], caches[:1])
    with pytest.raises(ValueError, match="twice"):
        engine.model.forward_batch([1, 2], [caches[0], caches[0]])
    engine.model.forward(np.arange(1, 9), caches[1], logits="none")
    with pytest.raises(ValueError, match="context overflow"):
        engine.model.forward_batch([1, 2], caches)

