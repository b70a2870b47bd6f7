"""numba's on-disk cache: every compiled function of the package has a cache file of its own."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest
from numba.core.registry import CPUDispatcher

import rosenblatt
from rosenblatt.cpu.jit import cache_index, njit_twin, package_stamp, source_stamp


def _dispatchers():
    for info in pkgutil.walk_packages(rosenblatt.__path__, "rosenblatt."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                yield f"{info.name}.{name}", value
            elif isinstance(value, dict):      # tables of variants (cpu.activations._QUANTIZE)
                for key, v in value.items():
                    if isinstance(v, CPUDispatcher):
                        yield f"{info.name}.{name}[{key}]", v


def test_no_two_cached_functions_share_a_cache_file():
    """Two dispatchers of one Python function (serial and parallel builds) would share a file
    keyed by signature alone and load each other's machine code: a decode-time quantization
    then opened a parallel region per call, and a nested one inside the fused step."""
    files, seen = defaultdict(list), set()
    for name, d in _dispatchers():
        if id(d) in seen:                                    # an alias
            continue
        seen.add(id(d))
        if cache_index(d) is not None:
            files[cache_index(d)].append(name)
    assert len(files) > 20                                   # the walk found the package's kernels
    shared = {f: names for f, names in files.items() if len(names) > 1}
    assert not shared, shared


def test_twin_is_a_separately_cached_copy():
    def f(x):
        return x + 1
    a, b = njit_twin(f, "_a", cache=True), njit_twin(f, "_b", cache=True, fastmath=True)
    assert a(1) == b(1) == 2
    assert a.py_func.__qualname__.endswith("f_a") and b.py_func.__qualname__.endswith("f_b")
    assert cache_index(a) != cache_index(b) and None not in (cache_index(a), cache_index(b))


def test_every_cached_function_is_stamped_with_the_whole_package():
    stamps = {source_stamp(d) for _, d in _dispatchers()} - {None}
    assert stamps == {package_stamp()}


_CALLEE = """
from numba import njit

@njit(cache=True, inline="always")
def value():
    return {}
"""
_CALLER = """
from numba import njit
from .probe_callee import value

@njit(cache=True)
def twice():
    return 2 * value()
"""


@pytest.mark.slow
def test_a_change_in_an_inlined_callee_recompiles_its_caller(tmp_path):
    """numba keys a function's cache on its own file only: the fused step kept an old ops.rms_norm
    inlined after ops.py changed (an upgrade or a checkout would run stale code). A copy of the
    package with a caller/callee pair in two files: the second run must see the new callee."""
    shutil.copytree(os.path.dirname(rosenblatt.__file__), tmp_path / "rosenblatt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "rosenblatt" / "probe_caller.py").write_text(_CALLER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    run = ["import rosenblatt.probe_caller as c; print(c.twice(), len(c.twice.stats.cache_hits))"]
    outs = []
    for n in (1, 1, 21):
        (tmp_path / "rosenblatt" / "probe_callee.py").write_text(_CALLEE.format(n))
        p = subprocess.run([sys.executable, "-c", *run], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout.split())
    assert outs == [["2", "0"], ["2", "1"], ["42", "0"]]      # compiled, loaded from the cache, recompiled


def test_compiling_reports_each_function_numba_compiles():
    from numba import njit
    from rosenblatt.cpu.jit import compiling

    @njit
    def inner(x):
        return x + 1

    @njit
    def outer(x):
        return inner(x) * 2

    names = []
    with compiling(names.append):
        assert outer(3) == 8
        assert outer(4) == 10                 # compiled already: nothing more to report
    assert [n.rsplit(".", 1)[-1] for n in names] == ["outer", "inner"]
    names.clear()
    assert outer(5) == 12
    assert names == []                        # outside the block: no listener


_HELPED = """
from numba import njit

@njit(cache=True)
def twice(x):
    return 2 * x

def noop():
    pass
"""

_HELPED_RUN = """
from rosenblatt.cpu import jit
import probe_helped as p
assert not jit.cached(p.twice)
assert jit.compile_elsewhere(p.twice, (3,)) is None         # no helper at work: nothing sent
h = jit.Helper("probe_helped:noop")
with jit.helping(h):
    wait = jit.compile_elsewhere(p.twice, (3,))
    assert wait is not None and wait()
    assert jit.cached(p.twice)
    assert jit.compile_elsewhere(p.twice, (3,)) is None     # in the cache now: nothing to send
assert h.finish()
print(p.twice(3), len(p.twice.stats.cache_hits), len(p.twice.stats.cache_misses))
"""


def test_a_helper_compiles_into_the_cache_this_process_reads(tmp_path):
    """jit.Helper: a second process compiles what compile_elsewhere sends it; this process then
    loads the function from numba's cache instead of compiling it (a first run's two cores)."""
    (tmp_path / "probe_helped.py").write_text(_HELPED)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", _HELPED_RUN], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["6", "1", "0"]              # right answer, one cache hit, no compile here


_FAILED_RUN = """
from rosenblatt.cpu import jit
import probe_helped as p
h = jit.Helper("probe_helped:boom")
with jit.helping(h):
    wait = jit.compile_elsewhere(p.twice, (3,))
    assert wait is not None and not wait(30)                # the helper died before any job
assert not h.finish()
print(p.twice(3), len(p.twice.stats.cache_hits), len(p.twice.stats.cache_misses))
"""


def test_a_failed_helper_costs_nothing_but_time(tmp_path):
    """A helper whose target fails answers no job: the wait says False and this process compiles."""
    (tmp_path / "probe_helped.py").write_text(_HELPED + "\n\ndef boom():\n    raise SystemExit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", _FAILED_RUN], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["6", "0", "1"]              # compiled here instead
