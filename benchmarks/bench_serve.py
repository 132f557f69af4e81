"""The OpenAI-compatible server under load, on loopback: continuous batching vs one at a time.

Starts ``jaxdecode serve``'s application (uvicorn, in this process, on a free 127.0.0.1 port)
on the real model, then sends the same work three ways:

1. ``concurrent``: N requests (default 64) with varied prompt and output lengths from C
   concurrent clients (default 16; threads, each streaming with ``httpx``);
2. ``sequential``: the same N requests, one at a time;
3. ``offline generate``: ``jaxdecode.generate`` on the same work: the requests sorted by
   ``max_tokens`` and batched C at a time (equal settings; each batch right-padded to its
   longest prompt, with per-row ``prompt_lengths`` and per-row keys, run for its largest
   ``max_tokens``), timed after one untimed compiling pass; its output tokens/s counts each
   request's own ``max_tokens``. Each request's text is compared with the server's response
   (the same seed: row key ``fold_in(key(seed), 0)``, the engine's).

Every request is sampled (temperature 0.8, top-p 0.95) with its own seed and
``ignore_eos`` (so its output length is its ``max_tokens``); each concurrent response is
checked token for token against its own sequential (single) run: no request lost or
corrupted. Reports requests/s, output tokens/s, time to first token and inter-token latency
(median and p99), and the concurrent / sequential throughput ratio (issue 15's goal: >= 4x at
16 clients).

Run: ``python benchmarks/bench_serve.py [--requests 64] [--concurrency 16] [--slots 16]``;
``--smoke`` is a tiny run (4 requests, 2 clients, 2 slots, up to 8 tokens) that checks the
script end to end.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _work(n: int, tok, seed: int = 0, min_out: int = 8, max_out: int = 64):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()
    reqs = []
    for i in range(n):
        k = int(rng.integers(3, 60))
        prompt = " ".join(rng.choice(words, size=k).tolist())
        reqs.append({"prompt": prompt, "max_tokens": int(rng.integers(min_out, max_out + 1)), "temperature": 0.8,
                     "top_p": 0.95, "seed": 1000 + i, "ignore_eos": True, "logprobs": 0, "stream": True})
    return reqs


def _one(client, url: str, body: dict) -> dict:
    """Streams one request; returns its tokens, text and timings."""
    t0 = time.perf_counter()
    times, tokens, text = [], [], []
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            ch = ev["choices"][0]
            lp = ch.get("logprobs") or {}
            if lp.get("tokens"):
                times.append((time.perf_counter(), len(lp["tokens"])))
                tokens += lp["tokens"]
            text.append(ch["text"])
    return {"t0": t0, "t_end": time.perf_counter(), "times": times, "tokens": tokens, "text": "".join(text)}


def _run_clients(url: str, bodies: list, concurrency: int) -> tuple[list, float]:
    import httpx

    results = [None] * len(bodies)
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                results[i] = _one(client, url, bodies[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def _summary(name: str, results: list, wall: float) -> dict:
    out_tokens = sum(len(r["tokens"]) for r in results)
    ttft = [r["times"][0][0] - r["t0"] for r in results if r["times"]]
    # Inter-token latency: the gap between a request's consecutive events divided by the
    # tokens the later one brought (tokens arrive a decode chunk at a time).
    itl = []
    for r in results:
        for (a, _), (b, k) in zip(r["times"][:-1], r["times"][1:]):
            itl.append((b - a) / k)
    row = {"mode": name, "requests": len(results), "wall_s": round(wall, 2), "req_per_s": round(len(results) / wall, 3),
           "out_tok_per_s": round(out_tokens / wall, 1),
           "ttft_median_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(_pct(ttft, 99), 3),
           "itl_median_s": round(statistics.median(itl), 4) if itl else None,
           "itl_p99_s": round(_pct(itl, 99), 4) if itl else None}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny end-to-end run (not a measurement)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.slots, args.min_tokens, args.max_tokens = 4, 2, 2, 4, 8
        args.max_seq_len = 128

    import jax
    import jax.numpy as jnp
    import uvicorn

    import jaxdecode
    from jaxdecode._server import ServingState, build_app, load_engine

    ns = argparse.Namespace(model=args.model, dtype=args.dtype, slots=args.slots, max_seq_len=args.max_seq_len,
                            chunk_size=args.chunk_size, served_model_name="bench")
    engine, tok, name = load_engine(ns)
    state = ServingState(engine, tok, name, warmup=True)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.perf_counter()
    while not (server.started and state.ready.is_set()):
        time.sleep(0.1)
    print(f"server up, warm-up done in {time.perf_counter() - t0:.1f} s "
          f"({engine.slots} slots, chunk {engine.chunk_size}, max_seq_len {engine.max_seq_len})", flush=True)
    url = f"http://127.0.0.1:{port}"
    bodies = _work(args.requests, tok, min_out=args.min_tokens, max_out=args.max_tokens)

    seq, seq_wall = _run_clients(url, bodies, 1)
    rows = [_summary("sequential (1 client)", seq, seq_wall)]
    print(json.dumps(rows[-1]), flush=True)
    conc, conc_wall = _run_clients(url, bodies, args.concurrency)
    rows.append(_summary(f"concurrent ({args.concurrency} clients)", conc, conc_wall))
    print(json.dumps(rows[-1]), flush=True)
    bad = [i for i, (a, b) in enumerate(zip(seq, conc)) if a["tokens"] != b["tokens"] or a["text"] != b["text"]]
    lost = [i for i, (r, b) in enumerate(zip(conc, bodies)) if len(r["tokens"]) != b["max_tokens"]]
    print(f"checked {len(bodies)} responses against their single runs: {len(bad)} differ, {len(lost)} incomplete",
          flush=True)

    if not args.skip_offline:
        model = engine.model
        add_bos = getattr(tok, "add_bos_token", False)  # as the server encodes a prompt
        order = sorted(range(len(bodies)), key=lambda i: (bodies[i]["max_tokens"], i))
        batches = [order[s:s + args.concurrency] for s in range(0, len(order), args.concurrency)]
        texts: dict = {}

        def offline() -> int:
            out_tokens = 0
            for batch in batches:
                group = [bodies[i] for i in batch]
                ids = [tok.encode(b["prompt"], add_bos=add_bos) for b in group]
                p = max(len(x) for x in ids)
                prompt = np.zeros((len(ids), p), np.int32)
                for i, x in enumerate(ids):
                    prompt[i, :len(x)] = x
                n = max(b["max_tokens"] for b in group)
                keys = jax.vmap(lambda sd: jax.random.fold_in(jax.random.key(sd), 0))(
                    jnp.array([b["seed"] for b in group]))
                out = jaxdecode.generate(model, prompt, n, key=keys, prompt_lengths=np.array([len(x) for x in ids]),
                                         temperature=0.8, top_p=0.95, eos_id=())
                toks = np.asarray(jax.block_until_ready(out.tokens))
                for j, (i, b) in enumerate(zip(batch, group)):
                    texts[i] = toks[j, len(ids[j]):len(ids[j]) + b["max_tokens"]].tolist()
                out_tokens += sum(b["max_tokens"] for b in group)
            return out_tokens

        offline()  # compiles each (batch, prompt bucket, step bucket) once, untimed
        t1 = time.perf_counter()
        out_tokens = offline()
        wall = time.perf_counter() - t1
        rows.append({"mode": f"offline generate (sorted by max_tokens, batches of {args.concurrency}, compiled)",
                     "requests": len(bodies), "wall_s": round(wall, 2), "req_per_s": round(len(bodies) / wall, 3),
                     "out_tok_per_s": round(out_tokens / wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
        same = sum(tok.decode(texts[i]) == conc[i]["text"] for i in range(len(bodies)))
        print(f"offline generate: {same} of {len(bodies)} texts equal the server's responses "
              f"(floating-point differences between batch shapes can flip a sampled token)", flush=True)
        print(f"server (concurrent) / offline generate output throughput: "
              f"{rows[1]['out_tok_per_s'] / rows[-1]['out_tok_per_s']:.2f}x", flush=True)

    ratio = rows[1]["out_tok_per_s"] / rows[0]["out_tok_per_s"]
    print("\n| mode | requests/s | output tok/s | TTFT median / p99 (s) | inter-token latency median / p99 (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['req_per_s']} | {r['out_tok_per_s']} | "
              f"{r.get('ttft_median_s', '-')} / {r.get('ttft_p99_s', '-')} | "
              f"{r.get('itl_median_s', '-')} / {r.get('itl_p99_s', '-')} |")
    print(f"\nconcurrent / sequential output throughput: {ratio:.2f}x (goal >= 4x); "
          f"{len(bad)} of {len(bodies)} responses differ from their single runs")
    server.should_exit = True
    th.join(30)
    return 0 if not bad and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
