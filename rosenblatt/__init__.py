"""Rosenblatt: pure-Python inference of small GGUF language models (CPU via numba, RK3588 NPU via rocket)."""

import os as _os

# numba's OpenMP workers spin between parallel regions by default. With anything else running
# on the cores (a second process, our own prefill threads) the spinning starves the thread that
# has work: measured decode 0.4 tok/s spinning vs 6.0 passive on a loaded 2-core machine.
# Must be set before numba starts its thread pool; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# numba's cache must key this package's compiled functions on the whole package (see cpu/jit.py)
# before any of them is decorated
from .cpu import jit as _jit  # noqa: E402,F401

from .text.chat_template import ChatTemplate  # noqa: E402
from .engine import Engine  # noqa: E402
from .generate import GenerationResponse, GenerationStats  # noqa: E402
from .errors import ModelFileError, RosenblattError  # noqa: E402
from .params import GenerationParams, ParamError  # noqa: E402
from .sampling import Sampler, SamplingParams  # noqa: E402
from .text.tokenizer import Tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ChatTemplate", "Engine", "GenerationParams", "GenerationResponse", "GenerationStats", "ModelFileError",
           "ParamError", "RosenblattError", "Sampler",
           "SamplingParams", "Tokenizer", "__version__"]
