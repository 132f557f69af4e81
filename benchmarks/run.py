#!/usr/bin/env python
"""jaxdecode benchmark suite, the controller: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Every system runs in its own long-lived process with its default settings: one jaxdecode worker
per weight format (``benchmarks/jax_worker.py``), one transformers worker
(``benchmarks/hf_baseline.py``, in its own Python environment), and llama.cpp's one-shot
``llama-bench`` / ``llama-perplexity`` (``benchmarks/llamacpp.py``). The controller imports no
JAX, torch or model: it drives the workers over JSON lines and runs the repetitions of every
figure interleaved across the processes (A B C A B C ...), reporting median, min and max.
See ``benchmarks/README.md`` for the method and every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import select
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, _ROOT)

from benchmarks import report  # noqa: E402
from benchmarks._common import PROMPT, cpu_info, cpu_label, loadavg, log, stats  # noqa: E402
from benchmarks.llamacpp import LlamaCpp  # noqa: E402

JD_FORMATS = ("float32", "bfloat16", "int8")
LLAMA_FORMATS = ("F32", "BF16", "Q8_0", "Q4_1")
COLUMNS = (tuple(f"jaxdecode {f}" for f in JD_FORMATS) + ("transformers float32",)
           + tuple(f"llama.cpp {f}" for f in LLAMA_FORMATS))
FIGURES = ("machine", "decode", "sampled", "batch32", "prefill", "perplexity", "sampler", "cli_cache")
DESCRIPTIONS = {
    "machine": "peak float32 GFLOP/s (jnp.dot) and memory bandwidth (jnp.sum over 1 GiB, 4 KB and 2 MB pages), in a probe process",
    "decode": "greedy batch 1 tokens/s, every system and format (llama-bench -p 0 -n N)",
    "sampled": "sampled batch 8 tokens/s (T 0.8, top-k 50, top-p 0.9), jaxdecode vs transformers",
    "batch32": "greedy batch 32 tokens/s, jaxdecode formats and transformers",
    "prefill": "time to first token of a long prompt at batch 1 and 8 (llama-bench -p N -n 0 at batch 1)",
    "perplexity": "perplexity on a fixed text, llama-perplexity's rule, jaxdecode formats vs llama.cpp files",
    "sampler": "jaxdecode.sample vs the common JAX port at 64 x 50257 (probe process)",
    "cli_cache": "two CLI runs sharing a fresh persistent compilation cache",
}
# Variables that change a baseline's threading: removed from the workers' environment so every
# system runs with its defaults (recorded in the results).
THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT")


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int  # interleaved rounds of the decode figures
    prefill_rounds: int
    new_tokens: int
    batch32_new: int
    prefill_tokens: int
    ppl_chunks: int
    peak_n: int
    bandwidth_gib: float
    sampler_rounds: int


FULL = Settings("full", rounds=5, prefill_rounds=3, new_tokens=64, batch32_new=64, prefill_tokens=1024,
                ppl_chunks=8, peak_n=4096, bandwidth_gib=1.0, sampler_rounds=5)
QUICK = Settings("quick", rounds=2, prefill_rounds=2, new_tokens=16, batch32_new=8, prefill_tokens=256,
                 ppl_chunks=2, peak_n=2048, bandwidth_gib=0.25, sampler_rounds=2)


# ---------------------------------------------------------------------------------------
# Worker processes


class Worker:
    """A long-lived worker process spoken to over JSON lines (``benchmarks._common.serve``).
    Its stderr goes to ``log_path``."""

    def __init__(self, name: str, python: str, module: str, env: dict, log_path: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([python, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, cwd=_ROOT, text=True, bufsize=1,
                                     start_new_session=True)  # no terminal: never stopped by SIGTTIN/SIGTTOU

    def call(self, op: str, timeout: float = 1800, **args) -> dict:
        """Sends one request and waits for its answer; raises RuntimeError on an error answer,
        a dead worker or a timeout."""
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"worker {self.name}: no answer to {op!r} (see {self.log_path})")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"worker {self.name}: {op} failed: {answer['error']}")
        return answer["result"]

    def close(self) -> dict:
        """Asks the worker to quit; returns its final memory figures (peak RSS)."""
        try:
            return self.call("quit", timeout=60)
        except Exception:
            return {}
        finally:
            self.proc.wait(timeout=60)
            self._log.close()


class Ctx:
    """The suite run: settings, the worker processes, llama.cpp, and the results."""

    def __init__(self, args, settings: Settings):
        self.s = settings
        self.args = args
        self.out_dir = args.out
        self.results: dict = {}
        self.notes: list = []
        self.workers: dict = {}  # column -> Worker
        self.startup: dict = {}  # column -> load / first call / memory
        self.info: dict = {}  # jaxdecode model info from the float32 worker
        self.failed: set = set()  # columns whose worker failed to start
        self.llama, why = LlamaCpp.find(args.llama_cpp, args.llama_models)
        if self.llama is None:
            self.note(f"llama.cpp columns skipped: {why}.")
        self.hf_python = args.hf_python or os.environ.get("HF_PYTHON")
        if args.no_hf:
            self.hf_python = None
            self.note("transformers column skipped (--no-hf).")
        elif not self.hf_python:
            self.note("transformers column skipped: pass --hf-python PATH or set HF_PYTHON "
                      "(the python of a venv with torch, transformers, accelerate, gguf).")
        self.env, self.removed_env = worker_env(args.jaxdecode)
        os.makedirs(os.path.join(self.out_dir, "logs"), exist_ok=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"note: {text}")

    # -- workers -----------------------------------------------------------------------
    def columns(self, *systems: str) -> list:
        """The columns of ``systems`` that this run can measure."""
        cols = [c for c in COLUMNS if c.split()[0] in systems]
        return [c for c in cols if self.available(c)]

    def available(self, col: str) -> bool:
        system, fmt = col.split()
        if system == "llama.cpp":
            return self.llama is not None
        if system == "transformers":
            return bool(self.hf_python) and col not in self.failed
        return col not in self.failed and (self.args.formats is None or fmt in self.args.formats)

    def worker(self, col: str) -> Worker:
        """The worker of a jaxdecode / transformers column, started, loaded and warmed (its
        first call, greedy batch 1, timed as the cold first call) on first use."""
        if col not in self.workers:
            self.workers[col] = self._start(col)
        return self.workers[col]

    def _start(self, col: str) -> Worker:
        system, fmt = col.split()
        log(f"  starting the {col} worker ...")
        path = os.path.join(self.out_dir, "logs", col.replace(" ", "_") + ".log")
        t0 = time.perf_counter()
        if system == "transformers":
            w = Worker(col, self.hf_python, "benchmarks.hf_baseline", self.env, path)
            info = w.call("load", gguf_path=self.model_path())
        else:
            w = Worker(col, sys.executable, "benchmarks.jax_worker", self.env, path)
            info = w.call("load", dtype=fmt)
            self.info.setdefault("model", info)
        info["start_to_loaded_s"] = time.perf_counter() - t0
        first = w.call("generate", prompt=self.prompt_ids(), batch=1, new=self.s.new_tokens, return_tokens=True)
        second = w.call("generate", prompt=self.prompt_ids(), batch=1, new=self.s.new_tokens)
        info.update(first_call_s=first["seconds"], second_call_s=second["seconds"], greedy_tokens=first["tokens"],
                    memory_after_first_call=w.call("memory"))
        self.startup[col] = info
        log(f"    {col}: load {info['load_s']:.2f} s, first call {first['seconds']:.2f} s, "
            f"second {second['seconds']:.2f} s, peak RSS {info['memory_after_first_call']['peak_rss_mb']:.0f} MiB")
        return w

    def start_all(self, systems=("jaxdecode", "transformers")) -> None:
        """Starts the workers one after another (so that each load and cold first call runs
        alone); a worker that fails is dropped with a note."""
        for col in self.columns(*systems):
            try:
                self.worker(col)
            except Exception as e:
                self.failed.add(col)
                self.note(f"{col} worker failed to start: {e}")

    def close_all(self) -> None:
        for col, w in self.workers.items():
            self.startup.setdefault(col, {})["memory_at_end"] = w.close()
        self.workers.clear()

    # -- inputs --------------------------------------------------------------------------
    def model_path(self) -> str:
        """The default model's GGUF file (asked of a jaxdecode worker's environment)."""
        if "model_path" not in self.info:
            code = "from jaxdecode.models import default_model_path; print(default_model_path())"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                                 cwd=_ROOT, check=True)
            self.info["model_path"] = out.stdout.strip().splitlines()[-1]
        return self.info["model_path"]

    def prompt_ids(self) -> list:
        """The token ids of the benchmark prompt (jaxdecode's tokenizer, no BOS: the GGUF's
        ``add_bos_token`` is false), given to every worker so all see the same ids."""
        if "prompt_ids" not in self.info:
            self.info["prompt_ids"] = json.loads(self._tokenize(PROMPT))
        return self.info["prompt_ids"]

    def text_ids(self) -> list:
        """The token ids of the perplexity text (``benchmarks/data/tempest.txt``)."""
        if "text_ids" not in self.info:
            from benchmarks.perplexity import TEXT_FILE

            with open(TEXT_FILE, encoding="utf-8") as f:
                self.info["text_ids"] = json.loads(self._tokenize(f.read()))
        return self.info["text_ids"]

    def _tokenize(self, text: str) -> str:
        code = ("import json, sys; from jaxdecode import models; "
                "print(json.dumps(models.load()[1].encode(sys.stdin.read())))")
        out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True,
                             env=self.env, cwd=_ROOT, check=True)
        return out.stdout.strip().splitlines()[-1]


def worker_env(jaxdecode_dir: str) -> tuple[dict, dict]:
    """The workers' environment: this one, minus the threading variables, with ``PYTHONPATH``
    leading to the jaxdecode source tree to measure and to this ``benchmarks`` package."""
    env = dict(os.environ)
    removed = {k: env.pop(k) for k in THREAD_VARS if k in env}
    paths = [os.path.abspath(jaxdecode_dir), _ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env, removed


# ---------------------------------------------------------------------------------------
# Interleaved measurement


def interleave(ctx: Ctx, runners: dict, rounds: int) -> dict:
    """Runs every ``runners[col]()`` once per round, in column order, for ``rounds`` rounds
    (A B C A B C ...: all columns see the same machine load). Each runner returns
    ``{"seconds", "tokens_per_s", ...}``. Returns per column the stats of both and the raw
    answers; a column whose runner fails is dropped with a note."""
    raw = {col: [] for col in runners}
    for r in range(rounds):
        for col, fn in list(runners.items()):
            try:
                raw[col].append(fn(r))
            except Exception as e:
                ctx.note(f"{col} dropped from a figure: {e}")
                runners.pop(col)
                raw.pop(col)
        log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{c} {xs[-1]['tokens_per_s']:.3g}" for c, xs in raw.items()))
    return {col: {"seconds": stats([x["seconds"] for x in xs]),
                  "tokens_per_s": stats([x["tokens_per_s"] for x in xs]), "raw": xs}
            for col, xs in raw.items() if xs}


def gen_runner(ctx: Ctx, col: str, batch: int, new: int, sampled: bool = False):
    """A runner timing one ``generate`` call of ``col`` (a worker or llama-bench -p 0 -n new)."""
    if col.startswith("llama.cpp"):
        fmt = col.split()[1]
        return lambda r: ctx.llama.bench(fmt, n_gen=new)
    w, prompt = ctx.worker(col), ctx.prompt_ids()

    def run(r):
        out = w.call("generate", prompt=prompt, batch=batch, new=new, sampled=sampled, seed=r + 1)
        return dict(out, tokens_per_s=batch * new / out["seconds"])

    return run


def prefill_runner(ctx: Ctx, col: str, batch: int, prompt: list):
    """A runner timing the time to first token of ``batch`` copies of ``prompt``."""
    if col.startswith("llama.cpp"):
        fmt = col.split()[1]

        def bench(r):
            out = ctx.llama.bench(fmt, n_prompt=len(prompt))
            return dict(out, seconds=len(prompt) / out["tokens_per_s"])

        return bench
    w = ctx.worker(col)

    def run(r):
        out = w.call("prefill", prompt=prompt, batch=batch)
        return dict(out, tokens_per_s=batch * len(prompt) / out["seconds"])

    return run


def measure(ctx: Ctx, label: str, runners: dict, rounds: int, *, warmup: bool = True) -> dict:
    """One warm-up call per worker column (compiles this shape), then the interleaved rounds;
    logs each column's tokens/s."""
    if warmup:
        for col, fn in list(runners.items()):
            if not col.startswith("llama.cpp"):
                try:
                    fn(-1)
                except Exception as e:
                    ctx.note(f"{col} dropped from {label}: {e}")
                    runners.pop(col)
    res = interleave(ctx, runners, rounds)
    for col, r in res.items():
        log(f"  {label}, {col}: {report.fmt_stat(r['tokens_per_s'])} tok/s")
    return res


