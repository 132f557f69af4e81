"""Eager argument checking shared by the public functions.

Every public entry point checks concrete (non-traced) values before tracing, so a bad
argument gets a ``ValueError``/``TypeError`` naming the function, the argument, the
value received and what is allowed, instead of a silent wrong answer or an XLA
traceback. Traced values (inside a user's ``jax.jit``) cannot be checked; the
functions document what they do with out-of-range traced values (they clip).
"""

from __future__ import annotations

import operator
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


# ---------------------------------------------------------------------------------------
# Counts, token ids, prompts and limits: the checks every decoder shares. Each takes the
# public function's name first so that one bad value reads the same from every entry point.


def as_int(fn: str, name: str, value: Any, allowed: str) -> int:
    """``value`` as a Python int; TypeError for bools, floats and non-numbers."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: `{name}` must be an int, got {value!r}. Allowed: {allowed}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{fn}: `{name}` must be an int, got {value!r} ({type(value).__name__}). Allowed: {allowed}."
        ) from None


def check_count(fn: str, name: str, value: Any, minimum: int = 1, what: str = "") -> int:
    """An int >= ``minimum`` (TypeError when not an int, ValueError when too small)."""
    allowed = f"an int >= {minimum}" + (f" ({what})" if what else "")
    n = as_int(fn, name, value, allowed)
    if n < minimum:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}{' (' + what + ')' if what else ''}, got {n}.")
    return n


def check_at_most(fn: str, name: str, value: int, limit: int, what: str) -> None:
    """``value <= limit`` or a ValueError naming both and what the limit is."""
    if value > limit:
        raise ValueError(f"{fn}: `{name}` must be <= {what} ({limit}), got {value}.")


def check_token_id(fn: str, name: str, value: Any, vocab: int, why: str = "") -> int:
    """One concrete token id in ``[0, vocab)`` (e.g. ``pad_id``)."""
    allowed = f"a token id in [0, {vocab})"
    t = as_int(fn, name, value, allowed)
    if not 0 <= t < vocab:
        raise ValueError(f"{fn}: `{name}` must be {allowed}{why}, got {t}.")
    return t


def token_ids(fn: str, name: str, value: Any, vocab: int) -> jax.Array:
    """One id or a list of ids as int32[E], each checked to lie in ``[0, vocab)`` when concrete."""
    if not is_concrete(value) or (isinstance(value, (list, tuple)) and any(not is_concrete(v) for v in value)):
        return jnp.asarray(value).reshape(-1).astype(jnp.int32)
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype == bool or arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(f"{fn}: `{name}` must be a token id or a list of token ids, got {value!r}.")
    arr = arr.reshape(-1).astype(np.int64)
    bad = (arr < 0) | (arr >= vocab)
    if bad.any():
        raise ValueError(f"{fn}: `{name}` got {arr.tolist()}; each id must be in [0, {vocab}) "
                         f"(the model's vocabulary), bad id {arr[bad][0].item()}.")
    return jnp.asarray(arr.astype(np.int32))


def check_prompt(fn: str, prompt: Any) -> jax.Array:
    """A rectangular integer prompt ``[batch, prompt_len]`` as int32."""
    if not hasattr(prompt, "dtype"):
        try:
            prompt = np.asarray(prompt)
        except ValueError:
            raise ValueError(f"{fn}: `prompt` must be a rectangular int array [batch, prompt_len]; pad ragged "
                             f"prompts and pass `prompt_lengths`.") from None
    if prompt.dtype == bool or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"{fn}: `prompt` must hold integer token ids, got dtype {prompt.dtype}.")
    if prompt.ndim != 2:
        raise ValueError(
            f"{fn}: `prompt` must have shape [batch, prompt_len], got shape {tuple(prompt.shape)}"
            + (" (use prompt[None] for a single prompt)." if prompt.ndim == 1 else ".")
        )
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"{fn}: `prompt` must have at least one row and one token, got shape {tuple(prompt.shape)}.")
    if is_concrete(prompt) and not isinstance(prompt, jax.Array):
        return jnp.asarray(np.asarray(prompt, np.int32))
    return jnp.asarray(prompt).astype(jnp.int32)


def check_prompt_lengths(fn: str, prompt_lengths: Any, b: int, p: int) -> jax.Array:
    """int32[b] real prompt lengths in ``[1, p]`` (default: all ``p``)."""
    if prompt_lengths is None:
        return jnp.asarray(np.full((b,), p, np.int32))
    if not hasattr(prompt_lengths, "dtype"):
        prompt_lengths = np.asarray(prompt_lengths)
    if tuple(prompt_lengths.shape) != (b,):
        raise ValueError(f"{fn}: `prompt_lengths` must have shape ({b},) (one length per prompt row), "
                         f"got shape {tuple(prompt_lengths.shape)}.")
    if prompt_lengths.dtype == bool or not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
        raise TypeError(f"{fn}: `prompt_lengths` must be integers, got dtype {prompt_lengths.dtype}.")
    if is_concrete(prompt_lengths):
        arr = np.asarray(prompt_lengths)
        bad = (arr < 1) | (arr > p)
        if bad.any():
            raise ValueError(f"{fn}: `prompt_lengths` must be in [1, {p}] (the prompt's padded length), got "
                             f"{arr.tolist()} (bad entry {arr[bad][0].item()!r} at row {int(np.argmax(bad))}).")
        if not isinstance(prompt_lengths, jax.Array):
            return jnp.asarray(arr.astype(np.int32))
    return jnp.asarray(prompt_lengths).astype(jnp.int32)


def check_prompt_ids(fn: str, prompt: jax.Array, lengths: jax.Array, vocab: int) -> None:
    """Real prompt tokens (padding excluded) must lie in [0, V), when their values are readable."""
    if not all(is_concrete(x) and getattr(x, "is_fully_addressable", True) for x in (prompt, lengths)):
        return
    ids = np.asarray(prompt)
    bad = (np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]) & ((ids < 0) | (ids >= vocab))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{fn}: `prompt` has token id {ids[row, col]} at [{row}, {col}], outside the model's "
                         f"vocabulary [0, {vocab}).")


def check_context(fn: str, prompt_len: int, max_new_tokens: int, limit: int | None, what: str) -> None:
    """Prompt plus new tokens must fit the model's context (``what`` names where the limit is from)."""
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"{fn}: the prompt length ({prompt_len}) + `max_new_tokens` ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's context of {limit} tokens ({what}). "
            f"Shorten the prompt or lower `max_new_tokens` to at most {max(limit - prompt_len, 0)}."
        )


