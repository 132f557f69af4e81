"""Every family on the one decoder block, against Hugging Face transformers.

Tiny random checkpoints of Qwen2, Qwen3, Mistral (sliding window 8), Phi-3 (fused qkv and
gate/up, window 8) and Gemma 3 (2 sliding + 1 global layer, window 8, q/k norms, pre/post norms,
GeGLU, final soft-capping, query_pre_attn_scalar; transformers' Gemma 3 does not apply
attention soft-capping, so that Gemma 2 switch is checked against its formula instead) were saved by transformers with its references
(tests/fixtures/make_family_fixtures.py); Llama and GPT-2 use the older fixtures
(make_fixtures.py). Each loads through ``jaxdecode.models.load(folder)`` and must give logits
within 1e-4 of transformers' at every position, through both model protocols, and the same
16-token greedy output through ``jaxdecode.generate`` with a KV cache and with the stateless
protocol. The same weights written as GGUF (llama.cpp's tensor names and layouts) load to the
same logits.
"""

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode.models import load, load_gguf

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NEW = ["qwen2", "qwen3", "mistral", "phi3", "gemma3"]
OLD = {"llama": "llama_tiny_untied", "gpt2": "gpt2_tiny"}
FAMILIES = NEW + list(OLD)


def _ref():
    with np.load(os.path.join(HERE, "families", "reference.npz")) as z:
        new = {k: z[k] for k in z.files}
    with np.load(os.path.join(HERE, "hf_reference.npz")) as z:
        old = {k: z[k] for k in z.files}
    out = {}
    for f in NEW:
        out[f] = {k: new[f"{f}/{k}"] for k in ("logits", "prompt", "greedy", "greedy_margin")}
        out[f]["tokens"] = new["tokens"]
    for f, n in OLD.items():
        out[f] = {k: old[f"{n}/{k}"] for k in ("logits", "prompt", "greedy", "greedy_margin")}
        out[f]["tokens"] = old["tokens"]
    return out


REF = _ref()


def _folder(family):
    return os.path.join(HERE, "families", family) if family in NEW else os.path.join(HERE, OLD[family])


@pytest.fixture(scope="module")
def models():
    return {f: load(_folder(f))[0] for f in FAMILIES}


SWITCHES = {
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=16, tie_embeddings=False),
    "mistral": dict(sliding_window=8, layer_types=None),
    "phi3": dict(fused_qkv=True, fused_gate_up=True, sliding_window=8),
    "gemma3": dict(norm="rms_plus_one", qk_norm=True, post_norms=True, activation="gelu_tanh",
                   layer_types=("sliding", "sliding", "full"), sliding_window=8, attn_scale=24 ** -0.5,
                   attn_softcap=None, final_softcap=15.0, rope_local_theta=10000.0, rope_theta=1e6,
                   embed_scale=32 ** 0.5),
    "llama": dict(norm="rms", tie_embeddings=False),
    "gpt2": dict(norm="layer", positions="learned", gated_mlp=False, fused_qkv=True, qkv_bias=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_switches(family, models):
    raw = load(_folder(family), fuse=False)[0]
    cfg = raw.config
    assert cfg.family == ("llama" if family == "mistral" else family)
    for k, v in SWITCHES[family].items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    # load() fuses q|k|v and gate|up: only those two switches differ, and the function is the same
    fused = models[family]
    assert fused.config.fused_qkv and fused.config.fused_gate_up == cfg.gated_mlp
    assert dataclasses.replace(fused.config, fused_qkv=cfg.fused_qkv, fused_gate_up=cfg.fused_gate_up) == cfg
    tokens = REF[family]["tokens"]
    np.testing.assert_allclose(np.asarray(fused(tokens)), np.asarray(raw(tokens)), atol=2e-5, rtol=1e-5)
    assert fused.fuse() is fused


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_both_protocols(family, models):
    m, r = models[family], REF[family]
    tokens = r["tokens"]
    np.testing.assert_allclose(np.asarray(m(tokens)), r["logits"], atol=1e-4, rtol=1e-5)
    B, T = tokens.shape
    cache = m.init_cache(B, 32)
    step = jax.jit(lambda m, t, p, c: m.step(t, p, c))
    # prefill 5 with one call, then one token per call: every position through the cache
    logits, cache = step(m, tokens[:, :5], np.broadcast_to(np.arange(5, dtype=np.int32), (B, 5)), cache)
    outs = [np.asarray(logits)]
    for t in range(5, T):
        logits, cache = step(m, tokens[:, t:t + 1], np.full((B, 1), t, np.int32), cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), r["logits"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, models):
    m, r = models[family], REF[family]
    prompt, want = r["prompt"], r["greedy"]
    assert r["greedy_margin"] > 1e-2
    n = want.shape[1] - prompt.shape[1]
    out = jaxdecode.generate(m, prompt, n, temperature=0.0, eos_id=())
    np.testing.assert_array_equal(np.asarray(out.tokens), want)  # prompt + generated
    stateless = lambda tokens: m(tokens)  # noqa: E731 - the plain callable protocol
    out2 = jaxdecode.generate(stateless, prompt, n, temperature=0.0, eos_id=(), context_size=32)
    np.testing.assert_array_equal(np.asarray(out2.tokens), want)


def test_sliding_window_matters():
    """The window changes the logits past it (so the parity above tests it): the same Mistral
    weights without a window differ from transformers after position 8 and agree before."""
    import dataclasses

    m, r = load(_folder("mistral"))[0], REF["mistral"]
    full = jaxdecode.models.Decoder(m.params, dataclasses.replace(m.config, sliding_window=None))
    got = np.asarray(full(r["tokens"]))
    np.testing.assert_allclose(got[:, :8], r["logits"][:, :8], atol=1e-4, rtol=1e-5)
    assert np.abs(got[:, 8:] - r["logits"][:, 8:]).max() > 1e-2


def test_sliding_decode_reads_a_window_slice_past_the_window():
    """Decoding far past the window (cache 1024, window 8): logits equal a full recompute, so
    the per-row window slice of the cache is right, also for rows at different positions."""
    m = load(_folder("gemma3"))[0]
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 64, size=(2, 300)).astype(np.int32)
    full = np.asarray(m(toks))
    cache = m.init_cache(2, 1024)
    lengths = np.array([280, 200], np.int32)  # ragged rows
    _, cache = m.step(toks[:, :280], np.broadcast_to(np.arange(280, dtype=np.int32), (2, 280)), cache)
    pos = lengths.copy()
    for _ in range(3):
        t = toks[np.arange(2), pos][:, None]
        logits, cache = m.step(t, pos[:, None], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(2), pos], atol=1e-4, rtol=1e-5)
        pos = pos + 1


