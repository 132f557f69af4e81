"""Plugging a Flax NNX model into ``jaxdecode.generate``.

Flax NNX modules are JAX pytrees (Flax >= 0.11): their ``nnx.Param`` arrays are pytree leaves
and everything else (layer sizes, Python ints such as ``context_size``) is static metadata. So
``generate`` passes the module through ``jax.jit`` as an argument: the params are traced, and a
module with new params of the same shapes (fine-tuned weights, another seed) reuses the
compiled decode loop.

The model below is a tiny causal transformer block (stateless protocol:
``model(tokens[B, T]) -> logits[B, T, V]``). ``generate`` feeds it a fixed window of the last
``context_size`` tokens every step (read from the module's ``context_size`` attribute).

Run: ``python examples/flax_nnx_model.py``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdecode


class TinyLM(nnx.Module):
    """Token + position embeddings, one causal self-attention block with an MLP, an LM head."""

    def __init__(self, vocab_size: int = 64, dim: int = 32, heads: int = 2, context_size: int = 16, *, rngs: nnx.Rngs):
        self.context_size = context_size  # a Python int: static, read by jaxdecode.generate
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Embed(context_size, dim, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(jnp.arange(t))[None]
        h = self.norm1(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(tokens))
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))
        return self.head(x)


def main() -> dict:
    model = TinyLM(rngs=nnx.Rngs(0))
    print("NNX module is a pytree with", len(jax.tree_util.tree_leaves(model)), "array leaves")

    # Two ragged prompts, right-padded, with their real lengths.
    prompt = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    lengths = jnp.array([4, 2])

    greedy = jaxdecode.generate(model, prompt, 10, temperature=0.0, prompt_lengths=lengths)
    print("greedy:", greedy.tokens.tolist())

    sampled = jaxdecode.generate(
        model, prompt, 10, key=jax.random.key(0), temperature=0.8, top_p=0.9, repetition_penalty=1.1,
        prompt_lengths=lengths, eos_id=3,
    )
    print("sampled:", sampled.tokens.tolist(), "lengths:", sampled.lengths.tolist())

    # New weights, same shapes: the compiled loop is reused (the params are traced arguments).
    retrained = TinyLM(rngs=nnx.Rngs(1))
    other = jaxdecode.generate(retrained, prompt, 10, temperature=0.0, prompt_lengths=lengths)
    print("other weights, greedy:", other.tokens.tolist())
    return {"model": model, "greedy": greedy, "sampled": sampled, "other": other}


if __name__ == "__main__":
    main()
