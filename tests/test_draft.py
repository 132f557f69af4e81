"""models.first_layers: the draft equals a model built from the first blocks' params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode.models import Decoder, Llama, LlamaConfig, first_layers, gpt2_config


def test_llama_first_layers_equals_truncated_params():
    cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_kv_heads=1)
    target = Llama.init(jax.random.key(0), cfg)
    draft = first_layers(target, 2)
    stacked = {k: v[:2] for k, v in dict(target.params["layers"]).items()}
    params = dict(target.params, layers=stacked)
    manual = Llama.from_params(params, dataclasses.replace(cfg, n_layers=2))
    x = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(draft(x), manual(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(draft(x), target(x))


def test_gpt2_first_layers_and_errors():
    g = Decoder.init(jax.random.key(0), gpt2_config(vocab_size=32, max_seq_len=16, dim=16, n_layers=3, n_heads=2))
    draft = first_layers(g, 1)
    # Values, not shapes: the one-block draft is a different model from the target ...
    x = jnp.array([[1, 2, 3, 4, 5]])
    logits = np.asarray(draft(x))
    assert logits.shape == (1, 5, 32) and not np.allclose(logits, np.asarray(g(x)))
    # ... and as a speculative draft its greedy tokens are the target's plain greedy tokens.
    plain = jaxdecode.generate(g, x, 6, temperature=0.0, eos_id=())
    spec = jaxdecode.speculative_generate(g, x, 6, proposer=jaxdecode.draft_model(draft, 3), temperature=0.0,
                                          eos_id=())
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    greedy = [1, 2, 3, 4, 5]
    for _ in range(6):  # the reference: argmax of the full forward, one token at a time
        greedy.append(int(np.argmax(np.asarray(g(jnp.array([greedy])))[0, -1])))
    assert plain.tokens[0].tolist() == greedy
    assert int(spec.accepted[0]) <= int(spec.proposed[0])
    with pytest.raises(ValueError, match="n_layers"):
        first_layers(g, 4)
    with pytest.raises(TypeError, match="Decoder"):
        first_layers(lambda t: t, 1)
