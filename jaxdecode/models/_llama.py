"""Llama-family decoder in pure JAX (Llama 2/3, SmolLM, TinyLlama, Mistral-style GQA models).

Architecture: token embedding, pre-RMSNorm blocks with grouped-query attention and rotary
position embeddings (no biases), a SwiGLU MLP, a final RMSNorm and an output head (tied to the
embedding or separate). Layers are stacked on a leading axis ``L`` and run with ``lax.scan``.

Params layout (``docs/CONTRACTS.md``)::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*hd], "wk": [L, D, KV*hd], "wv": [L, D, KV*hd],
                "wo": [L, H*hd, D], "mlp_norm": [L, D],
                "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]},
     "norm": [D],
     "lm_head": [D, V]}            # absent when config.tie_embeddings

Matrices are [in, out]. Rotary embeddings come in two layouts that differ by a fixed permutation
of the Q/K projection columns: ``"half"`` (Hugging Face checkpoints: dims i and i+hd/2 rotate
together) and ``"interleaved"`` (GGUF files: llama.cpp's converter permutes Q/K so that dims 2i
and 2i+1 rotate together).

Storage (derived layout): a concrete model keeps ``params["layers"]`` as a :class:`LayerStack`,
one buffer per layer, because XLA:CPU copies each layer's matrices out of stacked arrays inside
a compiled step (about half of the decode time). ``params["layers"]`` still reads, and flattens
as part of ``model.params``, in the stacked layout above; the model itself flattens to the
per-layer arrays (``jit`` / ``generate`` trace those) and runs the layers as a ``lax.scan`` whose matmuls switch over the per-layer buffers.
Traced or placeholder stacked params run with a ``lax.scan`` over layers.

Numerics: weights, activations between ops and the KV cache are in the weights' dtype (float32
or bfloat16); matmuls accumulate in float32; norms, attention scores and softmax are float32;
logits are float32. ``Llama.quantize("int8")`` (or ``models.load(dtype="int8")``) stores the
matrices as int8 with per-output-channel float32 scales (``QuantizedWeight``); everything else
is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._common import (ROPE_LAYOUTS, QuantizedWeight, apply_rope, attention, causal_attention, checked_params,
                      linear, matmul, parse_dtype, prefix_buckets, quantize_int8, rms_norm, rope_angles, smoothing)

__all__ = ["LlamaConfig", "Llama", "KVCache", "LayerStack", "llama_param_shapes"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (hashable; static under ``jit``).

    ``head_dim`` defaults to ``dim // n_heads`` and ``n_kv_heads`` to ``n_heads``.
    ``bos_id``/``eos_ids`` are informational (the tokenizer's special ids), not used by the math.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int = 0  # F, the SwiGLU width; 0 -> the Llama rule from dim
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_layout: str = "half"
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple = ()
    rope_freq_factors: tuple | None = None  # per-frequency divisors (GGUF rope_freqs / scaling)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.n_heads and self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                                 "give head_dim explicitly")
            set_("head_dim", self.dim // max(self.n_heads, 1))
        if not self.hidden_dim:
            f = int(2 * (4 * self.dim) / 3)
            set_("hidden_dim", 256 * ((f + 255) // 256))
        set_("eos_ids", tuple(int(e) for e in (self.eos_ids or ())))
        if self.rope_freq_factors is not None:
            set_("rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            if int(v) != v or int(v) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
            set_(name, int(v))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if (self.rope_freq_factors is not None
                and len(self.rope_freq_factors) != (self.head_dim or 0) // 2):
            raise ValueError(f"rope_freq_factors must have head_dim // 2 = {self.head_dim // 2} "
                             f"entries, got {len(self.rope_freq_factors)}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        set_("norm_eps", float(self.norm_eps))
        set_("rope_theta", float(self.rope_theta))
        set_("tie_embeddings", bool(self.tie_embeddings))


def llama_param_shapes(cfg: LlamaConfig) -> dict:
    """The params tree of ``cfg`` with shape tuples as leaves."""
    L, D, V, F = cfg.n_layers, cfg.dim, cfg.vocab_size, cfg.hidden_dim
    Hd, KVd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D), "wq": (L, D, Hd), "wk": (L, D, KVd), "wv": (L, D, KVd),
            "wo": (L, Hd, D), "mlp_norm": (L, D),
            "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
        },
        "norm": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


class LayerStack(Mapping):
    """``params["layers"]`` of a concrete :class:`Llama`: the contract's stacked layer arrays,
    stored as one buffer per layer.

    Why: inside a compiled step, reading layer i's matrices out of stacked ``[L, ...]`` arrays
    (``lax.scan``'s dynamic slices, or static slices of an unrolled loop) makes XLA:CPU copy
    every weight matrix once per layer and step, which roughly doubles the memory traffic of
    decoding. Separate buffers per layer are read in place.

    It reads as the contract layout (``docs/CONTRACTS.md``): ``stack["wq"]`` is the stacked
    ``[L, D, H*hd]`` array (built on demand: a copy), ``dict(stack)`` the stacked dict, and as a
    pytree node it flattens to the stacked arrays too, so ``jax.tree.map(f, model.params)``
    sees the contract layout (at the cost of a copy). A :class:`Llama` itself flattens to the
    per-layer arrays (``layers[i][name]``, the contract shape without the leading ``L``): that
    is what ``jit`` and ``jaxdecode.generate`` trace. Leaves that are not concrete arrays
    (tracers, placeholders) are kept stacked, and the model runs them with a ``lax.scan``.
    """

    __slots__ = ("layers", "_stacked")

    def __init__(self, layers=None, *, stacked=None):
        if (layers is None) == (stacked is None):
            raise ValueError("LayerStack takes per-layer dicts or stacked=, not both")
        if layers is not None:
            layers = tuple(dict(lp) for lp in layers)
            if not layers or any(set(lp) != set(layers[0]) for lp in layers):
                raise ValueError("LayerStack: needs >= 1 layer, every layer with the same keys")
        self.layers = layers  # tuple of per-layer dicts, or None when kept stacked
        self._stacked = None if stacked is None else dict(stacked)

    @classmethod
    def from_stacked(cls, stacked: Mapping) -> "LayerStack":
        """Splits stacked ``{name: [L, ...]}`` arrays (NumPy or JAX) into per-layer JAX arrays;
        keeps them stacked when they are not all concrete arrays with a common leading axis."""
        vals = jax.tree_util.tree_leaves(dict(stacked))
        n = {np.shape(a)[0] if _is_concrete_array(a) and np.ndim(a) >= 1 else None for a in vals}
        if len(n) != 1 or None in n or not vals:
            return cls(stacked=stacked)
        n = n.pop()
        return cls(jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), dict(stacked))
                   for i in range(n))

    def __getitem__(self, key):
        if self._stacked is not None:
            return self._stacked[key]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[lp[key] for lp in self.layers])

    def __iter__(self):
        return iter(self._stacked if self._stacked is not None else self.layers[0])

    def __len__(self):
        return len(self._stacked if self._stacked is not None else self.layers[0])

    def __repr__(self):
        if self.layers is None:
            return f"LayerStack(stacked: {sorted(self._stacked)})"
        return f"LayerStack({len(self.layers)} layers: {sorted(self.layers[0])})"


def _stack_flatten(stack):
    keys = tuple(sorted(stack))
    return [(jax.tree_util.DictKey(k), stack[k]) for k in keys], keys


def _stack_unflatten(keys, children):
    return LayerStack.from_stacked(dict(zip(keys, children)))


jax.tree_util.register_pytree_with_keys(LayerStack, _stack_flatten, _stack_unflatten)


def _is_concrete_array(a) -> bool:
    return isinstance(a, np.ndarray) or (isinstance(a, jax.Array)
                                         and not isinstance(a, jax.core.Tracer))


class KVCache(NamedTuple):
    """Per-layer keys/values ``[L, B, KV, S, hd]`` (kv-head-major, so attention reads them
    without a transpose) in the weights' dtype; slot s holds the key/value of the token at
    absolute position s."""

    k: jax.Array
    v: jax.Array


@dataclasses.dataclass(frozen=True)
class Llama:
    """A Llama-family language model: ``params`` are pytree leaves, ``config`` is static.

    Implements both model protocols of ``docs/CONTRACTS.md``:
    ``model(tokens[B,T]) -> logits float32[B,T,V]`` and
    ``init_cache(batch_size, max_length)`` / ``step(tokens, positions, cache)``.
    The methods run through module-level ``jax.jit`` functions (the model is a traced pytree
    argument), so calling them eagerly compiles once per shape; inside a caller's ``jit`` they
    simply inline.
    """

    params: Any
    config: LlamaConfig = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        # Concrete stacked layers are split into per-layer arrays (see LayerStack); traced or
        # placeholder params are kept as given (and run with a lax.scan over layers).
        p = self.params
        if isinstance(p, Mapping) and isinstance(p.get("layers"), Mapping) \
                and not isinstance(p["layers"], LayerStack):
            stack = LayerStack.from_stacked(p["layers"])
            if stack.layers is not None:
                object.__setattr__(self, "params", {**p, "layers": stack})

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, key, config: LlamaConfig, dtype=jnp.float32) -> "Llama":
        """Random init: N(0, 0.02) matrices/embedding (output projections / sqrt(2L)) and norm
        weights near 1 (randomized a little so tests exercise them)."""
        return cls(_init_params(key, config, parse_dtype(dtype)), config)

    @classmethod
    def from_params(cls, params: Mapping, config: LlamaConfig, dtype=None) -> "Llama":
        """Wraps a params dict (NumPy or JAX arrays) after checking its keys and every shape
        against ``config``; ``dtype`` (if given) casts every array."""
        dtype = None if dtype is None else parse_dtype(dtype)
        expected = llama_param_shapes(config)

        return cls(checked_params(expected, params, dtype, "Llama"), config)

    @property
    def dtype(self):
        """The compute dtype: the float weights' dtype (float32 for an int8 model)."""
        return self.params["embed"].dtype

    @property
    def weight_format(self) -> str:
        """"int8" for an int8 model (see :meth:`quantize`), else the dtype name."""
        if isinstance(self.params["embed"], QuantizedWeight):
            return "int8"
        return jnp.dtype(self.dtype).name

    def quantize(self, fmt: str = "int8", calibration=None) -> "Llama":
        """An int8 copy for int8 x int8 matmuls: every matrix (the 7 per layer, the embedding /
        tied head, a separate LM head) becomes a :class:`~jaxdecode.models._common.QuantizedWeight`
        (int8, output-major, one float32 scale per output channel; the embedding per token
        row), and each matmul quantizes its input activations to int8 per token (see
        :func:`~jaxdecode.models._common.qlinear`). Norms, attention, the KV cache and logits
        stay float32. Needs a float32 model with per-layer storage (any concrete model).

        Args:
          fmt: ``"int8"``.
          calibration: optional int32 ``[B, T]`` tokens of representative text. The float32
            model is run on them once to find each matmul input's per-channel range, and that
            range is balanced between activations and weights (SmoothQuant, alpha 0.5), which
            cuts the int8 error about in half. ``models.load(dtype="int8")`` passes a fixed
            built-in text. Without it no smoothing is applied.
        """
        if fmt != "int8":
            raise ValueError(f"quantize: only 'int8' is supported, got {fmt!r}")
        if self.weight_format != "float32":
            raise ValueError(f"quantize: needs a float32 model, got {self.weight_format}")
        layers = self.params["layers"]
        if not (isinstance(layers, LayerStack) and layers.layers is not None):
            raise ValueError("quantize: needs concrete params (per-layer storage)")
        if calibration is None:
            absmax = [dict.fromkeys(lp, None) for lp in layers.layers], None
        else:
            tokens = jnp.asarray(calibration, jnp.int32)
            if tokens.ndim != 2 or tokens.shape[1] == 0:
                raise ValueError(f"quantize: calibration must be int32 tokens [B, T], got shape "
                                 f"{tuple(tokens.shape)}")
            absmax = _calibration_absmax(self, jnp.clip(tokens, 0, self.config.vocab_size - 1))

        def q(w, a, transposed=False):
            s = None if a is None else smoothing(a, w, transposed=transposed)
            return quantize_int8(w, transposed=transposed, smooth=s)

        new_layers = LayerStack({k: (v if "norm" in k else q(v, seen[k])) for k, v in lp.items()}
                                for lp, seen in zip(layers.layers, absmax[0]))
        tied = self.config.tie_embeddings
        p = {**self.params, "layers": new_layers,
             "embed": q(self.params["embed"], absmax[1] if tied else None, transposed=True)}
        if "lm_head" in p:
            p["lm_head"] = q(p["lm_head"], absmax[1])
        return Llama(p, self.config)

    def astype(self, dtype) -> "Llama":
        if self.weight_format == "int8":
            raise ValueError("astype: an int8 model cannot be cast; load or quantize another")
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return jax.tree_util.tree_unflatten(treedef, _cast_leaves(leaves, parse_dtype(dtype)))

    def num_params(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self)))

    def __repr__(self):
        try:
            extra = f", dtype={jnp.dtype(self.dtype).name}, params={self.num_params() / 1e6:.1f}M"
        except Exception:  # params may be placeholders (tracers, None, ...)
            extra = ""
        return f"Llama(config={self.config!r}{extra})"

    # ------------------------------------------------------------------ protocols
    def __call__(self, tokens):
        """tokens int32[B, T] -> logits float32[B, T, V]; causal, positions 0..T-1."""
        return _forward_jit(self, jnp.asarray(tokens, jnp.int32))

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A zeroed ``KVCache`` with ``k, v: [L, batch_size, KV, max_length, hd]``."""
        cfg = self.config
        if int(batch_size) <= 0 or int(max_length) <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got "
                             f"{batch_size!r}, {max_length!r}")
        shape = (cfg.n_layers, int(batch_size), cfg.n_kv_heads, int(max_length), cfg.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def step(self, tokens, positions, cache: KVCache):
        """One cached forward pass.

        Writes the key/value of ``tokens[b, t]`` to cache slot ``positions[b, t]`` (positions
        outside ``[0, S)`` are dropped), then lets the query at position p attend to slots 0..p.
        Returns ``(logits float32[B, T, V], new_cache)``.

        Cost: the cache is written with one scatter per layer, and attention reads only a
        prefix of the cache covering slot ``max(positions)`` (the smallest of 128, 256, 512,
        ... , S; one compiled branch each), so short sequences in a long cache stay cheap.
        The input cache is not consumed; to update it in place, call ``step`` inside a
        ``jax.jit`` that donates the cache (``donate_argnums``), as a decoding loop does.
        """
        return _step_jit(self, jnp.asarray(tokens, jnp.int32),
                         jnp.asarray(positions, jnp.int32), cache)

    def prefill(self, tokens, cache: KVCache, last_index):
        """The prompt pass of decoding: ``step(tokens, positions=0..P-1, cache)`` for a cache
        with nothing before slot P, returning only the logits at ``last_index``.

        Args:
          tokens: int32[B, P], right-padded prompts (pad slots are written to the cache and
            never attended before they are overwritten, as with ``step``).
          cache: a ``KVCache`` from ``init_cache`` with at least P slots.
          last_index: int32[B], each row's last prompt position (``prompt_lengths - 1``).

        Returns:
          ``(logits float32[B, V], new_cache)``: equal to ``step``'s logits at ``last_index``
          (up to float rounding) and the same cache slots 0..P-1.
        """
        P, S = tokens.shape[1], cache.k.shape[3]
        if P > S:
            raise ValueError(f"Llama.prefill: the prompt has {P} tokens but the cache holds {S} slots")
        return _prefill_jit(self, jnp.asarray(tokens, jnp.int32), cache,
                            jnp.asarray(last_index, jnp.int32))

    # ------------------------------------------------------------------ implementation
    def _embed(self, tokens):
        e = self.params["embed"]
        if isinstance(e, QuantizedWeight):
            q = jnp.take(e.q, tokens, axis=0, mode="clip").astype(jnp.float32)
            return q * jnp.take(e.scale, tokens, axis=0, mode="clip")[..., None] * e.inv
        return jnp.take(e, tokens, axis=0, mode="clip")

    def _head(self, x):
        p, cfg = self.params, self.config
        h = rms_norm(x, p["norm"], cfg.norm_eps)
        if cfg.tie_embeddings:
            return matmul(h, p["embed"], transposed=True)  # [V, D]: output-major
        return matmul(h, p["lm_head"])

    def _qkv(self, lw, x, cos, sin):
        cfg = self.config
        B, T, _ = x.shape
        h = rms_norm(x, lw.vec("attn_norm"), cfg.norm_eps)
        q = lw.mm(h, "wq").reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = lw.mm(h, "wk").reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = lw.mm(h, "wv").reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        q = apply_rope(q, cos, sin, cfg.rope_layout)
        k = apply_rope(k, cos, sin, cfg.rope_layout)
        return q, k, v

    def _finish(self, lw, x, attn):
        cfg = self.config
        x = x + lw.mm(attn, "wo")
        h = rms_norm(x, lw.vec("mlp_norm"), cfg.norm_eps)
        g = lw.mm(h, "w_gate")
        u = lw.mm(h, "w_up")
        return x + lw.mm(jax.nn.silu(g) * u, "w_down")

    def _layer_loop(self, body, carry):
        """``carry = body(carry, lw, i)`` for each layer i, as one ``lax.scan`` over the layers,
        where ``lw`` gives layer i's weights (``lw.mm(h, name)``, ``lw.vec(name)``).

        Per-layer storage (LayerStack): each matmul is a ``lax.switch`` over the per-layer
        buffers, read in place. It decodes as fast as a Python loop over the layers and
        compiles in less than half the time (one layer body instead of 30). Stacked params
        (tracers, placeholders): a scan over the stacked arrays."""
        layers = self.params["layers"]
        idx = jnp.arange(self.config.n_layers, dtype=jnp.int32)
        if isinstance(layers, LayerStack) and layers.layers is not None:
            vecs = {k: jnp.stack([lp[k] for lp in layers.layers])
                    for k in layers.layers[0] if "norm" in k}
            step = lambda c, i: (body(c, _SwitchedWeights(layers.layers, i, vecs), i), None)  # noqa: E731
            return jax.lax.scan(step, carry, idx)[0]
        step = lambda c, xs: (body(c, _Weights(xs[0]), xs[1]), None)  # noqa: E731
        return jax.lax.scan(step, carry, (dict(layers), idx))[0]

    def _forward(self, tokens):
        cfg = self.config
        B, T = tokens.shape
        positions = jnp.arange(T, dtype=jnp.int32)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta,
                               cfg.rope_freq_factors)  # [T, hd/2]
        x = self._embed(tokens)

        def layer(x, lw, i):
            q, k, v = self._qkv(lw, x, cos, sin)
            return self._finish(lw, x, causal_attention(q, k, v))

        return self._head(self._layer_loop(layer, x))

    def _prefill(self, tokens, cache, last):
        """``step`` at positions ``0..P-1`` of a fresh cache, with logits only at ``last``.

        Knowing that the positions start at 0 lets the prompt attend to its own keys (causal,
        in blocks that skip the upper triangle) instead of the whole cache, write the cache with
        one contiguous update per layer instead of a scatter, and run the LM head on one
        position per row instead of all P (a fifth of a 1024-token prefill's FLOPs)."""
        cfg = self.config
        B, P = tokens.shape
        cos, sin = rope_angles(jnp.arange(P, dtype=jnp.int32), cfg.head_dim, cfg.rope_theta,
                               cfg.rope_freq_factors)  # [P, hd/2]
        x = self._embed(tokens)

        def write(c, i, new):  # new: [B, P, KV, hd] -> slots 0..P-1 of layer i
            upd = new.astype(c.dtype).transpose(0, 2, 1, 3)[None]
            return jax.lax.dynamic_update_slice(c, upd, (i, 0, 0, 0, 0))

        def layer(carry, lw, i):
            x, kc, vc = carry
            q, k, v = self._qkv(lw, x, cos, sin)
            kc, vc = write(kc, i, k), write(vc, i, v)
            return self._finish(lw, x, causal_attention(q, k, v)), kc, vc

        x, kc, vc = self._layer_loop(layer, (x, *cache))
        h = jnp.take_along_axis(x, jnp.asarray(last, jnp.int32)[:, None, None], axis=1)  # [B, 1, D]
        return self._head(h)[:, 0], KVCache(kc, vc)

    def _step(self, tokens, positions, cache):
        x, cache = self._step_hidden(tokens, positions, cache)
        return self._head(x), cache

    def _step_hidden(self, tokens, positions, cache):
        """The layer stack of ``step``: (hidden states [B, T, D] before the final norm, cache)."""
        cfg = self.config
        B, T = tokens.shape
        ck, cv = cache
        L, _, KV, S, hd = ck.shape
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta,
                               cfg.rope_freq_factors)  # [B, T, hd/2]
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        x = self._embed(tokens)

        # Attention reads only a prefix of the cache that covers every slot any query may see:
        # the smallest of a few static lengths >= max(positions) + 1 (one compiled branch each).
        sizes = prefix_buckets(S)
        need = jnp.max(positions) + 1
        bucket = jnp.minimum(jnp.sum(jnp.asarray(sizes, jnp.int32) < need), len(sizes) - 1)

        def attend_prefix(size):
            def f(q, kc, vc, i):
                kb = jax.lax.dynamic_slice(kc, (i, 0, 0, 0, 0), (1, B, KV, size, hd))[0]
                vb = jax.lax.dynamic_slice(vc, (i, 0, 0, 0, 0), (1, B, KV, size, hd))[0]
                mask = jnp.arange(size, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]
                return attention(q, kb, vb, mask)
            return f

        branches = [attend_prefix(size) for size in sizes]

        if T == 1:
            # Decoding: one slot per row. A scatter with mode="drop" becomes, in XLA, a
            # select over the whole cache (a full read + write of the layer's cache every step);
            # instead write in-bounds slots only: an out-of-range position rewrites the slot it
            # is clamped to with that slot's own value (one write per row, so no conflicts).
            inb = (positions >= 0) & (positions < S)  # [B, 1]
            slot = jnp.clip(positions, 0, S - 1)

            def write(c, i, new):  # new: [B, 1, KV, hd]
                old = c[i, rows, :, slot]  # [B, 1, KV, hd]
                new = jnp.where(inb[:, :, None, None], new.astype(c.dtype), old)
                if B == 1:  # XLA would turn a 1-row scatter into a select over the cache
                    upd = new.transpose(0, 2, 1, 3)[None]  # [1, 1, KV, 1, hd]
                    return jax.lax.dynamic_update_slice(c, upd, (i, 0, 0, slot[0, 0], 0))
                return c.at[i, rows, :, slot].set(new, mode="promise_in_bounds")
        else:
            def write(c, i, new):
                return c.at[i, rows, :, positions].set(new.astype(c.dtype), mode="drop")

        def layer(carry, lw, i):
            x, kc, vc = carry
            q, k, v = self._qkv(lw, x, cos, sin)
            kc = write(kc, i, k)
            vc = write(vc, i, v)
            if len(branches) == 1:
                attn = branches[0](q, kc, vc, i)
            else:
                attn = jax.lax.switch(bucket, branches, q, kc, vc, i)
            return self._finish(lw, x, attn), kc, vc

        x, kc, vc = self._layer_loop(layer, (x, ck, cv))
        return x, KVCache(kc, vc)


