"""numba's on-disk cache: every compiled function of the package has a cache file of its own."""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict

from numba.core.registry import CPUDispatcher

import rosenblatt
from rosenblatt.jit import njit_twin


def _dispatchers():
    for info in pkgutil.walk_packages(rosenblatt.__path__, "rosenblatt."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                yield f"{info.name}.{name}", value
            elif isinstance(value, dict):      # tables of variants (simd._QUANTIZE)
                for key, v in value.items():
                    if isinstance(v, CPUDispatcher):
                        yield f"{info.name}.{name}[{key}]", v


def test_no_two_cached_functions_share_a_cache_file():
    """Two dispatchers of one Python function (serial and parallel builds) would share a file
    keyed by signature alone and load each other's machine code: a decode-time quantization
    then opened a parallel region per call, and a nested one inside the fused step."""
    files, seen = defaultdict(list), set()
    for name, d in _dispatchers():
        if id(d) in seen:                                    # an alias (simd._q32_serial)
            continue
        seen.add(id(d))
        if d._cache is not None and hasattr(d._cache, "_cache_file"):
            files[d._cache._cache_file._index_name].append(name)
    assert len(files) > 20                                   # the walk found the package's kernels
    shared = {f: names for f, names in files.items() if len(names) > 1}
    assert not shared, shared


def test_twin_is_a_separately_cached_copy():
    def f(x):
        return x + 1
    a, b = njit_twin(f, "_a", cache=True), njit_twin(f, "_b", cache=True, fastmath=True)
    assert a(1) == b(1) == 2
    assert a.py_func.__qualname__.endswith("f_a") and b.py_func.__qualname__.endswith("f_b")
    assert a._cache._cache_file._index_name != b._cache._cache_file._index_name