# ---------------------------------------------------------------------------------------
# The figures


def fig_machine(ctx: Ctx) -> dict:
    """Peak float32 matmul GFLOP/s and memory bandwidth, in a fresh probe process (no model)."""
    w = Worker("probe", sys.executable, "benchmarks.jax_worker", ctx.env, os.path.join(ctx.out_dir, "logs", "probe.log"))
    try:
        flops = w.call("peak_flops", n=ctx.s.peak_n, reps=3)
        bw = w.call("bandwidth", gib=ctx.s.bandwidth_gib, reps=5)
    finally:
        w.close()
    log(f"  peak float32 matmul ({flops['n']}^3 jnp.dot): {report.fmt_stat(flops['gflops'])} GFLOP/s")
    log(f"  memory bandwidth (jnp.sum over {bw['bytes'] / 2**30:.2f} GiB): {report.fmt_stat(bw['gb_per_s'])} GB/s"
        + (f"; on 2 MB pages {report.fmt_stat(bw['gb_per_s_huge'])} GB/s" if bw.get("gb_per_s_huge") else ""))
    return {"peak_flops": flops, "bandwidth": bw}


def fig_decode(ctx: Ctx) -> dict:
    """Greedy batch 1, every column."""
    ctx.start_all()
    n = ctx.s.new_tokens
    runners = {c: gen_runner(ctx, c, 1, n) for c in ctx.columns("jaxdecode", "transformers", "llama.cpp")}
    res = measure(ctx, f"greedy b1, {n} new", runners, ctx.s.rounds, warmup=False)  # warmed at start
    return {"new_tokens": n, "batch": 1, "by_column": res}


