"""What a model is, for every decoder: protocols, traced/static split, vocabulary probe,
context limit, default EOS ids, cache batch axes and the stateless-as-cached wrapper.

Two protocols (``docs/CONTRACTS.md``), told apart by attributes:

* KV-cached: ``init_cache(batch_size, max_length) -> cache`` and
  ``step(tokens[B, T], positions[B, T], cache) -> (logits[B, T, V], cache)``.
* Stateless: ``model(tokens[B, T]) -> logits[B, T, V]`` (causal).

Traced vs static (as equinox's ``partition``/``combine``): a model is flattened as a pytree;
its array leaves travel through ``jax.jit`` as traced arguments (new params of the same
shapes reuse the compiled computation) and everything else (the tree structure, Python
numbers, strings, functions) is static, hashed by value when hashable and by identity
otherwise. A model that is not a pytree at all (a plain function, a ``CachedModel`` of
closures) is one static leaf.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CachedModel", "StatelessAsCached", "as_cached", "split", "merge", "model_kind", "vocab_size",
           "context_limit", "default_eos_ids", "cache_batch_axes", "take_rows", "cached_step", "check_logits", "prefill"]


class CachedModel(NamedTuple):
    """Wraps two plain functions into the KV-cached model protocol.

    Attributes:
      init_cache: ``init_cache(batch_size: int, max_length: int) -> cache`` (any pytree).
      step: ``step(tokens int32[B, T], positions int32[B, T], cache) -> (logits [B, T, V], cache)``;
        causal by position (the query at position p sees cache slots 0..p only).

    The functions are static arguments of the compiled loop (hashed by identity): build the
    ``CachedModel`` once and reuse it, or every call compiles again. Params captured in the
    closures are compile-time constants; to swap params without recompiling, use a model
    object that is a pytree (its array leaves are traced).
    """

    init_cache: Callable[[int, int], Any]
    step: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# ---------------------------------------------------------------------------------------
# Traced / static split


class _Static:
    """A hashable wrapper for a static (non-array) value: by value when hashable, else by id."""

    __slots__ = ("obj", "_hash", "_by_value")

    def __init__(self, obj: Any):
        self.obj = obj
        try:
            self._hash, self._by_value = hash(obj), True
        except TypeError:
            self._hash, self._by_value = id(obj), False

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, _Static):
            return False
        if self.obj is other.obj:
            return True
        if not (self._by_value and other._by_value) or type(self.obj) is not type(other.obj):
            return False
        try:
            return bool(self.obj == other.obj)
        except Exception:  # e.g. an __eq__ that returns arrays
            return False

    def __repr__(self) -> str:
        return f"_Static({self.obj!r})"


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def split(model: Any) -> tuple[Any, tuple]:
    """``(static, arrays)``: a hashable static part and the tuple of array leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    if treedef.num_leaves == 1 and leaves[0] is model:
        return (_Static(None), _Static(model)), ()
    static = tuple(None if _is_array(l) else _Static(l) for l in leaves)
    return (_Static(treedef), static), tuple(l for l in leaves if _is_array(l))


def merge(static: Any, arrays: Sequence[Any]) -> Any:
    """The inverse of :func:`split` (inside jit, ``arrays`` are tracers)."""
    treedef, rest = static
    treedef = treedef.obj
    if treedef is None:
        return rest.obj
    it = iter(arrays)
    leaves = [next(it) if s is None else s.obj for s in rest]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------
# Protocols


def is_cached(model: Any) -> bool:
    return hasattr(model, "init_cache") and hasattr(model, "step")


def model_kind(fn: str, model: Any, name: str = "model") -> str:
    """``"cached"`` or ``"stateless"``; a TypeError naming ``fn`` for anything else."""
    if is_cached(model):
        return "cached"
    if callable(model):
        return "stateless"
    raise TypeError(
        f"{fn}: `{name}` must be callable as model(tokens[B, T]) -> logits[B, T, V] (stateless) or "
        f"have init_cache(batch_size, max_length) and step(tokens, positions, cache) (KV-cached, "
        f"see jaxdecode.CachedModel); got {type(model).__name__}."
    )


