"""Weight-free fake language models for tests of decoding (generate, beam search, ...).

Every model here has a known, exact output so decoding can be checked token by token:

* :class:`PlusOne` — stateless; the next token is the current one plus one (mod V), so the
  greedy continuation of ``... t`` is ``t+1, t+2, ...``.
* :class:`ContextProbe` — stateless; reveals what the model was shown: in ``"length"`` mode it
  favours the token equal to the number of tokens visible at the query position (the window
  length), in ``"first"`` mode the first token of its input window.
* :class:`Bigram` — stateless pytree (``table`` is a leaf, so new tables do not recompile);
  the logits after token ``a`` are ``table[a]``: the sampling distribution is known exactly.
* :class:`Constant` — stateless pytree; the same logits at every position (penalty tests).
* :func:`cached` — turns any causal, position-wise stateless model into the KV-cached
  protocol (a :class:`jaxdecode.CachedModel` whose cache records the tokens fed so far), so
  its outputs must equal the stateless model's with an unlimited window.

Models are built once at import time by the tests that share them, so compiled loops are
shared too (non-pytree models are static jit arguments hashed by identity / value).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode

BIG = 10.0  # logit of the favoured token (all others 0)


@dataclasses.dataclass(frozen=True)
class PlusOne:
    """next token = current token + 1 (mod V): logits BIG on it, 0 elsewhere."""

    vocab_size: int

    def __call__(self, tokens):
        return BIG * jax.nn.one_hot((tokens + 1) % self.vocab_size, self.vocab_size, dtype=jnp.float32)

    def greedy_logprob(self) -> float:
        """log-softmax of the favoured token (the greedy log-probability of every step)."""
        return float(-np.log1p((self.vocab_size - 1) * np.exp(-BIG)))


@dataclasses.dataclass(frozen=True)
class ContextProbe:
    """Reveals its input window.

    mode "length": at window position t it favours token ``min(t + 1, V - 1)`` — read at the
    row's last real token this is the number of tokens the model sees.
    mode "first": it favours the window's first token, at every position.
    """

    vocab_size: int
    mode: str = "length"

    def __call__(self, tokens):
        b, t = tokens.shape
        if self.mode == "length":
            target = jnp.broadcast_to(jnp.minimum(jnp.arange(1, t + 1), self.vocab_size - 1), (b, t))
        else:
            target = jnp.broadcast_to(tokens[:, :1], (b, t))
        return BIG * jax.nn.one_hot(target, self.vocab_size, dtype=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bigram:
    """logits[b, t] = table[tokens[b, t]]; ``table`` float32[V, V] is a pytree leaf."""

    table: jax.Array

    @staticmethod
    def random(vocab_size: int, seed: int = 0, scale: float = 1.5) -> "Bigram":
        return Bigram(jnp.asarray(np.random.RandomState(seed).randn(vocab_size, vocab_size) * scale, jnp.float32))

    def __call__(self, tokens):
        return self.table[tokens]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Constant:
    """The same logits float32[V] at every position."""

    logits: jax.Array

    def __call__(self, tokens):
        return jnp.broadcast_to(self.logits, tokens.shape + self.logits.shape)


def cached(model) -> jaxdecode.CachedModel:
    """The KV-cached protocol for a causal stateless model whose logits at position p depend
    on tokens 0..p only (as all models above, with an unlimited window).

    The cache is ``{"tokens": int32[B, S]}``, the tokens written so far at their positions;
    ``step`` writes its tokens there and returns the stateless model's logits on the whole
    cache, read at the query positions.
    """

    def init_cache(batch_size, max_length):
        return {"tokens": jnp.zeros((batch_size, max_length), jnp.int32)}

    def step(tokens, positions, cache):
        b = tokens.shape[0]
        rows = jnp.arange(b)[:, None]
        toks = cache["tokens"].at[rows, positions].set(tokens, mode="drop")
        full = model(toks)  # [B, S, V]
        s = toks.shape[1]
        logits = jnp.take_along_axis(full, jnp.clip(positions, 0, s - 1)[:, :, None], axis=1)
        return logits, {"tokens": toks}

    return jaxdecode.CachedModel(init_cache=init_cache, step=step)


def greedy_reference(model, prompt, lengths, n, eos=None):
    """Plain Python greedy decoding (one row at a time, the model on the unpadded prefix)."""
    out = []
    for row, ln in zip(np.asarray(prompt), np.asarray(lengths)):
        seq = [int(x) for x in row[:ln]]
        for _ in range(n):
            logits = np.asarray(model(jnp.asarray([seq], jnp.int32)))[0, -1]
            tok = int(np.argmax(logits))
            seq.append(tok)
            if eos is not None and tok in np.atleast_1d(eos):
                break
        out.append(seq)
    return out


def trigram_model(vocab: int, seed: int = 0, scale: float = 2.0):
    """A KV-cached model whose logits depend on the last two tokens: ``table[prev, token]``
    (``prev`` is 0 at position 0). The cache is the token history int32[B, S]. Returns
    ``(model, table)`` with the table as a NumPy array for the references."""
    table = jax.random.normal(jax.random.key(seed), (vocab, vocab, vocab)) * scale

    def init_cache(batch, length):
        return jnp.zeros((batch, length), jnp.int32)

    def step(tokens, positions, hist):
        b = tokens.shape[0]
        hist = hist.at[jnp.arange(b)[:, None], positions].set(tokens, mode="drop")
        prev = jnp.where(positions > 0, jnp.take_along_axis(hist, jnp.maximum(positions - 1, 0), axis=1), 0)
        return table[prev, tokens], hist

    return jaxdecode.CachedModel(init_cache, step), np.asarray(table)


def trigram_logits(table: np.ndarray, tokens) -> np.ndarray:
    """The trigram model's next-token logits after the sequence ``tokens`` (NumPy)."""
    prev = tokens[-2] if len(tokens) >= 2 else 0
    return table[prev, tokens[-1]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledBigram:
    """A pytree model with an array leaf and a plain Python float leaf (a "non-array leaf"):
    logits = ``scale * table[token]``. Python-number leaves must stay static in every decoder."""

    table: jax.Array
    scale: float

    def __call__(self, tokens):
        return self.scale * self.table[tokens]
