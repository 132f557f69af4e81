"""One decoder-only transformer, configured per family: Llama, Mistral, Qwen2/Qwen3, Phi-3,
Gemma 3 and GPT-2 are the same block with different switches (:class:`DecoderConfig`).

A layer, top to bottom (:meth:`Decoder._block`)::

    h = norm(x)                                  # RMSNorm w, Gemma's RMSNorm (1 + w), or LayerNorm + bias
    q, k, v = split(h @ wqkv + bqkv)             # or three matrices; biases optional (Qwen2, GPT-2)
    q, k = qk_norm(q), qk_norm(k)                # per head (Qwen3, Gemma 3)
    q, k = rope(q), rope(k)                      # per-layer base (Gemma 3 local/global); none for GPT-2
    a = attention(q, k, v)                       # causal; sliding window on local layers; soft-cap
    x = x + post_attn_norm(a @ wo + bo)          # post-norm: Gemma 3
    h = norm(x)
    m = act(h @ w_gate) * (h @ w_up)             # gated (SwiGLU / GeGLU) or act(h @ w_up + b_up)
    x = x + post_mlp_norm(m @ w_down + b_down)

then the final norm, the head (tied or not) and an optional final logit soft-cap. The token
embedding may be scaled (Gemma: ``sqrt(dim)``) and GPT-2 adds learned position embeddings.

Params layout: ``{"embed": [V, D], "layers": {name: [L, ...]}, "norm": [D], ...}`` with the
names of :func:`param_shapes` (matrices ``[in, out]``); which names exist follows the config.

Storage: a concrete model keeps ``params["layers"]`` as a :class:`LayerStack`, one buffer per
layer, because XLA:CPU copies each layer's matrices out of stacked arrays inside a compiled step
(about half of the decode time); the layers run as one ``lax.scan`` whose matmuls switch over
the per-layer buffers. Traced or placeholder stacked params run with a scan over the stack.
These XLA:CPU lessons (per-layer buffers, in-place cache writes, attention over the filled
prefix of the cache) live here once, for every family.

Numerics: weights, activations between ops and the KV cache are in the weights' dtype (float32
or bfloat16); matmuls accumulate in float32; norms, attention scores and softmax are float32;
logits are float32. ``Decoder.quantize("int8")`` stores the matrices as int8 (see
:class:`~jaxdecode.models._common.QuantizedWeight`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _cpu_kernel
from ._common import (ROPE_LAYOUTS, QuantizedWeight, apply_rope, attention, causal_attention, checked_params,
                      linear, matmul, norm, parse_dtype, prefix_buckets, quantize_int8, rope_angles, smoothing)

__all__ = ["DecoderConfig", "Decoder", "KVCache", "LayerStack", "param_shapes"]

NORMS = ("rms", "rms_plus_one", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
LAYER_TYPES = ("full", "sliding")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters and family switches of a decoder (frozen, hashable: static under ``jit``).

    Shape: ``vocab_size``, ``dim`` (D), ``n_layers`` (L), ``n_heads`` (H), ``n_kv_heads``
    (default H), ``head_dim`` (default D / H), ``hidden_dim`` (F, the MLP width; 0 -> the Llama
    rule from D), ``max_seq_len``.

    Switches (defaults are Llama's):
      norm: ``"rms"`` (``x * w``), ``"rms_plus_one"`` (Gemma: ``x * (1 + w)``) or ``"layer"``
        (LayerNorm with bias, GPT-2). Also used for the q/k norms.
      norm_eps: the norms' epsilon.
      qkv_bias: biases on q, k, v (Qwen2, GPT-2).
      out_bias / mlp_bias: biases on the attention output / MLP matrices (GPT-2).
      qk_norm: a norm over ``head_dim`` on each query and key head (Qwen3, Gemma 3).
      post_norms: norms on the attention and MLP outputs before the residual add (Gemma 3).
      gated_mlp: ``act(h @ w_gate) * (h @ w_up)`` (SwiGLU / GeGLU); False: ``act(h @ w_up)``.
      activation: ``"silu"``, ``"gelu_tanh"`` (Gemma, GPT-2's gelu_new) or ``"gelu"`` (erf).
      fused_qkv / fused_gate_up: store q|k|v as one ``wqkv`` and gate|up as one ``w_gate_up``
        (Phi-3's checkpoints, GPT-2's c_attn); one matmul instead of three / two.
      embed_scale: multiply the token embedding by this (Gemma: ``sqrt(dim)``); None is 1.
      attn_scale: the attention score scale; None is ``1 / sqrt(head_dim)`` (Gemma 3:
        ``query_pre_attn_scalar ** -0.5``).
      positions: ``"rope"`` or ``"learned"`` (GPT-2: a ``pos_embed`` table of max_seq_len rows).
      rope_theta, rope_layout (``"half"``: Hugging Face's rotate-half; ``"interleaved"``: GGUF's
        permuted Llama Q/K), rope_freq_factors (per-frequency divisors, GGUF rope_freqs / linear
        scaling), rope_local_theta (the base of sliding layers; Gemma 3 uses 10,000 there and
        1,000,000 on global layers; None is rope_theta).
      attn_softcap / final_softcap: ``c * tanh(x / c)`` on attention scores / logits (Gemma 2).
      sliding_window: W; a query at position p sees keys ``p - W < s <= p`` on sliding layers.
      layer_types: ``"full"`` / ``"sliding"`` per layer; None is all full, or all sliding when
        ``sliding_window`` is set (Mistral). Gemma 3: five sliding then one full.
      tie_embeddings: the head is the embedding's transpose.
      bos_id / eos_ids: the tokenizer's special ids (informational; ``eos_ids`` is the default
        stop set of :func:`jaxdecode.generate`).
      family: the family's name (informational, e.g. in ``repr``).

    Example:
      >>> from jaxdecode.models import DecoderConfig
      >>> cfg = DecoderConfig(vocab_size=32, dim=16, n_layers=6, n_heads=2, norm="rms_plus_one",
      ...                     qk_norm=True, post_norms=True, sliding_window=4,
      ...                     layer_types=("sliding",) * 5 + ("full",))
      >>> cfg.head_dim, cfg.is_sliding
      (8, (True, True, True, True, True, False))
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_layout: str = "half"
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple = ()
    rope_freq_factors: tuple | None = None
    norm: str = "rms"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    gated_mlp: bool = True
    activation: str = "silu"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    positions: str = "rope"
    rope_local_theta: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple | None = None
    family: str = "llama"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        where = "DecoderConfig"
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.n_heads and self.dim % self.n_heads:
                raise ValueError(f"{where}: dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                                 "give head_dim explicitly")
            set_("head_dim", self.dim // max(self.n_heads, 1))
        if not self.hidden_dim:
            f = int(2 * (4 * self.dim) / 3) if self.gated_mlp else 4 * self.dim
            set_("hidden_dim", 256 * ((f + 255) // 256) if self.gated_mlp else f)
        set_("eos_ids", tuple(int(e) for e in (self.eos_ids or ())))
        if self.rope_freq_factors is not None:
            set_("rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) <= 0:
                raise ValueError(f"{where}.{name} must be a positive integer, got {v!r}")
            set_(name, int(v))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{where}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("rope_layout", ROPE_LAYOUTS),
                              ("positions", ("rope", "learned"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{where}.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"{where}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if (self.rope_freq_factors is not None
                and len(self.rope_freq_factors) != self.head_dim // 2):
            raise ValueError(f"{where}: rope_freq_factors must have head_dim // 2 = {self.head_dim // 2} "
                             f"entries, got {len(self.rope_freq_factors)}")
        if self.sliding_window is not None:
            if isinstance(self.sliding_window, bool) or int(self.sliding_window) <= 0:
                raise ValueError(f"{where}.sliding_window must be a positive integer or None, "
                                 f"got {self.sliding_window!r}")
            set_("sliding_window", int(self.sliding_window))
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.n_layers or any(t not in LAYER_TYPES for t in types):
                raise ValueError(f"{where}.layer_types must list {LAYER_TYPES} for each of the "
                                 f"{self.n_layers} layers, got {self.layer_types!r}")
            if "sliding" in types and self.sliding_window is None:
                raise ValueError(f"{where}: layer_types has sliding layers but sliding_window is None")
            set_("layer_types", types)
        for name in ("embed_scale", "attn_scale", "rope_local_theta", "attn_softcap", "final_softcap"):
            v = getattr(self, name)
            if v is not None:
                if not (float(v) > 0 and math.isfinite(float(v))):
                    raise ValueError(f"{where}.{name} must be a positive number or None, got {v!r}")
                set_(name, float(v))
        set_("norm_eps", float(self.norm_eps))
        set_("rope_theta", float(self.rope_theta))
        for name in ("tie_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm", "post_norms",
                     "gated_mlp", "fused_qkv", "fused_gate_up"):
            set_(name, bool(getattr(self, name)))

    @property
    def is_sliding(self) -> tuple:
        """Per layer: whether it uses the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        if self.layer_types is None:
            return (True,) * self.n_layers
        return tuple(t == "sliding" for t in self.layer_types)


