"""Structured output: the cost of a constraint inside the compiled loop, and the host-mask design.

Three measurements, on SmolLM2-135M (the default; ``--quick`` uses a tiny random model over the
same 49,152-token vocabulary, to check the script in seconds):

1. **Tables** per schema (the dozen schemas below): automaton states, token classes, bytes of
   the compact tables vs the dense ``[S, V]`` int16 table, host build time.
2. **Per-step cost in the loop** at batch 1 and 8: ``jaxdecode.generate`` greedy, with and
   without ``constraint=`` (a regex that is always accepting and never runs out of tokens,
   with ``min_new_tokens`` so both runs do every step). Per step = (time of N2 steps - time
   of N1 steps) / (N2 - N1), which cancels the prefill; median of the repeats.
3. **The host-mask design** (what vLLM / SGLang / transformers do with outlines, xgrammar,
   llguidance): outlines-core's own ``Guide`` stepped on the host around a jitted one-token
   model step, a fresh allowed-token mask shipped to the device every token.
4. **The constraint's own work per step**, alone: the jitted advance-and-mask over ``[B, V]``
   logits (``_structured.apply``, the tables of 2.), median of 50 calls; measurement 2 is a
   difference of two noisy runs, this one is not.

Prints a table; no asserts. Run: ``python benchmarks/bench_structured.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    "issue-6-field": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"}}, "required": ["name", "age", "role", "tags", "address", "active"]},
    "colors": {"type": "object", "properties": {"colors": {"type": "array", "items": {
        "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    "flags": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
              "required": ["ok", "note"]},
    "date": {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    "sentiment": {"enum": ["positive", "negative", "neutral"]},
    "weather": {"type": "object", "properties": {"temp": {"type": "number", "minimum": -50, "maximum": 60},
                                                 "unit": {"enum": ["C", "F"]}}, "required": ["temp", "unit"]},
    "free-string": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}

# Always accepting, and every state has continuations: min_new_tokens keeps EOS away, so a
# constrained run does all its steps (as the unconstrained one).
FREE_TEXT = r"[a-zA-Z ,.]*"


def median_time(fn, repeats: int) -> float:
    fn()  # compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def tiny_model(vocab: int, dim: int = 64):
    """A stateless-as-cached random LM over the real vocabulary (for --quick)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    embed = jax.random.normal(k1, (vocab, dim), jnp.float32)
    dense = jax.random.normal(k2, (dim, vocab), jnp.float32) * (2.0 / dim**0.5)
    return jaxdecode.CachedModel(init_cache=lambda b, n: jnp.zeros((b,), jnp.int32),
                                 step=lambda t, p, c: (embed[t] @ dense, c))


def tables(tok) -> None:
    print(f"{'schema':16} {'states':>7} {'classes':>8} {'tables KiB':>11} {'dense MiB':>10} {'build s':>8}")
    for name, schema in SCHEMAS.items():
        c = jaxdecode.json_schema(schema, tok)
        print(f"{name:16} {c.num_states:7d} {c.num_classes:8d} {c.nbytes / 1024:11.1f} "
              f"{c.dense_nbytes / 2**20:10.1f} {c.build_seconds:8.2f}")


def loop_cost(model, tok, batch: int, n1: int, n2: int, repeats: int) -> tuple[float, float]:
    """Per-step seconds of generate without and with a constraint."""
    ids = tok.encode("Write a sentence about the sea:")
    prompt = jnp.asarray([ids] * batch, jnp.int32)
    c = jaxdecode.regex(FREE_TEXT, tok)
    out = []
    for constraint in (None, c):
        def run(n):
            return lambda: jaxdecode.generate(model, prompt, n, temperature=0.0, min_new_tokens=n,
                                              constraint=constraint).tokens
        t1, t2 = median_time(run(n1), repeats), median_time(run(n2), repeats)
        out.append((t2 - t1) / (n2 - n1))
    return out[0], out[1]


