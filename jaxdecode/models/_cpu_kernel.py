"""The optional CPU fast path for few-row matmuls and attention: an AVX-512 kernel called
through ``jax.ffi`` (products of 1-8 rows, the decode step's attention over the cache, and a
prompt's causal attention in prefill; everything else stays on XLA).

Decoding multiplies 1-8 rows by every weight matrix, and on CPU that time is the weight stream.
XLA:CPU's own dots stream float32 at about 78% of the memory bandwidth and bfloat16 / int8 at
far less (see the README's performance notes); ``_cpu_kernel.cc`` reads every weight byte once
per call from every core. It is compiled at first use with the machine's C++ compiler
(``-O3 -march=native``) into ``$JAXDECODE_CACHE_DIR`` (default ``~/.cache/jaxdecode``) and
loaded with ctypes. Without a compiler, without AVX-512 (F, BW, VNNI), or with
``JAXDECODE_CPU_KERNEL=0`` in the environment, :func:`available` is False and every matmul
stays on XLA's dot: the same results up to float32 summation order (int8 is exact either way).

The choice is made while tracing: :func:`set_enabled` changes later traces only, so call it
before the first ``generate`` (or ``jax.clear_caches()`` after).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "enabled", "set_enabled", "build_error", "matmul_f32", "matmul_s8",
           "MAX_ROWS", "takes", "causal_attention", "decode_attention", "ATTENTION_HEAD_DIMS",
           "takes_attention"]

# Up to this many rows a product goes to the kernel, per operand dtype; with more rows the
# product is compute-bound and XLA's library GEMMs win (measured on a chain of SmolLM2's 120
# layer products, Intel Xeon 2 cores: the kernel is ahead up to 8 float32 rows, 4 bfloat16
# rows and 2 int8 rows, i.e. one activation row of qlinear's two-part int8 codes).
MAX_ROWS = {"float32": 8, "bfloat16": 4, "int8": 2}

# The head sizes the prefill attention kernel is compiled for (SmolLM2 and Llama: 64; Qwen: 128;
# Gemma 3: 256); other sizes stay on XLA.
ATTENTION_HEAD_DIMS = (64, 128, 256)

_SOURCE = Path(__file__).with_name("_cpu_kernel.cc")
_lock = threading.Lock()
_state: dict = {}  # "lib", "error", "enabled"


def _cache_dir() -> Path:
    root = os.environ.get("JAXDECODE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxdecode")
    return Path(root) / "kernels"


def _build() -> Path:
    """Compiles the kernel (once per source, jax version and machine) and returns the .so."""
    src = _SOURCE.read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") \
        or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-w", "-shared", "-fPIC",
             "-I", jax.ffi.include_dir()]
    tag = hashlib.sha256(src + " ".join([cxx, *flags, jax.__version__, _cpu_id()]).encode())
    out = _cache_dir() / f"jd_cpu_kernel_{tag.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        run = subprocess.run([cxx, *flags, str(_SOURCE), "-o", str(part)],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed: {run.stderr.strip()[-800:]}")
        os.replace(part, out)  # atomic: a concurrent build never loads a partial file
    return out


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return sys.platform


def _load():
    """Builds, loads and registers the kernel once; remembers the failure reason otherwise."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, error = None, None
        if os.environ.get("JAXDECODE_CPU_KERNEL", "1").strip() in ("0", "false", "no", "off"):
            error = "disabled by JAXDECODE_CPU_KERNEL"
        elif not sys.platform.startswith("linux"):
            error = f"only built on Linux (this is {sys.platform})"
        else:
            try:
                lib = ctypes.CDLL(str(_build()))
                for name in ("jd_matmul_f32", "jd_matmul_s8", "jd_causal_attention",
                             "jd_decode_attention"):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                                platform="cpu")
            except Exception as e:  # noqa: BLE001 - any failure means: use XLA's dot
                lib, error = None, f"{type(e).__name__}: {e}"
        _state["lib"], _state["error"] = lib, error
        return lib


def available() -> bool:
    """Whether the kernel is built and registered on this machine (builds it on first call)."""
    return _load() is not None


def build_error() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _state["error"]


def enabled() -> bool:
    """Whether matmuls traced from now on use the kernel on CPU (available and not turned off)."""
    return _state.get("enabled", True) and available()


