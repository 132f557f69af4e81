"""Exact, fast token sampling: greedy, temperature, top-k, top-p, min-p and typical-p.

Conventions used throughout jaxdecode:

* Logits are ``[..., V]``; every knob is a Python number or an array broadcastable to
  ``logits.shape[:-1]`` (one value per row). Knobs are traced, so new values never recompile.
* A removed token has logit ``-inf`` (the one masking convention).
* Softmax, cumulative sums and thresholds are computed in float32 whatever the logits dtype.
* Order (Hugging Face / vLLM): temperature -> top-k -> top-p -> min-p -> typical-p -> draw.
  Each filter sees the distribution renormalised over the tokens the previous ones kept.
* Ties: every token tied with the boundary value of top-k / top-p is kept.
* Degenerate rows: NaN logits count as ``-inf``; ``+inf`` logits count as the largest float
  (so a row with several ``+inf`` entries samples uniformly among them); a row with no finite
  or ``+inf`` logit at all returns token 0 with log-probability ``-inf``.

How it is fast without a sort: the exact kept set of top-k/top-p/min-p is a logit threshold.
We take the ``C`` largest logits with ``lax.top_k`` (a few ms at 64 x 50257) and compute the
thresholds, the typical-p set and an inverse-CDF draw (one uniform per row) on those ``C``
candidates. A row is *covered* when its kept set provably lies inside the candidates (its
threshold is above the C-th largest value). Rows that are not covered (e.g. plain sampling
with top_k=0, top_p=1) take the exact full-vocabulary path: thresholds found by a 32-step
bisection on the float bit patterns (exact), then an inverse-CDF draw over the vocabulary.
The full path runs only when some row needs it (``lax.cond``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _validate as V

# Number of top candidates examined on the fast path. 128 keeps top_k <= 128 and most
# nuclei of real language models on the fast path; lax.top_k(128) costs ~6 ms at 64 x 50257.
NUM_CANDIDATES = 128

_F32_MAX = float(np.finfo(np.float32).max)
# Lower clip of top_p / typical_p inside jit: the smallest normal float32. A mass target of
# p * Z with p = 0 (or a subnormal p, which XLA:CPU flushes to 0) is met by the empty set, so
# the filter would keep nothing; any positive target keeps the most probable (resp. most
# typical) token and its ties, as "never fewer than one token" promises.
_P_MIN = float(np.finfo(np.float32).tiny)


class SamplingKnobs(NamedTuple):
    """Per-row sampling settings, each a float32/int32 array of shape ``[N]``.

    Attributes:
      temperature: float32[N]; 0 means greedy for that row.
      top_k: int32[N]; 0 (or >= V) means off.
      top_p: float32[N]; 1 means off.
      min_p: float32[N]; 0 means off.
      typical_p: float32[N]; 1 means off.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    typical_p: jax.Array


# ---------------------------------------------------------------------------------------
# Argument handling


_KNOB_SPECS: dict[str, dict[str, Any]] = {
    "temperature": dict(low=0.0, high=np.inf, high_open=True, allowed="a number >= 0, finite (0 means greedy)",
                        dtype=np.float32),
    "top_k": dict(low=0, integer=True, allowed="an integer >= 0 (0 means off)", dtype=np.int32),
    "top_p": dict(low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1] (1 means off)", dtype=np.float32),
    "min_p": dict(low=0.0, high=1.0, allowed="a number in [0, 1] (0 means off)", dtype=np.float32),
    "typical_p": dict(low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1] (1 means off)", dtype=np.float32),
}


def make_knobs(fn: str, batch_shape: tuple[int, ...], checked: bool = False, **values: Any) -> SamplingKnobs:
    """Validates concrete knob values (unless ``checked``: already done) and broadcasts each
    to ``batch_shape``."""
    out = {}
    for name, spec in _KNOB_SPECS.items():
        value = values[name]
        spec = dict(spec)
        dtype = spec.pop("dtype")
        if not checked:
            V.check_knob(fn, name, value, **spec)
        out[name] = V.broadcast_knob(fn, name, value, batch_shape, dtype)
    return SamplingKnobs(**out)