def fig_sampled(ctx: Ctx) -> dict:
    n = ctx.s.new_tokens
    cols = [c for c in ctx.columns("jaxdecode", "transformers") if c.endswith("float32")]
    runners = {c: gen_runner(ctx, c, 8, n, sampled=True) for c in cols}
    return {"new_tokens": n, "batch": 8, "by_column": measure(ctx, f"sampled b8, {n} new", runners, ctx.s.rounds)}


def fig_batch32(ctx: Ctx) -> dict:
    n = ctx.s.batch32_new
    runners = {c: gen_runner(ctx, c, 32, n) for c in ctx.columns("jaxdecode", "transformers")}
    return {"new_tokens": n, "batch": 32, "by_column": measure(ctx, f"greedy b32, {n} new", runners, ctx.s.rounds)}


def fig_prefill(ctx: Ctx) -> dict:
    """Time to first token of the first ``prefill_tokens`` tokens of the perplexity text: batch 1
    for every column, batch 8 for the float32 workers."""
    prompt = ctx.text_ids()[:ctx.s.prefill_tokens]
    out = {"prompt_tokens": len(prompt)}
    b1 = {c: prefill_runner(ctx, c, 1, prompt) for c in ctx.columns("jaxdecode", "transformers", "llama.cpp")}
    out["b1"] = measure(ctx, f"prefill {len(prompt)} b1", b1, ctx.s.prefill_rounds)
    b8 = {c: prefill_runner(ctx, c, 8, prompt) for c in ctx.columns("jaxdecode", "transformers")
          if c.endswith("float32")}
    out["b8"] = measure(ctx, f"prefill {len(prompt)} b8", b8, ctx.s.prefill_rounds)
    return out


