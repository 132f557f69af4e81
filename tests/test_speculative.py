"""Speculative decoding: greedy identical to plain greedy, sampled distribution exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxdecode
from fake_models import trigram_logits, trigram_model
from jaxdecode import reference


def greedy_numpy(table, prompt, n, eos=None):
    toks = list(prompt)
    for _ in range(n):
        prev = toks[-2] if len(toks) >= 2 else 0
        toks.append(int(np.argmax(table[prev, toks[-1]])))
        if eos is not None and toks[-1] == eos:
            break
    return toks


TARGET, TABLE = trigram_model(8, seed=0)
DRAFT, _ = trigram_model(8, seed=0, scale=1.5)  # related but different: some rejections
OTHER, _ = trigram_model(8, seed=7)


@pytest.mark.parametrize("proposer", [jaxdecode.draft_model(DRAFT, 3), jaxdecode.draft_model(OTHER, 2), jaxdecode.prompt_lookup(4, 2)])
def test_greedy_identical_to_plain_greedy(proposer):
    prompts = jnp.array([[1, 2, 3, 1, 2, 3], [4, 5, 0, 0, 0, 0]], jnp.int32)
    out = jaxdecode.speculative_generate(TARGET, prompts, 12, proposer=proposer, temperature=0.0, prompt_lengths=[6, 2])
    for b, plen in enumerate([6, 2]):
        want = greedy_numpy(TABLE, prompts[b, :plen].tolist(), 12)
        assert out.tokens[b, : len(want)].tolist() == want
        assert int(out.lengths[b]) == len(want)
    assert np.all(np.asarray(out.accepted) <= np.asarray(out.proposed))


def test_same_model_draft_accepts_everything_and_saves_rounds():
    out = jaxdecode.speculative_generate(TARGET, jnp.array([[1, 2]]), 12, proposer=jaxdecode.draft_model(TARGET, 3), temperature=0.0)
    assert int(out.accepted[0]) == int(out.proposed[0])
    assert int(out.rounds) == 3  # 4 tokens per round
    assert out.tokens[0].tolist() == greedy_numpy(TABLE, [1, 2], 12)


def test_prompt_lookup_on_repetitive_text():
    # A cyclic model: the next token is (t + 1) % 5; the prompt shows the cycle once.
    table = jnp.log(jnp.full((5, 5), 0.01) + jnp.eye(5, k=1) + jnp.eye(5, k=-4))
    model = jaxdecode.CachedModel(lambda b, n: jnp.zeros((b,)), lambda t, p, c: (table[t], c))
    out = jaxdecode.speculative_generate(model, jnp.array([[0, 1, 2, 3, 4, 0]]), 10, proposer=jaxdecode.prompt_lookup(4, 2), temperature=0.0)
    assert out.tokens[0, 6:].tolist() == [(1 + i) % 5 for i in range(10)]
    assert int(out.rounds) < 10 and int(out.accepted[0]) >= 6


@pytest.mark.parametrize(
    "proposer,knobs",
    [
        (jaxdecode.draft_model(OTHER, 2), dict(temperature=1.0)),
        (jaxdecode.draft_model(DRAFT, 3), dict(temperature=0.7, top_k=4, top_p=0.9)),
        (jaxdecode.prompt_lookup(3, 1), dict(temperature=1.3, min_p=0.05)),
    ],
)
def test_sampled_distribution_is_the_target_distribution(proposer, knobs):
    """Joint distribution of the first two tokens equals plain sampling's (chi-square)."""
    rows = 20000
    prompt = jnp.tile(jnp.array([[3, 1, 3, 1]], jnp.int32), (rows, 1))
    out = jaxdecode.speculative_generate(TARGET, prompt, 2, proposer=proposer, key=jax.random.key(42), **knobs)
    pairs = np.asarray(out.tokens[:, 4]) * 8 + np.asarray(out.tokens[:, 5])
    observed = np.bincount(pairs, minlength=64)
    ref_knobs = {k: v for k, v in knobs.items()}
    p1 = reference.sample_probs(TABLE[3, 1][None], **ref_knobs)[0]
    expected = np.zeros(64)
    for t1 in range(8):
        p2 = reference.sample_probs(TABLE[1, t1][None], **ref_knobs)[0]
        expected[t1 * 8 : t1 * 8 + 8] = p1[t1] * p2
    assert observed[expected == 0].sum() == 0
    mask = expected * rows >= 5
    obs = np.append(observed[mask], observed[~mask].sum())
    exp = np.append(expected[mask], expected[~mask].sum()) * rows
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-4


