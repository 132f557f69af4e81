"""jit for functions whose model arguments may be pytrees of params or opaque callables.

A model that flattens to arrays only (a registered dataclass of params, an NNX module, ...)
travels through ``jit`` as a traced argument: new params of the same shapes reuse the
compiled computation. Any other model object (a plain function, a NamedTuple of functions)
is a static argument, hashed by identity; a new object compiles anew.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import numpy as np


def is_pytree_model(model: Any) -> bool:
    """True when ``model`` flattens to arrays only."""
    if model is None:
        return False
    leaves = jax.tree_util.tree_leaves(model)
    return bool(leaves) and not (len(leaves) == 1 and leaves[0] is model) and all(
        isinstance(x, (jax.Array, np.ndarray)) for x in leaves
    )


def model_jit(fn: Callable, model_argnums: Sequence[int], static_argnames: Sequence[str] = ()) -> Callable:
    """``jax.jit(fn)`` where each of ``model_argnums`` is traced if a pytree model, else static."""
    variants: dict[tuple[int, ...], Callable] = {}
    # Static names that can also be passed positionally: jit needs them as argnums too.
    params = [
        n for n, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    named_nums = tuple(params.index(n) for n in static_argnames if n in params and params.index(n) not in model_argnums)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        static = tuple(i for i in model_argnums if not is_pytree_model(args[i]))
        if static not in variants:
            variants[static] = jax.jit(fn, static_argnums=static + named_nums, static_argnames=tuple(static_argnames))
        return variants[static](*args, **kwargs)

    call.variants = variants  # for tests that count compilations
    return call
