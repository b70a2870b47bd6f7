"""NPU matmul backend: int8 GEMMs on the RK3588 NPU (or its simulator) for prefill.

The quantization scheme (symmetric int8, no zero points, ``rint`` = numpy's round half to even):

* **Weights, per output channel**, once at load: ``W[N, K]`` (any GGUF type) is decoded band by
  band with the CPU kernels; row n gets ``s_w[n] = max|W[n, :]| / 127`` and
  ``Wq[n, k] = clip(rint(W[n, k] / s_w[n]), -127, 127)`` (int8). ``Wq.T`` is packed once into a
  resident BO (``npu.prepare_weights``).
* **Activations, per row, in ``passes`` int8 terms** (default 2), at every call: the first term
  is ``q1 = clip(rint(x / s1), -127, 127)`` with ``s1[m] = max|x[m, :]| / 127``; the second
  quantizes what the first missed, ``r = x - q1 * s1`` (float32), the same way
  (``q2``, ``s2 <= s1 / 254``). The terms are stacked into one int8 ``[passes * M, K]`` operand,
  so the NPU runs **one** GEMM (one SUBMIT) with ``passes`` times the rows.
* The NPU computes ``acc_i = q_i @ Wq.T`` exactly in int32; the CPU rescales, in float32 and in
  this order, ``y = ((float32(acc_1) * s1[:, None] + float32(acc_2) * s2[:, None]) * s_w[None, :]``.

Why two passes: LLM activations carry a few outlier channels, so one per-row int8 scale leaves
the ordinary channels with a handful of levels. On SmolLM2-135M one pass agrees with the CPU's
top-1 on only 84.8 % of teacher-forced positions (mean KL 0.079); the second pass brings the
activations to ~15 bits and the result to what int8 weights alone cost (96.3 %, KL 0.0060), for
twice the rows on the NPU but no extra SUBMIT, weight bytes or CPU work beyond the rescale.
Groups along K (per-group scales, summed on the CPU) reach KL 0.0125 with groups of 64 but need
one prepared weight and one SUBMIT per group (see docs/npu.md). A row whose maximum is 0 gets
scale 0 and all-zero codes. The whole scheme is plain float32 numpy, so an emulation
reproduces the backend bit for bit (tests/oracle/test_npu_backend.py does).

Routing: a product with fewer than ``min_rows`` activation rows runs on the CPU backend
(``device="auto"`` without an explicit ``npu_min_rows``: per matrix, from the cost model's
crossover, ``cost_min_rows``). Decode
(one row) is memory-bound: the CPU's fused kernels stream the 4-5 bit GGUF blocks once, while
the NPU would read the 8-bit copy (more bytes) plus a SUBMIT and a round trip of packing per
matrix; the NPU only pays off once the product is compute-bound, i.e. for prefill. Every weight
keeps its CPU form too (the embedding lookup always uses it).

Prefill as a graph: a forward of at least ``min_rows`` rows is split by the model into chunks of
``GRAPH_CHUNK_TOKENS`` rows and its products given to :meth:`NPUBackend.run_graph` with their
dependencies; every level of the graph (e.g. q/k/v of every chunk of a layer) is **one SUBMIT**
(``npu.submit_levels``, ``npu.matmul_int8_batch``). Per layer the dependencies leave four levels
(q/k/v | o | gate/up | down, the CPU's RoPE/attention, residual/norm and SiLU between them), so a
forward costs 4 SUBMITs per layer whatever its length, and one SUBMIT per layer and chunk once a
forward has four or more chunks (docs/npu.md).

The token embedding (``token_embd.weight``) is quantized for the NPU lazily, at its first NPU
matmul: it is a matmul weight only when the output is tied to it, and then only for multi-row
logits (generation asks for the last row's logits, which is a one-row product on the CPU).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from ..gguf.file import TensorInfo
from ..npu import matmul_int8_batch, matmul_int8_prepared, prepare_weights, submit_levels
from ..gguf.quants import dequant_row_range
from . import MatmulBackend, MatmulNode, PreparedWeight
from .cpu import CPUBackend, CPUWeight

log = logging.getLogger("rosenblatt")

#: default ``min_rows``: products with fewer activation rows stay on the CPU (see docs/npu.md)
DEFAULT_MIN_ROWS = 16
#: rows (tokens) per chunk of a prefill run as a graph: with two activation terms 128 GEMM rows,
#: the row tile the planner gives the K = 1536 products of Qwen2.5-1.5B anyway, so chunks cost
#: about what the unchunked products do there (cost model: 93.8 vs 93.4 ms per 128 tokens per
#: layer); on SmolLM2's small matrices ~15 % more (docs/npu.md)
GRAPH_CHUNK_TOKENS = 64
#: ``min_rows`` of a matrix for which the NPU never wins (``cost_min_rows`` is None)
NEVER = 1 << 30
#: tensors quantized for the NPU on first use instead of at load
LAZY_TENSORS = frozenset({"token_embd.weight"})
_BAND_FLOATS = 1 << 20   # decode W in float32 bands of at most 4 MiB


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``(q int8 [R, C], scale float32 [R])`` with ``x ≈ q * scale[:, None]``."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=1)
    scale = amax / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint(x / safe[:, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def quantize_activations(x: np.ndarray, passes: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """``passes`` int8 terms ``(q_i, s_i)`` with ``x ≈ sum_i q_i * s_i[:, None]``: each term
    quantizes per row what the previous ones left (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    terms = [quantize_rows(x)]
    for _ in range(passes - 1):
        q, s = terms[-1]
        x = x - q.astype(np.float32) * s[:, None]
        terms.append(quantize_rows(x))
    return terms


def quantize_weight(w: CPUWeight) -> tuple[np.ndarray, np.ndarray]:
    """``W[N, K]`` decoded band by band → (int8 ``Wq[N, K]``, float32 per-row scales ``[N]``)."""
    n, k = w.n_out, w.n_in
    wq = np.empty((n, k), dtype=np.int8)
    scale = np.empty(n, dtype=np.float32)
    band = max(1, min(n, _BAND_FLOATS // k))
    tile = np.empty((band, k), dtype=np.float32)
    for s in range(0, n, band):
        t = tile[: min(band, n - s)]
        if w.dense is not None:
            t[...] = w.dense[s:s + t.shape[0]]
        else:
            dequant_row_range(w.qtype, w.rows, s, t)
        wq[s:s + t.shape[0]], scale[s:s + t.shape[0]] = quantize_rows(t)
    return wq, scale


@functools.lru_cache(maxsize=None)
def cost_min_rows(n_in: int, n_out: int, passes: int = 2, clock_hz: float | None = None) -> int | None:
    """Fewest activation rows from which the cost model (``npu.cost``) predicts the NPU product
    ``[M, n_in] @ [n_in, n_out]`` (``passes`` int8 terms, i.e. ``passes * M`` GEMM rows) faster
    than the four A76 cores; None if never up to 65536. At the DT's 200 MHz by default: the
    constants (``hw_assumptions``: clock, task/job overheads, DMA rate) are what a board's
    measurements replace."""
    from ..npu import cost
    from ..npu import hw_assumptions as hw
    return cost.crossover(n_in, n_out, clock_hz or hw.NPU_CLOCK_HZ, npu_rows_per_row=passes)


@dataclass
class NPUWeight(PreparedWeight):
    name: str
    n_out: int
    n_in: int
    cpu: CPUWeight                   # the CPU backend's form (small-M matmuls, embedding lookup)
    scale: np.ndarray | None = None  # float32 [N], s_w
    packed: object | None = None     # rosenblatt.npu.PreparedWeights of Wq.T [K, N], resident
    min_rows: int = 0                # products with fewer rows run on the CPU


class NPUBackend(MatmulBackend):
    """Matmuls with at least ``min_rows`` activation rows on the NPU ``device`` (int8, see the
    module docstring), the others on ``cpu``. ``min_rows=0`` sends every product to the NPU;
    ``min_rows="cost"`` sets it per matrix from the cost model's crossover (:func:`cost_min_rows`),
    and ``min_rows`` is then the smallest of those (below it everything stays on the CPU)."""

    def __init__(self, device, min_rows: int | str | None = None, cpu: CPUBackend | None = None,
                 threads: int | None = None, passes: int = 2):
        if passes not in (1, 2):
            raise ValueError(f"passes must be 1 or 2, got {passes}")
        self.by_cost = min_rows == "cost"
        if self.by_cost:
            min_rows = NEVER
        min_rows = DEFAULT_MIN_ROWS if min_rows is None else int(min_rows)
        if min_rows < 0:
            raise ValueError(f"npu_min_rows must be >= 0, got {min_rows}")
        self.passes = passes
        self.device = device
        self.min_rows = min_rows
        self.cpu = cpu if cpu is not None else CPUBackend(threads=threads)
        self.threads = self.cpu.threads
        self.name = "npu-sim" if getattr(device, "is_simulated", False) else "npu"
        self.weights: list[NPUWeight] = []

    def prepare(self, tensor: TensorInfo) -> NPUWeight:
        cw = self.cpu.prepare(tensor)
        w = NPUWeight(cw.name, cw.n_out, cw.n_in, cw, min_rows=self.min_rows)
        if self.by_cost:
            w.min_rows = cost_min_rows(w.n_in, w.n_out, self.passes) or NEVER
            self.min_rows = min(self.min_rows, w.min_rows)
        if tensor.name not in LAZY_TENSORS and w.min_rows < NEVER:    # else packed on first NPU use
            self._to_device(w)
        self.weights.append(w)
        return w

    def _to_device(self, w: NPUWeight) -> None:
        wq, w.scale = quantize_weight(w.cpu)
        w.packed = prepare_weights(self.device, wq.T)   # B[K, N]: kernel n = row n of W

    def on_npu(self, rows: int, w: NPUWeight) -> bool:
        """Whether a product of ``rows`` activation rows with ``w`` runs on the NPU."""
        return rows > 0 and rows >= self.min_rows and rows >= (w.min_rows if self.by_cost else self.min_rows)

    def _quantized(self, x: np.ndarray):
        terms = quantize_activations(x, self.passes)
        return (terms[0][0] if len(terms) == 1 else np.concatenate([q for q, _ in terms])), terms

    def _packed(self, w: NPUWeight):
        if w.packed is None:
            self._to_device(w)
        return w.packed

    @staticmethod
    def _rescale(acc: np.ndarray, terms, w: NPUWeight, out: np.ndarray | None = None) -> np.ndarray:
        m = terms[0][0].shape[0]
        y = acc[:m].astype(np.float32)
        y *= terms[0][1][:, None]
        for i, (_, s) in enumerate(terms[1:], 1):
            y += acc[i * m:(i + 1) * m].astype(np.float32) * s[:, None]
        y *= w.scale[None, :]
        if out is None:
            return y
        out[...] = y
        return out

    def matmul(self, x: np.ndarray, w: NPUWeight, out: np.ndarray | None = None) -> np.ndarray:
        if not self.on_npu(x.shape[0], w):
            return self.cpu.matmul(x, w.cpu, out)
        packed = self._packed(w)
        xq, terms = self._quantized(x)
        return self._rescale(matmul_int8_prepared(xq, packed, self.device), terms, w, out)

    def matmul_many(self, x: np.ndarray, ws) -> list[np.ndarray]:
        if not any(self.on_npu(x.shape[0], w) for w in ws):      # all on the CPU: grouped there
            return self.cpu.matmul_many(x, [w.cpu for w in ws])
        return [self.matmul(x, w) for w in ws]

    def graph_chunk(self, rows: int) -> int:
        if rows < max(self.min_rows, 1):
            return 0
        if self.by_cost:        # chunks no smaller than the crossovers, or the chunks would run on the CPU
            return max([GRAPH_CHUNK_TOKENS] + [w.min_rows for w in self.weights if w.min_rows < NEVER])
        return GRAPH_CHUNK_TOKENS

    def run_graph(self, nodes: list[MatmulNode]) -> None:
        """One SUBMIT per level of the graph (``npu.submit_levels``): the level's inputs are built
        and quantized in node order, all of its NPU products go in one ``matmul_int8_batch``, the
        products routed to the CPU run after it, then the nodes' ``done`` in order."""
        for level in submit_levels([n.deps for n in nodes]):
            xs, items, owners = {}, [], []
            for i in level:
                x = xs[i] = np.ascontiguousarray(nodes[i].x(), dtype=np.float32)
                quantized = None
                for j, w in enumerate(nodes[i].ws):
                    if self.on_npu(x.shape[0], w):
                        quantized = quantized or self._quantized(x)
                        items.append((quantized[0], self._packed(w)))
                        owners.append((i, j, quantized[1]))
            ys = {i: [None] * len(nodes[i].ws) for i in level}
            for (i, j, terms), acc in zip(owners, matmul_int8_batch(items, self.device) if items else ()):
                ys[i][j] = self._rescale(acc, terms, nodes[i].ws[j])
            for i in level:
                for j, w in enumerate(nodes[i].ws):
                    if ys[i][j] is None:
                        ys[i][j] = self.cpu.matmul(xs[i], w.cpu)
                if nodes[i].done is not None:
                    nodes[i].done(ys[i])

    def decode_group(self, ws):
        if self.min_rows <= 1:      # one-row products go to the NPU too
            return None
        return self.cpu.decode_group([w.cpu for w in ws])

    def fused_rows(self) -> int:
        return max(0, self.min_rows - 1)        # from min_rows rows on, the products go to the NPU

    def embed(self, w: NPUWeight, ids: np.ndarray) -> np.ndarray:
        return self.cpu.embed(w.cpu, ids)

    @property
    def resident_bytes(self) -> int:
        """Bytes of packed int8 weights held by the device."""
        return sum(w.packed.nbytes for w in self.weights if w.packed is not None)

    def close(self) -> None:
        for w in self.weights:
            if w.packed is not None:
                w.packed.close()
                w.packed = None
        self.device.close()


def open_npu_backend(name: str, threads: int | None = None, min_rows: int | None = None,
                     **cpu_options) -> MatmulBackend:
    """``"npu"``: the rocket device (an error naming why if there is none); ``"npu-sim"``: the
    simulator; ``"auto"``: the device if there is one, else the CPU backend with a notice."""
    from ..npu import NPUUnavailableError, open_device

    if min_rows is not None and int(min_rows) < 0:
        raise ValueError(f"npu_min_rows must be >= 0, got {min_rows}")
    if name == "npu-sim":
        device = open_device(sim=True)
    else:
        try:
            device = open_device(sim=False)
        except NPUUnavailableError as e:
            if name == "auto":
                log.warning("rosenblatt: no NPU (%s); running on the CPU", e)
                return CPUBackend(threads=threads, **cpu_options)
            raise NPUUnavailableError(
                f"device 'npu': {e} (device 'npu-sim' runs the simulator, 'auto' falls back to the CPU)"
            ) from None
    if name == "auto" and min_rows is None:
        min_rows = "cost"       # per matrix, from the cost model's crossover (docs/npu.md)
    return NPUBackend(device, min_rows=min_rows, cpu=CPUBackend(threads=threads, **cpu_options))


__all__ = ["DEFAULT_MIN_ROWS", "GRAPH_CHUNK_TOKENS", "NPUBackend", "cost_min_rows", "NPUWeight", "open_npu_backend", "quantize_activations",
           "quantize_rows", "quantize_weight"]
