"""The public entry point: ``Engine.load(path)`` and what a program does with a model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .backends import get_backend
from .config import ModelConfig
from .errors import ModelFileError
from .gguf_file import GGUFFile
from .models import build_model

#: prompts are evaluated in chunks of this many tokens (bounds the attention score memory)
PREFILL_CHUNK = 256


class Engine:
    """A loaded model with its KV cache.

    >>> engine = Engine.load("model.gguf")
    >>> logits = engine.logits([1, 2, 3])      # [3, vocab] float32
    """

    def __init__(self, gguf: GGUFFile, config: ModelConfig, model, device: str, n_ctx: int):
        self.gguf = gguf
        self.path = gguf.path
        self.config = config
        self.model = model
        self.device = device
        self.n_ctx = n_ctx
        self.cache = model.new_cache()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", n_ctx: int = 4096) -> "Engine":
        g = GGUFFile(path)
        cfg = ModelConfig.from_gguf(g)
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        n_ctx = min(n_ctx, cfg.context_length)
        backend = get_backend(device)
        model = build_model(g, cfg, backend, n_ctx)
        return cls(g, cfg, model, device, n_ctx)

    def _check_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def eval(self, token_ids: Sequence[int], logits: str = "last") -> np.ndarray | None:
        """Append ``token_ids`` to the context (KV cache) and return logits ("all", "last" or "none")."""
        ids = self._check_tokens(token_ids)
        if self.cache.length + len(ids) > self.n_ctx:
            raise ValueError(f"context overflow: {self.cache.length} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        parts = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[s:s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= len(ids)
            mode = logits if (logits == "all" or last) else "none"
            out = self.model.forward(chunk, self.cache, logits=mode)
            if out is not None:
                parts.append(out)
        if logits == "none" or not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits after every position of ``token_ids``, [len, vocab] float32, in a fresh context."""
        self.reset()
        if len(token_ids) == 0:
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        return self.eval(token_ids, logits="all")

    def reset(self) -> None:
        self.cache.reset()

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    def __repr__(self) -> str:
        c = self.config
        return f"Engine({os.path.basename(self.path)!r}, arch={c.arch}, layers={c.n_layers}, device={self.device})"


__all__ = ["Engine", "ModelFileError"]
