"""Logits processors: penalties, biases, bans and length rules, composable like optax.

A processor is a :class:`LogitsProcessor`, a NamedTuple of two pure functions:

* ``init(context) -> state``: the processor's own state (most processors use ``()``).
* ``update(logits, state, context) -> (logits, state)``: rewrites the float32 logits ``[B, V]``.

History lives in the explicit :class:`DecodeContext` (token counts, prompt tokens, step, the
token buffer with each row's length, and the previous token), so
processors that need it never keep hidden state. Processors compose with :func:`chain`, in
order. Removed tokens get ``-inf`` (the library's one masking convention).

vLLM's order is used by :func:`jaxdecode.generate`: repetition penalty first, then
frequency/presence penalties, then logit bias and bans, then the length rules.

Example:
  >>> import jax.numpy as jnp, jaxdecode
  >>> ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[2, 2, 3]]), vocab_size=5)
  >>> proc = jaxdecode.chain(jaxdecode.repetition_penalty(2.0), jaxdecode.ban_tokens([0]))
  >>> out, _ = proc.update(jnp.array([[1.0, 1.0, 4.0, -2.0, 0.5]]), proc.init(ctx), ctx)
  >>> out.tolist()
  [[-inf, 1.0, 2.0, -4.0, 0.5]]
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _validate as V


class DecodeContext(NamedTuple):
    """What a logits processor may read at a decode step. All arrays have batch size B.

    Attributes:
      token_counts: int32[B, V]. How many times each token was generated so far in the row
        (prompt excluded): the frequency/presence penalties' history.
      prompt_mask: bool[B, V]. Whether each token occurs in the row's prompt (its real
        tokens only, padding excluded): with ``token_counts > 0`` it is the repetition
        penalty's history.
      step: int32[B]. How many tokens the row has generated so far (0 for the first new one).
      tokens: int32[B, L]. The row's token buffer: its real tokens (prompt, then the tokens
        generated so far) in slots ``[0, lengths[b])``, padding after. L is fixed for the
        whole call (at least prompt length + max_new_tokens), so processors that read it
        (n-gram bans, DRY, grammars) compile once.
      lengths: int32[B]. Real tokens per row (prompt + generated). The generated tokens are
        slots ``[lengths - step, lengths)``; see :meth:`generated_mask`.
      prev_token: int32[B]. The token drawn at the previous step (the last prompt token at
        step 0): the row's last real token, ``tokens[b, lengths[b] - 1]``.
    """

    token_counts: jax.Array
    prompt_mask: jax.Array
    step: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    prev_token: jax.Array

    @staticmethod
    def from_prompt(prompt: Any, vocab_size: int, prompt_lengths: Any = None, max_length: int | None = None,
                    pad_id: int = 0) -> "DecodeContext":
        """A context for the first new token after ``prompt`` ([B, P] int, right-padded).

        Args:
          prompt: int array [B, P].
          vocab_size: V.
          prompt_lengths: int array [B] of real lengths (default: all P).
          max_length: L, the token buffer's length (default P; decoders use P + max_new_tokens).
          pad_id: the value of buffer slots past each row's length.
        """
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2:
            raise ValueError(f"DecodeContext.from_prompt: `prompt` must have shape [B, P], got {tuple(prompt.shape)}.")
        b, p = prompt.shape
        if max_length is not None and max_length < p:
            raise ValueError(f"DecodeContext.from_prompt: `max_length` must be >= the prompt length {p}, "
                             f"got {max_length}.")
        lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
        if V.is_concrete(prompt) and V.is_concrete(lengths):
            # Padding may hold anything; a real token outside the vocabulary is an error.
            ids, real = np.asarray(prompt), np.arange(p)[None, :] < np.asarray(lengths)[:, None]
            bad = real & ((ids < 0) | (ids >= vocab_size))
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ValueError(
                    f"DecodeContext.from_prompt: `prompt` has token id {ids[row, col]} at [{row}, {col}], "
                    f"outside the vocabulary [0, {vocab_size})."
                )
        return _context_from_prompt(prompt.astype(jnp.int32), lengths, vocab_size, max_length or p, pad_id)

    def advance(self, tokens: jax.Array, active: jax.Array | None = None) -> "DecodeContext":
        """The context after each row generated ``tokens`` (int32[B]); rows with ``active``
        False (finished) are left unchanged. The token is written to the buffer at the row's
        length (dropped when the buffer is full)."""
        b = tokens.shape[0]
        tokens = tokens.astype(jnp.int32)
        on = jnp.ones((b,), bool) if active is None else active
        inc = on.astype(jnp.int32)
        rows = jnp.arange(b)
        counts = self.token_counts.at[rows, tokens].add(inc)
        slot = jnp.where(on, self.lengths, self.tokens.shape[1])  # out of range: dropped
        buf = self.tokens.at[rows, slot].set(tokens, mode="drop")
        return DecodeContext(counts, self.prompt_mask, self.step + inc, buf, self.lengths + inc,
                             jnp.where(on, tokens, self.prev_token))

    def generated_mask(self) -> jax.Array:
        """bool[B, L]: the buffer slots holding the row's generated tokens."""
        slots = jnp.arange(self.tokens.shape[1], dtype=jnp.int32)[None, :]
        return (slots >= (self.lengths - self.step)[:, None]) & (slots < self.lengths[:, None])