def param_shapes(cfg: DecoderConfig) -> dict:
    """The params tree of ``cfg`` with shape tuples as leaves (only the names ``cfg`` uses)."""
    L, D, V, F, hd = cfg.n_layers, cfg.dim, cfg.vocab_size, cfg.hidden_dim, cfg.head_dim
    Hd, KVd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    layers: dict[str, tuple] = {"attn_norm": (L, D)}
    if cfg.fused_qkv:
        layers["wqkv"] = (L, D, Hd + 2 * KVd)
        if cfg.qkv_bias:
            layers["bqkv"] = (L, Hd + 2 * KVd)
    else:
        layers.update(wq=(L, D, Hd), wk=(L, D, KVd), wv=(L, D, KVd))
        if cfg.qkv_bias:
            layers.update(bq=(L, Hd), bk=(L, KVd), bv=(L, KVd))
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    layers["wo"] = (L, Hd, D)
    if cfg.out_bias:
        layers["bo"] = (L, D)
    layers["mlp_norm"] = (L, D)
    if cfg.gated_mlp and cfg.fused_gate_up:
        layers["w_gate_up"] = (L, D, 2 * F)
    elif cfg.gated_mlp:
        layers.update(w_gate=(L, D, F), w_up=(L, D, F))
    else:
        layers["w_up"] = (L, D, F)
    if cfg.mlp_bias:
        layers["b_up"] = (L, F)
    layers["w_down"] = (L, F, D)
    if cfg.mlp_bias:
        layers["b_down"] = (L, D)
    if cfg.post_norms:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    if cfg.norm == "layer":  # LayerNorm biases next to each norm weight
        for k in [k for k in layers if k.endswith("norm") and k not in ("q_norm", "k_norm")]:
            layers[k + "_bias"] = layers[k]
    shapes: dict[str, Any] = {"embed": (V, D)}
    if cfg.positions == "learned":
        shapes["pos_embed"] = (cfg.max_seq_len, D)
    shapes["layers"] = layers
    shapes["norm"] = (D,)
    if cfg.norm == "layer":
        shapes["norm_bias"] = (D,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


class LayerStack(Mapping):
    """``params["layers"]`` of a concrete :class:`Decoder`: the contract's stacked layer arrays,
    stored as one buffer per layer.

    Why: inside a compiled step, reading layer i's matrices out of stacked ``[L, ...]`` arrays
    (``lax.scan``'s dynamic slices, or static slices of an unrolled loop) makes XLA:CPU copy
    every weight matrix once per layer and step, which roughly doubles the memory traffic of
    decoding. Separate buffers per layer are read in place.

    It reads as the contract layout (``docs/CONTRACTS.md``): ``stack["wq"]`` is the stacked
    ``[L, D, H*hd]`` array (built on demand: a copy), ``dict(stack)`` the stacked dict, and as a
    pytree node it flattens to the stacked arrays too, so ``jax.tree.map(f, model.params)``
    sees the contract layout (at the cost of a copy). A :class:`Decoder` itself flattens to the
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


def _is_vector(a) -> bool:
    """Norm weights and biases (1-D per layer) are read directly; matrices go through matmul."""
    return not isinstance(a, QuantizedWeight) and np.ndim(a) == 1


class KVCache(NamedTuple):
    """Per-layer keys/values ``[L, B, KV, S, hd]`` (kv-head-major, so attention reads them
    without a transpose) in the weights' dtype; slot s holds the key/value of the token at
    absolute position s."""

    k: jax.Array
    v: jax.Array


class _Rope(NamedTuple):
    """cos/sin of the global layers and of the sliding layers (the same arrays when one base)."""

    cos: Any
    sin: Any
    cos_local: Any
    sin_local: Any


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A decoder-only language model: ``params`` are pytree leaves, ``config`` is static.

    Implements both model protocols of ``docs/CONTRACTS.md``:
    ``model(tokens[B,T]) -> logits float32[B,T,V]`` and
    ``init_cache(batch_size, max_length)`` / ``step(tokens, positions, cache)``, plus the
    optional ``prefill``. The methods run through module-level ``jax.jit`` functions (the model
    is a traced pytree argument), so calling them eagerly compiles once per shape; inside a
    caller's ``jit`` they simply inline.

    Example:
      >>> import jax
      >>> from jaxdecode.models import Decoder, DecoderConfig
      >>> m = Decoder.init(jax.random.key(0), DecoderConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2))
      >>> m(jax.numpy.zeros((1, 3), jax.numpy.int32)).shape
      (1, 3, 32)
    """

    params: Any
    config: DecoderConfig = dataclasses.field(metadata=dict(static=True))

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
    def init(cls, key, config: DecoderConfig, dtype=jnp.float32) -> "Decoder":
        """Random init: N(0, 0.02) matrices/embedding (output projections / sqrt(2L)), small
        random biases and norm weights near their identity (randomized a little so tests
        exercise them)."""
        return cls(_init_params(key, config, parse_dtype(dtype)), config)

    @classmethod
    def from_params(cls, params: Mapping, config: DecoderConfig, dtype=None) -> "Decoder":
        """Wraps a params dict (NumPy or JAX arrays) after checking its keys and every shape
        against ``config`` (:func:`param_shapes`); ``dtype`` (if given) casts every array."""
        dtype = None if dtype is None else parse_dtype(dtype)
        return cls(checked_params(param_shapes(config), params, dtype, "Decoder"), config)

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

    def quantize(self, fmt: str = "int8", calibration=None, keep_channels: int = 16) -> "Decoder":
        """An int8 copy for int8 x int8 matmuls: every matrix (those of each layer, the
        embedding / tied head, a separate LM head) becomes a
        :class:`~jaxdecode.models._common.QuantizedWeight` (int8, output-major, one float32
        scale per output channel; the embedding per token row), and each matmul quantizes its
        input activations per token in two int8 parts (see
        :func:`~jaxdecode.models._common.qlinear`). Norms, biases, position tables, attention,
        the KV cache and logits stay float32. Needs a float32 model with per-layer storage (any
        concrete model).

        Args:
          fmt: ``"int8"``.
          calibration: optional int32 ``[B, T]`` tokens of representative text. The float32
            model is run on them once to find each matmul input's per-channel range, and that
            range is balanced between activations and weights (SmoothQuant, alpha 0.5).
            Without it no smoothing is applied (``models.load(dtype="int8")`` passes none).
          keep_channels: with calibration, each layer matrix keeps the inputs of its
            ``keep_channels`` largest calibration channels in float32 (their rows of the
            weight as a float32 ``[k, out]`` side matrix; LLM.int8()'s outlier split), so
            they no longer set the int8 scale of every other channel. 0 turns it off.

        Both options were needed when activations had one int8 code per element (perplexity
        gap to float32 on SmolLM2-135M and The Tempest: +1.58% with smoothing, +0.85-1.04%
        with both). With the two-part activation codes the gap is +0.37% with neither and
        +0.30% with both (smoothing alone: +0.91%, as it moves range into the weights), and
        the side matrices cost about 15% of the batch-1 decode speed.
        """
        if fmt != "int8":
            raise ValueError(f"quantize: only 'int8' is supported, got {fmt!r}")
        if isinstance(keep_channels, bool) or not isinstance(keep_channels, (int, np.integer)) or keep_channels < 0:
            raise ValueError(f"quantize: keep_channels must be an int >= 0 (0: off), got {keep_channels!r}")
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
            keep = None
            if a is not None and keep_channels and not transposed:  # (not the tied head)
                keep = jnp.argsort(-jnp.asarray(a))[:min(int(keep_channels), a.shape[0])]
            return quantize_int8(w, transposed=transposed, smooth=s, keep=keep)

        new_layers = LayerStack({k: (v if _is_vector(v) else q(v, seen[k])) for k, v in lp.items()}
                                for lp, seen in zip(layers.layers, absmax[0]))
        tied = self.config.tie_embeddings
        p = {**self.params, "layers": new_layers,
             "embed": q(self.params["embed"], absmax[1] if tied else None, transposed=True)}
        if "lm_head" in p:
            p["lm_head"] = q(p["lm_head"], absmax[1])
        return type(self)(p, self.config)

    def fuse(self) -> "Decoder":
        """A copy with q|k|v stored as one ``wqkv`` matrix and gate|up as one ``w_gate_up``
        (``fused_qkv`` / ``fused_gate_up`` set in the config): the same function, one matmul
        instead of three and two. On XLA:CPU a matvec reads a wide matrix closer to the
        memory bandwidth than several narrow ones, so decoding gets faster
        (``models.load`` fuses its float models). Needs per-layer float params.

        Example:
          >>> import jax, jaxdecode.models as m
          >>> cfg = m.DecoderConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, max_seq_len=8)
          >>> model = m.Decoder.init(jax.random.key(0), cfg)
          >>> sorted(model.fuse().params["layers"].layers[0])
          ['attn_norm', 'mlp_norm', 'w_down', 'w_gate_up', 'wo', 'wqkv']
        """
        cfg = self.config
        layers = self.params["layers"]
        if self.weight_format == "int8":
            raise ValueError("fuse: fuse the float model, then quantize it")
        if not (isinstance(layers, LayerStack) and layers.layers is not None):
            raise ValueError("fuse: needs concrete params (per-layer storage)")
        # (a gated MLP with a bias on up only stays unfused: the fused matrix has no bias)
        fuse_qkv, fuse_gu = not cfg.fused_qkv, cfg.gated_mlp and not cfg.fused_gate_up and not cfg.mlp_bias
        if not (fuse_qkv or fuse_gu):
            return self

        def one(lp):
            lp = dict(lp)
            cat = lambda names: jnp.concatenate([lp.pop(n) for n in names], axis=-1)  # noqa: E731
            if fuse_qkv:
                lp["wqkv"] = cat(("wq", "wk", "wv"))
                if cfg.qkv_bias:
                    lp["bqkv"] = cat(("bq", "bk", "bv"))
            if fuse_gu:
                lp["w_gate_up"] = cat(("w_gate", "w_up"))
            return lp

        new_cfg = dataclasses.replace(cfg, fused_qkv=True, fused_gate_up=cfg.fused_gate_up or fuse_gu)
        return type(self)({**self.params, "layers": LayerStack(one(lp) for lp in layers.layers)}, new_cfg)

    def astype(self, dtype) -> "Decoder":
        """A copy with every array cast to ``dtype`` (float32 / bfloat16)."""
        if self.weight_format == "int8":
            raise ValueError("astype: an int8 model cannot be cast; load or quantize another")
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return jax.tree_util.tree_unflatten(treedef, _cast_leaves(leaves, parse_dtype(dtype)))

    def num_params(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self)))

    def __repr__(self):
        try:
            extra = f", dtype={self.weight_format}, params={self.num_params() / 1e6:.1f}M"
        except Exception:  # params may be placeholders (tracers, None, ...)
            extra = ""
        return f"Decoder(family={self.config.family!r}, config={self.config!r}{extra})"

    # ------------------------------------------------------------------ protocols
    def __call__(self, tokens):
        """tokens int32[B, T] -> logits float32[B, T, V]; causal, positions 0..T-1."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if self.config.positions == "learned" and tokens.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"Decoder: {tokens.shape[-1]} tokens exceed the model's max_seq_len "
                             f"({self.config.max_seq_len} learned positions)")
        return _forward_jit(self, tokens)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A zeroed ``KVCache`` with ``k, v: [L, batch_size, KV, max_length, hd]``."""
        cfg = self.config
        if int(batch_size) <= 0 or int(max_length) <= 0:
            raise ValueError(f"init_cache: batch_size and max_length must be positive, got "
                             f"{batch_size!r}, {max_length!r}")
        if cfg.positions == "learned" and int(max_length) > cfg.max_seq_len:
            raise ValueError(f"init_cache: max_length {max_length} exceeds the model's "
                             f"max_seq_len ({cfg.max_seq_len} learned positions)")
        shape = (cfg.n_layers, int(batch_size), cfg.n_kv_heads, int(max_length), cfg.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def step(self, tokens, positions, cache: KVCache):
        """One cached forward pass.

        Writes the key/value of ``tokens[b, t]`` to cache slot ``positions[b, t]`` (positions
        outside ``[0, S)`` are dropped), then lets the query at position p attend to slots 0..p
        (``p - W < s <= p`` on sliding-window layers). Returns ``(logits float32[B, T, V],
        new_cache)``.

        Cost: the cache is written with one scatter per layer, and attention reads only a
        prefix of the cache covering slot ``max(positions)`` (the smallest of 128, 256, 512,
        ... , S; one compiled branch each); a sliding layer decoding one token past its window
        reads a window-sized slice instead, so its cost stays flat. The input cache is not
        consumed; to update it in place, call ``step`` inside a ``jax.jit`` that donates the
        cache (``donate_argnums``), as a decoding loop does.
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
            raise ValueError(f"Decoder.prefill: the prompt has {P} tokens but the cache holds {S} slots")
        return _prefill_jit(self, jnp.asarray(tokens, jnp.int32), cache,
                            jnp.asarray(last_index, jnp.int32))

    # ------------------------------------------------------------------ the block
    def _block(self, lw, x, rope, i, attend):
        """One layer (see the module docstring). ``attend(q, k, v, window) -> (out, aux)`` does
        the attention (and any cache write); returns ``(x, aux)``."""
        cfg = self.config
        B, T, _ = x.shape
        h = self._norm(lw, x, "attn_norm")
        if cfg.fused_qkv:
            q, k, v = jnp.split(lw.affine(h, "wqkv", "bqkv"), self._qkv_splits, axis=-1)
        else:
            q, k, v = lw.affine(h, "wq", "bq"), lw.affine(h, "wk", "bk"), lw.affine(h, "wv", "bv")
        q = q.reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self._norm(lw, q, "q_norm"), self._norm(lw, k, "k_norm")
        sliding = jnp.asarray(cfg.is_sliding)[i]
        if cfg.positions == "rope":
            cos = jnp.where(sliding, rope.cos_local, rope.cos)
            sin = jnp.where(sliding, rope.sin_local, rope.sin)
            q, k = apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout)
        window = jnp.where(sliding, cfg.sliding_window or 0, 0)  # 0: no window
        a, aux = attend(q, k, v, window)
        x = x + self._norm(lw, lw.affine(a, "wo", "bo"), "post_attn_norm", optional=True)
        h = self._norm(lw, x, "mlp_norm")
        if cfg.gated_mlp:
            if cfg.fused_gate_up:
                g, u = jnp.split(lw.affine(h, "w_gate_up", None), 2, axis=-1)
            else:
                g, u = lw.affine(h, "w_gate", None), lw.affine(h, "w_up", "b_up")
            m = self._act(g) * u
        else:
            m = self._act(lw.affine(h, "w_up", "b_up"))
        x = x + self._norm(lw, lw.affine(m, "w_down", "b_down"), "post_mlp_norm", optional=True)
        return x, aux

    @property
    def _qkv_splits(self):
        hd, cfg = self.config.head_dim, self.config
        return (cfg.n_heads * hd, (cfg.n_heads + cfg.n_kv_heads) * hd)

    def _norm(self, lw, x, name, optional=False):
        if optional and not lw.has(name):
            return x
        bias = lw.vec(name + "_bias") if lw.has(name + "_bias") else None
        return norm(x, lw.vec(name), bias, self.config.norm, self.config.norm_eps)

    def _act(self, x):
        a = self.config.activation
        y = x.astype(jnp.float32)
        y = jax.nn.silu(y) if a == "silu" else jax.nn.gelu(y, approximate=(a == "gelu_tanh"))
        return y.astype(x.dtype)

    def _attn_kw(self):
        cfg = self.config
        return dict(scale=cfg.attn_scale, softcap=cfg.attn_softcap)

    def _rope(self, positions) -> _Rope | None:
        cfg = self.config
        if cfg.positions != "rope":
            return None
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_freq_factors)
        if cfg.rope_local_theta is None or cfg.rope_local_theta == cfg.rope_theta:
            return _Rope(cos, sin, cos, sin)
        # Gemma 3: global layers' frequency factors (linear scaling) do not apply to local ones.
        cl, sl = rope_angles(positions, cfg.head_dim, cfg.rope_local_theta, None)
        return _Rope(cos, sin, cl, sl)

    def _embed(self, tokens, positions):
        cfg, p = self.config, self.params
        e = p["embed"]
        if isinstance(e, QuantizedWeight):
            q = jnp.take(e.q, tokens, axis=0, mode="clip").astype(jnp.float32)
            x = q * jnp.take(e.scale, tokens, axis=0, mode="clip")[..., None] * e.inv
        else:
            x = jnp.take(e, tokens, axis=0, mode="clip")
        if cfg.embed_scale is not None:  # Gemma scales in the activation dtype, as HF does
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if cfg.positions == "learned":
            x = x + jnp.take(p["pos_embed"], positions, axis=0, mode="clip").astype(x.dtype)
        return x

    def _head(self, x):
        p, cfg = self.params, self.config
        h = norm(x, p["norm"], p.get("norm_bias"), cfg.norm, cfg.norm_eps)
        if cfg.tie_embeddings:
            logits = matmul(h, p["embed"], transposed=True)  # [V, D]: output-major
        else:
            logits = matmul(h, p["lm_head"])
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return logits

    def _layer_loop(self, body, carry):
        """``carry = body(carry, lw, i)`` for each layer i, as one ``lax.scan`` over the layers,
        where ``lw`` gives layer i's weights (``lw.affine(h, w, b)``, ``lw.vec(name)``).

        Per-layer storage (LayerStack): each matmul is a ``lax.switch`` over the per-layer
        buffers, read in place. It decodes as fast as a Python loop over the layers and
        compiles in less than half the time (one layer body instead of 30). Stacked params
        (tracers, placeholders): a scan over the stacked arrays."""
        return self._layer_scan(lambda c, lw, i: (body(c, lw, i), None), carry)[0]

    def _layer_scan(self, body, carry):
        """As :meth:`_layer_loop` for ``(carry, y) = body(carry, lw, i)``: returns ``(carry,
        ys)`` with the ys stacked over the layers."""
        layers = self.params["layers"]
        idx = jnp.arange(self.config.n_layers, dtype=jnp.int32)
        if isinstance(layers, LayerStack) and layers.layers is not None:
            vecs = {k: jnp.stack([lp[k] for lp in layers.layers])
                    for k, v in layers.layers[0].items() if _is_vector(v)}
            step = lambda c, i: body(c, _SwitchedWeights(layers.layers, i, vecs), i)  # noqa: E731
            return jax.lax.scan(step, carry, idx)
        step = lambda c, xs: body(c, _Weights(xs[0]), xs[1])  # noqa: E731
        return jax.lax.scan(step, carry, (dict(layers), idx))

    # ------------------------------------------------------------------ the three passes
    def _forward(self, tokens):
        B, T = tokens.shape
        positions = jnp.arange(T, dtype=jnp.int32)
        rope = self._rope(positions)
        x = self._embed(tokens, positions[None])

        def layer(x, lw, i):
            attend = lambda q, k, v, w: (causal_attention(q, k, v, window=w, **self._attn_kw()), None)  # noqa: E731
            return self._block(lw, x, rope, i, attend)[0]

        return self._head(self._layer_loop(layer, x))

    def _prefill(self, tokens, cache, last):
        """``step`` at positions ``0..P-1`` of a fresh cache, with logits only at ``last``.

        Knowing that the positions start at 0 lets the prompt attend to its own keys (causal,
        in blocks that skip the upper triangle) instead of the whole cache, write the cache with
        one contiguous update per layer instead of a scatter, and run the LM head on one
        position per row instead of all P (a fifth of a 1024-token prefill's FLOPs)."""
        B, P = tokens.shape
        positions = jnp.arange(P, dtype=jnp.int32)
        rope = self._rope(positions)
        x = self._embed(tokens, positions[None])

        def write(c, i, new):  # new: [B, P, KV, hd] -> slots 0..P-1 of layer i
            upd = new.astype(c.dtype).transpose(0, 2, 1, 3)[None]
            return jax.lax.dynamic_update_slice(c, upd, (i, 0, 0, 0, 0))

        def layer(carry, lw, i):
            x, kc, vc = carry

            def attend(q, k, v, w):
                out = causal_attention(q, k, v, window=w, **self._attn_kw())
                return out, (write(kc, i, k), write(vc, i, v))

            x, (kc, vc) = self._block(lw, x, rope, i, attend)
            return x, kc, vc

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
        rope = self._rope(positions)  # [B, T, hd/2]
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        x = self._embed(tokens, positions)
        attend_at = _cache_reader(positions, S, cfg.sliding_window if any(cfg.is_sliding) else None,
                                  self._attn_kw())

        if T == 1:
            return self._decode_hidden(x, rope, positions, ck, cv, attend_at)

        def write(c, i, new):
            return c.at[i, rows, :, positions].set(new.astype(c.dtype), mode="drop")

        def layer(carry, lw, i):
            x, kc, vc = carry

            def attend(q, k, v, w):
                kc2, vc2 = write(kc, i, k), write(vc, i, v)
                return attend_at(q, kc2, vc2, i, w), (kc2, vc2)

            x, (kc, vc) = self._block(lw, x, rope, i, attend)
            return x, kc, vc

        x, kc, vc = self._layer_loop(layer, (x, ck, cv))
        return x, KVCache(kc, vc)

    def _decode_hidden(self, x, rope, positions, ck, cv, attend_at):
        """``_step_hidden`` at T = 1 (decoding). Each layer attends over the cache's earlier
        slots plus its own new key/value (not yet in the cache), and every layer's new slot is
        written once, after the layer loop: one write of [L, B, KV, hd] instead of one per
        layer. Per-layer writes inside the loop cost 27 ms of a 132 ms float32 step at batch
        32, and in bfloat16 XLA:CPU copied the whole cache at each (663 ms)."""
        B, S = positions.shape[0], ck.shape[3]

        def layer(x, lw, i):
            def attend(q, k, v, w):
                k, v = k.astype(ck.dtype), v.astype(cv.dtype)  # as the cache will hold them
                return attend_at(q, ck, cv, i, w, new=(k, v)), (k, v)

            return self._block(lw, x, rope, i, attend)

        x, (nk, nv) = self._layer_scan(layer, x)  # nk, nv: [L, B, 1, KV, hd]
        # An out-of-range position writes nothing: its clamped slot gets its own old value.
        inb = (positions >= 0) & (positions < S)  # [B, 1]
        slot = jnp.clip(positions, 0, S - 1)
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]

        def write(c, new):
            if B == 1:  # XLA would turn a 1-row scatter into a select over the whole cache
                new = jnp.where(inb[0, 0], new, c[:, :1, :, slot[0, 0]][:, :, None])
                return jax.lax.dynamic_update_slice(c, new.transpose(0, 1, 3, 2, 4), (0, 0, 0, slot[0, 0], 0))
            new = new.transpose(1, 2, 0, 3, 4)  # [B, 1, L, KV, hd], as c[:, rows, :, slot]
            new = jnp.where(inb[:, :, None, None, None], new, c[:, rows, :, slot])
            return c.at[:, rows, :, slot].set(new, mode="promise_in_bounds")

        return x, KVCache(write(ck, nk), write(cv, nv))


def _cache_reader(positions, S, sliding_window, attn_kw, kernel=True):
    """``attend(q, kc, vc, i, window)``: attention of the queries at ``positions`` [B, T] over
    layer i of the cache, reading only the slots any query may see.

    Global layers read the smallest prefix (128, 256, ..., S slots) that covers
    ``max(positions)``. When decoding (T = 1), sliding layers (``window > 0``) whose prefix
    would be longer than their window read, per row, the ``Wb`` slots ending at that row's
    position instead (Wb: the smallest prefix size >= W), so their cost stops growing with
    the sequence. One compiled branch per size."""
    B, T = positions.shape
    sizes = prefix_buckets(S)
    need = jnp.max(positions) + 1
    bucket = jnp.minimum(jnp.sum(jnp.asarray(sizes, jnp.int32) < need), len(sizes) - 1)

    def masked(q, kb, vb, slots, window, new):  # slots: int32[B or 1, 1, size], absolute positions
        p = positions[:, :, None]
        if new is None:
            mask = (slots <= p) & ((window == 0) | (slots > p - window))
        else:  # the cache's slot p is stale: the query's own key/value come from `new`
            mask = (slots < p) & ((window == 0) | (slots > p - window))
            mask = jnp.concatenate([jnp.broadcast_to(mask, (B, 1, mask.shape[-1])), jnp.ones((B, 1, 1), bool)], -1)
            kb = jnp.concatenate([kb, new[0].transpose(0, 2, 1, 3)], axis=2)
            vb = jnp.concatenate([vb, new[1].transpose(0, 2, 1, 3)], axis=2)
        return attention(q, kb, vb, mask, **attn_kw)

    def prefix(size):
        def f(q, kc, vc, i, window, new):
            KV, hd = kc.shape[2], kc.shape[4]
            kb = jax.lax.dynamic_slice(kc, (i, 0, 0, 0, 0), (1, B, KV, size, hd))[0]
            vb = jax.lax.dynamic_slice(vc, (i, 0, 0, 0, 0), (1, B, KV, size, hd))[0]
            return masked(q, kb, vb, jnp.arange(size, dtype=jnp.int32)[None, None, :], window, new)
        return f

    def window_slice(size):
        def f(q, kc, vc, i, window, new):
            KV, hd = kc.shape[2], kc.shape[4]
            start = jnp.clip(positions[:, 0] + 1 - size, 0, S - size)  # [B]

            def rows(c):  # per row: slots start_b .. start_b + size - 1 of layer i
                one = lambda cb, s: jax.lax.dynamic_slice(cb, (i, 0, s, 0), (1, KV, size, hd))[0]  # noqa: E731
                return jax.vmap(one, in_axes=(1, 0))(c, start)

            slots = start[:, None, None] + jnp.arange(size, dtype=jnp.int32)[None, None, :]
            return masked(q, rows(kc), rows(vc), slots, window, new)
        return f

    branches = [prefix(size) for size in sizes]
    wb = None
    if sliding_window is not None and T == 1:
        wb = next((s for s in sizes if s >= sliding_window), S)
        if wb < S:
            branches.append(window_slice(wb))
        else:
            wb = None

    def attend(q, kc, vc, i, window, new=None):
        """``new``: (k, v) [B, 1, KV, hd] of the queries' own position, not yet in the cache."""
        if kernel and new is not None and attn_kw.get("softcap") is None and _cpu_kernel.takes_attention(q):
            return _decode_attention(q, kc, vc, jnp.asarray(i, jnp.int32), jnp.asarray(window, jnp.int32),
                                     new[0], new[1], positions, sliding_window, tuple(attn_kw.items()))
        return xla_attend(q, kc, vc, i, window, new)

    def xla_attend(q, kc, vc, i, window, new=None):
        if len(branches) == 1:
            return branches[0](q, kc, vc, i, window, new)
        idx = bucket
        if wb is not None:  # a sliding layer whose prefix would be longer than its window slice
            use_window = (window > 0) & (jnp.asarray(sizes, jnp.int32)[bucket] > wb)
            idx = jnp.where(use_window, len(branches) - 1, bucket)
        return jax.lax.switch(idx, branches, q, kc, vc, i, window, new)

    return attend


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9))
def _decode_attention(q, kc, vc, i, window, kn, vn, positions, sliding_window, attn_kw):
    """The decode step's attention on the CPU kernel (``_cpu_kernel.decode_attention``: reads
    only the slots each row sees, no copies of the cache); XLA's elsewhere. ``attn_kw``:
    the items of :meth:`Decoder._attn_kw` (hashable: it is static)."""
    kw = dict(attn_kw)
    scale = kw["scale"] if kw.get("scale") is not None else 1.0 / math.sqrt(q.shape[-1])

    def kernel(q, kc, vc, i, window, kn, vn, positions):
        out = _cpu_kernel.decode_attention(q, kc, vc, i, positions, window, kn, vn, scale=scale)
        return out.astype(q.dtype)

    def fallback(q, kc, vc, i, window, kn, vn, positions):
        return _xla_decode_attention(q, kc, vc, i, window, kn, vn, positions, sliding_window, attn_kw)

    return jax.lax.platform_dependent(q, kc, vc, i, window, kn, vn, positions, cpu=kernel,
                                      default=fallback)


