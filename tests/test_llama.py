"""Llama in pure JAX: forward vs an independent NumPy forward, KV-cached decoding vs full
recomputation, ragged batches, rope layouts, bfloat16, pytree/jit behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest_models import numpy_llama_forward, random_llama_params
from jaxdecode.models import KVCache, Llama, LlamaConfig

TINY = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            hidden_dim=64, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512)


def make(rope_layout="half", tie=False, seed=0, **overrides):
    cfg = LlamaConfig(**{**TINY, **overrides}, rope_layout=rope_layout, tie_embeddings=tie)
    params = random_llama_params(np.random.default_rng(seed), tie_embeddings=tie,
                                 **{k: getattr(cfg, k) for k in (
                                     "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                     "head_dim", "hidden_dim")})
    return Llama.from_params(params, cfg), params


def ref_logits(params, cfg, tokens):
    return numpy_llama_forward(params, tokens, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                               head_dim=cfg.head_dim, norm_eps=cfg.norm_eps,
                               rope_theta=cfg.rope_theta, rope_layout=cfg.rope_layout,
                               tie_embeddings=cfg.tie_embeddings)


def assert_close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("rope_layout", ["half", "interleaved"])
@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy(rope_layout, tie):
    model, params = make(rope_layout, tie)
    tokens = np.random.default_rng(1).integers(0, 50, size=(2, 11))
    logits = model(jnp.asarray(tokens, jnp.int32))
    assert logits.shape == (2, 11, 50) and logits.dtype == jnp.float32
    assert float(jnp.std(logits)) > 0.5  # the random weights give a non-trivial distribution
    for b in range(2):
        assert_close(logits[b], ref_logits(params, model.config, tokens[b]))


def test_rope_layouts_differ_by_a_qk_permutation():
    """An interleaved-layout model equals a half-layout model whose Q/K output columns are
    permuted within each head (what llama.cpp's converter does to HF checkpoints)."""
    model, params = make("half", seed=3)
    hd = model.config.head_dim
    # new column 2i <- old i, new column 2i+1 <- old i + hd/2 (per head)
    perm_head = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).reshape(-1)

    def permute(w, n):
        cols = np.concatenate([h * hd + perm_head for h in range(n)])
        return w[..., cols]

    p2 = {**params, "layers": dict(params["layers"])}
    p2["layers"]["wq"] = permute(params["layers"]["wq"], model.config.n_heads)
    p2["layers"]["wk"] = permute(params["layers"]["wk"], model.config.n_kv_heads)
    import dataclasses
    cfg2 = dataclasses.replace(model.config, rope_layout="interleaved")
    model2 = Llama.from_params(p2, cfg2)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 50, size=(1, 9)), jnp.int32)
    assert_close(model2(tokens), model(tokens), 1e-5)


def greedy_cached(model, prompt, n_new, max_length):
    cache = model.init_cache(1, max_length)
    P = len(prompt)
    logits, cache = model.step(jnp.asarray([prompt], jnp.int32),
                               jnp.arange(P, dtype=jnp.int32)[None], cache)
    out_logits = [logits[0, -1]]
    seq = list(prompt)
    for t in range(n_new):
        nxt = int(jnp.argmax(out_logits[-1]))
        seq.append(nxt)
        logits, cache = model.step(jnp.asarray([[nxt]], jnp.int32),
                                   jnp.asarray([[P + t]], jnp.int32), cache)
        out_logits.append(logits[0, -1])
    return seq, jnp.stack(out_logits)


@pytest.mark.parametrize("rope_layout,tie", [("half", False), ("interleaved", True)])
def test_cached_decoding_matches_full_recompute(rope_layout, tie):
    model, _ = make(rope_layout, tie, seed=5)
    prompt = [3, 14, 15, 9, 2, 6]
    seq, step_logits = greedy_cached(model, prompt, n_new=7, max_length=32)
    full = model(jnp.asarray([seq], jnp.int32))[0]  # [len(seq), V]
    # step_logits[j] is the prediction after seq[:len(prompt)+j]
    assert_close(step_logits, full[len(prompt) - 1:], 1e-4)


def test_cached_decoding_across_cache_prefix_buckets():
    """Positions crossing the attention's prefix buckets (128, 256, ...) stay exact."""
    model, _ = make("interleaved", seed=6)
    prompt = list(np.random.default_rng(7).integers(0, 50, size=125))
    seq, step_logits = greedy_cached(model, prompt, n_new=6, max_length=300)
    full = model(jnp.asarray([seq], jnp.int32))[0]
    assert_close(step_logits, full[len(prompt) - 1:], 1e-4)


def test_prefill_logits_equal_forward_and_cache_contents():
    model, _ = make(seed=8)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 50, size=(2, 10)), jnp.int32)
    cache = model.init_cache(2, 16)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (2, 2, 2, 16, 8) and cache.k.dtype == jnp.float32
    logits, cache = model.step(tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)), cache)
    assert_close(logits, model(tokens))
    assert float(jnp.abs(cache.k[:, :, :, 10:]).max()) == 0.0  # untouched slots
    assert float(jnp.abs(cache.k[:, :, :, :10]).min(axis=-1).max()) > 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_equals_step_at_the_last_positions(dtype):
    """``prefill`` (fresh cache, positions 0..P-1, logits only at each row's last position)
    equals ``step``'s logits there and writes the same cache slots; P = 300 spans two causal
    attention blocks."""
    model, _ = make("interleaved", seed=20)
    model = model.astype(dtype)
    P, S = 300, 320
    tokens = jnp.asarray(np.random.default_rng(21).integers(0, 50, size=(2, P)), jnp.int32)
    last = jnp.asarray([P - 1, 123], jnp.int32)
    ref, ref_cache = model.step(tokens, jnp.broadcast_to(jnp.arange(P), (2, P)), model.init_cache(2, S))
    got, cache = model.prefill(tokens, model.init_cache(2, S), last)
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert_close(got, ref[jnp.arange(2), last], tol)
    assert_close(cache.k.astype(jnp.float32), ref_cache.k.astype(jnp.float32), tol)
    assert_close(cache.v.astype(jnp.float32), ref_cache.v.astype(jnp.float32), tol)
    assert float(jnp.abs(cache.k[:, :, :, P:].astype(jnp.float32)).max()) == 0.0
    with pytest.raises(ValueError, match="Decoder.prefill: the prompt has 300 tokens but the cache holds 16"):
        model.prefill(tokens, model.init_cache(2, 16), last)


