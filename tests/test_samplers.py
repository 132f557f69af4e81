"""Issue 13's samplers: every knob against its NumPy reference (exactly for masks, chi-square
on draws), per row in one batch, without recompiling, and against the peers' worked cases
(llama.cpp ``tests/test-sampling.cpp``; Hugging Face ``tests/generation/test_logits_process.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxdecode
from jaxdecode import _generate as G
from jaxdecode import _processors as P
from jaxdecode import _sampling
from jaxdecode import reference
from fake_models import Bigram, Constant, cached

KEY = jax.random.key(0)
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)


def _keep(logits, knobs=None, mu=None, u_xtc=None, **extra):
    """The extended path's kept set (bool [N, V]) and its renormalised probabilities."""
    x = jnp.asarray(logits, jnp.float32)
    n = x.shape[0]
    k = _sampling.make_knobs("test", (n,), **{**OFF, **(knobs or {})})
    ex = _sampling.make_extra("test", (n,), **extra)
    mu = jnp.zeros((n,), jnp.float32) if mu is None else jnp.broadcast_to(jnp.asarray(mu, jnp.float32), (n,))
    u = jnp.zeros((n,), jnp.float32) if u_xtc is None else jnp.broadcast_to(jnp.asarray(u_xtc, jnp.float32), (n,))
    l, keep = jax.jit(_sampling._extended_keep)(u, x, k, ex, mu)
    w = np.where(np.asarray(keep), np.exp(np.asarray(l, np.float64) - np.max(np.where(keep, l, -np.inf), -1,
                                                                            keepdims=True)), 0.0)
    return np.asarray(keep), w / w.sum(-1, keepdims=True)


def _probs(logits, **extra):
    """llama.cpp's tester input: logits = log(probs)."""
    return np.log(np.asarray(logits, np.float32))[None]


# ---------------------------------------------------------------------------------------
# Worked cases of the peers


def test_top_n_sigma_llama_cpp_cases():
    x = _probs([0.1, 0.2, 0.3, 0.4])
    _, p = _keep(x, top_n_sigma=1.0)
    np.testing.assert_allclose(p[0], [0.0, 0.0, 0.428571, 0.571429], atol=1e-5)
    for n in (0.0, 3.0):  # 0 is off (llama.cpp PR 13345); 3 sigma keeps everything here
        _, p = _keep(x, top_n_sigma=n)
        np.testing.assert_allclose(p[0], [0.1, 0.2, 0.3, 0.4], atol=1e-5)


@pytest.mark.parametrize("threshold, want", [(0.09, [0, 0, 0, 1.0]), (0.19, [0, 0, 2 / 3, 1 / 3]),
                                             (0.29, [0, 0.5, 1 / 3, 1 / 6]), (0.39, [0.4, 0.3, 0.2, 0.1])])
def test_xtc_llama_cpp_cases(threshold, want):
    # llama.cpp's cases (probability 0.99): {0.4, 0.3, 0.2, 0.1} -> {0.1}, {0.2, 0.1}, {0.3, 0.2, 0.1}
    # and unchanged at threshold 0.39 (only one token above it). Here renormalised.
    x = _probs([0.4, 0.3, 0.2, 0.1])
    _, p = _keep(x, xtc_threshold=threshold, xtc_probability=0.99, u_xtc=0.5)
    np.testing.assert_allclose(p[0], want, atol=1e-5)
    _, p = _keep(x, xtc_threshold=threshold, xtc_probability=0.99, u_xtc=0.995)  # the coin says no
    np.testing.assert_allclose(p[0], [0.4, 0.3, 0.2, 0.1], atol=1e-5)


@pytest.mark.parametrize("probs, last, want, mult, base, allowed, last_n, breakers", [
    ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, []),
    ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, [[3]]),
    ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, []),
])
def test_dry_llama_cpp_cases(probs, last, want, mult, base, allowed, last_n, breakers):
    v = len(probs)
    got = generate_one_step(np.log(np.float32(probs)), last, dry_multiplier=mult, dry_base=base,
                            dry_allowed_length=allowed, dry_penalty_last_n=last_n,
                            dry_sequence_breakers=breakers or None)
    np.testing.assert_allclose(got, want, atol=1e-5)
    pen = reference.dry_penalty(last, v, mult, base, allowed, last_n, breakers)
    ref = np.exp(np.log(probs) - pen)
    np.testing.assert_allclose(ref / ref.sum(), want, atol=1e-5)


