"""Logits processors: penalties, biases, bans and length rules, composable like optax.

A processor is a :class:`LogitsProcessor`, a NamedTuple of two pure functions:

* ``init(context) -> state``: the processor's own state (most processors use ``()``).
* ``update(logits, state, context) -> (logits, state)``: rewrites the float32 logits ``[B, V]``.

History lives in the explicit :class:`DecodeContext` (token counts, prompt tokens, step), so
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
    """

    token_counts: jax.Array
    prompt_mask: jax.Array
    step: jax.Array

    @staticmethod
    def from_prompt(prompt: Any, vocab_size: int, prompt_lengths: Any = None) -> "DecodeContext":
        """A context for the first new token after ``prompt`` ([B, P] int, right-padded).

        Args:
          prompt: int array [B, P].
          vocab_size: V.
          prompt_lengths: int array [B] of real lengths (default: all P).
        """
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2:
            raise ValueError(f"DecodeContext.from_prompt: `prompt` must have shape [B, P], got {tuple(prompt.shape)}.")
        b, p = prompt.shape
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
        return _context_from_prompt(prompt.astype(jnp.int32), lengths, vocab_size)

    def advance(self, tokens: jax.Array, active: jax.Array | None = None) -> "DecodeContext":
        """The context after each row generated ``tokens`` (int32[B]); rows with ``active``
        False (finished) are left unchanged."""
        b = tokens.shape[0]
        inc = jnp.ones((b,), jnp.int32) if active is None else active.astype(jnp.int32)
        counts = self.token_counts.at[jnp.arange(b), tokens].add(inc)
        return DecodeContext(counts, self.prompt_mask, self.step + inc)


def _context_from_prompt(prompt: jax.Array, lengths: jax.Array, vocab_size: int) -> DecodeContext:
    b, p = prompt.shape
    valid = jnp.arange(p)[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, p))
    ids = jnp.clip(prompt, 0, vocab_size - 1)
    mask = jnp.zeros((b, vocab_size), bool).at[rows, ids].max(valid)
    return DecodeContext(
        token_counts=jnp.zeros((b, vocab_size), jnp.int32),
        prompt_mask=mask,
        step=jnp.zeros((b,), jnp.int32),
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
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{fn}: `{name}` has ids {ids.tolist()}; each must be in [0, {vocab_size}).")
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
