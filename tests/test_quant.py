"""int8 Llama (``Llama.quantize("int8")`` / ``models.load(dtype="int8")``): int8 weights per
output channel, activations quantized per token in two int8 parts inside each matmul
(optionally SmoothQuant-smoothed from calibration text), int8 x int8 -> int32 dots.

Checked: the quantizer's round-trip bound, the two-part activation codes' bound, ``qlinear``
against a NumPy emulation of the same integer arithmetic (one row and many rows), logits close
to float32 on a tiny random Llama through the full forward, the KV-cached step and generate,
and the default model's int8 logits against float32 (the second part must help)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from conftest_models import random_llama_params
from jaxdecode.models import Llama, LlamaConfig, first_layers, load
from jaxdecode.models._common import (QuantizedWeight, dequantize, linear, quantize_int8, quantize_rows,
                                      smoothing)

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            hidden_dim=64, max_seq_len=64)


def tiny(tie, seed=0):
    cfg = LlamaConfig(**TINY, tie_embeddings=tie)
    params = random_llama_params(np.random.default_rng(seed), tie_embeddings=tie,
                                 **{k: getattr(cfg, k) for k in (
                                     "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                     "head_dim", "hidden_dim")})
    return Llama.from_params(params, cfg)


def emulate_codes(xs):
    """NumPy: per-row scale max|x| / 127, q1 = round(x / scale) (half to even, as XLA) and
    q2 = round((x / scale - q1) * 254)."""
    amax = np.abs(xs).max(-1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    t = (xs / sx).astype(np.float32)
    q1 = np.clip(np.round(t), -127, 127)
    q2 = np.clip(np.round((t - q1) * np.float32(254.0)), -127, 127)
    return q1.astype(np.int64), q2.astype(np.int64), sx


def emulate_qlinear(x, w: QuantizedWeight, parts=2):
    """NumPy: smooth, quantize each row in two int8 parts, integer dots, rescale (``parts=1``:
    the first part alone, the per-token int8 code)."""
    xs = x.reshape(-1, x.shape[-1]).astype(np.float32) * np.asarray(w.inv)
    q1, q2, sx = emulate_codes(xs)
    wq = np.asarray(w.q, np.int64).T
    acc = (q1 @ wq).astype(np.float32)
    if parts == 2:
        acc = acc + (q2 @ wq).astype(np.float32) / np.float32(254.0)
    y = acc * sx * np.asarray(w.scale)
    if w.keep_idx is not None:  # the kept channels: float32, unsmoothed
        y = y + x.reshape(-1, x.shape[-1])[:, np.asarray(w.keep_idx)] @ np.asarray(w.keep_w)
    return y.reshape(*x.shape[:-1], -1)


def test_two_part_activation_codes():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    x[:, 9] *= 40.0  # an outlier channel sets every row's scale
    x[2] = 0.0
    q1, q2, sx = (np.asarray(a) for a in quantize_rows(jnp.asarray(x)))
    assert q1.dtype == q2.dtype == np.int8 and sx.shape == (5, 1)
    e1, e2, esx = emulate_codes(x)
    np.testing.assert_array_equal(q1, e1)
    np.testing.assert_array_equal(q2, e2)
    np.testing.assert_allclose(sx, esx, rtol=1e-6)  # XLA may multiply by 1/127 instead
    assert sx[2, 0] == 1.0 and not q1[2].any() and not q2[2].any()  # a zero row
    rows = [0, 1, 3, 4]
    np.testing.assert_allclose(sx[rows, 0], np.abs(x[rows]).max(-1) / 127, rtol=1e-6)
    err1 = np.abs(x - sx * q1)
    err2 = np.abs(x - sx * (q1 + q2 / np.float32(254.0)))
    assert np.all(err1 <= sx / 2 * (1 + 1e-5))
    assert np.all(err2 <= sx / 508 * (1 + 1e-3) + 1e-7)  # the bound of the docstring
    assert err2.mean() < err1.mean() / 100


def test_round_trip_error_bound():
    w = np.random.default_rng(0).normal(0, 0.05, (48, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    qw = quantize_int8(w)
    assert qw.q.dtype == jnp.int8 and qw.q.shape == (40, 48) and qw.scale.shape == (40,)
    assert qw.shape == (48, 40)
    np.testing.assert_array_equal(np.asarray(qw.inv), np.ones(48, np.float32))
    back = np.asarray(dequantize(qw))
    bound = np.asarray(qw.scale)[None, :] / 2 + 1e-7
    assert np.all(np.abs(back - w) <= bound)
    assert np.all(back[:, 3] == 0)
    # per-channel scale = max|w| / 127: the largest entry of each channel is exact (up to f32)
    np.testing.assert_allclose(np.abs(back).max(0), np.abs(w).max(0), rtol=1e-6)
    # transposed ([out, in], e.g. an embedding used as the head)
    qt = quantize_int8(w.T, transposed=True)
    np.testing.assert_array_equal(np.asarray(qt.q), np.asarray(qw.q))
    # smoothed: the quantized matrix is diag(s) w, dequantize undoes s (bound scaled by 1/s)
    s = np.random.default_rng(3).uniform(0.5, 4.0, 48).astype(np.float32)
    qs = quantize_int8(w, smooth=s)
    np.testing.assert_allclose(np.asarray(qs.inv), 1 / s, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(qs)) - w)
    assert np.all(err <= np.asarray(qs.scale)[None, :] / 2 / s[:, None] + 1e-6)


def test_qlinear_is_the_integer_arithmetic():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (48, 40)).astype(np.float32)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    x[0, 1] = 0.0  # a zero row
    x[..., 7] *= 30.0  # an outlier channel, as real activations have
    for smooth in (None, smoothing(np.abs(x).max((0, 1)), w)):
        qw = quantize_int8(w, smooth=smooth)
        for xs in (x[:1, :1], x):  # one row (two int8 rows inside) and many
            got = np.asarray(linear(jnp.asarray(xs), qw))
            np.testing.assert_allclose(got, emulate_qlinear(xs, qw), rtol=2e-6, atol=1e-6)
    # on the outlier-heavy input the second part removes nearly all of the activation error
    # (against the product with the same int8 weights); what is left against the exact
    # product is the weights' rounding
    qw = quantize_int8(w)
    same_w = x.astype(np.float64) @ np.asarray(dequantize(qw), np.float64)
    one, two = (emulate_qlinear(x, qw, parts=k) for k in (1, 2))
    assert np.abs(two - same_w).mean() < 0.01 * np.abs(one - same_w).mean()
    exact = x.astype(np.float64) @ w
    assert np.abs(two - exact).mean() < 1.02 * np.abs(same_w - exact).mean()


def test_kept_channels_leave_the_int8_path():
    """LLM.int8()'s outlier split: the kept input channels are multiplied in float32, exactly
    (their weight rows are stored unquantized), and the rest no longer share a scale with them."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.05, (48, 40)).astype(np.float32)
    x = rng.normal(size=(6, 48)).astype(np.float32)
    x[:, [7, 30]] *= 60.0  # two outlier channels
    absmax = np.abs(x).max(0)
    keep = np.argsort(-absmax)[:2]
    assert sorted(keep.tolist()) == [7, 30]
    s = smoothing(absmax, w)
    qk = quantize_int8(w, smooth=s, keep=keep)
    assert qk.keep_w.shape == (2, 40) and qk.keep_w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(qk.keep_w), w[keep])  # stored exactly
    assert np.all(np.asarray(qk.q)[:, keep] == 0) and np.all(np.asarray(qk.inv)[keep] == 0)
    back = np.asarray(dequantize(qk))
    np.testing.assert_array_equal(back[keep], w[keep])
    for xs in (x[:1], x):  # one row and many: the NumPy emulation
        np.testing.assert_allclose(np.asarray(linear(jnp.asarray(xs), qk)), emulate_qlinear(xs, qk),
                                   rtol=2e-5, atol=2e-5)
    exact = x @ w
    err_keep = np.abs(emulate_qlinear(x, qk) - exact).mean()
    err_smooth = np.abs(emulate_qlinear(x, quantize_int8(w, smooth=s)) - exact).mean()
    assert err_keep < 0.5 * err_smooth