def test_mirostat_v2_worked_case():
    # llama.cpp's mirostat v2 on {0.5, 0.25, 0.125, 0.125}: surprisals 1, 2, 3, 3 bits.
    x = _probs([0.5, 0.25, 0.125, 0.125])
    for mu, want in [(2.5, [2 / 3, 1 / 3, 0, 0]), (0.5, [1.0, 0, 0, 0]), (3.0, [0.5, 0.25, 0.125, 0.125])]:
        _, p = _keep(x, mirostat_tau=1.0, mu=mu)
        np.testing.assert_allclose(p[0], want, atol=1e-6)
    # The update: mu <- mu - eta * (surprise - tau), the surprise of the drawn token after truncation.
    u = jnp.array([0.1, 0.9], jnp.float32)  # draws token 0 (p 2/3) and token 1 (p 1/3)
    k = _sampling.make_knobs("t", (2,), **OFF)
    ex = _sampling.make_extra("t", (2,), mirostat_tau=1.0, mirostat_eta=0.5)
    ids, lp, mu = _sampling.draw_extended(u, u, jnp.asarray(np.repeat(x, 2, 0)), k, ex, jnp.full((2,), 2.5))
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(mu, [2.5 - 0.5 * (np.log2(1.5) - 1.0), 2.5 - 0.5 * (np.log2(3.0) - 1.0)], rtol=1e-5)


def test_dynatemp_llama_cpp_cases_and_formula():
    x = _probs([0.1, 0.2, 0.3, 0.4])
    _, p = _keep(x, dynatemp_range=0.0)
    np.testing.assert_allclose(p[0], [0.1, 0.2, 0.3, 0.4], atol=1e-5)  # test_temp_ext(1, 0, 1)
    # Uniform logits: H / log N = 1, so T = t + delta; a peaked row: H ~ 0, T = max(0, t - delta).
    h = -np.sum(np.array([0.1, 0.2, 0.3, 0.4]) * np.log([0.1, 0.2, 0.3, 0.4])) / np.log(4)
    t = (1.0 - 0.5) + 1.0 * h**2.0
    _, p = _keep(x, dynatemp_range=0.5, dynatemp_exponent=2.0)
    want = np.array([0.1, 0.2, 0.3, 0.4]) ** (1 / t)
    np.testing.assert_allclose(p[0], want / want.sum(), atol=1e-5)
    assert reference.dynamic_temperature(x[0], 1.0, 0.5, 2.0) == pytest.approx(t, rel=1e-6)


def test_epsilon_eta_hf_cases():
    dist = np.log(np.array([[0.87, 0.099, 0.001, 0.03], [0.4, 0.299, 0.101, 0.2]], np.float32))
    keep, _ = _keep(dist, epsilon_cutoff=0.1)
    assert keep.tolist() == [[True, False, False, False], [True, True, True, True]]
    with np.errstate(divide="ignore"):
        dist = np.log(np.array([[0.0, 0.1, 0.8, 0.1], [0.01, 0.04, 0.9, 0.05]], np.float32))
    keep, _ = _keep(dist, eta_cutoff=0.0625)
    assert keep.tolist() == [[False, True, True, True], [False, False, True, False]]
    # min_tokens_to_keep=2 on HF's ramp logits (the second row x100): counts [3, 2] and [2, 2].
    ramp = np.arange(10, dtype=np.float32) - 5
    ramp = np.stack([ramp, ramp * 100])
    assert _keep(ramp, epsilon_cutoff=5e-2, min_tokens_to_keep=2)[0].sum(-1).tolist() == [3, 2]
    assert _keep(ramp, eta_cutoff=0.1, min_tokens_to_keep=2)[0].sum(-1).tolist() == [2, 2]
    # ... and for the classic filters (HF's top-p / min-p / typical / top-k cases).
    assert _keep(ramp, dict(top_p=0.9), min_tokens_to_keep=2)[0].sum(-1).tolist() == [3, 2]
    assert _keep(ramp, dict(min_p=0.9), min_tokens_to_keep=2)[0].sum(-1).tolist() == [2, 2]
    assert _keep(ramp, dict(typical_p=0.7), min_tokens_to_keep=2)[0].sum(-1).tolist() == [2, 2]
    assert _keep(ramp[:, :5], dict(top_k=1), min_tokens_to_keep=3)[0].sum(-1).tolist() == [3, 3]


