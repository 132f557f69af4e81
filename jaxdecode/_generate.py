"""Autoregressive generation as one compiled JAX computation: :func:`generate` and
:func:`generate_stream`.

Design (see ``docs/CONTRACTS.md`` for the two model protocols):

* The whole call is one ``jax.jit`` computation: a prefill, then ``lax.scan`` over
  ``max_new_tokens`` steps on a fixed token buffer ``[B, P + max_new_tokens]``. The loop carry
  is the small :class:`LoopState`.
* Static (a change recompiles): ``max_new_tokens``, every shape (batch, prompt length, vocab),
  the model's structure (or the model itself when it is not a pytree), ``context_size``, the
  number of EOS ids, the stop-sequence array shape, whether a logit bias is given, and the
  user processors. Traced (a change never recompiles): every sampling knob and penalty, the
  key(s), EOS and stop-sequence ids, ``min_new_tokens``, ``pad_id``, the prompt content,
  ``prompt_lengths`` and the model's array leaves (its params).
* Each step: repetition penalty (prompt + generated tokens) -> frequency/presence penalties
  (generated tokens) -> logit bias -> EOS ban before ``min_new_tokens`` -> user processors ->
  :func:`jaxdecode._sampling.draw` with one uniform per row, ``uniform(fold_in(row_key, step))``.
  Then the token is written, finished rows (EOS or stop sequence) are marked, and the model
  is run for the next token's logits, skipped by ``lax.cond`` once every row is done.
"""

from __future__ import annotations

import collections
import functools
import operator
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _cache
from . import _validate as V
from ._processors import DecodeContext, LogitsProcessor, apply_frequency_presence_penalty, apply_repetition_penalty
from ._processors import chain as _chain
from ._sampling import SamplingKnobs, draw, make_knobs

__all__ = ["CachedModel", "GenerateOutput", "StreamChunk", "LoopState", "generate", "generate_stream"]

_FN = "jaxdecode.generate"
_FN_STREAM = "jaxdecode.generate_stream"


# ---------------------------------------------------------------------------------------
# Public containers


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


