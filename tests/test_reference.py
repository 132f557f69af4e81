"""The NumPy reference (jaxdecode.reference) checked against independent definitions.

The reference is the oracle for the JAX code, so it gets its own tests: brute-force
definitions in float64, a transcription of Hugging Face's TypicalLogitsWarper, hand-worked
examples of the filter order, its sampler's frequencies and the book-style generate loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from jaxdecode import reference as R


def probs64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def rows(rng, n=200, v=9):
    """Random rows, half of them on a coarse grid (lots of ties)."""
    x = rng.normal(size=(n, v)) * 2
    x[: n // 2] = np.round(x[: n // 2])
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Filters vs brute force


def test_top_k_brute_force(np_rng):
    x = rows(np_rng)
    for k in range(0, 11):
        out = R.top_k_filter(x, k)
        for row, o in zip(x, out):
            # Token i survives iff fewer than k tokens are strictly larger (k = 0 or >= V: all).
            keep = np.array([np.sum(row > row[i]) < k for i in range(row.size)]) if 0 < k < row.size else np.ones(row.size, bool)
            np.testing.assert_array_equal(np.isfinite(o), keep)
            np.testing.assert_array_equal(o[keep], row[keep])


def test_top_k_does_not_port_the_books_batch_bug():
    # With B == V the book's `logits < top_logits[:, -1]` broadcasts silently along the
    # vocabulary axis and compares each column against another row's threshold.
    x = np.array([[10.0, 11.0, 12.0], [0.0, 1.0, 2.0], [5.0, 6.0, 7.0]], np.float32)
    top = np.sort(x, axis=-1)[:, ::-1][:, :2]
    buggy = np.where(x < top[:, -1], -np.inf, x)
    fixed = np.where(x < top[:, -1:], -np.inf, x)
    assert not np.array_equal(buggy, fixed)
    np.testing.assert_array_equal(R.top_k_filter(x, 2), fixed)
    np.testing.assert_array_equal(np.isfinite(R.top_k_filter(x, 2)), [[0, 1, 1], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(np.isfinite(buggy[1]), [0, 1, 0])  # row 1 lost its largest logit


def brute_top_p(row: np.ndarray, p: float) -> np.ndarray:
    """Smallest s such that the s most probable tokens reach mass p; then every token tied
    with the s-th one. float64."""
    if p >= 1:
        return np.ones(row.size, bool)
    q = probs64(row)
    order = sorted(range(row.size), key=lambda i: -row[i])
    for s in range(1, row.size + 1):
        if sum(q[order[:s]]) >= p:
            return row >= row[order[s - 1]]
    return np.ones(row.size, bool)


def test_top_p_brute_force(np_rng):
    x = rows(np_rng)
    for p in (1e-6, 0.1, 0.33, 0.5, 0.77, 0.9, 0.999, 1.0):
        out = R.top_p_filter(x, p)
        for row, o in zip(x, out):
            np.testing.assert_array_equal(np.isfinite(o), brute_top_p(row, p), err_msg=f"p={p} row={row}")


def test_top_p_hand_examples():
    x = np.log(np.array([0.5, 0.2, 0.2, 0.1], np.float32))
    np.testing.assert_array_equal(np.isfinite(R.top_p_filter(x, 0.5)), [1, 0, 0, 0])
    np.testing.assert_array_equal(np.isfinite(R.top_p_filter(x, 0.6)), [1, 1, 1, 0])  # the tie comes along
    np.testing.assert_array_equal(np.isfinite(R.top_p_filter(x, 1e-9)), [1, 0, 0, 0])  # never empty


def test_min_p_brute_force(np_rng):
    x = rows(np_rng)
    for min_p in (0.0, 0.01, 0.2, 0.5, 0.9, 1.0):
        out = R.min_p_filter(x, min_p)
        for row, o in zip(x, out):
            q = probs64(row)
            keep = q >= min_p * q.max() * (1 - 1e-6)  # rounding slack; no random row sits on it
            np.testing.assert_array_equal(np.isfinite(o), keep, err_msg=f"min_p={min_p}")


def hf_typical(scores: np.ndarray, mass: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Transcription of transformers' TypicalLogitsWarper.__call__ for one row (float64)."""
    scores = scores.astype(np.float64)
    normalized = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())  # log_softmax
    p = np.exp(normalized)
    ent = -np.nansum(normalized * p)
    shifted_scores = np.abs((-normalized) - ent)
    sorted_indices = np.argsort(shifted_scores, kind="stable")
    sorted_scores = shifted_scores[sorted_indices]
    sorted_logits = scores[sorted_indices]
    cumulative_probs = np.cumsum(probs64(sorted_logits))
    last_ind = min(int(np.sum(cumulative_probs < mass)), scores.size - 1)
    sorted_indices_to_remove = sorted_scores > sorted_scores[last_ind]
    sorted_indices_to_remove[:min_tokens_to_keep] = False
    indices_to_remove = np.zeros(scores.size, bool)
    indices_to_remove[sorted_indices] = sorted_indices_to_remove
    return np.where(indices_to_remove, -np.inf, scores)


