"""numba helpers shared by the kernels' modules, and the package-wide stamp of numba's cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
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
