"""numba helpers shared by the kernels' modules, and the package-wide stamp of numba's cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import pickle
import select
import subprocess
import sys
import types

from llvmlite import ir as llvm_ir
from numba import njit, typeof
from numba import types as nbtypes
from numba.core import caching, cgutils, event
from numba.extending import intrinsic


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


# numba's on-disk cache keys each function's entries on its own source file (its content since
# numba 0.61, its time and size before). A function that inlines or calls another module's
# function (the fused decode step inlines ops.rms_norm, the kernels' row loops ...) is then loaded from
# the cache with the old callee compiled in after that callee's file changed: an upgrade, an
# edit, or a checkout of another commit ran stale machine code. For this package's files the
# stamp is the whole package's content instead, so any change recompiles everything (other
# modules keep numba's own stamp).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # rosenblatt/


@functools.lru_cache(maxsize=1)
def package_stamp() -> str:
    """sha256 of every ``.py`` file of the package (relative path and bytes), read once."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(top, f)
                h.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def _in_package(path) -> bool:
    return bool(path) and os.path.abspath(path).startswith(_PACKAGE + os.sep)


def _package_stamped(locator_class):
    def get_source_stamp(self):
        if _in_package(getattr(self, "_py_file", None)):
            return package_stamp()
        return locator_class.get_source_stamp(self)
    return type(locator_class.__name__, (locator_class,),
                {"get_source_stamp": get_source_stamp, "__module__": __name__, "_rosenblatt_stamp": True})


def _install_package_stamp() -> None:
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl      # renamed in numba 0.61
    classes = impl._locator_classes
    classes[:] = [c if getattr(c, "_rosenblatt_stamp", False) else _package_stamped(c) for c in classes]


_install_package_stamp()


def cache_index(dispatcher) -> str | None:
    """The file name of ``dispatcher``'s on-disk cache index (None without ``cache=True``): two
    functions must never share one (see :func:`njit_twin`)."""
    cache = getattr(dispatcher, "_cache", None)
    cache_file = getattr(cache, "_cache_file", None)
    return cache_file._index_name if cache_file is not None else None


def source_stamp(dispatcher) -> object | None:
    """What ``dispatcher``'s cache entries are keyed on: :func:`package_stamp` for this package's
    functions (None without ``cache=True``)."""
    impl = getattr(getattr(dispatcher, "_cache", None), "_impl", None)
    return impl.locator.get_source_stamp() if impl is not None else None


def cached(dispatcher) -> bool:
    """Whether numba's on-disk cache holds an entry of ``dispatcher`` for the current sources
    (any signature): False on a first run, after an upgrade or an edit of the package."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is None:
        return False
    try:
        return bool(cache_file._load_index())   # {} when missing, unreadable or of other sources
    except Exception:
        return False


class Helper:
    """A second Python process that fills numba's on-disk cache while this one does other work.
    numba compiles under one lock a process, so on two or more cores a first run's compilation
    can take place in two processes at once; this process then reads the result back from the
    cache. Should the helper fail or be late, this process compiles as usual: nothing but time
    depends on it.

    The helper first calls ``target`` ("module:function") with the string ``args``, then compiles
    what :meth:`compile` sends it (a function and its signature), one at a time, until
    :meth:`finish`."""

    def __init__(self, target: str, *args: str):
        module, function = target.split(":")
        env = dict(os.environ)
        root = os.path.dirname(_PACKAGE)           # this package, not another installed copy
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = (f"import sys; from {module} import {function} as f; f(*sys.argv[1:]); "
                f"from {__name__} import serve_compiles; serve_compiles()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.report = None                         # report(name) while waiting for a compile

    @staticmethod
    def useful() -> bool:
        """More than one core for this process (on one core a helper only competes with it)."""
        try:
            return len(os.sched_getaffinity(0)) > 1
        except (AttributeError, OSError):
            return (os.cpu_count() or 1) > 1

    def compile(self, dispatcher, args):
        """Send ``dispatcher`` with the types of ``args`` to be compiled; returns a function that
        waits (at most ``timeout`` s) until the helper's entry is in the cache, False if it failed
        or timed out."""
        fn = dispatcher.py_func
        job = pickle.dumps((fn.__module__, fn.__name__, tuple(typeof(a) for a in args)))
        try:
            self.proc.stdin.write(len(job).to_bytes(8, "little") + job)
            self.proc.stdin.flush()
        except OSError:
            return lambda timeout=0.0: False

        def wait(timeout: float = 120.0) -> bool:
            if self.report is not None:
                self.report(f"{fn.__qualname__} (in a second process)")
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            return bool(ready) and self.proc.stdout.read(1) == b"1"
        return wait

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 120.0) -> bool:
        """No more jobs: wait for the helper (at most ``timeout`` s, then stop it); True if it
        succeeded."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            self.stop()
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def serve_compiles() -> None:
    """A :class:`Helper`'s loop: compile each (module, function name, argument types) read from
    stdin, answer b"1" (done) or b"0" (failed) on stdout, until stdin closes."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while len(header := inp.read(8)) == 8:
        module, name, sig = pickle.loads(inp.read(int.from_bytes(header, "little")))
        try:
            getattr(importlib.import_module(module), name).compile(sig)
            ok = b"1"
        except Exception:
            ok = b"0"
        out.write(ok)
        out.flush()


_helper: Helper | None = None


@contextlib.contextmanager
def helping(helper: Helper | None, on_compile=None):
    """Inside the block :func:`compile_elsewhere` sends its jobs to ``helper`` (if not None);
    ``on_compile(name)`` is called when this process waits for one."""
    global _helper
    previous, _helper = _helper, helper
    if helper is not None:
        helper.report = on_compile
    try:
        yield
    finally:
        _helper = previous


def compile_elsewhere(dispatcher, args):
    """With a :class:`Helper` at work (see :func:`helping`) and ``dispatcher``'s cache empty,
    have the helper compile it for the types of ``args`` while this process goes on; returns a
    function waiting for it (call it before calling ``dispatcher``), or None."""
    if _helper is None or cached(dispatcher):
        return None
    return _helper.compile(dispatcher, args)


class _CompileListener(event.Listener):
    def __init__(self, on_compile):
        self.on_compile = on_compile

    def on_start(self, ev):
        dispatcher = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
        fn = getattr(dispatcher, "py_func", None)
        self.on_compile(getattr(fn, "__qualname__", None) or "?")

    def on_end(self, ev):
        pass


@contextlib.contextmanager
def compiling(on_compile):
    """Call ``on_compile(name)`` whenever numba starts compiling a function inside the block
    (a function read back from the cache does not count): what a status line shows through a
    first run's compilation."""
    with event.install_listener("numba:compile", _CompileListener(on_compile)):
        yield


