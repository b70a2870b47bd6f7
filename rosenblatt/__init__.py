"""Rosenblatt: pure-Python inference of small GGUF language models (CPU via numba, RK3588 NPU via rocket)."""

import os as _os

# numba's OpenMP workers spin between parallel regions by default. With anything else running
# on the cores (a second process, our own prefill threads) the spinning starves the thread that
# has work: measured decode 0.4 tok/s spinning vs 6.0 passive on a loaded 2-core machine.
# Must be set before numba starts its thread pool; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ModelFileError, RosenblattError

__version__ = "0.1.0"

__all__ = ["ModelFileError", "RosenblattError", "__version__"]

from .engine import Engine  # noqa: E402

__all__ += ["Engine"]