class GenerateOutput(NamedTuple):
    """Result of :func:`generate` (N = ``max_new_tokens``, P = padded prompt length).

    Attributes:
      tokens: int32[B, P + N]. Each row's real prompt tokens, then its generated tokens
        (starting at index ``prompt_lengths[b]``), then ``pad_id`` in every remaining slot.
      lengths: int32[B]. Valid tokens per row, prompt included (EOS / stop tokens included).
      logprobs: float32[B, N]. Log-probability of each generated token under the distribution
        it was drawn from (after penalties, processors, temperature and truncation; for greedy
        rows the log-softmax after penalties at temperature 1); 0 after the row finished.
      raw_logprobs: float32[B, N]. The model's own log-softmax of its raw logits at the chosen
        token; 0 after the row finished.
      num_generated: int32[B]. Generated tokens per row (``lengths - prompt_lengths``).
      top_ids: int32[B, N, n] or None. With ``top_logprobs=n``: the n most likely tokens at
        each step under the model's raw log-softmax (as the OpenAI API's ``top_logprobs``),
        best first; ``pad_id`` after the row finished.
      top_logprobs: float32[B, N, n] or None. Their raw log-probabilities (0 after the end).
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    num_generated: jax.Array
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


class StreamChunk(NamedTuple):
    """One chunk yielded by :func:`generate_stream` (c <= chunk_size steps).

    Attributes:
      tokens: int32[B, c]. The tokens generated in these steps (``pad_id`` for finished rows).
      logprobs: float32[B, c]. As :attr:`GenerateOutput.logprobs` for these steps.
      done: bool[B]. Whether each row has finished (EOS / stop sequence) by the chunk's end.
    """

    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array


class LoopState(NamedTuple):
    """The carry of the decode loop (B rows, L = P + N buffer slots, V vocabulary).

    Attributes:
      tokens: int32[B, L]. Fixed token buffer: row b's real tokens in ``[0, lengths[b])``
        (prompt, then generated), ``pad_id`` after.
      lengths: int32[B]. Number of real tokens per row (prompt + generated so far).
      done: bool[B]. The row hit EOS or a stop sequence; it generates nothing more.
      logits: float32[B, V]. The model's raw logits for each row's next token (read at the
        row's last real token).
      cache: the model's KV cache pytree (KV-cached protocol; ``()`` for stateless models).
      context: :class:`jaxdecode.DecodeContext` — ``token_counts`` int32[B, V] (generated
        tokens), ``prompt_mask`` bool[B, V] (prompt tokens), ``step`` int32[B] (tokens
        generated so far per row, i.e. the output's ``num_generated``).
      proc_state: the user processors' state pytree (``()`` when there are none).
    """

    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    logits: jax.Array
    cache: Any
    context: DecodeContext
    proc_state: Any


class _Settings(NamedTuple):
    """Traced per-call settings (B rows, V vocab). Optional fields are None when unused."""

    keys: jax.Array  # key[B]: one PRNG key per row
    knobs: SamplingKnobs  # each [B]
    repetition_penalty: jax.Array  # float32[B]
    frequency_penalty: jax.Array  # float32[B]
    presence_penalty: jax.Array  # float32[B]
    logit_bias: Any  # float32[V] or [B, V], or None
    eos_ids: Any  # int32[E], or None
    min_new_tokens: jax.Array  # int32[B]
    stop_seqs: Any  # int32[S, M] right-aligned, or None
    stop_lens: Any  # int32[S], or None
    pad_id: jax.Array  # int32[]


class _StepOut(NamedTuple):
    tokens: jax.Array  # int32[B]
    logprobs: jax.Array  # float32[B]
    raw_logprobs: jax.Array  # float32[B]
    top: Any  # (int32[B, n], float32[B, n]) with top_logprobs=n, else ()


# ---------------------------------------------------------------------------------------
# Model handling: pytree params are traced, everything else is static


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


def _split_model(model: Any) -> tuple[Any, tuple]:
    """(static part, array leaves). A non-pytree model is all static."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    if treedef.num_leaves == 1 and leaves[0] is model:
        return (_Static(None), _Static(model)), ()
    static = tuple(None if _is_array(l) else _Static(l) for l in leaves)
    return (_Static(treedef), static), tuple(l for l in leaves if _is_array(l))


def _merge_model(static: Any, arrays: Sequence[Any]) -> Any:
    treedef, rest = static
    treedef = treedef.obj
    if treedef is None:
        return rest.obj
    it = iter(arrays)
    leaves = [next(it) if s is None else s.obj for s in rest]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _model_kind(model: Any, fn: str) -> str:
    if hasattr(model, "init_cache") and hasattr(model, "step"):
        return "cached"
    if callable(model):
        return "stateless"
    raise TypeError(
        f"{fn}: `model` must be callable as model(tokens[B, T]) -> logits[B, T, V] (stateless) or "
        f"have init_cache(batch_size, max_length) and step(tokens, positions, cache) (KV-cached, "
        f"see jaxdecode.CachedModel); got {type(model).__name__}."
    )


def _check_logits(logits: Any, batch: int, length: int, what: str, vocab: int | None = None) -> jax.Array:
    """Checks a model output is [B, T, V] floating point (at trace time)."""
    shape = tuple(getattr(logits, "shape", ()))
    v = "V" if vocab is None else str(vocab)
    if len(shape) != 3 or shape[:2] != (batch, length) or shape[2] < 1 or (vocab is not None and shape[2] != vocab):
        raise ValueError(
            f"{_FN}: the model's {what} returned logits of shape {shape}; expected [B, T, V] = "
            f"[{batch}, {length}, {v}] for tokens of shape ({batch}, {length})."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{_FN}: the model's {what} returned logits of dtype {logits.dtype}; expected a float dtype.")
    return logits


def _cached_step(model, tokens, positions, cache, what, vocab=None):
    out = model.step(tokens, positions, cache)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{_FN}: the model's {what} must return (logits, cache), got {type(out).__name__}.")
    logits, cache = out
    return _check_logits(logits, tokens.shape[0], tokens.shape[1], what, vocab), cache


class _Config(NamedTuple):
    """Static configuration of one compiled loop."""

    model: Any  # _split_model's static part
    kind: str  # "cached" | "stateless"
    batch: int
    prompt_len: int
    max_new: int
    window: int  # stateless: fixed window length; cached: cache length
    vocab: int
    processors: Any  # _Static(tuple of LogitsProcessor) or None
    num_samples: int = 1  # output rows per prompt row (batch = prompt rows * num_samples)
    num_top: int = 0  # top_logprobs alternatives per step


# ---------------------------------------------------------------------------------------
# The loop


def _stateless_logits(cfg: _Config, model, tokens, lengths):
    """Logits for each row's next token from a window of the buffer (the seed's idx[:, -C:])."""
    w = cfg.window
    start = jnp.maximum(lengths - w, 0)
    window = jax.vmap(lambda row, s: lax.dynamic_slice(row, (s,), (w,)))(tokens, start)
    out = _check_logits(model(window), cfg.batch, w, "call model(tokens)", cfg.vocab)
    idx = (lengths - 1 - start)[:, None, None]
    return jnp.take_along_axis(out, idx, axis=1)[:, 0].astype(jnp.float32)


def _init(cfg: _Config, model, prompt, prompt_lengths, settings: _Settings) -> LoopState:
    """Prefill. With ``num_samples`` > 1 each prompt row is prefilled once and its cache,
    logits and buffer are then repeated for its samples (rows ``r * num_samples + s``)."""
    p, n, ns = cfg.prompt_len, cfg.max_new, cfg.num_samples
    b0 = prompt.shape[0]
    pad = settings.pad_id
    slots = jnp.arange(p + n, dtype=jnp.int32)[None, :]
    buf = jnp.concatenate([prompt.astype(jnp.int32), jnp.zeros((b0, n), jnp.int32)], axis=1)
    buf = jnp.where(slots < prompt_lengths[:, None], buf, pad)
    rows = jnp.repeat(jnp.arange(b0), ns)
    if cfg.kind == "cached":
        cache = model.init_cache(b0, cfg.window)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b0, p))
        out, cache = _cached_step(model, buf[:, :p], positions, cache, "step (prefill)", cfg.vocab)
        logits = jnp.take_along_axis(out, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
        if ns > 1:
            cache = _cache.take_rows(cache, _cache.cache_batch_axes(model.init_cache, cfg.window), rows)
            logits = logits[rows]
    else:
        cache = ()
        logits = _stateless_logits(cfg._replace(batch=b0), model, buf, prompt_lengths)
        logits = logits[rows] if ns > 1 else logits
    if ns > 1:
        buf, prompt_lengths = buf[rows], prompt_lengths[rows]
    b = cfg.batch
    ctx = DecodeContext.from_prompt(buf[:, :p], cfg.vocab, prompt_lengths)
    proc_state = () if cfg.processors is None else _processor(cfg).init(ctx)
    return LoopState(
        tokens=buf,
        lengths=prompt_lengths,
        done=jnp.zeros((b,), bool),
        logits=logits.astype(jnp.float32),
        cache=cache,
        context=ctx,
        proc_state=proc_state,
    )


def _processor(cfg: _Config) -> LogitsProcessor:
    procs = cfg.processors.obj
    return procs[0] if len(procs) == 1 else _chain(*procs)


def _stop_match(tokens, lengths, generated, seqs, seq_lens):
    """bool[B]: the row's last generated tokens equal one of the (right-aligned) stop sequences."""
    m = seqs.shape[1]
    pos = lengths[:, None] - m + jnp.arange(m, dtype=jnp.int32)[None, :]
    tail = jnp.take_along_axis(tokens, jnp.clip(pos, 0, tokens.shape[1] - 1), axis=1)  # [B, M]
    used = jnp.arange(m, dtype=jnp.int32)[None, :] >= (m - seq_lens)[:, None]  # [S, M]
    eq = (tail[:, None, :] == seqs[None]) | ~used[None]  # [B, S, M]
    return jnp.any(jnp.all(eq, axis=-1) & (generated[:, None] >= seq_lens[None, :]), axis=-1)


def _process_logits(cfg: _Config, settings: _Settings, raw: jax.Array, ctx: DecodeContext, proc_state):
    """Penalties, bias, EOS ban and user processors (vLLM order). Returns (logits, proc_state)."""
    seen = ctx.prompt_mask | (ctx.token_counts > 0)
    l = apply_repetition_penalty(raw, seen, settings.repetition_penalty)
    l = apply_frequency_presence_penalty(l, ctx.token_counts, settings.frequency_penalty, settings.presence_penalty)
    if settings.logit_bias is not None:
        l = l + settings.logit_bias
    if settings.eos_ids is not None:
        eos_mask = jnp.zeros((cfg.vocab,), bool).at[settings.eos_ids].set(True, mode="drop")
        early = (ctx.step < settings.min_new_tokens)[:, None]
        l = jnp.where(early & eos_mask[None, :], -jnp.inf, l)
    if cfg.processors is not None:
        l, proc_state = _processor(cfg).update(l, proc_state, ctx)
        l = l.astype(jnp.float32)
    return l, proc_state


def _step(cfg: _Config, model, settings: _Settings, state: LoopState, i: jax.Array):
    """One decode step (global step index ``i``): draw, write, mark finished, next logits.

    Two ``lax.cond`` skip the work once every row is done (or past ``max_new_tokens`` in a
    stream's last chunk): one around the sampler, one around the model call. Neither wraps
    the KV cache together with the rest of the step: a cond that does makes XLA copy the
    whole cache every step.
    """
    b, n = cfg.batch, cfg.max_new
    idle = jnp.all(state.done) | (i >= n)

    def sample(operand):
        raw, ctx, proc_state = operand
        logits, proc_state = _process_logits(cfg, settings, raw, ctx, proc_state)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, i), (), jnp.float32))(settings.keys)
        ids, lp = draw(u, logits, settings.knobs)
        raw_all = jax.nn.log_softmax(raw, axis=-1)
        raw_lp = jnp.take_along_axis(raw_all, ids[:, None], axis=1)[:, 0]
        top = ()
        if cfg.num_top:  # barrier: keeps XLA:CPU's fast TopK (see _sampling._candidate_draw)
            top_lp, top_ids = lax.optimization_barrier(lax.top_k(raw_all, cfg.num_top))
            top = (top_ids.astype(jnp.int32), top_lp)
        return ids, lp, raw_lp, top, proc_state

    def no_sample(operand):
        zero = jnp.zeros((b,), jnp.float32)
        top = ()
        if cfg.num_top:
            top = (jnp.zeros((b, cfg.num_top), jnp.int32), jnp.zeros((b, cfg.num_top), jnp.float32))
        return jnp.zeros((b,), jnp.int32), zero, zero, top, operand[2]

    ids, lp, raw_lp, top, proc_state = lax.cond(
        idle, no_sample, sample, (state.logits, state.context, state.proc_state))
    active = ~state.done & (i < n)

    rows = jnp.arange(b)
    slot = jnp.where(active, state.lengths, state.tokens.shape[1])  # out of range: dropped
    tokens = state.tokens.at[rows, slot].set(ids, mode="drop")
    lengths = state.lengths + active.astype(jnp.int32)
    ctx = state.context.advance(ids, active)
    hit = jnp.zeros((b,), bool)
    if settings.eos_ids is not None:
        hit |= jnp.any(ids[:, None] == settings.eos_ids[None, :], axis=-1)
    if settings.stop_seqs is not None:
        hit |= _stop_match(tokens, lengths, ctx.step, settings.stop_seqs, settings.stop_lens)
    done = state.done | (active & hit)

    def run_model(operand):
        tokens, lengths, ids, cache, _ = operand
        if cfg.kind == "cached":
            out, cache = _cached_step(model, ids[:, None], (lengths - 1)[:, None], cache, "step (decode)", cfg.vocab)
            return out[:, 0].astype(jnp.float32), cache
        return _stateless_logits(cfg, model, tokens, lengths), cache

    def skip_model(operand):
        return operand[4], operand[3]

    need = ~jnp.all(done) & (i < n - 1)
    next_logits, cache = lax.cond(need, run_model, skip_model, (tokens, lengths, ids, state.cache, state.logits))
    new = LoopState(tokens, lengths, done, next_logits, cache, ctx, proc_state)
    out = _StepOut(
        jnp.where(active, ids, settings.pad_id).astype(jnp.int32),
        jnp.where(active, lp, 0.0).astype(jnp.float32),
        jnp.where(active, raw_lp, 0.0).astype(jnp.float32),
        () if not top else (jnp.where(active[:, None], top[0], settings.pad_id), jnp.where(active[:, None], top[1], 0.0)),
    )
    return new, out