class _Weights:
    """One layer's weights from a dict of arrays (static layer, or a scan slice)."""

    def __init__(self, lp):
        self.lp = lp

    def mm(self, h, name):
        return linear(h, self.lp[name])

    def vec(self, name):
        return self.lp[name]


class _RecordingWeights(_Weights):
    """Layer weights that note each matmul input's per-channel ``max |x|`` (for calibration)."""

    def __init__(self, lp):
        super().__init__(lp)
        self.seen = dict.fromkeys(lp, None)

    def mm(self, h, name):
        self.seen[name] = jnp.max(jnp.abs(h.astype(jnp.float32)).reshape(-1, h.shape[-1]), axis=0)
        return super().mm(h, name)


@jax.jit
def _calibration_absmax(model: "Llama", tokens):
    """Per layer ``{matrix name: max |input| per channel}`` and the LM head input's, from the
    float32 forward pass over ``tokens``."""
    cfg, p = model.config, model.params
    cos, sin = rope_angles(jnp.arange(tokens.shape[1], dtype=jnp.int32), cfg.head_dim,
                           cfg.rope_theta, cfg.rope_freq_factors)
    x, seen = model._embed(tokens), []
    for lp in p["layers"].layers:
        lw = _RecordingWeights(lp)
        q, k, v = model._qkv(lw, x, cos, sin)
        x = model._finish(lw, x, causal_attention(q, k, v))
        seen.append(lw.seen)
    h = rms_norm(x, p["norm"], cfg.norm_eps).astype(jnp.float32)
    return seen, jnp.max(jnp.abs(h).reshape(-1, h.shape[-1]), axis=0)