def _xla_decode_attention(q, kc, vc, i, window, kn, vn, positions, sliding_window, attn_kw):
    reader = _cache_reader(positions, kc.shape[3], sliding_window, dict(attn_kw), kernel=False)
    return reader(q, kc, vc, i, window, (kn, vn))


@_decode_attention.defjvp
def _decode_attention_jvp(sliding_window, attn_kw, primals, tangents):
    # The kernel has no derivative rules: the tangent is XLA's attention's.
    q, kc, vc, i, window, kn, vn, positions = primals
    dq, dkc, dvc, _, _, dkn, dvn, _ = tangents

    def f(q, kc, vc, kn, vn):
        return _xla_decode_attention(q, kc, vc, i, window, kn, vn, positions, sliding_window, attn_kw)

    _, dout = jax.jvp(f, (q, kc, vc, kn, vn), (dq, dkc, dvc, dkn, dvn))
    return _decode_attention(*primals, sliding_window, attn_kw), dout


class _Weights:
    """One layer's weights from a dict of arrays (static layer, or a scan slice)."""

    def __init__(self, lp):
        self.lp = lp

    def has(self, name):
        return name in self.lp

    def mm(self, h, name):
        return linear(h, self.lp[name])

    def affine(self, h, w, b):
        """``h @ w (+ b)``; the bias only when the layer has it."""
        y = self.mm(h, w)
        return y + self.vec(b).astype(y.dtype) if b is not None and self.has(b) else y

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
def _calibration_absmax(model: Decoder, tokens):
    """Per layer ``{matrix name: max |input| per channel}`` and the LM head input's, from the
    float32 forward pass over ``tokens``."""
    cfg, p = model.config, model.params
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    rope = model._rope(positions)
    x, seen = model._embed(tokens, positions[None]), []
    attend = lambda q, k, v, w: (causal_attention(q, k, v, window=w, **model._attn_kw()), None)  # noqa: E731
    for i, lp in enumerate(p["layers"].layers):
        lw = _RecordingWeights(lp)
        x, _ = model._block(lw, x, rope, i, attend)
        seen.append(lw.seen)
    h = norm(x, p["norm"], p.get("norm_bias"), cfg.norm, cfg.norm_eps).astype(jnp.float32)
    return seen, jnp.max(jnp.abs(h).reshape(-1, h.shape[-1]), axis=0)