def test_sequence_rules_hf_cases():
    tokens = jnp.array([[0, 1, 3, 1], [0, 1, 0, 1]])
    ctx = jaxdecode.DecodeContext.from_prompt(tokens, 5)
    bias = {(1,): 100.0, (4,): 100.0, (1, 0): -100.0, (0, 1, 2): -100.0, (1, 3, 1, 3): -100.0,
            (1, 3, 1, 3, 1, 3): -100.0}
    got = _rules_step(jnp.zeros((2, 5)), ctx, 5, sequence_bias=bias)
    assert got.tolist() == [[-100.0, 100.0, 0.0, -100.0, 100.0], [-100.0, 100.0, -100.0, 0.0, 100.0]]
    assert reference.sequence_bias(np.zeros((2, 5)), tokens, [4, 4], bias).tolist() == got.tolist()
    # HF's bad-words case without its EOS exception ([4] with eos 4 is dropped there; here it bans 4).
    words = [[1], [4], [1, 0], [0, 1, 2], [1, 3, 1, 3]]
    got = _rules_step(jnp.zeros((2, 5)), ctx, 5, bad_words=words)
    assert np.isinf(got).tolist() == [[True, True, False, True, True], [True, True, True, False, True]]
    assert np.isinf(reference.bad_words(np.zeros((2, 5)), tokens, [4, 4], words)).tolist() == np.isinf(got).tolist()
    # no_repeat_ngram_size: HF's 2- and 3-gram cases, and the reappearing banned token.
    ctx3 = jaxdecode.DecodeContext.from_prompt(jnp.array([[1, 1, 2, 1], [0, 1, 0, 1]]), 3)
    assert np.isinf(_rules_step(jnp.zeros((2, 3)), ctx3, 3, no_repeat_ngram_size=2)).tolist() == [
        [False, True, True], [True, False, False]]
    assert np.isinf(_rules_step(jnp.zeros((2, 3)), ctx3, 3, no_repeat_ngram_size=3)).tolist() == [
        [False, False, False], [True, False, False]]
    ctx10 = jaxdecode.DecodeContext.from_prompt(jnp.array([[1, 2, 5, 7, 8, 5, 1, 2]]), 10)
    assert np.flatnonzero(np.isinf(_rules_step(jnp.zeros((1, 10)), ctx10, 10, no_repeat_ngram_size=3))).tolist() == [5]


def test_exponential_decay_length_penalty_hf_semantics():
    # HF: penalty from start (5) on, raising the EOS logit whatever its sign.
    logits = jnp.array([[0.5, 0.1, 0.2], [-0.5, 0.1, 0.2], [0.5, 0.1, 0.2]])
    for step, moved in [(5, False), (6, True), (20, True)]:
        ctx = jaxdecode.DecodeContext.from_prompt(jnp.zeros((3, 2), jnp.int32), 3)._replace(
            step=jnp.full((3,), step, jnp.int32))
        got = _rules_step(logits, ctx, 3, exponential_decay_length_penalty=(5, 1.1), eos=(0,))
        want = reference.exponential_decay_length_penalty(logits, step, 5, 1.1, [0])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert bool(np.all(got[:, 0] > logits[:, 0])) == moved and np.all(got[:, 1:] == logits[:, 1:])
    np.testing.assert_allclose(want[0, 0], 0.5 + 0.5 * (1.1**15 - 1), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Against the reference on random logits, per row


def _random_logits(rng, n, v, scale=2.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


EXTENDED_CASES = [
    dict(top_n_sigma=[0.5, 1.0, 2.0, 0.0]),
    dict(epsilon_cutoff=[0.01, 0.03, 0.0, 0.05]),
    dict(eta_cutoff=[0.01, 0.05, 0.2, 0.0]),
    dict(min_tokens_to_keep=[1, 3, 10, 40], epsilon_cutoff=0.05, knobs=dict(top_p=0.5)),
    dict(xtc_threshold=[0.02, 0.05, 0.1, 0.6], xtc_probability=1.0),
    dict(dynatemp_range=[0.3, 0.8, 1.5, 0.0], dynatemp_exponent=[1.0, 0.5, 2.0, 1.0], knobs=dict(temperature=1.2)),
    dict(mirostat_tau=[3.0, 5.0, 1.0, 0.0], mu=[4.0, 6.0, 2.0, 9.0]),
    dict(top_n_sigma=1.5, epsilon_cutoff=0.005, eta_cutoff=0.01, xtc_threshold=0.05, xtc_probability=0.5,
         dynatemp_range=0.4, mirostat_tau=4.0, mu=[5.0, 7.0, 4.0, 6.0], u_xtc=[0.1, 0.9, 0.2, 0.3],
         knobs=dict(top_k=60, top_p=0.95, min_p=0.01, typical_p=0.97, temperature=0.9), min_tokens_to_keep=2),
]


@pytest.mark.parametrize("case", EXTENDED_CASES)
def test_extended_truncations_match_the_reference_exactly(case, np_rng):
    case = dict(case)
    knobs, mu, u_xtc = case.pop("knobs", {}), case.pop("mu", 0.0), case.pop("u_xtc", 0.0)
    x = _random_logits(np_rng, 4, 300)
    keep, p = _keep(x, knobs, mu=mu, u_xtc=u_xtc, **case)
    ref_args = {**OFF, **knobs}
    want = reference.sample_probs_extended(
        x, ref_args["temperature"], ref_args["top_k"], ref_args["top_p"], ref_args["min_p"], ref_args["typical_p"],
        mirostat_mu=mu, xtc_uniform=u_xtc, **case)
    np.testing.assert_array_equal(keep, want > 0)
    np.testing.assert_allclose(p, want, atol=1e-6)
    plain = reference.sample_probs(x, ref_args["temperature"], ref_args["top_k"], ref_args["top_p"],
                                   ref_args["min_p"], ref_args["typical_p"])
    assert np.abs(want - plain).max() > 1e-3  # the case changes the distribution


def test_sample_draws_match_the_reference_chi_square(np_rng):
    # One row per knob setting, all in one batch; many keys per row (one key per row of [R, 4]).
    x = _random_logits(np_rng, 4, 40, 1.5)
    knobs = dict(top_n_sigma=np.array([1.0, 0, 0, 0], np.float32), epsilon_cutoff=np.array([0, 0.03, 0, 0], np.float32),
                 eta_cutoff=np.array([0, 0, 0.05, 0], np.float32), dynatemp_range=np.array([0, 0, 0, 0.7], np.float32),
                 xtc_probability=np.array([0, 0, 0, 1.0], np.float32), xtc_threshold=0.1)
    reps = 4000
    keys = jax.random.split(jax.random.key(7), reps * 4).reshape(reps, 4)
    ids = np.asarray(jaxdecode.sample(keys, np.broadcast_to(x, (reps, 4, 40)), temperature=0.8,
                                      **{k: np.broadcast_to(v, (reps, 4)) for k, v in knobs.items()}))
    want = reference.sample_probs_extended(x, 0.8, xtc_uniform=0.0, **knobs)
    for r in range(4):
        counts = np.bincount(ids[:, r], minlength=40)
        support = want[r] > 0
        assert counts[~support].sum() == 0
        assert scipy.stats.chisquare(counts[support], reps * want[r][support] / want[r][support].sum()).pvalue > 1e-4


def test_xtc_coin_is_the_rows_own_uniform():
    # With xtc_probability 0.5 each row's draw equals a draw from the XTC-truncated or the full
    # distribution, decided by uniform(fold_in(row_key, 1)) < 0.5.
    x = np.log(np.array([[0.4, 0.3, 0.2, 0.1]] * 64, np.float32))
    keys = jax.random.split(jax.random.key(3), 64)
    ids = np.asarray(jaxdecode.sample(keys, x, xtc_threshold=0.09, xtc_probability=0.5))
    coin = np.asarray(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)) < 0.5
    assert np.all(ids[coin] == 3) and coin.any() and (~coin).any()
    assert (ids[~coin] != 3).any()


def test_sample_without_extended_knobs_is_unchanged():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 50)), jnp.float32)
    a = jaxdecode.sample(KEY, x, temperature=0.7, top_k=20)
    b = jaxdecode.sample(KEY, x, temperature=0.7, top_k=20, min_tokens_to_keep=1, top_n_sigma=0)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# History rules against the reference, per row


