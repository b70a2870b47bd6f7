"""rosenblatt.parallel: chunks claimed from atomic counters inside one parallel region."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from rosenblatt import parallel

from conftest import a76_assembly


@njit(parallel=True, cache=True)
def _chain(sync, out, region_threads):
    """Phase p adds 1 + (sum of phase p-1) to each of its chunks' slots: a chunk computed
    before the phase it reads was complete would see a smaller sum."""
    sync[:] = 0
    phases, chunks = out.shape
    for _ in prange(region_threads):
        for p in range(phases):
            while True:
                c = parallel.claim(sync, p, chunks)
                if c < 0:
                    break
                out[p, c] += 1 + (out[p - 1].sum() if p else 0)
                parallel.done(sync, p)
            parallel.wait(sync, p, chunks)


def _expected(phases, chunks):
    out = np.zeros((phases, chunks), np.int64)
    for p in range(phases):
        out[p] = 1 + (out[p - 1].sum() if p else 0)
    return out


@pytest.mark.parametrize("region_threads,numba_threads", [(1, 1), (2, 2), (4, 2), (2, 1), (8, 2)])
def test_every_chunk_once_after_the_phase_before(region_threads, numba_threads):
    """More region iterations than threads (some run one after another on a thread) must
    neither deadlock nor run a chunk twice."""
    available = numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    numba.set_num_threads(min(numba_threads, available))
    try:
        phases, chunks = 20, 5                      # sums stay below 2**63
        sync, out = parallel.new_sync(phases), np.zeros((phases, chunks), np.int64)
        _chain(sync, out, region_threads)
        expected = _expected(phases, chunks)
        assert np.array_equal(out, expected)
        assert (sync[:, 0] >= chunks).all() and (sync[:, 8] == chunks).all()
    finally:
        numba.set_num_threads(before)


def test_the_spin_hint_lowers_to_yield_on_the_a76():
    """The board's hint is never executed here: lower the intrinsic for the A76 and look."""
    name, args = parallel.pause_intrinsic("aarch64")
    assembly = a76_assembly(f"""
declare void @{name}({", ".join("i32" for _ in args)})
define void @f() {{
  call void @{name}({", ".join(f"i32 {a}" for a in args)})
  ret void
}}
""")
    assert "\tyield" in assembly
    assert parallel.pause_intrinsic("x86_64") == ("llvm.x86.sse2.pause", ())