def _context_from_prompt(prompt: jax.Array, lengths: jax.Array, vocab_size: int, max_length: int,
                         pad_id: Any = 0) -> DecodeContext:
    b, p = prompt.shape
    valid = jnp.arange(p)[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, p))
    ids = jnp.clip(prompt, 0, vocab_size - 1)
    mask = jnp.zeros((b, vocab_size), bool).at[rows, ids].max(valid)
    buf = jnp.where(valid, prompt, jnp.asarray(pad_id, jnp.int32))
    if max_length > p:
        buf = jnp.concatenate([buf, jnp.full((b, max_length - p), pad_id, jnp.int32)], axis=1)
    prev = jnp.take_along_axis(prompt, jnp.clip(lengths - 1, 0, p - 1)[:, None], axis=1)[:, 0]
    return DecodeContext(
        token_counts=jnp.zeros((b, vocab_size), jnp.int32),
        prompt_mask=mask,
        step=jnp.zeros((b,), jnp.int32),
        tokens=buf.astype(jnp.int32),
        lengths=lengths,
        prev_token=prev,
    )


class LogitsProcessor(NamedTuple):
    """A pure logits transformation: ``init(context) -> state`` and
    ``update(logits, state, context) -> (logits, state)``."""

    init: Callable[[DecodeContext], Any]
    update: Callable[[jax.Array, Any, DecodeContext], tuple[jax.Array, Any]]


def _stateless(fn: Callable[[jax.Array, DecodeContext], jax.Array]) -> LogitsProcessor:
    return LogitsProcessor(init=lambda ctx: (), update=lambda logits, state, ctx: (fn(logits, ctx), state))


def identity() -> LogitsProcessor:
    """A processor that returns the logits unchanged."""
    return _stateless(lambda logits, ctx: logits)


def chain(*processors: LogitsProcessor) -> LogitsProcessor:
    """Applies processors in order; the state is the tuple of their states.

    Example:
      >>> import jaxdecode
      >>> proc = jaxdecode.chain(jaxdecode.frequency_presence_penalty(0.5, 0.1), jaxdecode.ban_tokens([2]))
    """
    for i, p in enumerate(processors):
        if not isinstance(p, LogitsProcessor):
            raise TypeError(f"jaxdecode.chain: argument {i} must be a LogitsProcessor, got {type(p).__name__}.")

    def init(ctx):
        return tuple(p.init(ctx) for p in processors)

    def update(logits, state, ctx):
        # As optax's chain: a state that is not this chain's (a different number of
        # processors) is an error; zip would silently skip the extra processors.
        if not isinstance(state, tuple) or len(state) != len(processors):
            got = f"a tuple of {len(state)} states" if isinstance(state, tuple) else f"a {type(state).__name__}"
            raise ValueError(
                f"jaxdecode.chain: `state` must be the tuple of the {len(processors)} processors' states "
                f"(from this chain's init(context)), got {got}."
            )
        new_states = []
        for p, s in zip(processors, state):
            logits, s = p.update(logits, s, ctx)
            new_states.append(s)
        return logits, tuple(new_states)

    return LogitsProcessor(init, update)


