"""The JAX sampler (jaxdecode._sampling) against the plain-NumPy reference (jaxdecode.reference).

* filters: exact equality with the reference (same -inf pattern, same kept values), plain,
  under jax.jit and under jax.vmap, several shapes / dtypes / per-row knobs;
* draws: the u-grid test (deterministic: the sampler's inverse CDF evaluated on a regular grid
  of uniforms reproduces the reference probabilities to within one grid step) and chi-square
  tests on 10^5 real draws with fixed keys, on both the fast candidate path and the
  full-vocabulary fallback path;
* log-probabilities, degenerate inputs, reproducibility, per-row knobs and keys, compile
  count, argument errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxdecode
from jaxdecode import _sampling
from jaxdecode import reference as R

NUM_CANDIDATES = _sampling.NUM_CANDIDATES
# Most sampler tests share one batch shape: every new shape costs a compilation (seconds).
B, V = 96, 300
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def random_logits(rng: np.random.Generator, shape, scale: float = 3.0, ties: bool = False) -> np.ndarray:
    x = rng.normal(size=shape) * scale
    if ties:  # a coarse grid: many exact ties, also at the top-k / top-p boundaries
        x = np.round(x * 2) / 2
    return x.astype(np.float32)


def as_dtype(x: np.ndarray, dtype: str) -> tuple[jax.Array, np.ndarray]:
    """The JAX array in ``dtype`` and the same values as a NumPy array for the reference."""
    xj = jnp.asarray(x).astype(DTYPES[dtype])
    return xj, np.asarray(xj)


# ---------------------------------------------------------------------------------------
# Filters: exact equality with the reference

FILTERS = {
    "top_k": (jaxdecode.top_k_filter, R.top_k_filter),
    "top_p": (jaxdecode.top_p_filter, R.top_p_filter),
    "min_p": (jaxdecode.min_p_filter, R.min_p_filter),
    "typical": (jaxdecode.typical_filter, R.typical_filter),
    "temperature": (jaxdecode.apply_temperature, R.apply_temperature),
}


def knob_values(name: str, rng: np.random.Generator, batch, vocab: int):
    """Scalars (including the edge values) and per-row arrays for one filter."""
    if name == "top_k":
        scalars = [0, 1, 5, vocab - 1, vocab, vocab + 7]
        per_row = rng.integers(0, vocab + 3, size=batch)
    elif name in ("top_p", "typical"):
        scalars = [1e-6, 0.3, 0.9, 1.0]
        per_row = rng.choice([1e-6, 0.1, 0.5, 0.75, 0.95, 1.0], size=batch).astype(np.float32)
    elif name == "min_p":
        scalars = [0.0, 0.05, 0.5, 1.0]
        per_row = rng.choice([0.0, 1e-3, 0.05, 0.3, 1.0], size=batch).astype(np.float32)
    else:
        scalars = [0.0, 0.3, 1.0, 2.5]
        per_row = rng.choice([0.0, 0.1, 0.7, 1.0, 3.0], size=batch).astype(np.float32)
    return scalars + [per_row]


_JIT = {name: jax.jit(fns[0]) for name, fns in FILTERS.items()}
_VMAP = {name: jax.vmap(fns[0]) for name, fns in FILTERS.items()}


def run_filter(name: str, mode: str, x: jax.Array, knob):
    if mode == "plain":
        return FILTERS[name][0](x, knob)
    if mode == "jit":
        return _JIT[name](x, knob)  # the knob is traced
    # vmap over the leading batch axis with a per-row knob.
    knob = np.broadcast_to(np.asarray(knob), x.shape[:-1])
    return _VMAP[name](x, knob)


def assert_filter_equal(name: str, got: np.ndarray, want: np.ndarray, msg: str = ""):
    """Bit-for-bit equality. Temperature scaling alone is allowed one ulp: XLA divides by a
    per-row value by multiplying with its reciprocal."""
    assert got.dtype == np.float32 and got.shape == want.shape
    if name != "temperature":
        np.testing.assert_array_equal(got, want, err_msg=msg)
        return
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=msg)
    np.testing.assert_array_max_ulp(got[finite], want[finite], maxulp=1)


@pytest.mark.parametrize("mode", ["plain", "jit", "vmap"])
@pytest.mark.parametrize("shape", [(6, 97), (2, 3, 300)])
@pytest.mark.parametrize("name", list(FILTERS))
def test_filters_equal_reference(name, shape, mode, np_rng):
    ref_fn = FILTERS[name][1]
    for dtype in DTYPES:
        for ties in (False, True):
            x, xn = as_dtype(random_logits(np_rng, shape, ties=ties), dtype)
            for knob in knob_values(name, np_rng, shape[:-1], shape[-1]):
                got = np.asarray(run_filter(name, mode, x, knob))
                # Same -inf pattern and the same kept values.
                assert_filter_equal(name, got, ref_fn(xn, knob), f"{name} {dtype} ties={ties} knob={knob!r} mode={mode}")


def test_filters_on_unbatched_logits(np_rng):
    x = random_logits(np_rng, (1000,))
    for name, (jax_fn, ref_fn) in FILTERS.items():
        knob = {"top_k": 37, "top_p": 0.8, "min_p": 0.05, "typical": 0.7, "temperature": 0.6}[name]
        assert_filter_equal(name, np.asarray(jax_fn(jnp.asarray(x), knob)), ref_fn(x, knob), name)


def test_filters_sanitize_degenerate_values():
    x = np.array([[np.nan, np.inf, 1.0, -np.inf, 1e30, -1e30]], np.float32)
    for name in ("top_k", "top_p", "min_p", "typical"):
        jax_fn, ref_fn = FILTERS[name]
        knob = {"top_k": 2, "top_p": 0.5, "min_p": 0.5, "typical": 0.5}[name]
        got = np.asarray(jax_fn(jnp.asarray(x), knob))
        np.testing.assert_array_equal(got, ref_fn(x, knob), err_msg=name)
        assert got[0, 0] == -np.inf and got[0, 1] == R.F32_MAX  # NaN -> -inf, +inf -> max float
    # All -inf / NaN rows pass through as all -inf.
    empty = np.array([[-np.inf, np.nan, -np.inf]], np.float32)
    for name in ("top_k", "top_p", "min_p", "typical"):
        got = np.asarray(FILTERS[name][0](jnp.asarray(empty), 0.5 if name != "top_k" else 1))
        assert np.all(got == -np.inf), name


def test_filter_ties_are_kept():
    x = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    np.testing.assert_array_equal(np.isfinite(jaxdecode.top_k_filter(x, 1)), [[0, 1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(jaxdecode.top_k_filter(x, 4)), [[0, 1, 1, 1, 1, 0]])
    # top-p: the single most probable token alone has mass < 0.3, its ties come along.
    np.testing.assert_array_equal(np.isfinite(jaxdecode.top_p_filter(x, 0.05)), [[0, 1, 1, 0, 1, 0]])
    # min_p = 1 keeps exactly the tokens tied with the maximum.
    np.testing.assert_array_equal(np.isfinite(jaxdecode.min_p_filter(x, 1.0)), [[0, 1, 1, 0, 1, 0]])


def test_signed_zero_ties_are_ties():
    # -0.0 == 0.0: both are tied with the k-th largest value and must both be kept.
    for row in ([0.0, -0.0, -1.0], [-0.0, 0.0, -1.0]):
        x = np.array(row, np.float32)
        np.testing.assert_array_equal(np.isfinite(R.top_k_filter(x, 1)), [1, 1, 0])
        np.testing.assert_array_equal(np.isfinite(np.asarray(jaxdecode.top_k_filter(jnp.asarray(x), 1))), [1, 1, 0])
    # The same in the sampler's full-vocabulary path (top_k > NUM_CANDIDATES): 129 larger
    # logits, then the tied zeros at the boundary; a huge temperature makes the kept set
    # nearly uniform so that every kept token shows up.
    x = np.concatenate([np.linspace(1, 2, 129), [0.0, -0.0], -np.ones(V - 131)]).astype(np.float32)
    np.testing.assert_array_equal(R.sample_probs(x, temperature=1e9, top_k=130) > 0, np.arange(V) < 131)
    logits = jnp.broadcast_to(jnp.asarray(x), (B, V))
    ids = np.concatenate([np.asarray(jaxdecode.sample(jax.random.key(s), logits, top_k=130, temperature=1e9)) for s in range(40)])
    assert {129, 130} <= set(ids.tolist()) and ids.max() <= 130


def test_greedy_equals_reference(np_rng):
    for dtype in DTYPES:
        x, xn = as_dtype(random_logits(np_rng, (2, 5, 300), ties=True), dtype)
        np.testing.assert_array_equal(np.asarray(jaxdecode.greedy(x)), R.greedy(xn))
        np.testing.assert_array_equal(np.asarray(jax.jit(jaxdecode.greedy)(x)), R.greedy(xn))
        np.testing.assert_array_equal(np.asarray(jax.vmap(jaxdecode.greedy)(x)), R.greedy(xn))
    x = np.array([[np.nan, 1.0, np.inf, np.inf], [-np.inf] * 4, [np.nan] * 4, [2.0, 2.0, 1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(jaxdecode.greedy(jnp.asarray(x))), [2, 0, 0, 0])
    np.testing.assert_array_equal(R.greedy(x), [2, 0, 0, 0])


# ---------------------------------------------------------------------------------------
# The sampler's distribution

VOCAB = 1000

# (label, knobs, path). The path is checked against the reference below.
COMBOS = [
    ("temp0.7_k50", dict(temperature=0.7, top_k=50), "fast"),
    ("p0.5", dict(top_p=0.5), "fast"),
    ("min_p0.1", dict(min_p=0.1), "fast"),
    ("all_knobs", dict(temperature=1.3, top_k=100, top_p=0.9, min_p=0.02, typical_p=0.9), "fast"),
    ("plain", dict(top_k=0, top_p=1.0), "full"),
    ("p0.999", dict(top_p=0.999), "full"),
    ("k300", dict(top_k=300), "full"),
    ("typical0.9_t1.5", dict(temperature=1.5, typical_p=0.9), "full"),
]


@pytest.fixture(scope="module")
def stats_row() -> np.ndarray:
    """One fixed row of logits: softmax spread over many tokens (top 128 hold ~80% of the mass)."""
    return random_logits(np.random.default_rng(7), (VOCAB,), scale=2.0)


def path_of(row: np.ndarray, knobs: dict) -> str:
    """Whether the JAX sampler can decide the row on its top-NUM_CANDIDATES candidates."""
    pre = {k: v for k, v in knobs.items() if k != "typical_p"}
    kept = int(np.sum(R.sample_probs(row, **pre) > 0))
    if kept < NUM_CANDIDATES:
        return "fast"
    assert kept > NUM_CANDIDATES
    return "full"


_draw = jax.jit(_sampling.draw, static_argnames="num_candidates")


def grid_counts(row: np.ndarray, knobs: dict, m: int, dtype=jnp.float32) -> np.ndarray:
    """How many of the m uniforms (i + 1/2) / m the sampler maps to each token."""
    u = (jnp.arange(m, dtype=jnp.float32) + 0.5) / m
    logits = jnp.broadcast_to(jnp.asarray(row).astype(dtype), (m, row.size))
    full = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0), **knobs}
    k = _sampling.make_knobs("test", (m,), **full)
    ids, _ = _draw(u, logits, k)
    return np.bincount(np.asarray(ids), minlength=row.size)


@pytest.mark.parametrize("label,knobs,path", COMBOS, ids=[c[0] for c in COMBOS])
def test_grid_of_uniforms_matches_reference_probabilities(label, knobs, path, stats_row):
    assert path_of(stats_row, knobs) == path
    m = 20_000
    counts = grid_counts(stats_row, knobs, m)
    expected = m * R.sample_probs(stats_row, **knobs)
    # Each token owns an interval of the unit interval; a grid of m points hits it
    # floor/ceil(m * p) times (float32 rounding of the CDF allows one more).
    assert np.all(counts[expected == 0] == 0), np.nonzero(counts[expected == 0])
    assert np.max(np.abs(counts - expected)) <= 2.0, (label, np.argmax(np.abs(counts - expected)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grid_with_low_precision_logits(dtype, stats_row):
    _, row = as_dtype(stats_row, dtype)
    for knobs in (dict(temperature=0.9, top_k=40, top_p=0.8), dict(top_p=0.95, min_p=0.001)):
        counts = grid_counts(row.astype(np.float32), knobs, 20_000, dtype=DTYPES[dtype])
        expected = 20_000 * R.sample_probs(row, **knobs)
        assert np.all(counts[expected == 0] == 0)
        assert np.max(np.abs(counts - expected)) <= 2.0, knobs


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value, tiny expected bins merged into one (zero-probability bins
    must be empty and are checked by the caller)."""
    n = counts.sum()
    expected = n * probs
    support = probs > 0
    obs, exp = counts[support].astype(np.float64), expected[support]
    small = exp < min_expected
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    exp *= obs.sum() / exp.sum()
    if exp.size < 2:
        return 1.0
    return float(scipy.stats.chisquare(obs, exp).pvalue)


