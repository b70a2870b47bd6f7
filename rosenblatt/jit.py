"""numba helpers shared by the kernels' modules."""

from __future__ import annotations

import types

from numba import njit


def njit_twin(fn, suffix: str, **options):
    """``njit(**options)`` of a copy of ``fn`` named ``fn.__name__ + suffix``.

    numba's on-disk cache names its files after the function's qualified name and keys the
    entries by signature only, not by compile options: two dispatchers of one Python function
    (say a serial and a ``parallel=True`` build) share one cache file, and whichever was saved
    last is what both load. The copy gets its own name, hence its own cache file."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__, twin.__doc__ = fn.__module__, fn.__doc__
    return njit(**options)(twin)