def fig_perplexity(ctx: Ctx) -> dict:
    """Perplexity with llama-perplexity's rule (``benchmarks/perplexity.py``) of each jaxdecode
    format (its worker) and of llama-perplexity on each llama.cpp file, the same text and n_ctx."""
    from benchmarks import perplexity as ppl
    from benchmarks.perplexity import N_CTX, TEXT_FILE

    chunks = ppl.chunks_for(ctx.text_ids(), N_CTX, n_chunks=ctx.s.ppl_chunks)  # add_bos_token is false
    out = {"text": TEXT_FILE, "source": ppl.SOURCE, "n_ctx": N_CTX, "chunks": len(chunks),
           "text_tokens": len(ctx.text_ids()), "by_column": {}}
    for col in ctx.columns("jaxdecode"):
        r = ctx.worker(col).call("nll", chunks=chunks, first=N_CTX // 2)
        r["ppl"] = ppl.ppl(r["nll_sum"], r["count"])
        out["by_column"][col] = r
        log(f"  perplexity {col}: {r['ppl']:.4f} ({r['count']} tokens scored, {r['seconds']:.1f} s)")
    for col in ctx.columns("llama.cpp"):
        try:
            r = ctx.llama.perplexity(col.split()[1], TEXT_FILE, n_ctx=N_CTX, chunks=len(chunks))
        except Exception as e:
            ctx.note(f"{col}: llama-perplexity failed: {e}")
            continue
        out["by_column"][col] = r
        log(f"  perplexity {col}: {r['ppl']:.4f} +/- {r['ppl_err']:.4f} (llama-perplexity, {r['chunks']} chunks)")
    return out


def fig_sampler(ctx: Ctx) -> dict:
    w = Worker("sampler", sys.executable, "benchmarks.jax_worker", ctx.env,
               os.path.join(ctx.out_dir, "logs", "sampler.log"))
    try:
        r = w.call("sampler", rounds=ctx.s.sampler_rounds)
    finally:
        w.close()
    log(f"  jaxdecode.sample {r['batch']} x {r['vocab']}: {report.fmt_stat(r['jaxdecode_sample_ms'])} ms; "
        f"common port {report.fmt_stat(r['common_port_ms'])} ms")
    return r


def fig_cli_cache(ctx: Ctx) -> dict:
    """``python -m jaxdecode PROMPT --max-new-tokens 8 --json`` twice with one fresh
    ``JAXDECODE_CACHE_DIR``: the second run reuses JAX's persistent compilation cache."""
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory(prefix="jaxdecode-bench-xla-") as cache_dir:
        env = dict(ctx.env, JAXDECODE_CACHE_DIR=cache_dir)
        cmd = [sys.executable, "-m", "jaxdecode", PROMPT, "--max-new-tokens", "8", "--json"]
        for i in range(2):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT, env=env, timeout=600)
            r = {"wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
            try:
                r["timing"] = json.loads(proc.stdout.strip().splitlines()[-1])["timing"]
            except Exception:
                r["error"] = (proc.stderr or proc.stdout).strip()[-300:]
            runs.append(r)
            log(f"  CLI run {i + 1}: wall {r['wall_s']:.2f} s, timing {r.get('timing')}")
    return {"runs": runs}


RUNNERS = {"machine": fig_machine, "decode": fig_decode, "sampled": fig_sampled, "batch32": fig_batch32,
           "prefill": fig_prefill, "perplexity": fig_perplexity, "sampler": fig_sampler, "cli_cache": fig_cli_cache}


# ---------------------------------------------------------------------------------------
# Entry point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description="jaxdecode benchmark suite (SmolLM2-135M-Instruct): jaxdecode, "
        "transformers and llama.cpp, each in its own process; writes results.json and results.md.",
        epilog="figures: " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()))
    p.add_argument("--quick", action="store_true", help="2 rounds, short generations and prompts: a smoke test")
    p.add_argument("--only", default=None, help="comma-separated figures (default: all): " + ",".join(FIGURES))
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--formats", default=None, help="jaxdecode formats to run (default: float32,bfloat16,int8)")
    p.add_argument("--jaxdecode", default=_ROOT, help="source tree whose jaxdecode the workers import "
                   "(default: this checkout)")
    p.add_argument("--hf-python", default=None, help="python of the transformers venv (default: $HF_PYTHON)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--llama-cpp", default=None, help="folder of llama-bench/llama-quantize/llama-perplexity "
                   "(default: $LLAMA_CPP_BIN; skipped when neither is set)")
    p.add_argument("--llama-models", default=None, help="folder for the F32/BF16/Q8_0/Q4_1 GGUF files "
                   "(default: $LLAMA_CPP_MODELS or ~/.cache/jaxdecode-bench/llamacpp)")
    args = p.parse_args(argv)
    args.formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else None
    return args


