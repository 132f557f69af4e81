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


def _typical_rows(l: jax.Array, keep: jax.Array, typical_p: jax.Array, ok_threshold, with_keys: bool = False):
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
    out = keep & (dkeys >= t[..., None])
    return (out, dkeys) if with_keys else out


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
# Extended truncations: top-n-sigma, epsilon, eta, min_tokens_to_keep, XTC, dynamic
# temperature, mirostat v2. Rows that use any of them draw on an exact full-vocabulary path
# (one uniform per row, inverse CDF in vocabulary order); the others keep the fast path above.


class ExtraKnobs(NamedTuple):
    """Per-row settings of the extended truncations, each a float32/int32 array of shape ``[N]``.

    Attributes:
      top_n_sigma: float32[N]; keep logits >= max - n * std (over the kept logits); 0 is off.
      epsilon_cutoff: float32[N]; drop tokens with probability < epsilon; 0 is off.
      eta_cutoff: float32[N]; drop tokens with probability < min(eta, sqrt(eta) * exp(-H)); 0 is off.
      min_tokens_to_keep: int32[N]; every truncation keeps at least this many tokens; 1 is off.
      xtc_threshold: float32[N]; XTC's probability threshold.
      xtc_probability: float32[N]; chance per step that XTC acts; 0 is off.
      dynatemp_range: float32[N]; dynamic temperature's delta; 0 is off.
      dynatemp_exponent: float32[N]; dynamic temperature's exponent.
      mirostat_tau: float32[N]; mirostat v2's target surprisal in bits; 0 is off.
      mirostat_eta: float32[N]; mirostat v2's learning rate.
    """

    top_n_sigma: jax.Array
    epsilon_cutoff: jax.Array
    eta_cutoff: jax.Array
    min_tokens_to_keep: jax.Array
    xtc_threshold: jax.Array
    xtc_probability: jax.Array
    dynatemp_range: jax.Array
    dynatemp_exponent: jax.Array
    mirostat_tau: jax.Array
    mirostat_eta: jax.Array


# Eager checks (knob name -> check_knob arguments) and off values. ``sample`` takes every knob
# but mirostat's (it needs the per-row mu carried from step to step: generate only).
_EXTRA_SPECS: dict[str, dict[str, Any]] = {
    "top_n_sigma": dict(low=0.0, allowed="a number >= 0 (0 means off)", dtype=np.float32, off=0.0),
    "epsilon_cutoff": dict(low=0.0, high=1.0, high_open=True, allowed="a number in [0, 1) (0 means off)",
                           dtype=np.float32, off=0.0),
    "eta_cutoff": dict(low=0.0, high=1.0, high_open=True, allowed="a number in [0, 1) (0 means off)",
                       dtype=np.float32, off=0.0),
    "min_tokens_to_keep": dict(low=1, integer=True, allowed="an integer >= 1 (1 means off)", dtype=np.int32, off=1),
    "xtc_threshold": dict(low=0.0, high=1.0, allowed="a number in [0, 1] (above 0.5 XTC never acts)",
                          dtype=np.float32, off=0.1),
    "xtc_probability": dict(low=0.0, high=1.0, allowed="a number in [0, 1] (0 means off)", dtype=np.float32, off=0.0),
    "dynatemp_range": dict(low=0.0, allowed="a number >= 0 (0 means off)", dtype=np.float32, off=0.0),
    "dynatemp_exponent": dict(low=0.0, allowed="a number >= 0", dtype=np.float32, off=1.0),
    "mirostat_tau": dict(low=0.0, allowed="a number >= 0, the target surprisal in bits (0 means off)",
                         dtype=np.float32, off=0.0),
    "mirostat_eta": dict(low=0.0, allowed="a number >= 0, the learning rate", dtype=np.float32, off=0.1),
}
EXTRA_DEFAULTS: dict[str, Any] = {name: spec["off"] for name, spec in _EXTRA_SPECS.items()}


def check_extra(fn: str, name: str, value: Any) -> None:
    """The eager check of one extended knob (range, finiteness)."""
    spec = {k: v for k, v in _EXTRA_SPECS[name].items() if k not in ("dtype", "off")}
    V.check_knob(fn, name, value, **spec)
    if V.is_concrete(value) and np.asarray(value).dtype.kind == "f" and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{fn}: `{name}` must be finite, got {V._describe(value)}; allowed: {spec['allowed']}.")