def _row_knob(value: jax.Array, logits: jax.Array, name: str = "knob") -> jax.Array:
    """A scalar or [B] knob as [B, 1] against [B, V] logits (shape checked at trace time)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    if value.shape != logits.shape[: value.ndim] or value.ndim >= logits.ndim:
        raise ValueError(
            f"jaxdecode: `{name}` has shape {tuple(value.shape)}; expected a scalar or one value per row, "
            f"shape {tuple(logits.shape[:-1])}, for logits of shape {tuple(logits.shape)}."
        )
    return value.reshape(value.shape + (1,) * (logits.ndim - value.ndim))


# -- functional forms -----------------------------------------------------------------


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: Any) -> jax.Array:
    """CTRL / Hugging Face repetition penalty on the tokens in ``seen`` (bool [B, V]):
    positive logits are divided by ``penalty``, negative ones multiplied (1 is off)."""
    pen = _row_knob(penalty, logits, "repetition_penalty")
    logits = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(logits > 0, logits / pen, logits * pen), logits)


def apply_frequency_presence_penalty(logits: jax.Array, counts: jax.Array, frequency: Any, presence: Any) -> jax.Array:
    """OpenAI semantics: ``logit - frequency * count - presence * [count > 0]``."""
    f = _row_knob(frequency, logits, "frequency_penalty")
    p = _row_knob(presence, logits, "presence_penalty")
    counts = counts.astype(jnp.float32)
    return logits.astype(jnp.float32) - f * counts - p * (counts > 0)


# -- factories ------------------------------------------------------------------------


def repetition_penalty(penalty: Any) -> LogitsProcessor:
    """Repetition penalty over prompt and generated tokens (CTRL / Hugging Face semantics).

    Args:
      penalty: > 0, scalar or [B]. 1 is off; > 1 discourages repeats.
    """
    V.check_knob("jaxdecode.repetition_penalty", "penalty", penalty, low=0.0, low_open=True, allowed="a number > 0 (1 means off)")
    return _stateless(lambda l, ctx: apply_repetition_penalty(l, ctx.prompt_mask | (ctx.token_counts > 0), penalty))


def frequency_presence_penalty(frequency: Any = 0.0, presence: Any = 0.0) -> LogitsProcessor:
    """Frequency and presence penalties over generated tokens (OpenAI / vLLM semantics).

    Args:
      frequency: scalar or [B]; subtracted once per previous occurrence.
      presence: scalar or [B]; subtracted once if the token occurred at all.
    """
    for name, v in (("frequency", frequency), ("presence", presence)):
        V.check_knob("jaxdecode.frequency_presence_penalty", name, v, allowed="a finite number (0 means off)")
        if V.is_concrete(v) and not np.all(np.isfinite(np.asarray(v, np.float64))):
            # inf * (count 0) would turn every unseen token's logit into NaN.
            raise ValueError(
                f"jaxdecode.frequency_presence_penalty: `{name}` got {V._describe(v)}; allowed: a finite number (0 means off)."
            )
    return _stateless(lambda l, ctx: apply_frequency_presence_penalty(l, ctx.token_counts, frequency, presence))


def logit_bias(bias: Any, vocab_size: int | None = None) -> LogitsProcessor:
    """Adds a bias to the logits.

    Args:
      bias: a dense float array [V] or [B, V], or a dict ``{token_id: bias}`` (then
        ``vocab_size`` is required).
      vocab_size: V, for the dict form.
    """
    if isinstance(bias, dict):
        if vocab_size is None:
            raise ValueError("jaxdecode.logit_bias: a dict `bias` needs `vocab_size`.")
        dense = np.zeros((vocab_size,), np.float32)
        for tok, val in bias.items():
            if not 0 <= int(tok) < vocab_size:
                raise ValueError(f"jaxdecode.logit_bias: token id {tok} is outside [0, {vocab_size}).")
            dense[int(tok)] = float(val)
        bias = dense
    bias = jnp.asarray(bias, jnp.float32)
    return _stateless(lambda l, ctx: l.astype(jnp.float32) + bias)


def _token_mask(fn: str, name: str, ids: Sequence[int] | Any, vocab_size: int) -> jax.Array:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size:
        V.token_ids(fn, name, ids, vocab_size)  # the shared range check and message
    mask = np.zeros((vocab_size,), bool)
    mask[ids] = True
    return jnp.asarray(mask)


def ban_tokens(ids: Sequence[int]) -> LogitsProcessor:
    """Sets the logits of ``ids`` to -inf at every step."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)

    def fn(l, ctx):
        mask = _token_mask("jaxdecode.ban_tokens", "ids", ids, l.shape[-1])
        return jnp.where(mask, -jnp.inf, l.astype(jnp.float32))

    return _stateless(fn)


