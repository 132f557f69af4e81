"""Pieces shared by the decoder-only models: dtype parsing, RMSNorm, rotary embeddings, the one
matmul helper and masked grouped-query attention.

Numerics: activations stay in the weights' dtype between ops; every matmul accumulates in float32;
RMSNorm statistics, attention scores and the softmax are float32.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DTYPES",
    "parse_dtype",
    "linear",
    "rms_norm",
    "rope_angles",
    "apply_rope",
    "attention",
    "prefix_buckets",
    "QuantizedWeight",
    "quantize_int8",
    "dequantize",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

ROPE_LAYOUTS = ("interleaved", "half")


def parse_dtype(dtype, *, arg: str = "dtype"):
    """Accepts ``jnp.float32``/``jnp.bfloat16`` (or numpy dtypes, or the strings "float32" /
    "bfloat16") and returns the jnp scalar type; anything else raises ValueError."""
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key in DTYPES:
            return DTYPES[key]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"{arg} must be one of {sorted(DTYPES)} (or the matching jnp dtype), "
                     f"got {dtype!r}")


class QuantizedWeight(NamedTuple):
    """An int8 weight-only matrix: ``q: int8[out, in]`` (note: transposed, output-major) and a
    per-output-channel ``scale: float32[out]``; the matrix it stands for is
    ``(q * scale[:, None]).T``, i.e. ``[in, out]`` like a float weight. A pytree (NamedTuple)."""

    q: jax.Array
    scale: jax.Array

    @property
    def dtype(self):  # the compute dtype of a layer using it (activations stay float32)
        return self.scale.dtype

    @property
    def shape(self):  # the [in, out] shape of the matrix it stands for
        return tuple(self.q.shape[:-2]) + (self.q.shape[-1], self.q.shape[-2])


def quantize_int8(w, *, transposed: bool = False) -> QuantizedWeight:
    """Symmetric per-output-channel int8 quantization of ``w: [in, out]`` (or of ``w: [out, in]``
    with ``transposed=True``, e.g. an embedding table used as a tied output head):
    ``scale = max|w| / 127`` per output channel, ``q = round(w / scale)``. The round trip error
    is at most ``scale / 2`` per element."""
    wt = jnp.asarray(w, jnp.float32)
    wt = wt if transposed else jnp.swapaxes(wt, -1, -2)  # [out, in]
    amax = jnp.max(jnp.abs(wt), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(wt / scale[..., None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q, scale)


def dequantize(w: QuantizedWeight, *, transposed: bool = False):
    """The float32 ``[in, out]`` matrix of ``w`` (``[out, in]`` with ``transposed=True``)."""
    wt = w.q.astype(jnp.float32) * w.scale[..., None]
    return wt if transposed else jnp.swapaxes(wt, -1, -2)


def _int8_to_f32(q):
    # XLA:CPU vectorizes int8 -> bfloat16 -> float32 (both exact) several times better than a
    # direct int8 -> float32 convert.
    return q.astype(jnp.bfloat16).astype(jnp.float32)


def qlinear(x, w: QuantizedWeight):
    """``x @ dequantize(w)`` with float32 activations: ``x: [..., in]`` -> float32 ``[..., out]``.

    One row (decoding at batch 1): a fused multiply + row reduction that reads the int8 matrix
    directly (no dequantized copy). More rows: the matrix is dequantized (a float32 copy) and
    multiplied with a dot."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(-1, n_in)
    if xf.shape[0] == 1:
        y = jnp.sum(_int8_to_f32(w.q) * xf, axis=-1)[None]
    else:
        y = jnp.einsum("ni,oi->no", xf, _int8_to_f32(w.q), preferred_element_type=jnp.float32)
    return (y * w.scale).reshape(*lead, -1)


def linear(x, w):
    """``x @ w`` for a weight matrix ``w: [in, out]``: the input is cast to the weight dtype, the
    product accumulates in float32 and is returned in the weight dtype.

    Every projection of the models goes through here; a :class:`QuantizedWeight` runs
    :func:`qlinear` (float32 activations)."""
    if isinstance(w, QuantizedWeight):
        return qlinear(x, w)
    y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return y.astype(w.dtype)


def rms_norm(x, w, eps):
    """RMSNorm with float32 statistics; returns the weight dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(w.dtype)


def rope_angles(positions, head_dim: int, theta: float, freq_factors=None):
    """cos, sin of shape ``positions.shape + (head_dim // 2,)`` in float32. Frequency i is
    ``theta ** (-2i / head_dim) / freq_factors[i]`` (factors default to 1)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float64) * 2.0 / head_dim))
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float64)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin, layout: str):
    """Rotates ``x: [..., T, N, hd]`` by ``cos/sin: [..., T, hd/2]`` (broadcast over heads N).

    ``layout="interleaved"``: dims (2i, 2i+1) form a pair (GGML/llama.cpp, Meta's original code).
    ``layout="half"``: dims (i, i + hd/2) form a pair (Hugging Face's rotate_half).
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    c = cos[..., None, :]
    s = sin[..., None, :]
    if layout == "half":
        h = x.shape[-1] // 2
        x1, x2 = xf[..., :h], xf[..., h:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    elif layout == "interleaved":
        pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    return out.astype(dtype)


def attention(q, k, v, mask):
    """Grouped-query attention.

    q: [B, T, H, hd]; k, v: [B, KV, S, hd] (kv-head-major, the layout of the KV cache) with H a
    multiple of KV (query head h uses kv head h // (H // KV)); mask: bool, broadcastable to
    [B, T, S] (True = may attend; every query must be allowed at least one slot).
    Returns [B, T, H * hd] in q's dtype. Scores and softmax are float32.
    """
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    qg = q.reshape(B, T, KV, G, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    m = jnp.broadcast_to(mask, (B, T, S))[:, None, None, :, :]
    scores = jnp.where(m, scores, -jnp.inf)
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H * hd).astype(q.dtype)


def prefix_buckets(max_length: int, smallest: int = 128) -> tuple[int, ...]:
    """Cache-prefix lengths the cached attention is compiled for: ``smallest`` doubling up to
    (and always ending with) ``max_length``."""
    sizes = []
    b = smallest
    while b < max_length:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (max_length,)


def checked_params(expected: Mapping, params: Mapping, dtype, what: str) -> dict:
    """``params`` as a dict of JAX arrays after checking its keys and every shape against
    ``expected`` (a nested dict of shapes); ``dtype`` (if not None) casts every array.

    Errors name the model (``what``), the key path, and the expected and actual shapes.
    """

    def build(exp, got, prefix):
        if not isinstance(got, Mapping):
            raise ValueError(f"{what} params{prefix}: expected a dict, got {type(got).__name__}")
        missing = sorted(set(exp) - set(got))
        extra = sorted(set(got) - set(exp))
        if missing or extra:
            raise ValueError(f"{what} params{prefix}: missing keys {missing}, unexpected keys {extra}")
        out = {}
        for name, shape in exp.items():
            if isinstance(shape, dict):
                out[name] = build(shape, got[name], f"{prefix}[{name!r}]")
                continue
            leaf = got[name]
            if tuple(leaf.shape) != tuple(shape):
                raise ValueError(f"{what} param{prefix}[{name!r}] has shape {tuple(leaf.shape)}, expected {tuple(shape)}")
            out[name] = jnp.asarray(leaf, dtype=dtype)
        return out

    return build(expected, params, "")
