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
    "no_repeat_ngram",
    "dynamic_temperature",
    "sample_probs_extended",
    "top_n_sigma_filter",
    "penalty_history",
    "dry_penalty",
    "bad_words",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "allowed_tokens",
    "begin_suppress",
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


# ---------------------------------------------------------------------------------------
# Issue 13's samplers, one row at a time (see jaxdecode._sampling._extended_draw for the order)


def _at_least(new: np.ndarray, prev: np.ndarray, score: np.ndarray, m: int) -> np.ndarray:
    """``new`` plus the ``m`` best tokens of ``prev`` by ``score`` (ties with the m-th kept)."""
    kept = np.flatnonzero(prev)
    if kept.size == 0:
        return new
    order = np.sort(score[kept])[::-1]
    cut = order[min(m, kept.size) - 1]
    return new | (prev & (score >= cut))


def _renorm(l: np.ndarray, keep: np.ndarray):
    """(p, log p) of softmax over ``keep`` (float64), 0 / -inf elsewhere."""
    ll = np.where(keep, l.astype(np.float64), -np.inf)
    m = ll.max()
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        w = np.exp(ll - m)
        z = w.sum()
        return w / z, (ll - m) - np.log(z)


def _entropy(q: np.ndarray, logq: np.ndarray, keep: np.ndarray) -> float:
    """-sum q log q over the kept tokens with q > 0."""
    on = keep & (q > 0)
    return -float(np.sum(q[on] * logq[on]))


def dynamic_temperature(row: Any, temperature: float, delta: float, exponent: float) -> float:
    """llama.cpp's dynamic temperature for one sanitized row: ``max(0, t - delta) + (t + delta -
    max(0, t - delta)) * (H / log N) ** exponent``, H the entropy of softmax(row) over its N
    finite entries (t itself when delta is 0 or N <= 1)."""
    row = sanitize(row)
    finite = row > -np.inf
    n = int(finite.sum())
    if delta <= 0 or n <= 1:
        return float(temperature)
    p, logp = _renorm(row, finite)
    h = _entropy(p, logp, finite)
    lo = max(0.0, temperature - delta)
    return lo + (temperature + delta - lo) * min(max(h / np.log(n), 0.0), 1.0) ** exponent


def _extended_keep(row: np.ndarray, t: float, k: int, p: float, min_p: float, typical_p: float, sigma: float,
                   eps: float, eta: float, m: int, xtc_t: float, xtc_p: float, xtc_u: float, miro_tau: float,
                   mu: float) -> tuple[np.ndarray, np.ndarray]:
    """(tempered row, kept mask) of the extended chain."""
    x = sanitize(row)
    if t <= 0:  # dynamic temperature 0: the argmax (and its ties) only
        return x, (x >= x.max()) & (x > -np.inf)
    with np.errstate(over="ignore"):
        l = sanitize(x / np.float32(t))
    keep = l > -np.inf
    lf = l.astype(np.float64)

    def guard(new, prev):
        """Every truncation keeps at least the m most probable tokens of its input (m >= 1)."""
        return _at_least(new, prev, lf, max(m, 1))

    if sigma > 0:
        vals = lf[keep]
        std = vals.std()  # population std, as llama.cpp
        keep = guard(keep & (lf >= vals.max() - sigma * std), keep)
    if k > 0:
        kk = max(k, m)
        if kk < keep.sum():
            cut = np.sort(lf[keep])[::-1][kk - 1]
            keep = keep & (lf >= cut)
    if p < 1.0:
        filtered = _top_p_row(np.where(keep, l, np.float32(-np.inf)).astype(np.float32), p) > -np.inf
        keep = guard(filtered & keep, keep)
    if min_p > 0:
        filtered = _min_p_row(np.where(keep, l, np.float32(-np.inf)).astype(np.float32), min_p) > -np.inf
        keep = guard(filtered & keep, keep)
    if typical_p < 1.0:
        masked = np.where(keep, l, np.float32(-np.inf)).astype(np.float32)
        filtered = _typical_row(masked, typical_p) > -np.inf
        if m > 1:  # the m most typical: smallest |-log q - H|
            q, logq = _renorm(masked, keep)
            h = _entropy(q, logq, keep)
            filtered = _at_least(filtered, keep, np.where(keep, -np.abs(-logq - h), -np.inf), m)
        keep = filtered & keep
    if eps > 0:
        q, _ = _renorm(l, keep)
        keep = guard(keep & (q >= eps), keep)
    if eta > 0:
        q, logq = _renorm(l, keep)
        h = _entropy(q, logq, keep)
        keep = guard(keep & (q >= min(eta, np.sqrt(eta) * np.exp(-h))), keep)
    if xtc_u < xtc_p and xtc_t <= 0.5:
        q, _ = _renorm(l, keep)
        above = keep & (q >= xtc_t)
        if above.sum() >= 2:
            last = lf[above].min()
            left = keep & ~(above & (lf > last))
            if left.sum() >= m:
                keep = left
    if miro_tau > 0:
        q, logq = _renorm(l, keep)
        surprise = -logq / np.log(2.0)
        keep = guard(keep & ((surprise <= mu) | (lf >= lf[keep].max())), keep)
    return l, keep