def min_new_tokens(n: Any, eos_ids: Sequence[int]) -> LogitsProcessor:
    """Bans the EOS ids while a row has generated fewer than ``n`` tokens (scalar or [B])."""
    V.check_knob("jaxdecode.min_new_tokens", "n", n, low=0, integer=True, allowed="an integer >= 0")
    eos = np.asarray(eos_ids, dtype=np.int64).reshape(-1)

    def fn(l, ctx):
        mask = _token_mask("jaxdecode.min_new_tokens", "eos_ids", eos, l.shape[-1])
        early = (ctx.step < jnp.asarray(n, jnp.int32))[:, None]
        return jnp.where(early & mask, -jnp.inf, l.astype(jnp.float32))

    return _stateless(fn)


def penalties(repetition: Any = 1.0, frequency: Any = 0.0, presence: Any = 0.0) -> LogitsProcessor:
    """Repetition, then frequency/presence penalties (vLLM's order) as one processor."""
    return chain(repetition_penalty(repetition), frequency_presence_penalty(frequency, presence))


def no_repeat_ngram(n: int) -> LogitsProcessor:
    """Bans every token that would repeat an n-gram already in the row (prompt included).

    Hugging Face's ``no_repeat_ngram_size``: with the row's tokens ``x[0..T)``, a token ``t``
    is banned when ``x[T-n+1..T) + [t]`` occurs as an n-gram in ``x``; nothing is banned while
    ``T < n - 1``. ``n = 1`` bans every token already present. Reads the context's token
    buffer, so it works in :func:`jaxdecode.generate` (``processors=``) with no extra state.

    Args:
      n: int >= 1 (static), the n-gram size.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[1, 2, 3, 1]]), vocab_size=5)
      >>> out, _ = jaxdecode.no_repeat_ngram(2).update(jnp.zeros((1, 5)), (), ctx)
      >>> out.tolist()  # "1 2" occurred, so after "... 1" the token 2 is banned
      [[0.0, 0.0, -inf, 0.0, 0.0]]
    """
    n = V.check_count("jaxdecode.no_repeat_ngram", "n", n, 1, "the n-gram size")

    def fn(logits, ctx):
        banned = ngram_banned(ctx.tokens, ctx.lengths, jnp.int32(n), logits.shape[-1])
        return jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))

    return _stateless(fn)


def ngram_banned(tokens: jax.Array, lengths: jax.Array, n: Any, vocab: int) -> jax.Array:
    """bool[B, V]: the tokens :func:`no_repeat_ngram` bans, for a traced n-gram size per row.

    ``n`` is a scalar or int32[B]; 0 bans nothing in that row. The one implementation of the
    rule, used by the processor and by ``SamplingParams.no_repeat_ngram_size``. A loop over
    the n-gram's first ``max(n) - 1`` offsets compares the buffer, shifted, with the row's
    last ``n - 1`` tokens.
    """
    b, total = tokens.shape
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b,))
    starts = jnp.arange(total, dtype=jnp.int32)[None, :]  # n-gram start slots
    # The n-gram starting at j lies inside the row; the row holds its n - 1 token prefix.
    valid = (n[:, None] >= 1) & (starts + n[:, None] <= lengths[:, None]) & (lengths[:, None] >= n[:, None] - 1)
    padded = jnp.concatenate([tokens, jnp.zeros_like(tokens)], axis=1)

    def body(t, match):
        shifted = lax.dynamic_slice_in_dim(padded, t, total, axis=1)  # tokens[j + t]
        tail = jnp.take_along_axis(tokens, jnp.clip(lengths - (n - 1) + t, 0, total - 1)[:, None], axis=1)
        return match & ((shifted == tail) | (t >= n - 1)[:, None])

    match = lax.fori_loop(0, jnp.max(n) - 1, body, valid)
    last = jnp.take_along_axis(padded, jnp.clip(starts + n[:, None] - 1, 0, 2 * total - 1), axis=1)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], last.shape)
    return jnp.zeros((b, vocab), bool).at[rows, jnp.clip(last, 0, vocab - 1)].max(match)


# -- SamplingParams' history rules ---------------------------------------------------------


