"""The llama family forward pass: Llama (SmolLM2) and Qwen2, as llama.cpp computes them.

Per layer::

    h = x + W_o · attention(rope(W_q·n + b_q), rope(W_k·n + b_k), W_v·n + b_v)   n = rmsnorm(x) * attn_norm
    x' = h + W_down · (silu(W_gate·m) * (W_up·m))                             m = rmsnorm(h) * ffn_norm

Differences between the two architectures are flags of :class:`~rosenblatt.models.config.ModelConfig`:
``qkv_bias`` (Qwen2 has q/k/v biases) and ``rope_neox`` (Qwen2 rotates the pairs (i, i+d/2),
llama.cpp's llama rotates adjacent pairs (2i, 2i+1) because its converter permuted W_q/W_k).
Prefill (many tokens) and decode (one token) run the same :meth:`LlamaModel.forward`; a token
alone goes through every layer in one numba call (:mod:`.llama_step`) when the backend has
integer kernels for all its products, with bit-identical results.
"""

from __future__ import annotations


import numpy as np

from ..backends import MatmulBackend, MatmulNode
from .config import ModelConfig
from ..errors import ModelFileError
from ..gguf.file import GGUFFile
from .kv_cache import KVCache
from ..cpu import ops as kernels
from .llama_step import FusedPlan
from ..gguf.quants import F16, F32, dequantize


def _vector(g: GGUFFile, name: str, length: int) -> np.ndarray:
    """A 1-D F32/F16 tensor (norm weight, bias) as a float32 array of the expected length."""
    t = g.tensor(name)
    if t.shape != (length,):
        raise ModelFileError(g.path, f"tensor {name!r}", f"shape {list(t.shape)}, expected [{length}]")
    if int(t.qtype) not in (F32, F16):
        raise ModelFileError(g.path, f"tensor {name!r}", f"type {t.qtype.name}, expected F32 or F16")
    v = dequantize(t.data, int(t.qtype), length).reshape(length)
    if not np.isfinite(v).all():
        raise ModelFileError(g.path, f"tensor {name!r}", "holds NaN or infinite values")
    return v


def _matrix(g: GGUFFile, name: str, n_in: int, n_out: int, backend: MatmulBackend):
    t = g.tensor(name)
    if t.shape != (n_in, n_out):
        raise ModelFileError(g.path, f"tensor {name!r}", f"shape {list(t.shape)}, expected [{n_in}, {n_out}]")
    try:
        return backend.prepare(t)
    except ValueError as e:
        raise ModelFileError(g.path, f"tensor {name!r}", str(e).split(": ", 1)[-1]) from None


