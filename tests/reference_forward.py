"""A float64 numpy forward pass for the llama family: the readable specification of the model.

Independent of the engine on purpose: weights are decoded by `gguf.quants.dequantize`, the
configuration is read with `gguf.GGUFReader`, every operation is plain float64 numpy, one token
position at a time for the attention. Slow; for the micro models only.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load_weights(path):
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and not k.startswith("tokenizer.")}
    w = {}
    for t in r.tensors:
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
        w[t.name] = a.reshape([int(d) for d in reversed(t.shape)])  # numpy order: [rows, row_len]
    return meta, w


def rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * g


def rope(v, pos, base, neox):
    """Rotate one head vector v [hd] at position pos."""
    hd = v.shape[0]
    out = v.copy()
    for i in range(hd // 2):
        theta = pos * base ** (-2.0 * i / hd)
        c, s = np.cos(theta), np.sin(theta)
        a, b = (i, i + hd // 2) if neox else (2 * i, 2 * i + 1)
        out[a] = v[a] * c - v[b] * s
        out[b] = v[a] * s + v[b] * c
    return out


def forward(path, tokens):
    """Logits [len(tokens), vocab] in float64."""
    meta, w = load_weights(path)
    arch = meta["general.architecture"]
    n_layers = int(meta[f"{arch}.block_count"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta[f"{arch}.attention.head_count_kv"])
    eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
    base = float(meta[f"{arch}.rope.freq_base"])
    neox = arch == "qwen2"
    emb = w["token_embd.weight"]
    hd = emb.shape[1] // n_head
    keys = [[] for _ in range(n_layers)]
    values = [[] for _ in range(n_layers)]
    out = []
    for pos, tok in enumerate(tokens):
        x = emb[tok].copy()
        for li in range(n_layers):
            p = f"blk.{li}."
            h = rmsnorm(x, w[p + "attn_norm.weight"], eps)
            q = w[p + "attn_q.weight"] @ h + w.get(p + "attn_q.bias", 0.0)
            k = w[p + "attn_k.weight"] @ h + w.get(p + "attn_k.bias", 0.0)
            v = w[p + "attn_v.weight"] @ h + w.get(p + "attn_v.bias", 0.0)
            q = np.concatenate([rope(q[i * hd:(i + 1) * hd], pos, base, neox) for i in range(n_head)])
            k = np.concatenate([rope(k[i * hd:(i + 1) * hd], pos, base, neox) for i in range(n_kv)])
            keys[li].append(k)
            values[li].append(v)
            K, V = np.array(keys[li]), np.array(values[li])          # [pos+1, n_kv*hd]
            att = []
            for i in range(n_head):
                j = i // (n_head // n_kv)                             # the kv head this query head reads
                s = K[:, j * hd:(j + 1) * hd] @ q[i * hd:(i + 1) * hd] / np.sqrt(hd)
                pr = np.exp(s - s.max())
                att.append((pr / pr.sum()) @ V[:, j * hd:(j + 1) * hd])
            x = x + w[p + "attn_output.weight"] @ np.concatenate(att)
            h = rmsnorm(x, w[p + "ffn_norm.weight"], eps)
            g = w[p + "ffn_gate.weight"] @ h
            u = w[p + "ffn_up.weight"] @ h
            x = x + w[p + "ffn_down.weight"] @ (g / (1 + np.exp(-g)) * u)
        x = rmsnorm(x, w["output_norm.weight"], eps)
        out.append(w.get("output.weight", emb) @ x)
    return np.array(out)