def test_eos_and_ragged_rows_match_single_runs():
    keys = jax.random.split(jax.random.key(5), 3)
    prompts = jnp.array([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]], jnp.int32)
    lengths = [4, 2, 1]
    kw = dict(proposer=jaxdecode.draft_model(DRAFT, 3), temperature=0.9, eos_id=[2, 5])
    out = jaxdecode.speculative_generate(TARGET, prompts, 10, key=keys, prompt_lengths=lengths, **kw)
    for b in range(3):
        alone = jaxdecode.speculative_generate(TARGET, prompts[b : b + 1, : lengths[b]], 10, key=keys[b : b + 1], **kw)
        n = int(alone.lengths[0])
        assert out.tokens[b, :n].tolist() == alone.tokens[0, :n].tolist()
        assert int(out.lengths[b]) == n
        gen = out.tokens[b, lengths[b] : n].tolist()
        assert all(t not in (2, 5) for t in gen[:-1])
        assert len(gen) == 10 or gen[-1] in (2, 5)
        assert np.all(np.asarray(out.tokens[b, n:]) == 0)
        # Each token's log-probabilities against the NumPy reference: under the target's
        # filtered distribution (temperature 0.9) and its raw log-softmax; 0 after the end.
        seq = out.tokens[b, :n].tolist()
        want_lp, want_raw = [], []
        for t in range(lengths[b], n):
            logits = trigram_logits(TABLE, seq[:t])[None]
            want_lp.append(np.log(reference.sample_probs(logits, temperature=0.9)[0, seq[t]]))
            want_raw.append(reference.log_softmax(logits)[0, seq[t]])
        g = n - lengths[b]
        np.testing.assert_allclose(out.logprobs[b, :g], want_lp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.raw_logprobs[b, :g], want_raw, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out.logprobs[b, g:]) == 0) and np.all(np.asarray(out.raw_logprobs[b, g:]) == 0)


def test_bad_inputs():
    prompt = jnp.array([[1, 2]])
    with pytest.raises(ValueError, match="num_tokens"):
        jaxdecode.draft_model(DRAFT, 0)
    with pytest.raises(ValueError, match="ngram"):
        jaxdecode.prompt_lookup(2, 0)
    small, _ = trigram_model(5, seed=1)
    with pytest.raises(ValueError, match="vocabulary size"):
        jaxdecode.speculative_generate(TARGET, prompt, 4, proposer=jaxdecode.draft_model(small, 2), temperature=0.0)
    with pytest.raises(ValueError, match="key"):
        jaxdecode.speculative_generate(TARGET, prompt, 4, proposer=jaxdecode.prompt_lookup(), temperature=0.8)
    with pytest.raises(TypeError, match="proposer"):
        jaxdecode.speculative_generate(TARGET, prompt, 4, proposer=3, temperature=0.0)


def test_vmap_equals_batched_call():
    prompts = jnp.array([[1, 2, 3], [4, 5, 6], [7, 1, 2]], jnp.int32)
    keys = jax.random.split(jax.random.key(9), 3)
    kw = dict(proposer=jaxdecode.draft_model(DRAFT, 2), temperature=0.8, eos_id=3)
    batched = jaxdecode.speculative_generate(TARGET, prompts, 6, key=keys, **kw)
    one = lambda p, k: jaxdecode.speculative_generate(TARGET, p[None], 6, key=k[None], **kw).tokens[0]
    np.testing.assert_array_equal(jax.vmap(one)(prompts, keys), batched.tokens)


def test_stateless_target_and_draft():
    from fake_models import Bigram, cached

    target, draft = Bigram.random(9, seed=2), Bigram.random(9, seed=2, scale=1.0)
    prompts = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
    kw = dict(temperature=0.0, prompt_lengths=[3, 2], eos_id=8)
    plain = jaxdecode.generate(target, prompts, 10, **kw)
    for proposer in (jaxdecode.draft_model(draft, 3), jaxdecode.draft_model(cached(draft), 2), jaxdecode.prompt_lookup(3, 2)):
        out = jaxdecode.speculative_generate(target, prompts, 10, proposer=proposer, **kw)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
