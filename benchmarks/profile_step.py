"""Where a decode step of the default model goes: a table of jitted pieces, batch 1 and 8.

Times (median of interleaved runs, after compiling), for SmolLM2-135M (float32 unless --dtype):

* ``model.step``: one whole jitted KV-cached decode step (T=1, cache of P+N-1 slots, the
  cache donated as in generate's loop);
* ``layer stack``: the same step without the final norm + LM head (``Llama._step_hidden``);
* ``LM head``: final RMSNorm + the [D] x [V, D] tied-embedding matmul (576 x 49152);
* ``attention x L``: the cached attention of one layer (scores, softmax, values over the
  cache prefix) run L times (a scan of L calls);
* ``sampler draw``: ``jaxdecode._sampling.draw`` at V=49152 (greedy, and T 0.8 / top-k 50 /
  top-p 0.9);
* ``penalties + bookkeeping``: repetition/frequency/presence penalties over [B, V] and
  ``DecodeContext.advance`` (the [B, V] token_counts update), as generate does per step;
* ``generate per step``: ``(t(generate N) - t(generate 8)) / (N - 8)`` (greedy at b1, sampled
  at b8), i.e. the marginal cost of one token of ``jaxdecode.generate``.

Run: ``python benchmarks/profile_step.py [--batches 1,8] [--runs 7] [--dtype float32]``.
Timings on a shared machine are noisy: check ``uptime``; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdecode
from jaxdecode import models
from jaxdecode._processors import DecodeContext, apply_frequency_presence_penalty, apply_repetition_penalty
from jaxdecode._sampling import draw, make_knobs
from jaxdecode.models._common import attention

PROMPT = [18818, 3867, 7488, 346]  # "every effort moves you"


def block(x):
    return jax.block_until_ready(x)


def bench(fns: dict, runs: int) -> dict:
    """Median seconds per call of each fn(), interleaved (one call of each per round)."""
    for f in fns.values():  # compile + warm
        block(f())
        block(f())
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            block(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(model, batch: int, new: int, runs: int) -> dict:
    cfg = model.config
    B, S, V, L = batch, len(PROMPT) + new - 1, cfg.vocab_size, cfg.n_layers
    pos = len(PROMPT) + new // 2  # a mid-sequence decode step
    tok = jnp.full((B, 1), 260, jnp.int32)
    positions = jnp.full((B, 1), pos, jnp.int32)
    cache0 = model.init_cache(B, S)
    cache0 = jax.tree.map(lambda a: a + 0.01, cache0)  # non-zero keys/values
    holder = {"cache": jax.tree.map(jnp.copy, cache0)}  # donated to the step; cache0 is kept

    step = jax.jit(lambda m, t, p, c: m.step(t, p, c), donate_argnums=(3,))
    hidden = jax.jit(lambda m, t, p, c: m._step_hidden(t, p, c), donate_argnums=(3,))
    head = jax.jit(lambda m, x: m._head(x))
    x = jax.random.normal(jax.random.key(0), (B, 1, cfg.dim), jnp.float32).astype(model.dtype)

    def run_step():
        logits, holder["cache"] = step(model, tok, positions, holder["cache"])
        return logits

    def run_hidden():
        h, holder["cache"] = hidden(model, tok, positions, holder["cache"])
        return h

    q = jax.random.normal(jax.random.key(1), (B, 1, cfg.n_heads, cfg.head_dim), jnp.float32).astype(model.dtype)

    @jax.jit
    def attn_stack(q, kc, vc):
        def body(q, i):
            k = lax.dynamic_index_in_dim(kc, i, 0, keepdims=False)
            v = lax.dynamic_index_in_dim(vc, i, 0, keepdims=False)
            mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]
            out = attention(q, k, v, mask)
            return out.reshape(q.shape), None
        return lax.scan(body, q, jnp.arange(L))[0]

    logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (B, V)), jnp.float32)
    u = jax.random.uniform(jax.random.key(2), (B,))
    off = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)
    greedy_knobs = make_knobs("profile", (B,), **{**off, "temperature": 0.0})
    sampled_knobs = make_knobs("profile", (B,), **{**off, "temperature": 0.8, "top_k": 50, "top_p": 0.9})
    draw_jit = jax.jit(draw)
    ctx = DecodeContext.from_prompt(jnp.asarray([PROMPT] * B, jnp.int32), V)
    ctx = ctx.advance(jnp.full((B,), 11, jnp.int32))
    ones, zeros = jnp.ones((B,), jnp.float32), jnp.zeros((B,), jnp.float32)

    @jax.jit
    def penalties(raw, ctx, ids, rep, freq, pres):
        seen = ctx.prompt_mask | (ctx.token_counts > 0)
        lg = apply_repetition_penalty(raw, seen, rep)
        lg = apply_frequency_presence_penalty(lg, ctx.token_counts, freq, pres)
        return lg, ctx.advance(ids, jnp.ones((raw.shape[0],), bool))

    ids = jnp.full((B,), 7, jnp.int32)
    prompt = jnp.asarray([PROMPT] * B, jnp.int32)
    key = jax.random.key(0)
    sampled = B > 1
    kw = dict(key=key, temperature=0.8, top_k=50, top_p=0.9) if sampled else dict(temperature=0.0)

    def gen(n):
        return lambda: jaxdecode.generate(model, prompt, n, **kw).tokens

    fns = {
        "model.step (whole decode step)": run_step,
        "layer stack (step without head)": run_hidden,
        "LM head (norm + 576x49152 matmul)": lambda: head(model, x),
        f"attention x {L} layers": lambda: attn_stack(q, cache0.k, cache0.v),
        "sampler draw, greedy": lambda: draw_jit(u, logits, greedy_knobs),
        "sampler draw, T0.8 top-k50 top-p0.9": lambda: draw_jit(u, logits, sampled_knobs),
        "penalties + token_counts update": lambda: penalties(logits, ctx, ids, ones, zeros, zeros),
        f"generate {new} ({'sampled' if sampled else 'greedy'})": gen(new),
        f"generate 8 ({'sampled' if sampled else 'greedy'})": gen(8),
    }
    t = bench(fns, runs)
    gkey, g8 = f"generate {new} ({'sampled' if sampled else 'greedy'})", f"generate 8 ({'sampled' if sampled else 'greedy'})"
    t["generate per step (marginal)"] = (t.pop(gkey) - t.pop(g8)) / (new - 8)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model, _ = models.load(dtype=args.dtype)
    print(f"jax {jax.__version__} on {jax.default_backend()}; model {type(model).__name__} "
          f"{args.dtype}; load average at start {os.getloadavg()}")
    batches = [int(b) for b in args.batches.split(",")]
    res = {b: profile(model, b, args.new, args.runs) for b in batches}
    names = list(res[batches[0]])
    w = max(len(n) for n in names)
    head = f"| {'part':{w}s} | " + " | ".join(f"b{b} ms | % step" for b in batches) + " |"
    print(head)
    print("|" + "-" * (w + 2) + "|" + "|".join("-------:|-------:" for _ in batches) + "|")
    for n in names:
        cells = []
        for b in batches:
            ms = 1e3 * res[b][n]
            share = 100 * res[b][n] / res[b]["generate per step (marginal)"]
            cells.append(f"{ms:6.2f} | {share:5.0f}%")
        print(f"| {n:{w}s} | " + " | ".join(cells) + " |")
    print("(% step: share of generate's marginal per-step cost; parts overlap: the step includes "
          "the layer stack and head, the layer stack includes attention)")
    for b in batches:
        print(f"b{b}: generate ~ {b / res[b]['generate per step (marginal)']:.1f} tokens/s (marginal)")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