class Layer:
    def __init__(self, g: GGUFFile, cfg: ModelConfig, i: int, backend: MatmulBackend):
        p = f"blk.{i}."
        d, q_dim = cfg.d_model, cfg.n_heads * cfg.head_dim
        k_dim, v_dim = cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim_v
        self.attn_norm = _vector(g, p + "attn_norm.weight", d)
        self.wq = _matrix(g, p + "attn_q.weight", d, q_dim, backend)
        self.wk = _matrix(g, p + "attn_k.weight", d, k_dim, backend)
        self.wv = _matrix(g, p + "attn_v.weight", d, v_dim, backend)
        self.wo = _matrix(g, p + "attn_output.weight", cfg.n_heads * cfg.head_dim_v, d, backend)
        if cfg.qkv_bias:
            self.bq = _vector(g, p + "attn_q.bias", q_dim)
            self.bk = _vector(g, p + "attn_k.bias", k_dim)
            self.bv = _vector(g, p + "attn_v.bias", v_dim)
        else:
            self.bq = self.bk = self.bv = None
        self.ffn_norm = _vector(g, p + "ffn_norm.weight", d)
        self.w_gate = _matrix(g, p + "ffn_gate.weight", d, cfg.d_ff, backend)
        self.w_up = _matrix(g, p + "ffn_up.weight", d, cfg.d_ff, backend)
        self.w_down = _matrix(g, p + "ffn_down.weight", cfg.d_ff, d, backend)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, d] / sqrt(mean(x^2) + eps) * weight, per row (float32; float64 sum of squares)."""
    out = np.empty_like(x)
    kernels.rms_norm(x, weight, eps, out)
    return out


def rope_tables(cfg: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * base^(-2i/rope_dim), [n_ctx, rope_dim/2], computed in float64."""
    inv_freq = cfg.rope_base ** (-np.arange(0, cfg.rope_dim, 2, dtype=np.float64) / cfg.rope_dim)
    angles = np.arange(n_ctx, dtype=np.float64)[:, None] * cfg.rope_freq_scale * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, neox: bool) -> None:
    """Rotate ``x`` [T, heads, head_dim] in place; cos/sin are [T, rope_dim/2].

    ``neox``: the pairs (i, i + rope_dim/2), else (2i, 2i+1); dimensions from rope_dim on are kept."""
    kernels.rope(x, cos, sin, rope_dim, neox)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, n_kv: int,
              window: int = 0, scale: float | None = None) -> np.ndarray:
    """Causal grouped-query attention of T new queries against the cache.

    q: [T, H, hd]; k_cache/v_cache: [n_kv, n_ctx, hd] already holding positions [0, start+T).
    Query head h reads kv head h // (H / n_kv). Returns [T, H * hd_v].
    ``window`` > 0: query position i sees only keys j with i - j < window (sliding-window layers).
    ``scale``: score scale, default 1/sqrt(hd).
    Every query row runs the same numba kernel (``ops.attention_decode``) over the keys it sees, so
    its result does not depend on how many rows share the call (a decode step, a prompt chunk, a
    reused prefix all give the same numbers).
    """
    t, h, hd = q.shape
    scale = np.float32(1.0 / np.sqrt(hd) if scale is None else scale)
    out = np.empty((t, h, v_cache.shape[2]), np.float32)
    if t == 1:
        lo = max(0, start - window + 1) if window else 0
        kernels.attention_decode(q[0], k_cache, v_cache, n_kv, lo, start + 1, scale, out[0], kernels.dots_kernel())
    else:
        kernels.attention_rows(q, k_cache, v_cache, n_kv, start, window, scale, out, kernels.dots_kernel())
    return out.reshape(t, -1)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise."""
    out = np.empty_like(gate)
    (kernels.silu_mul_rows if gate.shape[0] >= 8 else kernels.silu_mul)(gate, up, out)
    return out


class LlamaModel:
    """Weights (prepared by a matmul backend), RoPE tables and the forward pass."""

    layer_class = Layer     # a family with more per-layer tensors subclasses Layer (gemma3)

    def __init__(self, g: GGUFFile, cfg: ModelConfig, backend: MatmulBackend, n_ctx: int, progress=None):
        self.cfg = cfg
        self.backend = backend
        self.n_ctx = n_ctx
        self.tok_embd = _matrix(g, "token_embd.weight", cfg.d_model, cfg.vocab_size, backend)
        self.layers = []
        for i in range(cfg.n_layers):
            self.layers.append(self.layer_class(g, cfg, i, backend))
            if progress is not None:
                progress(i + 1, cfg.n_layers, "layers")
        self.out_norm = _vector(g, "output_norm.weight", cfg.d_model)
        self.output = self.tok_embd if cfg.tied_output else \
            _matrix(g, "output.weight", cfg.d_model, cfg.vocab_size, backend)
        self.cos, self.sin = rope_tables(cfg, n_ctx)
        #: the fused layers' RoPE tables [tables, n_ctx, rope_dim / 2] (one here; gemma3 has two)
        self.rope_cos, self.rope_sin = self.cos[None], self.sin[None]

    #: False: every call runs operation by operation (:meth:`_layers`), never the fused layers
    #: (tests compare the two bit for bit)
    fused: bool = True

    def stage_ops(self):
        """The stage functions the per-operation path calls, in the order :meth:`_layers` takes
        them: (matmul, matmul_many, attention, rms_norm, apply_rope, silu_mul). A profiler passes
        timed wrappers of them to :meth:`forward` (see rosenblatt.bench)."""
        return (self.backend.matmul, self.backend.matmul_many, attention, rms_norm, apply_rope, silu_mul)

    #: whether :meth:`_layers_graph` states this family's layer (gemma3's extras are not in it)
    graph_layers: bool = True
    #: GELU gating instead of SiLU in the fused layers (gemma3)
    gelu: bool = False

    _plan: tuple | None = None
    #: layers times chunks run so far (a forward is one chunk unless its products ran as a graph
    #: over several): what a per-layer count of the backend's work is divided by (bench)
    layer_passes: int = 0

    def fused_plan(self, cache: KVCache | None = None) -> FusedPlan | None:
        """The fused layers (:mod:`.llama_step`) when they apply: built on first use, again when the
        backend's kernel choice changes; None when :attr:`fused` is off, without int8 kernels for
        every product, or for a cache whose arrays left its pool (a bounded cache that grew)."""
        if not self.fused or (cache is not None and not cache.pooled):
            return None
        key = getattr(self.backend, "kernels", None)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, FusedPlan.build(self))
        return self._plan[1]

    def new_cache(self) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_kv_heads, self.n_ctx, c.head_dim, c.head_dim_v)

    def new_caches(self, n: int) -> list[KVCache]:
        """``n`` caches for :meth:`forward_batch`: slots of one pool (a family with its own cache
        kind gets ``n`` of those, run one by one)."""
        if type(self).new_cache is not LlamaModel.new_cache:
            return [self.new_cache() for _ in range(n)]
        c = self.cfg
        return KVCache.pool(n, c.n_layers, c.n_kv_heads, self.n_ctx, c.head_dim, c.head_dim_v)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.backend.embed(self.tok_embd, tokens)

    def forward(self, tokens: np.ndarray, cache: KVCache, logits: str = "last", ops=None) -> np.ndarray | None:
        """Run ``tokens`` (positions ``cache.length`` onward) through the model.

        ``logits``: "all" → [T, vocab], "last" → [1, vocab], "none" → None (cache fill only).
        ``ops``: run operation by operation with these stage functions (:meth:`stage_ops`, or a
        profiler's wrappers of them) instead of the fused layers.
        """
        t = len(tokens)
        start = cache.length
        if start + t > self.n_ctx:
            raise ValueError(f"context overflow: {start} + {t} tokens > n_ctx {self.n_ctx}")
        x = self.embed(tokens)
        plan = (self.fused_plan(cache) if t <= self.backend.fused_rows() and ops is None
                and cache.make_room(start, t) else None)
        chunk = (self.backend.graph_chunk(t) if plan is None and ops is None and type(cache) is KVCache
                 and self.graph_layers else 0)
        if chunk:
            self._layers_graph(x, cache, start, chunk)
            cache.length = start + t
            return self._logits(x, logits)
        self.layer_passes += self.cfg.n_layers
        if plan is None:
            ops = ops or self.stage_ops()
            self._layers(x, cache, start, ops)
            cache.length = start + t
            return self._logits(x, logits, ops)
        n = {"all": t, "last": 1, "none": 0}[logits]
        offset = np.repeat(np.array([cache.offset], np.int64), t, axis=0)
        out = plan.run(x, cache, np.arange(start, start + t, dtype=np.int64), np.full(t, cache.slot, np.int64),
                       offset, self.rope_cos, self.rope_sin, n)
        cache.length = start + t
        return out if out is not None or logits == "none" else self._logits(x, logits)

    def forward_batch(self, tokens, caches: list[KVCache]) -> np.ndarray:
        """One token for each of several sequences (``tokens[i]`` at position ``caches[i].length``
        of ``caches[i]``) in one call: logits [len(tokens), vocab], row i the same bits as
        ``forward([tokens[i]], caches[i])`` gives. The weights are read once for all rows when the
        caches are slots of one pool (:meth:`new_caches`); otherwise the sequences run one by one."""
        if len(tokens) != len(caches) or not caches:
            raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one batch")
        for c in caches:
            if c.length + 1 > self.n_ctx:
                raise ValueError(f"context overflow: {c.length} + 1 tokens > n_ctx {self.n_ctx}")
        plan = self.fused_plan(caches[0]) if len(caches) <= self.backend.fused_rows() else None
        one_pool = all(c.pool_k is caches[0].pool_k and c.pool_kl is caches[0].pool_kl for c in caches)
        if plan is None or not one_pool or not all(c.make_room(c.length, 1) for c in caches):
            return np.concatenate([self.forward(np.asarray([tok]), c, "last") for tok, c in zip(tokens, caches)])
        b = len(caches)
        x = self.embed(np.asarray(tokens))
        pos = np.array([c.length for c in caches], np.int64)
        slot = np.array([c.slot for c in caches], np.int64)
        offset = np.array([c.offset for c in caches], np.int64)
        out = plan.run(x, caches[0], pos, slot, offset, self.rope_cos, self.rope_sin, b)
        for c in caches:
            c.length += 1
        return out if out is not None else self._logits(x, "all")

    def _logits(self, x: np.ndarray, logits: str, ops=None) -> np.ndarray | None:
        """The output norm and product of the final residual rows ``x`` ("all"/"last"/"none")."""
        if logits == "none":
            return None
        if logits == "last":
            x = x[-1:]
        mm, _, _, rms_norm, _, _ = ops or self.stage_ops()
        return mm(np.ascontiguousarray(rms_norm(x, self.out_norm, self.cfg.rms_eps)), self.output)

    def _layers_graph(self, x: np.ndarray, cache: KVCache, start: int, chunk: int) -> None:
        """Every layer on ``x`` [T, d], its rows cut into chunks of about ``chunk`` rows, as a graph
        of the backend's products (:meth:`MatmulBackend.run_graph`): per layer and chunk four nodes,
        q/k/v -> o -> gate/up -> down, each depending on the one before (the CPU's RoPE and
        attention, residual and norm, SiLU lie between them); o also on the previous chunk's q/k/v
        (its attention reads that chunk's keys and values), and a layer's q/k/v on the chunk's
        down of the layer before. The same operations on the same rows as :meth:`_layers`: every
        one of them is per row (attention reads the keys up to each row's position), so the
        result is the same bits."""
        cfg = self.cfg
        t = x.shape[0]
        parts = -(-t // chunk)
        cuts = [t * p // parts for p in range(parts + 1)]           # balanced chunks
        self.layer_passes += cfg.n_layers * parts
        nodes: list[MatmulNode] = []
        last_down = [None] * parts
        for i, L in enumerate(self.layers):
            prev_qkv = None
            for c in range(parts):
                a, b = cuts[c], cuts[c + 1]
                deps = () if last_down[c] is None else (last_down[c],)
                qkv, o, gu, down = self._chunk_nodes(L, i, x[a:b], cache, start + a, len(nodes), deps, prev_qkv)
                prev_qkv = len(nodes)
                last_down[c] = len(nodes) + 3
                nodes += [qkv, o, gu, down]
        self.backend.run_graph(nodes)

    def _chunk_nodes(self, L, i: int, xc: np.ndarray, cache: KVCache, pos: int, first: int, deps: tuple,
                     prev_qkv: int | None):
        """The four graph nodes of layer ``L`` (index ``i``) on the residual rows ``xc`` (a view,
        updated in place) at positions ``pos``.., numbered from ``first``."""
        cfg = self.cfg
        t = xc.shape[0]
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]
        st: dict = {}

        def qkv_done(ys):
            st["q"], st["kv"] = self._qkv_stored(L, i, *ys, cache, pos, cos, sin, apply_rope)

        def add(ys):
            xc[...] += ys[0]

        def gu_done(ys):
            st["h"] = silu_mul(*ys)

        o_deps = (first,) if prev_qkv is None else (first, prev_qkv)
        return (
            MatmulNode(lambda: rms_norm(xc, L.attn_norm, cfg.rms_eps), (L.wq, L.wk, L.wv), t, deps, qkv_done),
            MatmulNode(lambda: attention(st["q"], *st["kv"], pos, cfg.n_kv_heads), (L.wo,), t, o_deps, add),
            MatmulNode(lambda: rms_norm(xc, L.ffn_norm, cfg.rms_eps), (L.w_gate, L.w_up), t, (first + 1,), gu_done),
            MatmulNode(lambda: st.pop("h"), (L.w_down,), t, (first + 2,), add),
        )

    def _qkv_stored(self, L, i: int, q, k, v, cache: KVCache, pos: int, cos, sin, apply_rope):
        """Layer ``i``'s q/k/v products of rows at ``pos``..: biases, heads, RoPE; the keys and
        values stored. (queries, the cache's keys and values for attention)."""
        cfg = self.cfg
        t = q.shape[0]
        if L.bq is not None:
            q += L.bq
            k += L.bk
            v += L.bv
        q = q.reshape(t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(t, cfg.n_kv_heads, cfg.head_dim)
        apply_rope(q, cos, sin, cfg.rope_dim, cfg.rope_neox)
        apply_rope(k, cos, sin, cfg.rope_dim, cfg.rope_neox)
        return q, cache.store(i, pos, k, v.reshape(t, cfg.n_kv_heads, cfg.head_dim_v))

    def _layers(self, x: np.ndarray, cache: KVCache, start: int, ops) -> None:
        """Every layer, operation by operation, on the residual ``x`` [T, d] (updated in place)."""
        cfg = self.cfg
        mm, mm_many, attention, rms_norm, apply_rope, silu_mul = ops
        t = x.shape[0]
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        for i, L in enumerate(self.layers):
            n = rms_norm(x, L.attn_norm, cfg.rms_eps)
            q, (kc, vc) = self._qkv_stored(L, i, *mm_many(n, (L.wq, L.wk, L.wv)), cache, start, cos, sin,
                                           apply_rope)
            a = attention(q, kc, vc, start, cfg.n_kv_heads)
            x += mm(np.ascontiguousarray(a), L.wo)
            m = rms_norm(x, L.ffn_norm, cfg.rms_eps)
            x += mm(silu_mul(*mm_many(m, (L.w_gate, L.w_up))), L.w_down)