def _rules_step(logits, ctx, vocab, eos=None, **fields):
    """One application of SamplingParams' history rules (as generate's step does)."""
    p = jaxdecode.SamplingParams(**fields)
    b = logits.shape[0]
    res = jaxdecode._settings.resolve("test", p, b, vocab, ())
    return np.asarray(P.apply_rules(jnp.asarray(logits, jnp.float32), ctx, res.rules,
                                    None if eos is None else jnp.asarray(eos, jnp.int32)))


def _random_context(rng, b, vocab, plen, length_range):
    lengths = rng.integers(*length_range, size=b)
    toks = rng.integers(0, vocab, size=(b, plen)).astype(np.int32)
    return toks, lengths


def test_rules_match_the_reference_on_random_histories(np_rng):
    b, v, total = 6, 7, 40
    toks, lengths = _random_context(np_rng, b, v, total, (2, total))
    # Some repetition, so that DRY and n-grams have something to see.
    toks[:, 20:30] = toks[:, 5:15]
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.asarray(toks), v, jnp.asarray(lengths))
    logits = _random_logits(np_rng, b, v)
    mult = np.array([0.8, 1.0, 0.0, 2.0, 1.5, 0.5], np.float32)
    base = np.array([1.75, 1.1, 2.0, 1.5, 3.0, 1.2], np.float32)
    allowed = np.array([2, 1, 2, 3, 2, 4], np.int32)
    last_n = np.array([0, 10, 0, 25, 6, 0], np.int32)
    breakers = [[3], [5, 6]]
    got = _rules_step(logits, ctx, v, dry_multiplier=mult, dry_base=base, dry_allowed_length=allowed,
                      dry_penalty_last_n=last_n, dry_sequence_breakers=breakers)
    for r in range(b):
        pen = reference.dry_penalty(toks[r, : lengths[r]], v, mult[r], base[r], allowed[r], last_n[r], breakers)
        np.testing.assert_allclose(got[r], logits[r] - pen, rtol=1e-5, atol=1e-5)
    n = np.array([1, 2, 3, 0, 4, 2], np.int32)
    got = _rules_step(logits, ctx, v, no_repeat_ngram_size=n)
    for r in range(b):
        want = reference.no_repeat_ngram(logits[r:r + 1], toks[r:r + 1], lengths[r:r + 1], n[r]) if n[r] else logits[r:r+1]
        np.testing.assert_array_equal(got[r:r + 1], want)
    words = [[2], [1, 4], [3, 3, 5]]
    bias = {(6,): 1.5, (0, 2): -2.0, (4, 4, 1): 3.0}
    got = _rules_step(logits, ctx, v, bad_words=words, sequence_bias=bias, allowed_token_ids=[0, 1, 2, 3, 5],
                      suppress_tokens=[5], begin_suppress_tokens=[1])
    want = reference.sequence_bias(logits, toks, lengths, bias)
    want = reference.bad_words(want, toks, lengths, words)
    want = reference.allowed_tokens(want, [0, 1, 2, 3, 5])
    want = reference.ban_tokens(want, [5])
    want = reference.begin_suppress(want, np.zeros(b, int), [1])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _pad_table(table, lens, count, width):
    """A shared right-aligned table [S, M] (lengths [S]) as one row of a per-row table
    [count, width]: columns padded on the left, unused entries of length 0."""
    out, n = np.zeros((count, width), np.int32), np.zeros((count,), np.int32)
    if table is not None:
        t = np.asarray(table)
        out[: t.shape[0], width - t.shape[1]:] = t
        n[: t.shape[0]] = np.asarray(lens)
    return out, n