# The grid test above already pins the distribution of every combination exactly; the
# chi-square tests add the public path (key -> uniforms -> ids). The full-vocabulary typical-p
# combination is left to the grid test: it is the slowest, and the key handling is the same.
CHI_COMBOS = [c for c in COMBOS if c[0] != "typical0.9_t1.5"]


@pytest.fixture(scope="module")
def stats_batch(stats_row) -> jax.Array:
    """The stats row repeated 10^5 times (one batched call per knob combination)."""
    return jnp.broadcast_to(jnp.asarray(stats_row), (100_000, VOCAB))


@pytest.mark.parametrize("label,knobs,path", CHI_COMBOS, ids=[c[0] for c in CHI_COMBOS])
def test_draws_chi_square(label, knobs, path, stats_row, stats_batch):
    logits = stats_batch
    key = jax.random.key(1234)
    ids = np.asarray(jaxdecode.sample(key, logits, **knobs))
    counts = np.bincount(ids, minlength=VOCAB)
    probs = R.sample_probs(stats_row, **knobs)
    assert np.all(counts[probs == 0] == 0), f"{label}: drew tokens outside the kept set"
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue > 1e-4, f"{label}: chi-square p-value {pvalue}"
    # The test has teeth: a 5% error in the temperature is rejected.
    wrong = R.sample_probs(stats_row, **{**knobs, "temperature": knobs.get("temperature", 1.0) * 1.05})
    assert chi_square_pvalue(counts, wrong) < 1e-4, f"{label}: the chi-square test cannot tell T from 1.05 T"


