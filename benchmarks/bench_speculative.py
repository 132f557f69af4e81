"""Speculative decoding on the default model: tokens/s and acceptance vs plain generate.

Prompts: a repetitive one (a list the model continues by copying) and a free-form one.
Proposers: prompt lookup (no second model) and a draft cut from the target's first layers
(`models.first_layers`). Greedy (temperature 0), batch 1, so every method must produce the
same tokens (checked). Prints a Markdown table; figures are medians of --runs after a warm-up.

Run: python benchmarks/bench_speculative.py [--new-tokens 64] [--runs 3] [--draft-layers 10] [--json PATH]
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
from jaxdecode import models

PROMPTS = {
    "repetitive": "Repeat the list exactly.\nList: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango.\n"
    "List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango.\nList: apple, banana,",
    "free-form": "every effort moves you",
}


def _time(fn, runs: int) -> tuple[float, object]:
    out = fn()
    jax.block_until_ready(out)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=10)
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per round")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model, tok = models.load()
    draft = models.first_layers(model, args.draft_layers)
    n = args.new_tokens
    rows = []
    for name, text in PROMPTS.items():
        ids = jnp.array([tok.encode(text)])
        base_s, base = _time(lambda: jaxdecode.generate(model, ids, n, temperature=0.0).tokens, args.runs)
        rows.append(dict(prompt=name, method="plain generate", tokens_per_s=n / base_s, acceptance=None, rounds=n, speedup=1.0))
        for label, prop in (
            (f"prompt lookup (k={args.k}, ngram=3)", jaxdecode.prompt_lookup(args.k, 3)),
            (f"draft: first {args.draft_layers} layers (k={args.k})", jaxdecode.draft_model(draft, args.k)),
        ):
            run = lambda: jaxdecode.speculative_generate(model, ids, n, proposer=prop, temperature=0.0)
            s, out = _time(run, args.runs)
            same = bool(np.array_equal(np.asarray(out.tokens), np.asarray(base)))
            acc = float(out.accepted[0]) / max(1, int(out.proposed[0]))
            rows.append(dict(prompt=name, method=label, tokens_per_s=n / s, acceptance=acc, rounds=int(out.rounds), speedup=base_s / s, same_tokens=same))
            if not same:
                print(f"WARNING: {label} on {name} produced different tokens than plain greedy")
    print(f"\nSpeculative decoding, greedy, batch 1, {n} new tokens, {jax.devices()[0].device_kind}\n")
    print("| prompt | method | tokens/s | speed-up | acceptance | target passes |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(f"| {r['prompt']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} | {r['rounds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
