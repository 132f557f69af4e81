"""Row operations on a model's KV cache, whatever pytree the model uses.

Beam search reorders cache rows by beam each step, and several samples per prompt broadcast
one prefilled row to many. Both need each leaf's batch axis. Models do not declare it, so we
find it from shapes alone: ``jax.eval_shape`` of ``init_cache`` at two batch sizes (no
computation, no memory); the axis whose size changes is the batch axis. Leaves whose shape
does not depend on the batch (e.g. a shared step counter) are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


def cache_batch_axes(init_cache: Callable[[int, int], Any], max_length: int) -> Any:
    """A pytree (like the cache) of each leaf's batch axis, or None when it has none."""
    a = jax.eval_shape(lambda: init_cache(2, max_length))
    b = jax.eval_shape(lambda: init_cache(3, max_length))

    def axis(x, y):
        diff = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
        if len(x.shape) != len(y.shape) or len(diff) > 1:
            raise ValueError(
                f"init_cache: could not find the batch axis of a cache leaf: shape {x.shape} at batch 2 "
                f"vs {y.shape} at batch 3. Each cache leaf needs exactly one axis of size batch_size."
            )
        return diff[0] if diff else None

    return jax.tree.map(axis, a, b)


def take_rows(cache: Any, axes: Any, rows: jax.Array) -> Any:
    """Gathers ``rows`` (int32[N]) along each leaf's batch axis (reorder, repeat or select)."""

    def take(x, ax):
        return x if ax is None else jnp.take(x, rows, axis=ax)

    return jax.tree.map(take, cache, axes, is_leaf=lambda v: v is None)


class StatelessAsCached(NamedTuple):
    """The KV-cached protocol for a stateless causal model ``model(tokens[B, T]) -> logits``.

    The "cache" is the token buffer ``int32[B, S]``; ``step`` writes its tokens at their
    positions and runs the model on the whole buffer, reading the logits at the query
    positions (causality makes the junk past them irrelevant). It costs a full forward pass
    per call, as the stateless protocol always does; the model must accept length S
    (prompt + new tokens). Being a NamedTuple, it is a pytree exactly when ``model`` is one,
    so params stay traced through ``model_jit``.
    """

    model: Any

    def init_cache(self, batch_size: int, max_length: int) -> jax.Array:
        return jnp.zeros((batch_size, max_length), jnp.int32)

    def step(self, tokens: jax.Array, positions: jax.Array, cache: jax.Array):
        rows = jnp.arange(tokens.shape[0])[:, None]
        cache = cache.at[rows, positions].set(tokens, mode="drop")
        full = self.model(cache)
        b, s = cache.shape
        if getattr(full, "ndim", 0) != 3 or tuple(full.shape[:2]) != (b, s):
            raise ValueError(
                f"model(tokens) returned logits of shape {tuple(getattr(full, 'shape', ()))}; expected "
                f"[B, T, V] = [{b}, {s}, V] for tokens of shape ({b}, {s})."
            )
        idx = jnp.clip(positions, 0, cache.shape[1] - 1)[:, :, None]
        return jnp.take_along_axis(full, idx, axis=1), cache


def as_cached(model: Any) -> Any:
    """``model`` itself if it has the KV-cached protocol, else a :class:`StatelessAsCached`."""
    if hasattr(model, "init_cache") and hasattr(model, "step"):
        return model
    if callable(model):
        return StatelessAsCached(model)
    return model
