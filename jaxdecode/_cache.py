"""Row operations on a model's KV cache, whatever pytree the model uses.

Beam search reorders cache rows by beam each step, and several samples per prompt broadcast
one prefilled row to many. Both need each leaf's batch axis. Models do not declare it, so we
find it from shapes alone: ``jax.eval_shape`` of ``init_cache`` at two batch sizes (no
computation, no memory); the axis whose size changes is the batch axis. Leaves whose shape
does not depend on the batch (e.g. a shared step counter) are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable

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
