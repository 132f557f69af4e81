"""Pieces shared by the decoder-only models: dtype parsing, RMSNorm, rotary embeddings, the one
matmul helper and masked grouped-query attention.

Numerics: activations stay in the weights' dtype between ops; every matmul accumulates in float32;
RMSNorm statistics, attention scores and the softmax are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _cpu_kernel

__all__ = [
    "DTYPES",
    "parse_dtype",
    "linear",
    "matmul",
    "rms_norm",
    "norm",
    "rope_angles",
    "apply_rope",
    "attention",
    "causal_attention",
    "prefix_buckets",
    "QuantizedWeight",
    "quantize_int8",
    "quantize_rows",
    "smoothing",
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
    """An int8 matrix for int8 x int8 matmuls (weights and activations both quantized).

    ``q: int8[out, in]`` (output-major), ``scale: float32[out]`` (one per output channel) and
    ``inv: float32[in]`` (per input channel: the activations are multiplied by it before they
    are quantized; all ones without smoothing). The matrix it stands for, ``[in, out]`` like a
    float weight, is ``(q * scale[:, None] * inv[None, :]).T``. A pytree (NamedTuple).

    Why ``inv``: activations of these models have a few channels of much larger magnitude, and
    with one int8 code per element and one scale per token those channels round the others to
    nothing. Moving part of each input channel's range from the activation into the weight
    (SmoothQuant: ``s = max|x|^0.5 / max|w|^0.5`` per input channel, from calibration text)
    flattens them before quantization. The two-part activation codes of :func:`qlinear` leave
    little for it to fix; it stays an option of ``Decoder.quantize``.

    ``keep_idx: int32[k]`` and ``keep_w: float32[k, out]`` (both None when unused): input
    channels taken out of the int8 product (their ``q`` columns are zero and ``inv`` is 0)
    and multiplied in float32 instead (LLM.int8()'s outlier split): the few largest channels
    no longer set every token's int8 scale.
    """

    q: jax.Array
    scale: jax.Array
    inv: jax.Array
    keep_idx: Any = None
    keep_w: Any = None

    @property
    def dtype(self):  # the compute dtype of a layer using it (activations stay float32)
        return self.scale.dtype

    @property
    def shape(self):  # the [in, out] shape of the matrix it stands for
        return tuple(self.q.shape[:-2]) + (self.q.shape[-1], self.q.shape[-2])


def smoothing(act_absmax, w, *, transposed: bool = False, alpha: float = 0.5):
    """SmoothQuant's per-input-channel factor ``s = max|x|^alpha / max|w|^(1 - alpha)`` for
    ``w: [in, out]`` (``[out, in]`` with ``transposed=True``) and the calibration activations'
    per-channel ``act_absmax: [in]``; channels never seen active get ``s = 1``."""
    wt = jnp.asarray(w, jnp.float32)
    wmax = jnp.max(jnp.abs(wt), axis=0 if transposed else -1)
    a = jnp.asarray(act_absmax, jnp.float32)
    ok = (a > 0) & (wmax > 0)
    s = jnp.where(ok, a ** alpha / jnp.where(ok, wmax, 1.0) ** (1 - alpha), 1.0)
    return jnp.clip(s, 1e-5, 1e5)


def quantize_int8(w, *, transposed: bool = False, smooth=None, keep=None) -> QuantizedWeight:
    """Symmetric per-output-channel int8 quantization of ``w: [in, out]`` (or of ``w: [out, in]``
    with ``transposed=True``, e.g. an embedding table used as a tied output head).
    ``keep`` (int indices into ``in``) moves those input channels to a float32 side matrix.

    With ``smooth`` (``s: [in]``, see :func:`smoothing`) the quantized matrix is ``diag(s) w``
    and ``inv = 1 / s`` undoes it on the activations. ``scale = max|w'| / 127`` per output
    channel, ``q = round(w' / scale)``: the round-trip error of ``w'`` is at most ``scale / 2``
    per element."""
    wt = jnp.asarray(w, jnp.float32)
    wt = wt if transposed else jnp.swapaxes(wt, -1, -2)  # [out, in]
    s = jnp.ones(wt.shape[-1], jnp.float32) if smooth is None else jnp.asarray(smooth, jnp.float32)
    keep_w = None
    if keep is not None:
        keep = jnp.asarray(keep, jnp.int32)
        keep_w = jnp.swapaxes(wt[..., keep], -1, -2)  # float32[k, out], unsmoothed
        wt = wt.at[..., keep].set(0.0)
        s = s.at[keep].set(1.0)
    wt = wt * s
    amax = jnp.max(jnp.abs(wt), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(wt / scale[..., None]), -127, 127).astype(jnp.int8)
    inv = (1.0 / s).astype(jnp.float32)
    if keep is not None:
        inv = inv.at[keep].set(0.0)  # the kept channels leave the int8 path
    return QuantizedWeight(q, scale, inv, keep, keep_w)


def dequantize(w: QuantizedWeight, *, transposed: bool = False):
    """The float32 ``[in, out]`` matrix of ``w`` (``[out, in]`` with ``transposed=True``)."""
    wt = w.q.astype(jnp.float32) * w.scale[..., None] * w.inv[..., None, :]
    if w.keep_idx is not None:
        wt = wt.at[..., w.keep_idx].set(jnp.swapaxes(w.keep_w, -1, -2))
    return wt if transposed else jnp.swapaxes(wt, -1, -2)


def quantize_rows(x):
    """Per-row int8 quantization of float32 ``x: [M, K]`` in two parts: ``(q1, q2 int8[M, K],
    scale float32[M, 1])`` with ``x ~= scale * (q1 + q2 / 254)``.

    ``scale = max|x| / 127`` per row (a zero row gets 1) and ``q1 = round(x / scale)`` is the
    usual per-token int8 code; ``q2`` codes what ``q1`` rounded off (at most half a step) in
    steps 254 times finer. The error is at most ``scale / 508`` per element, about 16-bit
    precision, where ``q1`` alone is off by up to ``scale / 2``: with one int8 scale per token,
    a few large channels round every other channel to a handful of levels. SmolLM2-135M's
    perplexity against float32: +1.04% with ``q1`` alone (even with SmoothQuant and 16
    channels kept in float32), +0.37% with both parts and neither."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    t = x / scale
    q1 = jnp.clip(jnp.round(t), -127, 127)
    q2 = jnp.clip(jnp.round((t - q1) * 254.0), -127, 127)  # t - q1 is exact: |t - q1| <= 1/2
    return q1.astype(jnp.int8), q2.astype(jnp.int8), scale


def qlinear(x, w: QuantizedWeight):
    """``x @ w`` for an int8 matrix: ``x: [..., in]`` -> float32 ``[..., out]``.

    The activations are smoothed (``x * w.inv``) and quantized per row in two int8 parts
    (:func:`quantize_rows`); both parts are multiplied by the int8 weights in one int8 x int8
    product with int32 accumulation (their rows stacked: exact, so the CPU kernel and XLA's
    dot give the same integers), then ``scale * (acc1 + acc2 / 254) * w.scale``. Reading the
    weights is the cost of a decode step, and the second part reuses each weight byte while
    it is in registers. Kept channels (``w.keep_idx``) add a float32 ``x[:, keep] @ keep_w``."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.astype(jnp.float32).reshape(-1, n_in)
    q1, q2, sx = quantize_rows(x2 * w.inv)
    both = jnp.concatenate([q1, q2], axis=0)  # [2M, in]
    acc = (_s8_product(both, w.q) if _cpu_kernel.takes(both) else _xla_s8(both, w.q)).astype(jnp.float32)
    m = q1.shape[0]
    y = (acc[:m] + acc[m:] / 254.0) * sx * w.scale
    if w.keep_idx is not None:
        y = y + jnp.dot(jnp.take(x2, w.keep_idx, axis=1), w.keep_w)
    return y.reshape(*lead, -1)


def _two_rows(x):
    """XLA:CPU runs bfloat16 (and int8) dots on its library kernels only when both operands
    have at least 2 rows (its one-row fallback is about 10x slower): a single row gets a zero
    row. (int8 products always have 2+ rows: qlinear stacks two parts per activation row.)"""
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=0) if x.shape[0] == 1 else x


def _xla_s8(qx, q):
    """int32 ``qx @ q.T`` (``qx: int8[M, in]``, ``q: int8[out, in]``, M even: qlinear's two
    parts, so never the one-row case XLA:CPU runs slowly) on XLA's dot."""
    return jax.lax.dot_general(qx, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _xla_float(xs, w, *, transposed: bool):
    """float32 ``xs @ w`` (``w: [in, out]``, ``[out, in]`` if transposed) on XLA's dot."""
    padded = xs if w.dtype == jnp.float32 else _two_rows(xs)
    dims = (((1,), (1,) if transposed else (0,)), ((), ()))
    return jax.lax.dot_general(padded, w, dims, preferred_element_type=jnp.float32)[:xs.shape[0]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _float_product(xs, w, transposed):
    kernel = functools.partial(_cpu_kernel.matmul_f32, transposed=transposed)
    fallback = functools.partial(_xla_float, transposed=transposed)
    return jax.lax.platform_dependent(xs, w, cpu=kernel, default=fallback)


@_float_product.defjvp
def _float_product_jvp(transposed, primals, tangents):
    # The kernel has no derivative rules of its own: the product is bilinear, so its tangent is
    # two products on XLA's dot (and jax.grad works through the fast path).
    (xs, w), (dx, dw) = primals, tangents
    f = functools.partial(_xla_float, transposed=transposed)
    return _float_product(xs, w, transposed), f(dx, w) + f(xs, dw)


# Jitted so that tracing is paid once per shape: a layer scan traces one product per layer
# branch (30 for SmolLM2), and each would otherwise retrace the custom_jvp, both platform
# branches and the custom_vmap (1.7 s of a warm start); jit's trace cache reuses the first.
_float_product_jit = jax.jit(_float_product, static_argnums=2)
_s8_product = jax.jit(lambda qx, q: jax.lax.platform_dependent(
    qx, q, cpu=_cpu_kernel.matmul_s8, default=_xla_s8))


def matmul(x, w, *, transposed: bool = False):
    """float32 ``x @ w`` for ``w: [in, out]`` (``[out, in]`` with ``transposed=True``, e.g. a
    tied embedding used as the LM head); ``x`` is cast to the weight dtype and the product
    accumulates in float32. A :class:`QuantizedWeight` (always output-major) runs
    :func:`qlinear`. A few rows (``_cpu_kernel.MAX_ROWS``: the decode step) go to the CPU
    kernel when it is built (see ``_cpu_kernel``), more to XLA's dot; the platform is chosen
    at lowering."""
    if isinstance(w, QuantizedWeight):
        return qlinear(x, w)
    xs = x.astype(w.dtype).reshape(-1, x.shape[-1])
    if _cpu_kernel.takes(xs):
        y = _float_product_jit(xs, w, transposed)
    else:
        y = _xla_float(xs, w, transposed=transposed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(x, w):
    """``x @ w`` for a weight matrix ``w: [in, out]``, returned in the weight dtype (float32 for
    a :class:`QuantizedWeight`). Every projection of the models goes through here."""
    y = matmul(x, w)
    return y if isinstance(w, QuantizedWeight) else y.astype(w.dtype)


def rms_norm(x, w, eps):
    """RMSNorm with float32 statistics; returns the weight dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(w.dtype)


def norm(x, w, b, kind: str, eps):
    """The decoder's norms with float32 statistics, returned in the weight dtype: ``"rms"``
    (``x / rms(x) * w``), ``"rms_plus_one"`` (Gemma: ``* (1 + w)``, in float32 before the cast,
    as Hugging Face computes it) or ``"layer"`` (LayerNorm: ``(x - mean) / std * w + b``)."""
    if kind == "rms":
        return rms_norm(x, w, eps)
    xf = x.astype(jnp.float32)
    wf = w.astype(jnp.float32)
    if kind == "rms_plus_one":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
        return (y * (1.0 + wf)).astype(w.dtype)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps) * wf
    return (y if b is None else y + b.astype(jnp.float32)).astype(w.dtype)


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


def attention(q, k, v, mask, scale=None, softcap=None):
    """Grouped-query attention.

    q: [B, T, H, hd]; k, v: [B, KV, S, hd] (kv-head-major, the layout of the KV cache) with H a
    multiple of KV (query head h uses kv head h // (H // KV)); mask: bool, broadcastable to
    [B, T, S] (True = may attend; every query must be allowed at least one slot).
    ``scale`` multiplies the scores (default ``1 / sqrt(hd)``); ``softcap`` c applies
    ``c * tanh(s / c)`` to the scaled scores (Gemma 2). Returns [B, T, H * hd] in q's dtype.
    Scores and softmax are float32.
    """
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    # One dot batched over the B * KV (row, kv head) pairs, the G query heads of a kv head as
    # extra rows, and the softmax normalised after the value product: at batch 8 this ran 3.5x
    # faster on XLA:CPU than the einsum form (SmolLM2, 128 cache slots). float32 operands:
    # XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for some of these batched shapes.
    qg = (q.astype(jnp.float32) * scale).reshape(B, T, KV, G, hd)
    qg = jnp.swapaxes(qg, 1, 2).reshape(B * KV, T * G, hd)  # (a free reshape at T = 1)
    kk = k.astype(jnp.float32).reshape(B * KV, S, hd)
    vv = v.astype(jnp.float32).reshape(B * KV, S, hd)
    batch = ((0,), (0,))
    scores = jax.lax.dot_general(qg, kk, (((2,), (2,)), batch))  # [B * KV, T * G, S]
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    m = jnp.broadcast_to(jnp.broadcast_to(mask, (B, T, S))[:, None, :, None, :], (B, KV, T, G, S))
    scores = jnp.where(m.reshape(B * KV, T * G, S), scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jax.lax.dot_general(p, vv, (((2,), (1,)), batch)) / jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.swapaxes(out.reshape(B, KV, T, G, hd), 1, 2)  # [B, T, KV, G, hd]
    return out.reshape(B, T, H * hd).astype(q.dtype)


def causal_attention(q, k, v, block: int = 64, *, window=None, scale=None, softcap=None):
    """Causal grouped-query attention of a sequence over itself (positions 0..T-1). Equal to
    :func:`attention` with a lower-triangular mask. ``window`` (int, may be traced; 0 or None:
    none) limits query p to keys ``p - W < s <= p``.

    On CPU with the kernel built (``_cpu_kernel.takes_attention``: head size 64, 128 or 256, no
    softcap) it runs there: each block of 16 positions keeps its scores in cache from the q.k
    products through the softmax to the values (a 1024-token prefill's attention ~1.6x faster than
    XLA's ops). Elsewhere, and for derivatives, :func:`_blocked_causal_attention` runs.

    q: [B, T, H, hd]; k, v: [B, T, KV, hd] (token-major, as projected). Returns [B, T, H * hd].
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if softcap is None and _cpu_kernel.takes_attention(q):
        w = jnp.asarray(0 if window is None else window, jnp.int32)
        return _causal_product_jit(q, k, v, w, scale, block).astype(q.dtype)
    return _blocked_causal_attention(q, k, v, block, window, scale, softcap)


def _blocked_causal_attention(q, k, v, block, window, scale, softcap):
    """:func:`causal_attention` on XLA, in query blocks: block i attends only to keys
    ``0 .. (i+1) * block - 1``, so the work above the diagonal is skipped (about half of it for
    long prompts) and each block's scores stay small enough to live in cache. Each block is one
    :func:`attention` call (one dot batched over rows and kv heads)."""
    T = q.shape[1]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    outs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        qpos = jnp.arange(start, stop, dtype=jnp.int32)[:, None]
        kpos = jnp.arange(stop, dtype=jnp.int32)[None, :]
        mask = kpos <= qpos  # [Tb, stop]
        if window is not None:
            mask = mask & ((window == 0) | (kpos > qpos - window))
        outs.append(attention(q[:, start:stop], kh[:, :, :stop], vh[:, :, :stop], mask[None],
                              scale=scale, softcap=softcap))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _causal_product(q, k, v, window, scale, block):
    kernel = functools.partial(_cpu_kernel.causal_attention, scale=scale)

    def fallback(q, k, v, window):
        return _blocked_causal_attention(q, k, v, block, window, scale, None).astype(jnp.float32)

    return jax.lax.platform_dependent(q, k, v, window, cpu=kernel, default=fallback)


@_causal_product.defjvp
def _causal_product_jvp(scale, block, primals, tangents):
    # The kernel has no derivative rules: the tangent is XLA's blocked attention's.
    q, k, v, window = primals
    dq, dk, dv, _ = tangents

    def f(q, k, v):
        return _blocked_causal_attention(q, k, v, block, window, scale, None).astype(jnp.float32)

    _, dout = jax.jvp(f, (q, k, v), (dq, dk, dv))
    return _causal_product(q, k, v, window, scale, block), dout


_causal_product_jit = jax.jit(_causal_product, static_argnums=(4, 5))


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