def test_quantize_keep_channels_argument():
    m32 = tiny(True)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 12)), jnp.int32)
    m8 = m32.quantize("int8", calibration=tokens, keep_channels=3)
    wq = m8.params["layers"].layers[0]["wq"]
    assert wq.keep_idx.shape == (3,) and wq.keep_w.shape == (3, 32)
    off = m32.quantize("int8", calibration=tokens, keep_channels=0)
    assert off.params["layers"].layers[0]["wq"].keep_idx is None
    assert m32.quantize("int8").params["layers"].layers[0]["wq"].keep_idx is None  # no calibration
    ref = np.asarray(m32(tokens))
    assert np.abs(np.asarray(m8(tokens)) - ref).mean() < np.abs(np.asarray(off(tokens)) - ref).mean()
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="keep_channels"):
            m32.quantize("int8", calibration=tokens, keep_channels=bad)


@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_close_to_float32(tie):
    m32 = tiny(tie)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)), jnp.int32)
    m8 = m32.quantize("int8", calibration=tokens)
    assert m8.weight_format == "int8" and m8.dtype == jnp.float32
    assert isinstance(m8.params["layers"]["wq"], QuantizedWeight)  # stacked view: [L, out, in]
    assert m8.params["layers"]["wq"].q.shape == (2, 32, 32)
    ref, got = np.asarray(m32(tokens)), np.asarray(m8(tokens))
    assert got.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.05 * scale
    assert np.abs(got - ref).mean() < 0.01 * scale
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9
    # the KV-cached path: prefill then one-token steps, batch 1 and 2
    for b in (1, 2):
        cache = m8.init_cache(b, 16)
        assert cache.k.dtype == jnp.float32
        out, cache = m8.step(tokens[:b, :6], jnp.broadcast_to(jnp.arange(6), (b, 6)), cache)
        np.testing.assert_allclose(np.asarray(out), got[:b, :6], atol=1e-4 * scale, rtol=0)
        for t in range(6, 10):
            out, cache = m8.step(tokens[:b, t:t + 1], jnp.full((b, 1), t), cache)
            np.testing.assert_allclose(np.asarray(out[:, 0]), got[:b, t], atol=1e-4 * scale, rtol=0)
    # generate's greedy tokens are the argmax of the int8 model's own forward, step by step
    res = jaxdecode.generate(m8, tokens[:1, :4], 5, temperature=0.0)
    seq = np.asarray(res.tokens[0])
    full = np.asarray(m8(jnp.asarray(seq[None, :-1])))[0]
    np.testing.assert_array_equal(seq[4:], full[3:].argmax(-1))
    draft = first_layers(m8, 1)
    assert draft.config.n_layers == 1 and draft.weight_format == "int8"
    with pytest.raises(ValueError, match="int8"):
        m8.astype("bfloat16")
    with pytest.raises(ValueError, match="float32"):
        m8.quantize()
    with pytest.raises(ValueError, match="calibration"):
        m32.quantize("int8", calibration=jnp.zeros((3,), jnp.int32))


