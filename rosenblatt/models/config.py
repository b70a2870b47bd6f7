"""Model hyper-parameters read from GGUF metadata, validated.

Keys follow llama.cpp's naming: ``<arch>.block_count``, ``<arch>.embedding_length`` … Values
that would make the forward pass meaningless or allocate absurd memory (a head count of 0, a
head dimension that does not divide, a context of 2^40) are refused here with a message naming
the key, before any tensor is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelFileError
from ..gguf.file import GGUFFile

#: architectures the engine runs, with their llama.cpp RoPE pairing (True = NEOX halves)
ARCHITECTURES = {"llama": False, "qwen2": True, "gemma3": True}

#: gemma3: llama.cpp's built-in sliding-window pattern (layer i is local iff i % 6 < 5) and the RoPE
#: base of the local layers when the GGUF has no ``rope.freq_base_swa``
GEMMA3_SWA_PERIOD = 6
GEMMA3_ROPE_BASE_SWA = 10000.0

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
    # sliding-window attention (gemma3): the layers in ``swa_layers`` attend to the last
    # ``sliding_window`` positions only (the query's own included) and rotate with ``rope_base_swa``
    sliding_window: int = 0
    swa_layers: tuple[int, ...] = ()
    rope_base_swa: float = 0.0
    attn_scale: float = 0.0    # query scale; 0 = 1/sqrt(head_dim)

    @property
    def n_params(self) -> int:
        """Parameters in the 2-D weights and norms (what `info` reports)."""
        attn = self.d_model * (self.n_heads * self.head_dim + self.n_kv_heads * (self.head_dim + self.head_dim_v)) \
            + self.n_heads * self.head_dim_v * self.d_model
        mlp = 3 * self.d_model * self.d_ff
        per_layer = attn + mlp + 2 * self.d_model
        if self.arch == "gemma3":   # post-attention / post-ffn norms, per-head q/k norms
            per_layer += 2 * self.d_model + 2 * self.head_dim
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
        if not default_hd and g.get(a + "attention.key_length") is None:
            raise ModelFileError(g.path, f"metadata {a + 'embedding_length'!r}",
                                 f"{d_model} is not a multiple of the head count {n_heads}, and no "
                                 f"{a + 'attention.key_length'!r} gives the head size")
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
        extra = {}
        if arch == "gemma3":
            extra = _gemma3_attention(g, a, n_layers, d_model, n_heads, head_dim)
        return cls(
            arch=arch, name=str(g.get("general.name", "") or ""), n_layers=n_layers, d_model=d_model,
            d_ff=d_ff, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            rope_dim=rope_dim, rope_base=rope_base, rope_neox=ARCHITECTURES[arch], rope_freq_scale=freq_scale,
            rms_eps=rms_eps, context_length=ctx, vocab_size=vocab,
            qkv_bias="blk.0.attn_q.bias" in g.tensors, tied_output="output.weight" not in g.tensors,
            **extra,
        )


def _gemma3_attention(g: GGUFFile, a: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict:
    """gemma3's sliding window, local RoPE base and query scale, as llama.cpp derives them."""
    window = g.get_int(a + "attention.sliding_window", minimum=1, maximum=_MAX_CTX)
    local = tuple(i for i in range(n_layers) if i % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1)
    base_swa = g.get_float(a + "rope.freq_base_swa", GEMMA3_ROPE_BASE_SWA, positive=True)
    # llama.cpp: the 62-layer 27B model scales queries by 1/sqrt(d_model / heads), the others by 1/sqrt(head_dim)
    scale = (d_model // n_heads) ** -0.5 if n_layers == 62 else head_dim ** -0.5
    return {"sliding_window": window, "swa_layers": local, "rope_base_swa": base_swa, "attn_scale": scale}
