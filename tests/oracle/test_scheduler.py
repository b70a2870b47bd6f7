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