def test_draws_chi_square_small_vocab_and_per_row_knobs():
    # V < NUM_CANDIDATES: the candidates are the whole vocabulary. Two rows with different knobs.
    row = random_logits(np.random.default_rng(3), (50,), scale=1.5)
    n = 50_000
    logits = jnp.broadcast_to(jnp.asarray(row), (2, n, 50))
    temperature = np.array([[0.8], [1.6]], np.float32) * np.ones((2, n), np.float32)
    typical = np.array([[1.0], [0.7]], np.float32) * np.ones((2, n), np.float32)
    ids = np.asarray(jaxdecode.sample(jax.random.key(99), logits, temperature=temperature, typical_p=typical))
    for r, (t, tp) in enumerate([(0.8, 1.0), (1.6, 0.7)]):
        probs = R.sample_probs(row, temperature=t, typical_p=tp)
        counts = np.bincount(ids[r], minlength=50)
        assert np.all(counts[probs == 0] == 0)
        assert chi_square_pvalue(counts, probs) > 1e-4


# ---------------------------------------------------------------------------------------
# Log-probabilities and the full distribution


def random_knobs(rng: np.random.Generator, b: int, vocab: int) -> dict:
    """Per-row knobs mixing greedy rows, the fast path and the full-vocabulary path."""
    return dict(
        temperature=rng.choice([0.0, 0.01, 0.5, 1.0, 1.7, 5.0], size=b).astype(np.float32),
        top_k=rng.choice([0, 1, 3, 50, 200, vocab], size=b),
        top_p=rng.choice([1e-3, 0.3, 0.9, 0.99, 1.0], size=b).astype(np.float32),
        min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 1.0], size=b).astype(np.float32),
        typical_p=rng.choice([0.2, 0.8, 1.0, 1.0], size=b).astype(np.float32),
    )


