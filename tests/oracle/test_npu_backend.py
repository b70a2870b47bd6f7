"""The ``npu`` matmul backend, through the register-level simulator.

(a) with every matmul on the NPU, whole forwards equal a plain-numpy emulation of the scheme;
(b) the scheme's quality on the real SmolLM2-135M against the CPU path;
(c) the default threshold keeps decode on the CPU and sends prefill to the NPU (SUBMIT counts);
(d) ``device="auto"`` / ``"npu"`` without a device.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from rosenblatt import Engine
from rosenblatt.backends import get_backend
from rosenblatt.backends.cpu import CPUBackend
from rosenblatt.backends.npu import DEFAULT_MIN_ROWS, NPUBackend, quantize_activations
from rosenblatt.errors import RosenblattError
from rosenblatt.models import build_model
from rosenblatt.npu import open_device
from rosenblatt.gguf.quants import dequantize

from support import FIXTURES, load_reference, micro_path, smollm2_path

MATMULS_PER_LAYER = 7   # q, k, v, o, gate, up, down
SUBMITS_PER_LAYER = 4   # a forward's graph: q/k/v | o | gate/up | down (the CPU's work between them)


# --- the scheme written out in plain numpy, independently of backends/npu.py ----------------------

def _q8(v: np.ndarray):
    """Symmetric int8 per row, scale = max|row| / 127, numpy rint, clipped to ±127."""
    s = np.abs(v).max(axis=1) / np.float32(127)
    q = np.clip(np.rint(v / np.where(s > 0, s, np.float32(1))[:, None]), -127, 127).astype(np.int8)
    return q, s


def _int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer product (int64 in numpy), checked to fit the NPU's int32 accumulators."""
    c = a.astype(np.int64) @ b
    assert np.abs(c).max(initial=0) < 2**31
    return c.astype(np.int32)


class EmulatedInt8Backend(CPUBackend):
    """What the NPU path should compute: int8 weights per output channel, int8 activations per row
    in two terms (x ≈ q1·s1 + q2·s2 with q2 quantizing x − q1·s1), int32 sums, float32 rescale
    y = (acc1·s1 + acc2·s2)·s_w. Weights decoded whole with ``quants.dequantize``."""

    def __init__(self, passes: int = 2):
        super().__init__()
        self.passes = passes

    def prepare(self, tensor):
        w = super().prepare(tensor)
        W = dequantize(tensor.data, int(tensor.qtype), tensor.row_len).reshape(w.n_out, w.n_in)
        wq, sw = _q8(W)
        w.emu = (wq.T.astype(np.int64), sw)
        return w

    def matmul(self, x, w, out=None):
        wq_t, sw = w.emu
        q1, s1 = _q8(x)
        y = _int_matmul(q1, wq_t).astype(np.float32) * s1[:, None]
        if self.passes == 2:
            q2, s2 = _q8(x - q1.astype(np.float32) * s1[:, None])
            y += _int_matmul(q2, wq_t).astype(np.float32) * s2[:, None]
        y *= sw[None, :]
        return y

    def matmul_many(self, x, ws):          # not the CPU's grouped int8 kernels
        return [self.matmul(x, w) for w in ws]


def _with_backend(engine: Engine, backend) -> Engine:
    engine.model = build_model(engine.gguf, engine.config, backend, engine.n_ctx)
    engine.cache = engine.model.new_cache()
    return engine


# --- (a) the NPU path computes exactly what the scheme says ------------------------------------------

def test_matmul_equals_emulation_on_awkward_shapes():
    """One product with a zero row, an outlier column and N, K not multiples of 32."""
    rng = np.random.default_rng(7)
    K, N, M = 100, 45, 9
    W = rng.standard_normal((N, K)).astype(np.float32)
    W[3] = 0.0
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 17] *= 60.0      # an outlier channel
    x[4] = 0.0

    class T:              # a minimal F32 TensorInfo stand-in
        name, qtype, n_rows, row_len = "w", 0, N, K
        data = W.view(np.uint8).reshape(-1)

        @staticmethod
        def rows():
            return W.view(np.uint8)

    npu = NPUBackend(open_device(sim=True), min_rows=0)
    emu = EmulatedInt8Backend()
    y = npu.matmul(x, npu.prepare(T))
    assert npu.device.stats.submits == 1 and npu.device.stats.last.m_tiles >= 1
    np.testing.assert_array_equal(y, emu.matmul(x, emu.prepare(T)))
    assert np.all(y[4] == 0) and np.all(y[:, 3] == 0)
    # and it is a good approximation of the float product
    ref = x @ W.T
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_two_terms_bound_the_activation_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 256)).astype(np.float32) * np.float32(0.1)
    x[:, 5] = 40.0
    (q1, s1), (q2, s2) = quantize_activations(x, 2)
    assert q1.dtype == q2.dtype == np.int8
    one = q1.astype(np.float32) * s1[:, None]
    two = one + q2.astype(np.float32) * s2[:, None]
    assert np.all(s2 <= s1 / 254 * 1.001)
    assert np.all(np.abs(x - two) <= s2[:, None] * 0.5001 + 1e-7)
    assert np.abs(x - two).max() < np.abs(x - one).max() / 100