def select_figures(only: str | None) -> list:
    if not only:
        return list(FIGURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in FIGURES]
    if bad:
        raise SystemExit(f"unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in names]


def run_figures(ctx: Ctx, names: list) -> dict:
    """Runs the figures in order; a failing figure is recorded and the others still run."""
    per_figure = {}
    if ctx.llama is not None and any(n in names for n in ("decode", "prefill", "perplexity")):
        ctx.results["llama_files"] = ctx.llama.prepare(ctx.model_path())
        note = ctx.llama.check_repack()
        if note:
            ctx.note(note)
        ctx.results["llama_repack"] = ctx.llama.repack
    for name in names:
        la = loadavg()
        log(f"== {name}: {DESCRIPTIONS[name]} (load average {la})")
        t0 = time.perf_counter()
        try:
            ctx.results[name] = RUNNERS[name](ctx)
        except Exception as e:  # one broken figure must not lose the others
            import traceback

            traceback.print_exc()
            ctx.results[name] = {"error": f"{type(e).__name__}: {e}"}
            ctx.note(f"{name} failed: {type(e).__name__}: {e}")
        per_figure[name] = {"seconds": time.perf_counter() - t0, "loadavg_start": la}
    return per_figure


def main(argv=None) -> int:
    args = parse_args(argv)
    names = select_figures(args.only)
    settings = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    cpu = cpu_info()
    log(f"jaxdecode benchmarks ({settings.mode}): {', '.join(names)}; CPU {cpu_label(cpu)}; load average {loadavg()}")
    ctx = Ctx(args, settings)
    load_start = loadavg()
    try:
        per_figure = run_figures(ctx, names)
    finally:
        ctx.close_all()
    meta = {"mode": settings.mode, "settings": dataclasses.asdict(settings), "figures": names,
            "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"), "duration_s": time.perf_counter() - t0,
            "cpu": cpu, "cpu_label": cpu_label(cpu), "loadavg_start": load_start, "loadavg_end": loadavg(),
            "per_figure": per_figure, "jaxdecode_tree": report.tree_info(args.jaxdecode),
            "bench_tree": report.tree_info(_ROOT), "hf_python": ctx.hf_python,
            "llama_cpp": ctx.llama.bin_dir if ctx.llama else None, "removed_env": ctx.removed_env,
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}, "prompt": PROMPT}
    doc = {"meta": meta, "startup": ctx.startup, "model": ctx.info.get("model"), "results": ctx.results,
           "notes": ctx.notes}
    doc["table"], doc["targets"] = report.summarize(doc)
    report.write(doc, args.out)
    report.print_summary(doc)
    log(f"done in {meta['duration_s']:.0f} s: wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
