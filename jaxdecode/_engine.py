"""A slot engine for serving: continuous batching on a fixed number of decode slots.

The shape is JetStream's: a fixed number of **slots** (rows of one KV cache and one token
buffer), and three compiled functions:

* :meth:`Engine.prefill` runs one request's prompt (batch 1, its length padded to a bucket of
  ``16 * 2**k`` tokens) into a fresh cache row: a :class:`Prefix`. With ``reuse=(state,
  slot)`` it continues that slot's cache instead (llama.cpp's ``cache_prompt``): only the
  prompt tokens past the longest common prefix with the slot's history run (a chat's next turn).
* :meth:`Engine.insert` writes a prefix's cache row, token history and the request's
  per-row settings (every :class:`jaxdecode.SamplingParams` field, its key, its
  ``max_new_tokens``) into one free slot of the :class:`DecodeState`.
* :meth:`Engine.decode` advances every occupied slot ``chunk_size`` tokens (one
  ``lax.scan``): per-row penalties, bias, history rules, EOS ban, sampling knobs and keys
  (every :class:`jaxdecode.SamplingParams` knob, through the same functions as
  :func:`jaxdecode.generate`'s step: :func:`jaxdecode._processors.process_logits` and
  :func:`jaxdecode._sampling.draw_step`); EOS, stop sequences and ``max_new_tokens`` finish a
  row, which then idles until the host frees and refills its slot at a chunk boundary.

The issue-13 knobs (extended truncations, mirostat, DRY, penalty window, n-gram / bad-word /
allowed / suppress bans, sequence bias, length penalty) are per-slot arrays too: numbers [S],
token masks bool[S, V], sequence tables [S, W, M] of fixed capacities (``Engine(max_bad_words=,
max_sequence_bias=, max_dry_breakers=, max_word_len=)``), mirostat's mu [S] in the
:class:`DecodeState`. They run in an extended branch of the step (a ``lax.cond`` taken only in
steps where some running slot uses one; its rows without them get exactly the plain branch's
result). The engine compiles that program the first time a request uses one (one more decode
program for the engine's life); a chunk in which no running slot uses one runs the plain
program, exactly as if no request ever had.

Structured output (``Request.constraint``, a :class:`jaxdecode.Constraint`) runs inside the
same step: each slot holds its own automaton tables (``class_of[V]``, ``table[S, C]``, padded
to the engine's current table capacity, a size bucket) and one automaton state in the
:class:`DecodeState`; the mask is :func:`jaxdecode._structured.apply` per row. A new schema
whose tables fit the capacity does not recompile; a larger one grows the capacity to its
bucket once (one more decode program per bucket).

Stop strings (``SamplingParams.stop``, over the engine's ``tokenizer``) run in the step too: each slot
holds its own Aho-Corasick table over the vocabulary (:mod:`jaxdecode._stop`, its columns
compacted into token classes) and one automaton state, so a row ends at the token that
completes a stop string and its slot frees at the chunk's end, with no steps wasted; the host
only cuts the text.

Everything compiles once per (slot count, prompt bucket): a slot's settings are traced
arrays, so inserting, finishing and refilling never recompile.

Reproducible per request: row ``r``'s uniform at its ``k``-th generated token is
``uniform(fold_in(row_key, k))`` with ``row_key = fold_in(seed_key(seed), choice)``, and
every operation of a decode step is row-wise (the model's step, the sampler, the penalties),
run at the same shapes whatever the other slots hold, so a seeded request gets the same
tokens alone or under load.

:class:`EngineLoop` is the host-side scheduler on top (a FIFO queue, slot bookkeeping,
callbacks per chunk); the HTTP server and the offline batch mode both run on it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _model as M
from . import _stop
from . import _structured as C
from . import _validate as V
from ._compilation import bucket
from ._processors import DecodeContext, SamplingRules, process_logits
from ._processors import stop_sequence_match
from ._sampling import _EXTRA_SPECS, ExtraKnobs, SamplingKnobs, draw_step
from ._settings import SamplingParams, uses_extended

__all__ = ["Engine", "EngineLoop", "Request", "Prefix", "DecodeState", "SlotConstraints", "SlotStops", "StopTable",
           "stop_table", "ChunkOutput", "RowSettings",
           "Completion", "seed_key", "FINISH_REASONS"]

_FN = "jaxdecode.Engine"
PROMPT_BUCKETS = (16, 2)  # as generate's: 16, 32, 64, ... tokens

# Row status codes in DecodeState.reason (and ChunkOutput.reason).
RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a request's ``seed`` (any int; taken modulo 2**64).

    Seeds below 2**32 give exactly ``jax.random.key(seed)`` (threefry key data ``[0, seed]``);
    larger seeds use their high 32 bits as the first word, where ``jax.random.key`` would
    silently drop them (64-bit integers are off by default in JAX).

    Example:
      >>> import jax, numpy as np
      >>> from jaxdecode._engine import seed_key
      >>> bool(np.all(jax.random.key_data(seed_key(7)) == jax.random.key_data(jax.random.key(7))))
      True
    """
    s = int(seed) % (1 << 64)
    return jax.random.wrap_key_data(np.array([s >> 32, s & 0xFFFFFFFF], np.uint32))


