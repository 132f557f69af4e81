"""GPT-2 in pure JAX.

Architecture (as OpenAI's GPT-2 / Hugging Face ``GPT2LMHeadModel``): learned token and position
embeddings, pre-LayerNorm blocks with fused-QKV multi-head attention and a GELU (tanh
approximation) MLP, a final LayerNorm and an output head tied to the token embedding (an untied
head is supported too, as in the "from scratch" book's ``GPTModel``).

The layers are stacked on a leading axis ``L`` and run with ``lax.scan``. Params layout::

    {"wte": [V, D], "wpe": [P, D],
     "layers": {"ln1_scale": [L, D], "ln1_bias": [L, D],
                "w_qkv": [L, D, 3D], "b_qkv": [L, 3D],      # columns: q | k | v
                "w_o": [L, D, D], "b_o": [L, D],
                "ln2_scale": [L, D], "ln2_bias": [L, D],
                "w_fc": [L, D, F], "b_fc": [L, F],           # F = mlp_dim (4D by default)
                "w_proj": [L, F, D], "b_proj": [L, D]},
     "ln_f_scale": [D], "ln_f_bias": [D],
     "lm_head": [D, V]}                                      # absent when tie_embeddings

Matrices are [in, out] (``x @ w``), which is also how GPT-2's ``Conv1D`` stores them.

Numerics: weights (and the KV cache) are float32 or bfloat16; matmuls accumulate in float32, the
residual stream, LayerNorm statistics and the attention softmax are float32, logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ._common import checked_params

__all__ = ["GPT2Config", "GPT2"]

_ACTIVATIONS = ("gelu_tanh", "gelu")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _parse_dtype(dtype):
    """jnp.float32 / jnp.bfloat16 (or numpy dtypes, or their names) -> the jnp scalar type."""
    try:
        name = dtype.strip().lower() if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or the matching jnp dtype), "
                         f"got {dtype!r}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 model (hashable; static under ``jit``)."""

    vocab_size: int = 50257
    max_seq_len: int = 1024  # n_positions: number of learned position embeddings
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    mlp_dim: int | None = None  # None -> 4 * dim
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"; "gelu" is the exact erf GELU

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def n_positions(self) -> int:
        return self.max_seq_len

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.dim

    @classmethod
    def gpt2_124m(cls, **overrides) -> "GPT2Config":
        """The 124M GPT-2 ("GPT_CONFIG_124M"): V=50257, 1024 positions, D=768, 12 layers, 12 heads."""
        return cls(**{**dict(vocab_size=50257, max_seq_len=1024, dim=768, n_layers=12, n_heads=12),
                      **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPT2Config":
        """Builds a config from a dict using this class's names, the "from scratch" book's names
        (``vocab_size, context_length, emb_dim, n_heads, n_layers``; ``drop_rate`` and
        ``qkv_bias`` are ignored: there is no dropout at inference, and a model without QKV bias
        is one whose ``b_qkv`` is zero) or Hugging Face's ``GPT2Config`` names."""
        aliases = {
            "context_length": "max_seq_len", "n_positions": "max_seq_len", "n_ctx": "max_seq_len",
            "emb_dim": "dim", "n_embd": "dim", "hidden_size": "dim",
            "n_layer": "n_layers", "num_hidden_layers": "n_layers",
            "n_head": "n_heads", "num_attention_heads": "n_heads",
            "layer_norm_epsilon": "norm_eps", "tie_word_embeddings": "tie_embeddings",
            "n_inner": "mlp_dim",
        }
        fields = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in d.items():
            name = aliases.get(k, k)
            if name in fields and name not in kw:
                kw[name] = v
        # The book's GPTModel has a separate (untied) out_head.
        if "emb_dim" in d and "tie_embeddings" not in d:
            kw["tie_embeddings"] = False
        return cls(**kw)


def _param_shapes(cfg: GPT2Config) -> dict:
    L, D, F, V, P = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.max_seq_len
    shapes = {
        "wte": (V, D), "wpe": (P, D),
        "layers": {
            "ln1_scale": (L, D), "ln1_bias": (L, D),
            "w_qkv": (L, D, 3 * D), "b_qkv": (L, 3 * D),
            "w_o": (L, D, D), "b_o": (L, D),
            "ln2_scale": (L, D), "ln2_bias": (L, D),
            "w_fc": (L, D, F), "b_fc": (L, F),
            "w_proj": (L, F, D), "b_proj": (L, D),
        },
        "ln_f_scale": (D,), "ln_f_bias": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def _layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _linear(x, w, b=None):
    """x @ w (+ b) with inputs in w's dtype and a float32 result."""
    y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y


def _attend(q, k, v, mask):
    """q: [B,T,H,hd], k/v: [B,S,H,hd], mask: bool [B,T,S] -> float32 [B,T,H*hd]."""
    B, T, H, hd = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, H * hd)


@dataclasses.dataclass(frozen=True)
class GPT2:
    """A GPT-2 language model: ``params`` are pytree leaves, ``config`` is static.

    Implements both model protocols of ``docs/CONTRACTS.md``:
    ``model(tokens[B,T]) -> logits float32[B,T,V]`` and
    ``init_cache(batch_size, max_length)`` / ``step(tokens, positions, cache)``.
    """

    params: Any
    config: GPT2Config = dataclasses.field(metadata=dict(static=True))

    # ---------------------------------------------------------------- construction
    @classmethod
    def init(cls, key, config: GPT2Config, dtype=jnp.float32) -> "GPT2":
        """Random GPT-2-style init: N(0, 0.02) matrices and embeddings, output projections scaled
        by 1/sqrt(2L), zero biases, unit LayerNorm scales."""
        dtype = _parse_dtype(dtype)
        shapes = _param_shapes(config)
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda s: isinstance(s, tuple))
        keys = jax.random.split(key, len(flat))
        leaves = []
        for (path, shape), k in zip(flat, keys):
            name = path[-1].key
            if name.endswith("_scale"):
                leaf = jnp.ones(shape, dtype)
            elif name.startswith("b_") or name.endswith("_bias"):
                leaf = jnp.zeros(shape, dtype)
            else:
                std = 0.02
                if name in ("w_o", "w_proj"):
                    std /= math.sqrt(2 * config.n_layers)
                leaf = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            leaves.append(leaf)
        return cls(jax.tree_util.tree_unflatten(treedef, leaves), config)

    @classmethod
    def from_params(cls, params, config: GPT2Config, dtype=None) -> "GPT2":
        """Wraps a params dict (NumPy or JAX arrays) after checking its keys and every shape
        against the config; ``dtype`` (if given) casts every array."""
        dtype = None if dtype is None else _parse_dtype(dtype)
        expected = _param_shapes(config)

        return cls(checked_params(expected, params, dtype, "GPT-2"), config)

    @property
    def dtype(self):
        return self.params["wte"].dtype

    def astype(self, dtype) -> "GPT2":
        dtype = _parse_dtype(dtype)
        return GPT2(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), self.params),
                    self.config)

    def num_params(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self.params)))

    # ---------------------------------------------------------------- pieces
    def _embed(self, tokens, positions):
        p = self.params
        x = jnp.take(p["wte"], tokens, axis=0, mode="clip").astype(jnp.float32)
        x = x + jnp.take(p["wpe"], positions, axis=0, mode="clip").astype(jnp.float32)
        return x

    def _head(self, x):
        p, cfg = self.params, self.config
        h = _layer_norm(x, p["ln_f_scale"], p["ln_f_bias"], cfg.norm_eps)
        if cfg.tie_embeddings:
            w = p["wte"]
            return jnp.einsum("btd,vd->btv", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return _linear(h, p["lm_head"])

    def _qkv(self, lp, x):
        cfg = self.config
        B, T, _ = x.shape
        h = _layer_norm(x, lp["ln1_scale"], lp["ln1_bias"], cfg.norm_eps)
        qkv = _linear(h, lp["w_qkv"], lp["b_qkv"]).astype(lp["w_qkv"].dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (B, T, cfg.n_heads, cfg.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _finish_block(self, lp, x, attn):
        cfg = self.config
        x = x + _linear(attn, lp["w_o"], lp["b_o"])
        h = _layer_norm(x, lp["ln2_scale"], lp["ln2_bias"], cfg.norm_eps)
        h = _linear(h, lp["w_fc"], lp["b_fc"])
        h = jax.nn.gelu(h, approximate=(cfg.activation == "gelu_tanh"))
        return x + _linear(h, lp["w_proj"], lp["b_proj"])

    # ---------------------------------------------------------------- protocols
    def __call__(self, tokens):
        """tokens int32[B, T] (T <= max_seq_len) -> logits float32[B, T, V] (causal)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds GPT-2's max_seq_len "
                             f"{self.config.max_seq_len}")
        return _forward_jit(self, tokens)

    def init_cache(self, batch_size: int, max_length: int):
        """A zeroed KV cache ``{"k", "v"}: [L, batch_size, max_length, H, hd]`` in the weights'
        dtype. ``max_length`` may not exceed ``max_seq_len`` (the learned positions)."""
        cfg = self.config
        if int(batch_size) <= 0 or int(max_length) <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got "
                             f"{batch_size!r}, {max_length!r}")
        if max_length > cfg.max_seq_len:
            raise ValueError(f"max_length {max_length} exceeds GPT-2's max_seq_len "
                             f"{cfg.max_seq_len} (number of learned positions)")
        shape = (cfg.n_layers, int(batch_size), int(max_length), cfg.n_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def step(self, tokens, positions, cache):
        """One cached forward pass.

        Writes the key/value of ``tokens[b, t]`` to cache slot ``positions[b, t]`` (positions
        outside ``[0, S)`` are dropped), then lets the query at position p attend to slots 0..p.
        Returns ``(logits float32[B, T, V], new_cache)``. The input cache is not consumed; wrap
        the call in ``jax.jit(..., donate_argnums=...)`` to update it in place.
        """
        return _step_jit(self, jnp.asarray(tokens, jnp.int32),
                         jnp.asarray(positions, jnp.int32), cache)

    # ---------------------------------------------------------------- implementation
    def _forward(self, tokens):
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        x = self._embed(tokens, positions)

        def layer(x, lp):
            q, k, v = self._qkv(lp, x)
            return self._finish_block(lp, x, _attend(q, k, v, mask)), None

        x, _ = jax.lax.scan(layer, x, self.params["layers"])
        return self._head(x)

    def _step(self, tokens, positions, cache):
        B, T = tokens.shape
        S = cache["k"].shape[2]
        mask = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]  # [B,T,S]
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        x = self._embed(tokens, positions)

        def layer(carry, xs):
            x, kc, vc = carry
            lp, i = xs
            q, k, v = self._qkv(lp, x)
            kc = kc.at[i, rows, positions].set(k.astype(kc.dtype), mode="drop")
            vc = vc.at[i, rows, positions].set(v.astype(vc.dtype), mode="drop")
            attn = _attend(q, kc[i], vc[i], mask)
            return (self._finish_block(lp, x, attn), kc, vc), None

        idx = jnp.arange(self.config.n_layers, dtype=jnp.int32)
        (x, kc, vc), _ = jax.lax.scan(layer, (x, cache["k"], cache["v"]),
                                      (self.params["layers"], idx))
        return self._head(x), {"k": kc, "v": vc}


jax.tree_util.register_dataclass(GPT2, data_fields=["params"], meta_fields=["config"])


_forward_jit = jax.jit(lambda model, tokens: model._forward(tokens))
_step_jit = jax.jit(lambda model, tokens, positions, cache: model._step(tokens, positions, cache))
