"""The gemma3 forward pass (Gemma 3 text models), as llama.cpp computes it.

The same skeleton as the llama family (:mod:`.llama`, whose pieces are reused); the differences::

    x = embed(tokens) * sqrt(d_model)                                   # scaled embedding
    per layer:
        n = rmsnorm(x) * attn_norm
        q = rope(rmsnorm_per_head(W_q·n) * attn_q_norm)                 # q/k normalised per head
        k = rope(rmsnorm_per_head(W_k·n) * attn_k_norm)                 #   before RoPE
        a = attention(q, k, W_v·n)       sliding window on local layers, query scale from config
        h = x + rmsnorm(W_o·a) * post_attention_norm                    # post-norm of the sub-block
        m = rmsnorm(h) * ffn_norm
        x = h + rmsnorm(W_down·(gelu_tanh(W_gate·m) * (W_up·m))) * post_ffw_norm   # GELU, post-norm
    logits = (rmsnorm(x) * output_norm) · token_embdᵀ                    # tied output, no softcap

* **Local and global layers.** Layers in ``cfg.swa_layers`` (llama.cpp: ``i % 6 < 5``) attend to
  the last ``cfg.sliding_window`` positions, the query's own included, and rotate with
  ``cfg.rope_base_swa`` (10,000); the others see the whole context and use ``cfg.rope_base``.
  RoPE is NEOX-style (halves paired) over the whole head.
* **Head size** comes from ``attention.key_length`` (256 for the 270M model, not d_model/heads);
  queries are scaled by ``cfg.attn_scale`` (1/sqrt(head_dim) except for the 27B model).
* **Norm weights are used as stored**: Hugging Face Gemma computes ``x * (1 + w)`` and the GGUF
  converter stored ``1 + w`` already.
* llama.cpp applies no final-logit or attention-logit soft-capping to gemma3 with sliding
  windows, so neither is done here.
* **Cache.** The local layers keep about three windows of keys and values, not the whole context
  (:class:`~rosenblatt.models.kv_cache.SlidingWindowKVCache`); attention gets each layer's offset.
* **Fused layers.** With the CPU's int8 kernels the layers run in :mod:`.llama_step`'s single
  call as the llama family's do (decode, prompt chunks, batched steps over a pool of caches),
  with the extras above as per-layer arrays; the same bits as operation by operation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..backends import MatmulBackend
from .config import ModelConfig
from ..gguf.file import GGUFFile
from .kv_cache import KVCache, SlidingWindowKVCache
from ..cpu import ops as kernels
from .llama import Layer, LlamaModel, _vector, rope_tables

def gelu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu(gate) * up as ggml computes it: its float16 table of the tanh approximation (see ``ops.gelu``)."""
    out = np.empty_like(gate)
    (kernels.gelu_mul_rows if gate.shape[0] >= 8 else kernels.gelu_mul)(gate, up, out, kernels.GELU_F16)
    return out


class Gemma3Layer(Layer):
    """A llama layer plus the per-head q/k norms, the two post-norms and the layer's window."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig, i: int, backend: MatmulBackend):
        super().__init__(g, cfg, i, backend)
        p = f"blk.{i}."
        self.q_norm = _vector(g, p + "attn_q_norm.weight", cfg.head_dim)
        self.k_norm = _vector(g, p + "attn_k_norm.weight", cfg.head_dim)
        self.post_attn_norm = _vector(g, p + "post_attention_norm.weight", cfg.d_model)
        self.post_ffn_norm = _vector(g, p + "post_ffw_norm.weight", cfg.d_model)
        self.local = i in cfg.swa_layers                          # sliding-window layer: local RoPE base
        self.window = cfg.sliding_window if self.local else 0     # keys it sees; 0 = all (global layer)


class Gemma3Model(LlamaModel):
    layer_class = Gemma3Layer
    gelu = True
    graph_layers = False

    def __init__(self, g: GGUFFile, cfg: ModelConfig, backend: MatmulBackend, n_ctx: int, progress=None):
        super().__init__(g, cfg, backend, n_ctx, progress=progress)
        self.embed_scale = np.float32(np.sqrt(cfg.d_model))
        # the global layers rotate as cfg says (self.cos/self.sin); the local ones with rope_base_swa and,
        # as in llama.cpp, without the (linear) RoPE scaling of the global layers
        self.cos_swa, self.sin_swa = rope_tables(replace(cfg, rope_base=cfg.rope_base_swa, rope_freq_scale=1.0), n_ctx)
        self.rope_cos, self.rope_sin = np.stack([self.cos, self.cos_swa]), np.stack([self.sin, self.sin_swa])

    def new_cache(self) -> KVCache:
        """The local layers keep about 3 windows of keys, the global ones the whole context."""
        return self.new_caches(1)[0]

    def new_caches(self, n: int) -> list[KVCache]:
        """``n`` caches as :meth:`new_cache`'s, slots of one pool (for :meth:`forward_batch`)."""
        c = self.cfg
        return SlidingWindowKVCache.pool(n, c.n_layers, c.n_kv_heads, self.n_ctx, c.head_dim, c.head_dim_v,
                                         [L.window for L in self.layers])

    def stage_ops(self):
        return super().stage_ops()[:5] + (gelu_mul,)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = super().embed(tokens)
        x *= self.embed_scale
        return x

    def _layers(self, x: np.ndarray, cache: KVCache, start: int, ops) -> None:
        """Every layer, operation by operation, on the residual ``x`` [T, d] (updated in place)."""
        cfg = self.cfg
        mm, mm_many, attention, rms_norm, apply_rope, gelu_mul = ops
        eps = cfg.rms_eps
        t = x.shape[0]
        stop = start + t
        rope = {False: (self.cos[start:stop], self.sin[start:stop]),          # global layers
                True: (self.cos_swa[start:stop], self.sin_swa[start:stop])}   # sliding-window layers
        for i, L in enumerate(self.layers):
            n = rms_norm(x, L.attn_norm, eps)
            q = rms_norm(mm(n, L.wq).reshape(t * cfg.n_heads, cfg.head_dim), L.q_norm, eps)
            k = rms_norm(mm(n, L.wk).reshape(t * cfg.n_kv_heads, cfg.head_dim), L.k_norm, eps)
            q = q.reshape(t, cfg.n_heads, cfg.head_dim)
            k = k.reshape(t, cfg.n_kv_heads, cfg.head_dim)
            cos, sin = rope[L.local]
            apply_rope(q, cos, sin, cfg.rope_dim, cfg.rope_neox)
            apply_rope(k, cos, sin, cfg.rope_dim, cfg.rope_neox)
            v = mm(n, L.wv).reshape(t, cfg.n_kv_heads, cfg.head_dim_v)
            kc, vc = cache.store(i, start, k, v)
            first = cache.offset[i]    # position at index 0 of kc/vc (> 0 once a local layer dropped keys)
            a = attention(q, kc, vc, start - first, cfg.n_kv_heads, L.window, cfg.attn_scale)
            x += rms_norm(mm(np.ascontiguousarray(a), L.wo), L.post_attn_norm, eps)
            m = rms_norm(x, L.ffn_norm, eps)
            f = mm(gelu_mul(*mm_many(m, (L.w_gate, L.w_up))), L.w_down)
            x += rms_norm(f, L.post_ffn_norm, eps)
