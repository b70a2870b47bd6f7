"""The forward pass against llama.cpp's logits (micro fixtures) and a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from rosenblatt import Engine

from support import MICRO_MODELS, load_reference, micro_path
from reference_forward import forward as reference_forward


def teacher_forced(engine, meta):
    ids = meta["prompt_ids"] + meta["greedy_ids"][:15]
    e = engine.logits(ids)
    n = len(meta["prompt_ids"])
    return np.concatenate([e[:n], e[n - 1:]])   # 56 rows, as llama.cpp's logits + gen_logits


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_logits_match_llamacpp(name):
    meta, L, G, tol = load_reference(name)
    engine = Engine.load(micro_path(name), n_ctx=64)
    ours = teacher_forced(engine, meta)
    theirs = np.concatenate([L, G]).astype(np.float64)
    d = ours.astype(np.float64) - theirs
    rms, mx = np.sqrt((d ** 2).mean()), np.abs(d).max()
    flips = int((ours.argmax(-1) != theirs.argmax(-1)).sum())
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert rms <= tol["rms"], f"rms {rms:.4g} > {tol['rms']:.4g}"
    assert mx <= tol["max"], f"max {mx:.4g} > {tol['max']:.4g}"
    assert flips <= tol["max_flips"], f"{flips} argmax flips > {tol['max_flips']}"


@pytest.mark.parametrize("name", ["qwen2-micro-f32", "qwen2-micro-q4_k_m", "llama-micro-f16", "llama-micro-q6_k"])
def test_fast_path_matches_float64_reference(name):
    meta, *_ = load_reference(name)
    ids = meta["prompt_ids"][:24]
    ref = reference_forward(str(micro_path(name)), ids)
    engine = Engine.load(micro_path(name), n_ctx=64)
    engine.model.backend.kernels = "float"      # exact kernels (the int8 ones: test_simd.py)
    ours = engine.logits(ids).astype(np.float64)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 2e-5, f"max relative deviation {err:.2e} from the float64 reference"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["qwen2-micro-q4_k_m", "llama-micro-q4_0"])
def test_decode_one_token_at_a_time_equals_batched(name):
    meta, *_ = load_reference(name)
    ids = meta["prompt_ids"] + meta["greedy_ids"][:10]
    engine = Engine.load(micro_path(name), n_ctx=64)
    engine.model.backend.kernels = "float"      # exact kernels (the int8 ones: test_simd.py)
    batched = engine.logits(ids)
    engine.reset()
    prompt = meta["prompt_ids"]
    steps = [engine.eval(prompt, logits="last")[0]]
    for tok in meta["greedy_ids"][:10]:
        steps.append(engine.eval([tok], logits="last")[0])
    np.testing.assert_allclose(np.array(steps), batched[len(prompt) - 1:], atol=1e-4, rtol=1e-4)


def test_cache_truncate_and_reuse():
    meta, *_ = load_reference("qwen2-micro-q8_0")
    ids = meta["prompt_ids"]
    engine = Engine.load(micro_path("qwen2-micro-q8_0"), n_ctx=64)
    full = engine.logits(ids)
    engine.truncate(25)                 # keep the first 25 positions, recompute the rest
    tail = engine.eval(ids[25:], logits="all")
    np.testing.assert_allclose(tail, full[25:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        engine.truncate(100)


def test_wrong_rope_pairing_is_detected():
    """The comparison can fail: flipping the RoPE pairing breaks the tolerance."""
    name = "qwen2-micro-q4_k_m"
    meta, L, G, tol = load_reference(name)
    engine = Engine.load(micro_path(name), n_ctx=64)
    object.__setattr__(engine.model.cfg, "rope_neox", False)
    d = teacher_forced(engine, meta).astype(np.float64) - np.concatenate([L, G])
    assert np.sqrt((d ** 2).mean()) > 5 * tol["rms"]


def test_context_overflow_and_bad_token_ids():
    engine = Engine.load(micro_path("llama-micro-q4_0"), n_ctx=16)
    with pytest.raises(ValueError, match="context"):
        engine.logits(list(range(17)))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.logits([1, 2, engine.config.vocab_size])
    assert engine.logits([]).shape == (0, engine.config.vocab_size)


@pytest.mark.parametrize("name", ["qwen2-micro-q4_k_m", "qwen2-micro-q8_0", "llama-micro-q4_0", "llama-micro-q6_k"])
def test_a_positions_logits_do_not_depend_on_how_the_tokens_were_cut(name):
    """Bit for bit: one call over the whole sequence, or chunks of 7 and 13 then one token at a
    time (the fused decode step). Prefix reuse and batching rely on it."""
    meta, *_ = load_reference(name)
    ids = meta["prompt_ids"] + meta["greedy_ids"][:10]
    engine = Engine.load(micro_path(name), n_ctx=64)
    whole = engine.logits(ids)
    engine.reset()
    parts = [engine.eval(ids[:7], logits="all"), engine.eval(ids[7:20], logits="all")]
    parts += [engine.eval([t], logits="all") for t in ids[20:]]
    assert np.array_equal(np.concatenate(parts).view(np.int32), whole.view(np.int32))
