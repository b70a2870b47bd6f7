"""Work sharing inside one numba parallel region: chunks claimed from atomic counters.

Starting a parallel region wakes the runtime's sleeping workers (~20 us each time on the
development machine); a decode step has four products per layer, so a region per product spends ~3 % of a
1.5B step just waking threads. Instead a step can run as *one* region whose threads walk the same
list of phases. A phase is ``n`` chunks of independent work; each thread claims the next chunk
from the phase's counter until none are left, counts the chunks it finished, then waits until
every chunk of the phase is done before going on (the next phase reads what this one wrote).

Nothing waits for a chunk that nobody has claimed, so the scheme cannot deadlock when the
runtime has fewer threads than the region asked for, or runs the region's iterations one after
another on a single thread: that thread simply claims every chunk itself.

A wait means every chunk of the phase is done, not that every thread has got that far: a thread
may still be reading, after its own wait, what the phase wrote while another is already working
on later phases. So what threads read outside their chunks must not be overwritten later in the
same region (the decode step gives each layer its own rows).

The counters live in an int64 array ``sync`` [phases, 16]: ``sync[p, 0]`` is the next chunk to
claim, ``sync[p, 8]`` the number done (a cache line apart, so claims do not slow the waiters).
The caller zeroes it before the region starts.

Memory ordering (why this is right on the A76's weak memory model, not only on x86's TSO):

* The only hand-off of data between threads is "a chunk's results, then ``done``" on one side and
  "``wait`` returns, then read them" on the other. ``done`` is a sequentially consistent
  read-modify-write (so a release: the chunk's plain stores are ordered before it), ``wait``
  loops on an *acquire* load. The load that finally reads ``n`` reads the value written by the
  last ``done`` of the phase; every earlier ``done`` heads a release sequence that the later
  read-modify-writes on the same counter continue, so that acquire synchronizes with *every*
  chunk's ``done``, and all the phase's results are visible to the waiter.
* ``claim`` needs atomicity only (each chunk handed out once); it is a seq_cst add all the same,
  and its first acquire load only skips the write once a phase is drained.
* ``sync`` is zeroed before the region starts and the region's start and end are the runtime's
  own fork/join, which order everything before and after.
* Nothing is ``monotonic`` (relaxed) where data depends on it. On the A76 (ARMv8.2 with LSE and
  RCpc) LLVM lowers the add to ``ldaddal`` and the acquire load to ``ldapr``; without LSE to an
  ``ldaxr``/``stlxr`` loop. tests/unit/test_parallel.py checks the IR orderings numba generates and
  that lowering, and runs a many-phase stress region (which the emulated A76 lane runs too;
  qemu on an x86 host executes with x86's ordering, so the lane checks the code, not the
  weak-memory timing: the same test run natively on the board does).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: int64 columns per phase in ``sync``: claim counter in 0, done counter in 8
SYNC_COLS = 16
#: busy-wait rounds (each a CPU pause hint) before a waiter starts yielding its core
SPIN = 2000


def _is_sync(sync) -> bool:
    return isinstance(sync, types.Array) and sync.dtype == types.int64 and sync.ndim == 2


def _element_ptr(context, builder, signature, args):
    """Pointer to ``sync[row, col]`` from an intrinsic's first three arguments."""
    aryty, (rowty, colty) = signature.args[0], signature.args[1:3]
    arr = context.make_array(aryty)(context, builder, args[0])
    row = context.cast(builder, args[1], rowty, types.intp)
    col = context.cast(builder, args[2], colty, types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [row, col], wraparound=False)


@intrinsic
def atomic_add(typingctx, sync, row, col, value):
    """``sync[row, col] += value`` atomically (seq_cst); returns the value before."""
    if not _is_sync(sync):
        return None

    def codegen(context, builder, signature, args):
        inc = context.cast(builder, args[3], signature.args[3], types.int64)
        return builder.atomic_rmw("add", _element_ptr(context, builder, signature, args), inc, "seq_cst")
    return types.int64(sync, row, col, value), codegen


@intrinsic
def atomic_load(typingctx, sync, row, col):
    """``sync[row, col]`` read with acquire ordering."""
    if not _is_sync(sync):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_ptr(context, builder, signature, args), "acquire", 8)
    return types.int64(sync, row, col), codegen


def pause_intrinsic(machine: str):
    """(LLVM intrinsic, its i32 arguments) of the spin-wait hint on ``machine`` (a
    ``platform.machine()`` name): x86 ``pause``, AArch64 ``yield``; None elsewhere. An intrinsic
    rather than inline assembly: numba's JIT has no assembler parser."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686"):
        return "llvm.x86.sse2.pause", ()
    if machine in ("aarch64", "arm64"):
        return "llvm.aarch64.hint", (1,)
    return None


_PAUSE = pause_intrinsic(platform.machine())


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (x86 ``pause``, AArch64 ``yield``): lets the sibling hardware thread
    run and keeps the waiting loop from flooding the memory system."""
    def codegen(context, builder, signature, args):
        if _PAUSE is not None:
            name, consts = _PAUSE
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i32] * len(consts))
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            builder.call(fn, [ir.Constant(i32, c) for c in consts])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc ``sched_yield()``: give the core to another runnable thread (oversubscribed machines)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "sched_yield"), [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(nogil=True, cache=True)
def claim(sync, phase, n):
    """The next unclaimed chunk of ``phase`` (of ``n``), or -1 when all are taken."""
    if atomic_load(sync, phase, 0) >= n:       # a plain read first: no write once drained
        return -1
    c = atomic_add(sync, phase, 0, 1)
    return c if c < n else -1


@njit(nogil=True, cache=True)
def done(sync, phase):
    """Count one finished chunk of ``phase`` (after its results are stored)."""
    atomic_add(sync, phase, 8, 1)


@njit(nogil=True, cache=True)
def drained(sync, phase, n):
    """True once all ``n`` chunks of ``phase`` are claimed (without waiting)."""
    return atomic_load(sync, phase, 0) >= n


@njit(nogil=True, cache=True)
def wait(sync, phase, n):
    """Return once all ``n`` chunks of ``phase`` are done: spin briefly, then yield the core."""
    spins = 0
    while atomic_load(sync, phase, 8) < n:
        if spins < SPIN:
            cpu_relax()
            spins += 1
        else:
            sched_yield()


def new_sync(phases: int) -> np.ndarray:
    """Counters for ``phases`` phases (zeroed; zero them again before each region)."""
    return np.zeros((phases, SYNC_COLS), np.int64)
