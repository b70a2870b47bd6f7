"""Engine users on several threads: the scheduler batches them, and each gets the tokens it
gets from the engine alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count to five.", "What is 2 + 2?",
             "Say hello in Spanish.", "Why is the sky blue?"]


def test_threads_get_what_they_get_alone(smollm2_engine):
    eng = smollm2_engine
    settings = [dict(temperature=0, max_new_tokens=12), dict(temperature=0.8, seed=5, max_new_tokens=16),
                dict(temperature=0, max_new_tokens=5, stop=["."])]
    alone = {(q, i): eng.chat([{"role": "user", "content": q}], **settings[i % 3]) for i, q in enumerate(QUESTIONS)}
    with eng.scheduler(parallel=3) as s:
        with ThreadPoolExecutor(6) as pool:
            got = dict(zip(alone, pool.map(
                lambda k: s.chat([{"role": "user", "content": k[0]}], **settings[k[1] % 3]), alone)))
        assert s.batch.running == 0 and s.batch.free == 3
    assert got == alone


def test_leaving_early_frees_the_slot_and_errors_reach_the_caller(smollm2_engine):
    with smollm2_engine.scheduler(parallel=1) as s:
        it = s.responses("Once upon a time", temperature=0, max_new_tokens=200, ignore_eos=True)
        first = next(it)
        assert first.text is not None
        it.close()                                      # the one slot must come back
        done = threading.Event()
        out = []

        def other():
            out.append(s.generate("The sky is", temperature=0, max_new_tokens=4))
            done.set()

        threading.Thread(target=other, daemon=True).start()
        assert done.wait(60), "the slot of a closed iterator was not freed"
        assert out[0] == smollm2_engine.generate("The sky is", temperature=0, max_new_tokens=4)
        with pytest.raises(ValueError, match="context"):
            s.generate("word " * 5000)                  # checked on the caller's thread
    with pytest.raises(RuntimeError, match="closed"):
        s.generate("x")


class _FailingAt:
    """A constraint that lets everything through and fails at its n-th token (a grammar that
    breaks mid-generation)."""

    def __init__(self, n: int):
        self.n = n

    def apply(self, x):
        self.n -= 1
        if self.n == 0:
            raise ValueError("constrained decoding failed: test")

    def consume(self, token):
        pass


def test_a_failing_generation_ends_alone(smollm2_engine, monkeypatch):
    import rosenblatt.generate as generate
    from rosenblatt.sampling import Sampler
    eng = smollm2_engine
    alone = eng.generate("The sky is", temperature=0, max_new_tokens=12)
    real = generate.sampler_for
    monkeypatch.setattr(generate, "sampler_for", lambda tok, p: Sampler(p.sampling(), _FailingAt(3))
                        if p.seed == 99 else real(tok, p))
    with eng.scheduler(parallel=2) as s:
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(lambda: s.generate("Once upon a time", temperature=0, seed=99, max_new_tokens=12))
            good = pool.submit(lambda: s.generate("The sky is", temperature=0, max_new_tokens=12))
            with pytest.raises(ValueError, match="constrained decoding failed"):
                bad.result(60)
            assert good.result(60) == alone
        assert s.batch.free == 2


def test_a_refused_grammar_takes_no_slot(smollm2_engine):
    from rosenblatt.generate import BatchGenerator
    from rosenblatt.params import GenerationParams, ParamError
    batch = BatchGenerator(smollm2_engine, slots=1)
    ids = smollm2_engine.tokenize("Hi")
    with pytest.raises(ParamError):
        batch.insert(ids, GenerationParams(json_schema={"type": "strang"}))
    assert batch.free == 1 and batch.running == 0


def test_close_cancels_what_runs_and_refuses_what_waits(smollm2_engine):
    import time
    s = smollm2_engine.scheduler(parallel=1)
    running = s.responses("Once upon a time", temperature=0, max_new_tokens=500, ignore_eos=True)
    next(running)                                           # it has the one slot
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: s.generate("The sky is", max_new_tokens=4))
        time.sleep(0.2)
        t0 = time.monotonic()
        s.close()
        assert time.monotonic() - t0 < 10 and not s._thread.is_alive()
        with pytest.raises(RuntimeError, match="closed"):
            waiting.result(10)
    assert [r.finish_reason for r in running][-1] == "cancelled"