def test_causal_attention_blocks_equal_masked_attention():
    from jaxdecode.models._common import attention, causal_attention
    rng = np.random.default_rng(22)
    q = jnp.asarray(rng.normal(size=(2, 50, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32)
    mask = jnp.tril(jnp.ones((50, 50), bool))[None]
    ref = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    for block in (7, 16, 50, 64):
        np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, block=block)),
                                   np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_ragged_right_padded_batch_matches_each_prompt_alone():
    model, _ = make("interleaved", tie=True, seed=10)
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(0, 50, size=n)) for n in (3, 7, 5)]
    P, S, n_new = 7, 24, 4
    padded = np.full((3, P), 49, np.int32)  # junk padding token
    for b, pr in enumerate(prompts):
        padded[b, :len(pr)] = pr
    lengths = np.array([len(p) for p in prompts])

    cache = model.init_cache(3, S)
    logits, cache = model.step(jnp.asarray(padded), jnp.broadcast_to(jnp.arange(P), (3, P)),
                               cache)
    last = logits[np.arange(3), lengths - 1]
    batched = [last]
    for t in range(n_new):
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        logits, cache = model.step(nxt[:, None], jnp.asarray(lengths + t, jnp.int32)[:, None],
                                   cache)
        last = logits[:, 0]
        batched.append(last)
    batched = jnp.stack(batched, axis=1)  # [3, n_new+1, V]

    for b, pr in enumerate(prompts):
        _, alone = greedy_cached(model, pr, n_new, S)
        assert_close(batched[b], alone, 1e-4)


def test_bfloat16_weights_run_and_stay_close():
    model, params = make("interleaved", seed=12)
    m16 = model.astype("bfloat16")
    assert m16.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(m16.params))
    tokens = jnp.asarray(np.random.default_rng(13).integers(0, 50, size=(1, 12)), jnp.int32)
    ref = model(tokens)
    got = m16(tokens)
    assert got.dtype == jnp.float32
    err = float(jnp.abs(got - ref).max()) / float(jnp.abs(ref).max())
    assert err < 0.05, err
    cache = m16.init_cache(1, 16)
    assert cache.k.dtype == jnp.bfloat16
    logits, cache = m16.step(tokens, jnp.arange(12)[None], cache)
    assert cache.k.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert float(jnp.abs(logits - got).max()) / float(jnp.abs(ref).max()) < 0.05
    # greedy predictions agree on most positions
    agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1)))
    assert agree >= 0.75


def test_model_is_a_pytree_and_jit_reuses_compilation_for_new_params():
    model, _ = make(seed=14)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    # embed, norm, lm_head and 9 arrays per layer (per-layer storage, see LayerStack)
    assert len(leaves) == 3 + 9 * model.config.n_layers
    assert len(jax.tree_util.tree_leaves(model.params)) == 12  # params: the stacked layout
    traces = []

    @jax.jit
    def f(m, t):
        traces.append(1)
        return m(t)

    tokens = jnp.zeros((1, 4), jnp.int32)
    f(model, tokens)
    other, _ = make(seed=15)
    f(other, tokens)
    assert len(traces) == 1
    # the cached protocol traces too
    cache = model.init_cache(1, 8)
    g = jax.jit(lambda m, t, p, c: m.step(t, p, c))
    out, cache2 = g(model, tokens, jnp.arange(4)[None], cache)
    assert jax.tree_util.tree_structure(cache2) == jax.tree_util.tree_structure(cache)


def test_init_and_config_validation():
    cfg = LlamaConfig(**TINY)
    m = Llama.init(jax.random.PRNGKey(0), cfg)
    assert m(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 50)
    assert hash(cfg) == hash(LlamaConfig(**TINY))
    assert LlamaConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4).head_dim == 16
    with pytest.raises(ValueError, match="rope_layout"):
        LlamaConfig(**{**TINY, "rope_layout": "weird"})
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(**{**TINY, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="shape"):
        params = random_llama_params(np.random.default_rng(0), vocab_size=50, dim=32, n_layers=2,
                                     n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                                     tie_embeddings=False)
        Llama.from_params(params, LlamaConfig(**{**TINY, "hidden_dim": 48}))
    with pytest.raises(ValueError, match="dtype"):
        m.astype("float16")


def test_decode_steps_do_not_recompile():
    from jaxdecode.models import _decoder as _llama

    model, _ = make(seed=16)
    cache = model.init_cache(2, 40)
    _, cache = model.step(jnp.ones((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), cache)
    before = _llama._step_jit._cache_size()
    for p in range(1, 6):  # new tokens/positions, same shapes: no new compilation
        _, cache = model.step(jnp.full((2, 1), p, jnp.int32), jnp.asarray([[p], [p + 30]]), cache)
    assert _llama._step_jit._cache_size() == before