def test_rules_with_per_row_tables_equal_each_rows_shared_tables(np_rng):
    """apply_rules with per-row tables ([B, S, M], bool[B, V] masks: the serving engine's slots)
    gives each row what the row's own shared tables give it."""
    b, v, total = 4, 9, 30
    toks, lengths = _random_context(np_rng, b, v, total, (3, total))
    toks[:, 12:20] = toks[:, 2:10]
    logits = _random_logits(np_rng, b, v)
    rows = [
        dict(bad_words=[[2], [1, 4]], sequence_bias=[[[6], 1.5]], dry_multiplier=0.8, dry_sequence_breakers=[[3]],
             suppress_tokens=[5], allowed_token_ids=[0, 1, 2, 3, 4, 5, 6]),
        dict(sequence_bias=[[[0, 2], -2.0], [[4, 4, 1], 3.0]], no_repeat_ngram_size=2, begin_suppress_tokens=[1, 7]),
        dict(dry_multiplier=1.5, dry_base=1.3, dry_allowed_length=1, dry_sequence_breakers=[[5, 6], [8]],
             bad_words=[[3, 3, 5]], exponential_decay_length_penalty=(0, 1.5)),
        dict(),
    ]
    s_cap, m_cap, eos = 3, 4, np.array([[8, v]] * b, np.int32)  # per-row EOS ids; v: padding
    want, per_row = [], []
    for r, fields in enumerate(rows):
        ctx = jaxdecode.DecodeContext.from_prompt(jnp.asarray(toks[r:r + 1]), v, jnp.asarray(lengths[r:r + 1]))
        want.append(_rules_step(logits[r:r + 1], ctx, v, eos=[8], **fields)[0])
        per_row.append(jaxdecode._settings.resolve("test", jaxdecode.SamplingParams(**fields), 1, v, ()).rules)
    stack = lambda xs: jnp.asarray(np.concatenate([np.asarray(x) for x in xs]))

    def tables(name, with_values=False):
        got = [getattr(rr, name) for rr in per_row]
        padded = [_pad_table(*(g[:2] if g is not None else (None, None)), s_cap, m_cap) for g in got]
        out = (jnp.asarray(np.stack([t for t, _ in padded])), jnp.asarray(np.stack([n for _, n in padded])))
        if with_values:
            vals = np.zeros((b, s_cap), np.float32)
            for r, g in enumerate(got):
                if g is not None:
                    vals[r, : len(g[2])] = np.asarray(g[2])
            out += (jnp.asarray(vals),)
        return out

    def mask(name, off):
        return jnp.asarray(np.stack([np.full(v, off) if getattr(rr, name) is None else np.asarray(getattr(rr, name))
                                     for rr in per_row]))

    decay = [rr.decay if rr.decay is not None else (np.zeros(1, np.int32), np.ones(1, np.float32)) for rr in per_row]
    rules = P.SamplingRules(
        penalty_last_n=stack([rr.penalty_last_n for rr in per_row]), dry_multiplier=stack([rr.dry_multiplier for rr in per_row]),
        dry_base=stack([rr.dry_base for rr in per_row]), dry_allowed_length=stack([rr.dry_allowed_length for rr in per_row]),
        dry_penalty_last_n=stack([rr.dry_penalty_last_n for rr in per_row]), dry_breakers=tables("dry_breakers"),
        no_repeat_ngram_size=stack([rr.no_repeat_ngram_size for rr in per_row]), bad_words=tables("bad_words"),
        sequence_bias=tables("sequence_bias", True), allowed=mask("allowed", True), suppress=mask("suppress", False),
        begin_suppress=mask("begin_suppress", False), decay=(stack([d[0] for d in decay]), stack([d[1] for d in decay])))
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.asarray(toks), v, jnp.asarray(lengths))
    got = np.asarray(P.apply_rules(jnp.asarray(logits, jnp.float32), ctx, rules, jnp.asarray(eos)))
    np.testing.assert_array_equal(got, np.stack(want))
    assert not np.array_equal(got, logits)


