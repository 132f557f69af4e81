#!/usr/bin/env python
"""The device-agnostic figures on whatever accelerator JAX sees: ``python -m benchmarks.gpu``.

Runs, on ``jax.devices()[0]`` (a GPU or TPU when there is one; the CPU otherwise):

* SmolLM2-135M decode, greedy, 64 new tokens, float32 and bfloat16 weights, batch 1, 64, 256;
* ``jaxdecode.sample`` at 256 x 152064 (per-row T 0.8, top-k 50, top-p 0.9; Zipf-like logits);
* prefill / time to first token of a 1024-token prompt (``generate`` with one new token),
  float32 and bfloat16, batch 1.

Each figure: one warm-up call (compiles; its time is recorded), then the median, min and max of
``--reps`` calls. The whole script stays under ``--budget`` seconds (default 540): before each
figure it checks the time left and skips the rest with a note. Writes
``gpu_<device kind>.json`` and ``.md`` to ``--out`` (default ``benchmarks/results``).
``--quick`` (small batches and sizes) runs in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import PROMPT, SAMPLING, cpu_info, cpu_label, fmt_stat, loadavg, log, stats  # noqa: E402

FULL = {"batches": (1, 64, 256), "new": 64, "sampler": (256, 152064), "prefill": 1024, "reps": 3}
QUICK = {"batches": (1, 4), "new": 8, "sampler": (16, 152064), "prefill": 128, "reps": 2}


def timed_calls(fn, reps: int) -> dict:
    """Warm-up (compile) time and the stats of ``reps`` timed calls of ``fn`` (blocked)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "seconds": stats(times)}


def decode_fn(model, ids: list, batch: int, new: int):
    import jax.numpy as jnp

    import jaxdecode

    prompt = jnp.asarray([ids] * batch, jnp.int32)
    return lambda: jaxdecode.generate(model, prompt, new, temperature=0.0).tokens


def sampler_fn(batch: int, vocab: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdecode

    rng = np.random.default_rng(0)
    base = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    logits = jnp.asarray(np.stack([base[rng.permutation(vocab)] for _ in range(batch)]))
    knobs = {k: jnp.full((batch,), v, jnp.int32 if k == "top_k" else jnp.float32) for k, v in SAMPLING.items()}
    counter = [0]

    def call():
        counter[0] += 1
        return jaxdecode.sample(jax.random.key(counter[0]), logits, **knobs)

    return call


def plan(cfg: dict) -> list:
    """``(name, kind, params)`` of every figure, in the order they run."""
    items = []
    for dtype in ("float32", "bfloat16"):
        items += [(f"decode {dtype} b{b}", "decode", {"dtype": dtype, "batch": b}) for b in cfg["batches"]]
    items.append((f"sample {cfg['sampler'][0]} x {cfg['sampler'][1]}", "sampler", {}))
    items += [(f"prefill {cfg['prefill']} {d} b1", "prefill", {"dtype": d}) for d in ("float32", "bfloat16")]
    return items


def run_item(kind: str, p: dict, cfg: dict, models: dict, text_ids: list) -> dict:
    """One figure: the timed calls and its throughput."""
    if kind == "sampler":
        r = timed_calls(sampler_fn(*cfg["sampler"]), cfg["reps"] * 3)
        r["ms"] = stats([1e3 * t for t in r["seconds"]["runs"]])
        return r
    model, ids = models[p["dtype"]]
    if kind == "decode":
        tokens = p["batch"] * cfg["new"]
        r = timed_calls(decode_fn(model, ids, p["batch"], cfg["new"]), cfg["reps"])
    else:
        tokens = cfg["prefill"]
        r = timed_calls(decode_fn(model, text_ids[:tokens], 1, 1), cfg["reps"])
    r["tokens_per_s"] = stats([tokens / t for t in r["seconds"]["runs"]])
    return r


def load_models() -> dict:
    from jaxdecode import models

    out = {}
    for dtype in ("float32", "bfloat16"):
        m, tok = models.load(dtype=dtype)
        out[dtype] = (m, tok.encode(PROMPT))
    return out


def text_ids(n: int) -> list:
    """``n`` token ids of the perplexity text, repeated if it is shorter."""
    from benchmarks.perplexity import TEXT_FILE
    from jaxdecode import models

    with open(TEXT_FILE, encoding="utf-8") as f:
        ids = models.load()[1].encode(f.read())
    return (ids * (n // len(ids) + 1))[:n]


def write(doc: dict, out_dir: str) -> str:
    kind = re.sub(r"[^A-Za-z0-9]+", "_", doc["device"]["kind"]).strip("_") or "device"
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"gpu_{kind}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# jaxdecode on {doc['device']['kind']} ({doc['device']['platform']})", "",
             f"Mode {doc['mode']}, {doc['started']}, {doc['duration_s']:.0f} s; JAX {doc['jax']}; host CPU "
             f"{doc['host_cpu']}; load average {doc['loadavg']}.", "",
             "| figure | tokens/s (or ms) | first call (s) |", "| --- | --- | --- |"]
    for name, r in doc["figures"].items():
        value = f"{fmt_stat(r['ms'])} ms" if "ms" in r else f"{fmt_stat(r['tokens_per_s'])} tok/s"
        lines.append(f"| {name} | {value} | {r['first_call_s']:.2f} |")
    lines += [""] + [f"- {n}" for n in doc["notes"]]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and sizes (runs on a CPU in ~1 min)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script (default 540)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    cfg = QUICK if args.quick else FULL
    dev = jax.devices()[0]
    doc = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()},
           "jax": jax.__version__, "host_cpu": cpu_label(cpu_info()), "loadavg": loadavg(), "settings": cfg,
           "figures": {}, "notes": []}
    log(f"device {dev.device_kind} ({dev.platform}); budget {args.budget:.0f} s")
    models, ids = load_models(), text_ids(cfg["prefill"])
    per_item = None
    for name, kind, params in plan(cfg):
        left = args.budget - (time.perf_counter() - t0)
        if per_item is not None and left < 2 * per_item:
            doc["notes"].append(f"skipped {name}: {left:.0f} s left of the {args.budget:.0f} s budget")
            continue
        t1 = time.perf_counter()
        try:
            doc["figures"][name] = r = run_item(kind, params, cfg, models, ids)
        except Exception as e:  # e.g. out of device memory at a large batch
            doc["notes"].append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            log(f"  {name} failed: {type(e).__name__}")
            continue
        per_item = max(per_item or 0.0, time.perf_counter() - t1)
        shown = f"{fmt_stat(r['ms'])} ms" if "ms" in r else f"{fmt_stat(r['tokens_per_s'])} tok/s"
        log(f"  {name}: {shown} (first call {r['first_call_s']:.1f} s)")
    doc["duration_s"] = time.perf_counter() - t0
    log(f"wrote {write(doc, args.out)}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
