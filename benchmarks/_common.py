"""Small stdlib-only helpers shared by the benchmark controller and its worker processes.

The workers run in different Python environments (the transformers worker runs in its own
virtual environment, with torch), so this module imports nothing beyond the standard library.

Worker protocol: the controller writes one JSON object per line to a worker's stdin,
``{"op": NAME, "args": {...}}``; the worker answers one line on its stdout,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``. ``serve`` moves
everything else a library prints to stdout onto stderr, so the protocol stream stays clean.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable

_T0 = time.perf_counter()

PROMPT = "every effort moves you"
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}


def log(msg: str) -> None:
    """A progress line on stdout, prefixed by the seconds since this module was imported."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def stats(xs) -> dict:
    """Median, min, max and the runs of a list of numbers."""
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def fmt(x, digits: int = 3) -> str:
    """``x`` with about ``digits`` significant digits ("n/a" for None / non-finite)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    x = float(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_stat(s: dict | None, digits: int = 3) -> str:
    """``median [min–max]`` of a ``stats`` dict (just the median for a single value)."""
    if not s:
        return "n/a"
    if s["min"] == s["max"] or len(s.get("runs", [])) < 2:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}–{fmt(s['max'], digits)}]"


def proc_status_mb(field: str = "VmHWM") -> float | None:
    """A ``/proc/self/status`` memory field in MiB (``VmHWM``: peak resident set size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_info() -> dict:
    """Peak and current RSS of this process (MiB)."""
    return {"peak_rss_mb": proc_status_mb("VmHWM"), "rss_mb": proc_status_mb("VmRSS")}


def cpu_info() -> dict:
    """The CPU's model name, core counts and a summary of its vector / matrix flags."""
    info = {"cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu_model" not in info:
            info["cpu_model"] = val.strip()
        elif key in ("flags", "Features") and "cpu_flags" not in info:
            flags = set(val.split())
            info["cpu_flags"] = [w for w in wanted if w in flags]
    info["physical_cores"] = _physical_cores(text)
    return info


def _physical_cores(cpuinfo: str) -> int | None:
    """Distinct (physical id, core id) pairs of ``/proc/cpuinfo`` (None if not listed)."""
    cores, phys = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "physical id":
            phys = val.strip()
        elif key.strip() == "core id":
            cores.add((phys, val.strip()))
    return len(cores) or None


def cpu_label(info: dict) -> str:
    """One-line CPU description for result files."""
    flags = ", ".join(info.get("cpu_flags") or []) or "flags unknown"
    return (f"{info.get('cpu_model', 'unknown CPU')} ({info.get('cpu_count')} logical cores, "
            f"{info.get('physical_cores')} physical; {flags})")


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """Answer protocol requests from stdin until EOF or ``{"op": "quit"}``.

    Each handler takes the request's ``args`` as keyword arguments and returns a JSON-able dict.
    An exception becomes an ``{"ok": false}`` answer (with the traceback on stderr), and the
    worker keeps serving."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr
    handlers = dict(handlers)
    handlers.setdefault("memory", memory_info)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            out.write(json.dumps({"ok": True, "result": memory_info()}) + "\n")
            break
        try:
            result = handlers[req["op"]](**req.get("args", {}))
            answer = {"ok": True, "result": result}
        except Exception as e:  # report, keep serving
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
    out.flush()