def make_extra(fn: str, batch_shape: tuple[int, ...], checked: bool = False, **values: Any) -> ExtraKnobs:
    """:class:`ExtraKnobs` broadcast to ``batch_shape`` (missing knobs are off)."""
    out = {}
    for name, spec in _EXTRA_SPECS.items():
        value = values.get(name, spec["off"])
        if not checked:
            check_extra(fn, name, value)
        out[name] = V.broadcast_knob(fn, name, value, batch_shape, spec["dtype"])
    return ExtraKnobs(**out)


def extended_rows(ex: ExtraKnobs) -> jax.Array:
    """bool[N]: the rows that use an extended truncation (and so take the extended path)."""
    xtc = (ex.xtc_probability > 0) & (ex.xtc_threshold <= 0.5)  # above 0.5 two tokens can't pass it
    return ((ex.top_n_sigma > 0) | (ex.epsilon_cutoff > 0) | (ex.eta_cutoff > 0) | (ex.min_tokens_to_keep > 1)
            | xtc | (ex.dynatemp_range > 0) | (ex.mirostat_tau > 0))


def _dynatemp(x: jax.Array, t: jax.Array, delta: jax.Array, exponent: jax.Array) -> jax.Array:
    """llama.cpp's dynamic temperature: ``max(0, t - delta) + (t + delta - max(0, t - delta)) *
    (H / log N) ** exponent``, H the entropy of softmax(x) over its N finite logits (x: [N, V])."""
    finite = x > -jnp.inf
    n = jnp.sum(finite, axis=-1)
    m, w = _weights(x)
    z = jnp.sum(w, axis=-1, keepdims=True)
    q = w / z
    logq = (x - m) - jnp.log(z)
    h = -jnp.sum(jnp.where(finite & (q > 0), q * logq, 0.0), axis=-1)
    norm = h / jnp.log(jnp.maximum(n, 2).astype(jnp.float32))
    lo = jnp.maximum(t - delta, 0.0)
    dyn = lo + (t + delta - lo) * jnp.power(jnp.clip(norm, 0.0, 1.0), exponent)
    return jnp.where((delta > 0) & (n > 1), dyn, t)