def _run_steps(cfg, model, settings, state, steps):
    return lax.scan(functools.partial(_step, cfg, model, settings), state, steps)


@functools.partial(jax.jit, static_argnums=0)
def _generate_jit(cfg: _Config, model_arrays, prompt, prompt_lengths, settings: _Settings) -> GenerateOutput:
    model = _merge_model(cfg.model, model_arrays)
    state = _init(cfg, model, prompt, prompt_lengths, settings)
    state, ys = _run_steps(cfg, model, settings, state, jnp.arange(cfg.max_new, dtype=jnp.int32))
    return GenerateOutput(
        tokens=state.tokens,
        lengths=state.lengths,
        logprobs=ys.logprobs.T,
        raw_logprobs=ys.raw_logprobs.T,
        num_generated=state.context.step,
        top_ids=ys.top[0].transpose(1, 0, 2) if cfg.num_top else None,
        top_logprobs=ys.top[1].transpose(1, 0, 2) if cfg.num_top else None,
    )


@functools.partial(jax.jit, static_argnums=0)
def _stream_init_jit(cfg: _Config, model_arrays, prompt, prompt_lengths, settings: _Settings) -> LoopState:
    return _init(cfg, _merge_model(cfg.model, model_arrays), prompt, prompt_lengths, settings)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _stream_chunk_jit(cfg: _Config, chunk: int, model_arrays, settings: _Settings, state: LoopState, start):
    model = _merge_model(cfg.model, model_arrays)
    steps = start + jnp.arange(chunk, dtype=jnp.int32)
    state, ys = _run_steps(cfg, model, settings, state, steps)
    # `done` is returned on its own: the state's buffers are donated to the next chunk.
    return state, ys.tokens.T, ys.logprobs.T, state.done