def sample_probs_extended(
    logits: Any,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    *,
    top_n_sigma: Any = 0.0,
    epsilon_cutoff: Any = 0.0,
    eta_cutoff: Any = 0.0,
    min_tokens_to_keep: Any = 1,
    xtc_threshold: Any = 0.1,
    xtc_probability: Any = 0.0,
    xtc_uniform: Any = 0.0,
    dynatemp_range: Any = 0.0,
    dynatemp_exponent: Any = 1.0,
    mirostat_tau: Any = 0.0,
    mirostat_mu: Any = 0.0,
) -> np.ndarray:
    """The distribution of a row that uses the extended truncations, float64 ``[..., V]``.

    Order: temperature (dynamic when ``dynatemp_range`` > 0) -> top-n-sigma -> top-k -> top-p
    -> min-p -> typical-p -> epsilon -> eta -> XTC (acts when ``xtc_uniform`` <
    ``xtc_probability``) -> mirostat v2 (truncation at ``mirostat_mu`` bits) -> softmax. Each
    filter works on the distribution renormalised over the previous ones' survivors and keeps
    at least ``min_tokens_to_keep`` of them (XTC: acts only if that many remain). Temperature 0
    is greedy. Every knob is a number or per-row array.
    """
    x = sanitize(logits)
    batch = x.shape[:-1]
    f, i = np.float64, np.int64
    knobs = [_knob(v, batch, d, None) for v, d in (
        (temperature, f), (top_k, i), (top_p, f), (min_p, f), (typical_p, f), (top_n_sigma, f), (epsilon_cutoff, f),
        (eta_cutoff, f), (min_tokens_to_keep, i), (xtc_threshold, f), (xtc_probability, f), (xtc_uniform, f),
        (dynatemp_range, f), (dynatemp_exponent, f), (mirostat_tau, f), (mirostat_mu, f))]

    def row_probs(row, t, k, p, mp, tp, sigma, eps, eta, m, xt, xp, xu, dr, de, tau, mu):
        vocab = row.shape[-1]
        if t <= 0 or not (row > -np.inf).any():
            out = np.zeros(vocab)
            out[int(np.argmax(row)) if (row > -np.inf).any() else 0] = 1.0
            return out
        tt = dynamic_temperature(row, float(t), float(dr), float(de))
        l, keep = _extended_keep(row, tt, int(k), float(p), float(mp), float(tp), float(sigma), float(eps),
                                 float(eta), int(m), float(xt), float(xp), float(xu), float(tau), float(mu))
        q, _ = _renorm(l, keep)
        return q

    return _map_rows(row_probs, x, *knobs)


def top_n_sigma_filter(logits: Any, n: float) -> np.ndarray:
    """llama.cpp's top-n-sigma on each row: keep logits >= max - n * std over the finite logits
    (population std); n <= 0 is off."""
    x = sanitize(logits)

    def row_fn(row):
        finite = row > -np.inf
        if n <= 0 or finite.sum() <= 1:
            return row
        vals = row[finite].astype(np.float64)
        return np.where(row >= vals.max() - n * vals.std(), row, np.float32(-np.inf))

    return _map_rows(row_fn, x)


# -- history rules ------------------------------------------------------------------------


def penalty_history(tokens: Any, prompt_len: int, vocab_size: int, last_n: int) -> tuple[np.ndarray, np.ndarray]:
    """One row's ``(seen bool[V], counts int[V])`` for the penalties: the repetition penalty's
    tokens (prompt and generated) and the generated tokens' counts, over the last ``last_n``
    tokens (0: all). ``tokens`` is the row's real tokens, prompt first."""
    x = [int(t) for t in tokens]
    start = 0 if last_n <= 0 else max(len(x) - last_n, 0)
    seen = np.zeros(vocab_size, bool)
    counts = np.zeros(vocab_size, np.int64)
    for pos in range(start, len(x)):
        seen[x[pos]] = True
        if pos >= prompt_len:
            counts[x[pos]] += 1
    return seen, counts