# ---------------------------------------------------------------------------------------
# Containers


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, in token ids.

    Attributes:
      prompt: the prompt's token ids (at least one).
      max_new_tokens: int >= 1; prompt length + max_new_tokens must fit the engine's
        ``max_seq_len``.
      sampling: a :class:`jaxdecode.SamplingParams` with scalar fields (one request is one
        row per choice). ``eos_id=None`` means the model's EOS ids.
      seed: the request's seed (None: a fresh random one). Choice ``j``'s row key is
        ``fold_in(seed_key(seed), j)``.
      n: choices (samples) of the prompt, int >= 1; the prompt is prefilled once.
      top_logprobs: int >= 0: also return the n most likely tokens of each step (raw
        log-softmax), at most the engine's ``top_logprobs``.
      constraint: structured output, a :class:`jaxdecode.Constraint` (``jaxdecode.json_schema``,
        ``regex``, ``choice``) the generated tokens must follow, or None. Its EOS ids must be
        among the row's EOS ids (they end the row once the text is complete).
    """

    prompt: Sequence[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None
    n: int = 1
    top_logprobs: int = 0
    constraint: Any = None


class StopTable(NamedTuple):
    """Stop strings as a compact host table for one slot (built by :func:`stop_table`).

    Attributes:
      strings: the stop strings.
      class_of: int32[V], each token's class (tokens with identical columns share one).
      table: int32[Q, K], the automaton state after a token of class ``k`` from state ``q``,
        or ``-(j + 1)`` when stop string ``j`` completes inside the token (see
        :func:`jaxdecode._stop.build_table`).
    """

    strings: tuple
    class_of: np.ndarray
    table: np.ndarray

    @property
    def num_states(self) -> int:
        return int(self.table.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.table.shape[1])


_STOP_TABLES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_STOP_LOCK = threading.Lock()
STOP_STATE_BUCKETS = (16, 2)
STOP_CLASS_BUCKETS = (32, 2)


def stop_table(stops: Sequence[str], tokenizer: Any, vocab_size: int) -> StopTable:
    """The :class:`StopTable` of ``stops`` over ``tokenizer``'s vocabulary (cached per
    tokenizer and stop list: a server sees the same few lists again and again).

    Example:
      >>> from jaxdecode._engine import stop_table
      >>> t = stop_table(["ab"], ["a", "b", "xab", ""], 4)
      >>> t.table[:, t.class_of].tolist()[:2]  # states 0 and 1 (after "a")
      [[1, 0, -1, 0], [1, -1, -1, 1]]
    """
    fn = "jaxdecode.Engine.stop_table"
    stops = _stop.normalise(fn, list(stops))
    key = (id(tokenizer), stops, int(vocab_size))
    with _STOP_LOCK:
        hit = _STOP_TABLES.get(key)
        if hit is not None and hit[0] is tokenizer:
            _STOP_TABLES.move_to_end(key)
            return hit[1]
    dense = _stop.build_table(stops, _stop.vocab_bytes(fn, tokenizer, vocab_size))  # [Q, V]
    q = _stop._automaton([x.encode("utf-8") for x in stops])[0].shape[0]  # rows past it are padding
    cols, class_of = np.unique(dense[:q].T, axis=0, return_inverse=True)
    out = StopTable(stops, class_of.reshape(-1).astype(np.int32), np.ascontiguousarray(cols.T, np.int32))
    with _STOP_LOCK:
        _STOP_TABLES[key] = (tokenizer, out)  # holds the tokenizer: its id stays unique while cached
        while len(_STOP_TABLES) > 64:
            _STOP_TABLES.popitem(last=False)
    return out


class RowSettings(NamedTuple):
    """Per-row settings of the decode slots (leading axis: rows). Every field is traced.

    Attributes:
      key: uint32[R, 2] key data of each row's PRNG key.
      knobs: :class:`jaxdecode.SamplingKnobs` (temperature, top_k, top_p, min_p, typical_p), each [R].
      repetition_penalty, frequency_penalty, presence_penalty: float32[R].
      logit_bias: float32[R, V] (zeros when off).
      eos_ids: int32[R, E]; unused entries hold V (outside the vocabulary: never matched).
      min_new_tokens: int32[R].
      stop_seqs: int32[R, S, M] right-aligned stop sequences; stop_lens: int32[R, S] (0: unused).
      max_new_tokens: int32[R].
      want_top: bool[R]: the row asked for top log-probabilities.
      extra: :class:`jaxdecode._sampling.ExtraKnobs` (top_n_sigma ... mirostat_eta), each [R].
      rules: :class:`jaxdecode._processors.SamplingRules` per row: numbers [R], token masks
        bool[R, V] (allowed: all True when off), sequence tables int32[R, W, M] with lengths
        [R, W] (0: unused) and, for sequence bias, values float32[R, W]; decay (start [R],
        factor [R]; factor 1 is off).
      heavy: bool[R]: the row sets some issue-13 knob (it needs the extended branch).
    """

    key: jax.Array
    knobs: SamplingKnobs
    repetition_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    logit_bias: jax.Array
    eos_ids: jax.Array
    min_new_tokens: jax.Array
    stop_seqs: jax.Array
    stop_lens: jax.Array
    max_new_tokens: jax.Array
    want_top: jax.Array
    extra: ExtraKnobs
    rules: SamplingRules
    heavy: jax.Array


class Prefix(NamedTuple):
    """One prefilled request, ready for :meth:`Engine.insert`.

    Attributes:
      cache: the model's cache for one row (batch 1, ``max_seq_len`` slots).
      logits: float32[1, V], the next-token logits after the prompt.
      context: the row's :class:`jaxdecode.DecodeContext` (token buffer of ``max_seq_len``).
      rows: :class:`RowSettings` of the request's ``n`` choices, NumPy arrays on the host
        (leading axis n; the key is the request's base key, folded with the choice index at
        insert).
      prompt_len: the prompt's length (host int).
      n: the number of choices.
      top_logprobs: alternatives per step the request asked for.
      constraint: the request's :class:`jaxdecode.Constraint` or None (host tables, padded
        at insert to the decode state's capacity).
      stop_table: the request's :class:`StopTable` or None.
      reused: leading prompt tokens taken from a slot's cache rather than computed
        (``Engine.prefill(request, reuse=(state, slot))``; 0 for a fresh prefill): the model
        ran on ``prompt_len - reused`` prompt tokens (+ token 0, see :meth:`Engine.prefill`).
    """

    cache: Any
    logits: jax.Array
    context: DecodeContext
    rows: RowSettings
    prompt_len: int
    n: int
    top_logprobs: int
    constraint: Any = None
    stop_table: Any = None
    reused: int = 0


class SlotStops(NamedTuple):
    """Each slot's stop-string automaton (S slots; Q states and K classes of capacity; a slot
    without stop strings has an all-zero table: its state stays 0).

    Attributes:
      class_of: int32[S, V]; table: int32[S, Q, K] (see :class:`StopTable`); state: int32[S]
      (negative once a stop string completed).
    """

    class_of: jax.Array
    table: jax.Array
    state: jax.Array


class SlotConstraints(NamedTuple):
    """Each slot's structured-output automaton (S slots; Q states and K classes of capacity).

    Attributes:
      class_of: int32[S, V], each token's class in the slot's constraint (0: never allowed).
      table: int32[S, Q, K], next state per (state, class); -1: not allowed (padding too).
      on: bool[S], the slot is constrained.
      state: int32[S], the automaton state after ``consumed`` generated tokens.
      consumed: int32[S], generated tokens fed to the automaton so far.
    """

    class_of: jax.Array
    table: jax.Array
    on: jax.Array
    state: jax.Array
    consumed: jax.Array


class DecodeState(NamedTuple):
    """The slots (S rows): cache, next-token logits, history, status and settings.

    Attributes:
      cache: the model's cache, batch S.
      logits: float32[S, V]: each slot's next-token logits.
      context: :class:`jaxdecode.DecodeContext` of the S slots.
      reason: int32[S]: 0 while the row generates, 1 finished by EOS / stop sequence, 2 by
        ``max_new_tokens``. A free slot holds a finished row.
      rows: :class:`RowSettings` of the S slots.
      constraint: :class:`SlotConstraints` of the S slots.
      stops: :class:`SlotStops` of the S slots.
      mu: float32[S]: mirostat v2's mu per slot (``2 * mirostat_tau`` at insert).
    """

    cache: Any
    logits: jax.Array
    context: DecodeContext
    reason: jax.Array
    rows: RowSettings
    constraint: SlotConstraints
    stops: SlotStops
    mu: Any = None


class ChunkOutput(NamedTuple):
    """What one :meth:`Engine.decode` call generated (S slots, c steps, K alternatives).

    Attributes:
      tokens: int32[S, c] (``pad_id`` where ``valid`` is False).
      valid: bool[S, c]: the slot generated a token at that step.
      logprobs: float32[S, c]: under the distribution the token was drawn from.
      raw_logprobs: float32[S, c]: the model's own log-softmax at the token.
      top_ids, top_logprobs: int32 / float32 [S, c, K]: the K most likely tokens (raw
        log-softmax), for rows that asked for them.
      reason: int32[S]: each slot's status after the chunk (see :class:`DecodeState`).
    """

    tokens: jax.Array
    valid: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    reason: jax.Array


class _Config(NamedTuple):
    """Static configuration of the compiled engine functions."""

    model: Any  # _model.split's static part
    slots: int
    window: int  # max_seq_len: cache slots and token-buffer length per row
    vocab: int
    chunk: int
    num_top: int
    axes: Any  # M._Static(cache batch axes)
    extended: bool = False  # the step has the extended branch (some request used an issue-13 knob)


# ---------------------------------------------------------------------------------------
# Compiled pieces


def _decode_step(cfg: _Config, model, pad_id, state: DecodeState, _):
    """One step of every slot: draw, write, finish, then the model for the next logits.

    A row's result depends only on its own slot: the sampler and the model step are
    row-wise, and the two ``lax.cond`` (sampling, model call) only skip work when no row
    needs it."""
    s, rows, ctx = cfg.slots, state.rows, state.context
    active = state.reason == RUNNING
    keys = jax.random.wrap_key_data(rows.key)

    def constrain(operand):
        # Row-wise: an unconstrained row's logits pass through unchanged (bit for bit), so
        # skipping this when no running row is constrained changes no row's result.
        logits, cs = operand
        tables = C.ConstraintTables(cs.class_of, cs.table, None, jnp.where(cs.on, jnp.arange(s), -1))
        logits, st = C.apply(tables, logits, C.ConstraintState(cs.state, cs.consumed), ctx)
        return logits, cs._replace(state=st.state, consumed=st.consumed)

    def pick(full, operand):
        # generate's step: the shared processing and draw; `full` adds the issue-13 knobs.
        cs, mu = operand
        logits = process_logits(state.logits, ctx, repetition_penalty=rows.repetition_penalty,
                                frequency_penalty=rows.frequency_penalty, presence_penalty=rows.presence_penalty,
                                logit_bias=rows.logit_bias, eos_ids=rows.eos_ids, min_new_tokens=rows.min_new_tokens,
                                rules=rows.rules if full else None, full=full)
        # Last: the draw renormalises over the allowed tokens (as generate's step).
        logits, cs = lax.cond(jnp.any(active & cs.on), constrain, lambda op: op, (logits, cs))
        step_keys = jax.vmap(jax.random.fold_in)(keys, ctx.step)
        ids, lp, mu = draw_step(step_keys, logits, rows.knobs, rows.extra if full else None, mu)
        return ids, lp, cs, mu

    def sample(operand):
        if cfg.extended:  # row-wise either way: a row without issue-13 knobs gets the same result
            ids, lp, cs, mu = lax.cond(jnp.any(active & rows.heavy), functools.partial(pick, True),
                                       functools.partial(pick, False), operand)
        else:
            ids, lp, cs, mu = pick(False, operand)
        raw_all = jax.nn.log_softmax(state.logits, axis=-1)
        raw_lp = jnp.take_along_axis(raw_all, ids[:, None], axis=1)[:, 0]

        def top(_):  # barrier: keeps XLA:CPU's fast TopK (as generate's step)
            t_lp, t_ids = lax.optimization_barrier(lax.top_k(raw_all, cfg.num_top))
            return t_ids.astype(jnp.int32), t_lp

        def no_top(_):
            return jnp.zeros((s, cfg.num_top), jnp.int32), jnp.zeros((s, cfg.num_top), jnp.float32)

        top_ids, top_lp = lax.cond(jnp.any(active & rows.want_top), top, no_top, None)
        return ids, lp, raw_lp, top_ids, top_lp, cs, mu

    def no_sample(operand):
        z = jnp.zeros((s,), jnp.float32)
        return (jnp.zeros((s,), jnp.int32), z, z, jnp.zeros((s, cfg.num_top), jnp.int32),
                jnp.zeros((s, cfg.num_top), jnp.float32)) + operand

    ids, lp, raw_lp, top_ids, top_lp, cons, mu = lax.cond(jnp.any(active), sample, no_sample,
                                                          (state.constraint, state.mu))
    mu = jnp.where(active, mu, state.mu)
    ctx = ctx.advance(ids, active)
    hit = jnp.any(ids[:, None] == rows.eos_ids, axis=-1)
    hit |= stop_sequence_match(ctx.tokens, ctx.lengths, ctx.step, rows.stop_seqs, rows.stop_lens)
    st = state.stops
    r = jnp.arange(s)
    nxt = st.table[r, jnp.maximum(st.state, 0), st.class_of[r, ids]]
    stop_state = jnp.where(active & (st.state >= 0), nxt, st.state)
    hit |= stop_state < 0
    reason = jnp.where(active & hit, STOPPED, state.reason)
    reason = jnp.where(active & (reason == RUNNING) & (ctx.step >= rows.max_new_tokens), LENGTH, reason)
    running = reason == RUNNING

    def run_model(operand):
        cache, _ = operand
        toks = jnp.where(running, ids, pad_id)[:, None]
        pos = jnp.where(running, ctx.lengths - 1, 0)[:, None]  # idle rows write their own slot 0
        out, cache = M.cached_step(_FN, model, toks, pos, cache, "step (decode)", cfg.vocab)
        return out[:, 0].astype(jnp.float32), cache

    logits, cache = lax.cond(jnp.any(running), run_model, lambda op: (op[1], op[0]), (state.cache, state.logits))
    out = (jnp.where(active, ids, pad_id), active, jnp.where(active, lp, 0.0), jnp.where(active, raw_lp, 0.0),
           jnp.where(active[:, None], top_ids, pad_id), jnp.where(active[:, None], top_lp, 0.0))
    return DecodeState(cache, logits, ctx, reason, rows, cons, st._replace(state=stop_state), mu), out


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _decode_jit(cfg: _Config, arrays, pad_id, state: DecodeState):
    model = M.merge(cfg.model, arrays)
    state, ys = lax.scan(functools.partial(_decode_step, cfg, model, pad_id), state, None, length=cfg.chunk)
    toks, valid, lp, raw, top_ids, top_lp = ys
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # [c, S, ...] -> [S, c, ...]
    return state, ChunkOutput(swap(toks), swap(valid), swap(lp), swap(raw), swap(top_ids), swap(top_lp),
                              state.reason)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill_jit(cfg: _Config, pb: int, arrays, tokens, length, pad_id):
    """The prompt ([1, pb], right-padded) into a fresh one-row cache of ``window`` slots."""
    model = M.merge(cfg.model, arrays)
    cache = model.init_cache(1, cfg.window)
    logits, cache = M.prefill(_FN, model, tokens, cache, length, cfg.vocab)
    ctx = DecodeContext.from_prompt(tokens, cfg.vocab, length, cfg.window, pad_id)
    return cache, logits.astype(jnp.float32), ctx


@functools.partial(jax.jit, static_argnums=0)
def _continue_jit(cfg: _Config, arrays, cache, slot, tokens, positions, last, buffer, length, pad_id):
    """A prompt continuing slot ``slot``'s cache: ``tokens`` ([1, T], right-padded) run by the
    model's ``step`` at ``positions`` on a copy of that slot's cache row, logits read at chunk
    index ``last``; ``buffer`` ([1, window]) is the whole prompt, for the row's context.

    ``cache`` (the decode state's) is read, not donated: the state stays valid."""
    model = M.merge(cfg.model, arrays)
    row = M.take_rows(cache, cfg.axes.obj, slot[None])
    out, row = M.cached_step(_FN, model, tokens, positions, row, "step (prefill)", cfg.vocab)
    logits = lax.dynamic_index_in_dim(out, last, axis=1, keepdims=False)
    ctx = DecodeContext.from_prompt(buffer, cfg.vocab, length, cfg.window, pad_id)
    return row, logits.astype(jnp.float32), ctx


def _put_row(big, small, slot, axis):
    return lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1,))
