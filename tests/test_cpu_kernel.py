"""The optional CPU kernel (jaxdecode/models/_cpu_kernel.*) against NumPy, against XLA's dot
(the fallback), under vmap and grad, inside a model, and with the kernel unavailable."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdecode.models import _common, _cpu_kernel

HAS_AVX512 = all(f in open("/proc/cpuinfo").read().split() for f in ("avx512f", "avx512bw", "avx512_vnni")) \
    if os.path.exists("/proc/cpuinfo") else False
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_kernel = pytest.mark.skipif(not _cpu_kernel.available(),
                                  reason=f"CPU kernel not built: {_cpu_kernel.build_error()}")

SHAPES = [(1, 576, 960), (2, 64, 4), (3, 577, 61), (4, 100, 33), (6, 130, 35), (8, 1536, 576),
          (9, 48, 130), (16, 200, 17)]


@pytest.fixture(scope="module")
def tiny_llama():
    """GQA, a tied head (the output-major product) and an untied-size MLP, fused like a load."""
    from jaxdecode.models import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                        max_seq_len=64, tie_embeddings=True)
    return Decoder.init(jax.random.key(0), cfg).fuse()


def test_builds_where_the_machine_can():
    """Where the CPU has AVX-512 F/BW/VNNI and a compiler exists, the kernel must build: a
    broken build would otherwise pass silently on the fallback."""
    if sys.platform.startswith("linux") and HAS_AVX512 and HAS_CXX \
            and os.environ.get("JAXDECODE_CPU_KERNEL", "1") != "0":
        assert _cpu_kernel.available(), _cpu_kernel.build_error()
        assert _cpu_kernel.build_error() is None
    else:
        assert not _cpu_kernel.available() and _cpu_kernel.build_error()


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_kernel_matches_numpy(m, k, n, transposed, dtype):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), jnp.float32).astype(dtype)
    wf = np.asarray(w.astype(jnp.float32), np.float64)
    xr = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)  # x in w's dtype
    ref = xr @ (wf.T if transposed else wf)
    got = np.asarray(jax.jit(lambda x, w: _cpu_kernel.matmul_f32(x, w, transposed=transposed))(x, w))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6 * np.sqrt(k) * 4)


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES + [(5, 4096, 9), (1, 65, 8)])
def test_int8_kernel_is_exact(m, k, n):
    rng = np.random.default_rng(k + n)
    x = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    got = np.asarray(jax.jit(_cpu_kernel.matmul_s8)(x, w))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.T.astype(np.int64))
    # the extremes: -127 x -127 everywhere (the u8 shift must not overflow)
    full = np.full((m, k), -127, np.int8)
    np.testing.assert_array_equal(np.asarray(_cpu_kernel.matmul_s8(full, np.full((n, k), -127, np.int8))),
                                  np.full((m, n), 127 * 127 * k))


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_a_row_does_not_depend_on_its_batch(transposed):
    """Each output is summed in an order fixed by K alone: a row gives the same bits alone and
    among 7 others (so batched and single decoding agree exactly)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 576)).astype(np.float32)
    w = rng.standard_normal((960, 576) if transposed else (576, 960)).astype(np.float32)
    f = jax.jit(lambda x, w: _cpu_kernel.matmul_f32(x, w, transposed=transposed))
    whole = np.asarray(f(x, w))
    for i in (0, 3, 7):
        np.testing.assert_array_equal(np.asarray(f(x[i:i + 1], w))[0], whole[i])


@needs_kernel
def test_vmap_folds_rows_and_maps_batched_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 64)).astype(np.float32)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    ws = rng.standard_normal((5, 64, 48)).astype(np.float32)
    mm = lambda x, w: _cpu_kernel.matmul_f32(x, w, transposed=False)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(mm, (0, None))(x, w), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(mm)(x, ws), x @ ws, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(mm, (None, 0))(x[0], ws), x[0] @ ws, rtol=1e-5, atol=1e-5)


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def _on_xla(fn, *args):
    """``fn(*args)`` traced afresh with the kernel turned off (XLA's path), then turned on again."""
    _cpu_kernel.set_enabled(False)
    try:
        jax.clear_caches()
        return fn(*args)
    finally:
        _cpu_kernel.set_enabled(True)
        jax.clear_caches()


