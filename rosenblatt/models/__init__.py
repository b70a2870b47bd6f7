"""Model architectures. One module per family; :func:`build_model` picks by ``general.architecture``."""

from __future__ import annotations

from ..backends import MatmulBackend
from .config import ModelConfig
from ..gguf.file import GGUFFile


def build_model(g: GGUFFile, cfg: ModelConfig, backend: MatmulBackend, n_ctx: int, progress=None):
    if cfg.arch == "gemma3":
        from .gemma3 import Gemma3Model
        return Gemma3Model(g, cfg, backend, n_ctx, progress=progress)
    from .llama import LlamaModel
    return LlamaModel(g, cfg, backend, n_ctx, progress=progress)