def _insert_jit(cfg: _Config, state: DecodeState, cache, logits, ctx, rows: RowSettings, class_of, table, on,
                stop_class_of, stop_tab, choice, slot):
    """Writes a one-row prefix, one choice's settings (``rows``, batch 1) and its constraint
    tables (``class_of`` [1, V], ``table`` [1, Q, K], ``on`` [1]) into ``slot``."""
    axes = cfg.axes.obj
    new_cache = jax.tree.map(lambda big, small, ax: big if ax is None else _put_row(big, small, slot, ax),
                             state.cache, cache, axes, is_leaf=lambda v: v is None)
    key = jax.random.fold_in(jax.random.wrap_key_data(rows.key[0]), choice)
    one = rows._replace(key=jax.random.key_data(key)[None])
    put = lambda big, small: _put_row(big, small, slot, 0)
    cs = state.constraint
    return DecodeState(
        cache=new_cache,
        logits=put(state.logits, logits),
        context=jax.tree.map(put, state.context, ctx),
        reason=state.reason.at[slot].set(RUNNING),
        rows=jax.tree.map(put, state.rows, one),
        constraint=SlotConstraints(put(cs.class_of, class_of), put(cs.table, table), put(cs.on, on),
                                   cs.state.at[slot].set(0), put(cs.consumed, ctx.step)),
        stops=SlotStops(put(state.stops.class_of, stop_class_of), put(state.stops.table, stop_tab),
                        state.stops.state.at[slot].set(0)),
        mu=state.mu.at[slot].set(2.0 * one.extra.mirostat_tau[0]),  # as generate's initial mu
    )


