"""The CPU's numerics, below the matmul backend.

* :mod:`.isa`: which instruction set the kernels are built for (from the OS's CPU report);
* :mod:`.jit`: numba helpers (package-wide cache stamp, calls of native addresses);
* :mod:`.parallel`: work sharing inside one numba parallel region;
* :mod:`.ops`: RMSNorm, RoPE, softmax, attention (numba);
* :mod:`.qdot`: float dot products straight from quantized blocks (types without int8 kernels);
* the integer-SIMD matmul kernels, in four files: :mod:`.ir` writes their LLVM IR,
  :mod:`.build` compiles it (and caches the machine code), :mod:`.activations` quantizes the
  activations they read, :mod:`.pack` repacks weights for the packed kernels, and
  :mod:`.dispatch` runs them over row ranges and threads (:class:`KernelGroup`).

The names below are the kernels' public surface, gathered for callers and tests.
"""

# first: numba's cache must key the package's functions on the whole package (see jit.py)
# before any of them is decorated, the gguf decoders this package imports included
from . import jit  # noqa: F401  # isort: skip

from .activations import Activations, chunk_rows, quantize_activations, quantize_row_into
from .build import dots_address, host_isa, kernels
from .dispatch import KernelGroup, cut, matmul, rows_kernel
from .ir import (ACT_BLOCK, ACT_FORMAT, PACKED_BLOCK, PACKED_ISAS, PREFETCH_MIN_INPUTS, Q8_32, Q8_256, ROWS,
                 SIMD_TYPES, WIDE, module_ir, packed_types)
from .pack import Packed, pack

__all__ = ["ACT_BLOCK", "ACT_FORMAT", "Activations", "KernelGroup", "PACKED_BLOCK", "PACKED_ISAS",
           "PREFETCH_MIN_INPUTS", "Packed", "Q8_32", "Q8_256", "ROWS", "SIMD_TYPES", "WIDE", "chunk_rows", "cut",
           "dots_address", "host_isa", "kernels", "matmul", "module_ir", "pack", "packed_types",
           "quantize_activations", "quantize_row_into", "rows_kernel"]