def test_typical_matches_hugging_face(np_rng):
    x = np.concatenate([rows(np_rng, 100, 9), (np_rng.normal(size=(100, 60)) * 3).astype(np.float32)[:, :9]])
    wide = (np_rng.normal(size=(50, 60)) * 3).astype(np.float32)
    for mass in (0.05, 0.3, 0.5, 0.8, 0.95):
        for data in (x, wide):
            out = R.typical_filter(data, mass)
            for row, o in zip(data, out):
                np.testing.assert_array_equal(np.isfinite(o), np.isfinite(hf_typical(row, mass)), err_msg=f"mass={mass}")


def test_typical_hand_example():
    # q = [0.5, 0.3, 0.15, 0.05]: H = 1.1437; |-log q - H| = [0.45, 0.06, 0.75, 1.85].
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    np.testing.assert_array_equal(np.isfinite(R.typical_filter(x, 0.2)), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.isfinite(R.typical_filter(x, 0.5)), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.isfinite(R.typical_filter(x, 0.9)), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.isfinite(R.typical_filter(x, 1.0)), [1, 1, 1, 1])


def test_filters_ignore_removed_tokens_and_sanitize():
    x = np.array([[np.nan, 2.0, -np.inf, 1.0, np.inf]], np.float32)
    for f, knob in ((R.top_k_filter, 2), (R.top_p_filter, 0.5), (R.min_p_filter, 0.5), (R.typical_filter, 0.5)):
        out = f(x, knob)
        assert out[0, 0] == -np.inf and out[0, 2] == -np.inf and out[0, 4] == R.F32_MAX
    assert np.all(R.top_p_filter(np.full((1, 3), -np.inf, np.float32), 0.5) == -np.inf)
    assert np.all(R.typical_filter(np.full((1, 3), np.nan, np.float32), 0.5) == -np.inf)


def test_per_row_knobs_and_leading_dims(np_rng):
    x = rows(np_rng, 6, 9).reshape(2, 3, 9)
    k = np.array([[1, 2, 3], [0, 9, 4]])
    out = R.top_k_filter(x, k)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(out[i, j], R.top_k_filter(x[i, j], int(k[i, j])))
    # A [3] knob broadcasts against the [2, 3] batch shape; None means off.
    p = np.array([0.2, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(R.top_p_filter(x, p)[1, 2], x[1, 2])
    np.testing.assert_array_equal(R.top_k_filter(x, None), x)


# ---------------------------------------------------------------------------------------
# softmax, greedy, sample_probs


def test_softmax_and_greedy():
    x = np.array([[4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79], [0.0, np.nan, np.inf, np.inf, 0.0, 0, 0, 0, 0]], np.float32)
    p = R.softmax(x)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p[0], probs64(x[0]), rtol=1e-6)
    np.testing.assert_allclose(p[1], [0, 0, 0.5, 0.5, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(R.greedy(x), [3, 2])
    assert np.all(R.softmax(np.full((2, 3), -np.inf)) == 0)
    np.testing.assert_array_equal(R.greedy(np.full((2, 3), np.nan)), [0, 0])
    np.testing.assert_allclose(np.exp(R.log_softmax(x[0])), probs64(x[0]), rtol=1e-12)


def test_sample_probs_filters_renormalise_in_order():
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float64)).astype(np.float32)
    # top_p alone: 0.4 < 0.5, so two tokens.
    np.testing.assert_allclose(R.sample_probs(x, top_p=0.5), [4 / 7, 3 / 7, 0, 0], rtol=1e-6)
    # top-k first: over the top 2 the first token has mass 4/7 >= 0.5, so top-p keeps it alone.
    np.testing.assert_allclose(R.sample_probs(x, top_k=2, top_p=0.5), [1, 0, 0, 0], rtol=1e-6)
    # min-p is relative to the top probability, unchanged by renormalisation.
    np.testing.assert_allclose(R.sample_probs(x, min_p=0.5), [4 / 9, 3 / 9, 2 / 9, 0], rtol=1e-6)
    # typical-p sees the survivors of top-k: over [4/9, 3/9, 2/9] the most typical token is 3/9.
    q = np.array([4, 3, 2]) / 9
    d = np.abs(-np.log(q) + np.sum(q * np.log(q)))
    assert np.argmin(d) == 1
    np.testing.assert_allclose(R.sample_probs(x, top_k=3, typical_p=0.3), [0, 1, 0, 0], rtol=1e-6)
    # Temperature first: T = 0.5 squares the probabilities.
    sq = np.array([0.16, 0.09, 0.04, 0.01])
    np.testing.assert_allclose(R.sample_probs(x, temperature=0.5), sq / sq.sum(), rtol=1e-5)
    np.testing.assert_allclose(R.sample_probs(x, temperature=0.5, top_p=0.6), [16 / 25, 9 / 25, 0, 0], rtol=1e-5)


def test_sample_probs_degenerate_rows():
    x = np.array(
        [
            [1.0, 5.0, 5.0, 0.0],  # temperature 0: greedy, lowest index on ties
            [-np.inf] * 4,  # nothing finite: token 0
            [np.nan] * 4,
            [np.inf, 0.0, np.inf, np.nan],  # two +inf share the mass
            [1e30, -1e30, 0.0, 1e30],
        ],
        np.float32,
    )
    p = R.sample_probs(x, temperature=[0.0, 1.0, 0.7, 1.0, 0.001])
    np.testing.assert_array_equal(p, [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0.5, 0, 0.5, 0], [0.5, 0, 0, 0.5]])
    np.testing.assert_allclose(p.sum(-1), 1)


