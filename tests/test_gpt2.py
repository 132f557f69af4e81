"""GPT-2 on the one decoder block (jaxdecode.models._decoder, gpt2_config) against an independent NumPy forward, and its KV cache."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdecode.models import Decoder as GPT2, gpt2_config
from jaxdecode.models._families import gpt2_config_from_dict

CFG = gpt2_config(vocab_size=64, max_seq_len=32, dim=32, n_layers=2, n_heads=2)


def _randomized(cfg=CFG, seed=0, dtype=jnp.float32):
    """A model whose every param (biases and LayerNorm params included) is random, with logits
    far from uniform so mistakes show."""
    m = GPT2.init(jax.random.key(seed), cfg)
    leaves, treedef = jax.tree_util.tree_flatten(m.params)
    rng = np.random.RandomState(seed)
    new = []
    for a in leaves:
        if a.ndim == 1 or (a.ndim == 2 and a.shape[0] == cfg.n_layers):  # norms / biases
            new.append(1.0 * (a != 0) + 0.2 * rng.randn(*a.shape))
        elif a.ndim == 2:  # embeddings
            new.append(rng.randn(*a.shape))
        else:
            new.append(rng.randn(*a.shape) / math.sqrt(a.shape[-2]))
    params = jax.tree_util.tree_unflatten(treedef, [np.asarray(x, np.float32) for x in new])
    return GPT2.from_params(params, cfg, dtype=dtype)


def _np_forward(params, cfg, tokens):
    """Plain NumPy (float64) GPT-2 forward, written independently of the JAX model."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    B, T = tokens.shape
    H, hd = cfg.n_heads, cfg.dim // cfg.n_heads

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * g + b

    def gelu(x):  # GPT-2's "gelu_new"
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    x = p["embed"][tokens] + p["pos_embed"][np.arange(T)][None]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.n_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        h = ln(x, lp["attn_norm"], lp["attn_norm_bias"])
        qkv = h @ lp["wqkv"] + lp["bqkv"]
        q, k, v = (a.reshape(B, T, H, hd).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, cfg.dim)
        x = x + a @ lp["wo"] + lp["bo"]
        h = ln(x, lp["mlp_norm"], lp["mlp_norm_bias"])
        x = x + gelu(h @ lp["w_up"] + lp["b_up"]) @ lp["w_down"] + lp["b_down"]
    x = ln(x, p["norm"], p["norm_bias"])
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def _tokens(B, T, seed=1, V=CFG.vocab_size):
    return np.random.RandomState(seed).randint(0, V, size=(B, T)).astype(np.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_numpy(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    m = _randomized(cfg)
    assert ("lm_head" in m.params) == (not tie)
    tokens = _tokens(3, 17)
    got = m(tokens)
    assert got.dtype == jnp.float32 and got.shape == (3, 17, cfg.vocab_size)
    want = _np_forward(m.params, cfg, tokens)
    assert np.std(want) > 1.0  # the test model is far from uniform
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


def test_kv_cache_decode_matches_full_recompute():
    m = _randomized()
    B, P, N = 2, 5, 9
    tokens = _tokens(B, P + N, seed=2)
    full = np.asarray(m(tokens))
    cache = m.init_cache(B, 16)
    assert cache.k.shape == (CFG.n_layers, B, CFG.n_heads, 16, CFG.dim // CFG.n_heads)
    pos = np.broadcast_to(np.arange(P, dtype=np.int32), (B, P))
    logits, cache = m.step(tokens[:, :P], pos, cache)
    outs = [np.asarray(logits)]
    step = jax.jit(lambda m, t, p, c: m.step(t, p, c))  # the model is a pytree argument
    for t in range(P, P + N):
        logits, cache = step(m, tokens[:, t:t + 1], np.full((B, 1), t, np.int32), cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-5)


def test_ragged_right_padded_prompts_match_per_prompt_runs():
    m = _randomized(seed=3)
    lengths = [3, 7, 5]
    P, N = max(lengths), 4
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, CFG.vocab_size, size=n).astype(np.int32) for n in lengths]
    batch = np.full((len(lengths), P), 63, np.int32)  # junk right padding
    for b, pr in enumerate(prompts):
        batch[b, :len(pr)] = pr
    cache = m.init_cache(len(lengths), P + N)
    prefill, cache = m.step(batch, np.broadcast_to(np.arange(P, dtype=np.int32), batch.shape),
                            cache)
    prefill = np.asarray(prefill)
    # greedy continuation, each row from its own length
    seqs = [list(pr) for pr in prompts]
    nxt = np.array([prefill[b, n - 1].argmax() for b, n in enumerate(lengths)], np.int32)
    pos = np.array(lengths, np.int32)
    per_step = []
    for _ in range(N):
        for b in range(len(lengths)):
            seqs[b].append(int(nxt[b]))
        logits, cache = m.step(nxt[:, None], pos[:, None], cache)
        per_step.append(np.asarray(logits)[:, 0])
        nxt = per_step[-1].argmax(-1).astype(np.int32)
        pos = pos + 1
    for b, n in enumerate(lengths):
        # each prompt + continuation on its own (batch 1; right-padded to one length so one
        # compilation serves all rows: causal attention keeps the padding out of earlier logits)
        alone_in = np.full((1, P + N), 0, np.int32)
        alone_in[0, :n + N] = seqs[b]
        alone = np.asarray(m(alone_in))[0]
        np.testing.assert_allclose(prefill[b, :n], alone[:n], atol=1e-4, rtol=1e-5)
        for i in range(N):
            np.testing.assert_allclose(per_step[i][b], alone[n + i], atol=1e-4, rtol=1e-5)


def test_bfloat16():
    m32 = _randomized(seed=5)
    m16 = m32.astype(jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(m16.params))
    tokens = _tokens(2, 12, seed=6)
    full = m16(tokens)
    assert full.dtype == jnp.float32
    ref = np.asarray(m32(tokens))
    # bf16 weights: same model up to bf16 rounding
    err = np.abs(np.asarray(full) - ref).max() / np.abs(ref).max()
    assert np.isfinite(np.asarray(full)).all() and err < 0.1, err
    cache = m16.init_cache(2, 12)
    assert cache.k.dtype == jnp.bfloat16
    l1, cache = m16.step(tokens[:, :8], np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)), cache)
    outs = [np.asarray(l1)]
    for t in range(8, 12):
        lt, cache = m16.step(tokens[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        outs.append(np.asarray(lt))
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=0.05, rtol=0.02)


def test_pytree_and_jit_reuse():
    m = _randomized(seed=7)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    # per-layer storage: the model flattens to each layer's arrays (12 per GPT-2 layer) + 4 others
    assert len(leaves) == 4 + 12 * CFG.n_layers
    m2 = jax.tree_util.tree_unflatten(treedef, [2 * x for x in leaves])
    assert isinstance(m2, GPT2) and m2.config == m.config
    traces = []

    @jax.jit
    def f(model, t):
        traces.append(1)
        return model(t)

    t = _tokens(1, 4)
    f(m, t)
    f(m2, t)
    assert len(traces) == 1


def test_init_124m_config_and_errors():
    cfg = gpt2_config()
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.dim, cfg.n_layers, cfg.n_heads) == (
        50257, 1024, 768, 12, 12)
    shapes = jax.eval_shape(lambda k: GPT2.init(k, cfg), jax.random.key(0))
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    assert n == 124_439_808  # GPT-2 small with a tied head
    book = gpt2_config_from_dict({"vocab_size": 50257, "context_length": 256, "emb_dim": 768,
                                 "n_heads": 12, "n_layers": 12, "drop_rate": 0.1,
                                 "qkv_bias": False})
    assert book.max_seq_len == 256 and not book.tie_embeddings
    with pytest.raises(ValueError, match="divisible"):
        gpt2_config(vocab_size=10, max_seq_len=8, dim=10, n_layers=1, n_heads=3)
    m = GPT2.init(jax.random.key(0), CFG, jnp.bfloat16)
    assert m.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="max_seq_len"):
        m.init_cache(1, CFG.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(np.zeros((1, CFG.max_seq_len + 1), np.int32))
    with pytest.raises(ValueError, match="dtype"):
        GPT2.init(jax.random.key(0), CFG, jnp.float16)
    bad = dict(m.params, embed=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="embed"):
        GPT2.from_params(bad, CFG)
