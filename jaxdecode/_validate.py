"""Eager argument checking shared by the public functions.

Every public entry point checks concrete (non-traced) values before tracing, so a bad
argument gets a ``ValueError``/``TypeError`` naming the function, the argument, the
value received and what is allowed, instead of a silent wrong answer or an XLA
traceback. Traced values (inside a user's ``jax.jit``) cannot be checked; the
functions document what they do with out-of-range traced values (they clip).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when ``x``'s value can be read on the host now (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_float_logits(fn: str, logits: Any, name: str = "logits") -> jax.Array:
    """Returns ``logits`` as a JAX array after checking it is floating point with ndim >= 1."""
    if not hasattr(logits, "dtype"):
        logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: `{name}` must be a floating-point array (float32/bfloat16/float16), "
            f"got dtype {logits.dtype}. Cast with `{name}.astype(jnp.float32)`."
        )
    if logits.ndim < 1:
        raise ValueError(
            f"{fn}: `{name}` must have shape [..., vocab] with ndim >= 1, got shape {tuple(logits.shape)}."
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{fn}: `{name}` has an empty vocabulary axis (shape {tuple(logits.shape)}).")
    return jnp.asarray(logits)


def _describe(value: Any) -> str:
    arr = np.asarray(value)
    if arr.size == 1:
        return repr(arr.reshape(()).item())
    return f"array of shape {arr.shape} (min {arr.min()!r}, max {arr.max()!r})"


def check_knob(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allowed: str,
) -> None:
    """Checks a concrete knob value (scalar or array) lies in the allowed range.

    Tracers are skipped: their values are unknown until run time.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{fn}: `{name}` must be a number or numeric array, got {value!r}. Allowed: {allowed}.")
    if integer and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise TypeError(f"{fn}: `{name}` must be an integer, got {_describe(arr)}. Allowed: {allowed}.")
    if arr.dtype.kind == "f" and np.any(np.isnan(arr)):
        raise ValueError(f"{fn}: `{name}` must not be NaN, got {_describe(arr)}. Allowed: {allowed}.")
    bad = np.zeros(arr.shape, bool)
    if low is not None:
        bad |= (arr <= low) if low_open else (arr < low)
    if high is not None:
        bad |= (arr >= high) if high_open else (arr > high)
    if np.any(bad):
        shown = arr[bad].reshape(-1)[0].item()
        where = "" if arr.ndim == 0 else f" (first bad entry {shown!r})"
        raise ValueError(f"{fn}: `{name}` got {_describe(arr)}{where}; allowed: {allowed}.")


def broadcast_knob(fn: str, name: str, value: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Broadcasts a knob to ``shape`` (the batch shape), with a clear error when it can't."""
    vshape = tuple(np.shape(value))
    try:
        np.broadcast_shapes(vshape, shape)
        if np.broadcast_shapes(vshape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{fn}: `{name}` has shape {vshape}, which does not broadcast to the batch shape "
            f"{tuple(shape)} (logits.shape[:-1]). Pass a scalar or an array of shape {tuple(shape)}."
        ) from None
    if is_concrete(value) and not isinstance(value, jax.Array):
        # Host-side broadcast keeps the jitted function's input shape fixed (no recompiles
        # whether the user passes a Python number or a per-row array).
        return jnp.asarray(np.broadcast_to(np.asarray(value, dtype=dtype), shape))
    return jnp.broadcast_to(jnp.asarray(value, dtype=dtype), shape)


def check_key(fn: str, key: Any, batch_shape: tuple[int, ...] | None = None) -> tuple[jax.Array, bool]:
    """Checks a PRNG key argument; returns (typed key array, per_row).

    Accepts a typed key (``jax.random.key``) or a raw ``uint32[2]`` key (``jax.random.PRNGKey``),
    either one key, or one key per row with shape ``batch_shape``.
    """
    if key is None:
        raise ValueError(
            f"{fn}: `key` is None, but sampling needs a PRNG key. Pass `key=jax.random.key(0)` "
            f"(or use temperature=0 for greedy decoding)."
        )
    if not hasattr(key, "dtype"):
        raise TypeError(f"{fn}: `key` must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__}.")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
        typed = jax.random.wrap_key_data(key)
    else:
        raise TypeError(
            f"{fn}: `key` must be a JAX PRNG key: a typed key from jax.random.key(seed) or a raw "
            f"uint32[2] key from jax.random.PRNGKey(seed); got dtype {key.dtype} with shape {tuple(key.shape)}."
        )
    if typed.shape == ():
        return typed, False
    if batch_shape is not None and tuple(typed.shape) == tuple(batch_shape):
        return typed, True
    expected = "()" if batch_shape is None else f"() or {tuple(batch_shape)} (one key per row)"
    raise ValueError(
        f"{fn}: `key` must be a single key (key shape {expected}), got a key array of shape "
        f"{tuple(typed.shape)}. Split keys with jax.random.split(key, n) to get one per row."
    )
