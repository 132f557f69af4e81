"""Reproduces the numbers printed in the seed post (chapter 5 of "Build a Large Language Model
(From Scratch)"), with both the JAX sampler and the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode import reference as R

NEG = -np.inf


def test_greedy_picks_forward(toy_vocab, toy_logits):
    inverse_vocab = {v: k for k, v in toy_vocab.items()}
    probas = R.softmax(toy_logits)
    assert inverse_vocab[int(np.argmax(probas))] == "forward"
    assert inverse_vocab[int(R.greedy(toy_logits))] == "forward"
    assert inverse_vocab[int(jaxdecode.greedy(jnp.asarray(toy_logits)))] == "forward"
    # Temperature 0 in the sampler is greedy too.
    ids = jaxdecode.sample(jax.random.key(123), jnp.broadcast_to(jnp.asarray(toy_logits), (1000, 9)), temperature=0.0)
    assert {inverse_vocab[int(i)] for i in np.asarray(ids)} == {"forward"}


def test_top3_logits_and_positions(toy_logits):
    # torch.topk(next_token_logits, 3) -> tensor([6.7500, 6.2800, 4.5100]), tensor([3, 7, 0])
    values, positions = jax.lax.top_k(jnp.asarray(toy_logits), 3)
    np.testing.assert_allclose(np.asarray(values), [6.75, 6.28, 4.51], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(positions), [3, 7, 0])
    order = np.argsort(-toy_logits, kind="stable")[:3]
    np.testing.assert_array_equal(order, [3, 7, 0])


@pytest.mark.parametrize("impl", ["jax", "reference"])
def test_top3_masked_logits_and_softmax(impl, toy_logits):
    expected_logits = np.array([4.51, NEG, NEG, 6.75, NEG, NEG, NEG, 6.28, NEG], np.float32)
    if impl == "jax":
        masked = np.asarray(jaxdecode.top_k_filter(jnp.asarray(toy_logits), 3))
        probas = np.asarray(jax.nn.softmax(jnp.asarray(masked)))
    else:
        masked = R.top_k_filter(toy_logits, 3)
        probas = R.softmax(masked)
    np.testing.assert_array_equal(masked, expected_logits)
    # As the book prints: tensor([0.0615, 0.0000, 0.0000, 0.5775, 0.0000, 0.0000, 0.0000, 0.3610, 0.0000])
    np.testing.assert_array_equal(np.round(probas.astype(np.float64), 4), [0.0615, 0, 0, 0.5775, 0, 0, 0, 0.3610, 0])
    # The sampler draws from exactly this distribution (temperature 1, top_k=3).
    np.testing.assert_allclose(R.sample_probs(toy_logits, top_k=3), probas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1, 0.1, 5])
def test_temperature_scaled_softmax(temperature, toy_logits):
    # softmax_with_temperature(logits, T) = softmax(logits / T)
    x64 = toy_logits.astype(np.float64) / temperature
    expected = np.exp(x64 - x64.max()) / np.exp(x64 - x64.max()).sum()
    ref = R.softmax(R.apply_temperature(toy_logits, temperature))
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-7)
    jx = np.asarray(jax.nn.softmax(jaxdecode.apply_temperature(jnp.asarray(toy_logits), temperature)))
    np.testing.assert_allclose(jx, ref, rtol=1e-5, atol=1e-7)
    # The sampler's distribution at this temperature (no filters) is the same softmax.
    np.testing.assert_allclose(R.sample_probs(toy_logits, temperature=temperature), expected, rtol=1e-5, atol=1e-7)


def test_temperature_shapes_the_distribution(toy_logits):
    p1, p01, p5 = (R.softmax(toy_logits / t) for t in (1, 0.1, 5))
    # T=0.1: essentially all the mass on "forward"; T=5: flatter than T=1.
    assert p01[3] > 0.98
    assert p5.max() < p1.max() and p5.min() > p1.min()


def test_sampling_only_draws_top3_words(toy_logits):
    ids = np.asarray(jaxdecode.sample(jax.random.key(123), jnp.broadcast_to(jnp.asarray(toy_logits), (1000, 9)), top_k=3))
    assert set(ids.tolist()) == {0, 3, 7}
    ref_ids = R.sample(np.random.default_rng(123), np.broadcast_to(toy_logits, (1000, 9)), top_k=3)
    assert set(ref_ids.tolist()) == {0, 3, 7}


@pytest.mark.parametrize("impl", ["jax", "reference"])
def test_batch_top_k_uses_each_rows_own_threshold(impl):
    # The book's `logits < top_logits[:, -1]` compares a [B] vector against the vocabulary
    # axis; the correct per-row rule is `logits < top_logits[:, -1:]`.
    logits = np.array(
        [
            [4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79],
            [-3.0, -2.0, 9.0, 8.0, -1.0, 0.5, 7.0, 0.0, 2.0],
        ],
        np.float32,
    )
    if impl == "jax":
        out = np.asarray(jaxdecode.top_k_filter(jnp.asarray(logits), 3))
    else:
        out = R.top_k_filter(logits, 3)
    np.testing.assert_array_equal(np.isfinite(out[0]), [1, 0, 0, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(np.isfinite(out[1]), [0, 0, 1, 1, 0, 0, 1, 0, 0])
    # What the book's expression would do with a per-row threshold applied along the right axis.
    top = np.sort(logits, axis=-1)[:, ::-1][:, :3]
    per_row = np.where(logits < top[:, -1:], -np.inf, logits)
    np.testing.assert_array_equal(out, per_row)
    # And the sampler draws each row from its own top 3.
    ids = np.asarray(jaxdecode.sample(jax.random.key(0), jnp.asarray(np.repeat(logits, 500, axis=0)), top_k=3))
    assert set(ids[:500].tolist()) <= {0, 3, 7}
    assert set(ids[500:].tolist()) <= {2, 3, 6}


def test_book_generate_loop_greedy_and_top_k():
    # A toy "model": the next-token logits depend on the last token only.
    rng = np.random.default_rng(0)
    table = rng.normal(size=(9, 9)).astype(np.float32) * 3

    def model(idx):
        return table[idx]  # [B, T, V]

    prompt = np.array([[1, 2, 5, 8], [0, 0, 3, 4]])
    out = R.generate(model, prompt, max_new_tokens=6, context_size=3)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out[:, :4], prompt)
    for t in range(4, 10):
        np.testing.assert_array_equal(out[:, t], np.argmax(table[out[:, t - 1]], axis=-1))
    sampled = R.generate(model, prompt, 20, 3, temperature=1.5, top_k=2, rng=np.random.default_rng(1))
    for t in range(4, 24):
        allowed = np.argsort(-table[sampled[:, t - 1]], axis=-1)[:, :2]
        assert all(sampled[b, t] in allowed[b] for b in range(2))