# ---------------------------------------------------------------------------------------- GGUF
_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3", "gemma3": "gemma3",
         "llama": "llama", "gpt2": "gpt2"}


def _permute_for_llama_cpp(w_in_out, n_heads, hd):
    """HF rotate-half Q/K columns -> llama.cpp's interleaved order (what its converter does)."""
    d_in = w_in_out.shape[0]
    w = w_in_out.T.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(n_heads * hd, d_in)
    return w.T


def _write_gguf(path, m):
    from jaxdecode.models._families import GGUF_TENSORS

    cfg, arch = m.config, _ARCH[m.config.family if m.config.family != "llama" else "llama"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if cfg.norm == "layer":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.positions == "rope":
        w.add_rope_freq_base(cfg.rope_theta)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        w.add_float32("gemma3.attention.scale", cfg.attn_scale)
        w.add_float32("gemma3.final_logit_softcapping", cfg.final_softcap)
        w.add_sliding_window_pattern([t == "sliding" for t in cfg.layer_types])
    p = m.params

    def put(name, a, matrix):
        a = np.asarray(a, np.float32)
        w.add_tensor(name, np.ascontiguousarray(a.T if matrix else a))

    for key, a in p.items():
        if key != "layers":
            put(GGUF_TENSORS[key], np.asarray(a) + (1.0 if arch == "gemma3" and key == "norm" else 0.0),
                key == "lm_head")
    for i, lp in enumerate(p["layers"].layers):
        for key, a in lp.items():
            a = np.asarray(a, np.float32)
            if arch == "llama" and key in ("wq", "wk"):
                a = _permute_for_llama_cpp(a, cfg.n_heads if key == "wq" else cfg.n_kv_heads, cfg.head_dim)
            if arch == "gemma3" and key.endswith("norm"):
                a = a + 1.0  # llama.cpp's converter stores Gemma's 1 + w
            put(GGUF_TENSORS[key].format(i=i), a, a.ndim == 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_of_the_same_weights_matches_transformers(family, models, tmp_path):
    path = tmp_path / f"{family}.gguf"
    _write_gguf(path, load(_folder(family), fuse=False)[0])  # (the file's separate matrices)
    g, _ = load_gguf(path, with_tokenizer=False)
    assert g.config.family == models[family].config.family
    np.testing.assert_allclose(np.asarray(g(REF[family]["tokens"])), REF[family]["logits"], atol=1e-4, rtol=1e-5)