def test_default_model_int8_against_float32():
    m32, tok = load()
    model, _ = load(dtype="int8")
    assert model.weight_format == "int8"
    assert load(dtype="int8")[0] is model  # cached in-process
    text = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the "
            "worst of times, it was the age of wisdom, it was the age of foolishness.")
    ids = jnp.asarray([tok.encode(text)], jnp.int32)
    ref = np.asarray(m32(ids))[0]
    got = np.asarray(model(ids))[0]
    wq = model.params["layers"].layers[0]["wqkv"]
    assert wq.keep_idx is None and np.all(np.asarray(wq.inv) == 1)  # no calibration by default
    # measured 0.24 (float32 logit std ~6.2); the per-token code alone gave 0.47 even with
    # SmoothQuant and 16 kept channels
    assert np.abs(got - ref).mean() < 0.35
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9  # measured 38 of 39
    # teacher-forced: float32's next token is one of int8's two most likely at every position
    top2 = np.argsort(-got, axis=-1)[:, :2]
    assert np.mean(np.any(top2 == ref.argmax(-1)[:, None], axis=-1)) >= 0.95
    # greedy from the prompt: the two models agree on a sensible continuation's first words
    prompt = jnp.asarray([[18818, 3867, 7488, 346]], jnp.int32)  # "every effort moves you"
    out = jaxdecode.generate(model, prompt, 8, temperature=0.0)
    first = tok.decode(out.tokens[0, 4:5].tolist())
    assert first in (" away", " forward")  # float32's top two (logits 23.70 and 23.48)
