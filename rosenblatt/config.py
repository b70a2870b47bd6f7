"""Model hyper-parameters read from GGUF metadata, validated.

Keys follow llama.cpp's naming: ``<arch>.block_count``, ``<arch>.embedding_length`` … Values
that would make the forward pass meaningless or allocate absurd memory (a head count of 0, a
head dimension that does not divide, a context of 2^40) are refused here with a message naming
the key, before any tensor is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelFileError
from .gguf_file import GGUFFile

#: architectures the engine runs, with their llama.cpp RoPE pairing (True = NEOX halves)
ARCHITECTURES = {"llama": False, "qwen2": True}

_MAX_DIM = 1 << 17      # no dimension of a model this engine targets comes near this
_MAX_LAYERS = 1024
_MAX_CTX = 1 << 24


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int          # key/query head size
    head_dim_v: int        # value head size
    rope_dim: int          # leading dimensions of each head that RoPE rotates
    rope_base: float
    rope_neox: bool        # pair (i, i + rope_dim/2) instead of (2i, 2i+1)
    rope_freq_scale: float  # 1 / linear scaling factor
    rms_eps: float
    context_length: int
    vocab_size: int
    qkv_bias: bool
    tied_output: bool

    @property
    def n_params(self) -> int:
        """Parameters in the 2-D weights and norms (what `info` reports)."""
        attn = self.d_model * (self.n_heads * self.head_dim + self.n_kv_heads * (self.head_dim + self.head_dim_v)) \
            + self.n_heads * self.head_dim_v * self.d_model
        mlp = 3 * self.d_model * self.d_ff
        per_layer = attn + mlp + 2 * self.d_model
        out = 0 if self.tied_output else self.vocab_size * self.d_model
        return self.n_layers * per_layer + self.vocab_size * self.d_model + out + self.d_model

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelConfig":
        arch = g.get_str("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelFileError(g.path, "metadata 'general.architecture'",
                                 f"unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
        a = arch + "."
        n_layers = g.get_int(a + "block_count", minimum=1, maximum=_MAX_LAYERS)
        d_model = g.get_int(a + "embedding_length", minimum=1, maximum=_MAX_DIM)
        d_ff = g.get_int(a + "feed_forward_length", minimum=1, maximum=8 * _MAX_DIM)
        n_heads = g.get_int(a + "attention.head_count", minimum=1, maximum=4096)
        n_kv = g.get_int(a + "attention.head_count_kv", n_heads, minimum=1, maximum=n_heads)
        if n_heads % n_kv:
            raise ModelFileError(g.path, f"metadata {a + 'attention.head_count_kv'!r}",
                                 f"{n_kv} does not divide the head count {n_heads}")
        default_hd = d_model // n_heads if d_model % n_heads == 0 else 0
        head_dim = g.get_int(a + "attention.key_length", default_hd or None, minimum=2, maximum=4096)
        head_dim_v = g.get_int(a + "attention.value_length", head_dim, minimum=1, maximum=4096)
        rope_dim = g.get_int(a + "rope.dimension_count", head_dim, minimum=2, maximum=head_dim)
        if rope_dim % 2:
            raise ModelFileError(g.path, f"metadata {a + 'rope.dimension_count'!r}", f"{rope_dim} is odd")
        rope_base = g.get_float(a + "rope.freq_base", 10000.0, positive=True)
        scaling = g.get(a + "rope.scaling.type", "none")
        factor = g.get_float(a + "rope.scaling.factor", 1.0, positive=True)
        if scaling not in ("none", "linear") and factor != 1.0:
            raise ModelFileError(g.path, f"metadata {a + 'rope.scaling.type'!r}",
                                 f"RoPE scaling {scaling!r} is not supported (only linear)")
        freq_scale = 1.0 / factor if scaling == "linear" else 1.0
        rms_eps = g.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5, positive=True)
        ctx = g.get_int(a + "context_length", 4096, minimum=1, maximum=_MAX_CTX)

        emb = g.tensor("token_embd.weight")
        if len(emb.shape) != 2 or emb.shape[0] != d_model:
            raise ModelFileError(g.path, "tensor 'token_embd.weight'",
                                 f"shape {list(emb.shape)} does not match embedding_length {d_model}")
        vocab = emb.shape[1]
        return cls(
            arch=arch, name=str(g.get("general.name", "") or ""), n_layers=n_layers, d_model=d_model,
            d_ff=d_ff, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            rope_dim=rope_dim, rope_base=rope_base, rope_neox=ARCHITECTURES[arch], rope_freq_scale=freq_scale,
            rms_eps=rms_eps, context_length=ctx, vocab_size=vocab,
            qkv_bias="blk.0.attn_q.bias" in g.tensors, tied_output="output.weight" not in g.tensors,
        )