@pytest.mark.parametrize("name", ["qwen2-micro-q4_k_m", "qwen2-micro-q8_0", "llama-micro-q4_0"])
def test_forward_on_npu_equals_numpy_emulation(name):
    meta, *_ = load_reference(name)
    prompt, gen = meta["prompt_ids"], meta["greedy_ids"][:3]
    npu = Engine.load(micro_path(name), device="npu-sim", n_ctx=64, npu_min_rows=0, warm_up=False)
    emu = _with_backend(Engine.load(micro_path(name), n_ctx=64), EmulatedInt8Backend())
    cpu = Engine.load(micro_path(name), n_ctx=64)
    assert npu.device == "npu-sim" and npu.model.backend.min_rows == 0
    stats = npu.model.backend.device.stats
    n_layers = npu.config.n_layers

    got = [npu.eval(prompt, logits="all")]
    assert stats.submits == SUBMITS_PER_LAYER * n_layers + 1     # every matmul, the lm_head too
    assert stats.calls == MATMULS_PER_LAYER * n_layers + 1
    want = [emu.eval(prompt, logits="all")]
    for t in gen:                                                 # one-row products, also on the NPU
        got.append(npu.eval([t]))
        want.append(emu.eval([t]))
    assert stats.submits == (SUBMITS_PER_LAYER * n_layers + 1) * (1 + len(gen))
    got, want = np.concatenate(got), np.concatenate(want)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    # the comparison discriminates: the scheme's int8 error is far above that tolerance
    ref = cpu.eval(prompt, logits="all")
    assert np.abs(got[:len(prompt)] - ref).max() > 1e-3 * scale


# --- (b) quality on the real model -------------------------------------------------------------------

