"""Autoregressive generation as one compiled JAX computation: :func:`generate` and
:func:`generate_stream`.

Design (see ``docs/CONTRACTS.md`` for the two model protocols):

* The whole call is one ``jax.jit`` computation: a prefill, then a ``lax.while_loop`` over the
  decode steps (``generate``; a ``lax.scan`` per chunk in ``generate_stream``) on a fixed token
  buffer (kept in the :class:`jaxdecode.DecodeContext`). The loop
  carry is the small :class:`LoopState`.
* Shapes a user does not choose are bucketed for KV-cached models: the prompt is right-padded
  to ``16 * 2**k`` tokens, the decode buffers hold ``16 * 4**k`` steps (the loop stops at
  ``max_new_tokens``; a stream's chunks skip the sampler and the model past it with
  ``lax.cond``) and the cache is sized
  for both (clipped to the model's context); the results are sliced back to the shapes asked
  for. A stream of calls with different prompt lengths and ``max_new_tokens`` then compiles
  once per bucket pair, not once per value. Stateless models are not bucketed: they run the
  whole window every step, so a longer window would slow every step.
* Static (a change recompiles): the buckets, every other shape (batch, vocab), the model's
  structure (or the model itself when it is not a pytree), ``context_size``, what
  :class:`jaxdecode.SamplingParams` keeps static, and the user processors. Traced: every
  sampling knob and penalty, the key(s), ``max_new_tokens`` within its bucket, ``pad_id``,
  the prompt content, ``prompt_lengths`` and the model's array leaves (its params).
* Each step: repetition penalty (prompt + generated tokens) -> frequency/presence penalties
  (generated tokens; both over the last ``penalty_last_n`` tokens when set) -> logit bias ->
  the history rules of :func:`jaxdecode._processors.apply_rules` (DRY, sequence bias, length
  penalty, n-gram / bad-word / allowed / suppress bans) -> EOS ban before ``min_new_tokens`` ->
  user processors -> the ``constraint=`` mask (:mod:`jaxdecode._structured`: the row's
  automaton state, advanced by the previous token, in the carry) ->
  :func:`jaxdecode._sampling.draw_extended` with one uniform per row,
  ``uniform(fold_in(row_key, step))`` (XTC's coin: ``uniform(fold_in(fold_in(row_key, step), 1))``).
  Then the token is written, finished rows (EOS or stop sequence) are marked, and the model
  is run for the next token's logits, skipped by ``lax.cond`` once every row is done.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _model as M
from . import _settings as S
from . import _structured as C
from . import _stop
from . import _validate as V
from ._compilation import bucket
from ._model import CachedModel
from ._processors import DecodeContext, LogitsProcessor, process_logits, rules_active, stop_sequence_match
from ._processors import chain as _chain
from ._sampling import draw_step, extended_rows
from ._settings import UNSET, SamplingParams
from ._speculative import speculative_generate

__all__ = ["CachedModel", "GenerateOutput", "StreamChunk", "LoopState", "generate", "generate_stream"]

_FN = "jaxdecode.generate"
_FN_STREAM = "jaxdecode.generate_stream"

# Buckets (smallest, ratio) for KV-cached models. The prompt bucket costs prefill compute (at
# most 2x the tokens); the decode-step bucket costs only skipped steps (a cond each).
PROMPT_BUCKETS = (8, 2)  # 8, 16, 32, ...: a short prompt then prefills on the few-row CPU kernel
STEP_BUCKETS = (16, 4)


# ---------------------------------------------------------------------------------------
# Public containers


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
      rounds, proposed, accepted: with ``speculative=``, the acceptance statistics of
        :class:`jaxdecode.SpeculativeOutput` (verification rounds int32[]; draft tokens
        proposed and accepted per row, int32[B]); None otherwise.
      complete: with ``constraint=``: bool[B], whether the row's generated text is a complete
        match of its constraint (True for unconstrained rows). A constrained row that ends
        with EOS is always complete; False means ``max_new_tokens`` (or a stop sequence) cut
        it off before the text was valid. None without ``constraint``.
      stop_index: int32[B] or None. With ``stop`` strings: the index of the one that ended
        each row, -1 for rows that ended otherwise (EOS, length). The row's tokens include
        the token in which it completed; :func:`jaxdecode.completions` cuts the text.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    num_generated: jax.Array
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    rounds: jax.Array | None = None
    proposed: jax.Array | None = None
    accepted: jax.Array | None = None
    complete: jax.Array | None = None
    stop_index: jax.Array | None = None


class StreamChunk(NamedTuple):
    """One chunk yielded by :func:`generate_stream` (c <= chunk_size steps).

    Attributes:
      tokens: int32[B, c]. The tokens generated in these steps (``pad_id`` for finished rows).
      logprobs: float32[B, c]. As :attr:`GenerateOutput.logprobs` for these steps.
      done: bool[B]. Whether each row has finished (EOS / stop sequence) by the chunk's end.
      complete: with ``constraint=``: bool[B], whether each row's text so far is a complete
        match of its constraint (as :attr:`GenerateOutput.complete`); None otherwise.
      num_generated: int32[B]. Tokens each row has generated so far (its real tokens in this
        chunk are the first ``num_generated - earlier total``; the rest is ``pad_id``).
      stop_index: int32[B] or None. With ``stop`` strings: the one each row hit, -1 for none.
    """

    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    complete: jax.Array | None = None
    num_generated: jax.Array | None = None
    stop_index: jax.Array | None = None


class LoopState(NamedTuple):
    """The carry of the decode loop (B rows, V vocabulary).

    Attributes:
      done: bool[B]. The row hit EOS or a stop sequence; it generates nothing more.
      logits: float32[B, V]. The model's raw logits for each row's next token (read at the
        row's last real token).
      cache: the model's KV cache pytree (KV-cached protocol; ``()`` for stateless models).
      context: :class:`jaxdecode.DecodeContext`: the token buffer int32[B, L] and each row's
        length (prompt, then generated tokens, ``pad_id`` after), token counts, prompt mask,
        step (tokens generated so far per row, the output's ``num_generated``), previous token.
      proc_state: the user processors' state pytree (``()`` when there are none).
      constraint: the automata of ``constraint=`` (one int32 state per row,
        :class:`jaxdecode._structured.ConstraintState`; ``()`` without constraints).
      stop_state: int32[B], each row's stop-string automaton state (negative once a stop
        string completed, see :mod:`jaxdecode._stop`); ``()`` without stop strings.
      mu: float32[B]. Mirostat v2's mu per row (starts at ``2 * mirostat_tau``; unused when off).
    """

    done: jax.Array
    logits: jax.Array
    cache: Any
    context: DecodeContext
    proc_state: Any
    constraint: Any = ()
    stop_state: Any = ()
    mu: Any = ()


class _Traced(NamedTuple):
    """Traced per-call values (B rows)."""

    keys: jax.Array  # key[B]: one PRNG key per row
    sampling: S.Resolved
    pad_id: jax.Array  # int32[]
    max_new: jax.Array  # int32[]: the real max_new_tokens (the scan may run a longer bucket)
    constraint: Any = None  # _structured.ConstraintTables (padded to size buckets) or None
    stop_table: Any = None  # int32[Q, V] stop-string table (see _stop), or None
    heavy: Any = True  # bool[]: some row uses an issue-13 traced knob (computed once per call)


class _StepOut(NamedTuple):
    tokens: jax.Array  # int32[B]
    logprobs: jax.Array  # float32[B]
    raw_logprobs: jax.Array  # float32[B]
    top: Any  # (int32[B, n], float32[B, n]) with top_logprobs=n, else ()


class _Config(NamedTuple):
    """Static configuration of one compiled loop."""

    model: Any  # _model.split's static part
    kind: str  # "cached" | "stateless"
    batch: int
    prompt_len: int  # bucketed (cached models)
    steps: int  # decode steps compiled: max_new_tokens, bucketed (cached models)
    window: int  # stateless: fixed window length; cached: cache length
    vocab: int
    processors: Any  # _Static(tuple of LogitsProcessor) or None
    num_samples: int = 1  # output rows per prompt row (batch = prompt rows * num_samples)
    num_top: int = 0  # top_logprobs alternatives per step
    full: bool = True  # some issue-13 traced knob is not at its default (or is traced): the full step


# ---------------------------------------------------------------------------------------
# The loop


def _stateless_logits(cfg: _Config, model, tokens, lengths):
    """Logits for each row's next token from a window of the buffer (the seed's idx[:, -C:])."""
    w = cfg.window
    start = jnp.maximum(lengths - w, 0)
    window = jax.vmap(lambda row, s: lax.dynamic_slice(row, (s,), (w,)))(tokens, start)
    out = M.check_logits(_FN, model(window), cfg.batch, w, "call model(tokens)", cfg.vocab)
    idx = (lengths - 1 - start)[:, None, None]
    return jnp.take_along_axis(out, idx, axis=1)[:, 0].astype(jnp.float32)


def _init(cfg: _Config, model, prompt, prompt_lengths, tr: _Traced) -> LoopState:
    """Prefill. With ``num_samples`` > 1 each prompt row is prefilled once and its cache,
    logits and buffer are then repeated for its samples (rows ``r * num_samples + s``)."""
    p, ns = cfg.prompt_len, cfg.num_samples
    b0 = prompt.shape[0]
    ctx = DecodeContext.from_prompt(prompt, cfg.vocab, prompt_lengths, p + cfg.steps, tr.pad_id)
    rows = jnp.repeat(jnp.arange(b0), ns)
    if cfg.kind == "cached":
        cache = model.init_cache(b0, cfg.window)
        logits, cache = M.prefill(_FN, model, ctx.tokens[:, :p], cache, prompt_lengths, cfg.vocab)
        if ns > 1:
            cache = M.take_rows(cache, M.cache_batch_axes(model.init_cache, cfg.window), rows)
    else:
        cache = ()
        logits = _stateless_logits(cfg._replace(batch=b0), model, ctx.tokens, prompt_lengths)
    if ns > 1:
        logits = logits[rows]
        ctx = jax.tree.map(lambda x: x[rows], ctx)
    proc_state = () if cfg.processors is None else _processor(cfg).init(ctx)
    return LoopState(
        done=jnp.zeros((cfg.batch,), bool),
        logits=logits.astype(jnp.float32),
        cache=cache,
        context=ctx,
        proc_state=proc_state,
        constraint=() if tr.constraint is None else C.init_state(ctx),
        stop_state=() if tr.stop_table is None else _stop.init_state(cfg.batch),
        mu=2.0 * tr.sampling.extra.mirostat_tau,
    )


def _processor(cfg: _Config) -> LogitsProcessor:
    procs = cfg.processors.obj
    return procs[0] if len(procs) == 1 else _chain(*procs)


def _process_logits(cfg: _Config, sp: S.Resolved, raw: jax.Array, ctx: DecodeContext, proc_state,
                    full: bool = True):
    """Penalties (over the last ``penalty_last_n`` tokens), bias, the history rules (DRY,
    sequence bias, length penalty, n-gram / bad-word / allowed / suppress bans), EOS ban and
    user processors. Returns (logits, proc_state). ``full=False`` (static) leaves out the
    per-row traced rules (penalty window, DRY, n-grams): the step takes it when no row uses them."""
    l = process_logits(raw, ctx, repetition_penalty=sp.repetition_penalty, frequency_penalty=sp.frequency_penalty,
                       presence_penalty=sp.presence_penalty, logit_bias=sp.logit_bias, eos_ids=sp.eos_ids,
                       min_new_tokens=sp.min_new_tokens, rules=sp.rules, full=full)
    if cfg.processors is not None:
        l, proc_state = _processor(cfg).update(l, proc_state, ctx)
        l = l.astype(jnp.float32)
    return l, proc_state


def _step(cfg: _Config, model, tr: _Traced, state: LoopState, i: jax.Array):
    """One decode step (global step index ``i``): draw, write, mark finished, next logits.

    Two ``lax.cond`` skip the work once every row is done or past ``max_new_tokens`` (the
    step bucket, a stream's last chunk): one around the sampler, one around the model call.
    Neither wraps the KV cache together with the rest of the step: a cond that does makes XLA
    copy the whole cache every step. When some issue-13 traced knob (extended truncations,
    penalty window, DRY, n-grams) is set (static ``cfg.full``), the sampler's switch has a
    third branch, taken only in calls where some row uses one; with all of them at their
    defaults the step is the plain one (one extra compilation the first time one is set).
    """
    b, n, sp = cfg.batch, tr.max_new, tr.sampling
    idle = jnp.all(state.done) | (i >= n)

    def sample(operand, full):
        raw, ctx, (proc_state, c_state), mu = operand
        logits, proc_state = _process_logits(cfg, sp, raw, ctx, proc_state, full)
        if tr.constraint is not None:  # last: the draw renormalises over the allowed tokens
            logits, c_state = C.apply(tr.constraint, logits, c_state, ctx)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(tr.keys)
        ids, lp, mu = draw_step(step_keys, logits, sp.knobs, sp.extra if full else None, mu)
        raw_all = jax.nn.log_softmax(raw, axis=-1)
        raw_lp = jnp.take_along_axis(raw_all, ids[:, None], axis=1)[:, 0]
        top = ()
        if cfg.num_top:  # barrier: keeps XLA:CPU's fast TopK (see _sampling._candidate_draw)
            top_lp, top_ids = lax.optimization_barrier(lax.top_k(raw_all, cfg.num_top))
            top = (top_ids.astype(jnp.int32), top_lp)
        return ids, lp, raw_lp, top, (proc_state, c_state), mu

    def no_sample(operand):
        zero = jnp.zeros((b,), jnp.float32)
        top = ()
        if cfg.num_top:
            top = (jnp.zeros((b, cfg.num_top), jnp.int32), jnp.zeros((b, cfg.num_top), jnp.float32))
        return jnp.zeros((b,), jnp.int32), zero, zero, top, operand[2], operand[3]

    operand = (state.logits, state.context, (state.proc_state, state.constraint), state.mu)
    if cfg.full:
        branch = jnp.where(idle, 0, jnp.where(tr.heavy, 2, 1))
        ids, lp, raw_lp, top, (proc_state, c_state), mu = lax.switch(
            branch, (no_sample, functools.partial(sample, full=False), functools.partial(sample, full=True)), operand)
    else:  # static: the third branch alone costs ~40 us per step on XLA:CPU even when not taken
        ids, lp, raw_lp, top, (proc_state, c_state), mu = lax.cond(idle, no_sample, functools.partial(sample, full=False), operand)
    active = ~state.done & (i < n)
    mu = jnp.where(active, mu, state.mu)

    ctx = state.context.advance(ids, active)
    hit = jnp.zeros((b,), bool)
    if sp.eos_ids is not None:
        hit |= jnp.any(ids[:, None] == sp.eos_ids[None, :], axis=-1)
    if sp.stop_seqs is not None:
        hit |= stop_sequence_match(ctx.tokens, ctx.lengths, ctx.step, sp.stop_seqs, sp.stop_lens)
    stop_state = state.stop_state
    if tr.stop_table is not None:
        stop_state = _stop.advance(tr.stop_table, stop_state, ids, active)
        hit |= stop_state < 0
    done = state.done | (active & hit)

    def run_model(operand):
        tokens, lengths, ids, cache, _ = operand
        if cfg.kind == "cached":
            out, cache = M.cached_step(_FN, model, ids[:, None], (lengths - 1)[:, None], cache, "step (decode)", cfg.vocab)
            return out[:, 0].astype(jnp.float32), cache
        return _stateless_logits(cfg, model, tokens, lengths), cache

    def skip_model(operand):
        return operand[4], operand[3]

    need = ~jnp.all(done) & (i < n - 1)
    next_logits, cache = lax.cond(need, run_model, skip_model, (ctx.tokens, ctx.lengths, ids, state.cache, state.logits))
    new = LoopState(done, next_logits, cache, ctx, proc_state, c_state, stop_state, mu)
    out = _StepOut(
        jnp.where(active, ids, tr.pad_id).astype(jnp.int32),
        jnp.where(active, lp, 0.0).astype(jnp.float32),
        jnp.where(active, raw_lp, 0.0).astype(jnp.float32),
        () if not top else (jnp.where(active[:, None], top[0], tr.pad_id), jnp.where(active[:, None], top[1], 0.0)),
    )
    return new, out


def _run_steps(cfg, model, tr, state, steps):
    return lax.scan(functools.partial(_step, cfg, model, tr), state, steps)


@functools.partial(jax.jit, static_argnums=0)
def _generate_jit(cfg: _Config, model_arrays, prompt, prompt_lengths, tr: _Traced) -> GenerateOutput:
    """The whole call. The decode loop is a ``lax.while_loop`` that stops after the real
    ``max_new_tokens`` steps (the buffers are sized for the step bucket) or as soon as every
    row is done, so the bucket's extra steps cost nothing; each step's outputs are written
    into fixed [B, steps] buffers in place (slots never reached keep 0 / ``pad_id``, exactly
    what a finished row's steps hold)."""
    model = M.merge(cfg.model, model_arrays)
    state = _init(cfg, model, prompt, prompt_lengths, tr)
    b, steps, n_top = cfg.batch, cfg.steps, cfg.num_top
    zeros = jnp.zeros((b, steps), jnp.float32)
    top = () if not n_top else (jnp.full((b, steps, n_top), tr.pad_id, jnp.int32),
                                jnp.zeros((b, steps, n_top), jnp.float32))

    def running(carry):
        i, state, _ = carry
        return (i < tr.max_new) & ~jnp.all(state.done)

    def body(carry):
        i, state, (lps, raws, top) = carry
        state, out = _step(cfg, model, tr, state, i)
        lps = lps.at[:, i].set(out.logprobs)
        raws = raws.at[:, i].set(out.raw_logprobs)
        if n_top:
            top = (top[0].at[:, i].set(out.top[0]), top[1].at[:, i].set(out.top[1]))
        return i + 1, state, (lps, raws, top)

    _, state, (lps, raws, top) = lax.while_loop(running, body, (jnp.int32(0), state, (zeros, zeros, top)))
    return GenerateOutput(
        tokens=state.context.tokens,
        lengths=state.context.lengths,
        logprobs=lps,
        raw_logprobs=raws,
        num_generated=state.context.step,
        top_ids=top[0] if n_top else None,
        top_logprobs=top[1] if n_top else None,
        complete=_complete(tr, state),
        stop_index=None if tr.stop_table is None else _stop.fired(state.stop_state),
    )


def _complete(tr: _Traced, state: LoopState):
    if tr.constraint is None:
        return None
    return C.complete(tr.constraint, state.constraint, state.context)


@functools.partial(jax.jit, static_argnums=0)
def _stream_init_jit(cfg: _Config, model_arrays, prompt, prompt_lengths, tr: _Traced) -> LoopState:
    return _init(cfg, M.merge(cfg.model, model_arrays), prompt, prompt_lengths, tr)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _stream_chunk_jit(cfg: _Config, chunk: int, model_arrays, tr: _Traced, state: LoopState, start):
    model = M.merge(cfg.model, model_arrays)
    steps = start + jnp.arange(chunk, dtype=jnp.int32)
    state, ys = _run_steps(cfg, model, tr, state, steps)
    # `done` is returned on its own: the state's buffers are donated to the next chunk.
    fired = None if tr.stop_table is None else _stop.fired(state.stop_state)
    return state, ys.tokens.T, ys.logprobs.T, state.done, _complete(tr, state), state.context.step, fired


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


def _pad_prompt(prompt: jax.Array, to: int) -> jax.Array:
    """Right-pads the prompt's columns to the bucket (the padding is never read as a token)."""
    extra = to - prompt.shape[1]
    return prompt if extra == 0 else jnp.pad(prompt, ((0, 0), (0, extra)))


def _check_processors(fn: str, processors: Any) -> Any:
    if processors is None:
        return None
    procs = (processors,) if isinstance(processors, LogitsProcessor) else tuple(processors)
    for j, proc in enumerate(procs):
        if not isinstance(proc, LogitsProcessor):
            raise TypeError(f"{fn}: `processors` must be a LogitsProcessor or a sequence of them; item {j} "
                            f"is {type(proc).__name__}.")
    return M._Static(procs) if procs else None


def _check_constraint_eos(fn: str, constraint: Any, resolved: S.Resolved) -> None:
    """A constrained row ends with one of its constraint's EOS ids: they must stop the row."""
    need = C.eos_ids_of(constraint)
    if not need:
        return
    eos = resolved.eos_ids
    if eos is not None and not V.is_concrete(eos):
        return
    have = set() if eos is None else {int(e) for e in np.asarray(eos).reshape(-1)}
    if not need <= have:
        raise ValueError(f"{fn}: the constraint's EOS ids {sorted(need)} are not all among the EOS ids that stop "
                         f"a row ({sorted(have)}); a completed row could never stop. Pass eos_id= including them "
                         f"(or build the constraint with matching eos_ids=).")


def _prepare(fn: str, model, prompt, max_new_tokens, *, key, sampling: SamplingParams, prompt_lengths,
             context_size, pad_id, processors, num_samples=1, top_logprobs=0, constraint=None, tokenizer=None):
    """Every eager check, then the static config and the traced arguments of the loop."""
    n = V.check_count(fn, "max_new_tokens", max_new_tokens, 1)
    ns = V.check_count(fn, "num_samples", num_samples, 1)
    num_top = V.check_count(fn, "top_logprobs", top_logprobs, 0, "0 means off")
    prompt = V.check_prompt(fn, prompt)
    b0, p = int(prompt.shape[0]), int(prompt.shape[1])
    lengths = V.check_prompt_lengths(fn, prompt_lengths, b0, p)
    b = b0 * ns  # output rows: each prompt row's samples are adjacent
    kind = M.model_kind(fn, model)
    if context_size is None and kind == "stateless":
        context_size = getattr(model, "context_size", None)
        context_size = context_size if isinstance(context_size, (int, np.integer)) else None
    if context_size is not None:
        context_size = V.check_count(fn, "context_size", context_size, 1, "or None for no limit")
    limit = M.context_limit(model)
    V.check_context(fn, p, n, limit, "model.config.max_seq_len")
    if kind == "cached":
        if context_size is not None and p + n - 1 > context_size:
            raise ValueError(f"{fn}: a KV-cached model cannot slide a window: prompt length {p} + max_new_tokens "
                             f"{n} - 1 = {p + n - 1} exceeds context_size={context_size}.")
        cap = min(x for x in (limit, context_size) if x is not None) if (limit or context_size) else None
        pb, steps = bucket(p, *PROMPT_BUCKETS), bucket(n, *STEP_BUCKETS)
        if cap is not None:
            pb = min(pb, cap)
        window = pb + steps - 1  # cache slots: the last token is never fed back
        if cap is not None:
            window = min(window, cap)
    else:
        pb, steps = p, n
        window = p + n if context_size is None else min(context_size, p + n)

    model_static, model_arrays = M.split(model)
    vocab = M.vocab_size(fn, model_static, model_arrays, kind, b0, pb, window)
    V.check_at_most(fn, "top_logprobs", num_top, vocab, "the vocabulary size")
    V.check_prompt_ids(fn, prompt, lengths, vocab)
    pad = V.check_token_id(fn, "pad_id", pad_id, vocab)
    # A model that declares no EOS ids stops at its constraints' EOS ids (the tokenizer's).
    tables = C.stack_constraints(fn, constraint, b0, vocab, repeat=ns)
    default_eos = M.default_eos_ids(model) or tuple(sorted(C.eos_ids_of(constraint)))
    resolved = S.resolve(fn, sampling, b, vocab, default_eos)
    keys = V.row_keys(fn, key, sampling.temperature, b)
    procs = _check_processors(fn, processors)
    if tables is not None:
        _check_constraint_eos(fn, constraint, resolved)
    table = None if sampling.stop is None else _stop.device_table(fn, sampling.stop, tokenizer, vocab)
    # Whether the step needs its full branch: computed once here, not in every step (a dozen
    # tiny XLA:CPU ops cost ~40 us per step).
    heavy = jnp.any(extended_rows(resolved.extra) & (resolved.knobs.temperature > 0)) | rules_active(resolved.rules)
    tr = _Traced(keys=keys, sampling=resolved, pad_id=jnp.asarray(np.int32(pad)), max_new=jnp.asarray(np.int32(n)),
                 constraint=tables, stop_table=table, heavy=heavy)
    cfg = _Config(model_static, kind, b, pb, steps, window, vocab, procs, ns, num_top, S.uses_traced_rules(sampling))
    return cfg, n, p, *_auto_axes((model_arrays, _pad_prompt(prompt, pb), lengths, tr))


def _trim(out: GenerateOutput, p: int, n: int) -> GenerateOutput:
    """The bucketed result in the shapes the user asked for ([B, P + N] tokens, [B, N] steps)."""
    if out.tokens.shape[1] == p + n:
        return out
    return out._replace(
        tokens=out.tokens[:, : p + n],
        logprobs=out.logprobs[:, :n],
        raw_logprobs=out.raw_logprobs[:, :n],
        top_ids=None if out.top_ids is None else out.top_ids[:, :n],
        top_logprobs=None if out.top_logprobs is None else out.top_logprobs[:, :n],
    )


def _sampling(fn: str, sampling, **keywords) -> SamplingParams:
    return S.from_keywords(fn, sampling, **keywords)


# ---------------------------------------------------------------------------------------
# Public API


def generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    key: Any = None,
    sampling: SamplingParams | None = None,
    temperature: Any = UNSET,
    top_k: Any = UNSET,
    top_p: Any = UNSET,
    min_p: Any = UNSET,
    typical_p: Any = UNSET,
    repetition_penalty: Any = UNSET,
    presence_penalty: Any = UNSET,
    frequency_penalty: Any = UNSET,
    logit_bias: Any = UNSET,
    eos_id: Any = UNSET,
    min_new_tokens: Any = UNSET,
    stop_sequences: Sequence[Sequence[int]] | None = UNSET,
    stop: str | Sequence[str] | None = UNSET,
    tokenizer: Any = None,
    prompt_lengths: Any = None,
    context_size: int | None = None,
    pad_id: int = 0,
    processors: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    num_samples: int = 1,
    top_logprobs: int = 0,
    speculative: Any = None,
    constraint: Any = None,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens per prompt row, as one compiled computation.

    The call is a single ``jax.jit`` computation: a prefill, then a ``lax.while_loop`` of up
    to ``max_new_tokens`` steps on a fixed buffer (for KV-cached models both bucketed, so nearby
    prompt lengths and ``max_new_tokens`` share one compilation; see the module docstring).
    Each step applies, in vLLM's order, the
    repetition penalty (over prompt and generated tokens), the frequency/presence penalties
    (over generated tokens), ``logit_bias``, the EOS ban before ``min_new_tokens``, the user
    ``processors``, then draws with temperature / top-k / top-p / min-p / typical-p (exactly,
    see :func:`jaxdecode.sample`). The loop stops once every row has finished.

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
    object to avoid recompiling. Also static: the bucket of ``max_new_tokens`` and of the
    prompt length (the exact values for stateless models), the batch size, what
    :class:`jaxdecode.SamplingParams` keeps static (shapes, the number of EOS ids, the
    stop-sequence table's shape), ``context_size`` and ``processors`` (hashed by the identity
    of their functions: build them once). Every other value (knobs, penalties, keys, EOS /
    stop ids, ``min_new_tokens``, ``pad_id``, prompt content, ``prompt_lengths``) is traced.

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
      sampling: a :class:`jaxdecode.SamplingParams` holding every sampling knob and penalty
        (default ``SamplingParams()``: temperature 1, nothing truncated or penalised, the
        model's EOS ids). The keywords below are shorthand that builds one; passing both a
        keyword and ``sampling`` is a ValueError.
      temperature, top_k, top_p, min_p, typical_p: sampling knobs, scalars or [B] arrays
        (see :func:`jaxdecode.sample`); temperature 0 is greedy. Default temperature 1.
      repetition_penalty: > 0, scalar or [B]; 1 is off (CTRL / Hugging Face semantics).
      presence_penalty, frequency_penalty: finite, scalar or [B]; 0 is off (OpenAI / vLLM).
      logit_bias: ``{token_id: bias}``, or float[V] / float[B, V], added to the logits.
      eos_id: an id or a list of ids; a row stops after generating one (it is kept and
        counted in ``lengths``). Default: the model's ``config.eos_ids`` when it declares
        them (``jaxdecode.models`` models do), else none; ``eos_id=()`` turns stopping off.
      min_new_tokens: int >= 0, scalar or [B]; EOS ids are banned until the row has generated
        this many tokens.
      stop_sequences: list of token-id lists; a row stops once its generated tokens end with
        one of them (the sequence is kept). Matched within the generated tokens only.
      stop: a string or a list of strings (as vLLM / OpenAI ``stop``, Hugging Face
        ``stop_strings``): a row stops at the token in which its generated text first contains
        one, even when it spans several tokens or ends inside one. Matched inside the loop by
        a table lookup per step (built once on the host from the vocabulary, see
        ``jaxdecode._stop``); the generated text only (never the prompt). The tokens keep the
        completing token; ``out.stop_index`` says which string fired and
        :func:`jaxdecode.completions` returns the texts with it cut (or kept).
      tokenizer: needed with ``stop``: a ``jaxdecode.models`` tokenizer (anything with
        ``token_bytes()``) or a list of each token id's text.
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
        distribution as without it; the output's ``rounds``, ``proposed`` and ``accepted``
        hold the acceptance statistics (see :func:`jaxdecode.speculative_generate`).
      constraint: structured output: a :class:`jaxdecode.Constraint` (``jaxdecode.json_schema``,
        ``regex`` or ``choice``) for every row, or a list with one per prompt row (None for an
        unconstrained row; a prompt row's samples share it). Each step the logits are masked
        to the tokens the row's automaton allows, after the penalties and processors and
        before temperature / truncation; EOS is allowed only once the text is complete. The
        automata run on the device (tables padded to size buckets are traced arguments: a
        new constraint of a similar size does not recompile). Not with ``speculative``.
        The output's ``complete`` says which rows finished a valid text.

    Returns:
      A :class:`GenerateOutput` (``tokens``, ``lengths``, ``logprobs``, ``raw_logprobs``,
      ``num_generated``, and ``top_ids``/``top_logprobs`` when asked). Same inputs give
      bit-identical outputs.

    Raises:
      TypeError: non-integer prompt / lengths, a non-int ``max_new_tokens`` or
        ``context_size``, a bad key, a model that fits neither protocol.
      ValueError: a prompt that is not 2-D, ``max_new_tokens <= 0``, prompt length +
        ``max_new_tokens`` beyond ``model.config.max_seq_len``, ``prompt_lengths``
        outside [1, P] or of the wrong shape, ``context_size < 1``, a knob out of range,
        ``temperature > 0`` without a key, prompt / EOS / stop / bias ids outside [0, V), or a model
        whose logits are not [B, T, V], a keyword knob together with ``sampling``.

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
      >>> params = jaxdecode.SamplingParams(temperature=0.8, top_p=0.9)
      >>> out = jaxdecode.generate(model, jnp.array([[1, 2, 3]]), 4, key=jax.random.key(0), sampling=params)
    """
    fn = _FN
    sp = _sampling(fn, sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   typical_p=typical_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, logit_bias=logit_bias, eos_id=eos_id,
                   min_new_tokens=min_new_tokens, stop_sequences=stop_sequences, stop=stop)
    if speculative is not None and constraint is not None:
        raise ValueError(f"{fn}: `constraint` is not supported with `speculative` decoding (the verifier does not "
                         f"advance the automaton through the proposed tokens); drop one of them.")
    if speculative is not None:
        S.check_supported(fn, sp, ("temperature", "top_k", "top_p", "min_p", "typical_p", "eos_id"),
                          "with `speculative` decoding")
        unsupported = dict(processors=(processors, None), num_samples=(num_samples, 1),
                           top_logprobs=(top_logprobs, 0), context_size=(context_size, None))
        for name, (value, default) in unsupported.items():
            if value is not default and not (V.is_concrete(value) and np.ndim(value) == 0 and value == default):
                raise ValueError(f"{fn}: `{name}` is not supported with `speculative` decoding "
                                 f"(got {value!r}); leave it at its default {default!r}.")
        out = speculative_generate(model, prompt, max_new_tokens, proposer=speculative, key=key, sampling=sp,
                                   prompt_lengths=prompt_lengths, pad_id=pad_id, _fn=fn)
        return GenerateOutput(out.tokens, out.lengths, out.logprobs, out.raw_logprobs, out.num_generated,
                              rounds=out.rounds, proposed=out.proposed, accepted=out.accepted)
    cfg, n, p, arrays, prompt, lengths, tr = _prepare(
        fn, model, prompt, max_new_tokens, key=key, sampling=sp, prompt_lengths=prompt_lengths,
        context_size=context_size, pad_id=pad_id, processors=processors, num_samples=num_samples,
        top_logprobs=top_logprobs, constraint=constraint, tokenizer=tokenizer,
    )
    return _trim(_generate_jit(cfg, arrays, prompt, lengths, tr), p, n)


def generate_stream(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    chunk_size: int = 8,
    key: Any = None,
    sampling: SamplingParams | None = None,
    temperature: Any = UNSET,
    top_k: Any = UNSET,
    top_p: Any = UNSET,
    min_p: Any = UNSET,
    typical_p: Any = UNSET,
    repetition_penalty: Any = UNSET,
    presence_penalty: Any = UNSET,
    frequency_penalty: Any = UNSET,
    logit_bias: Any = UNSET,
    eos_id: Any = UNSET,
    min_new_tokens: Any = UNSET,
    stop_sequences: Sequence[Sequence[int]] | None = UNSET,
    stop: str | Sequence[str] | None = UNSET,
    tokenizer: Any = None,
    prompt_lengths: Any = None,
    context_size: int | None = None,
    pad_id: int = 0,
    processors: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    num_samples: int = 1,
    constraint: Any = None,
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
      Others: as :func:`generate` (``sampling`` or the keyword knobs; ``top_logprobs`` and
        ``speculative`` are generate-only).

    Yields:
      :class:`StreamChunk` (``tokens`` int32[B, c], ``logprobs`` float32[B, c], ``done`` bool[B]).

    Example:
      >>> import jax, jax.numpy as jnp, jaxdecode
      >>> model = lambda t: 5.0 * jax.nn.one_hot((t + 1) % 10, 10)
      >>> chunks = jaxdecode.generate_stream(model, jnp.array([[1]]), 5, chunk_size=2, temperature=0)
      >>> [c.tokens.tolist() for c in chunks]
      [[[2, 3]], [[4, 5]], [[6]]]
    """
    fn = _FN_STREAM
    chunk = V.check_count(fn, "chunk_size", chunk_size, 1)
    sp = _sampling(fn, sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   typical_p=typical_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, logit_bias=logit_bias, eos_id=eos_id,
                   min_new_tokens=min_new_tokens, stop_sequences=stop_sequences, stop=stop)
    cfg, n, _, arrays, prompt, lengths, tr = _prepare(
        fn, model, prompt, max_new_tokens, key=key, sampling=sp, prompt_lengths=prompt_lengths,
        context_size=context_size, pad_id=pad_id, processors=processors, num_samples=num_samples,
        constraint=constraint,
        tokenizer=tokenizer,
    )
    chunk = min(chunk, n)

    def stream() -> Iterator[StreamChunk]:
        state = _stream_init_jit(cfg, arrays, prompt, lengths, tr)
        for start in range(0, n, chunk):
            state, toks, lps, done, ok, count, fired = _stream_chunk_jit(cfg, chunk, arrays, tr, state, jnp.int32(start))
            c = min(chunk, n - start)
            yield StreamChunk(tokens=toks[:, :c], logprobs=lps[:, :c], done=done, complete=ok, num_generated=count,
                              stop_index=fired)
            if bool(jnp.all(done)):
                return

    return stream()
