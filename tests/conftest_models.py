"""Test helpers for the Llama tests: random params and an independent NumPy Llama forward.

The NumPy forward is written from the architecture's definition, separately from the JAX code:
per-head loops, explicit KV-head repetition, rotary embeddings as complex multiplication
(interleaved pairs) or rotate-half, float64 throughout.
"""

from __future__ import annotations

import numpy as np


def random_llama_params(rng, *, vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim,
                        hidden_dim, tie_embeddings, scale=0.3):
    """float32 params in the CONTRACTS.md layout with O(1) activations (not a trained init)."""
    L, D, V, F = n_layers, dim, vocab_size, hidden_dim
    Hd, KVd = n_heads * head_dim, n_kv_heads * head_dim

    def mat(*shape):
        fan_in = shape[-2]
        return (rng.standard_normal(shape) * (scale * 3 / np.sqrt(fan_in))).astype(np.float32)

    p = {
        "embed": rng.standard_normal((V, D)).astype(np.float32),
        "layers": {
            "attn_norm": (1 + 0.2 * rng.standard_normal((L, D))).astype(np.float32),
            "wq": mat(L, D, Hd), "wk": mat(L, D, KVd), "wv": mat(L, D, KVd),
            "wo": mat(L, Hd, D),
            "mlp_norm": (1 + 0.2 * rng.standard_normal((L, D))).astype(np.float32),
            "w_gate": mat(L, D, F), "w_up": mat(L, D, F), "w_down": mat(L, F, D),
        },
        "norm": (1 + 0.2 * rng.standard_normal(D)).astype(np.float32),
    }
    if not tie_embeddings:
        p["lm_head"] = mat(D, V)
    return p


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, layout):
    """x: [T, hd] for one head; pos: [T]."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = pos[:, None] * inv[None, :]
    rot = np.exp(1j * ang)
    if layout == "interleaved":
        z = (x[:, 0::2] + 1j * x[:, 1::2]) * rot
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = z.real, z.imag
        return out
    half = hd // 2
    z = (x[:, :half] + 1j * x[:, half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def numpy_llama_forward(params, tokens, *, n_heads, n_kv_heads, head_dim, norm_eps=1e-5,
                        rope_theta=10000.0, rope_layout="half", tie_embeddings=False):
    """Logits float64 [T, V] for one sequence ``tokens: [T]`` (causal, positions 0..T-1)."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
             {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    tokens = np.asarray(tokens)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = p["embed"][tokens]
    lay = p["layers"]
    group = n_heads // n_kv_heads
    causal = np.tril(np.ones((T, T), bool))
    for layer in range(lay["wq"].shape[0]):
        h = _rms(x, lay["attn_norm"][layer], norm_eps)
        q = h @ lay["wq"][layer]
        k = h @ lay["wk"][layer]
        v = h @ lay["wv"][layer]
        heads = []
        for hh in range(n_heads):
            kvh = hh // group
            qh = _rope(q[:, hh * head_dim:(hh + 1) * head_dim], pos, rope_theta, rope_layout)
            kh = _rope(k[:, kvh * head_dim:(kvh + 1) * head_dim], pos, rope_theta, rope_layout)
            vh = v[:, kvh * head_dim:(kvh + 1) * head_dim]
            s = qh @ kh.T / np.sqrt(head_dim)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            heads.append(s @ vh)
        x = x + np.concatenate(heads, axis=-1) @ lay["wo"][layer]
        h = _rms(x, lay["mlp_norm"][layer], norm_eps)
        g = h @ lay["w_gate"][layer]
        u = h @ lay["w_up"][layer]
        x = x + (g / (1 + np.exp(-g)) * u) @ lay["w_down"][layer]
    x = _rms(x, p["norm"], norm_eps)
    head = p["embed"].T if tie_embeddings else p["lm_head"]
    return x @ head
