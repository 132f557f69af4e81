"""Plain-NumPy reference implementations of jaxdecode's primitives (the test oracle).

This module is written for clarity, not speed, in the style of chapter 5 of *Build a Large
Language Model (From Scratch)*: every filter works on one row at a time, sorts the row and
reads the answer off the sorted order. The fast JAX code in :mod:`jaxdecode._sampling` and
:mod:`jaxdecode._processors` is tested against it.

Conventions (the same as the JAX sampler's, see :mod:`jaxdecode._sampling`):

* Logits are ``[..., V]``; every knob is a number or an array broadcastable to
  ``logits.shape[:-1]`` (one value per row). ``None`` means "off" for the filters, as in the
  book's ``top_k=None``.
* A removed token has logit ``-inf``.
* Logits are converted to float32 first; ``exp(l - max)`` is computed in float32 as in the JAX
  code. Sums that decide a boundary (top-p, typical-p) are accumulated in float64 so that the
  oracle's own rounding is negligible.
* Order of :func:`sample_probs`: temperature -> top-k -> top-p -> min-p -> typical-p. Each
  filter sees the distribution renormalised over the tokens the previous filters kept.
* Ties: every token tied with the boundary value of top-k / top-p / typical-p is kept.
* Degenerate rows: NaN counts as ``-inf``; ``+inf`` counts as the largest float32 (so several
  ``+inf`` entries share the probability evenly); a row with no finite or ``+inf`` entry at all
  gives token 0 (probability one-hot on token 0).

Note on the book's top-k code: it compares ``logits < top_logits[:, -1]``, which for a
``[B, V]`` batch broadcasts the ``B`` thresholds against the *vocabulary* axis. Here each row
gets its own threshold (``row < kth_largest_of_that_row``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)

__all__ = [
    "F32_MAX",
    "sanitize",
    "softmax",
    "log_softmax",
    "greedy",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "sample_probs",
    "sample",
    "prompt_mask",
    "token_counts",
    "apply_repetition_penalty",
    "apply_frequency_presence_penalty",
    "apply_logit_bias",
    "ban_tokens",
    "apply_min_new_tokens",
    "generate",
]


# ---------------------------------------------------------------------------------------
# Helpers


def _float32(logits: Any) -> np.ndarray:
    """``logits`` as a float32 NumPy array (accepts float16, bfloat16, float32, float64)."""
    x = np.asarray(logits)
    if x.dtype.kind in "biuc" or x.dtype == object:
        raise TypeError(f"reference: logits must be floating point, got dtype {x.dtype}.")
    if x.ndim < 1:
        raise ValueError(f"reference: logits must have shape [..., V], got shape {x.shape}.")
    return x.astype(np.float32)


def sanitize(logits: Any) -> np.ndarray:
    """float32 copy with NaN -> -inf and +inf -> the largest float32 (the sampler's convention)."""
    x = _float32(logits)
    x = np.where(np.isnan(x), np.float32(-np.inf), x)
    return np.minimum(x, np.float32(F32_MAX))


def _knob(value: Any, batch_shape: tuple[int, ...], dtype, off) -> np.ndarray:
    """A scalar or per-row knob broadcast to the batch shape and flattened to ``[N]``."""
    if value is None:
        value = off
    arr = np.broadcast_to(np.asarray(value, dtype=dtype), batch_shape)
    return arr.reshape(-1)


def _map_rows(fn: Callable[..., np.ndarray], logits: np.ndarray, *knobs: np.ndarray) -> np.ndarray:
    """Applies ``fn(row, *row_knobs)`` to every row of ``[..., V]`` logits, one row at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = np.stack([fn(flat[i], *(k[i] for k in knobs)) for i in range(flat.shape[0])])
    return out.reshape(logits.shape[:-1] + out.shape[1:])


def _weights(row: np.ndarray) -> np.ndarray:
    """float32 ``exp(l - max)`` of one sanitized row (all zeros for a row without any finite entry)."""
    m = row.max()
    if not m > -np.inf:
        return np.zeros_like(row)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return np.exp(row - m).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Softmax and greedy


def softmax(logits: Any) -> np.ndarray:
    """float32 softmax over the last axis, after :func:`sanitize`.

    A row with no finite entry (all -inf / NaN) gives all zeros.

    Example (the book's toy logits):
      >>> p = softmax([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
      >>> int(p.argmax())
      3
    """
    x = sanitize(logits)

    def row_softmax(row):
        w = _weights(row)
        total = w.sum(dtype=np.float32)
        return w / total if total > 0 else w

    return _map_rows(row_softmax, x)


def log_softmax(logits: Any) -> np.ndarray:
    """float64 log of :func:`sample_probs`-style weights at temperature 1: ``l - max - log(sum exp(l - max))``."""
    x = sanitize(logits).astype(np.float64)

    def row_log_softmax(row):
        m = row.max()
        if not m > -np.inf:
            return np.full_like(row, -np.inf)
        return (row - m) - np.log(np.exp(row - m).sum())

    return _map_rows(row_log_softmax, x)


def greedy(logits: Any) -> np.ndarray:
    """Index of the largest logit per row (lowest index on ties; NaN = -inf; no finite entry -> 0)."""
    x = sanitize(logits)
    return np.argmax(x, axis=-1).astype(np.int32)


def apply_temperature(logits: Any, temperature: Any) -> np.ndarray:
    """``logits / temperature`` per row, in float32; a row with temperature 0 is left as is.

    Like :func:`jaxdecode.apply_temperature`, this is plain scaling: it does not sanitize
    NaN or +inf (the sampler does, see :func:`sample_probs`).
    """
    x = _float32(logits)
    t = np.broadcast_to(np.asarray(temperature, np.float32), x.shape[:-1])
    t = np.where(t > 0, t, np.float32(1.0))
    with np.errstate(over="ignore", invalid="ignore"):
        return (x / t[..., None]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Filters, one row at a time


def _top_k_row(row: np.ndarray, k: int) -> np.ndarray:
    """Keeps the k largest logits and every logit tied with the k-th largest (k=0 or k>=V: off)."""
    vocab = row.shape[-1]
    if k <= 0 or k >= vocab:
        return row
    top_logits = np.sort(row)[::-1][:k]  # torch.topk(row, k)
    min_val = top_logits[-1]  # this row's own k-th largest value
    return np.where(row < min_val, np.float32(-np.inf), row)


def _top_p_row(row: np.ndarray, p: float) -> np.ndarray:
    """Smallest set of most probable tokens whose probability mass reaches p (ties kept)."""
    if p >= 1.0:
        return row
    w = _weights(row)
    if not w.sum() > 0:
        return row
    probs = w.astype(np.float64) / w.astype(np.float64).sum()
    order = np.argsort(-row, kind="stable")  # most probable first
    cumulative = np.cumsum(probs[order])
    reached = np.nonzero(cumulative >= p)[0]
    if reached.size == 0:  # only possible through rounding with p ~ 1: keep everything
        return row
    boundary = row[order[reached[0]]]  # the logit of the token that makes the mass reach p
    return np.where(row < boundary, np.float32(-np.inf), row)


def _min_p_row(row: np.ndarray, min_p: float) -> np.ndarray:
    """Keeps tokens with p_i >= min_p * p_max, computed as ``exp(l_i - l_max) >= min_p`` (float32)."""
    if min_p <= 0:
        return row
    w = _weights(row)  # w_i = p_i / p_max
    return np.where(w >= np.float32(min_p), row, np.float32(-np.inf))


def _typical_row(row: np.ndarray, p: float) -> np.ndarray:
    """Hugging Face's locally typical filter (Meister et al. 2022) on one row.

    q = softmax(row), H = entropy(q); tokens are sorted by |-log q_i - H| ascending and kept
    until their mass reaches p; every token tied (in that distance) with the last one kept is
    kept too; never fewer than one token.
    """
    if p >= 1.0:
        return row
    kept = row > -np.inf
    if not kept.any():
        return row
    m = row.max()
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        w = np.exp(row - m).astype(np.float32)
        z = w.sum(dtype=np.float32)
        log_q = ((row - m) - np.log(z)).astype(np.float32)
        q = (w / z).astype(np.float32)
        entropy = -np.sum(np.where(kept & (q > 0), q * log_q, 0.0), dtype=np.float32)
        distance = np.where(kept, np.abs(-log_q - entropy), np.float32(np.inf)).astype(np.float32)
    order = np.argsort(distance, kind="stable")  # most typical first
    mass = w.astype(np.float64)[order]
    cumulative = np.cumsum(mass / mass.sum())
    last = min(int(np.sum(cumulative < p)), row.shape[-1] - 1)
    cutoff = distance[order[last]]
    return np.where(kept & (distance <= cutoff), row, np.float32(-np.inf))


def top_k_filter(logits: Any, k: Any) -> np.ndarray:
    """Sets every logit below the row's k-th largest to -inf (ties kept; k = 0 or None: off).

    Output is the sanitized float32 logits (NaN -> -inf, +inf -> largest float).
    """
    x = sanitize(logits)
    return _map_rows(lambda r, kk: _top_k_row(r, int(kk)), x, _knob(k, x.shape[:-1], np.int64, 0))


def top_p_filter(logits: Any, p: Any) -> np.ndarray:
    """Nucleus filter per row: smallest most-probable set with mass >= p, ties kept (p = 1: off)."""
    x = sanitize(logits)
    return _map_rows(lambda r, pp: _top_p_row(r, float(pp)), x, _knob(p, x.shape[:-1], np.float32, 1.0))


def min_p_filter(logits: Any, min_p: Any) -> np.ndarray:
    """Keeps tokens with probability >= min_p times the row's largest probability (0: off)."""
    x = sanitize(logits)
    return _map_rows(lambda r, mp: _min_p_row(r, float(mp)), x, _knob(min_p, x.shape[:-1], np.float32, 0.0))


def typical_filter(logits: Any, p: Any) -> np.ndarray:
    """Locally typical filter per row (Hugging Face's ``typical_p``; p = 1: off)."""
    x = sanitize(logits)
    return _map_rows(lambda r, pp: _typical_row(r, float(pp)), x, _knob(p, x.shape[:-1], np.float32, 1.0))


# ---------------------------------------------------------------------------------------
# The sampler's distribution


def _row_probs(row: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float) -> np.ndarray:
    vocab = row.shape[-1]
    if temperature <= 0:  # greedy: all the mass on the argmax
        probs = np.zeros(vocab)
        probs[int(np.argmax(row))] = 1.0
        return probs
    with np.errstate(over="ignore"):
        row = sanitize(row / np.float32(temperature))
    row = _top_k_row(row, top_k)
    row = _top_p_row(row, top_p)
    row = _min_p_row(row, min_p)
    row = _typical_row(row, typical_p)
    w = _weights(row).astype(np.float64)
    if not w.sum() > 0:  # nothing left at all: token 0
        probs = np.zeros(vocab)
        probs[0] = 1.0
        return probs
    return w / w.sum()


def sample_probs(
    logits: Any,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
) -> np.ndarray:
    """The exact distribution :func:`jaxdecode.sample` draws from, float64 ``[..., V]``.

    Per row: sanitize, divide by the temperature (sanitizing again: overflow -> largest
    float), then top-k -> top-p -> min-p -> typical-p, each on the renormalised survivors,
    and finally softmax over what is left. Temperature 0 is greedy (one-hot on the argmax);
    a row with nothing left is one-hot on token 0. Every knob is a number or per-row array;
    ``None`` means off.
    """
    x = sanitize(logits)
    batch = x.shape[:-1]
    knobs = (
        _knob(temperature, batch, np.float32, 1.0),
        _knob(top_k, batch, np.int64, 0),
        _knob(top_p, batch, np.float32, 1.0),
        _knob(min_p, batch, np.float32, 0.0),
        _knob(typical_p, batch, np.float32, 1.0),
    )
    return _map_rows(
        lambda r, t, k, p, mp, tp: _row_probs(r, float(t), int(k), float(p), float(mp), float(tp)), x, *knobs
    )


def sample(
    rng: np.random.Generator,
    logits: Any,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
) -> np.ndarray:
    """Draws one token per row from :func:`sample_probs` with a NumPy generator (int32 ``[...]``).

    Like the book's ``torch.multinomial(probs, num_samples=1)``, done as an inverse CDF.
    """
    probs = sample_probs(logits, temperature, top_k, top_p, min_p, typical_p)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = np.empty(flat.shape[0], np.int32)
    for i, row in enumerate(flat):
        cdf = np.cumsum(row)
        ids[i] = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), row.shape[-1] - 1)
    return ids.reshape(probs.shape[:-1])


# ---------------------------------------------------------------------------------------
# Logits processors


def prompt_mask(prompt: Any, vocab_size: int, prompt_lengths: Any = None) -> np.ndarray:
    """bool ``[B, V]``: whether each token occurs among the first ``prompt_lengths[b]`` prompt tokens."""
    prompt = np.asarray(prompt)
    b, p = prompt.shape
    lengths = np.full(b, p) if prompt_lengths is None else np.asarray(prompt_lengths)
    mask = np.zeros((b, vocab_size), bool)
    for i in range(b):
        for tok in prompt[i, : int(lengths[i])]:
            mask[i, int(tok)] = True
    return mask


def token_counts(tokens: Any, vocab_size: int, active: Any = None) -> np.ndarray:
    """int32 ``[B, V]``: how often each token occurs in ``tokens`` ``[B, T]``.

    ``active`` (bool ``[B, T]``, optional) says which positions count.
    """
    tokens = np.asarray(tokens)
    counts = np.zeros((tokens.shape[0], vocab_size), np.int32)
    for i in range(tokens.shape[0]):
        for j, tok in enumerate(tokens[i]):
            if active is None or np.asarray(active)[i, j]:
                counts[i, int(tok)] += 1
    return counts


def _row_values(value: Any, b: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float32), (b,))


def apply_repetition_penalty(logits: Any, seen: Any, penalty: Any) -> np.ndarray:
    """CTRL / Hugging Face repetition penalty on the tokens marked in ``seen`` (bool ``[B, V]``).

    A seen token's positive logit is divided by the penalty, a negative (or zero) one is
    multiplied by it; ``penalty`` is a number or ``[B]``.
    """
    x = _float32(logits).copy()
    seen = np.asarray(seen, bool)
    pen = _row_values(penalty, x.shape[0])
    for b in range(x.shape[0]):
        for v in np.nonzero(seen[b])[0]:
            x[b, v] = x[b, v] / pen[b] if x[b, v] > 0 else x[b, v] * pen[b]
    return x


def apply_frequency_presence_penalty(logits: Any, counts: Any, frequency: Any, presence: Any) -> np.ndarray:
    """OpenAI formula: ``logit - frequency * count - presence * (count > 0)`` (per-row knobs)."""
    x = _float32(logits)
    counts = np.asarray(counts).astype(np.float32)
    f = _row_values(frequency, x.shape[0])[:, None]
    p = _row_values(presence, x.shape[0])[:, None]
    return (x - f * counts - p * (counts > 0).astype(np.float32)).astype(np.float32)


def apply_logit_bias(logits: Any, bias: Any) -> np.ndarray:
    """Adds a bias: a dict ``{token_id: value}`` or a dense ``[V]`` / ``[B, V]`` array."""
    x = _float32(logits).copy()
    if isinstance(bias, dict):
        for tok, val in bias.items():
            x[..., int(tok)] += np.float32(val)
        return x
    return (x + np.asarray(bias, np.float32)).astype(np.float32)


def ban_tokens(logits: Any, ids: Any) -> np.ndarray:
    """Sets the logits of ``ids`` to -inf in every row."""
    x = _float32(logits).copy()
    for tok in np.asarray(ids).reshape(-1):
        x[..., int(tok)] = -np.inf
    return x


def apply_min_new_tokens(logits: Any, step: Any, n: Any, eos_ids: Any) -> np.ndarray:
    """Bans the EOS ids in the rows whose ``step`` (tokens generated so far) is below ``n``."""
    x = _float32(logits).copy()
    step = np.broadcast_to(np.asarray(step), (x.shape[0],))
    n = np.broadcast_to(np.asarray(n), (x.shape[0],))
    for b in range(x.shape[0]):
        if step[b] < n[b]:
            for tok in np.asarray(eos_ids).reshape(-1):
                x[b, int(tok)] = -np.inf
    return x


# ---------------------------------------------------------------------------------------
# Generation loop


def generate(
    model: Callable[[np.ndarray], Any],
    idx: Any,
    max_new_tokens: int,
    context_size: int,
    temperature: Any = 0.0,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    typical_p: Any = None,
    *,
    rng: np.random.Generator | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    repetition_penalty: Any = 1.0,
    frequency_penalty: Any = 0.0,
    presence_penalty: Any = 0.0,
) -> np.ndarray:
    """The book's ``generate`` loop over NumPy arrays, with this library's sampling semantics.

    Args:
      model: callable ``int [B, T] -> logits [B, T, V]`` (only the last position is used).
      idx: int ``[B, T0]`` prompt (no padding).
      max_new_tokens: number of tokens appended to every row.
      context_size: the model sees at most the last ``context_size`` tokens.
      temperature, top_k, top_p, min_p, typical_p: as in :func:`sample_probs` (numbers or
        ``[B]``; ``None`` = off). Temperature 0 (the default) is greedy decoding.
      rng: NumPy generator, needed when some row samples.
      eos_id: optional end-of-sequence id; once a row has produced it, the row's later
        tokens are ``pad_id`` (default ``eos_id``). The output keeps the full length.
      repetition_penalty, frequency_penalty, presence_penalty: applied in vLLM's order
        (repetition over prompt + generated tokens, then frequency/presence over generated
        tokens) before temperature and the filters.

    Returns:
      int ``[B, T0 + max_new_tokens]``.

    Unlike the book, temperature is applied before top-k (as in Hugging Face / vLLM and the
    JAX sampler); for top-k alone the order makes no difference.
    """
    idx = np.asarray(idx)
    prompt = idx.copy()
    b = idx.shape[0]
    finished = np.zeros(b, bool)
    fill = eos_id if pad_id is None else pad_id
    temps = np.broadcast_to(np.asarray(temperature, np.float32), (b,))
    if rng is None and np.any(temps > 0):
        raise ValueError("reference.generate: sampling (temperature > 0) needs `rng`.")
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        logits = np.asarray(model(idx_cond), np.float32)[:, -1, :]
        vocab = logits.shape[-1]

        generated = idx[:, prompt.shape[1] :]
        counts = token_counts(generated, vocab)
        seen = prompt_mask(prompt, vocab) | (counts > 0)
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        logits = apply_frequency_presence_penalty(logits, counts, frequency_penalty, presence_penalty)

        if np.all(temps <= 0):
            idx_next = greedy(logits)
        else:
            idx_next = sample(rng, logits, temps, top_k, top_p, min_p, typical_p)

        if eos_id is not None:
            idx_next = np.where(finished, fill, idx_next)
            finished |= idx_next == eos_id
        idx = np.concatenate([idx, idx_next[:, None].astype(idx.dtype)], axis=1)
    return idx


def no_repeat_ngram(logits: Any, tokens: Any, lengths: Any, n: int) -> np.ndarray:
    """Hugging Face's ``no_repeat_ngram_size``, row by row in plain Python.

    Row b's tokens are ``tokens[b, :lengths[b]]`` (prompt and generated, ``x``). A token ``t``
    gets ``-inf`` when ``x[-(n-1):] + [t]`` already occurs as n consecutive tokens of ``x``;
    nothing is banned while ``len(x) < n - 1``.
    """
    out = _float32(logits).copy()
    toks = np.asarray(tokens)
    for b, length in enumerate(np.asarray(lengths).reshape(-1)):
        x = [int(t) for t in toks[b, : int(length)]]
        if len(x) + 1 < n:
            continue
        prefix = tuple(x[len(x) - n + 1:]) if n > 1 else ()
        for j in range(len(x) - n + 1):
            if tuple(x[j : j + n - 1]) == prefix:
                out[b, x[j + n - 1]] = -np.inf
    return out