class _SwitchedWeights(_Weights):
    """Layer ``i`` (traced) of per-layer buffers: each matmul is a ``lax.switch`` over the
    layers whose branch j multiplies by layer j's buffer, read in place (a dynamic slice of a
    stacked array would be copied)."""

    def __init__(self, layers, i, vecs):
        self.layers, self.i, self.vecs = layers, i, vecs

    def has(self, name):
        return name in self.layers[0]

    def mm(self, h, name):
        ws = tuple(lp[name] for lp in self.layers)
        branches = [lambda h, ws, j=j: linear(h, ws[j]) for j in range(len(ws))]
        return jax.lax.switch(self.i, branches, h, ws)

    def vec(self, name):
        return self.vecs[name][self.i]


def _decoder_flatten(model):
    p = model.params
    unstacked = isinstance(p, Mapping) and isinstance(p.get("layers"), LayerStack) \
        and p["layers"].layers is not None
    if unstacked:
        p = {**p, "layers": p["layers"].layers}  # a tuple of per-layer dicts
    return ((jax.tree_util.GetAttrKey("params"), p),), (model.config, unstacked)


def _decoder_unflatten(aux, children):
    config, unstacked = aux
    (p,) = children
    if unstacked:  # per-layer leaves (arrays, tracers or placeholders) stay per layer
        p = {**p, "layers": LayerStack(p["layers"])}
    obj = object.__new__(Decoder)  # no __post_init__: leaves may be tracers or placeholders
    object.__setattr__(obj, "params", p)
    object.__setattr__(obj, "config", config)
    return obj