def dry_penalty(tokens: Any, vocab_size: int, multiplier: float, base: float, allowed_length: int, last_n: int,
                breakers: Any = ()) -> np.ndarray:
    """llama.cpp's DRY penalty for one row (float64[V], to subtract from the logits).

    ``tokens``: the row's history; ``last_n``: window (0: all); ``breakers``: token-id
    sequences. Written as the definition, not as llama.cpp's Z-algorithm: the window's latest
    breaker start caps the match length (``rep_limit`` = the tokens after that breaker); for
    each earlier position j the longest k with ``x[j-k+1..j] == x[n-k..n-1]`` inside the window
    and k <= rep_limit; the token at j + 1 gets the max k; k >= allowed_length costs
    ``multiplier * base ** (k - allowed_length)`` unless the token is a one-token breaker.
    """
    x = [int(t) for t in tokens]
    n = len(x)
    pen = np.zeros(vocab_size)
    if multiplier <= 0 or n < 2:
        return pen
    w = n if last_n <= 0 else min(last_n, n)
    s = n - w
    rep_limit = w
    for head in range(n - 1, s - 1, -1):  # latest breaker start first
        lens = [len(b) for b in breakers if head + len(b) <= n and x[head:head + len(b)] == list(b)]
        if lens:
            rep_limit = n - head - max(lens)
            break
    if rep_limit < allowed_length:
        return pen
    single = {b[0] for b in breakers if len(b) == 1}
    longest: dict[int, int] = {}
    for j in range(s, n - 1):
        k = 0
        while k < rep_limit and j - k >= s and x[j - k] == x[n - 1 - k]:
            k += 1
        if k >= allowed_length:
            longest[x[j + 1]] = max(longest.get(x[j + 1], 0), k)
    max_exp = int(88.7228391 / np.log(base)) if base > 1.000001 else None
    for tok, k in longest.items():
        if tok in single:
            continue
        e = k - allowed_length
        if max_exp is not None:
            e = min(e, max_exp)
        pen[tok] = multiplier * base**e
    return pen


def _ends_with_prefix(x: list[int], seq: Any) -> bool:
    seq = [int(t) for t in seq]
    prefix = seq[:-1]
    return len(x) >= len(prefix) and (not prefix or x[len(x) - len(prefix):] == prefix)


def bad_words(logits: Any, tokens: Any, lengths: Any, words: Any) -> np.ndarray:
    """Bans each sequence's last token in the rows whose tokens end with the rest of it
    (one-token sequences always; HF / vLLM ``bad_words``)."""
    out = _float32(logits).copy()
    for b, length in enumerate(np.asarray(lengths).reshape(-1)):
        x = [int(t) for t in np.asarray(tokens)[b, : int(length)]]
        for seq in words:
            if _ends_with_prefix(x, seq):
                out[b, int(seq[-1])] = -np.inf
    return out


def sequence_bias(logits: Any, tokens: Any, lengths: Any, bias: dict) -> np.ndarray:
    """HF's ``sequence_bias``: adds ``bias[seq]`` to ``seq[-1]`` in the rows ending with ``seq[:-1]``."""
    out = _float32(logits).astype(np.float64)
    for b, length in enumerate(np.asarray(lengths).reshape(-1)):
        x = [int(t) for t in np.asarray(tokens)[b, : int(length)]]
        for seq, value in bias.items():
            if _ends_with_prefix(x, seq):
                out[b, int(seq[-1])] += value
    return out.astype(np.float32)


def exponential_decay_length_penalty(logits: Any, step: Any, start: Any, factor: Any, eos_ids: Any) -> np.ndarray:
    """HF's exponential decay length penalty: in rows with ``step > start`` generated tokens, each
    EOS logit gets ``+ |logit| * (factor ** (step - start) - 1)``."""
    out = _float32(logits).astype(np.float64)
    b = out.shape[0]
    step, start, factor = (np.broadcast_to(np.asarray(v, np.float64), (b,)) for v in (step, start, factor))
    for r in range(b):
        if step[r] > start[r]:
            for e in np.asarray(eos_ids).reshape(-1):
                if np.isfinite(out[r, e]):
                    out[r, e] += abs(out[r, e]) * (factor[r] ** (step[r] - start[r]) - 1)
    return out.astype(np.float32)


def allowed_tokens(logits: Any, ids: Any) -> np.ndarray:
    """Keeps only ``ids`` (vLLM ``allowed_token_ids``); every other logit is -inf."""
    out = np.full_like(_float32(logits), -np.inf)
    ids = np.asarray(ids).reshape(-1)
    out[..., ids] = _float32(logits)[..., ids]
    return out


def begin_suppress(logits: Any, step: Any, ids: Any) -> np.ndarray:
    """HF's ``begin_suppress_tokens``: bans ``ids`` in the rows at their first generated step."""
    out = _float32(logits).copy()
    for r, s in enumerate(np.broadcast_to(np.asarray(step), (out.shape[0],))):
        if s == 0:
            out[r, np.asarray(ids).reshape(-1)] = -np.inf
    return out
