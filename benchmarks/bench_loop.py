"""The decode loop's own cost: jaxdecode.generate vs the model forward alone.

Model: a tiny 1-layer LM (embedding [V, D] -> one dense layer [D, V]), small enough that the
loop's overhead (penalties, sampling, bookkeeping, the scan itself) is visible.

Per configuration it times, per decode step (median of several runs, after compiling):

* ``forward``: a jitted ``lax.scan`` of N forward calls on [B, 1] tokens (next input = a
  trivial function of the previous one): the model alone.
* ``greedy``: a hand-written jitted greedy loop (scan + argmax): the minimal decode loop.
* ``generate(...)``: jaxdecode.generate greedy; sampling (temperature 0.8 with top_k 50, or with
  top_p 0.9 — on this flat random model the nucleus holds thousands of tokens, so the sampler
  takes its exact full-vocabulary path); top_p sampling with penalties (repetition 1.2, presence 0.5, frequency 0.2) — stateless protocol with
  ``context_size=1`` (so the model sees [B, 1] per step, the same shapes as ``forward``), and
  the KV-cached protocol (``CachedModel`` with an empty cache, T=1 per step).

issue 13's samplers (DRY + XTC + mirostat on every row, KV protocol) next to top-p sampling on
the same protocol, and the early-finish ratio: every row hits EOS at the first step vs a full
run (same compiled function; the remaining steps skip the model and the sampler via ``lax.cond``).

Prints tables; no asserts. Run: ``python benchmarks/bench_loop.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdecode


def make_model(vocab: int, dim: int, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "embed": jax.random.normal(k1, (vocab, dim), jnp.float32),
        "dense": jax.random.normal(k2, (dim, vocab), jnp.float32) * (2.0 / dim**0.5),
    }

    def forward(p, tokens):  # [B, T] -> [B, T, V]
        return p["embed"][tokens] @ p["dense"]

    return params, forward


class TinyLM:
    """Stateless protocol (a static model object; params captured)."""

    def __init__(self, params, forward):
        self.params, self.forward = params, forward

    def __call__(self, tokens):
        return self.forward(self.params, tokens)


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(vocab: int, batch: int, steps: int, dim: int, repeats: int) -> dict:
    params, forward = make_model(vocab, dim)
    prompt = jnp.full((batch, 4), 7, jnp.int32)  # identical rows: identical greedy paths

    @jax.jit
    def forward_alone(p, tok):
        def body(t, _):
            logits = forward(p, t)  # the sum keeps XLA from computing only a slice of the logits
            return (t + 1 + (jnp.sum(logits, axis=-1) > 1e30).astype(jnp.int32)) % vocab, None

        return lax.scan(body, tok, None, length=steps)[0]

    @jax.jit
    def greedy_loop(p, tok):
        def body(t, _):
            nxt = jnp.argmax(forward(p, t)[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return nxt, nxt[:, 0]

        return lax.scan(body, tok, None, length=steps)[1]

    stateless = TinyLM(params, forward)
    cached = jaxdecode.CachedModel(init_cache=lambda b, s: (), step=lambda t, pos, c: (forward(params, t), c))
    last = prompt[:, -1:]
    res = {"forward": timed(lambda: forward_alone(params, last), repeats) / steps,
           "greedy": timed(lambda: greedy_loop(params, last), repeats) / steps}
    key = jax.random.key(0)
    settings = {
        "generate greedy": dict(temperature=0.0),
        "generate sample top_k=50": dict(key=key, temperature=0.8, top_k=50),
        "generate sample top_p=0.9": dict(key=key, temperature=0.8, top_p=0.9),
        "generate sample+penalties": dict(key=key, temperature=0.8, top_p=0.9, repetition_penalty=1.2,
                                          presence_penalty=0.5, frequency_penalty=0.2),
    }
    for name, kw in settings.items():
        res[name] = timed(lambda: jaxdecode.generate(stateless, prompt, steps, context_size=1, **kw), repeats) / steps
    # Issue 13's samplers: DRY + XTC + mirostat on (every row), next to plain top-k / top-p above.
    # The KV protocol: DRY reads the whole token buffer, which the stateless window would not show.
    heavy = jaxdecode.SamplingParams(temperature=0.8, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                                     xtc_threshold=0.1, xtc_probability=0.5, mirostat_tau=5.0, mirostat_eta=0.1)
    res["generate DRY+XTC+mirostat (KV)"] = timed(
        lambda: jaxdecode.generate(cached, prompt, steps, key=key, sampling=heavy), repeats) / steps
    res["generate sample top_p=0.9 (KV)"] = timed(
        lambda: jaxdecode.generate(cached, prompt, steps, key=key, temperature=0.8, top_p=0.9), repeats) / steps
    res["generate greedy (KV protocol)"] = timed(
        lambda: jaxdecode.generate(cached, prompt, steps, temperature=0.0), repeats) / steps

    # Early finish: all rows emit EOS at the first step vs a full run (same compiled shapes).
    seq = np.asarray(jaxdecode.generate(stateless, prompt, steps, context_size=1, temperature=0.0).tokens[0, 4:])
    unused = int(np.setdiff1d(np.arange(vocab), seq)[0])
    full = timed(lambda: jaxdecode.generate(stateless, prompt, steps, context_size=1, temperature=0.0,
                                            eos_id=unused), repeats)
    early = timed(lambda: jaxdecode.generate(stateless, prompt, steps, context_size=1, temperature=0.0,
                                             eos_id=int(seq[0])), repeats)
    res["early/full"] = early / full
    res["full_ms"], res["early_ms"] = full * 1e3, early * 1e3
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    configs = [(1000, 1), (32000, 1), (1000, 32), (32000, 32)]
    if args.quick:
        configs = [(1000, 8), (32000, 8)]
    repeats = 3 if args.quick else 5
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"1-layer model D={args.dim}; N={args.steps} steps; median of {repeats} runs\n")
    rows = []
    for vocab, batch in configs:
        r = bench(vocab, batch, args.steps, args.dim, repeats)
        rows.append(((vocab, batch), r))
        fwd = r["forward"]
        print(f"V={vocab:>6}  B={batch:>3}   per-step time (us), overhead = minus forward, ratio = / forward")
        print(f"  {'':34}{'us/step':>10}{'overhead':>10}{'ratio':>8}")
        for name in ("forward", "greedy", "generate greedy", "generate sample top_k=50", "generate sample top_p=0.9",
                     "generate sample+penalties",
                     "generate greedy (KV protocol)", "generate sample top_p=0.9 (KV)",
                     "generate DRY+XTC+mirostat (KV)"):
            t = r[name]
            print(f"  {name:34}{t * 1e6:10.1f}{(t - fwd) * 1e6:10.1f}{t / fwd:8.2f}")
        print(f"  early finish (all rows EOS at step 1) vs full run: {r['early_ms']:.2f} ms vs "
              f"{r['full_ms']:.2f} ms  (ratio {r['early/full']:.3f})\n")


if __name__ == "__main__":
    main()