# ---------------------------------------------------------------------------------------
# Eager argument handling


def _auto_axes_leaf(x: Any) -> Any:
    """An array sharded over a mesh with Explicit axes (``jax.make_mesh``'s default in recent
    JAX), re-labelled (zero-copy) as the same sharding on the Auto-typed mesh, so that XLA's
    SPMD partitioner propagates shardings through the loop."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(x, jax.Array) or not V.is_concrete(x) or not isinstance(sharding, jax.sharding.NamedSharding):
        return x
    mesh = sharding.mesh
    types = getattr(mesh, "axis_types", None)
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    if not types or auto is None or all(t == auto for t in types) or not hasattr(mesh, "update"):
        return x
    return jax.device_put(x, jax.sharding.NamedSharding(mesh.update(axis_types=(auto,) * len(types)), sharding.spec))


def _auto_axes(tree: Any) -> Any:
    return jax.tree_util.tree_map(_auto_axes_leaf, tree)


_VOCAB_MEMO: "collections.OrderedDict[Any, int]" = collections.OrderedDict()


def _vocab_size(model_static, model_arrays, kind: str, batch: int, prompt_len: int, window: int) -> int:
    """The model's vocabulary size, by abstract evaluation of its first call (memoized)."""
    avals = tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in model_arrays)
    memo_key = (model_static, tuple((a.shape, str(a.dtype)) for a in avals), kind, batch, prompt_len, window)
    if memo_key in _VOCAB_MEMO:
        _VOCAB_MEMO.move_to_end(memo_key)
        return _VOCAB_MEMO[memo_key]

    def probe(arrays):
        model = _merge_model(model_static, arrays)
        if kind == "cached":
            cache = model.init_cache(batch, window)
            tokens = jnp.zeros((batch, prompt_len), jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
            return _cached_step(model, tokens, positions, cache, "step (prefill)")[0]
        return _check_logits(model(jnp.zeros((batch, window), jnp.int32)), batch, window, "call model(tokens)")

    vocab = int(jax.eval_shape(probe, avals).shape[-1])
    _VOCAB_MEMO[memo_key] = vocab
    if len(_VOCAB_MEMO) > 64:
        _VOCAB_MEMO.popitem(last=False)
    return vocab


def _as_int(fn: str, name: str, value: Any, allowed: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: `{name}` must be an int, got {value!r}. Allowed: {allowed}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: `{name}` must be an int, got {value!r} ({type(value).__name__}). Allowed: {allowed}.") from None


def _check_prompt(fn: str, prompt: Any) -> jax.Array:
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
    if V.is_concrete(prompt) and not isinstance(prompt, jax.Array):
        return jnp.asarray(np.asarray(prompt, np.int32))
    return jnp.asarray(prompt).astype(jnp.int32)


def _check_prompt_lengths(fn: str, prompt_lengths: Any, b: int, p: int) -> jax.Array:
    if prompt_lengths is None:
        return jnp.asarray(np.full((b,), p, np.int32))
    if not hasattr(prompt_lengths, "dtype"):
        prompt_lengths = np.asarray(prompt_lengths)
    if tuple(prompt_lengths.shape) != (b,):
        raise ValueError(f"{fn}: `prompt_lengths` must have shape ({b},) (one length per prompt row), "
                         f"got shape {tuple(prompt_lengths.shape)}.")
    if prompt_lengths.dtype == bool or not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
        raise TypeError(f"{fn}: `prompt_lengths` must be integers, got dtype {prompt_lengths.dtype}.")
    if V.is_concrete(prompt_lengths):
        arr = np.asarray(prompt_lengths)
        bad = (arr < 1) | (arr > p)
        if bad.any():
            raise ValueError(f"{fn}: `prompt_lengths` must be in [1, {p}] (the prompt's padded length), got "
                             f"{arr.tolist()} (bad entry {arr[bad][0].item()!r} at row {int(np.argmax(bad))}).")
        if not isinstance(prompt_lengths, jax.Array):
            return jnp.asarray(arr.astype(np.int32))
    return jnp.asarray(prompt_lengths).astype(jnp.int32)


def _check_prompt_ids(fn: str, prompt: jax.Array, lengths: jax.Array, vocab: int) -> None:
    """Real prompt tokens (padding excluded) must lie in [0, V), when their values are readable."""
    if not all(V.is_concrete(x) and getattr(x, "is_fully_addressable", True) for x in (prompt, lengths)):
        return
    ids = np.asarray(prompt)
    bad = (np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]) & ((ids < 0) | (ids >= vocab))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{fn}: `prompt` has token id {ids[row, col]} at [{row}, {col}], outside the model's "
                         f"vocabulary [0, {vocab}).")


