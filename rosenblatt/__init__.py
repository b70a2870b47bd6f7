"""Rosenblatt: pure-Python inference of small GGUF language models (CPU via numba, RK3588 NPU via rocket)."""

from .errors import ModelFileError, RosenblattError

__version__ = "0.1.0"

__all__ = ["ModelFileError", "RosenblattError", "__version__"]

from .engine import Engine  # noqa: E402

__all__ += ["Engine"]