class SamplingRules(NamedTuple):
    """The history-based rules of :class:`jaxdecode.SamplingParams` as traced arrays (B rows,
    V vocabulary); None marks a list-valued rule that is off (static).

    Sequence tables are int32[S, M], right-aligned (row s's sequence in its last ``lens[s]``
    columns), with their lengths int32[S], shared by every row; or per row (the serving
    engine's slots): int32[B, S, M] with lengths [B, S] (0: an unused entry) and values [B, S].
    Token masks are bool[V] (shared) or [B, V] (per row).
    """

    penalty_last_n: jax.Array  # int32[B]; 0 = whole history
    dry_multiplier: jax.Array  # float32[B]; 0 = off
    dry_base: jax.Array  # float32[B]
    dry_allowed_length: jax.Array  # int32[B]
    dry_penalty_last_n: jax.Array  # int32[B]; 0 = whole history
    dry_breakers: Any  # (int32[S, M], int32[S]) or None
    no_repeat_ngram_size: jax.Array  # int32[B]; 0 = off
    bad_words: Any  # (int32[S, M], int32[S]) or None
    sequence_bias: Any  # (int32[S, M], int32[S], float32[S]) or None
    allowed: Any  # bool[V] or None
    suppress: Any  # bool[V] or None
    begin_suppress: Any  # bool[V] or None
    decay: Any  # (start int32[B], factor float32[B]) or None


def penalty_history(ctx: DecodeContext, last_n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(seen bool[B, V], counts int32[B, V])``: the repetition penalty's history (prompt and
    generated tokens) and the frequency/presence penalties' counts (generated tokens), counting
    only the row's last ``last_n`` tokens where ``last_n > 0`` (llama.cpp's ``penalty_last_n``).
    The windowed count is skipped (``lax.cond``) when no row uses a window."""
    full_seen = ctx.prompt_mask | (ctx.token_counts > 0)
    on = last_n > 0

    def windowed():
        b, total = ctx.tokens.shape
        slots = jnp.arange(total, dtype=jnp.int32)[None, :]
        inside = (slots < ctx.lengths[:, None]) & (slots >= (ctx.lengths - last_n)[:, None])
        generated = slots >= (ctx.lengths - ctx.step)[:, None]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], ctx.tokens.shape)
        ids = jnp.clip(ctx.tokens, 0, ctx.token_counts.shape[1] - 1)
        counts = jnp.zeros_like(ctx.token_counts).at[rows, ids].add((inside & generated).astype(jnp.int32))
        seen = jnp.zeros_like(full_seen).at[rows, ids].max(inside)
        return jnp.where(on[:, None], seen, full_seen), jnp.where(on[:, None], counts, ctx.token_counts)

    return lax.cond(jnp.any(on), windowed, lambda: (full_seen, ctx.token_counts))


def _per_row(table: jax.Array, lens: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """A sequence table shared by every row ([S, M], lengths [S]) or per row ([B, S, M], [B, S])
    as the per-row form (a broadcast: no copy of a shared table)."""
    return jnp.broadcast_to(table, (b,) + table.shape[-2:]), jnp.broadcast_to(lens, (b, table.shape[-2]))


def _prefix_match(tokens: jax.Array, lengths: jax.Array, table: jax.Array, lens: jax.Array) -> jax.Array:
    """bool[B, S]: the row's last ``lens[s] - 1`` tokens equal sequence s without its last token
    (always true for one-token sequences). ``table`` is [S, M] (shared) or [B, S, M] (per row,
    lengths [B, S]); an entry of length 0 (a per-row table's padding) never matches."""
    b, total = tokens.shape
    table, lens = _per_row(table, lens, b)
    m = table.shape[-1]
    if m == 1:
        return lens > 0
    cols = jnp.arange(m - 1, dtype=jnp.int32)
    tail = jnp.take_along_axis(tokens, jnp.clip(lengths[:, None] - (m - 1) + cols[None, :], 0, total - 1), axis=1)
    used = cols[None, None, :] >= (m - lens)[:, :, None]  # [B, S, M - 1]
    eq = (tail[:, None, :] == table[:, :, :-1]) | ~used
    return jnp.all(eq, axis=-1) & (lengths[:, None] >= lens - 1) & (lens > 0)


def _scatter_last(table: jax.Array, values: jax.Array, b: int, vocab: int, op: str) -> jax.Array:
    """[B, V]: ``values`` [B, S] scattered onto each sequence's last token (max or add);
    ``table`` [S, M] or [B, S, M]."""
    last = jnp.broadcast_to(jnp.clip(table[..., -1], 0, vocab - 1), values.shape)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], values.shape)
    base = jnp.zeros((b, vocab), values.dtype)
    return base.at[rows, last].max(values) if op == "max" else base.at[rows, last].add(values)