def test_sample_with_logprobs_is_log_reference_probability(np_rng):
    x = random_logits(np_rng, (B, V), scale=2.0)
    knobs = random_knobs(np_rng, B, V)
    probs = R.sample_probs(x, **knobs)
    log_softmax = R.log_softmax(x)
    greedy_rows = knobs["temperature"] == 0
    for seed in range(3):
        ids, lp = jaxdecode.sample_with_logprobs(jax.random.key(seed), jnp.asarray(x), **knobs)
        ids, lp = np.asarray(ids), np.asarray(lp)
        drawn = np.arange(B), ids
        assert np.all(probs[drawn] > 0)
        # Greedy rows report the log-softmax at temperature 1; sampled rows the log of the
        # probability under the (tempered, truncated, renormalised) distribution.
        want = np.where(greedy_rows, log_softmax[drawn], np.log(probs[drawn]))
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=2e-5)


def nasty_logits(rng: np.random.Generator, b: int, v: int) -> np.ndarray:
    """Random logits sprinkled with -inf, NaN, +-1e30 and +inf, plus hand-made degenerate rows."""
    x = rng.normal(size=(b, v)).astype(np.float32) * 3
    specials = np.array([-np.inf, np.nan, 1e30, -1e30, np.inf], np.float32)
    for i in range(b):
        n = rng.integers(0, v // 2)
        x[i, rng.choice(v, n, replace=False)] = rng.choice(specials, n, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    x[0] = -np.inf  # an all -inf row
    x[1] = np.nan  # an all NaN row
    x[2, :] = -np.inf
    x[2, 5] = np.nan  # nothing finite
    x[3, :] = -np.inf
    x[3, :4] = [np.inf, np.inf, 0.0, np.nan]  # two +inf: a fair coin between 0 and 1
    x[4, :] = -np.inf
    x[4, :4] = [np.inf, 1.0, 2.0, -1e30]  # +inf beats every finite logit
    x[5, :] = -1e30
    x[5, 7] = 1e30  # huge finite values
    return x


@pytest.mark.parametrize("v", [40, V])
def test_drawn_id_is_always_in_the_kept_set(v, np_rng):
    x = nasty_logits(np_rng, B, v)
    knobs = random_knobs(np_rng, B, v)
    probs = R.sample_probs(x, **knobs)
    for seed in range(4):
        ids, lp = jaxdecode.sample_with_logprobs(jax.random.key(seed), jnp.asarray(x), **knobs)
        ids, lp = np.asarray(ids), np.asarray(lp)
        assert ids.dtype == np.int32 and np.all((ids >= 0) & (ids < v))
        bad = np.nonzero(probs[np.arange(B), ids] <= 0)[0]
        assert bad.size == 0, [(int(i), int(ids[i]), {k: val[i] for k, val in knobs.items()}) for i in bad]
        # Rows with nothing finite: token 0, log-probability -inf.
        assert np.all(ids[:3] == 0) and np.all(lp[:3] == -np.inf)
        assert ids[3] in (0, 1)
        np.testing.assert_allclose(lp[3], np.log(0.5), rtol=1e-6)
        assert ids[4] == 0 and lp[4] == 0.0
        assert ids[5] == 7 and lp[5] == 0.0
        assert not np.any(np.isnan(lp))
        sampled = (knobs["temperature"] > 0) & (np.arange(B) >= 3)
        np.testing.assert_allclose(lp[sampled], np.log(probs[np.arange(B), ids][sampled]), rtol=1e-5, atol=2e-5)


def test_grid_on_nasty_rows_matches_reference(np_rng):
    """The u-grid check on rows with infinities / NaN / huge values (fast and full paths)."""
    x = nasty_logits(np_rng, 12, V)[3:]
    m = 4000
    for i, row in enumerate(x):
        for knobs in (dict(temperature=0.8), dict(top_k=10, top_p=0.9), dict(min_p=0.05, typical_p=0.8)):
            counts = grid_counts(row, knobs, m)
            expected = m * R.sample_probs(row, **knobs)
            assert np.all(counts[expected == 0] == 0), (i, knobs)
            assert np.max(np.abs(counts - expected)) <= 2.0, (i, knobs)


def test_sampling_probs_equals_reference(np_rng):
    """``_sampling.probs`` (the whole distribution, used by speculative decoding)."""
    x = np.concatenate([nasty_logits(np_rng, B // 2, V), random_logits(np_rng, (B // 2, V), scale=2.0)])
    knobs = random_knobs(np_rng, B, V)
    got = np.asarray(jax.jit(_sampling.probs)(jnp.asarray(x), _sampling.make_knobs("test", (B,), **knobs)))
    np.testing.assert_allclose(got, R.sample_probs(x, **knobs), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Reproducibility, per-row knobs and keys


def test_same_key_same_ids_other_key_other_ids(np_rng):
    x = jnp.asarray(random_logits(np_rng, (B, V), scale=0.5))
    a = np.asarray(jaxdecode.sample(jax.random.key(5), x, top_p=0.95))
    b = np.asarray(jaxdecode.sample(jax.random.key(5), x, top_p=0.95))
    c = np.asarray(jaxdecode.sample(jax.random.key(6), x, top_p=0.95))
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5
    # A raw uint32[2] key is the same key as the typed one.
    d = np.asarray(jaxdecode.sample(jax.random.key_data(jax.random.key(5)), x, top_p=0.95))
    np.testing.assert_array_equal(a, d)
    # Under jit (knobs traced) the draws are the same.
    e = np.asarray(jax.jit(lambda k, l, p: jaxdecode.sample(k, l, top_p=p))(jax.random.key(5), x, 0.95))
    np.testing.assert_array_equal(a, e)


def test_per_row_temperature_zero_is_greedy_while_others_sample(np_rng):
    x = random_logits(np_rng, (B, V), scale=0.3)
    temperature = np.where(np.arange(B) % 2 == 0, 0.0, 1.5).astype(np.float32)
    draws = np.stack([np.asarray(jaxdecode.sample(jax.random.key(s), jnp.asarray(x), temperature=temperature)) for s in range(20)])
    greedy_ids = R.greedy(x)
    np.testing.assert_array_equal(draws[:, 0::2], np.broadcast_to(greedy_ids[0::2], (20, B // 2)))
    assert all(len(set(draws[:, i].tolist())) > 5 for i in range(1, B, 2))


def test_per_row_top_k(np_rng):
    x = random_logits(np_rng, (B, V), scale=0.2)
    top_k = np.array([1, 3, 0] * (B // 3))
    draws = np.stack([np.asarray(jaxdecode.sample(jax.random.key(s), jnp.asarray(x), top_k=top_k)) for s in range(20)])
    order = np.argsort(-x, axis=-1)
    for i in range(B):
        seen = set(draws[:, i].tolist())
        if top_k[i] == 1:
            assert seen == {order[i, 0]}
        elif top_k[i] == 3:
            assert seen <= set(order[i, :3].tolist()) and len(seen) > 1
        else:
            assert len(seen) > 10


def test_per_row_keys_make_rows_independent(np_rng):
    x = random_logits(np_rng, (B, V), scale=0.5)
    keys = jax.random.split(jax.random.key(11), B)
    ids = np.asarray(jaxdecode.sample(keys, jnp.asarray(x), temperature=0.9, top_k=100))
    # Change every other row (logits and knobs): row 3's draw does not move.
    y = random_logits(np_rng, (B, V), scale=0.5)
    y[3] = x[3]
    top_k = np_rng.integers(0, 200, size=B)
    top_k[3] = 100
    temperature = np_rng.uniform(0, 2, size=B).astype(np.float32)
    temperature[3] = 0.9
    ids2 = np.asarray(jaxdecode.sample(keys, jnp.asarray(y), temperature=temperature, top_k=top_k))
    assert ids2[3] == ids[3]
    # vmap over rows, one key each, gives the same draws.
    vm = jax.vmap(lambda k, l: jaxdecode.sample(k, l, temperature=0.9, top_k=100))(keys, jnp.asarray(x))
    np.testing.assert_array_equal(ids, np.asarray(vm))
    # Leading batch dims [2, B/2] with a [2, B/2] key array: the same draws again.
    ids23 = jaxdecode.sample(keys.reshape(2, B // 2), jnp.asarray(x).reshape(2, B // 2, V), temperature=0.9, top_k=100)
    np.testing.assert_array_equal(np.asarray(ids23).reshape(-1), ids)


def test_leading_batch_dims_and_per_row_knobs(np_rng):
    x = random_logits(np_rng, (2, B // 2, V))
    keys = jax.random.split(jax.random.key(3), B).reshape(2, B // 2)
    knobs = {k: v.reshape(2, B // 2) for k, v in random_knobs(np_rng, B, V).items()}
    ids, lp = jaxdecode.sample_with_logprobs(keys, jnp.asarray(x), **knobs)
    assert ids.shape == (2, B // 2) and lp.shape == (2, B // 2)
    probs = R.sample_probs(x, **knobs)
    assert np.all(np.take_along_axis(probs, np.asarray(ids)[..., None], -1) > 0)
    # A knob broadcast along the leading axis ([B/2] against batch shape [2, B/2]).
    ids = jaxdecode.sample(keys, jnp.asarray(x), top_k=np.arange(B // 2) % 3 + 1)
    top = np.argsort(-x, axis=-1, kind="stable")
    for j in range(B // 2):
        assert all(ids[i, j] in top[i, j, : j % 3 + 1] for i in range(2))


# ---------------------------------------------------------------------------------------
# Compilation


def test_new_knob_values_do_not_recompile(np_rng):
    shape = (4, 37)  # a shape used nowhere else, so the first call compiles
    x = jnp.asarray(random_logits(np_rng, shape))
    cache = _sampling._sample_impl
    before = cache._cache_size()
    jaxdecode.sample(jax.random.key(0), x, temperature=0.8, top_k=5)
    after_first = cache._cache_size()
    assert after_first - before <= 1
    variants = [
        dict(temperature=1.2, top_k=0, top_p=0.9),
        dict(temperature=0.5, top_k=3, min_p=0.1),
        dict(temperature=np.array([0.1, 0.2, 0.0, 1.0]), top_k=np.array([1, 2, 3, 0])),
        dict(temperature=jnp.array([0.1, 0.2, 0.3, 1.0]), top_p=jnp.array([0.5, 0.6, 0.7, 1.0])),
        dict(temperature=1, top_k=2.0, typical_p=0.5),  # Python int / integral float
        dict(top_p=[0.2, 0.4, 0.6, 0.8], min_p=0.0),
        dict(typical_p=np.float32(0.3), temperature=np.float64(2.0)),
        dict(min_p=np.array([0.0, 0.1, 0.2, 0.3], np.float64), top_k=np.int64(7)),
        dict(temperature=0.0),
    ]
    for i, kw in enumerate(variants):
        key = jax.random.key(i) if i % 2 else jax.random.PRNGKey(i)  # typed and raw keys
        jaxdecode.sample(key, x, **kw).block_until_ready()
    assert cache._cache_size() == after_first, "a new knob value caused a recompilation"


# ---------------------------------------------------------------------------------------
# Bad input


def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


X3 = jnp.zeros((3, 10), jnp.float32)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(temperature=-0.5), ["temperature", "-0.5", ">= 0"]),
        (dict(temperature=np.array([1.0, -1.0, 1.0])), ["temperature", "-1.0", ">= 0"]),
        (dict(temperature=float("nan")), ["temperature", "nan"]),
        (dict(top_p=0.0), ["top_p", "0.0", "(0, 1]"]),
        (dict(top_p=1.5), ["top_p", "1.5", "(0, 1]"]),
        (dict(top_p=[0.5, 0.5, -0.1]), ["top_p", "-0.1", "(0, 1]"]),
        (dict(top_k=-1), ["top_k", "-1", ">= 0"]),
        (dict(min_p=1.5), ["min_p", "1.5", "[0, 1]"]),
        (dict(min_p=-0.1), ["min_p", "-0.1", "[0, 1]"]),
        (dict(typical_p=0.0), ["typical_p", "0.0", "(0, 1]"]),
        (dict(typical_p=2.0), ["typical_p", "2.0", "(0, 1]"]),
    ],
)
def test_bad_knob_values(kwargs, words):
    _raises(ValueError, lambda: jaxdecode.sample(jax.random.key(0), X3, **kwargs), *words)
    _raises(ValueError, lambda: jaxdecode.sample_with_logprobs(jax.random.key(0), X3, **kwargs), *words)


def test_bad_knob_types_and_shapes():
    _raises(TypeError, lambda: jaxdecode.sample(jax.random.key(0), X3, top_k=2.5), "top_k", "2.5", "integer")
    _raises(TypeError, lambda: jaxdecode.sample(jax.random.key(0), X3, temperature="hot"), "temperature", "hot")
    _raises(ValueError, lambda: jaxdecode.sample(jax.random.key(0), X3, top_k=np.array([1, 2])), "top_k", "(2,)", "(3,)")
    _raises(ValueError, lambda: jaxdecode.sample(jax.random.key(0), X3, top_p=np.full((3, 1), 0.5)), "top_p", "(3, 1)", "(3,)")
    _raises(ValueError, lambda: jaxdecode.sample(jax.random.key(0), X3, temperature=np.ones(4)), "temperature", "(4,)", "(3,)")


def test_bad_logits():
    _raises(TypeError, lambda: jaxdecode.sample(jax.random.key(0), jnp.zeros((3, 10), jnp.int32)), "logits", "int32")
    _raises(TypeError, lambda: jaxdecode.greedy(jnp.zeros((3, 10), jnp.int32)), "logits", "int32")
    _raises(TypeError, lambda: jaxdecode.top_k_filter(np.zeros(10, np.int64), 2), "logits", "int")
    _raises(ValueError, lambda: jaxdecode.sample(jax.random.key(0), jnp.float32(1.0)), "logits", "shape")


def test_bad_keys():
    keys5 = jax.random.split(jax.random.key(0), 5)
    _raises(ValueError, lambda: jaxdecode.sample(keys5, X3), "key", "(5,)", "(3,)")
    _raises(TypeError, lambda: jaxdecode.sample(42, X3), "key", "int")
    _raises(TypeError, lambda: jaxdecode.sample(jnp.zeros((3,), jnp.float32), X3), "key", "float32")
    _raises(TypeError, lambda: jaxdecode.sample(jnp.zeros((2,), jnp.int32), X3), "key", "int32")
    _raises(ValueError, lambda: jaxdecode.sample(None, X3), "key", "None")


@pytest.mark.parametrize(
    "fn,value,words",
    [
        (jaxdecode.top_k_filter, -3, ["top_k", "-3", ">= 0"]),
        (jaxdecode.top_p_filter, 0.0, ["top_p", "0.0", "(0, 1]"]),
        (jaxdecode.top_p_filter, 1.01, ["top_p", "1.01", "(0, 1]"]),
        (jaxdecode.min_p_filter, 2.0, ["min_p", "2.0", "[0, 1]"]),
        (jaxdecode.typical_filter, -0.5, ["typical_p", "-0.5", "(0, 1]"]),
        (jaxdecode.apply_temperature, -1.0, ["temperature", "-1.0", ">= 0"]),
    ],
)
def test_bad_filter_arguments(fn, value, words):
    _raises(ValueError, lambda: fn(X3, value), *words)
    ok = 1 if fn is jaxdecode.top_k_filter else 0.5
    _raises(ValueError, lambda: fn(X3, np.array([ok, ok])), "(2,)", "(3,)")