class _SwitchedWeights:
    """Layer ``i`` (traced) of per-layer buffers: each matmul is a ``lax.switch`` over the
    layers whose branch j multiplies by layer j's buffer, read in place (a dynamic slice of a
    stacked array would be copied)."""

    def __init__(self, layers, i, vecs):
        self.layers, self.i, self.vecs = layers, i, vecs

    def mm(self, h, name):
        ws = tuple(lp[name] for lp in self.layers)
        branches = [lambda h, ws, j=j: linear(h, ws[j]) for j in range(len(ws))]
        return jax.lax.switch(self.i, branches, h, ws)

    def vec(self, name):
        return self.vecs[name][self.i]


def _llama_flatten(model):
    p = model.params
    unstacked = isinstance(p, Mapping) and isinstance(p.get("layers"), LayerStack) \
        and p["layers"].layers is not None
    if unstacked:
        p = {**p, "layers": p["layers"].layers}  # a tuple of per-layer dicts
    return ((jax.tree_util.GetAttrKey("params"), p),), (model.config, unstacked)


def _llama_unflatten(aux, children):
    config, unstacked = aux
    (p,) = children
    if unstacked:  # per-layer leaves (arrays, tracers or placeholders) stay per layer
        p = {**p, "layers": LayerStack(p["layers"])}
    obj = object.__new__(Llama)  # no __post_init__: leaves may be tracers or placeholders
    object.__setattr__(obj, "params", p)
    object.__setattr__(obj, "config", config)
    return obj


jax.tree_util.register_pytree_with_keys(Llama, _llama_flatten, _llama_unflatten)


@functools.partial(jax.jit, static_argnums=(1,))
def _cast_leaves(leaves, dtype):
    return [a.astype(dtype) for a in leaves]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_params(key, config: LlamaConfig, dtype):
    shapes = llama_param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))
    sizes = [math.prod(shape) for _, shape in flat]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one draw: threefry compiles slowly
    leaves, start = [], 0
    for (path, shape), n in zip(flat, sizes):
        name = path[-1].key
        piece = z[start:start + n].reshape(shape)
        start += n
        if "norm" in name:
            leaf = 1.0 + 0.1 * piece
        else:
            std = 0.02 / (math.sqrt(2 * config.n_layers) if name in ("wo", "w_down") else 1.0)
            leaf = std * piece
        leaves.append(leaf.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)

_forward_jit = jax.jit(lambda model, tokens: model._forward(tokens))
_prefill_jit = jax.jit(lambda model, tokens, cache, last: model._prefill(tokens, cache, last))
_step_jit = jax.jit(lambda model, tokens, positions, cache: model._step(tokens, positions, cache))