def dry_penalty(tokens: jax.Array, lengths: jax.Array, multiplier: jax.Array, base: jax.Array,
                allowed_length: jax.Array, last_n: jax.Array, breakers: Any, vocab: int) -> jax.Array:
    """float32[B, V]: llama.cpp's DRY penalty (subtract it from the logits).

    Over the row's last ``last_n`` tokens (all when 0): the match may not reach back past the
    end of the latest sequence breaker (``rep_limit``: the tokens after it); for every earlier
    position j, ``len[j]`` is the longest common suffix of the tokens ending at j and the whole
    context (at most ``rep_limit``, inside the window); the token at j + 1 would extend that
    repeat, so a token's repeat length is the max over its occurrences after a match. A token
    with length n >= ``allowed_length`` gets ``multiplier * base ** (n - allowed_length)`` (the
    exponent clamped so the power stays finite), unless it is a one-token breaker. The
    suffix-match loop runs as long as some row's longest repeat (a ``while_loop``).
    """
    b, total = tokens.shape
    w = jnp.where(last_n > 0, jnp.minimum(last_n, lengths), lengths)
    start = lengths - w  # window [start, length)
    slots = jnp.arange(total, dtype=jnp.int32)[None, :]
    in_window = (slots >= start[:, None]) & (slots < lengths[:, None])
    rep_limit = w
    single = jnp.zeros((b, vocab), bool)
    if breakers is not None:
        table, lens = _per_row(*breakers, b)  # [B, S, M], [B, S]: shared or per row
        s_count, m = table.shape[1:]
        # match[b, k, j]: breaker k occurs starting at slot j, wholly inside the window.
        padded = jnp.concatenate([tokens, jnp.zeros((b, m), tokens.dtype)], axis=1)
        best = jnp.full((b, total), -1, jnp.int32)  # the longest breaker starting at j
        for k in range(s_count):
            seq_len = lens[:, k][:, None]  # [B, 1]; 0: a per-row table's unused entry
            ok = in_window & (slots + seq_len <= lengths[:, None]) & (seq_len > 0)
            for t in range(m):
                # column m - seq_len + t of the right-aligned table is the breaker's t-th token
                want = jnp.take_along_axis(table[:, k], jnp.clip(m - seq_len + t, 0, m - 1), axis=1)
                ok &= (padded[:, t: t + total] == want) | (t >= seq_len)
            best = jnp.where(ok, jnp.maximum(best, seq_len), best)
        head = jnp.max(jnp.where(best >= 0, slots, -1), axis=-1)  # the latest breaker start
        head_len = jnp.take_along_axis(best, jnp.maximum(head, 0)[:, None], axis=1)[:, 0]
        rep_limit = jnp.where(head >= 0, lengths - head - head_len, w)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], lens.shape)
        single = single.at[rows, jnp.where(lens == 1, table[..., -1], vocab)].set(True, mode="drop")
    on = (multiplier > 0) & (rep_limit >= allowed_length) & (lengths >= 2)

    # len[j] for j in [start, length - 1): grow while x[j - k] == x[length - 1 - k].
    cand = in_window & (slots < (lengths - 1)[:, None]) & on[:, None]
    padded = jnp.concatenate([jnp.zeros_like(tokens), tokens], axis=1)  # index j - k + total

    def cond(carry):
        k, alive, _ = carry
        return jnp.any(alive)

    def body(carry):
        k, alive, length = carry
        back = lax.dynamic_slice_in_dim(padded, total - k, total, axis=1)  # x[j - k]
        last = jnp.take_along_axis(tokens, jnp.clip(lengths - 1 - k, 0, total - 1)[:, None], axis=1)
        alive &= (back == last) & (slots - k >= start[:, None]) & (k < rep_limit)[:, None]
        return k + 1, alive, length + alive.astype(jnp.int32)

    _, _, rep = lax.while_loop(cond, body, (jnp.int32(0), cand, jnp.zeros((b, total), jnp.int32)))
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # x[j + 1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], tokens.shape)
    longest = jnp.full((b, vocab), -1, jnp.int32).at[rows, jnp.clip(nxt, 0, vocab - 1)].max(
        jnp.where(cand & (rep >= allowed_length[:, None]), rep, -1))
    # llama.cpp clamps the exponent to log(FLT_MAX) / log(base) when base > 1.000001.
    max_exp = jnp.where(base > 1.000001, jnp.floor(88.7228391 / jnp.log(jnp.maximum(base, 1.000001))), jnp.inf)
    expo = jnp.minimum((longest - allowed_length[:, None]).astype(jnp.float32), max_exp[:, None])
    pen = multiplier[:, None] * jnp.power(base[:, None], expo)
    return jnp.where((longest >= allowed_length[:, None]) & (longest >= 0) & ~single, pen, 0.0)