@functools.partial(jax.jit, donate_argnums=(0,))
def _release_jit(reason, slot):
    return reason.at[slot].set(jnp.where(reason[slot] == RUNNING, STOPPED, reason[slot]))


# ---------------------------------------------------------------------------------------
# The engine


class Engine:
    """A fixed number of decode slots over one model (JetStream's prefill / insert / decode).

    Args:
      model: a KV-cached model (``init_cache`` / ``step``; ``jaxdecode.models`` models), or
        a stateless causal one (run on the whole buffer every step, for tests).
      slots: int >= 1, the rows decoded together.
      max_seq_len: tokens per slot (prompt + generated). Default: the model's
        ``config.max_seq_len``; required when the model declares none.
      chunk_size: int >= 1, decode steps per :meth:`decode` call (slots are refilled between
        calls).
      top_logprobs: int >= 0, the most alternatives per step a request may ask for (static:
        computed only in chunks where some row asked).
      max_eos_ids, max_stop_sequences, max_stop_len: sizes of the per-row EOS and stop tables.
      max_bad_words, max_sequence_bias, max_dry_breakers: entries of the per-row tables of
        ``bad_words``, ``sequence_bias`` and ``dry_sequence_breakers``; max_word_len: tokens per
        entry (a request beyond them is a ValueError naming the field).
      pad_id: token id written where a slot generated nothing.
      eos_ids: the EOS ids of requests whose ``eos_id`` is None (default: the model's
        ``config.eos_ids``; the server passes the tokenizer's when the model declares none).
      tokenizer: the vocabulary's text, needed for requests with ``SamplingParams.stop``
        strings (a ``jaxdecode.models`` tokenizer, or a list of each token id's text); the
        server sets its own when this is None.

    Example:
      >>> import jax, jax.numpy as jnp, jaxdecode
      >>> from jaxdecode._engine import Engine, Request
      >>> model = lambda t: 5.0 * jax.nn.one_hot((t + 1) % 10, 10)  # next = current + 1
      >>> engine = Engine(model, slots=2, max_seq_len=32, chunk_size=4)
      >>> state = engine.init_state()
      >>> prefix = engine.prefill(Request([1, 2], max_new_tokens=3, sampling=jaxdecode.SamplingParams(temperature=0)))
      >>> state = engine.insert(prefix, state, slot=1)
      >>> state, out = engine.decode(state)
      >>> out.tokens[1][out.valid[1]].tolist(), int(out.reason[1])
      ([3, 4, 5], 2)
    """

    def __init__(self, model: Any, *, slots: int = 8, max_seq_len: int | None = None, chunk_size: int = 8,
                 top_logprobs: int = 20, max_eos_ids: int = 8, max_stop_sequences: int = 8, max_stop_len: int = 16,
                 pad_id: int = 0, eos_ids: Sequence[int] | None = None, tokenizer: Any = None,
                 max_bad_words: int = 16, max_sequence_bias: int = 16, max_dry_breakers: int = 8,
                 max_word_len: int = 8):
        fn = _FN
        self.slots = V.check_count(fn, "slots", slots, 1)
        self.chunk_size = V.check_count(fn, "chunk_size", chunk_size, 1)
        self.max_eos_ids = V.check_count(fn, "max_eos_ids", max_eos_ids, 1)
        self.max_stop_sequences = V.check_count(fn, "max_stop_sequences", max_stop_sequences, 1)
        self.max_stop_len = V.check_count(fn, "max_stop_len", max_stop_len, 1)
        self.max_bad_words = V.check_count(fn, "max_bad_words", max_bad_words, 1)
        self.max_sequence_bias = V.check_count(fn, "max_sequence_bias", max_sequence_bias, 1)
        self.max_dry_breakers = V.check_count(fn, "max_dry_breakers", max_dry_breakers, 1)
        self.max_word_len = V.check_count(fn, "max_word_len", max_word_len, 1)
        M.model_kind(fn, model)
        limit = M.context_limit(model)
        if max_seq_len is None:
            if limit is None:
                raise ValueError(f"{fn}: `max_seq_len` is None and the model declares no context length "
                                 f"(model.config.max_seq_len); pass max_seq_len=<tokens per slot>.")
            max_seq_len = limit
        self.max_seq_len = V.check_count(fn, "max_seq_len", max_seq_len, 2)
        if limit is not None:
            V.check_at_most(fn, "max_seq_len", self.max_seq_len, limit, "the model's context (model.config.max_seq_len)")
        self.model = M.as_cached(model)
        self.tokenizer = tokenizer
        self.eos_ids = M.default_eos_ids(model) if eos_ids is None else tuple(int(e) for e in eos_ids)
        static, self._arrays = M.split(self.model)
        w = self.max_seq_len
        self.vocab = M.vocab_size(fn, static, self._arrays, "cached", 1, min(16, w), w)
        self.pad_id = V.check_token_id(fn, "pad_id", pad_id, self.vocab)
        for e in self.eos_ids:
            V.check_token_id(fn, "eos_ids", e, self.vocab)
        n_top = V.check_count(fn, "top_logprobs", top_logprobs, 0, "0 means off")
        self.top_logprobs = min(n_top, self.vocab)
        axes = M.cache_batch_axes(self.model.init_cache, w)
        self._cfg = _Config(static, self.slots, w, self.vocab, self.chunk_size, max(self.top_logprobs, 1),
                            M._Static(axes))
        self._pad = jnp.asarray(np.int32(self.pad_id))
        self._heavy = np.zeros((self.slots,), bool)  # host copy of rows.heavy per slot (set at insert)

    # -- host-side request checks -----------------------------------------------------

    def check(self, request: Request) -> Request:
        """Checks a request against the engine (eagerly; ValueError/TypeError naming the
        field) and returns it with its seed set."""
        fn = f"{_FN}.prefill"
        if not isinstance(request, Request):
            raise TypeError(f"{fn}: `request` must be a jaxdecode Request, got {type(request).__name__}.")
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or prompt.size == 0 or prompt.dtype.kind not in "iu":
            raise ValueError(f"{fn}: `prompt` must be a non-empty list of token ids, got {request.prompt!r:.80}.")
        bad = (prompt < 0) | (prompt >= self.vocab)
        if bad.any():
            raise ValueError(f"{fn}: `prompt` has token id {int(prompt[bad][0])}, outside the vocabulary "
                             f"[0, {self.vocab}).")
        n_new = V.check_count(fn, "max_new_tokens", request.max_new_tokens, 1)
        if prompt.size + n_new > self.max_seq_len:
            raise ValueError(f"{fn}: the prompt ({prompt.size} tokens) + `max_new_tokens` ({n_new}) = "
                             f"{prompt.size + n_new} exceeds max_seq_len={self.max_seq_len} tokens per slot.")
        n = V.check_count(fn, "n", request.n, 1)
        V.check_at_most(fn, "n", n, self.slots, "the number of slots")
        top = V.check_count(fn, "top_logprobs", request.top_logprobs, 0, "0 means off")
        V.check_at_most(fn, "top_logprobs", top, self.top_logprobs, "the engine's top_logprobs")
        if not isinstance(request.sampling, SamplingParams):
            raise TypeError(f"{fn}: `sampling` must be a jaxdecode.SamplingParams, got "
                            f"{type(request.sampling).__name__}.")
        c = request.constraint
        if c is not None:
            if not isinstance(c, C.Constraint):
                raise TypeError(f"{fn}: `constraint` must be a jaxdecode.Constraint (jaxdecode.json_schema / regex / "
                                f"choice) or None, got {type(c).__name__}.")
            if c.vocab_size > self.vocab:
                raise ValueError(f"{fn}: `constraint` was built for a vocabulary of {c.vocab_size} tokens, larger "
                                 f"than the model's {self.vocab}.")
            eos = set(self.eos_ids if request.sampling.eos_id is None else request.sampling.eos_id)
            if not set(c.eos_ids) <= eos:
                raise ValueError(f"{fn}: the constraint's EOS ids {sorted(c.eos_ids)} are not all among the row's "
                                 f"EOS ids {sorted(eos)}; a completed row could never stop. Pass eos_id= including "
                                 f"them (or build the constraint with matching eos_ids=).")
        if request.sampling.stop and self.tokenizer is None:
            raise ValueError(f"{fn}: `stop` strings need the engine's `tokenizer` (Engine(..., tokenizer=...)) to "
                             f"match the generated text; got stop={request.sampling.stop!r}.")
        seed = request.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        else:
            seed = V.as_int(fn, "seed", seed, "an int")
        return dataclasses.replace(request, seed=seed)

    def row_settings(self, request: Request) -> RowSettings:
        """The request's per-row settings (n rows), built on the host: values vary, shapes
        never do, so nothing recompiles."""
        fn, sp, n, vocab = f"{_FN}.prefill", request.sampling, request.n, self.vocab

        def scalar(name, dtype):
            value = getattr(sp, name)
            if np.ndim(value) != 0:
                raise ValueError(f"{fn}: `{name}` must be a scalar per request, got shape {np.shape(value)}.")
            return np.full((n,), value, dtype)

        knobs = SamplingKnobs(scalar("temperature", np.float32), scalar("top_k", np.int32),
                              scalar("top_p", np.float32), scalar("min_p", np.float32),
                              scalar("typical_p", np.float32))
        bias = np.zeros((vocab,), np.float32)
        if isinstance(sp.logit_bias, dict):
            for t, val in sp.logit_bias.items():
                V.check_token_id(fn, "logit_bias key", t, vocab)
                bias[t] = float(val)
        elif sp.logit_bias is not None:
            arr = np.asarray(sp.logit_bias, np.float32)
            if arr.shape != (vocab,):
                raise ValueError(f"{fn}: `logit_bias` must be a dict or shape ({vocab},), got {arr.shape}.")
            bias = arr
        eos = self.eos_ids if sp.eos_id is None else sp.eos_id
        if len(eos) > self.max_eos_ids:
            raise ValueError(f"{fn}: `eos_id` has {len(eos)} ids; this engine allows at most {self.max_eos_ids}.")
        eos_row = np.full((self.max_eos_ids,), vocab, np.int32)
        for j, t in enumerate(eos):
            eos_row[j] = V.check_token_id(fn, "eos_id", t, vocab)
        seqs, lens = self._seq_table(fn, "stop_sequences", sp.stop_sequences, self.max_stop_sequences,
                                     self.max_stop_len, "max_stop_sequences", "max_stop_len")
        seed = int(request.seed) % (1 << 64)  # seed_key's key data, built on the host
        key = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
        rep = lambda x: np.broadcast_to(x, (n,) + np.shape(x)).copy()
        return RowSettings(
            key=rep(key), knobs=knobs,
            repetition_penalty=scalar("repetition_penalty", np.float32),
            frequency_penalty=scalar("frequency_penalty", np.float32),
            presence_penalty=scalar("presence_penalty", np.float32),
            logit_bias=rep(bias), eos_ids=rep(eos_row), min_new_tokens=scalar("min_new_tokens", np.int32),
            stop_seqs=rep(seqs), stop_lens=rep(lens),
            max_new_tokens=np.full((n,), request.max_new_tokens, np.int32),
            want_top=np.full((n,), request.top_logprobs > 0, bool),
            **self._extended_rows(fn, sp, n),
        )

    def _seq_table(self, fn: str, name: str, seqs: Any, count: int, length: int, count_arg: str,
                   length_arg: str) -> tuple[np.ndarray, np.ndarray]:
        """Token sequences as one slot's right-aligned table int32[count, length] and lengths
        [count] (0: unused), checked against the engine's capacities and the vocabulary."""
        table, lens = np.zeros((count, length), np.int32), np.zeros((count,), np.int32)
        seqs = seqs or ()
        if len(seqs) > count:
            raise ValueError(f"{fn}: `{name}` has {len(seqs)} sequences; this engine allows at most {count} "
                             f"(Engine({count_arg}=...)).")
        for j, seq in enumerate(seqs):
            if len(seq) > length:
                raise ValueError(f"{fn}: `{name}[{j}]` has {len(seq)} tokens; this engine allows at most {length} "
                                 f"(Engine({length_arg}=...)).")
            for t in seq:
                V.check_token_id(fn, f"{name}[{j}]", t, self.vocab)
            table[j, length - len(seq):] = seq
            lens[j] = len(seq)
        return table, lens

    def _extended_rows(self, fn: str, sp: SamplingParams, n: int) -> dict:
        """The issue-13 fields of ``sp`` as n rows of :class:`RowSettings` (``extra``,
        ``rules``, ``heavy``); every table at the engine's fixed capacity, so no value changes
        a shape."""
        vocab, ml = self.vocab, self.max_word_len

        def scalar(name, dtype):
            value = getattr(sp, name)
            if np.ndim(value) != 0:
                raise ValueError(f"{fn}: `{name}` must be a scalar per request, got shape {np.shape(value)}.")
            return np.full((n,), value, dtype)

        def mask(name):  # bool[V]: the field's token ids
            out = np.zeros((vocab,), bool)
            for t in getattr(sp, name) or ():
                out[V.check_token_id(fn, name, t, vocab)] = True
            return out

        rep = lambda x: np.broadcast_to(x, (n,) + np.shape(x)).copy()
        extra = ExtraKnobs(**{name: scalar(name, spec["dtype"]) for name, spec in _EXTRA_SPECS.items()})
        breakers = self._seq_table(fn, "dry_sequence_breakers", sp.dry_sequence_breakers, self.max_dry_breakers, ml,
                                   "max_dry_breakers", "max_word_len")
        bad = self._seq_table(fn, "bad_words", sp.bad_words, self.max_bad_words, ml, "max_bad_words", "max_word_len")
        pairs = sp.sequence_bias or ()
        table, lens = self._seq_table(fn, "sequence_bias", [q for q, _ in pairs], self.max_sequence_bias, ml,
                                      "max_sequence_bias", "max_word_len")
        values = np.zeros((self.max_sequence_bias,), np.float32)
        values[:len(pairs)] = [float(v) for _, v in pairs]
        decay = sp.exponential_decay_length_penalty or (0, 1.0)  # factor 1: EOS logits unchanged
        allowed = np.ones((vocab,), bool) if sp.allowed_token_ids is None else mask("allowed_token_ids")
        rules = SamplingRules(
            penalty_last_n=scalar("penalty_last_n", np.int32), dry_multiplier=scalar("dry_multiplier", np.float32),
            dry_base=scalar("dry_base", np.float32), dry_allowed_length=scalar("dry_allowed_length", np.int32),
            dry_penalty_last_n=scalar("dry_penalty_last_n", np.int32), dry_breakers=(rep(breakers[0]), rep(breakers[1])),
            no_repeat_ngram_size=scalar("no_repeat_ngram_size", np.int32), bad_words=(rep(bad[0]), rep(bad[1])),
            sequence_bias=(rep(table), rep(lens), rep(values)), allowed=rep(allowed),
            suppress=rep(mask("suppress_tokens")), begin_suppress=rep(mask("begin_suppress_tokens")),
            decay=(np.full((n,), decay[0], np.int32), np.full((n,), decay[1], np.float32)),
        )
        return dict(extra=extra, rules=rules, heavy=np.full((n,), uses_extended(sp), bool))

    # -- the three compiled steps -----------------------------------------------------

    def init_state(self) -> DecodeState:
        """Every slot free (finished)."""
        s, w, v = self.slots, self.max_seq_len, self.vocab
        ctx = DecodeContext.from_prompt(jnp.full((s, 1), self.pad_id, jnp.int32), v, None, w, self.pad_id)
        zeros = lambda dtype: jnp.zeros((s,), dtype)
        rows = RowSettings(
            key=jnp.zeros((s, 2), jnp.uint32),
            knobs=SamplingKnobs(zeros(jnp.float32), zeros(jnp.int32), jnp.ones((s,)), zeros(jnp.float32),
                                jnp.ones((s,))),
            repetition_penalty=jnp.ones((s,)), frequency_penalty=zeros(jnp.float32),
            presence_penalty=zeros(jnp.float32), logit_bias=jnp.zeros((s, v)),
            eos_ids=jnp.full((s, self.max_eos_ids), v, jnp.int32), min_new_tokens=zeros(jnp.int32),
            stop_seqs=jnp.zeros((s, self.max_stop_sequences, self.max_stop_len), jnp.int32),
            stop_lens=jnp.zeros((s, self.max_stop_sequences), jnp.int32),
            max_new_tokens=zeros(jnp.int32), want_top=zeros(bool),
            **jax.tree.map(jnp.asarray, self._extended_rows(_FN, SamplingParams(), s)),
        )
        q, k = C.STATE_BUCKETS[0], C.CLASS_BUCKETS[0]  # the smallest capacity; grows on demand
        cons = SlotConstraints(jnp.zeros((s, v), jnp.int32), jnp.full((s, q, k), -1, jnp.int32), zeros(bool),
                               zeros(jnp.int32), zeros(jnp.int32))
        stops = SlotStops(jnp.zeros((s, v), jnp.int32),
                          jnp.zeros((s, STOP_STATE_BUCKETS[0], STOP_CLASS_BUCKETS[0]), jnp.int32), zeros(jnp.int32))
        return DecodeState(self.model.init_cache(s, w), jnp.zeros((s, v), jnp.float32), ctx,
                           jnp.full((s,), STOPPED, jnp.int32), rows, cons, stops, zeros(jnp.float32))

    def prefill(self, request: Request, reuse: tuple[DecodeState, int] | None = None) -> Prefix:
        """Runs one request's prompt (checked first; batch 1, padded to a prompt bucket).

        Args:
          request: the :class:`Request`.
          reuse: ``(state, slot)``: continue that slot's KV cache, as llama.cpp's server reuses
            a slot's cached prompt (``cache_prompt``), e.g. the next turn of a chat. The
            longest common prefix of the request's prompt and the tokens the slot's cache
            holds (:meth:`reusable_tokens`) is taken from a copy of the slot's cache row; the
            model runs only on the rest (plus token 0, see below), in length buckets of 16 *
            2**k tokens. The prefix is as a fresh prefill's (the same greedy tokens, up to
            float rounding between the model's ``prefill`` and ``step``), ready for
            :meth:`insert` into any slot (usually the same one). With fewer than 2 tokens to
            reuse it is a fresh prefill. ``state`` is read, not donated; ``Prefix.reused``
            says how many prompt tokens were reused.

        Token 0 is always run again, at position 0 with the new tokens: while other slots
        decode, an idle slot's step writes into its cache slot 0 (:meth:`decode` parks it
        there), and a causal model's K/V at position 0 depend on token 0 alone, so this
        restores it exactly for one token's work.

        Example:
          >>> import jax, jaxdecode
          >>> from jaxdecode._engine import Engine, Request
          >>> model = lambda t: 5.0 * jax.nn.one_hot((t + 1) % 10, 10)  # next = current + 1
          >>> engine = Engine(model, slots=1, max_seq_len=32, chunk_size=4)
          >>> greedy = jaxdecode.SamplingParams(temperature=0, eos_id=())
          >>> state = engine.insert(engine.prefill(Request([1, 2, 3], 4, greedy)), engine.init_state(), 0)
          >>> state, out = engine.decode(state)  # 4, 5, 6, 7: the cache holds 1 2 3 4 5 6
          >>> prefix = engine.prefill(Request([1, 2, 3, 4, 5, 6, 7, 0, 1], 3, greedy), reuse=(state, 0))
          >>> prefix.reused, prefix.prompt_len
          (6, 9)
          >>> state, out = engine.decode(engine.insert(prefix, state, 0))
          >>> out.tokens[0][out.valid[0]].tolist()
          [2, 3, 4]
        """
        if reuse is not None:
            if not (isinstance(reuse, tuple) and len(reuse) == 2):
                raise TypeError(f"{_FN}.prefill: `reuse` must be a (DecodeState, slot) pair or None, got {reuse!r:.80}.")
            return self._prefill_reusing(request, *reuse)
        request = self.check(request)
        rows = self.row_settings(request)
        p = len(request.prompt)
        pb = min(bucket(p, *PROMPT_BUCKETS), self.max_seq_len)
        tokens = np.full((1, pb), self.pad_id, np.int32)
        tokens[0, :p] = np.asarray(request.prompt, np.int32)
        cache, logits, ctx = _prefill_jit(self._cfg, pb, self._arrays, tokens, np.array([p], np.int32), self._pad)
        stops = request.sampling.stop
        table = self.stop_table(stops) if stops else None
        return Prefix(cache, logits, ctx, rows, p, request.n, request.top_logprobs, request.constraint, table)

    def reusable_tokens(self, state: DecodeState, slot: int, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` slot ``slot``'s KV cache already holds: the
        longest common prefix of ``prompt`` and the slot's token history, over the positions
        surely written to the cache, and at most ``len(prompt) - 1`` (the last prompt token
        must run to give the next-token logits).

        A slot holds ``lengths`` tokens in its history; the last one is in the cache only if
        the row was still running after it (a row that finished on it, by EOS, a stop or
        its length, never fed it to the model), so ``lengths - 1`` positions are counted. A
        re-tokenized history may differ from the generated ids (a chat's answer as text);
        the common prefix stops at the first difference.
        """
        fn = f"{_FN}.prefill"
        slot = V.as_int(fn, "slot", slot, f"a slot in [0, {self.slots})")
        if not 0 <= slot < self.slots:
            raise ValueError(f"{fn}: `slot` must be in [0, {self.slots}), got {slot}.")
        if not isinstance(state, DecodeState):
            raise TypeError(f"{fn}: `reuse` must be (DecodeState, slot), got a {type(state).__name__} for the state.")
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        history, length = jax.device_get((state.context.tokens[slot], state.context.lengths[slot]))
        cached = max(min(int(length) - 1, history.shape[0], prompt.size - 1), 0)
        differ = np.nonzero(history[:cached] != prompt[:cached])[0]
        return int(differ[0]) if differ.size else cached

    def _prefill_reusing(self, request: Request, state: DecodeState, slot: int) -> Prefix:
        """:meth:`prefill` continuing slot ``slot``'s cache (see its ``reuse``)."""
        request = self.check(request)
        reused = self.reusable_tokens(state, slot, request.prompt)
        if reused < 2:  # token 0 runs anyway: nothing to gain
            return self.prefill(request)
        rows = self.row_settings(request)
        prompt = np.asarray(request.prompt, np.int32)
        p, w = prompt.size, self.max_seq_len
        run = np.concatenate([prompt[:1], prompt[reused:]])  # token 0 (see prefill) + the new ones
        tb = min(bucket(run.size, *PROMPT_BUCKETS), w)
        tokens = np.full((1, tb), self.pad_id, np.int32)
        tokens[0, : run.size] = run
        # Padding runs at the positions after the prompt (clamped into the cache): slots past
        # the prompt are each written by the decode step before any query reads them, and a
        # real query at position q < p attends to slots <= q only.
        positions = np.minimum(np.arange(p, p + tb - run.size), w - 1)
        positions = np.concatenate([[0], np.arange(reused, p), positions]).astype(np.int32)[None]
        buffer = np.full((1, w), self.pad_id, np.int32)
        buffer[0, :p] = prompt
        cache, logits, ctx = _continue_jit(self._cfg, self._arrays, state.cache, np.int32(slot), tokens, positions,
                                           np.int32(run.size - 1), buffer, np.array([p], np.int32), self._pad)
        stops = request.sampling.stop
        table = self.stop_table(stops) if stops else None
        # As prefill's Prefix (keep the two in step), plus how much came from the cache.
        return Prefix(cache, logits, ctx, rows, p, request.n, request.top_logprobs, request.constraint, table,
                      reused=reused)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int, choice: int = 0) -> DecodeState:
        """Writes choice ``choice`` of a prefilled request into ``slot`` (donates ``state``)."""
        fn = f"{_FN}.insert"
        slot = V.as_int(fn, "slot", slot, f"a slot in [0, {self.slots})")
        choice = V.as_int(fn, "choice", choice, f"a choice in [0, {prefix.n})")
        if not 0 <= slot < self.slots:
            raise ValueError(f"{fn}: `slot` must be in [0, {self.slots}), got {slot}.")
        if not 0 <= choice < prefix.n:
            raise ValueError(f"{fn}: `choice` must be in [0, {prefix.n}), got {choice}.")
        # The choice's row is sliced on the host, so the program does not depend on n.
        row = jax.tree.map(lambda x: x[choice:choice + 1], prefix.rows)
        state = self.fit_constraint(state, prefix.constraint)
        class_of, table, on = self._constraint_row(prefix.constraint, state.constraint.table.shape[1:])
        state = self.fit_stops(state, prefix.stop_table)
        stop_cls, stop_tab = self._stop_row(prefix.stop_table, state.stops.table.shape[1:])
        self._heavy[slot] = bool(row.heavy[0])
        return _insert_jit(self._cfg, state, prefix.cache, prefix.logits, prefix.context, row, class_of, table, on,
                           stop_cls, stop_tab, np.int32(choice), np.int32(slot))

    def stop_table(self, stops: Sequence[str]) -> StopTable:
        """``stops`` over the engine's tokenizer (cached; the front ends call it early, off the
        engine thread, so a new stop list's table is built before its prefill)."""
        return stop_table(stops, self.tokenizer, self.vocab)

    def fit_stops(self, state: DecodeState, table: StopTable | None) -> DecodeState:
        """The state with stop-table capacity for ``table`` (as :meth:`fit_constraint`)."""
        if table is None:
            return state
        st = state.stops
        q, k = st.table.shape[1:]
        if table.num_states <= q and table.num_classes <= k:
            return state
        q2 = max(q, bucket(table.num_states, *STOP_STATE_BUCKETS))
        k2 = max(k, bucket(table.num_classes, *STOP_CLASS_BUCKETS))
        return state._replace(stops=st._replace(table=jnp.pad(st.table, ((0, 0), (0, q2 - q), (0, k2 - k)))))

    def _stop_row(self, table: StopTable | None, shape: tuple) -> tuple:
        """One slot's padded stop tables on the host: (class_of [1, V], table [1, Q, K])."""
        class_of = np.zeros((1, self.vocab), np.int32)
        tab = np.zeros((1,) + tuple(shape), np.int32)
        if table is not None:
            class_of[0, : table.class_of.shape[0]] = table.class_of
            tab[0, : table.num_states, : table.num_classes] = table.table
        return class_of, tab

    def fit_constraint(self, state: DecodeState, constraint: Any) -> DecodeState:
        """The state with table capacity for ``constraint`` (unchanged when it fits; else every
        slot's table is padded to the constraint's size bucket: the next decode compiles once
        for the new capacity, and every later constraint that fits reuses it)."""
        if constraint is None:
            return state
        cs = state.constraint
        q, k = cs.table.shape[1:]
        if constraint.num_states <= q and constraint.num_classes <= k:
            return state
        q2 = max(q, bucket(constraint.num_states, *C.STATE_BUCKETS))
        k2 = max(k, bucket(constraint.num_classes, *C.CLASS_BUCKETS))
        table = jnp.pad(cs.table, ((0, 0), (0, q2 - q), (0, k2 - k)), constant_values=-1)
        return state._replace(constraint=cs._replace(table=table))

    def _constraint_row(self, constraint: Any, shape: tuple) -> tuple:
        """One slot's padded tables on the host: (class_of [1, V], table [1, Q, K], on [1])."""
        v = self.vocab
        if constraint is None:
            return np.zeros((1, v), np.int32), np.full((1,) + tuple(shape), -1, np.int32), np.zeros((1,), bool)
        class_of = np.zeros((1, v), np.int32)  # class 0: never allowed (ids beyond the tokenizer's too)
        class_of[0, : constraint.vocab_size] = constraint.class_of
        table = np.full((1,) + tuple(shape), -1, np.int32)
        table[0, : constraint.num_states, : constraint.num_classes] = constraint.table
        return class_of, table, np.ones((1,), bool)

    def decode(self, state: DecodeState) -> tuple[DecodeState, ChunkOutput]:
        """Advances every running slot ``chunk_size`` tokens (donates ``state``).

        A chunk in which some running slot uses an issue-13 knob runs the program with the
        extended branch (compiled the first time: one more program for the engine's life); any
        other chunk runs the plain one. Choosing reads ``state.reason`` (a wait for the previous
        chunk, which the loop has fetched already)."""
        running = np.asarray(state.reason) == RUNNING
        cfg = self._cfg._replace(extended=True) if bool((self._heavy & running).any()) else self._cfg
        return _decode_jit(cfg, self._arrays, self._pad, state)

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Stops ``slot`` now (a cancelled request): it generates nothing more."""
        return state._replace(reason=_release_jit(state.reason, np.int32(slot)))

    def compiled_count(self) -> int:
        """How many programs the engine's jitted functions hold (for compilation tests)."""
        return sum(f._cache_size() for f in (_prefill_jit, _continue_jit, _insert_jit, _decode_jit,
                                               _release_jit))


# ---------------------------------------------------------------------------------------
# The host-side scheduler


@dataclasses.dataclass
class Completion:
    """One choice's result so far (host lists).

    Attributes:
      tokens: generated token ids.
      logprobs: raw log-probabilities of each token (the model's log-softmax, as vLLM and
        OpenAI report them).
      sampled_logprobs: log-probabilities under the distribution each token was drawn from.
      top: per step, a list of (token id, raw log-probability), best first (empty unless the
        request asked for ``top_logprobs``).
      finish_reason: None while running, then "stop" (EOS / stop sequence / stopped by the
        caller), "length" (``max_new_tokens``) or "abort" (cancelled or an engine error).
    """

    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    sampled_logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class Handle:
    """A submitted request in an :class:`EngineLoop`: its choices' results and callbacks.

    ``on_update(handle, choice, new_token_count)`` is called (on the loop's thread) after every
    chunk that gave the choice tokens or finished it; it may call :meth:`stop_choice` (a stop
    string was found) or :meth:`cancel`. ``on_done(handle)`` is called once, when every choice
    has finished.
    """

    _ids = itertools.count()

    def __init__(self, request: Request, on_update=None, on_done=None):
        self.id = next(Handle._ids)
        self.request = request
        self.choices = [Completion() for _ in range(request.n)]
        self.on_update, self.on_done = on_update, on_done
        self.prefix: Prefix | None = None
        self.next_choice = 0  # choices inserted so far
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop: set[int] = set()

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    def stop_choice(self, choice: int, reason: str = "stop") -> None:
        """Finishes one choice now (its slot is freed at the next chunk boundary)."""
        if self.choices[choice].finish_reason is None:
            self.choices[choice].finish_reason = reason
            self._stop.add(choice)

    def cancel(self) -> None:
        """Aborts every unfinished choice (a client went away); slots free at the next chunk."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class EngineLoop:
    """FIFO admission, slot bookkeeping and result dispatch around an :class:`Engine`.

    Call :meth:`submit` from any thread and :meth:`step` from one (the server runs it in a
    background thread; :meth:`run` drives it to completion for offline work). Each step
    admits queued requests into free slots (prefilling each once, inserting its choices as
    slots free up, in order), runs one decode chunk, hands the new tokens to each request's
    callbacks and frees the slots whose rows finished.

    Args:
      engine: the :class:`Engine`.
      max_queue: most requests waiting for a slot; :meth:`submit` raises
        :class:`QueueFull` beyond it (the server answers 503).
    """

    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.state = engine.init_state()
        self.slot_owner: list[tuple[Handle, int] | None] = [None] * engine.slots
        self.queue: collections.deque[Handle] = collections.deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.stats = collections.Counter()

    # -- submission ------------------------------------------------------------------

    def submit(self, request: Request, on_update=None, on_done=None, *, force: bool = False) -> Handle:
        """Queues a request (checked now: ValueError/TypeError for a bad one). ``force``
        ignores ``max_queue`` (offline work that paces itself)."""
        request = self.engine.check(request)
        self.engine.row_settings(request)  # every field check happens here, not in the loop
        handle = Handle(request, on_update, on_done)
        with self.lock:
            if not force and len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.queue.append(handle)
            self.wakeup.notify_all()
        return handle

    def busy(self) -> bool:
        with self.lock:
            return bool(self.queue) or any(o is not None for o in self.slot_owner)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self.lock:
            if self.queue or any(o is not None for o in self.slot_owner):
                return True
            self.wakeup.wait(timeout)
            return bool(self.queue)

    # -- one iteration -----------------------------------------------------------------

    def _finish(self, handle: Handle) -> None:
        if handle.done.is_set():
            return
        handle.prefix = None
        handle.done.set()
        if handle.on_done is not None:
            handle.on_done(handle)

    def _free(self, slot: int) -> None:
        """Frees a slot whose row may still be running on the device."""
        self.slot_owner[slot] = None
        self.state = self.engine.release(self.state, slot)

    def _admit(self) -> None:
        free = [i for i, o in enumerate(self.slot_owner) if o is None]
        while free:
            with self.lock:
                if not self.queue:
                    return
                handle = self.queue[0]
            if handle.cancelled:
                with self.lock:
                    self.queue.popleft()
                for c in handle.choices:
                    c.finish_reason = c.finish_reason or "abort"
                self._finish(handle)
                continue
            if handle.prefix is None:
                try:
                    handle.prefix = self.engine.prefill(handle.request)
                except Exception as e:  # a request that fails must not stop the others
                    with self.lock:
                        self.queue.popleft()
                    handle.error = e
                    for c in handle.choices:
                        c.finish_reason = "abort"
                    self._finish(handle)
                    continue
                self.stats["prefills"] += 1
            while free and handle.next_choice < handle.request.n:
                slot = free.pop(0)
                self.state = self.engine.insert(handle.prefix, self.state, slot, handle.next_choice)
                self.slot_owner[slot] = (handle, handle.next_choice)
                handle.next_choice += 1
            if handle.next_choice == handle.request.n:
                handle.prefix = None  # the cache row is in the slots now
                with self.lock:
                    self.queue.popleft()
            else:
                return  # FIFO: the head request waits for more slots

    def step(self) -> bool:
        """Admit, decode one chunk, dispatch, free. Returns whether any slot ran."""
        # Chunk boundary: cancelled requests and choices stopped by the caller free their slots.
        for slot, owner in enumerate(self.slot_owner):
            if owner is None:
                continue
            handle, choice = owner
            if handle.cancelled or choice in handle._stop:
                if handle.cancelled:
                    handle.choices[choice].finish_reason = handle.choices[choice].finish_reason or "abort"
                self._free(slot)
                self._maybe_done(handle)
        self._admit()
        if all(o is None for o in self.slot_owner):
            return False
        self.state, out = self.engine.decode(self.state)
        out = jax.device_get(out)
        self.stats["chunks"] += 1
        touched: dict[int, Handle] = {}
        for slot, owner in enumerate(self.slot_owner):
            if owner is None:
                continue
            handle, choice = owner
            comp = handle.choices[choice]
            valid = out.valid[slot]
            new = int(valid.sum())
            reason = int(out.reason[slot])
            if comp.finish_reason is not None:  # stopped by the caller: the row still runs
                self._free(slot)
                touched[handle.id] = handle
                continue
            comp.tokens.extend(int(t) for t in out.tokens[slot][valid])
            comp.logprobs.extend(float(x) for x in out.raw_logprobs[slot][valid])
            comp.sampled_logprobs.extend(float(x) for x in out.logprobs[slot][valid])
            k = handle.request.top_logprobs
            if k:
                for j in np.nonzero(valid)[0]:
                    comp.top.append([(int(t), float(l)) for t, l in zip(out.top_ids[slot, j, :k],
                                                                        out.top_logprobs[slot, j, :k])])
            if reason != RUNNING:
                comp.finish_reason = FINISH_REASONS[reason]
            self.stats["tokens"] += new
            if handle.on_update is not None and (new or comp.finish_reason is not None):
                try:
                    handle.on_update(handle, choice, new)
                except Exception as e:  # a broken callback aborts its request only
                    handle.error = e
                    handle.cancel()
            if comp.finish_reason is not None:
                if reason == RUNNING:  # the callback stopped it (a stop string)
                    self._free(slot)
                else:
                    self.slot_owner[slot] = None  # the row is finished in the state already
                touched[handle.id] = handle
        for handle in touched.values():
            self._maybe_done(handle)
        return True

    def _maybe_done(self, handle: Handle) -> None:
        if handle.next_choice == handle.request.n and all(c.finish_reason is not None for c in handle.choices):
            self._finish(handle)

    def abort_all(self, error: BaseException | None = None) -> None:
        """Finishes every queued and running request with "abort" (shutdown, engine error)
        and resets the slots."""
        with self.lock:
            pending = list(self.queue)
            self.queue.clear()
        running = {o[0].id: o[0] for o in self.slot_owner if o is not None}
        self.slot_owner = [None] * self.engine.slots
        for handle in pending + list(running.values()):
            handle.error = handle.error or error
            for c in handle.choices:
                c.finish_reason = c.finish_reason or "abort"
            self._finish(handle)
        self.state = self.engine.init_state()

    def run(self, requests: Sequence[Request], progress: Callable[[Handle], None] | None = None) -> list[Handle]:
        """Runs every request to completion (offline); returns the handles in input order.

        Requests are queued as slots allow (the queue limit does not apply)."""
        handles: list[Handle] = []
        pending = collections.deque(requests)
        while pending or self.busy():
            while pending and len(self.queue) < max(self.engine.slots, 1):
                req = pending.popleft()
                handles.append(self.submit(req, None, progress, force=True))
            self.step()
        return handles


class QueueFull(RuntimeError):
    """The engine loop's queue is full (the server answers 503)."""