_DUMMY_KEYS: dict[int, jax.Array] = {}


def row_keys(fn: str, key: Any, temperature: Any, b: int) -> jax.Array:
    """One PRNG key per row: ``key`` split into ``b``, or ``key`` itself when it is ``[b]``.

    ``key=None`` is allowed only when every (concrete) temperature is 0: greedy rows never
    read their uniforms, so a fixed dummy key keeps the compiled computation the same.
    """
    if key is None:
        if not is_concrete(temperature):
            raise ValueError(f"{fn}: `key` is None and `temperature` is traced, so sampling may be needed. "
                             f"Pass key=jax.random.key(0) (or a concrete temperature=0 for greedy decoding).")
        t = np.asarray(temperature, np.float64)
        if np.any(t > 0):
            shown = t.reshape(-1)[np.argmax(t.reshape(-1) > 0)].item()
            raise ValueError(
                f"{fn}: `key` is None but temperature={shown!r} > 0 samples. Pass key=jax.random.key(0) "
                f"(any seed; or one key per row), or temperature=0 for greedy decoding."
            )
        if b not in _DUMMY_KEYS:
            with jax.ensure_compile_time_eval():  # concrete even inside a user's jit: no leaked tracer
                _DUMMY_KEYS[b] = jax.random.split(jax.random.key(0), b)
        return _DUMMY_KEYS[b]
    typed, per_row = check_key(fn, key, (b,))
    return typed if per_row else jax.random.split(typed, b)