def rules_active(rules: SamplingRules) -> jax.Array:
    """bool[]: some row uses a traced per-row history rule (penalty window, DRY, n-grams)."""
    return jnp.any(rules.penalty_last_n > 0) | jnp.any(rules.dry_multiplier > 0) | jnp.any(
        rules.no_repeat_ngram_size > 0)


def apply_rules(logits: jax.Array, ctx: DecodeContext, rules: SamplingRules, eos_ids: Any,
                traced_rules: bool = True) -> jax.Array:
    """SamplingParams' history rules, in order: DRY -> sequence bias -> exponential decay length
    penalty -> no-repeat n-gram -> bad words -> allowed ids -> suppress tokens -> begin-suppress
    tokens. Per-row numeric rules are skipped (``lax.cond``) when no row uses them (and left
    out with ``traced_rules=False``, static); list rules that are None are absent from the
    compiled step."""
    b, vocab = logits.shape
    l = logits.astype(jnp.float32)
    dry_on = rules.dry_multiplier > 0
    l = l if not traced_rules else lax.cond(jnp.any(dry_on), lambda: l - dry_penalty(
        ctx.tokens, ctx.lengths, jnp.where(dry_on, rules.dry_multiplier, 0.0), rules.dry_base,
        rules.dry_allowed_length, rules.dry_penalty_last_n, rules.dry_breakers, vocab), lambda: l)
    if rules.sequence_bias is not None:
        table, lens, values = rules.sequence_bias
        match = _prefix_match(ctx.tokens, ctx.lengths, table, lens)
        l = l + _scatter_last(table, jnp.where(match, values, 0.0), b, vocab, "add")  # values [S] or [B, S]
    if rules.decay is not None and eos_ids is not None:
        # HF: after `start` generated tokens, EOS logits += |logit| * (factor ** (step - start) - 1).
        start, factor = rules.decay
        k = (ctx.step - start).astype(jnp.float32)
        grow = jnp.where(ctx.step > start, jnp.power(factor, k) - 1.0, 0.0)[:, None]
        l = jnp.where(eos_mask(eos_ids, b, vocab) & jnp.isfinite(l), l + jnp.abs(l) * grow, l)
    ngram_on = rules.no_repeat_ngram_size > 0
    l = l if not traced_rules else lax.cond(jnp.any(ngram_on), lambda: jnp.where(
        ngram_banned(ctx.tokens, ctx.lengths, rules.no_repeat_ngram_size, vocab), -jnp.inf, l), lambda: l)
    if rules.bad_words is not None:
        table, lens = rules.bad_words
        banned = _scatter_last(table, _prefix_match(ctx.tokens, ctx.lengths, table, lens), b, vocab, "max")
        l = jnp.where(banned, -jnp.inf, l)
    if rules.allowed is not None:
        l = jnp.where(_row_mask(rules.allowed), l, -jnp.inf)
    if rules.suppress is not None:
        l = jnp.where(_row_mask(rules.suppress), -jnp.inf, l)
    if rules.begin_suppress is not None:
        l = jnp.where(_row_mask(rules.begin_suppress) & (ctx.step == 0)[:, None], -jnp.inf, l)
    return l


def _row_mask(mask: jax.Array) -> jax.Array:
    """A token mask shared by every row (bool[V]) or per row ([B, V]), against [B, V] logits."""
    return mask[None, :] if mask.ndim == 1 else mask


def eos_mask(eos_ids: jax.Array, b: int, vocab: int) -> jax.Array:
    """bool[1, V] or [B, V]: the EOS ids ``int32[E]`` (shared) or ``[B, E]`` (per row) as a
    mask; ids outside ``[0, V)`` (a per-row table's padding) mark nothing."""
    if eos_ids.ndim == 1:
        return jnp.zeros((vocab,), bool).at[eos_ids].set(True, mode="drop")[None, :]
    return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], eos_ids].set(True, mode="drop")


