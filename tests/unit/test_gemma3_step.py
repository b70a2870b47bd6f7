"""gemma3 through the fused layers (rosenblatt/models/llama_step.py) against its per-operation
forward: q/k norms, post-norms, GELU gating, local RoPE tables and sliding windows over a
bounded cache. (Not in the A76 lane's subset: the same kernels as the llama tests there, whose
gating functions tests/unit/test_ops.py checks; the 270M model would take minutes under
emulation.)"""

from __future__ import annotations

import numpy as np
import pytest

from rosenblatt import Engine

from support import gemma3_path


@pytest.fixture(scope="module")
def gemma3():
    """The real gemma-3-270m, its local layers' window cut to 8 positions (bounded caches of 24),
    so that short sequences cross windows and drop old keys."""
    engine = Engine.load(gemma3_path(), n_ctx=96, threads=2)
    for L in engine.model.layers:
        L.window = 8 if L.local else 0
    engine.cache = engine.model.new_cache()
    return engine


def _counting_runs(model):
    """Count the fused plan's calls (to know that a path ran fused)."""
    plan = model.fused_plan()
    runs = []
    original = plan.run
    plan.run = lambda *a, **k: runs.append(a[0].shape[0]) or original(*a, **k)
    return plan, original, runs


GEMMA_PROMPT, GEMMA_STEPS = [2, 105, 2364, 107, 818, 5279, 563, 496, 2268, 236761, 107, 106, 107, 105, 4368,
                             107, 818, 7842, 3363, 529], [506, 2268, 236761, 1018, 614, 822, 528, 1595, 9042, 623]


def _gemma_decode(engine, fused: bool):
    engine.model.fused = fused
    try:
        engine.reset()
        engine.eval(GEMMA_PROMPT, logits="none")
        return [engine.eval([t])[0].copy() for t in GEMMA_STEPS]
    finally:
        engine.model.fused = True


def test_gemma3_fused_step_is_bit_identical_to_the_per_operation_forward(gemma3):
    """Decode steps past the window (the bounded cache drops keys between fused calls) give the
    per-operation forward's logits bit for bit, and the caches the same keys."""
    plan, original, runs = _counting_runs(gemma3.model)
    try:
        fused = _gemma_decode(gemma3, fused=True)
    finally:
        plan.run = original
    assert runs.count(1) == len(GEMMA_STEPS) and plan.gelu.size and plan.qk_norm.shape[1]   # it ran fused
    fused_k = [k.copy() for k in gemma3.cache.k]
    assert max(gemma3.cache.offset) > 0                       # old keys were dropped
    plain = _gemma_decode(gemma3, fused=False)
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert np.array_equal(a, b), (step, float(np.abs(a - b).max()))
    assert all(np.array_equal(a, b) for a, b in zip(fused_k, gemma3.cache.k))


def test_gemma3_fused_prompt_in_chunks_is_bit_identical(gemma3):
    plain = _prompt_logits_of(gemma3, GEMMA_PROMPT + GEMMA_STEPS, fused=False, chunk=64)
    for chunk in (64, 5, 3):
        assert np.array_equal(_prompt_logits_of(gemma3, GEMMA_PROMPT + GEMMA_STEPS, fused=True, chunk=chunk),
                              plain), chunk


def _prompt_logits_of(engine, ids, fused: bool, chunk: int) -> np.ndarray:
    engine.model.fused = fused
    engine.prefill_chunk = chunk
    try:
        engine.reset()
        return engine.eval(ids, logits="all")
    finally:
        engine.model.fused = True
        engine.prefill_chunk = 64


def test_gemma3_batched_step_gives_each_sequence_its_own_logits(gemma3):
    """Sequences at different positions (some past the window, some not) in one fused call per
    step: each gets the logits of decoding it alone."""
    model = gemma3.model
    prompts = [GEMMA_PROMPT[:3], GEMMA_PROMPT, GEMMA_PROMPT[:1], GEMMA_PROMPT[:12]]
    steps = [GEMMA_STEPS[k:k + 4] for k in range(0, 8, 2)]
    alone = []
    for i, p in enumerate(prompts):
        gemma3.reset()
        gemma3.eval(p, logits="none")
        alone.append([gemma3.eval([s[i]])[0] for s in steps])
    caches = model.new_caches(len(prompts))
    for p, c in zip(prompts, caches):
        model.forward(np.asarray(p), c, logits="none")
    plan, original, runs = _counting_runs(model)
    try:
        for k, s in enumerate(steps):
            out = model.forward_batch(s, caches)
            for i in range(len(prompts)):
                assert np.array_equal(out[i], alone[i][k]), (i, k)
    finally:
        plan.run = original
    assert runs == [len(prompts)] * len(steps)                 # one call a step, every sequence in it
