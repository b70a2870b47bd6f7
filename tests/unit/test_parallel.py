"""rosenblatt.cpu.parallel: chunks claimed from atomic counters inside one parallel region."""

from __future__ import annotations

import platform

import numba
import numpy as np
import pytest
from numba import njit, prange

from rosenblatt.cpu import parallel

from support import a76_assembly


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


def _uncached(fn, *args):
    """A fresh (uncached, so inspectable) compile of one of parallel's functions."""
    g = njit(nogil=True)(fn.py_func)
    g(*args)
    return g, g.signatures[0]


def test_hand_offs_are_release_and_acquire():
    """The orderings in the code numba generates for this machine: the counts are seq_cst
    read-modify-writes (adds), the waits acquire loads, none relaxed; and the instructions they
    became here (the A76 lane runs this on the board's code). The relaxed ``atomicrmw sub`` in
    the same functions is numba's own reference count release, not a hand-off of ours."""
    sync = parallel.new_sync(2)
    arm = platform.machine() in ("aarch64", "arm64")
    for fn, args, needed, insn in ((parallel.done, (sync, 0), "atomicrmw add", ("ldaddal", "stlxr", "lock")),
                                   (parallel.wait, (sync, 0, 1), "load atomic", ("ldapr", "ldar", "mov")),
                                   (parallel.claim, (sync, 1, 3), "atomicrmw add", ("ldaddal", "stlxr", "lock"))):
        g, sig = _uncached(fn, *args)
        ours = [line for line in g.inspect_llvm(sig).splitlines()
                if "= atomicrmw add" in line or "= load atomic" in line]
        assert any(needed in a for a in ours), fn.__name__
        for a in ours:
            assert ("seq_cst" in a) if "atomicrmw" in a else ("acquire" in a or "seq_cst" in a), a
        asm = g.inspect_asm(sig)
        if arm:
            assert any(f"\t{i}" in asm or f"{i}\t" in asm for i in insn[:2]), (fn.__name__, insn)
        elif platform.machine() == "x86_64" and fn is not parallel.wait:   # x86 loads acquire by themselves
            assert "lock" in asm, fn.__name__


def test_the_orderings_lower_to_acquire_release_instructions_on_the_a76():
    ir = """
define i64 @done(ptr %p) {
  %r = atomicrmw add ptr %p, i64 1 seq_cst, align 8
  ret i64 %r
}
define i64 @wait(ptr %p) {
  %r = load atomic i64, ptr %p acquire, align 8
  ret i64 %r
}
"""
    asm = a76_assembly(ir)
    assert "ldaddal" in asm and ("\tldapr" in asm or "\tldar" in asm)
    no_lse = a76_assembly(ir, features="-lse")
    assert "ldaxr" in no_lse and "stlxr" in no_lse


@njit(parallel=True, cache=True)
def _relay(sync, data, region_threads):
    """Phase p: each chunk writes a 64-value block mixed from the checksum of *all* of phase
    p-1's blocks (wrapping uint64 arithmetic), so a block read before its writer's ``done``
    was visible would change every later value."""
    sync[:] = 0
    phases, chunks, width = data.shape
    for _ in prange(region_threads):
        for p in range(phases):
            while True:
                c = parallel.claim(sync, p, chunks)
                if c < 0:
                    break
                h = np.uint64(c + 1)
                if p:
                    for j in range(chunks):
                        for i in range(width):
                            h = h * np.uint64(0x100000001B3) ^ data[p - 1, j, i]
                for i in range(width):
                    h = h * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
                    data[p, c, i] = h
                parallel.done(sync, p)
            parallel.wait(sync, p, chunks)


def _block(prev: np.ndarray | None, c: int, width: int) -> np.ndarray:
    """Chunk ``c``'s block after the previous phase's blocks ``prev`` (None in phase 0)."""
    out = np.empty(width, np.uint64)
    with np.errstate(over="ignore"):
        h = np.uint64(c + 1)
        for v in (prev.ravel() if prev is not None else ()):
            h = h * np.uint64(0x100000001B3) ^ v
        for i in range(width):
            h = h * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
            out[i] = h
    return out


@pytest.mark.parametrize("region_threads", [2, 4])
def test_many_phases_hand_their_data_on(region_threads):
    """A region of 4000 phases (a 1.5B decode step has 142), every phase reading all that the
    one before wrote: the acquire/release hand-off under load, on whatever memory model runs it."""
    phases, chunks, width = 4000, 4, 64
    for _ in range(3):
        sync, data = parallel.new_sync(phases), np.zeros((phases, chunks, width), np.uint64)
        _relay(sync, data, region_threads)
        assert (sync[:, 8] == chunks).all()
        for p in (0, 1, 2, phases // 2, phases - 1):     # each phase the same function of the one before
            for c in range(chunks):
                assert np.array_equal(data[p, c], _block(data[p - 1] if p else None, c, width)), (p, c)