def _keep_weights(l: jax.Array, keep: jax.Array):
    """``(m, w, z)`` of the distribution renormalised over ``keep``: its max [N, 1], the
    weights ``exp(l - m)`` on kept tokens (0 elsewhere) and their sum [N, 1]."""
    m = jnp.max(jnp.where(keep, l, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(keep, jnp.exp(l - m), 0.0)
    return m, w, jnp.sum(w, axis=-1, keepdims=True)


def _extended_keep(u_xtc: jax.Array, logits: jax.Array, knobs: SamplingKnobs, ex: ExtraKnobs,
                   mu: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(l, keep)``: the tempered logits and the kept set of every truncation, in the
    documented order (rows [N], V full)::

        temperature (dynamic when dynatemp_range > 0) -> top-n-sigma -> top-k -> top-p -> min-p
        -> typical-p -> epsilon -> eta -> XTC -> mirostat v2 -> draw

    Each filter sees the distribution renormalised over what the previous ones kept, and each
    keeps at least ``min_tokens_to_keep`` tokens of its input (the most probable ones; for
    typical-p the most typical; HF's semantics). XTC acts only when the row's ``u_xtc`` is
    below ``xtc_probability``.
    """
    vocab = logits.shape[-1]
    knobs = _clip_knobs(knobs, vocab)
    x = _sanitize(logits)
    t = jnp.where(knobs.temperature > 0, knobs.temperature, 1.0)
    t = _dynatemp(x, t, jnp.maximum(ex.dynatemp_range, 0.0), jnp.maximum(ex.dynatemp_exponent, 0.0))
    zero_t = t <= 0  # dynamic temperature 0 (t <= delta, no entropy): the argmax only
    l = _sanitize(x / jnp.where(zero_t, 1.0, t)[..., None])
    keys = _sortable(l)
    keep = l > -jnp.inf
    keep &= ~zero_t[..., None] | (l >= jnp.max(l, axis=-1, keepdims=True))
    mk = jnp.clip(ex.min_tokens_to_keep.astype(jnp.int32), 1, vocab)
    any_min = jnp.any(mk > 1)

    def at_least(new, prev, order_keys=None):
        """``new``, plus the ``mk`` best of ``prev`` by ``order_keys`` (default: the logits;
        ties kept). With ``mk == 1`` that is ``prev``'s most probable token(s), which epsilon
        can remove (e.g. a flat distribution); typical-p always keeps its most typical."""
        if order_keys is None:
            best = jnp.max(jnp.where(prev, l, -jnp.inf), axis=-1, keepdims=True)
            new = new | (prev & (l >= best))
            order_keys = keys

        def grow():
            masked = jnp.where(prev, order_keys, jnp.uint32(0))
            return new | (prev & (masked >= _top_k_threshold(masked, mk)[..., None]))

        return lax.cond(any_min, grow, lambda: new)

    def step(keep, on, fn):
        """Applies filter ``fn(keep) -> keep`` to the rows with ``on`` (skipped when none is)."""
        def run():
            return jnp.where(on[..., None], at_least(fn(keep), keep), keep)
        return lax.cond(jnp.any(on), run, lambda: keep)

    # top-n-sigma (llama.cpp): over the kept logits, keep l >= max - n * std (population std).
    def sigma(keep):
        cnt = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1).astype(jnp.float32)
        mean = jnp.sum(jnp.where(keep, l, 0.0), axis=-1, keepdims=True) / cnt
        std = jnp.sqrt(jnp.sum(jnp.where(keep, jnp.square(l - mean), 0.0), axis=-1, keepdims=True) / cnt)
        mx = jnp.max(jnp.where(keep, l, -jnp.inf), axis=-1, keepdims=True)
        return keep & (l >= mx - ex.top_n_sigma[..., None] * std)

    keep = step(keep, ex.top_n_sigma > 0, sigma)
    # top-k with min_tokens_to_keep: k = max(k, m) (HF).
    k = jnp.where(knobs.top_k > 0, jnp.maximum(knobs.top_k, mk), 0)
    keep &= keys >= _top_k_threshold(jnp.where(keep, keys, jnp.uint32(0)), k)[..., None]

    def top_p(keep):
        _, w, _ = _keep_weights(l, keep)
        return keep & (keys >= _top_p_threshold(keys, w, knobs.top_p)[..., None])

    keep = step(keep, knobs.top_p < 1.0, top_p)

    def min_p(keep):
        m, _, _ = _keep_weights(l, keep)
        return keep & (jnp.exp(l - m) >= knobs.min_p[..., None])

    keep = step(keep, knobs.min_p > 0, min_p)

    def typical():
        new, dkeys = _typical_rows(l, keep, knobs.typical_p, _bisect_mass, with_keys=True)
        return jnp.where((knobs.typical_p < 1.0)[..., None], at_least(new, keep, dkeys), keep)

    keep = lax.cond(jnp.any(knobs.typical_p < 1.0), typical, lambda: keep)

    def epsilon(keep):  # HF: p < epsilon removed
        _, w, z = _keep_weights(l, keep)
        return keep & (w >= ex.epsilon_cutoff[..., None] * z)

    keep = step(keep, ex.epsilon_cutoff > 0, epsilon)

    def eta(keep):  # HF: p < min(eta, sqrt(eta) * exp(-H)) removed
        m, w, z = _keep_weights(l, keep)
        q, logq = w / z, (l - m) - jnp.log(z)
        h = -jnp.sum(jnp.where(keep & (q > 0), q * logq, 0.0), axis=-1, keepdims=True)
        e = ex.eta_cutoff[..., None]
        return keep & (q >= jnp.minimum(e, jnp.sqrt(e) * jnp.exp(-h)))

    keep = step(keep, ex.eta_cutoff > 0, eta)

    # XTC (llama.cpp): with chance xtc_probability, when >= 2 tokens have p >= threshold, remove
    # all of them but the least likely (ties with it kept), if >= min_tokens_to_keep remain.
    xtc_on = (u_xtc < ex.xtc_probability) & (ex.xtc_threshold <= 0.5)

    def xtc():
        _, w, z = _keep_weights(l, keep)
        above = keep & (w >= ex.xtc_threshold[..., None] * z)
        last = jnp.min(jnp.where(above, l, jnp.inf), axis=-1, keepdims=True)
        left = keep & ~(above & (l > last))
        act = xtc_on & (jnp.sum(above, axis=-1) >= 2) & (jnp.sum(left, axis=-1) >= mk)
        return jnp.where(act[..., None], left, keep)

    keep = lax.cond(jnp.any(xtc_on), xtc, lambda: keep)

    # Mirostat v2 (llama.cpp): keep tokens with surprisal -log2 p <= mu (at least the top one).
    def mirostat(keep):
        m, w, z = _keep_weights(l, keep)
        surprise = -((l - m) - jnp.log(z)) / np.log(2.0)
        return keep & ((surprise <= mu[..., None]) | (l >= m))

    keep = step(keep, ex.mirostat_tau > 0, mirostat)
    return l, keep


def _extended_draw(u: jax.Array, u_xtc: jax.Array, logits: jax.Array, knobs: SamplingKnobs, ex: ExtraKnobs,
                   mu: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The exact draw on :func:`_extended_keep`'s set: (ids, logprobs) as :func:`draw`."""
    l, keep = _extended_keep(u_xtc, logits, knobs, ex, mu)
    m, w, z = _keep_weights(l, keep)
    idx = _inverse_cdf(u, w)
    chosen = jnp.take_along_axis(l, idx[..., None], axis=-1)[..., 0]
    return idx, (chosen - m[..., 0]) - jnp.log(z[..., 0])


def draw_extended(u: jax.Array, u_xtc: jax.Array, logits: jax.Array, knobs: SamplingKnobs, ex: ExtraKnobs,
                  mu: jax.Array, *, num_candidates: int = NUM_CANDIDATES):
    """:func:`draw` with the extended truncations. Rows that use none of them get exactly
    :func:`draw`'s result; the others are drawn by :func:`_extended_draw` (skipped by a
    ``lax.cond`` when no row needs it). Greedy rows (temperature 0) stay greedy.

    Args:
      u: float32[N] uniforms for the draw; u_xtc: float32[N] uniforms for XTC's coin.
      logits, knobs, num_candidates: as :func:`draw`.
      ex: :class:`ExtraKnobs` ([N] each).
      mu: float32[N], mirostat's current mu per row (read only where mirostat_tau > 0).

    Returns:
      (ids int32[N], logprobs float32[N], new_mu float32[N]): mu updated by mirostat v2,
      ``mu - eta * (surprisal - tau)`` with the drawn token's surprisal in bits, in the rows
      with mirostat on (unchanged elsewhere).
    """
    ids, lp = draw(u, logits, knobs, num_candidates=num_candidates)
    greedy_row = knobs.temperature <= 0
    ext = extended_rows(ex) & ~greedy_row & jnp.any(_sanitize(logits) > -jnp.inf, axis=-1)

    def run():
        eids, elp = _extended_draw(u, u_xtc, logits, knobs, ex, mu)
        return jnp.where(ext, eids, ids).astype(jnp.int32), jnp.where(ext, jnp.minimum(elp, 0.0), lp)

    ids, lp = lax.cond(jnp.any(ext), run, lambda: (ids, lp))
    miro = (ex.mirostat_tau > 0) & ext
    new_mu = mu - ex.mirostat_eta * (-lp / np.log(2.0) - ex.mirostat_tau)
    return ids, lp, jnp.where(miro, new_mu, mu)


def draw_step(step_keys: jax.Array, logits: jax.Array, knobs: SamplingKnobs, ex: ExtraKnobs | None = None,
              mu: jax.Array | None = None):
    """One decode step's draw from per-row step keys: the one key scheme of
    :func:`jaxdecode.generate` and the serving engine.

    Row r's uniform is ``uniform(step_keys[r])`` (the decoders pass ``fold_in(row_key, step)``);
    with the extended knobs (``ex`` not None) XTC's coin is ``uniform(fold_in(step_keys[r], 1))``
    and the draw is :func:`draw_extended`, otherwise :func:`draw`.

    Args:
      step_keys: key[N], one PRNG key per row for this step.
      logits, knobs: as :func:`draw`.
      ex: :class:`ExtraKnobs` ([N] each), or None (static) for the plain draw.
      mu: float32[N], mirostat's mu per row (with ``ex``; returned unchanged without).

    Returns:
      (ids int32[N], logprobs float32[N], mu): ``mu`` updated as :func:`draw_extended` does.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdecode._sampling import SamplingKnobs, draw_step
      >>> knobs = SamplingKnobs(jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1), jnp.zeros(1), jnp.ones(1))
      >>> ids, lp, _ = draw_step(jax.random.split(jax.random.key(0), 1), jnp.array([[0.0, 3.0, 1.0]]), knobs)
      >>> ids.tolist()
      [1]
    """
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys)
    if ex is None:
        ids, lp = draw(u, logits, knobs)
        return ids, lp, mu
    u_xtc = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32))(step_keys)
    return draw_extended(u, u_xtc, logits, knobs, ex, mu)


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


def _sample_impl(key: jax.Array, per_row: bool, logits: jax.Array, knobs: SamplingKnobs, ex: Any):
    batch = logits.shape[:-1]
    n = int(np.prod(batch, dtype=np.int64))
    flat = logits.reshape(n, logits.shape[-1])
    if per_row:
        keys = key.reshape(n)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        u_xtc = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32))(keys)
    else:
        u = jax.random.uniform(key, (n,), jnp.float32)
        u_xtc = jax.random.uniform(jax.random.fold_in(key, 1), (n,), jnp.float32)
    fk = SamplingKnobs(*(x.reshape(n) for x in knobs))
    if ex is None:  # static: every extended knob at its default (Python values)
        ids, lp = draw(u, flat, fk)
    else:
        fe = ExtraKnobs(*(x.reshape(n) for x in ex))
        ids, lp, _ = draw_extended(u, u_xtc, flat, fk, fe, jnp.zeros((n,), jnp.float32))
    return ids.reshape(batch), lp.reshape(batch)