def process_logits(raw: jax.Array, ctx: DecodeContext, *, repetition_penalty: Any, frequency_penalty: Any,
                   presence_penalty: Any, logit_bias: Any, eos_ids: Any, min_new_tokens: Any,
                   rules: SamplingRules | None = None, full: bool = True) -> jax.Array:
    """The built-in logits processing of one decode step, in vLLM's order: repetition penalty
    (prompt + generated tokens) -> frequency / presence penalties (generated tokens; both over
    the last ``rules.penalty_last_n`` tokens where set) -> logit bias -> :func:`apply_rules`
    -> the EOS ban before ``min_new_tokens``.

    The one implementation for :func:`jaxdecode.generate`'s step and the serving engine's.
    Every knob is a scalar or per row ([B]); ``logit_bias`` is None, [V] or [B, V];
    ``eos_ids`` None, int32[E] or [B, E] (ids >= V unused); ``rules`` is None (no history
    rules at all) or a :class:`SamplingRules` whose tables are shared or per row.
    ``full=False`` (static) leaves out the per-row traced rules (penalty window, DRY, n-grams);
    the decoders take it when no row uses them.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> from jaxdecode._processors import process_logits
      >>> ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[2]]), vocab_size=4)
      >>> process_logits(jnp.array([[1.0, 1.0, 2.0, 1.0]]), ctx, repetition_penalty=2.0, frequency_penalty=0.0,
      ...                presence_penalty=0.0, logit_bias=None, eos_ids=jnp.array([3]), min_new_tokens=1).tolist()
      [[1.0, 1.0, 1.0, -inf]]
    """
    if full and rules is not None:
        seen, counts = penalty_history(ctx, rules.penalty_last_n)
    else:
        seen, counts = ctx.prompt_mask | (ctx.token_counts > 0), ctx.token_counts
    l = apply_repetition_penalty(raw, seen, repetition_penalty)
    l = apply_frequency_presence_penalty(l, counts, frequency_penalty, presence_penalty)
    if logit_bias is not None:
        l = l + logit_bias
    if rules is not None:
        l = apply_rules(l, ctx, rules, eos_ids, traced_rules=full)
    if eos_ids is not None:
        early = (ctx.step < min_new_tokens)[:, None]
        l = jnp.where(early & eos_mask(eos_ids, l.shape[0], l.shape[1]), -jnp.inf, l)
    return l


LLAMA_CPP_DRY_BREAKERS = ("\n", ":", "\"", "*")


def dry_sequence_breakers(tokenizer: Any, strings: Sequence[str] = LLAMA_CPP_DRY_BREAKERS) -> list[list[int]]:
    """DRY sequence breakers as token-id sequences: each string encoded by ``tokenizer``.

    Default: llama.cpp's breakers ``["\\n", ":", "\\"", "*"]``. Pass the result as
    ``SamplingParams(dry_sequence_breakers=...)``. Unlike llama.cpp, which also matches
    tokens that merely start with a breaker's text, a breaker here is exactly its encoding.

    Args:
      tokenizer: anything with ``encode(text) -> list[int]`` (a ``jaxdecode.models`` tokenizer).
      strings: the breaker strings.

    Example:
      >>> import jaxdecode
      >>> class Chars:  # a toy tokenizer: one id per character
      ...     def encode(self, text):
      ...         return [ord(c) for c in text]
      >>> jaxdecode.dry_sequence_breakers(Chars(), ["\\n", "::"])
      [[10], [58, 58]]
    """
    out = []
    for text in strings:
        if not isinstance(text, str) or not text:
            raise ValueError(f"jaxdecode.dry_sequence_breakers: each breaker must be a non-empty string, got {text!r}.")
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise ValueError(f"jaxdecode.dry_sequence_breakers: {text!r} encodes to no tokens.")
        out.append(ids)
    return out


def stop_sequence_match(tokens, lengths, generated, seqs, seq_lens):
    """bool[B]: each row's generated tokens end with one of its stop sequences.

    ``tokens`` int32[B, L] and ``lengths`` [B] as in :class:`DecodeContext`, ``generated`` [B]
    the tokens generated so far; ``seqs`` int32[S, M] (shared) or [B, S, M] (per row),
    right-aligned, with ``seq_lens`` [S] or [B, S] (0: an unused entry). A sequence only
    matches once the row has generated at least its length (never across into the prompt)."""
    b, m = tokens.shape[0], seqs.shape[-1]
    seqs = jnp.broadcast_to(seqs, (b,) + seqs.shape[-2:])
    seq_lens = jnp.broadcast_to(seq_lens, (b, seqs.shape[1]))
    pos = lengths[:, None] - m + jnp.arange(m, dtype=jnp.int32)[None, :]
    tail = jnp.take_along_axis(tokens, jnp.clip(pos, 0, tokens.shape[1] - 1), axis=1)  # [B, M]
    used = jnp.arange(m, dtype=jnp.int32)[None, None, :] >= (m - seq_lens)[:, :, None]  # [B, S, M]
    eq = (tail[:, None, :] == seqs) | ~used
    ok = (seq_lens > 0) & (generated[:, None] >= seq_lens)
    return jnp.any(jnp.all(eq, axis=-1) & ok, axis=-1)