@intrinsic
def call_address(typingctx, fn, args):
    """Call the C function at address ``fn`` with the integers of the tuple ``args``, each passed
    as an int64 (pointers as integers: the C calling conventions of x86-64 and AArch64 put both
    in the same registers), for the LLVM IR kernels of :mod:`rosenblatt.cpu`. An address types
    much faster at numba's dispatch than a ctypes function object (~2 vs ~25 us a call)."""
    if not isinstance(args, nbtypes.BaseTuple) or not all(isinstance(t, nbtypes.Integer) for t in args.types):
        return None
    sig = nbtypes.void(nbtypes.int64, args)

    def codegen(context, builder, signature, llargs):
        i64 = llvm_ir.IntType(64)
        argtys = signature.args[1].types
        values = [context.cast(builder, v, t, nbtypes.int64)
                  for v, t in zip(cgutils.unpack_tuple(builder, llargs[1], len(argtys)), argtys)]
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i64] * len(argtys))
        builder.call(builder.inttoptr(llargs[0], fnty.as_pointer()), values)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def call_native(typingctx, addr, args):
    """Call the numba-compiled function at ``addr`` (a native entry from :func:`native_address`,
    compiled for exactly the types of the tuple ``args``) with those arguments, ignoring its
    status (for functions that raise nothing).

    Called by address, the callee's code stays out of the caller's module: linked in, LLVM would
    optimize it a second time there (the fused step: ~10 s of a first run)."""
    if not isinstance(args, nbtypes.BaseTuple):
        return None
    sig = nbtypes.void(nbtypes.int64, args)

    def codegen(context, builder, signature, llargs):
        argtys = list(signature.args[1].types)
        conv = context.call_conv
        fnty = conv.get_function_type(nbtypes.void, argtys)
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        values = cgutils.unpack_tuple(builder, llargs[1], len(argtys))
        packed = list(conv._get_arg_packer(argtys).as_arguments(builder, values))
        retty = conv.get_return_type(nbtypes.void).pointee
        ret = cgutils.alloca_once(builder, retty)
        builder.store(cgutils.get_null_value(retty), ret)
        exc = cgutils.alloca_once(builder, fnty.args[1].pointee, name="excinfo")
        builder.call(fn, [ret, exc] + packed)
        return context.get_dummy_value()
    return sig, codegen


def native_address(dispatcher, args) -> int:
    """The native entry of the numba ``dispatcher`` compiled (or read from the cache) for the
    types of ``args``, for :func:`call_native`."""
    sig = tuple(typeof(a) for a in args)
    dispatcher.compile(sig)
    cres = dispatcher.overloads[sig]
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