def test_penalty_window_matches_the_reference(np_rng):
    b, v, p, n = 4, 9, 6, 12
    model = cached(Bigram.random(v, seed=4))
    prompt = np_rng.integers(0, v, (b, p)).astype(np.int32)
    last = np.array([0, 3, 8, 1], np.int32)
    sp = jaxdecode.SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4,
                                  presence_penalty=0.3, penalty_last_n=last, eos_id=())
    out = jaxdecode.generate(model, prompt, n, sampling=sp)
    table = np.asarray(model_table(v))
    for r in range(b):
        seq = [int(t) for t in prompt[r]]
        for _ in range(n):
            seen, counts = reference.penalty_history(seq, p, v, int(last[r]))
            l = reference.apply_repetition_penalty(table[seq[-1]][None], seen[None], 1.5)
            l = reference.apply_frequency_presence_penalty(l, counts[None], 0.4, 0.3)
            seq.append(int(np.argmax(l[0])))
        assert out.tokens[r].tolist() == seq


def model_table(v):
    return Bigram.random(v, seed=4).table


# ---------------------------------------------------------------------------------------
# generate: every knob in the loop, per row, no recompilation


def generate_one_step(logits, history, **fields):
    """The distribution generate's first step draws from, after ``history`` as the prompt
    (a Constant model; measured by sampling many rows)."""
    v = len(logits)
    model = cached(Constant(jnp.asarray(logits, jnp.float32)))
    rows = 4000
    prompt = np.tile(np.asarray(history, np.int32), (rows, 1))
    out = jaxdecode.generate(model, prompt, 1, key=jax.random.key(1), sampling=jaxdecode.SamplingParams(
        eos_id=(), **fields))
    counts = np.bincount(np.asarray(out.tokens[:, -1]), minlength=v)
    # The logprob of each drawn token is exact: read the distribution off it.
    probs = np.zeros(v)
    lp = np.asarray(out.logprobs[:, 0])
    for t in range(v):
        if counts[t]:
            probs[t] = np.exp(lp[np.asarray(out.tokens[:, -1]) == t][0])
    return probs


ALL_ON = dict(top_n_sigma=2.0, epsilon_cutoff=0.001, eta_cutoff=0.001, min_tokens_to_keep=2, xtc_threshold=0.1,
              xtc_probability=0.5, dynatemp_range=0.3, dynatemp_exponent=1.0, mirostat_tau=3.0, mirostat_eta=0.1,
              dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=16, penalty_last_n=8,
              no_repeat_ngram_size=3, repetition_penalty=1.1)
ALL_OFF = {k: jaxdecode.SamplingParams.__dataclass_fields__[k].default for k in ALL_ON}
LISTS = dict(dry_sequence_breakers=[[5]], bad_words=[[1, 2], [7]], sequence_bias={(3,): 0.5, (2, 4): -1.0},
             allowed_token_ids=list(range(11)), suppress_tokens=[8], begin_suppress_tokens=[9],
             exponential_decay_length_penalty=(3, 1.2))


def test_every_knob_in_generate_without_recompiling():
    v, b = 12, 4
    model = cached(Bigram.random(v, seed=11))
    prompt = np.array([[1, 2, 3, 4]] * b, np.int32)
    run = lambda **kw: jaxdecode.generate(model, prompt, 10, key=KEY, sampling=jaxdecode.SamplingParams(
        temperature=0.9, eos_id=(10,), **LISTS, **kw))
    run(**ALL_OFF)  # every traced issue-13 knob at its default: the plain step (static)
    size = G._generate_jit._cache_size()
    outs = [run(**ALL_ON)]  # one more compilation: the step with the full branch
    assert G._generate_jit._cache_size() == size + 1
    size += 1
    run(**ALL_OFF)  # the plain step again: compiled already
    outs += [run(**{**ALL_ON, "top_n_sigma": 1.0, "mirostat_tau": 0.0, "dry_multiplier": 2.0,
                                  "penalty_last_n": 0, "no_repeat_ngram_size": 2, "xtc_probability": 1.0})]
    per_row = {k: np.array([val, ALL_OFF[k], val, ALL_OFF[k]], np.asarray(val).dtype) for k, val in ALL_ON.items()}
    outs.append(run(**per_row))
    # Values (scalar or per-row, some rows off, one knob off everywhere) never recompile.
    assert G._generate_jit._cache_size() == size
    toks = np.asarray(outs[0].tokens[:, 4:])
    assert not np.isin(toks, [7, 8, 11]).any()  # bad word [7], suppressed 8, 11 not allowed
    assert not (toks[:, 0] == 9).any()  # begin-suppressed at the first step
    pairs = set(zip(toks[:, :-1].ravel().tolist(), toks[:, 1:].ravel().tolist()))
    assert (1, 2) not in pairs


