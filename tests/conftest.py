"""Fixtures every tier shares (helpers live in support.py)."""

from __future__ import annotations

import pytest

from support import smollm2_path


@pytest.fixture(scope="session")
def smollm2_engine():
    from rosenblatt import Engine
    return Engine.load(smollm2_path(), n_ctx=512)