def _token_ids(fn: str, name: str, value: Any, vocab: int) -> jax.Array:
    """A 1-D int32 array of token ids, range-checked when concrete."""
    if V.is_concrete(value):
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype == bool or arr.dtype.kind not in "iu" or arr.ndim > 1:
            raise TypeError(f"{fn}: `{name}` must be a token id or a list of token ids, got {value!r}.")
        arr = arr.reshape(-1).astype(np.int64)
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            raise ValueError(f"{fn}: `{name}` got {arr.tolist()}; each id must be in [0, {vocab}) "
                             f"(the model's vocabulary), bad id {arr[bad][0].item()}.")
        return jnp.asarray(arr.astype(np.int32))
    return jnp.asarray(value).reshape(-1).astype(jnp.int32)


def _stop_sequences(fn: str, stop_sequences: Any, vocab: int):
    if stop_sequences is None:
        return None, None
    seqs = list(stop_sequences) if isinstance(stop_sequences, (list, tuple)) else None
    if seqs is None or any(np.ndim(s) != 1 for s in seqs):
        raise TypeError(f"{fn}: `stop_sequences` must be a list of token-id lists, e.g. [[13, 13], [50256]]; "
                        f"got {stop_sequences!r}.")
    if not seqs:
        return None, None
    arrs = []
    for j, s in enumerate(seqs):
        a = np.asarray(s)
        if a.size == 0:
            raise ValueError(f"{fn}: `stop_sequences[{j}]` is empty; each stop sequence needs >= 1 token.")
        if a.dtype == bool or a.dtype.kind not in "iu":
            raise TypeError(f"{fn}: `stop_sequences[{j}]` must hold integer token ids, got {s!r}.")
        if (a < 0).any() or (a >= vocab).any():
            raise ValueError(f"{fn}: `stop_sequences[{j}]` = {a.tolist()} has ids outside [0, {vocab}) "
                             f"(the model's vocabulary).")
        arrs.append(a.astype(np.int32))
    m = max(len(a) for a in arrs)
    table = np.zeros((len(arrs), m), np.int32)
    for j, a in enumerate(arrs):
        table[j, m - len(a):] = a  # right-aligned
    return jnp.asarray(table), jnp.asarray(np.array([len(a) for a in arrs], np.int32))