def test_per_row_knobs_equal_single_row_runs():
    # Row r of a batch with per-row knobs equals a one-row run with row r's knobs and key.
    v = 12
    model = cached(Bigram.random(v, seed=12))
    prompt = np.array([[1, 2, 3, 1, 2]] * 4, np.int32)
    keys = jax.random.split(jax.random.key(5), 4)
    per_row = dict(top_n_sigma=np.float32([1.0, 0, 0, 0.5]), xtc_probability=np.float32([0, 1, 0, 0.5]),
                   mirostat_tau=np.float32([0, 0, 3.0, 2.0]), dry_multiplier=np.float32([0.5, 0, 1.0, 0]),
                   penalty_last_n=np.int32([0, 3, 0, 5]), repetition_penalty=np.float32([1.3, 1.3, 1.0, 1.2]),
                   no_repeat_ngram_size=np.int32([0, 2, 3, 0]), eta_cutoff=np.float32([0, 0, 0.02, 0]),
                   dynatemp_range=np.float32([0.5, 0, 0, 0.2]), min_tokens_to_keep=np.int32([1, 2, 1, 3]))
    out = jaxdecode.generate(model, prompt, 12, key=keys, sampling=jaxdecode.SamplingParams(
        temperature=0.9, eos_id=(), **per_row))
    for r in range(4):
        one = jaxdecode.generate(model, prompt[r:r + 1], 12, key=keys[r:r + 1], sampling=jaxdecode.SamplingParams(
            temperature=0.9, eos_id=(), **{k: val[r:r + 1] for k, val in per_row.items()}))
        np.testing.assert_array_equal(out.tokens[r], one.tokens[0])


def test_mirostat_mu_is_carried_in_the_loop():
    # A Constant model: step i's kept set depends only on mu_i; replay llama.cpp's update in NumPy.
    v = 16
    logits = np.float32(np.linspace(3.0, -3.0, v))
    model = cached(Constant(jnp.asarray(logits)))
    tau, eta = 2.0, 0.3
    out = jaxdecode.generate(model, np.array([[0]]), 20, key=KEY, sampling=jaxdecode.SamplingParams(
        mirostat_tau=tau, mirostat_eta=eta, eos_id=()))
    mu = 2 * tau
    for i in range(20):
        tok = int(out.tokens[0, 1 + i])
        want = reference.sample_probs_extended(logits[None], mirostat_tau=tau, mirostat_mu=mu)[0]
        assert want[tok] > 0
        np.testing.assert_allclose(np.exp(out.logprobs[0, i]), want[tok], rtol=1e-5)
        mu -= eta * (-np.log2(want[tok]) - tau)


def test_stream_equals_generate_with_every_knob():
    v = 12
    model = cached(Bigram.random(v, seed=13))
    prompt = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.int32)
    sp = jaxdecode.SamplingParams(temperature=0.9, eos_id=(), **ALL_ON, **LISTS)
    full = jaxdecode.generate(model, prompt, 9, key=KEY, sampling=sp)
    chunks = list(jaxdecode.generate_stream(model, prompt, 9, chunk_size=4, key=KEY, sampling=sp))
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], 1), full.tokens[:, 4:])


def test_no_repeat_ngram_size_equals_the_processor():
    v = 8
    model = cached(Bigram.random(v, seed=14))
    prompt = np.array([[1, 2, 3, 1, 2]], np.int32)
    a = jaxdecode.generate(model, prompt, 12, temperature=0.0, eos_id=(), processors=jaxdecode.no_repeat_ngram(2))
    b = jaxdecode.generate(model, prompt, 12, sampling=jaxdecode.SamplingParams(
        temperature=0.0, eos_id=(), no_repeat_ngram_size=2))
    np.testing.assert_array_equal(a.tokens, b.tokens)


# ---------------------------------------------------------------------------------------
# Bad values: clear errors naming the knob


