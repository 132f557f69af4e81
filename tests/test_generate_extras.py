"""generate's issue-6 options: num_samples (one prefill per prompt), top_logprobs, speculative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from fake_models import Bigram, cached

V = 12
BIGRAM = Bigram.random(V, seed=3)
CACHED = cached(BIGRAM)
PROMPT = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
LENGTHS = jnp.array([3, 2])


@pytest.mark.parametrize("model", [CACHED, BIGRAM], ids=["cached", "stateless"])
def test_num_samples_equals_repeated_prompts(model):
    keys = jax.random.split(jax.random.key(1), 6)
    temps = jnp.array([0.0, 0.7, 1.0, 0.9, 1.2, 0.5])
    kw = dict(key=keys, temperature=temps, eos_id=7)
    out = jaxdecode.generate(model, PROMPT, 6, num_samples=3, prompt_lengths=LENGTHS, **kw)
    ref = jaxdecode.generate(model, jnp.repeat(PROMPT, 3, axis=0), 6, prompt_lengths=jnp.repeat(LENGTHS, 3), **kw)
    for field in ("tokens", "lengths", "num_generated"):
        np.testing.assert_array_equal(getattr(out, field), getattr(ref, field))
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == (6, 3 + 6)


def test_num_samples_prefills_each_prompt_once():
    calls = []

    def step(tokens, positions, cache):
        jax.debug.callback(lambda shape=tokens.shape: calls.append(shape))
        return CACHED.step(tokens, positions, cache)

    model = jaxdecode.CachedModel(CACHED.init_cache, step)
    jaxdecode.generate(model, PROMPT, 2, num_samples=4, prompt_lengths=LENGTHS, key=jax.random.key(0))
    jax.effects_barrier()
    assert calls[0] == (2, 8)  # prefill: the 2 prompts, once each (padded to the 8-token bucket)
    assert all(c == (8, 1) for c in calls[1:])  # decode: 8 rows


def test_num_samples_stream_matches_generate():
    kw = dict(key=jax.random.key(4), temperature=0.9, prompt_lengths=LENGTHS, num_samples=2)
    full = jaxdecode.generate(CACHED, PROMPT, 5, **kw)
    chunks = list(jaxdecode.generate_stream(CACHED, PROMPT, 5, chunk_size=2, **kw))
    streamed = np.concatenate([np.asarray(c.tokens) for c in chunks], axis=1)
    for r in range(4):
        start = int(jnp.repeat(LENGTHS, 2)[r])
        np.testing.assert_array_equal(streamed[r], np.asarray(full.tokens[r, start : start + 5]))


def test_top_logprobs_are_the_model_distribution():
    out = jaxdecode.generate(CACHED, PROMPT, 4, temperature=0.0, prompt_lengths=LENGTHS, top_logprobs=3)
    logsm = np.asarray(jax.nn.log_softmax(BIGRAM.table, axis=-1))
    for b, plen in enumerate([3, 2]):
        toks = np.asarray(out.tokens[b])
        for i in range(4):
            row = logsm[toks[plen - 1 + i]]
            order = np.argsort(-row, kind="stable")[:3]
            assert out.top_ids[b, i].tolist() == order.tolist()
            np.testing.assert_allclose(out.top_logprobs[b, i], row[order], rtol=1e-5, atol=1e-6)
            # greedy: the chosen token is the best alternative
            assert int(out.top_ids[b, i, 0]) == int(toks[plen + i])
    assert out.top_ids.shape == (2, 4, 3)
    plain = jaxdecode.generate(CACHED, PROMPT, 4, temperature=0.0, prompt_lengths=LENGTHS)
    assert plain.top_ids is None and plain.top_logprobs is None


def test_speculative_inside_generate_matches_plain():
    plain = jaxdecode.generate(CACHED, PROMPT, 8, temperature=0.0, prompt_lengths=LENGTHS, eos_id=7)
    for proposer in (jaxdecode.prompt_lookup(3, 2), jaxdecode.draft_model(cached(Bigram.random(V, seed=9)), 3)):
        spec = jaxdecode.generate(CACHED, PROMPT, 8, temperature=0.0, prompt_lengths=LENGTHS, eos_id=7, speculative=proposer)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
        np.testing.assert_array_equal(spec.lengths, plain.lengths)
        np.testing.assert_allclose(spec.raw_logprobs, plain.raw_logprobs, rtol=1e-5, atol=1e-5)


def test_bad_extras():
    with pytest.raises(ValueError, match="num_samples"):
        jaxdecode.generate(CACHED, PROMPT, 2, temperature=0.0, num_samples=0)
    with pytest.raises(ValueError, match="top_logprobs"):
        jaxdecode.generate(CACHED, PROMPT, 2, temperature=0.0, top_logprobs=-1)
    with pytest.raises(ValueError, match="top_logprobs"):
        jaxdecode.generate(CACHED, PROMPT, 2, temperature=0.0, top_logprobs=V + 1)
    with pytest.raises(ValueError, match="repetition_penalty.*speculative"):
        jaxdecode.generate(CACHED, PROMPT, 2, temperature=0.0, repetition_penalty=1.2, speculative=jaxdecode.prompt_lookup())