def _clip_knobs(k: SamplingKnobs, vocab: int) -> SamplingKnobs:
    """Clips traced knobs into range (values are only checked eagerly, outside jit)."""
    return SamplingKnobs(
        temperature=jnp.maximum(k.temperature.astype(jnp.float32), 0.0),
        top_k=jnp.clip(k.top_k.astype(jnp.int32), 0, vocab),
        top_p=jnp.clip(k.top_p.astype(jnp.float32), _P_MIN, 1.0),
        min_p=jnp.clip(k.min_p.astype(jnp.float32), 0.0, 1.0),
        typical_p=jnp.clip(k.typical_p.astype(jnp.float32), _P_MIN, 1.0),
    )


# ---------------------------------------------------------------------------------------
# Small numeric helpers


def _sanitize(logits: jax.Array) -> jax.Array:
    """float32 logits with NaN -> -inf and +inf -> the largest float (see module docstring)."""
    x = logits.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    return jnp.minimum(x, _F32_MAX)


def _scale(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divides by the temperature; rows with temperature 0 (greedy) are left at temperature 1."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    return _sanitize(_sanitize(logits) / t[..., None])


def _sortable(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that unsigned order equals float order (NaN-free input).

    -0.0 is mapped like +0.0 (they compare equal as floats, so they must tie here too).
    """
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, ok) -> jax.Array:
    """Largest uint32 ``t`` per row with ``ok(keys >= t[..., None])`` true (bit by bit, 32 steps).

    ``ok`` must be monotone: true for a set implies true for every superset. When even the
    full set fails ``ok`` (possible only through float rounding), the result is 0: keep all.
    """

    def body(i, t):
        trial = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(ok(keys >= trial[..., None]), trial, t)

    return lax.fori_loop(0, 32, body, jnp.zeros(keys.shape[:-1], jnp.uint32))


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum along the last axis (NaN-free input).

    Same result as ``jnp.argmax``, which XLA:CPU runs as a slow variadic reduction (about
    27 ms at 64 x 50257 against about 5 ms for a max, a compare and a min).
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1).clip(0, x.shape[-1] - 1)


def _masked_sum(mask: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, w, 0.0), axis=-1)


_CDF_BLOCK = 256


def _inverse_cdf(u: jax.Array, w: jax.Array) -> jax.Array:
    """Index drawn with probability proportional to ``w >= 0`` along the last axis.

    Long rows use two levels: block sums and their cumulative sum pick the block, then a
    cumulative sum inside that block picks the entry. Same result as one cumulative sum over
    the row up to float rounding, and about 5x faster on XLA:CPU at 64 x 50257 (a 50k-long
    cumsum is slow there).
    """
    n = w.shape[-1]
    if n <= 4 * _CDF_BLOCK:
        c = jnp.cumsum(w, axis=-1)
        target = u * c[..., -1]
        idx = jnp.sum(c <= target[..., None], axis=-1, dtype=jnp.int32)
    else:
        blocks = -(-n // _CDF_BLOCK)
        wp = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, blocks * _CDF_BLOCK - n)])
        wp = wp.reshape(w.shape[:-1] + (blocks, _CDF_BLOCK))
        c = jnp.cumsum(jnp.sum(wp, axis=-1), axis=-1)  # [..., blocks]
        target = u * c[..., -1]
        blk = jnp.minimum(jnp.sum(c <= target[..., None], axis=-1, dtype=jnp.int32), blocks - 1)
        before = jnp.take_along_axis(c, jnp.maximum(blk - 1, 0)[..., None], axis=-1)[..., 0]
        before = jnp.where(blk > 0, before, 0.0)
        inner = jnp.take_along_axis(wp, blk[..., None, None], axis=-2)[..., 0, :]
        ci = before[..., None] + jnp.cumsum(inner, axis=-1)
        idx = blk * _CDF_BLOCK + jnp.sum(ci <= target[..., None], axis=-1, dtype=jnp.int32)
        # Rounding can push the target past the chosen block's last non-zero entry.
        idx = jnp.where(jnp.take_along_axis(w, jnp.minimum(idx, n - 1)[..., None], axis=-1)[..., 0] > 0, idx, n)
    # u * total can round up to total; fall back to the heaviest entry then (never out of
    # range). Behind a cond: computing the fallback unconditionally costs ~5x the draw.
    past = idx >= n
    return lax.cond(jnp.any(past), lambda: jnp.where(past, _argmax(w), idx), lambda: idx)


def _typical_keep(l: jax.Array, keep: jax.Array, typical_p: jax.Array, ok_threshold) -> jax.Array:
    """Applies the typical-p filter to the rows with ``typical_p < 1`` (see _typical_rows)."""
    on = typical_p < 1.0
    rows = lambda: jnp.where(on[..., None], _typical_rows(l, keep, typical_p, ok_threshold), keep)
    return lax.cond(jnp.any(on), rows, lambda: keep)


def _typical_rows(l: jax.Array, keep: jax.Array, typical_p: jax.Array, ok_threshold) -> jax.Array:
    """Locally typical sampling on the kept set.

    Keeps the tokens whose surprisal is closest to the entropy of the (renormalised) kept
    distribution, in order of that distance, until their mass reaches ``typical_p``; ties on
    the distance at the boundary are kept. ``ok_threshold(dkeys, w, target)`` finds the
    distance cut-off (candidates: via sort; full vocabulary: via bisection).
    """
    m = jnp.max(jnp.where(keep, l, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(keep, jnp.exp(l - m), 0.0)
    z = jnp.sum(w, axis=-1, keepdims=True)
    logq = (l - m) - jnp.log(z)
    q = w / z
    entropy = -jnp.sum(jnp.where(keep & (q > 0), q * logq, 0.0), axis=-1, keepdims=True)
    d = jnp.where(keep, jnp.abs(-logq - entropy), jnp.inf)
    dkeys = _sortable(-d)  # larger key = more typical
    t = ok_threshold(dkeys, w, typical_p * z[..., 0])
    return keep & (dkeys >= t[..., None])


# ---------------------------------------------------------------------------------------
# Full-vocabulary exact filters (public, and the fallback path of the sampler)


def _when_any(active: jax.Array, search, shape) -> jax.Array:
    """Runs a threshold search only if some row uses the filter (0 = keep all otherwise)."""
    off = lambda: jnp.zeros(shape, jnp.uint32)
    return jnp.where(active, lax.cond(jnp.any(active), search, off), jnp.uint32(0))


def _top_k_threshold(keys: jax.Array, k: jax.Array) -> jax.Array:
    vocab = keys.shape[-1]
    on = (k > 0) & (k < vocab)
    # Counting with a float sum: an int32 reduction is ~4x slower on XLA:CPU (exact below 2^24).
    search = lambda: _largest_threshold(keys, lambda mask: jnp.sum(jnp.where(mask, 1.0, 0.0), axis=-1) >= k)
    return _when_any(on, search, keys.shape[:-1])


def _top_p_threshold(keys: jax.Array, w: jax.Array, p: jax.Array) -> jax.Array:
    target = p * jnp.sum(w, axis=-1)
    search = lambda: _largest_threshold(keys, lambda mask: _masked_sum(mask, w) >= target)
    return _when_any(p < 1.0, search, keys.shape[:-1])


def _bisect_mass(keys: jax.Array, w: jax.Array, target: jax.Array) -> jax.Array:
    return _largest_threshold(keys, lambda mask: _masked_sum(mask, w) >= target)


def _weights(l: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(m, w)``: each row's max ``[..., 1]`` (0 for a row with no finite logit) and the
    unnormalised probabilities ``exp(l - m)`` in float32."""
    m = jnp.max(l, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m, jnp.exp(l - m)


def _full_keep(l: jax.Array, knobs: SamplingKnobs, w: jax.Array) -> jax.Array:
    """Exact kept set over the whole vocabulary (l: float32 [N, V], tempered, sanitized;
    w: its ``_weights``)."""
    keys = _sortable(l)
    keep = keys >= _top_k_threshold(keys, knobs.top_k)[..., None]
    wk = jnp.where(keep, w, 0.0)
    keep &= keys >= _top_p_threshold(keys, wk, knobs.top_p)[..., None]
    # min-p: p_i >= min_p * p_max  <=>  exp(l_i - max) >= min_p (the max is always kept).
    keep &= w >= knobs.min_p[..., None]
    return _typical_keep(l, keep, knobs.typical_p, _bisect_mass)


def _full_draw(u: jax.Array, l: jax.Array, knobs: SamplingKnobs) -> tuple[jax.Array, jax.Array]:
    m, w = _weights(l)
    w = jnp.where(_full_keep(l, knobs, w), w, 0.0)
    idx = _inverse_cdf(u, w)
    logz = jnp.log(jnp.sum(w, axis=-1))
    chosen = jnp.take_along_axis(l, idx[..., None], axis=-1)[..., 0]
    return idx, (chosen - m[..., 0]) - logz


# ---------------------------------------------------------------------------------------
# Fast candidate path


def _sorted_typical_threshold(dkeys: jax.Array, w: jax.Array, target: jax.Array) -> jax.Array:
    """Typical cut-off on a small candidate set with a sort instead of bisection."""
    order = jnp.argsort(~dkeys, axis=-1, stable=True)  # most typical first
    ks = jnp.take_along_axis(dkeys, order, axis=-1)
    cum = jnp.cumsum(jnp.take_along_axis(w, order, axis=-1), axis=-1)
    j = jnp.minimum(jnp.sum(cum < target[..., None], axis=-1), w.shape[-1] - 1)
    return jnp.take_along_axis(ks, j[..., None], axis=-1)[..., 0]


def _candidate_draw(u, l, m, logz, knobs: SamplingKnobs, num_candidates: int):
    """Draw on the top candidates. Returns (ids, logprobs, covered, greedy_ids, greedy_lp)."""
    vocab = l.shape[-1]
    c = min(num_candidates, vocab)
    # Sorted descending; ties: lowest index first. The barrier matters: XLA:CPU lowers top_k
    # as sort+slice and pattern-matches it back to a fast TopK; slicing the outputs below
    # (v[..., -1]) would be merged into that slice and break the match, turning this into a
    # full 50k-wide sort (~500 ms instead of ~6 ms at 64 x 50257).
    v, vi = lax.optimization_barrier(lax.top_k(l, c))
    e = jnp.exp(v - m)
    last = v[..., -1]
    whole = c == vocab  # the candidates are the whole vocabulary: always covered

    # top-k
    k = knobs.top_k
    k_on = (k > 0) & (k < vocab)
    k_ok = ~k_on | (k <= c)
    t_k = jnp.where(k_on, jnp.take_along_axis(v, jnp.clip(k - 1, 0, c - 1)[..., None], axis=-1)[..., 0], -jnp.inf)
    keep = v >= t_k[..., None]
    z_k = jnp.where(k_on, jnp.sum(jnp.where(keep, e, 0.0), axis=-1), jnp.exp(logz))

    # top-p on the distribution renormalised over the top-k set
    p = knobs.top_p
    p_on = p < 1.0
    cum = jnp.cumsum(jnp.where(keep, e, 0.0), axis=-1)
    reach = cum >= (p * z_k)[..., None]
    p_ok = ~p_on | reach[..., -1]
    j = jnp.argmax(reach, axis=-1)
    t_p = jnp.where(p_on, jnp.take_along_axis(v, j[..., None], axis=-1)[..., 0], -jnp.inf)

    # min-p, then the combined threshold must lie strictly above everything not examined
    t_min = jnp.where(knobs.min_p > 0, m[..., 0] + jnp.log(knobs.min_p), -jnp.inf)
    t = jnp.maximum(jnp.maximum(t_k, t_p), t_min)
    keep = (v >= t[..., None]) & (e >= knobs.min_p[..., None])
    covered = k_ok & p_ok & ((t > last) | whole)

    keep = _typical_keep(v, keep, knobs.typical_p, _sorted_typical_threshold)
    w = jnp.where(keep, e, 0.0)
    j = _inverse_cdf(u, w)
    ids = jnp.take_along_axis(vi, j[..., None], axis=-1)[..., 0]
    chosen = jnp.take_along_axis(v, j[..., None], axis=-1)[..., 0]
    lp = (chosen - m[..., 0]) - jnp.log(jnp.sum(w, axis=-1))
    return ids, lp, covered, vi[..., 0], (v[..., 0] - m[..., 0]) - logz


def draw(
    u: jax.Array,
    logits: jax.Array,
    knobs: SamplingKnobs,
    *,
    num_candidates: int = NUM_CANDIDATES,
) -> tuple[jax.Array, jax.Array]:
    """The sampler's core: one uniform per row in, token id and its log-probability out.

    Args:
      u: float32[N] uniforms in [0, 1), one per row.
      logits: float[N, V] (any float dtype; computed in float32).
      knobs: per-row settings, each of shape [N].
      num_candidates: static size of the fast candidate set.

    Returns:
      (ids int32[N], logprobs float32[N]): the drawn token and its log-probability under the
      distribution it was drawn from (for greedy rows, under the log-softmax at temperature 1).
    """
    vocab = logits.shape[-1]
    knobs = _clip_knobs(knobs, vocab)
    greedy_row = knobs.temperature <= 0
    l = _scale(logits, knobs.temperature)
    m = jnp.max(l, axis=-1, keepdims=True)
    empty = ~(m[..., 0] > -jnp.inf)
    m = jnp.where(empty[..., None], 0.0, m)
    logz = jnp.log(jnp.sum(jnp.exp(l - m), axis=-1))

    ids, lp, covered, gid, glp = _candidate_draw(u, l, m, logz, knobs, num_candidates)
    covered |= greedy_row | empty

    def with_full(_):
        fid, flp = _full_draw(u, l, knobs)
        return jnp.where(covered, ids, fid), jnp.where(covered, lp, flp)

    ids, lp = lax.cond(jnp.all(covered), lambda _: (ids, lp), with_full, None)
    ids = jnp.where(greedy_row, gid, ids)
    lp = jnp.where(greedy_row, glp, lp)
    ids = jnp.where(empty, 0, ids).astype(jnp.int32)
    # A log-probability is <= 0; the clamp removes float rounding above 0 and is the last
    # guard against +inf (an empty kept set, which the knob clipping above rules out).
    lp = jnp.where(empty, -jnp.inf, jnp.minimum(lp, 0.0))
    return ids, lp


def probs(logits: jax.Array, knobs: SamplingKnobs) -> jax.Array:
    """The exact distribution :func:`draw` samples from, as float32 probabilities ``[N, V]``.

    Greedy rows (temperature 0) are one-hot on the greedy token; a row with no finite logit
    is one-hot on token 0. Used where the whole distribution is needed (speculative
    decoding's accept/reject rule), on few rows: it always takes the full-vocabulary path.
    """
    vocab = logits.shape[-1]
    knobs = _clip_knobs(knobs, vocab)
    l = _scale(logits, knobs.temperature)
    empty = ~(jnp.max(l, axis=-1, keepdims=True) > -jnp.inf)
    _, w = _weights(l)
    w = jnp.where(_full_keep(l, knobs, w), w, 0.0)
    p = w / jnp.sum(w, axis=-1, keepdims=True)
    top = _argmax(l)
    onehot = jax.nn.one_hot(jnp.where(empty[..., 0], 0, top), vocab, dtype=jnp.float32)
    return jnp.where((knobs.temperature <= 0)[..., None] | empty, onehot, p)


# ---------------------------------------------------------------------------------------
# Public API


def greedy(logits: jax.Array) -> jax.Array:
    """Greedy decoding: the index of the largest logit (lowest index on ties).

    NaN logits count as ``-inf``; a row with no finite value returns 0.

    Args:
      logits: float array ``[..., V]``.

    Returns:
      int32 array ``logits.shape[:-1]``.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> int(jaxdecode.greedy(jnp.array([4.51, 0.89, -1.90, 6.75, 1.63])))
      3
    """
    logits = V.check_float_logits("jaxdecode.greedy", logits)
    return _greedy(logits)


@jax.jit
def _greedy(logits: jax.Array) -> jax.Array:
    return _argmax(_sanitize(logits))


def _sample_impl(key: jax.Array, per_row: bool, logits: jax.Array, knobs: SamplingKnobs):
    batch = logits.shape[:-1]
    n = int(np.prod(batch, dtype=np.int64))
    flat = logits.reshape(n, logits.shape[-1])
    if per_row:
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key.reshape(n))
    else:
        u = jax.random.uniform(key, (n,), jnp.float32)
    fk = SamplingKnobs(*(x.reshape(n) for x in knobs))
    ids, lp = draw(u, flat, fk)
    return ids.reshape(batch), lp.reshape(batch)


_sample_impl = jax.jit(_sample_impl, static_argnums=1)


def sample_with_logprobs(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Like :func:`sample`, also returning each token's log-probability.

    The log-probability is taken under the distribution the token was drawn from (after
    temperature and truncation, renormalised); for greedy rows (temperature 0) it is the
    log-softmax of the logits at temperature 1.

    Returns:
      (ids int32[...], logprobs float32[...]).
    """
    fn = "jaxdecode.sample"
    logits = V.check_float_logits(fn, logits)
    batch = tuple(logits.shape[:-1])
    key, per_row = V.check_key(fn, key, batch)
    knobs = make_knobs(fn, batch, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
    return _sample_impl(key, per_row, logits, knobs)


def sample(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
) -> jax.Array:
    """Draws one token per row, exactly, after temperature and truncation.

    Order: temperature -> top-k -> top-p -> min-p -> typical-p -> draw (inverse CDF with one
    uniform per row). Every knob is a Python number or an array broadcastable to
    ``logits.shape[:-1]``; all are traced, so changing their values never recompiles.

    Args:
      key: a PRNG key (``jax.random.key(seed)``), or one key per row (shape
        ``logits.shape[:-1]``) so each row's draw depends only on its own key.
      logits: float array ``[..., V]`` (float32, bfloat16 or float16; computed in float32).
      temperature: >= 0. Logits are divided by it; 0 means greedy for that row.
      top_k: integer >= 0. Keep the k largest logits and every token tied with the k-th;
        0 means off.
      top_p: in (0, 1]. Keep the smallest set of most probable tokens whose probability
        mass reaches ``top_p`` (ties at the boundary kept; never fewer than one); 1 means off.
      min_p: in [0, 1]. Keep tokens whose probability is at least ``min_p`` times the most
        probable token's; 0 means off.
      typical_p: in (0, 1]. Locally typical sampling: keep the tokens whose surprisal is
        closest to the distribution's entropy until their mass reaches ``typical_p``;
        1 means off.

    Returns:
      int32 array of shape ``logits.shape[:-1]`` with ids in ``[0, V)``.

    Raises:
      TypeError: integer logits, or a key that is not a PRNG key.
      ValueError: a knob out of range, a knob that does not broadcast to the batch shape,
        or a key array of the wrong shape.

    Inside a user's ``jax.jit`` the knob values cannot be checked; out-of-range values are
    clipped to the allowed range (negative temperature acts as greedy).

    Example:
      >>> import jax, jax.numpy as jnp, jaxdecode
      >>> logits = jnp.array([[4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]])
      >>> ids = jaxdecode.sample(jax.random.key(0), logits, temperature=0.8, top_k=3)
      >>> int(ids[0]) in (0, 3, 7)
      True
    """
    return sample_with_logprobs(
        key, logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p
    )[0]


# Public filters: exact over the full vocabulary, removed entries set to -inf.


def _filter_knob(fn: str, name: str, value: Any, logits: jax.Array, dtype) -> jax.Array:
    spec = dict(_KNOB_SPECS[name])
    spec.pop("dtype")
    V.check_knob(fn, name, value, **spec)
    return V.broadcast_knob(fn, name, value, tuple(logits.shape[:-1]), dtype)


def apply_temperature(logits: jax.Array, temperature: Any) -> jax.Array:
    """Divides logits by a per-row temperature (float32 out). Temperature 0 leaves the row as is.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> jaxdecode.apply_temperature(jnp.array([2.0, 1.0]), 0.5).tolist()
      [4.0, 2.0]
    """
    fn = "jaxdecode.apply_temperature"
    logits = V.check_float_logits(fn, logits)
    t = _filter_knob(fn, "temperature", temperature, logits, np.float32)
    return _apply_temperature(logits, t)


@jax.jit
def _apply_temperature(logits, t):
    t = jnp.maximum(t, 0.0)
    return logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)[..., None]


def top_k_filter(logits: jax.Array, k: Any) -> jax.Array:
    """Sets every logit below the k-th largest to -inf (ties with the k-th kept; k=0 is off).

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> x = jnp.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
      >>> [bool(v > -jnp.inf) for v in jaxdecode.top_k_filter(x, 3)]
      [True, False, False, True, False, False, False, True, False]
    """
    fn = "jaxdecode.top_k_filter"
    logits = V.check_float_logits(fn, logits)
    return _top_k_filter(logits, _filter_knob(fn, "top_k", k, logits, np.int32))


@jax.jit
def _top_k_filter(logits, k):
    l = _sanitize(logits)
    keys = _sortable(l)
    keep = keys >= _top_k_threshold(keys, jnp.maximum(k, 0))[..., None]
    return jnp.where(keep, l, -jnp.inf)


def top_p_filter(logits: jax.Array, p: Any) -> jax.Array:
    """Nucleus filter: keeps the smallest most-probable set with mass >= p (ties kept).

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> jaxdecode.top_p_filter(jnp.array([3.0, 2.0, 1.0, 0.0]), 0.7).tolist()
      [3.0, 2.0, -inf, -inf]
    """
    fn = "jaxdecode.top_p_filter"
    logits = V.check_float_logits(fn, logits)
    return _top_p_filter(logits, _filter_knob(fn, "top_p", p, logits, np.float32))


@jax.jit
def _top_p_filter(logits, p):
    l = _sanitize(logits)
    _, w = _weights(l)
    keys = _sortable(l)
    keep = keys >= _top_p_threshold(keys, w, jnp.clip(p, _P_MIN, 1.0))[..., None]
    return jnp.where(keep, l, -jnp.inf)


def min_p_filter(logits: jax.Array, p: Any) -> jax.Array:
    """Keeps tokens with probability >= p times the largest probability (p=0 is off).

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> jaxdecode.min_p_filter(jnp.log(jnp.array([0.5, 0.3, 0.2])), 0.5).tolist()[2]
      -inf
    """
    fn = "jaxdecode.min_p_filter"
    logits = V.check_float_logits(fn, logits)
    return _min_p_filter(logits, _filter_knob(fn, "min_p", p, logits, np.float32))


@jax.jit
def _min_p_filter(logits, p):
    l = _sanitize(logits)
    _, w = _weights(l)
    return jnp.where(w >= jnp.clip(p, 0.0, 1.0)[..., None], l, -jnp.inf)


def typical_filter(logits: jax.Array, p: Any) -> jax.Array:
    """Locally typical filter (Meister et al. 2022, as Hugging Face's ``typical_p``).

    Keeps the tokens whose surprisal ``-log q`` is closest to the entropy of ``q``, in that
    order, until their mass reaches ``p`` (ties at the boundary kept); p=1 is off.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> out = jaxdecode.typical_filter(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), 0.5)
      >>> [bool(v > -jnp.inf) for v in out]
      [True, True, False, False]
    """
    fn = "jaxdecode.typical_filter"
    logits = V.check_float_logits(fn, logits)
    return _typical_filter(logits, _filter_knob(fn, "typical_p", p, logits, np.float32))


@jax.jit
def _typical_filter(logits, p):
    l = _sanitize(logits)
    keep = _typical_keep(l, l > -jnp.inf, jnp.clip(p, _P_MIN, 1.0), _bisect_mass)
    return jnp.where(keep, l, -jnp.inf)
