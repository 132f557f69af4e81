"""Benchmark: jaxdecode.sample against the common JAX port of top-k / top-p sampling.

The "common JAX port" is what most JAX decoding code does (e.g. Hugging Face's Flax logits
warpers): divide by the temperature, mask below the ``lax.top_k`` threshold, sort the whole
vocabulary for top-p (cumulative softmax, mask, sort back), then ``jax.random.categorical``,
all in one ``jax.jit``. jaxdecode draws exactly from the same distribution (plus exact tie
handling) without sorting the vocabulary.

Times are the median of ``--runs`` calls after warm-up (compilation excluded), with
``block_until_ready``. Logits are synthetic, shaped like a language model's: Zipf-like
(logit = -1.1 * log(rank) + noise, a random rank order per row). For each jaxdecode setting
the script also reports the fraction of rows whose kept set fits in the sampler's
``NUM_CANDIDATES`` top candidates (the fast path); other rows need the exact
full-vocabulary fallback.

Usage:
  python benchmarks/bench_sampler.py [--batch 64] [--vocab 50257] [--runs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdecode
from jaxdecode import _sampling


def lm_like_logits(batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Zipf-like logits: -1.1 * log(rank) plus a little noise, in a random order per row."""
    rng = np.random.default_rng(seed)
    base = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float64))
    out = np.empty((batch, vocab), np.float32)
    for i in range(batch):
        out[i, rng.permutation(vocab)] = base + rng.normal(scale=0.3, size=vocab)
    return out


@partial(jax.jit, static_argnames="top_k")
def common_port(key, logits, temperature, top_p, *, top_k: int):
    """Temperature, lax.top_k threshold mask, sort-based top-p, jax.random.categorical."""
    logits = logits / temperature[:, None]
    # top-k: mask everything below the k-th largest logit
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: sort the whole vocabulary, cumulative softmax, mask, sort back
    sorted_logits, sorted_idx = lax.top_k(logits, logits.shape[-1])
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep = jnp.roll(cum < top_p[:, None], 1, axis=-1).at[:, 0].set(True)  # + the boundary token
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    logits = lax.sort_key_val(sorted_idx, sorted_logits)[1]
    return jax.random.categorical(key, logits, axis=-1)


def time_fn(fn, runs: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds of ``fn()`` (which returns a JAX array)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fast_path_fraction(logits: np.ndarray, knobs: dict) -> float:
    """Fraction of rows the sampler decides on its top NUM_CANDIDATES candidates."""
    c = _sampling.NUM_CANDIDATES
    t = float(knobs.get("temperature", 1.0))
    if t == 0:
        return 1.0
    x = np.sort(logits.astype(np.float64) / t, axis=-1)[:, ::-1]
    w = np.exp(x - x[:, :1])
    z = w.sum(-1)
    kept = np.full(x.shape[0], x.shape[1])
    k = int(knobs.get("top_k", 0))
    if 0 < k < x.shape[1]:
        kept = np.minimum(kept, k)
    p = float(knobs.get("top_p", 1.0))
    if p < 1:
        kept = np.minimum(kept, np.argmax(np.cumsum(w, -1) >= p * z[:, None], -1) + 1)
    mp = float(knobs.get("min_p", 0.0))
    if mp > 0:
        kept = np.minimum(kept, (w >= mp).sum(-1))
    return float(np.mean(kept < c))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", type=str, default=None, help="write the results to this path")
    args = ap.parse_args(argv)
    b, v = args.batch, args.vocab

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
          f"batch {b} x vocab {v} float32, median of {args.runs} runs")
    logits_np = lm_like_logits(b, v)
    logits = jnp.asarray(logits_np)
    key = jax.random.key(0)
    temperature = jnp.full((b,), 0.8, jnp.float32)
    top_p = jnp.full((b,), 0.9, jnp.float32)
    results = {"batch": b, "vocab": v, "runs": args.runs, "device": str(jax.devices()[0]), "jax": jax.__version__, "timings_ms": {}}

    # Head to head: per-row temperature 0.8, top_k 50, top_p 0.9.
    main_knobs = dict(temperature=temperature, top_k=50, top_p=top_p)
    t_ours = time_fn(lambda: jaxdecode.sample(key, logits, **main_knobs), args.runs)
    t_port = time_fn(lambda: common_port(key, logits, temperature, top_p, top_k=50), args.runs)
    print("\nT=0.8 (per row), top_k=50, top_p=0.9:")
    print(f"  jaxdecode.sample      {t_ours:9.2f} ms")
    print(f"  common JAX port       {t_port:9.2f} ms")
    print(f"  speed-up              {t_port / t_ours:9.2f} x")
    results["timings_ms"]["jaxdecode_t0.8_k50_p0.9"] = t_ours
    results["timings_ms"]["common_port_t0.8_k50_p0.9"] = t_port
    results["speedup"] = t_port / t_ours

    print("\njaxdecode, other settings:                     ms   fast-path rows")
    settings = [
        ("greedy (jaxdecode.greedy)", None, {"temperature": 0.0}),
        ("greedy (sample, temperature=0)", dict(temperature=0.0), {"temperature": 0.0}),
        ("top_p=0.9 only (T=1)", dict(top_p=0.9), {"top_p": 0.9}),
        ("plain temperature sampling (T=0.8)", dict(temperature=0.8), {"temperature": 0.8}),
        ("min_p=0.05 (T=1)", dict(min_p=0.05), {"min_p": 0.05}),
        ("typical_p=0.9 (T=1)", dict(typical_p=0.9), {}),
    ]
    for name, kw, path_knobs in settings:
        if kw is None:
            t = time_fn(lambda: jaxdecode.greedy(logits), args.runs)
        else:
            t = time_fn(lambda kw=kw: jaxdecode.sample(key, logits, **kw), args.runs)
        frac = fast_path_fraction(logits_np, path_knobs)
        print(f"  {name:38s} {t:9.2f}   {frac:6.0%}")
        results["timings_ms"][name] = t

    one = logits[:1]
    t1 = time_fn(lambda: jaxdecode.sample(key, one, temperature=0.8, top_k=50, top_p=0.9), args.runs)
    t1p = time_fn(lambda: common_port(key, one, temperature[:1], top_p[:1], top_k=50), args.runs)
    print(f"\nbatch 1, T=0.8, top_k=50, top_p=0.9: jaxdecode {t1:.2f} ms, common port {t1p:.2f} ms")
    results["timings_ms"]["jaxdecode_batch1_t0.8_k50_p0.9"] = t1
    results["timings_ms"]["common_port_batch1_t0.8_k50_p0.9"] = t1p

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