_sample_impl = jax.jit(_sample_impl, static_argnums=1)

# The extended knobs ``sample`` takes (mirostat needs a mu carried across steps: generate only).
SAMPLE_EXTRA = ("top_n_sigma", "epsilon_cutoff", "eta_cutoff", "min_tokens_to_keep", "xtc_threshold",
                "xtc_probability", "dynatemp_range", "dynatemp_exponent")


def _sample_extra(fn: str, batch: tuple[int, ...], values: dict[str, Any]) -> Any:
    """The extended knobs as :class:`ExtraKnobs`, or None when all are left at their (Python)
    defaults, so that plain sampling compiles without the extended path."""
    if all(isinstance(v, (int, float)) and v == EXTRA_DEFAULTS[k] for k, v in values.items()):
        for k, v in values.items():
            check_extra(fn, k, v)
        return None
    return make_extra(fn, batch, **values)


def sample_with_logprobs(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    top_n_sigma: Any = 0.0,
    epsilon_cutoff: Any = 0.0,
    eta_cutoff: Any = 0.0,
    min_tokens_to_keep: Any = 1,
    xtc_threshold: Any = 0.1,
    xtc_probability: Any = 0.0,
    dynatemp_range: Any = 0.0,
    dynatemp_exponent: Any = 1.0,
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
    ex = _sample_extra(fn, batch, dict(
        top_n_sigma=top_n_sigma, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
        min_tokens_to_keep=min_tokens_to_keep, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability,
        dynatemp_range=dynatemp_range, dynatemp_exponent=dynatemp_exponent))
    return _sample_impl(key, per_row, logits, knobs, ex)


def sample(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    top_n_sigma: Any = 0.0,
    epsilon_cutoff: Any = 0.0,
    eta_cutoff: Any = 0.0,
    min_tokens_to_keep: Any = 1,
    xtc_threshold: Any = 0.1,
    xtc_probability: Any = 0.0,
    dynatemp_range: Any = 0.0,
    dynatemp_exponent: Any = 1.0,
) -> jax.Array:
    """Draws one token per row, exactly, after temperature and truncation.

    Order: temperature (dynamic with ``dynatemp_range``) -> top-n-sigma -> top-k -> top-p ->
    min-p -> typical-p -> epsilon -> eta -> XTC -> draw (inverse CDF with one uniform per row;
    XTC's coin is a second uniform from ``fold_in(key, 1)``). Every knob is a Python number or
    an array broadcastable to ``logits.shape[:-1]``; all are traced, so changing their values
    never recompiles (leaving every extended knob, top-n-sigma onwards, at its Python default
    compiles a smaller program without them: the first call that sets one compiles once more).
    Rows that use an extended knob are drawn on the exact full-vocabulary path.

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
      top_n_sigma: >= 0. Keep logits >= max - n * std of the kept logits (llama.cpp); 0 is off.
      epsilon_cutoff: in [0, 1). Drop tokens with probability < epsilon (HF); 0 is off.
      eta_cutoff: in [0, 1). Drop tokens with probability < min(eta, sqrt(eta) * exp(-H)),
        H the entropy (HF); 0 is off.
      min_tokens_to_keep: int >= 1. Every truncation keeps at least this many of the tokens it
        is given (HF's semantics; top-k becomes max(k, n)).
      xtc_threshold, xtc_probability: in [0, 1]. XTC (llama.cpp): with chance
        ``xtc_probability``, when at least two tokens have probability >= ``xtc_threshold``,
        remove all of them but the least likely. Probability 0 is off.
      dynatemp_range, dynatemp_exponent: >= 0. Dynamic temperature (llama.cpp):
        ``T = max(0, t - range) + (t + range - max(0, t - range)) * (H / log N) ** exponent``.
        Range 0 is off.

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
        key, logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        top_n_sigma=top_n_sigma, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
        min_tokens_to_keep=min_tokens_to_keep, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability,
        dynatemp_range=dynatemp_range, dynatemp_exponent=dynatemp_exponent,
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
