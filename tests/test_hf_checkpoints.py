"""Hugging Face checkpoint folders -> jaxdecode models, checked against references made with
Hugging Face transformers (tests/fixtures/make_fixtures.py; torch/transformers are not needed
here)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdecode.models._hf import SUPPORTED_MODEL_TYPES, load_hf_checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ["gpt2_tiny", "llama_tiny_tied", "llama_tiny_untied"]


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "hf_reference.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def models():
    """Each fixture folder loaded once (float32)."""
    return {n: load_hf_checkpoint(os.path.join(FIXTURES, n), load_tokenizer=False)[0]
            for n in NAMES}


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def _greedy_with_cache(model, prompt, n_new):
    """Prefill the prompt with one step call, then one T=1 step per new token (argmax)."""
    B, P = prompt.shape
    cache = model.init_cache(B, P + n_new)
    step = jax.jit(lambda m, t, p, c: m.step(t, p, c))
    logits, cache = step(model, prompt, np.broadcast_to(np.arange(P, dtype=np.int32), (B, P)),
                         cache)
    out = [prompt]
    nxt = np.asarray(logits[:, -1]).argmax(-1).astype(np.int32)[:, None]
    for i in range(n_new):
        out.append(nxt)
        if i == n_new - 1:
            break
        logits, cache = step(model, nxt, np.full((B, 1), P + i, np.int32), cache)
        nxt = np.asarray(logits[:, -1]).argmax(-1).astype(np.int32)[:, None]
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, models, ref):
    model = models[name]
    assert type(model).__name__ == "Decoder" and model.config.family == ("gpt2" if name.startswith("gpt2") else "llama")
    assert model.config.vocab_size == 64 and model.config.max_seq_len == 32
    if name.startswith("llama"):
        assert model.config.rope_layout == "half"
        assert model.config.tie_embeddings == (name == "llama_tiny_tied")
        assert ("lm_head" in model.params) == (name == "llama_tiny_untied")
    got = np.asarray(model(ref["tokens"]))
    want = ref[f"{name}/logits"]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_cached_greedy_matches_transformers_generate(name, models, ref):
    prompt, want = ref[f"{name}/prompt"], ref[f"{name}/greedy"]
    assert ref[f"{name}/greedy_margin"] > 1e-2  # no near-ties in the reference
    got = _greedy_with_cache(models[name], prompt, want.shape[1] - prompt.shape[1])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny_untied"])
def test_bfloat16_load(name, ref):
    model, _ = load_hf_checkpoint(os.path.join(FIXTURES, name), dtype=jnp.bfloat16,
                                  load_tokenizer=False)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(model.params))
    got = np.asarray(model(ref["tokens"]))
    want = ref[f"{name}/logits"]
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


def test_bfloat16_checkpoint_file(tmp_path, models):
    """Real Llama checkpoints store bfloat16 tensors: they load (and upcast) exactly."""
    from safetensors.numpy import load_file, save_file

    dst = _copy("llama_tiny_tied", tmp_path)
    f = str(dst / "model.safetensors")
    save_file({k: v.astype(jnp.bfloat16) for k, v in load_file(f).items()}, f)
    model, _ = load_hf_checkpoint(dst)
    want = jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jnp.bfloat16), np.float32),
                                  models["llama_tiny_tied"].params)
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(want)
    for got, exp in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(want)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), exp)


def test_tokenizer_json_is_loaded_when_present():
    model, tok = load_hf_checkpoint(os.path.join(FIXTURES, "gpt2_tiny"))
    from jaxdecode.models._tokenizer import Tokenizer

    assert isinstance(tok, Tokenizer)
    ids = tok.encode("hello the lazy fox")
    assert ids == [32, 34, 17, 17, 20, 53, 52, 31, 30, 35, 42]  # as made by make_fixtures.py
    assert max(ids) < model.config.vocab_size
    assert tok.decode(ids) == "hello the lazy fox"
    assert tok.token_to_id("<|endoftext|>") in tok.eos_ids
    # no tokenizer.json -> None; load_tokenizer=False -> None
    assert load_hf_checkpoint(os.path.join(FIXTURES, "llama_tiny_tied"))[1] is None
    assert load_hf_checkpoint(os.path.join(FIXTURES, "gpt2_tiny"), load_tokenizer=False)[1] is None


def test_bare_gpt2_names_and_extra_buffers(tmp_path, ref):
    """openai-community/gpt2 style: no ``transformer.`` prefix, causal-mask buffers present."""
    from safetensors.numpy import load_file, save_file

    dst = _copy("gpt2_tiny", tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    bare = {k[len("transformer."):]: v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    os.remove(dst / "model.safetensors")
    save_file(bare, str(dst / "pytorch_model.safetensors"))
    model, _ = load_hf_checkpoint(dst, load_tokenizer=False)
    np.testing.assert_allclose(np.asarray(model(ref["tokens"])), ref["gpt2_tiny/logits"],
                               atol=1e-4, rtol=1e-5)


def test_untied_gpt2_head(tmp_path, ref):
    """tie_word_embeddings=false: lm_head.weight (nn.Linear, [V, D]) is read and transposed."""
    from safetensors.numpy import load_file, save_file

    dst = _copy("gpt2_tiny", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
    tensors = load_file(str(dst / "model.safetensors"))
    rng = np.random.RandomState(0)
    delta = (0.5 * rng.randn(64, 32)).astype(np.float32)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + delta
    save_file(tensors, str(dst / "model.safetensors"))
    model, _ = load_hf_checkpoint(dst, load_tokenizer=False)
    assert not model.config.tie_embeddings and model.params["lm_head"].shape == (32, 64)
    tied, _ = load_hf_checkpoint(os.path.join(FIXTURES, "gpt2_tiny"), load_tokenizer=False)
    # logits = h @ (wte + delta).T, where h (the final hidden state) is the tied model's
    tokens = ref["tokens"]
    h_logits = np.asarray(model(tokens)) - ref["gpt2_tiny/logits"]
    assert np.abs(h_logits).max() > 1e-2
    # recover h from the tied model via least squares and check the extra term is h @ delta.T
    wte = np.asarray(tied.params["embed"])
    h = np.linalg.lstsq(wte, ref["gpt2_tiny/logits"].reshape(-1, 64).T, rcond=None)[0].T
    np.testing.assert_allclose(h_logits.reshape(-1, 64), h @ delta.T, atol=2e-3)


def test_raw_reader_matches_safetensors(tmp_path):
    """The fallback reader (used when safetensors cannot give bfloat16 as NumPy)."""
    from safetensors.numpy import load_file, save_file

    from jaxdecode.models._hf import _read_raw_tensor

    f = os.path.join(FIXTURES, "llama_tiny_tied", "model.safetensors")
    for k, v in load_file(f).items():
        np.testing.assert_array_equal(_read_raw_tensor(f, k), v)
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bf = tmp_path / "bf.safetensors"
    save_file({"a": x.astype(jnp.bfloat16), "b": x.astype(np.float16)}, str(bf))
    np.testing.assert_array_equal(_read_raw_tensor(bf, "a"), x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(_read_raw_tensor(bf, "b"), x.astype(np.float16))


def test_truncated_safetensors_names_the_file(tmp_path):
    dst = _copy("gpt2_tiny", tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) // 2, 4):
        f.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"model\.safetensors") as e:
            load_hf_checkpoint(dst, load_tokenizer=False)
        assert "truncated or corrupt" in str(e.value)


def test_truncated_shard_names_the_shard(tmp_path):
    dst = _copy("llama_tiny_untied", tmp_path)
    f = dst / "model-00003-of-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00003-of-00004\.safetensors"):
        load_hf_checkpoint(dst)


def test_sharded_reads_only_indexed_files(tmp_path, ref):
    dst = _copy("llama_tiny_untied", tmp_path)
    (dst / "consolidated.safetensors").write_bytes(b"not a safetensors file")
    model, _ = load_hf_checkpoint(dst)
    np.testing.assert_allclose(np.asarray(model(ref["tokens"])), ref["llama_tiny_untied/logits"],
                               atol=1e-4, rtol=1e-5)
    os.remove(dst / "model-00002-of-00004.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004"):
        load_hf_checkpoint(dst)


def test_missing_tensor_names_tensor_and_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    dst = _copy("gpt2_tiny", tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias") as e:
        load_hf_checkpoint(dst, load_tokenizer=False)
    assert "model.safetensors" in str(e.value)

    # sharded: the index names the shard that should have held it
    dst = _copy("llama_tiny_untied", tmp_path)
    shard = dst / "model-00004-of-00004.safetensors"
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*model-00004-of-00004\.safetensors"):
        load_hf_checkpoint(dst)


def test_unsupported_model_type(tmp_path):
    dst = _copy("llama_tiny_tied", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "bert"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bert") as e:
        load_hf_checkpoint(dst)
    msg = str(e.value)
    assert str(dst) in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_other_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    dst = _copy("gpt2_tiny", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, n_embd=48, n_head=3)))
    with pytest.raises(ValueError, match="shape"):
        load_hf_checkpoint(dst, load_tokenizer=False)
    (dst / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    with pytest.raises(ValueError, match="relu"):
        load_hf_checkpoint(dst, load_tokenizer=False)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf_checkpoint(dst)
    with pytest.raises(ValueError, match="dtype"):
        load_hf_checkpoint(os.path.join(FIXTURES, "gpt2_tiny"), dtype=jnp.float16)
    dst = _copy("llama_tiny_tied", tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama3"):
        load_hf_checkpoint(dst)