def mask_cost(tok, batch: int, vocab: int, calls: int = 50) -> float:
    """Seconds per call of the constraint's step alone (advance by the previous token, then
    mask the logits), jitted, at ``batch x vocab``."""
    from jaxdecode import _structured
    from jaxdecode._processors import DecodeContext

    tables = _structured.stack_constraints("bench", jaxdecode.regex(FREE_TEXT, tok), batch, vocab)
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((batch, vocab)), jnp.float32)
    ctx = DecodeContext(token_counts=None, prompt_mask=None, step=jnp.ones((batch,), jnp.int32),
                        tokens=None, lengths=None, prev_token=jnp.full((batch,), 64, jnp.int32))
    state = _structured.ConstraintState(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))
    step = jax.jit(_structured.apply)
    return median_time(lambda: step(tables, logits, state, ctx)[0], calls)


def host_mask_cost(model, tok, batch: int, steps: int, repeats: int) -> float:
    """Per-step seconds of the host-mask design: outlines Guides on the host, one jitted
    model step per token on the device, a [B, V] mask shipped each step."""
    import outlines_core as oc

    from jaxdecode import _structured as C

    voc = C._vocab("bench", tok, None)
    index = oc.Index(FREE_TEXT, voc.outlines)
    ids = tok.encode("Write a sentence about the sea:")
    p = len(ids)

    @jax.jit
    def prefill(prompt):
        cache = model.init_cache(batch, p + steps)
        logits, cache = model.step(prompt, jnp.broadcast_to(jnp.arange(p), prompt.shape), cache)
        return logits[:, -1], cache

    @jax.jit
    def step(logits, mask, pos, cache):
        tok_ = jnp.argmax(jnp.where(mask, logits, -jnp.inf), axis=-1).astype(jnp.int32)
        nxt, cache = model.step(tok_[:, None], jnp.full((batch, 1), pos, jnp.int32), cache)
        return tok_, nxt[:, 0], cache

    prompt = jnp.asarray([ids] * batch, jnp.int32)

    def run():
        guides = [oc.Guide(index) for _ in range(batch)]
        logits, cache = prefill(prompt)
        mask = np.zeros((batch, logits.shape[-1]), bool)
        for i in range(steps):
            mask[:] = False
            for b, g in enumerate(guides):
                mask[b, g.get_tokens()] = True
                mask[b, list(voc.eos_ids)] = False  # as min_new_tokens: no early EOS
            t, logits, cache = step(logits, jnp.asarray(mask), p + i, cache)
            for b, tb in enumerate(np.asarray(t)):
                guides[b].advance(int(tb), return_tokens=False)
        return logits

    return median_time(run, repeats) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny random model, few steps (checks the script)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from jaxdecode import models

    if args.quick:
        tok = models.Tokenizer.from_gguf_metadata(models.read_gguf_metadata(models.default_model_path()))
        model, n1, n2, host_steps = tiny_model(tok.vocab_size), 16, 64, 16
    else:
        model, tok = models.load()
        n1, n2, host_steps = 16, 64, 32
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model: {'tiny random' if args.quick else 'SmolLM2-135M'}")
    tables(tok)
    print(f"\n{'batch':>5} {'plain ms/step':>14} {'constrained':>12} {'overhead':>9} {'host-mask ms/step':>18} "
          f"{'mask alone ms':>14}")
    for batch in (1, 8):
        plain, constrained = loop_cost(model, tok, batch, n1, n2, args.repeats)
        host = host_mask_cost(model, tok, batch, host_steps, args.repeats)
        alone = mask_cost(tok, batch, tok.vocab_size)
        print(f"{batch:5d} {plain * 1e3:14.2f} {constrained * 1e3:12.2f} {100 * (constrained / plain - 1):8.1f}% "
              f"{host * 1e3:18.2f} {alone * 1e3:14.3f}")
    print(json.dumps({"n1": n1, "n2": n2, "host_steps": host_steps, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