SMOLLM2_REFS = json.loads((FIXTURES / "smollm2" / "smollm2-refs.json").read_text())["prompts"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.slow
def test_smollm2_quality_against_cpu(smollm2_engine):
    """Teacher-forced on llama.cpp's greedy continuations: top-1 agreement with the CPU path and
    KL(CPU || NPU) over every position (numbers in docs/npu.md)."""
    npu = Engine.load(smollm2_path(), device="npu-sim", n_ctx=512, npu_min_rows=0, warm_up=False)
    agree, kls = [], []
    for p in SMOLLM2_REFS:
        ids = p["prompt_ids"] + p["greedy_ids"][:-1]
        ref, got = smollm2_engine.logits(ids), npu.logits(ids)
        lp, lq = _log_softmax(ref), _log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        agree.append(ref.argmax(-1) == got.argmax(-1))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    # a forward: one SUBMIT per level of each layer's graph, one for the output matrix
    assert npu.model.backend.device.stats.submits == len(SMOLLM2_REFS) * (SUBMITS_PER_LAYER * 30 + 1)
    assert agree.size == 164
    assert agree.mean() >= 0.90, f"top-1 agreement {agree.mean():.3f}"
    assert kls.mean() <= 0.02, f"mean KL {kls.mean():.4f}"


# --- (c) routing by rows ---------------------------------------------------------------------------------

def test_default_threshold_decode_on_cpu_prefill_on_npu():
    meta, *_ = load_reference("qwen2-micro-q4_k_m")
    engine = Engine.load(micro_path("qwen2-micro-q4_k_m"), device="npu-sim", n_ctx=64, warm_up=False)
    backend = engine.model.backend
    stats = backend.device.stats
    assert backend.min_rows == DEFAULT_MIN_ROWS > 1
    L = engine.config.n_layers

    engine.eval(meta["prompt_ids"][:DEFAULT_MIN_ROWS - 1])        # too few rows: CPU
    assert stats.submits == 0
    engine.eval([meta["prompt_ids"][0]])                           # one-token decode: CPU
    assert stats.submits == 0
    engine.reset()
    engine.eval(meta["prompt_ids"])                                # prefill: every layer matmul on the NPU,
    assert stats.submits == SUBMITS_PER_LAYER * L                  # the last-row lm_head on the CPU
    assert stats.calls == MATMULS_PER_LAYER * L
    assert stats.tasks >= stats.jobs >= stats.submits
    engine.eval([meta["greedy_ids"][0]])
    assert stats.submits == SUBMITS_PER_LAYER * L
    # the lazily quantized tied embedding was never needed on the NPU
    assert [w.packed for w in backend.weights if w.name == "token_embd.weight"] == [None]


def test_generate_runs_on_the_simulator():
    meta, *_ = load_reference("llama-micro-q4_0")
    engine = Engine.load(micro_path("llama-micro-q4_0"), device="npu-sim", n_ctx=64, warm_up=False)
    out = list(engine.stream(meta["prompt_ids"], max_new_tokens=3, temperature=0))
    assert engine.stats.generated_tokens == 3 and out
    assert engine.model.backend.device.stats.submits == SUBMITS_PER_LAYER * engine.config.n_layers


# --- (d) device selection -------------------------------------------------------------------------------

@pytest.fixture
def no_accel(monkeypatch, tmp_path):
    """Make /dev/accel look empty whatever machine the tests run on."""
    monkeypatch.setattr("rosenblatt.npu.device.ACCEL_GLOB", str(tmp_path / "accel*"))


def test_auto_without_npu_falls_back_to_cpu_with_a_notice(no_accel, caplog):
    with caplog.at_level(logging.WARNING, logger="rosenblatt"):
        engine = Engine.load(micro_path("qwen2-micro-q8_0"), device="auto", n_ctx=64)
    assert engine.device == "cpu" and type(engine.model.backend) is CPUBackend
    notices = [r for r in caplog.records if r.name == "rosenblatt"]
    assert len(notices) == 1 and "no NPU" in notices[0].getMessage() and "CPU" in notices[0].getMessage()
    assert "\n" not in notices[0].getMessage()


def test_npu_without_device_raises(no_accel):
    with pytest.raises(RosenblattError, match=r"device 'npu': no /dev/accel.*npu-sim"):
        Engine.load(micro_path("qwen2-micro-q8_0"), device="npu", n_ctx=64)


def test_auto_uses_the_npu_when_it_opens(monkeypatch):
    real = open_device
    monkeypatch.setattr("rosenblatt.npu.open_device", lambda sim=False, **kw: real(sim=True))
    backend = get_backend("auto", npu_min_rows=4)
    assert isinstance(backend, NPUBackend) and backend.min_rows == 4


def test_bad_backend_options():
    with pytest.raises(ValueError, match="npu_min_rows"):
        get_backend("npu-sim", npu_min_rows=-1)
    with pytest.raises(ValueError, match="unknown matmul backend"):
        get_backend("tpu")


# --- (e) prefill as a graph: one SUBMIT per stage of a layer for every chunk ---------------------------

def test_prefill_graph_over_chunks_equals_op_by_op():
    """A forward cut into chunks and run as a graph (one SUBMIT for the same stage of every chunk
    of a layer) gives the bits of the same forward operation by operation, with 4 SUBMITs per
    layer whatever the number of chunks."""
    from rosenblatt.backends.npu import GRAPH_CHUNK_TOKENS

    name = "qwen2-micro-q8_0"
    n = 2 * GRAPH_CHUNK_TOKENS + 5                                  # three chunks
    graph = Engine.load(micro_path(name), device="npu-sim", n_ctx=n + 8, npu_min_rows=1, warm_up=False)
    plain = Engine.load(micro_path(name), device="npu-sim", n_ctx=n + 8, npu_min_rows=1, warm_up=False)
    ids = np.random.default_rng(5).integers(0, graph.config.vocab_size, n)
    L = graph.config.n_layers
    stats = graph.model.backend.device.stats
    got = graph.model.forward(ids, graph.cache, "all")
    assert stats.submits == SUBMITS_PER_LAYER * L + 1 and stats.calls == MATMULS_PER_LAYER * L * 3 + 1
    assert graph.model.layer_passes == 3 * L
    want = plain.model.forward(ids, plain.cache, "all", ops=plain.model.stage_ops())
    assert plain.model.backend.device.stats.submits == MATMULS_PER_LAYER * L + 1
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(graph.cache.k_all[:, :, :n], plain.cache.k_all[:, :, :n])


# --- (f) device="auto": the threshold per matrix is the cost model's crossover --------------------------

def test_auto_threshold_follows_the_cost_model(monkeypatch):
    from rosenblatt.backends.npu import NEVER, cost_min_rows
    from rosenblatt.npu import cost

    real = open_device
    monkeypatch.setattr("rosenblatt.npu.open_device", lambda sim=False, **kw: real(sim=True))
    engine = Engine.load(micro_path("qwen2-micro-q8_0"), device="auto", n_ctx=64, warm_up=False)
    backend = engine.model.backend
    assert isinstance(backend, NPUBackend) and backend.by_cost
    for w in backend.weights:
        assert w.min_rows == (cost_min_rows(w.n_in, w.n_out, 2) or NEVER)
    # the 1.5B's q/o projection: the crossover, and the choice at a small and a large M
    K = N = 1536
    m = cost_min_rows(K, N, 2)
    assert m == cost.crossover(K, N, npu_rows_per_row=2) and 16 < m < 1024
    w = NPUBackend.__new__(NPUBackend)
    w.by_cost, w.min_rows = True, m
    qo = type("W", (), {"min_rows": m})()
    for rows in (8, m - 1, m, 4 * m):
        npu_faster = cost.npu_gemm_cost(2 * rows, K, N).seconds < cost.cpu_gemm_cost(rows, K, N).seconds
        assert w.on_npu(rows, qo) == npu_faster == (rows >= m)
    # k/v (1536 -> 256) never crosses at the DT clock with two terms: stays on the CPU
    assert cost_min_rows(1536, 256, 2) is None
    # an explicit npu_min_rows (e.g. from the board's bench) overrides the cost model
    assert not get_backend("npu-sim", npu_min_rows=4).by_cost
