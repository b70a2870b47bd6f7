"""Exceptions that reach the user.

Every problem with a model file is reported as one :class:`ModelFileError` whose message is a
single line naming the file and the field or tensor at fault. Callers (the CLI, the server)
catch :class:`RosenblattError` and print the message; nothing below the loader should let a
numpy or struct traceback escape for bad input.
"""

from __future__ import annotations

import os


class RosenblattError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(RosenblattError, ValueError):
    """A GGUF file that cannot be used: not a GGUF, truncated, unsupported, inconsistent."""

    def __init__(self, path: str | os.PathLike | None, what: str, problem: str):
        self.path = os.fspath(path) if path is not None else "<memory>"
        self.what = what
        self.problem = problem
        super().__init__(f"{self.path}: {what}: {problem}" if what else f"{self.path}: {problem}")