def _check_finite(fn: str, name: str, value: Any) -> None:
    V.check_knob(fn, name, value, allowed="a finite number (0 means off)")
    if V.is_concrete(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
        raise ValueError(f"{fn}: `{name}` must be finite, got {value!r}; allowed: a finite number (0 means off).")


def _logit_bias(fn: str, bias: Any, b: int, vocab: int):
    if bias is None:
        return None
    if isinstance(bias, dict):
        dense = np.zeros((vocab,), np.float32)
        for tok, val in bias.items():
            t = _as_int(fn, "logit_bias key", tok, "a token id")
            if not 0 <= t < vocab:
                raise ValueError(f"{fn}: `logit_bias` has token id {t}, outside [0, {vocab}) (the model's vocabulary).")
            dense[t] = float(val)
        return jnp.asarray(dense)
    shape = tuple(np.shape(bias))
    if shape not in ((vocab,), (b, vocab)):
        raise ValueError(f"{fn}: `logit_bias` must be a dict {{token_id: bias}} or an array of shape ({vocab},) or "
                         f"({b}, {vocab}), got shape {shape}.")
    if V.is_concrete(bias) and not isinstance(bias, jax.Array):
        arr = np.asarray(bias, np.float32)
        if np.isnan(arr).any():
            raise ValueError(f"{fn}: `logit_bias` contains NaN.")
        return jnp.asarray(arr)
    return jnp.asarray(bias).astype(jnp.float32)


_DUMMY_KEYS: dict[int, jax.Array] = {}


def _row_keys(fn: str, key: Any, temperature: Any, b: int) -> jax.Array:
    if key is None:
        if not V.is_concrete(temperature):
            raise ValueError(f"{fn}: `key` is None and `temperature` is traced, so sampling may be needed. "
                             f"Pass key=jax.random.key(0) (or a concrete temperature=0 for greedy decoding).")
        t = np.asarray(temperature, np.float64)
        if np.any(t > 0):
            shown = t.reshape(-1)[np.argmax(t.reshape(-1) > 0)].item()
            raise ValueError(
                f"{fn}: `key` is None but temperature={shown!r} > 0 samples. Pass key=jax.random.key(0) "
                f"(any seed; or one key per row), or temperature=0 for greedy decoding."
            )
        if b not in _DUMMY_KEYS:  # greedy: the draw ignores the uniforms
            with jax.ensure_compile_time_eval():  # concrete even inside a user's jit: no leaked tracer
                _DUMMY_KEYS[b] = jax.random.split(jax.random.key(0), b)
        return _DUMMY_KEYS[b]
    typed, per_row = V.check_key(fn, key, (b,))
    return typed if per_row else jax.random.split(typed, b)


def _prepare(fn: str, model, prompt, max_new_tokens, *, key, temperature, top_k, top_p, min_p, typical_p,
             repetition_penalty, presence_penalty, frequency_penalty, logit_bias, eos_id, min_new_tokens,
             stop_sequences, prompt_lengths, context_size, pad_id, processors, num_samples=1, top_logprobs=0):
    n = _as_int(fn, "max_new_tokens", max_new_tokens, "an int >= 1")
    if n < 1:
        raise ValueError(f"{fn}: `max_new_tokens` must be >= 1, got {n}.")
    ns = _as_int(fn, "num_samples", num_samples, "an int >= 1")
    if ns < 1:
        raise ValueError(f"{fn}: `num_samples` must be >= 1, got {ns}.")
    num_top = _as_int(fn, "top_logprobs", top_logprobs, "an int >= 0")
    if num_top < 0:
        raise ValueError(f"{fn}: `top_logprobs` must be >= 0 (0 means off), got {num_top}.")
    prompt = _check_prompt(fn, prompt)
    b0, p = int(prompt.shape[0]), int(prompt.shape[1])
    lengths = _check_prompt_lengths(fn, prompt_lengths, b0, p)
    b = b0 * ns  # output rows: each prompt row's samples are adjacent
    kind = _model_kind(model, fn)
    if context_size is None and kind == "stateless":
        context_size = getattr(model, "context_size", None)
        context_size = context_size if isinstance(context_size, (int, np.integer)) else None
    if context_size is not None:
        context_size = _as_int(fn, "context_size", context_size, "an int >= 1 or None")
        if context_size < 1:
            raise ValueError(f"{fn}: `context_size` must be >= 1 (or None for no limit), got {context_size}.")
    if kind == "cached":
        window = p + n - 1  # cache slots needed: the last token is never fed back
        if context_size is not None and window > context_size:
            raise ValueError(f"{fn}: a KV-cached model cannot slide a window: prompt length {p} + max_new_tokens "
                             f"{n} - 1 = {window} exceeds context_size={context_size}.")
    else:
        window = p + n if context_size is None else min(context_size, p + n)

    model_static, model_arrays = _split_model(model)
    vocab = _vocab_size(model_static, model_arrays, kind, b0, p, window)
    if num_top > vocab:
        raise ValueError(f"{fn}: `top_logprobs` must be <= the vocabulary size {vocab}, got {num_top}.")
    _check_prompt_ids(fn, prompt, lengths, vocab)

    pad = _as_int(fn, "pad_id", pad_id, f"a token id in [0, {vocab})")
    if not 0 <= pad < vocab:
        raise ValueError(f"{fn}: `pad_id` must be a token id in [0, {vocab}) (it is fed to the model in padding "
                         f"slots), got {pad}.")
    knobs = make_knobs(fn, (b,), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
    keys = _row_keys(fn, key, temperature, b)
    V.check_knob(fn, "repetition_penalty", repetition_penalty, low=0.0, low_open=True, allowed="a number > 0 (1 means off)")
    _check_finite(fn, "presence_penalty", presence_penalty)
    _check_finite(fn, "frequency_penalty", frequency_penalty)
    V.check_knob(fn, "min_new_tokens", min_new_tokens, low=0, integer=True, allowed="an integer >= 0")
    eos = None
    if eos_id is not None and not (isinstance(eos_id, (list, tuple)) and len(eos_id) == 0):
        eos = _token_ids(fn, "eos_id", eos_id, vocab)
    stop_seqs, stop_lens = _stop_sequences(fn, stop_sequences, vocab)

    if processors is not None:
        procs = (processors,) if isinstance(processors, LogitsProcessor) else tuple(processors)
        for j, proc in enumerate(procs):
            if not isinstance(proc, LogitsProcessor):
                raise TypeError(f"{fn}: `processors` must be a LogitsProcessor or a sequence of them; item {j} "
                                f"is {type(proc).__name__}.")
        processors = _Static(procs) if procs else None

    settings = _Settings(
        keys=keys,
        knobs=knobs,
        repetition_penalty=V.broadcast_knob(fn, "repetition_penalty", repetition_penalty, (b,), np.float32),
        frequency_penalty=V.broadcast_knob(fn, "frequency_penalty", frequency_penalty, (b,), np.float32),
        presence_penalty=V.broadcast_knob(fn, "presence_penalty", presence_penalty, (b,), np.float32),
        logit_bias=_logit_bias(fn, logit_bias, b, vocab),
        eos_ids=eos,
        min_new_tokens=V.broadcast_knob(fn, "min_new_tokens", min_new_tokens, (b,), np.int32),
        stop_seqs=stop_seqs,
        stop_lens=stop_lens,
        pad_id=jnp.asarray(np.int32(pad)),
    )
    cfg = _Config(model_static, kind, b, p, n, window, vocab, processors, ns, num_top)
    return cfg, *_auto_axes((model_arrays, prompt, lengths, settings))


# ---------------------------------------------------------------------------------------
# Public API


def generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    key: Any = None,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    presence_penalty: Any = 0.0,
    frequency_penalty: Any = 0.0,
    logit_bias: Any = None,
    eos_id: Any = None,
    min_new_tokens: Any = 0,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    prompt_lengths: Any = None,
    context_size: int | None = None,
    pad_id: int = 0,
    processors: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    num_samples: int = 1,
    top_logprobs: int = 0,
    speculative: Any = None,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens per prompt row, as one compiled computation.

    The call is a single ``jax.jit`` computation: a prefill, then ``lax.scan`` over
    ``max_new_tokens`` steps on a fixed buffer. Each step applies, in vLLM's order, the
    repetition penalty (over prompt and generated tokens), the frequency/presence penalties
    (over generated tokens), ``logit_bias``, the EOS ban before ``min_new_tokens``, the user
    ``processors``, then draws with temperature / top-k / top-p / min-p / typical-p (exactly,
    see :func:`jaxdecode.sample`). Once every row has finished, the remaining steps skip the
    model (``lax.cond``).

    Model protocols (``docs/CONTRACTS.md``), detected by attributes:

    * KV-cached: ``model.init_cache(batch_size, max_length)`` and
      ``model.step(tokens[B, T], positions[B, T], cache) -> (logits[B, T, V], cache)``. One
      prefill call with the padded prompt (positions ``0..P-1``), then one call per new token
      (``T = 1``, position = the row's current length). ``jaxdecode.CachedModel`` wraps two
      plain functions.
    * Stateless: ``model(tokens[B, T]) -> logits[B, T, V]`` (causal). Each step the model sees
      a fixed-length window of ``min(context_size, P + max_new_tokens)`` tokens per row,
      starting at ``max(0, length - context_size)`` (the seed's ``idx[:, -context_size:]``),
      and the logits are read at the row's last real token.

    Params and recompilation: if ``model`` is a registered pytree (a ``jaxdecode.models``
    model, a ``jax.tree_util`` registered dataclass, a Flax NNX module — NNX modules are
    pytrees), its array leaves are traced arguments, so new params of the same shapes and
    dtypes reuse the compiled computation; its other leaves and structure are static.
    Otherwise (a plain function, a ``CachedModel`` of closures, any non-pytree object) the
    model is a static argument hashed by identity (or by value when hashable): pass the same
    object to avoid recompiling. Also static: ``max_new_tokens``, the shapes of the prompt,
    of ``logit_bias`` and of the stop-sequence table, the number of EOS ids, ``context_size``
    and ``processors`` (hashed by the identity of their functions: build them once). Every
    other value (knobs, penalties, keys, EOS / stop ids, ``min_new_tokens``, ``pad_id``,
    prompt content, ``prompt_lengths``) is traced.

    Works inside a user's ``jax.jit`` and under ``jax.vmap`` (checks of traced values are
    skipped; out-of-range traced knobs are clipped). Batch-sharded inputs and sharded params
    (``NamedSharding`` over a mesh) are partitioned by JAX's SPMD partitioner; each row's result
    equals the single-device run. Concrete arrays on a mesh with Explicit axis types
    (``jax.make_mesh``'s default in recent JAX) are relabelled, without a copy, as the same
    sharding on Auto axes; inside a user's ``jit`` under explicit sharding, use Auto axes.

    Args:
      model: a stateless or KV-cached model (see above).
      prompt: int[B, P] token ids, right-padded when rows have different lengths.
      max_new_tokens: int >= 1, the number of decode steps N.
      key: a PRNG key (``jax.random.key(seed)``; split into B row keys), or one key per row
        (shape [B]). Row b's uniform at step i is ``uniform(fold_in(row_key[b], i))``, so a
        row's tokens depend only on its own key, prompt and knobs. Needed unless every
        temperature is 0.
      temperature, top_k, top_p, min_p, typical_p: sampling knobs, scalars or [B] arrays
        (see :func:`jaxdecode.sample`); temperature 0 is greedy.
      repetition_penalty: > 0, scalar or [B]; 1 is off (CTRL / Hugging Face semantics).
      presence_penalty, frequency_penalty: finite, scalar or [B]; 0 is off (OpenAI / vLLM).
      logit_bias: ``{token_id: bias}``, or float[V] / float[B, V], added to the logits.
      eos_id: an id or a list of ids; a row stops after generating one (it is kept and
        counted in ``lengths``).
      min_new_tokens: int >= 0, scalar or [B]; EOS ids are banned until the row has generated
        this many tokens.
      stop_sequences: list of token-id lists; a row stops once its generated tokens end with
        one of them (the sequence is kept). Matched within the generated tokens only.
      prompt_lengths: int[B] in [1, P], real length of each row (default: all P).
      context_size: stateless models: the window length (default ``model.context_size`` if
        it is an int, else unlimited). KV-cached models: the cache may not need more than
        this many slots (``P + max_new_tokens - 1``).
      pad_id: token id in [0, V) written to unused slots (and fed to the model there).
      processors: extra :class:`jaxdecode.LogitsProcessor` (or a sequence, chained in order),
        applied after the built-in penalties and before sampling.
      num_samples: int >= 1 (static): samples per prompt row. The output has
        ``B * num_samples`` rows, prompt row r's samples at rows ``r * num_samples + s``; each
        prompt is prefilled once and its KV cache broadcast to its samples. Knobs, keys,
        ``logit_bias`` and ``min_new_tokens`` are per *output* row (``[B * num_samples]``);
        ``prompt_lengths`` is per prompt row.
      top_logprobs: int >= 0 (static): also return the n most likely tokens and their
        log-probabilities (model's raw log-softmax) at each step: ``top_ids``, ``top_logprobs``.
      speculative: ``jaxdecode.draft_model(...)`` or ``jaxdecode.prompt_lookup(...)`` to decode
        with speculative decoding (KV-cached models; sampling knobs, EOS, ragged prompts and
        per-row keys are supported; penalties, bias, processors, stop sequences,
        ``min_new_tokens``, ``num_samples`` and ``top_logprobs`` are not). Same output
        distribution as without it; see :func:`jaxdecode.speculative_generate` for statistics.

    Returns:
      A :class:`GenerateOutput` (``tokens``, ``lengths``, ``logprobs``, ``raw_logprobs``,
      ``num_generated``, and ``top_ids``/``top_logprobs`` when asked). Same inputs give
      bit-identical outputs.

    Raises:
      TypeError: non-integer prompt / lengths, a non-int ``max_new_tokens`` or
        ``context_size``, a bad key, a model that fits neither protocol.
      ValueError: a prompt that is not 2-D, ``max_new_tokens <= 0``, ``prompt_lengths``
        outside [1, P] or of the wrong shape, ``context_size < 1``, a knob out of range,
        ``temperature > 0`` without a key, prompt / EOS / stop / bias ids outside [0, V), or a model
        whose logits are not [B, T, V].

    Example:
      >>> import jax, jax.numpy as jnp, jaxdecode
      >>> V = 10
      >>> def model(tokens):  # next token = current token + 1 (mod V)
      ...     return 5.0 * jax.nn.one_hot((tokens + 1) % V, V)
      >>> out = jaxdecode.generate(model, jnp.array([[1, 2, 3], [7, 0, 0]]), 4, temperature=0.0,
      ...                          eos_id=9, prompt_lengths=jnp.array([3, 1]))
      >>> out.tokens.tolist()
      [[1, 2, 3, 4, 5, 6, 7], [7, 8, 9, 0, 0, 0, 0]]
      >>> out.lengths.tolist(), out.num_generated.tolist()
      ([7, 3], [4, 2])
      >>> out = jaxdecode.generate(model, jnp.array([[1, 2, 3]]), 4, key=jax.random.key(0), top_p=0.9)
    """
    if speculative is not None:
        unsupported = dict(
            repetition_penalty=(repetition_penalty, 1.0), presence_penalty=(presence_penalty, 0.0),
            frequency_penalty=(frequency_penalty, 0.0), logit_bias=(logit_bias, None),
            min_new_tokens=(min_new_tokens, 0), stop_sequences=(stop_sequences, None),
            processors=(processors, None), num_samples=(num_samples, 1), top_logprobs=(top_logprobs, 0),
            context_size=(context_size, None),
        )
        for name, (value, default) in unsupported.items():
            if value is not default and not (V.is_concrete(value) and np.ndim(value) == 0 and value == default):
                raise ValueError(f"{_FN}: `{name}` is not supported with `speculative` decoding "
                                 f"(got {value!r}); leave it at its default {default!r}.")
        from ._speculative import speculative_generate

        out = speculative_generate(
            model, prompt, max_new_tokens, proposer=speculative, key=key, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, typical_p=typical_p, eos_id=eos_id, prompt_lengths=prompt_lengths, pad_id=pad_id,
        )
        return GenerateOutput(out.tokens, out.lengths, out.logprobs, out.raw_logprobs, out.num_generated)
    cfg, arrays, prompt, lengths, settings = _prepare(
        _FN, model, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, typical_p=typical_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
        eos_id=eos_id, min_new_tokens=min_new_tokens, stop_sequences=stop_sequences,
        prompt_lengths=prompt_lengths, context_size=context_size, pad_id=pad_id, processors=processors,
        num_samples=num_samples, top_logprobs=top_logprobs,
    )
    return _generate_jit(cfg, arrays, prompt, lengths, settings)


def generate_stream(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    chunk_size: int = 8,
    key: Any = None,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    presence_penalty: Any = 0.0,
    frequency_penalty: Any = 0.0,
    logit_bias: Any = None,
    eos_id: Any = None,
    min_new_tokens: Any = 0,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    prompt_lengths: Any = None,
    context_size: int | None = None,
    pad_id: int = 0,
    processors: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    num_samples: int = 1,
) -> Iterator[StreamChunk]:
    """Like :func:`generate`, but yields the new tokens chunk by chunk as they are decoded.

    Runs the same compiled step as :func:`generate`: one jitted prefill, then a jitted
    ``lax.scan`` of ``chunk_size`` steps called repeatedly (compiled once per shape; the step
    offset is traced, and the loop state is donated between chunks). The concatenation of
    the yielded ``tokens`` equals the generated part of :func:`generate`'s output exactly
    (row b's k-th generated token is ``generate(...).tokens[b, prompt_lengths[b] + k]``).
    Stops early once every row has finished. Arguments are checked when this function is
    called, before the first chunk.

    Args:
      chunk_size: int >= 1, decode steps per chunk (the last chunk may be shorter).
      Others: as :func:`generate` (``top_logprobs`` and ``speculative`` are generate-only).

    Yields:
      :class:`StreamChunk` (``tokens`` int32[B, c], ``logprobs`` float32[B, c], ``done`` bool[B]).

    Example:
      >>> import jax, jax.numpy as jnp, jaxdecode
      >>> model = lambda t: 5.0 * jax.nn.one_hot((t + 1) % 10, 10)
      >>> chunks = jaxdecode.generate_stream(model, jnp.array([[1]]), 5, chunk_size=2, temperature=0)
      >>> [c.tokens.tolist() for c in chunks]
      [[[2, 3]], [[4, 5]], [[6]]]
    """
    chunk = _as_int(_FN_STREAM, "chunk_size", chunk_size, "an int >= 1")
    if chunk < 1:
        raise ValueError(f"{_FN_STREAM}: `chunk_size` must be >= 1, got {chunk}.")
    cfg, arrays, prompt, lengths, settings = _prepare(
        _FN_STREAM, model, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, typical_p=typical_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
        eos_id=eos_id, min_new_tokens=min_new_tokens, stop_sequences=stop_sequences,
        prompt_lengths=prompt_lengths, context_size=context_size, pad_id=pad_id, processors=processors,
        num_samples=num_samples,
    )
    chunk = min(chunk, cfg.max_new)

    def stream() -> Iterator[StreamChunk]:
        state = _stream_init_jit(cfg, arrays, prompt, lengths, settings)
        for start in range(0, cfg.max_new, chunk):
            state, toks, lps, done = _stream_chunk_jit(cfg, chunk, arrays, settings, state, jnp.int32(start))
            c = min(chunk, cfg.max_new - start)
            yield StreamChunk(tokens=toks[:, :c], logprobs=lps[:, :c], done=done)
            if bool(jnp.all(done)):
                return

    return stream()