def test_sample_frequencies(np_rng):
    x = rows(np_rng, 1, 9)[0]
    knobs = dict(temperature=1.3, top_k=6, top_p=0.95)
    n = 30_000
    ids = R.sample(np.random.default_rng(0), np.broadcast_to(x, (n, 9)), **knobs)
    probs = R.sample_probs(x, **knobs)
    counts = np.bincount(ids, minlength=9)
    assert np.all(counts[probs == 0] == 0)
    assert scipy.stats.chisquare(counts[probs > 0], n * probs[probs > 0]).pvalue > 1e-4
    # Reproducible with the same generator seed.
    np.testing.assert_array_equal(R.sample(np.random.default_rng(0), np.broadcast_to(x, (n, 9)), **knobs), ids)


# ---------------------------------------------------------------------------------------
# Processors


def test_processor_references_by_hand():
    x = np.array([[2.0, -2.0, 0.0, 1.0]], np.float32)
    seen = np.array([[True, True, True, False]])
    np.testing.assert_array_equal(R.apply_repetition_penalty(x, seen, 2.0), [[1.0, -4.0, 0.0, 1.0]])
    counts = np.array([[3, 0, 1, 0]])
    np.testing.assert_allclose(R.apply_frequency_presence_penalty(x, counts, 0.5, 1.0), [[-0.5, -2.0, -1.5, 1.0]])
    np.testing.assert_array_equal(R.apply_logit_bias(x, {3: 10.0}), [[2.0, -2.0, 0.0, 11.0]])
    np.testing.assert_array_equal(R.ban_tokens(x, [1, 3]), [[2.0, -np.inf, 0.0, -np.inf]])
    np.testing.assert_array_equal(R.apply_min_new_tokens(np.vstack([x, x]), [0, 2], 2, [0]), [[-np.inf, -2, 0, 1], [2, -2, 0, 1]])
    np.testing.assert_array_equal(R.prompt_mask([[1, 1, 3], [2, 0, 0]], 4, [3, 1]), [[0, 1, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(R.token_counts([[1, 1, 3], [2, 0, 0]], 4, [[1, 1, 1], [1, 0, 1]]), [[0, 2, 0, 1], [1, 0, 1, 0]])


# ---------------------------------------------------------------------------------------
# generate


class ToyModel:
    """Next-token logits depend on the last token only; records the input lengths it saw."""

    def __init__(self, vocab=9, seed=0):
        self.table = (np.random.default_rng(seed).normal(size=(vocab, vocab)) * 3).astype(np.float32)
        self.seen_lengths = []

    def __call__(self, idx):
        self.seen_lengths.append(idx.shape[1])
        return self.table[idx]


def test_generate_crops_context_and_is_greedy_by_default():
    model = ToyModel()
    prompt = np.array([[1, 2, 5, 8], [0, 0, 3, 4]])
    out = R.generate(model, prompt, max_new_tokens=5, context_size=3)
    assert out.shape == (2, 9)
    assert model.seen_lengths == [3, 3, 3, 3, 3]
    for t in range(4, 9):
        np.testing.assert_array_equal(out[:, t], np.argmax(model.table[out[:, t - 1]], -1))


def test_generate_samples_within_the_kept_set_and_needs_rng():
    model = ToyModel(seed=1)
    prompt = np.array([[1], [2], [3]])
    out = R.generate(model, prompt, 30, 8, temperature=[1.0, 0.0, 2.0], top_k=3, rng=np.random.default_rng(0))
    for t in range(1, 31):
        allowed = np.argsort(-model.table[out[:, t - 1]], axis=-1, kind="stable")[:, :3]
        assert all(out[b, t] in allowed[b] for b in range(3))
        assert out[1, t] == allowed[1, 0]  # the greedy row
    with pytest.raises(ValueError, match="rng"):
        R.generate(model, prompt, 2, 8, temperature=1.0)


def test_generate_pads_after_eos_and_applies_penalties():
    model = ToyModel(seed=2)
    prompt = np.array([[4], [5]])
    greedy = R.generate(model, prompt, 8, 4)
    eos = int(greedy[0, 2])
    out = R.generate(model, prompt, 8, 4, eos_id=eos, pad_id=-1)
    first = np.argmax(greedy[0, 1:] == eos) + 1
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert np.all(out[0, first + 1 :] == -1)
    # A huge presence penalty forbids repeating any generated token (while tokens remain).
    no_repeat = R.generate(model, prompt, 8, 4, presence_penalty=1e4)
    for row in no_repeat[:, 1:]:
        assert len(set(row.tolist())) == row.size