def _assert_greedy_same_on_kernel_and_xla(model, prompt, n, atol):
    """Greedy ``generate`` with the kernel and on XLA's path: equal tokens, logprobs within atol."""
    import jaxdecode

    def run():
        jax.clear_caches()
        out = jaxdecode.generate(model, prompt, n, temperature=0.0)
        return np.asarray(out.tokens), np.asarray(out.raw_logprobs)

    fast = run()
    slow = _on_xla(run)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_allclose(fast[1], slow[1], atol=atol)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_matmul_uses_the_kernel_for_few_rows_only_and_agrees_with_xla(dtype):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((96, 80)).astype(np.float32) * 0.1
    weight = _common.quantize_int8(w) if dtype == "int8" else jnp.asarray(w).astype(dtype)
    limit = _cpu_kernel.MAX_ROWS[dtype]
    if dtype == "int8":
        limit //= 2  # each activation row is two int8 rows (qlinear's two-part codes)
    few = rng.standard_normal((limit, 96)).astype(np.float32)
    many = rng.standard_normal((limit + 1, 96)).astype(np.float32)
    mm = lambda x: _common.matmul(x, weight)  # noqa: E731
    assert "jd_matmul" in _lowered(mm, few)
    assert "jd_matmul" not in _lowered(mm, many)
    fast = np.asarray(jax.jit(mm)(few))
    assert "jd_matmul" not in _on_xla(_lowered, mm, few)
    slow = np.asarray(_on_xla(jax.jit(mm), few))
    if dtype == "int8":
        np.testing.assert_array_equal(fast, slow)  # int32 products are exact either way
    else:
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_grad_flows_through_the_fast_path():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(_common.matmul(x, w)))  # noqa: E731
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    c = np.cos(x @ w)
    np.testing.assert_allclose(gx, c @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, x.T @ c, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_decoder_with_and_without_the_kernel(dtype, tiny_llama):
    """The tiny Llama's greedy tokens and step logits with the kernel equal XLA's path (int8 at
    batch 1: two int8 rows per activation row, the kernel's limit)."""
    model = tiny_llama
    if dtype == "int8":
        model = model.quantize()
    elif dtype == "bfloat16":
        model = model.astype(jnp.bfloat16)
    prompt = jnp.array([[1, 5, 9, 2], [3, 3, 7, 1]], jnp.int32)
    if dtype == "int8":
        prompt = prompt[:1]
        assert "jd_matmul_s8" in jax.jit(model.step).lower(prompt[:, :1], jnp.asarray([[4]]),
                                                           model.init_cache(1, 16)).as_text()
    _assert_greedy_same_on_kernel_and_xla(model, prompt, 12, atol=1e-4 if dtype != "bfloat16" else 2e-2)


def _attention_reference(q, k, v, window, scale):
    """Causal GQA in float64 NumPy, one head at a time."""
    B, T, H, hd = q.shape
    G = H // k.shape[2]
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (s <= t) & ((window == 0) | (s > t - window))
    out = np.zeros((B, T, H, hd))
    for h in range(H):
        scores = np.where(mask, np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // G]) * scale, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), v[:, :, h // G])
    return out.reshape(B, T, H * hd)


def _qkv(rng, B, T, H, KV, hd):
    return tuple(rng.standard_normal(shape).astype(np.float32)
                 for shape in ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd)))


@needs_kernel
@pytest.mark.parametrize("B,T,H,KV,hd,window", [
    (1, 37, 9, 3, 64, 0), (2, 70, 4, 2, 128, 0), (1, 100, 4, 1, 256, 0), (1, 65, 9, 3, 64, 16),
    (2, 33, 2, 2, 64, 5), (1, 1, 9, 3, 64, 0), (1, 16, 6, 3, 64, 0), (3, 48, 8, 4, 64, 40)])
