"""int8 weight-only Llama (``Llama.quantize("int8")`` / ``models.load(dtype="int8")``): the
quantizer's round-trip bound, logits close to float32 on a tiny random Llama (full forward and
the KV-cached step), and the default model's int8 greedy continuation."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from conftest_models import random_llama_params
from jaxdecode.models import Llama, LlamaConfig, first_layers, load
from jaxdecode.models._common import QuantizedWeight, dequantize, linear, quantize_int8

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            hidden_dim=64, max_seq_len=64)


def tiny(tie, seed=0):
    cfg = LlamaConfig(**TINY, tie_embeddings=tie)
    params = random_llama_params(np.random.default_rng(seed), tie_embeddings=tie,
                                 **{k: getattr(cfg, k) for k in (
                                     "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                     "head_dim", "hidden_dim")})
    return Llama.from_params(params, cfg)


def test_round_trip_error_bound():
    w = np.random.default_rng(0).normal(0, 0.05, (48, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    qw = quantize_int8(w)
    assert qw.q.dtype == jnp.int8 and qw.q.shape == (40, 48) and qw.scale.shape == (40,)
    assert qw.shape == (48, 40)
    back = np.asarray(dequantize(qw))
    bound = np.asarray(qw.scale)[None, :] / 2 + 1e-7
    assert np.all(np.abs(back - w) <= bound)
    assert np.all(back[:, 3] == 0)
    # per-channel scale = max|w| / 127: the largest entry of each channel is exact (up to f32)
    np.testing.assert_allclose(np.abs(back).max(0), np.abs(w).max(0), rtol=1e-6)
    # transposed ([out, in], e.g. an embedding used as the head)
    qt = quantize_int8(w.T, transposed=True)
    np.testing.assert_array_equal(np.asarray(qt.q), np.asarray(qw.q))
    # linear() on a quantized matrix equals x @ dequantized, for one row and for many
    x = np.random.default_rng(1).normal(size=(3, 5, 48)).astype(np.float32)
    for xs in (x[:1, :1], x):
        got = np.asarray(linear(jnp.asarray(xs), qw))
        np.testing.assert_allclose(got, xs @ back, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_close_to_float32(tie):
    m32 = tiny(tie)
    m8 = m32.quantize("int8")
    assert m8.weight_format == "int8" and m8.dtype == jnp.float32
    assert isinstance(m8.params["layers"]["wq"], QuantizedWeight)  # stacked view: [L, out, in]
    assert m8.params["layers"]["wq"].q.shape == (2, 32, 32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)), jnp.int32)
    ref, got = np.asarray(m32(tokens)), np.asarray(m8(tokens))
    assert got.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.03 * scale
    assert np.abs(got - ref).mean() < 0.005 * scale
    # the KV-cached path: prefill then one-token steps, batch 1 (the fused int8 path) and 2
    for b in (1, 2):
        cache = m8.init_cache(b, 16)
        assert cache.k.dtype == jnp.float32
        out, cache = m8.step(tokens[:b, :6], jnp.broadcast_to(jnp.arange(6), (b, 6)), cache)
        np.testing.assert_allclose(np.asarray(out), got[:b, :6], atol=1e-4 * scale, rtol=0)
        for t in range(6, 10):
            out, cache = m8.step(tokens[:b, t:t + 1], jnp.full((b, 1), t), cache)
            np.testing.assert_allclose(np.asarray(out[:, 0]), got[:b, t], atol=1e-4 * scale, rtol=0)
    # generate, a pytree of int8 + float32 leaves, and a draft cut from it
    res = jaxdecode.generate(m8, tokens[:1, :4], 5, temperature=0.0)
    assert res.tokens.shape == (1, 9)
    assert first_layers(m8, 1).config.n_layers == 1
    assert first_layers(m8, 1)(tokens).shape == (2, 10, 64)
    with pytest.raises(ValueError, match="int8"):
        m8.astype("bfloat16")
    with pytest.raises(ValueError, match="float32"):
        m8.quantize()


def test_default_model_int8_greedy():
    model, tok = load(dtype="int8")
    assert model.weight_format == "int8"
    assert load(dtype="int8")[0] is model  # cached in-process
    prompt = jnp.asarray([[18818, 3867, 7488, 346]], jnp.int32)  # "every effort moves you"
    out = jaxdecode.generate(model, prompt, 8, temperature=0.0)
    assert tok.decode(out.tokens[0, 4:].tolist()).startswith(" away from")