@pytest.mark.parametrize("field, value, exc, msg", [
    ("dry_multiplier", -1.0, ValueError, r"`dry_multiplier` got -1.0; allowed: a number >= 0"),
    ("dry_base", 0.5, ValueError, r"`dry_base` got 0.5; allowed: a number >= 1"),
    ("dry_allowed_length", 0, ValueError, r"`dry_allowed_length` got 0"),
    ("xtc_probability", 1.5, ValueError, r"`xtc_probability` got 1.5; allowed: a number in \[0, 1\]"),
    ("xtc_threshold", -0.1, ValueError, r"`xtc_threshold` got -0.1"),
    ("epsilon_cutoff", 1.0, ValueError, r"`epsilon_cutoff` got 1.0; allowed: a number in \[0, 1\)"),
    ("eta_cutoff", -0.2, ValueError, r"`eta_cutoff` got -0.2"),
    ("top_n_sigma", -1.0, ValueError, r"`top_n_sigma` got -1.0"),
    ("min_tokens_to_keep", 0, ValueError, r"`min_tokens_to_keep` got 0; allowed: an integer >= 1"),
    ("mirostat_tau", float("inf"), ValueError, r"`mirostat_tau` must be finite"),
    ("mirostat_eta", -0.1, ValueError, r"`mirostat_eta` got -0.1"),
    ("dynatemp_range", -0.5, ValueError, r"`dynatemp_range` got -0.5"),
    ("penalty_last_n", -1, ValueError, r"`penalty_last_n` got -1; allowed: an integer >= 0"),
    ("dry_penalty_last_n", -2, ValueError, r"`dry_penalty_last_n` got -2"),
    ("no_repeat_ngram_size", 1.5, TypeError, r"`no_repeat_ngram_size` must be an integer"),
    ("bad_words", [[1], []], ValueError, r"`bad_words\[1\]` is empty"),
    ("bad_words", [1, 2], TypeError, r"`bad_words` must be a list of token-id lists"),
    ("sequence_bias", {(1, 2): float("nan")}, ValueError, r"`sequence_bias` for \(1, 2\) must be finite"),
    ("sequence_bias", [1, 2], TypeError, r"`sequence_bias` must be a dict"),
    ("allowed_token_ids", [], ValueError, r"`allowed_token_ids` is empty"),
    ("suppress_tokens", [1.5], TypeError, r"`suppress_tokens` must be a list of token ids"),
    ("exponential_decay_length_penalty", (3,), TypeError, r"must be a pair \(start, factor\)"),
    ("exponential_decay_length_penalty", (-1, 1.1), ValueError, r"\(start\)` got -1"),
    ("dry_sequence_breakers", [[]], ValueError, r"`dry_sequence_breakers\[0\]` is empty"),
])
def test_bad_values_name_the_knob(field, value, exc, msg):
    with pytest.raises(exc, match=rf"jaxdecode.SamplingParams: .*{msg}|{msg}"):
        jaxdecode.SamplingParams(**{field: value})


def test_bad_ids_and_unsupported_decoders():
    model = cached(Bigram.random(6, seed=1))
    prompt = np.array([[1, 2]], np.int32)
    with pytest.raises(ValueError, match=r"jaxdecode.generate: `bad_words\[0\]` = \[1, 9\] has ids outside \[0, 6\)"):
        jaxdecode.generate(model, prompt, 2, key=KEY, sampling=jaxdecode.SamplingParams(bad_words=[[1, 9]]))
    with pytest.raises(ValueError, match=r"jaxdecode.generate: `suppress_tokens` got \[7\]"):
        jaxdecode.generate(model, prompt, 2, key=KEY, sampling=jaxdecode.SamplingParams(suppress_tokens=[7]))
    with pytest.raises(ValueError, match=r"jaxdecode.beam_search: `mirostat_tau` is not supported by beam search"):
        jaxdecode.beam_search(model, prompt, 2, num_beams=2, sampling=jaxdecode.SamplingParams(mirostat_tau=3.0))
    with pytest.raises(ValueError, match=r"`dry_multiplier` is not supported"):
        jaxdecode.generate(model, prompt, 2, key=KEY, speculative=jaxdecode.prompt_lookup(),
                           sampling=jaxdecode.SamplingParams(dry_multiplier=1.0))
    with pytest.raises(ValueError, match=r"jaxdecode.sample: `xtc_probability` got 2.0"):
        jaxdecode.sample(KEY, jnp.zeros((2, 4)), xtc_probability=2.0)


def test_dry_sequence_breakers_helper():
    class Tok:
        def encode(self, text, add_bos=False):
            return {"\n": [10], ":": [11], '"': [12], "*": [13], "User:": [20, 11]}[text]

    assert jaxdecode.dry_sequence_breakers(Tok()) == [[10], [11], [12], [13]]
    assert jaxdecode.dry_sequence_breakers(Tok(), ["User:"]) == [[20, 11]]
