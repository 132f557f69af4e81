"""Many prompts, each with its own settings, in one compiled batch.

Ragged prompts are right-padded with their real lengths; every knob is a per-row array; each
row has its own PRNG key, so a row's output does not depend on its neighbours. Changing any
of these values reuses the compiled program (the second call below does not compile).
Run: ``python examples/many_prompts.py``
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode
from jaxdecode import models

PROMPTS = [
    "every effort moves you",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
]


def main(max_new_tokens: int = 12) -> list[str]:
    model, tok = models.load()
    ids = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, ids))
    prompt = jnp.array([row + [0] * (width - len(row)) for row in ids])
    lengths = jnp.array([len(row) for row in ids])
    keys = jax.random.split(jax.random.key(0), len(PROMPTS))

    sampling = jaxdecode.SamplingParams(  # one value per row; EOS: the model's own ids
        temperature=jnp.array([0.0, 0.7, 0.3, 1.0]),  # row 0 is greedy
        top_k=jnp.array([0, 50, 20, 0]),
        top_p=jnp.array([1.0, 0.9, 0.95, 0.8]),
        repetition_penalty=jnp.array([1.0, 1.1, 1.0, 1.3]),
    )
    texts = []
    for attempt in range(2):
        t = time.perf_counter()
        out = jaxdecode.generate(model, prompt, max_new_tokens, key=keys, prompt_lengths=lengths, sampling=sampling)
        out.tokens.block_until_ready()
        print(f"call {attempt + 1}: {time.perf_counter() - t:.2f} s")
        sampling = sampling.replace(temperature=sampling.temperature * 0.9)  # new values, same program
    for i, p in enumerate(PROMPTS):
        text = tok.decode(out.tokens[i, len(ids[i]) : int(out.lengths[i])].tolist(), skip_special_tokens=True)
        print(f"[{i}] {p!r} -> {text!r}  (mean logprob {float(np.mean(out.logprobs[i, : int(out.num_generated[i])])):.2f})")
        texts.append(text)
    return texts


if __name__ == "__main__":
    main()