def test_causal_attention_kernel_matches_numpy(B, T, H, KV, hd, window):
    """Prompt lengths on and off the 16-position blocks, windows shorter and longer than a
    block, every head size the kernel takes; the scale is not 1/sqrt(hd) in every case."""
    rng = np.random.default_rng(T * 10 + hd)
    q, k, v = _qkv(rng, B, T, H, KV, hd)
    scale = 0.1 if hd == 128 else 1 / np.sqrt(hd)
    fn = lambda q, k, v: _common.causal_attention(q, k, v, window=window or None, scale=scale)  # noqa: E731
    assert "jd_causal_attention" in _lowered(fn, q, k, v)
    got = np.asarray(jax.jit(fn)(q, k, v))
    assert got.shape == (B, T, H * hd) and got.dtype == np.float32
    np.testing.assert_allclose(got, _attention_reference(q, k, v, window, scale), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_causal_attention_kernel_under_vmap_and_grad():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 4, 24, 4, 2, 64)
    windows = jnp.asarray([0, 3, 8, 0], jnp.int32)
    fn = lambda q, k, v, w: _common.causal_attention(q[None], k[None], v[None], window=w)[0]  # noqa: E731
    for in_axes in ((0, 0, 0, None), (0, None, 0, None), (0, 0, 0, 0)):
        w = windows if in_axes[3] == 0 else jnp.int32(5)
        kk = k if in_axes[1] == 0 else k[0]
        got = np.asarray(jax.vmap(fn, in_axes)(q, kk, v, w))
        for i in range(4):
            want = _attention_reference(q[i:i + 1], (k[i] if in_axes[1] == 0 else k[0])[None], v[i:i + 1],
                                        int(windows[i]) if in_axes[3] == 0 else 5, 1 / 8)
            np.testing.assert_allclose(got[i], want[0], rtol=1e-5, atol=2e-6)
    # grad: the kernel's tangent comes from XLA's blocked attention
    loss = lambda q, k, v: jnp.sum(jnp.sin(_common.causal_attention(q, k, v, window=6)))  # noqa: E731
    fast = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    slow = _on_xla(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _decode_reference(q, kc, vc, layer, positions, window, kn, vn, scale):
    """One query position per row over the cache slots it sees plus its own new key/value."""
    B, _, H, hd = q.shape
    KV, S = kc.shape[2], kc.shape[3]
    G = H // KV
    f = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    q, kc, vc, kn, vn = f(q), f(kc), f(vc), f(kn), f(vn)
    out = np.zeros((B, H, hd))
    for b in range(B):
        p = int(positions[b, 0])
        hi = max(0, min(p, S))
        lo = min(hi, max(0, p - window + 1)) if window else 0
        for h in range(H):
            keys = np.concatenate([kc[layer, b, h // G, lo:hi], kn[b, 0, h // G][None]])
            vals = np.concatenate([vc[layer, b, h // G, lo:hi], vn[b, 0, h // G][None]])
            s = keys @ q[b, 0, h] * scale
            e = np.exp(s - s.max())
            out[b, h] = e @ vals / e.sum()
    return out.reshape(B, 1, H * hd)


@needs_kernel
@pytest.mark.parametrize("hd,dtype,window", [(64, "float32", 0), (64, "bfloat16", 0), (128, "float32", 7),
                                             (256, "float32", 0), (64, "float32", 3)])
def test_decode_attention_kernel_matches_numpy(hd, dtype, window):
    """Positions at the first slot, inside the cache, at and past its end, and negative (the
    new key alone); a window cuts the early slots; a bfloat16 cache is widened exactly."""
    rng = np.random.default_rng(hd + window)
    L, B, H, KV, S = 3, 6, 6, 2, 40
    q = rng.standard_normal((B, 1, H, hd)).astype(np.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((L, B, KV, S, hd)), jnp.float32).astype(dtype) for _ in "kv")
    kn, vn = (jnp.asarray(rng.standard_normal((B, 1, KV, hd)), jnp.float32).astype(dtype) for _ in "kv")
    positions = np.asarray([[0], [1], [17], [40], [55], [-3]], np.int32)
    scale = 0.2
    fn = jax.jit(lambda q, kc, vc, kn, vn, p: _cpu_kernel.decode_attention(q, kc, vc, 1, p, window, kn, vn,
                                                                           scale=scale))
    got = np.asarray(fn(q, kc, vc, kn, vn, positions))
    want = _decode_reference(q, kc, vc, 1, positions, window, kn, vn, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    # vmap over a batch of caches and queries: one call per member
    many = jax.vmap(fn, (0, 0, 0, 0, 0, None))(np.stack([q, -q]), jnp.stack([kc, kc]), jnp.stack([vc, vc[::-1]]),
                                               jnp.stack([kn, kn]), jnp.stack([vn, vn]), positions)
    np.testing.assert_allclose(many[0], want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(many[1], _decode_reference(-q, kc, vc[::-1], 1, positions, window, kn, vn, scale),
                               rtol=1e-5, atol=2e-6)


def test_causal_attention_takes_the_kernel_only_for_its_head_sizes():
    on = _cpu_kernel.enabled()
    for hd in (16, 32, 64, 80, 128, 256):
        assert _cpu_kernel.takes_attention(jnp.zeros((1, 4, 2, hd))) == (on and hd in (64, 128, 256))
    q = jnp.zeros((1, 8, 2, 64))
    softcapped = lambda q: _common.causal_attention(q, q, q, softcap=50.0)  # noqa: E731
    assert "jd_causal_attention" not in _lowered(softcapped, q)


@needs_kernel
def test_prefill_and_decode_with_and_without_the_attention_kernels():
    """A 64-dim-head Llama: prefill and the decode step lower to the attention kernels, a prompt
    longer than a block gives the same greedy tokens and logprobs as XLA's attention, and
    jax.grad through a step equals XLA's."""
    from jaxdecode.models import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=80, dim=128, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96,
                        max_seq_len=96, tie_embeddings=True)
    model = Decoder.init(jax.random.key(1), cfg).fuse()
    prompt = jnp.asarray(np.random.default_rng(5).integers(0, 80, (2, 37)), jnp.int32)
    cache = model.init_cache(2, 64)
    assert "jd_causal_attention" in jax.jit(model.prefill).lower(prompt, cache, jnp.asarray([36, 36])).as_text()
    one, at = prompt[:, :1], jnp.asarray([[37], [37]], jnp.int32)
    assert "jd_decode_attention" in jax.jit(model.step).lower(one, at, cache).as_text()
    # grad through the decode step's attention: the tangent comes from XLA's attention
    loss = lambda m: jnp.sum(jnp.sin(m.step(one, at, cache)[0]))  # noqa: E731
    fast_grad = jax.grad(loss)(model)
    _assert_greedy_same_on_kernel_and_xla(model, prompt, 10, atol=1e-4)
    slow_grad = _on_xla(jax.grad(loss), model)
    for a, b in zip(jax.tree_util.tree_leaves(fast_grad), jax.tree_util.tree_leaves(slow_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_set_enabled_takes_a_bool():
    with pytest.raises(TypeError, match="set_enabled: on must be a bool, got 1"):
        _cpu_kernel.set_enabled(1)


def _subprocess(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


SCRIPT = """
import jax.numpy as jnp, numpy as np
from jaxdecode.models import _common, _cpu_kernel
print("available", _cpu_kernel.available(), "|", _cpu_kernel.build_error())
x = np.ones((1, 8), np.float32); w = np.arange(16, dtype=np.float32).reshape(8, 2)
print("result", np.asarray(_common.matmul(x, w)).tolist())
"""


def test_disabled_by_the_environment_falls_back():
    run = _subprocess(SCRIPT, JAXDECODE_CPU_KERNEL="0")
    assert run.returncode == 0, run.stderr
    assert "available False | disabled by JAXDECODE_CPU_KERNEL" in run.stdout
    assert "result [[56.0, 64.0]]" in run.stdout


def test_a_failing_compiler_falls_back(tmp_path):
    """No usable compiler (here one that always fails): the kernel is unavailable, says why, and
    every matmul still runs on XLA's dot."""
    run = _subprocess(SCRIPT, CXX="false", JAXDECODE_CACHE_DIR=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "available False | RuntimeError: false failed" in run.stdout
    assert "result [[56.0, 64.0]]" in run.stdout
