"""Beam search: brute-force optimality on a tiny random model, greedy equivalence, EOS, ragged."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from fake_models import trigram_model


def brute_force(table, prompt, n, alpha, eos):
    """Best (score, generated tokens) over all continuations of length <= n (EOS ends one)."""
    logsm = table - np.log(np.exp(table - table.max(-1, keepdims=True)).sum(-1, keepdims=True)) - table.max(-1, keepdims=True)
    vocab = table.shape[0]
    best = (-np.inf, None)
    for length in range(1, n + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos is not None and any(t == eos for t in seq[:-1]):
                continue
            if eos is not None and length < n and seq[-1] != eos:
                continue
            toks = list(prompt) + list(seq)
            lp = 0.0
            for j in range(len(prompt), len(toks)):
                prev = toks[j - 2] if j >= 2 else 0
                lp += logsm[prev, toks[j - 1], toks[j]]
            score = lp / length**alpha
            if score > best[0] + 1e-6:
                best = (score, list(seq))
    return best


@pytest.mark.parametrize("alpha,eos", [(1.0, 2), (0.0, 2), (2.0, 1), (1.0, None)])
def test_beam_search_matches_brute_force(alpha, eos):
    vocab, n = 4, 3
    model, table = trigram_model(vocab, seed=int(alpha * 10) + (eos or 0))
    prompts = np.array([[1, 3], [0, 1]], np.int32)
    out = jaxdecode.beam_search(model, prompts, n, num_beams=vocab ** (n - 1), length_penalty=alpha, eos_id=eos)
    for b in range(2):
        score, seq = brute_force(table, prompts[b], n, alpha, eos)
        length = int(out.lengths[b, 0]) - 2
        assert out.tokens[b, 0, 2 : 2 + length].tolist() == seq
        np.testing.assert_allclose(float(out.scores[b, 0]), score, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out.tokens[b, 0, 2 + length :]) == 0)


def test_num_beams_one_is_greedy():
    vocab, n = 7, 6
    model, table = trigram_model(vocab, seed=3)
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    out = jaxdecode.beam_search(model, prompt, n, num_beams=1)
    # Greedy by hand.
    toks = [1, 2, 3]
    for _ in range(n):
        toks.append(int(np.argmax(table[toks[-2], toks[-1]])))
    assert out.tokens[0, 0].tolist() == toks


def test_ragged_prompts_equal_separate_runs():
    vocab, n = 6, 4
    model, _ = trigram_model(vocab, seed=5)
    prompts = jnp.array([[1, 2, 3, 4], [5, 1, 0, 0]], jnp.int32)
    out = jaxdecode.beam_search(model, prompts, n, num_beams=3, num_return_sequences=2, prompt_lengths=[4, 2], eos_id=0, pad_id=0)
    alone = jaxdecode.beam_search(model, prompts[1:, :2], n, num_beams=3, num_return_sequences=2, eos_id=0)
    np.testing.assert_array_equal(out.lengths[1], alone.lengths[0])
    np.testing.assert_allclose(out.scores[1], alone.scores[0], rtol=1e-6)
    width = alone.tokens.shape[-1]
    np.testing.assert_array_equal(out.tokens[1, :, :width], alone.tokens[0])
    assert np.all(np.asarray(out.tokens[1, :, width:]) == 0)


def test_returns_sorted_scores_and_eos_lengths():
    vocab, n = 5, 5
    model, _ = trigram_model(vocab, seed=11)
    out = jaxdecode.beam_search(model, jnp.array([[1, 2]]), n, num_beams=4, num_return_sequences=4, eos_id=3)
    scores = np.asarray(out.scores[0])
    assert np.all(np.diff(scores) <= 1e-7)
    for r in range(4):
        length = int(out.lengths[0, r])
        row = out.tokens[0, r].tolist()
        gen = row[2:length]
        assert 3 not in gen[:-1]  # EOS only at the end
        assert length == 2 + n or gen[-1] == 3


def test_bad_inputs():
    model, _ = trigram_model(4)
    prompt = jnp.array([[1, 2]])
    with pytest.raises(ValueError, match="num_beams"):
        jaxdecode.beam_search(model, prompt, 3, num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        jaxdecode.beam_search(model, prompt, 3, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxdecode.beam_search(model, prompt, 0, num_beams=2)
    with pytest.raises(TypeError, match="init_cache"):
        jaxdecode.beam_search("not a model", prompt, 3, num_beams=2)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 5\)"):
        jaxdecode.beam_search(lambda t: t, prompt, 3, num_beams=2)
    with pytest.raises(ValueError, match="prompt_lengths"):
        jaxdecode.beam_search(model, prompt, 3, num_beams=2, prompt_lengths=[3])


def test_vmap_and_jit_equal_batched_call():
    model, _ = trigram_model(6, seed=2)
    prompts = jnp.array([[1, 2, 3], [4, 0, 5], [2, 2, 2]], jnp.int32)
    batched = jaxdecode.beam_search(model, prompts, 4, num_beams=3, eos_id=5)
    one = lambda p: jaxdecode.beam_search(model, p[None], 4, num_beams=3, eos_id=5).tokens[0]
    np.testing.assert_array_equal(jax.vmap(one)(prompts), batched.tokens)
    np.testing.assert_array_equal(jax.jit(jax.vmap(one))(prompts), batched.tokens)


def test_new_prompt_values_do_not_recompile():
    from jaxdecode import _beam

    model, _ = trigram_model(6, seed=4)
    sizes = []
    for i in range(10):
        jaxdecode.beam_search(model, jnp.array([[i % 6, 1, 2]]), 3, num_beams=2, length_penalty=0.5 + i, eos_id=i % 6, prompt_lengths=[1 + i % 3])
        sizes.append(_beam._beam_search_jit._cache_size())
    assert sizes[1:] == [sizes[0]] * 9


def test_per_token_and_top_logprobs():
    vocab, n = 6, 4
    model, table = trigram_model(vocab, seed=8)
    prompt = [2, 4]
    out = jaxdecode.beam_search(model, jnp.array([prompt]), n, num_beams=3, num_return_sequences=2, eos_id=5, top_logprobs=3)
    logsm = np.asarray(jax.nn.log_softmax(jnp.asarray(table), axis=-1))
    for r in range(2):
        length = int(out.lengths[0, r])
        toks = out.tokens[0, r, :length].tolist()
        for j in range(2, length):
            row = logsm[toks[j - 2], toks[j - 1]]
            np.testing.assert_allclose(float(out.logprobs[0, r, j - 2]), row[toks[j]], rtol=1e-5, atol=1e-5)
            order = np.argsort(-row, kind="stable")[:3]
            assert out.top_ids[0, r, j - 2].tolist() == order.tolist()
            np.testing.assert_allclose(np.asarray(out.top_logprobs[0, r, j - 2]), row[order], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.sum_logprobs[0, r]), float(np.sum(out.logprobs[0, r])), rtol=1e-5)
        assert np.all(np.asarray(out.logprobs[0, r, length - 2 :]) == 0)


def test_stateless_model_equals_cached_model():
    from fake_models import Bigram, cached

    bigram = Bigram.random(7, seed=1)
    prompts = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
    kw = dict(num_beams=3, num_return_sequences=2, prompt_lengths=[3, 2], eos_id=6)
    a = jaxdecode.beam_search(bigram, prompts, 5, **kw)
    b = jaxdecode.beam_search(cached(bigram), prompts, 5, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
