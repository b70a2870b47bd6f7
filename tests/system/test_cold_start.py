"""A first run (numba's cache empty): what compiles where, and that it changes nothing but time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import smollm2_path

_LOAD = """
import json, sys
from rosenblatt.engine import Engine
names = []
engine = Engine.load(sys.argv[1], threads=2, progress=lambda done, total, what: names.append(what))
text = engine.generate("The capital of France is", max_new_tokens=8, temperature=0)
print(json.dumps({"names": [n.split(" ", 1)[1] for n in names if n.startswith("compiling ")], "text": text}))
"""

#: the tokenizer's kernels (SmolLM2's vocabulary is byte-level BPE)
TOKENIZER = {"_build_vocab", "_build_merges", "_encode_bytelevel"}


@pytest.mark.slow
def test_a_first_load_compiles_on_two_cores_and_answers_as_a_warm_one(tmp_path):
    """Engine.load on an empty cache hands the tokenizer's kernels and the step's parallel region
    to a second process (jit.Helper) and reads them back from the cache: this process never
    compiles them. The second load compiles nothing, and both answer the same."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", _LOAD, str(smollm2_path())], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout.splitlines()[-1]))
    cold, warm = runs
    compiled_here = {n.rsplit(".", 1)[-1] for n in cold["names"] if "second process" not in n}
    assert "_run" in compiled_here                           # a first run indeed
    assert not compiled_here & (TOKENIZER | {"run_rows"})
    assert "run_rows (in a second process)" in cold["names"]
    assert warm["names"] == []
    assert cold["text"] == warm["text"] and cold["text"]