def check_logits(fn: str, logits: Any, batch: int, length: int, what: str, vocab: int | None = None) -> jax.Array:
    """Checks a model output is float ``[B, T, V]`` (at trace time)."""
    shape = tuple(getattr(logits, "shape", ()))
    v = "V" if vocab is None else str(vocab)
    if len(shape) != 3 or shape[:2] != (batch, length) or shape[2] < 1 or (vocab is not None and shape[2] != vocab):
        raise ValueError(
            f"{fn}: the model's {what} returned logits of shape {shape}; expected [B, T, V] = "
            f"[{batch}, {length}, {v}] for tokens of shape ({batch}, {length})."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{fn}: the model's {what} returned logits of dtype {logits.dtype}; expected a float dtype.")
    return logits


def cached_step(fn: str, model: Any, tokens, positions, cache, what: str, vocab: int | None = None):
    """``model.step`` with its output checked: ``(logits [B, T, V], cache)``."""
    out = model.step(tokens, positions, cache)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{fn}: the model's {what} must return (logits, cache), got {type(out).__name__}.")
    logits, cache = out
    return check_logits(fn, logits, tokens.shape[0], tokens.shape[1], what, vocab), cache


def prefill(fn: str, model: Any, tokens, cache, lengths, vocab: int | None = None):
    """The prompt pass into a fresh cache: ``(logits float32[B, V] at each row's last prompt
    position, cache)``.

    A model may offer the optional ``prefill(tokens[B, P], cache, last_index[B]) -> (logits[B,
    V], cache)`` (``jaxdecode.models.Llama`` does): the same as ``step`` at positions
    ``0..P-1`` read at ``last_index``, but free to use that the cache is empty (attention over
    the prompt alone, the LM head on one position per row). Otherwise ``step`` runs and its
    logits are read at ``lengths - 1``.
    """
    last = lengths - 1
    if callable(getattr(model, "prefill", None)):
        logits, cache = model.prefill(tokens, cache, last)
        check_logits(fn, logits[:, None], tokens.shape[0], 1, "prefill", vocab)
        return logits.astype(jnp.float32), cache
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out, cache = cached_step(fn, model, tokens, positions, cache, "step (prefill)", vocab)
    return jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0].astype(jnp.float32), cache


class StatelessAsCached(NamedTuple):
    """The KV-cached protocol for a stateless causal model ``model(tokens[B, T]) -> logits``.

    The "cache" is the token buffer ``int32[B, S]``; ``step`` writes its tokens at their
    positions and runs the model on the whole buffer, reading the logits at the query
    positions (causality makes the junk past them irrelevant). It costs a full forward pass
    per call, as the stateless protocol always does; the model must accept length S
    (prompt + new tokens). Being a NamedTuple, it is a pytree exactly when ``model`` is one,
    so the params stay traced through :func:`split`.
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
    return model if is_cached(model) else StatelessAsCached(model)


# ---------------------------------------------------------------------------------------
# What a model declares


def _config(model: Any) -> Any:
    inner = model.model if isinstance(model, StatelessAsCached) else model
    return getattr(inner, "config", None)


def context_limit(model: Any) -> int | None:
    """The model's context length (``model.config.max_seq_len``), or None when undeclared."""
    limit = getattr(_config(model), "max_seq_len", None)
    return int(limit) if isinstance(limit, (int, np.integer)) and not isinstance(limit, bool) else None


def default_eos_ids(model: Any) -> tuple[int, ...]:
    """The EOS ids the model declares (``model.config.eos_ids``), as Hugging Face's generation
    config does; ``()`` when it declares none."""
    ids = getattr(_config(model), "eos_ids", None) or ()
    try:
        return tuple(int(i) for i in ids)
    except TypeError:
        return (int(ids),)


_VOCAB_MEMO: "collections.OrderedDict[Any, int]" = collections.OrderedDict()


def vocab_size(fn: str, static: Any, arrays: tuple, kind: str, batch: int, prompt_len: int, window: int) -> int:
    """The model's vocabulary size, from abstract evaluation of its first call (memoized;
    ``jax.eval_shape`` costs no computation and no memory)."""
    avals = tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in arrays)
    memo_key = (static, tuple((a.shape, str(a.dtype)) for a in avals), kind, batch, prompt_len, window)
    if memo_key in _VOCAB_MEMO:
        _VOCAB_MEMO.move_to_end(memo_key)
        return _VOCAB_MEMO[memo_key]

    def probe(arrays):
        model = merge(static, arrays)
        if kind == "cached":
            cache = model.init_cache(batch, window)
            tokens = jnp.zeros((batch, prompt_len), jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
            return cached_step(fn, model, tokens, positions, cache, "step (prefill)")[0]
        return check_logits(fn, model(jnp.zeros((batch, window), jnp.int32)), batch, window, "call model(tokens)")

    vocab = int(jax.eval_shape(probe, avals).shape[-1])
    _VOCAB_MEMO[memo_key] = vocab
    if len(_VOCAB_MEMO) > 64:
        _VOCAB_MEMO.popitem(last=False)
    return vocab


# ---------------------------------------------------------------------------------------
# Cache rows: beam search reorders them, num_samples broadcasts a prefilled row


def cache_batch_axes(init_cache: Callable[[int, int], Any], max_length: int) -> Any:
    """A pytree (like the cache) of each leaf's batch axis, or None when it has none.

    Models do not declare it, so it is found from shapes alone: ``jax.eval_shape`` of
    ``init_cache`` at two batch sizes; the axis whose size changes is the batch axis.
    """
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