jax.tree_util.register_pytree_with_keys(Decoder, _decoder_flatten, _decoder_unflatten)


@functools.partial(jax.jit, static_argnums=(1,))
def _cast_leaves(leaves, dtype):
    return [a.astype(dtype) for a in leaves]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_params(key, config: DecoderConfig, dtype):
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))
    sizes = [math.prod(shape) for _, shape in flat]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one draw: threefry compiles slowly
    leaves, start = [], 0
    identity = 0.0 if config.norm == "rms_plus_one" else 1.0
    for (path, shape), n in zip(flat, sizes):
        name = path[-1].key
        piece = z[start:start + n].reshape(shape)
        start += n
        if name.endswith("norm"):
            leaf = identity + 0.1 * piece
        elif name.endswith("_bias") or name in ("bq", "bk", "bv", "bqkv", "bo", "b_up", "b_down"):
            leaf = 0.02 * piece
        else:
            std = 0.02 / (math.sqrt(2 * config.n_layers) if name in ("wo", "w_down") else 1.0)
            leaf = std * piece
        leaves.append(leaf.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_forward_jit = jax.jit(lambda model, tokens: model._forward(tokens))
_prefill_jit = jax.jit(lambda model, tokens, cache, last: model._prefill(tokens, cache, last))
_step_jit = jax.jit(lambda model, tokens, positions, cache: model._step(tokens, positions, cache))