def set_enabled(on: bool) -> None:
    """Turns the kernel on or off for matmuls traced afterwards (already compiled functions keep
    their choice: call ``jax.clear_caches()`` to retrace them)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_enabled: on must be a bool, got {on!r}")
    _state["enabled"] = on


def takes(x) -> bool:
    """Whether a product with operand ``x: [M, in]`` (float32, bfloat16 or int8) should run on
    the kernel: it is on and M is within ``MAX_ROWS`` for that dtype. Decided at trace time."""
    return x.shape[0] <= MAX_ROWS.get(jnp.dtype(x.dtype).name, 0) and enabled()


def _call(name, x, w, out_dtype, **attrs):
    """The ffi call for ``x: [M, in]``; under ``vmap`` a batch of ``x`` becomes more rows and a
    batch of ``w`` (an ensemble) runs one call per member."""
    @jax.custom_batching.custom_vmap
    def call(x, w):
        n = w.shape[-2] if attrs.get("transposed", True) else w.shape[-1]
        out = jax.ShapeDtypeStruct((x.shape[0], n), out_dtype)
        return jax.ffi.ffi_call(name, out)(x, w, **attrs)

    @call.def_vmap
    def _(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if w_batched:
            xs = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return jax.lax.map(lambda a: call(*a), (xs, w)), True
        y = call(x.reshape(-1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], y.shape[-1]), True

    return call(x, w)


def matmul_f32(x, w, *, transposed: bool):
    """float32 ``x @ w`` (``w: [in, out]``, or ``[out, in]`` with ``transposed``) for float32 or
    bfloat16 ``w``; ``x: [M, in]`` is rounded to ``w``'s dtype first (as XLA's bfloat16 dot
    does; the kernel multiplies bfloat16 pairs). CPU only: call it inside
    ``lax.platform_dependent``."""
    x = x.astype(w.dtype).astype(jnp.float32)
    return _call("jd_matmul_f32", x, w, jnp.float32, transposed=transposed)


def matmul_s8(x, w):
    """Exact int32 ``x @ w.T`` for ``x: int8[M, in]`` and ``w: int8[out, in]``. CPU only."""
    return _call("jd_matmul_s8", x, w, jnp.int32)


def takes_attention(q) -> bool:
    """Whether a prompt's causal self-attention with queries ``q: [B, T, H, hd]`` should run on
    the kernel: it is on and ``hd`` is one of ``ATTENTION_HEAD_DIMS``. Decided at trace time."""
    return q.shape[-1] in ATTENTION_HEAD_DIMS and enabled()


def causal_attention(q, k, v, window, *, scale: float):
    """float32 causal self-attention of positions ``0..T-1`` over themselves, as
    ``_common.causal_attention`` (no softcap): ``q: [B, T, H, hd]``, ``k, v: [B, T, KV, hd]``,
    ``window``: int32 scalar (0: none; else query t sees keys ``t - window < s <= t``).
    Returns float32 ``[B, T, H * hd]``. CPU only: call it inside ``lax.platform_dependent``.
    Under ``vmap`` a batch of q/k/v becomes more rows and a batch of windows maps."""
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    scale = np.float32(scale)

    @jax.custom_batching.custom_vmap
    def call(q, k, v, window):
        B, T, H, hd = q.shape
        out = jax.ShapeDtypeStruct((B, T, H * hd), jnp.float32)
        return jax.ffi.ffi_call("jd_causal_attention", out)(q, k, v, window, scale=scale)

    @call.def_vmap
    def _(axis_size, in_batched, q, k, v, window):
        full = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                for a, b in zip((q, k, v, window), in_batched)]
        if in_batched[3]:
            return jax.lax.map(lambda a: call(*a), tuple(full)), True
        q, k, v = (a.reshape(-1, *a.shape[2:]) for a in full[:3])
        y = call(q, k, v, window)
        return y.reshape(axis_size, -1, *y.shape[1:]), True

    return call(q, k, v, jnp.asarray(window, jnp.int32))


def decode_attention(q, kc, vc, layer, positions, window, kn, vn, *, scale: float):
    """float32 attention of one new position per row over layer ``layer`` of a KV cache, as the
    decode step's (see ``_decoder._cache_reader``; no softcap): ``q: [B, 1, H, hd]``;
    ``kc, vc: [L, B, KV, S, hd]`` (float32 or bfloat16); ``positions: int32[B, 1]``; row b sees
    slots ``max(0, p - window + 1) .. min(p, S) - 1`` (window 0: from slot 0) and then its own
    ``kn, vn: [B, 1, KV, hd]`` (in the cache's dtype, not yet written). Returns float32
    ``[B, 1, H * hd]``. CPU only. Under ``vmap`` each batch member is one call (``lax.map``)."""
    B, _, H, hd = q.shape
    scale = np.float32(scale)

    @jax.custom_batching.custom_vmap
    def call(q, kc, vc, kn, vn, positions, layer, window):
        out = jax.ShapeDtypeStruct((q.shape[0], q.shape[1] * q.shape[2]), jnp.float32)
        return jax.ffi.ffi_call("jd_decode_attention", out)(q, kc, vc, kn, vn, positions, layer, window,
                                                            scale=scale)

    @call.def_vmap
    def _(axis_size, in_batched, *args):
        def one(batched):
            it = iter(batched)
            return call(*[next(it) if b else a for a, b in zip(args, in_batched)])
        return jax.lax.map(one, [a for a, b in zip(args, in_batched) if b]), True

    y = call(q.astype(jnp.float32).reshape(B, H, hd), kc, vc, kn.reshape(B, -1, hd), vn.reshape(B, -1, hd),
             positions.reshape(B).astype(jnp.int32), jnp.asarray(layer, jnp.int32),
             jnp.asarray(window, jnp.int32))
    return y.reshape(B, 1, H * hd)
