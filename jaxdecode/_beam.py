"""Beam search as one compiled ``lax.scan`` over fixed buffers.

Semantics follow Hugging Face's ``num_beams`` search:

* A hypothesis' score is ``sum of generated log-probs / generated_length ** length_penalty``
  (the length counts the EOS token when there is one).
* Each step takes the ``2 * num_beams`` best (beam, token) extensions. An extension ending in
  EOS and ranked among the first ``num_beams`` becomes a finished hypothesis; the best
  ``num_beams`` extensions not ending in EOS become the live beams.
* Up to ``num_beams`` finished hypotheses are kept per prompt, best first. After the last step
  the live beams are finished too (at ``max_new_tokens``), and the best
  ``num_return_sequences`` are returned.
* Early stop: a prompt is done once it holds ``num_beams`` finished hypotheses and no live
  beam can beat the worst of them. The bound is exact: log-probs only decrease, so with
  ``length_penalty > 0`` the best a live beam can reach is its current sum divided by the
  largest length it can still have, and with ``length_penalty <= 0`` by its current length.
  Early stopping never changes the result; it only skips work (``lax.cond`` skips the model
  once every prompt is done).

The model's cache, any pytree, is reordered by beam each step along each leaf's batch axis
(found from ``init_cache``'s shapes, see :mod:`jaxdecode._model`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _model as M
from . import _settings as S
from . import _validate as V
from ._settings import UNSET, SamplingParams


class BeamSearchOutput(NamedTuple):
    """Beam search results, best first along axis 1 (R = num_return_sequences).

    Attributes:
      tokens: int32[B, R, P + N]: the prompt, the hypothesis' tokens, then ``pad_id``.
      lengths: int32[B, R]: valid tokens per hypothesis, prompt included.
      scores: float32[B, R]: length-normalised scores (see module docstring).
      sum_logprobs: float32[B, R]: sum of the generated tokens' log-probabilities.
      logprobs: float32[B, R, N]: each generated token's log-probability (0 past the end).
      top_ids: int32[B, R, N, n] or None: with ``top_logprobs=n``, the n most likely tokens
        at each step of the hypothesis, best first.
      top_logprobs: float32[B, R, N, n] or None: their log-probabilities.
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    sum_logprobs: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None


class BeamState(NamedTuple):
    """The scan carry of beam search (B prompts, K beams, L = P + N buffer, V vocab).

    A hypothesis' *trace* is a dict of arrays with leading axes [B, K]: ``tokens`` [.., L]
    (prompt first), ``logprobs`` [.., N] per generated token and, with ``top_logprobs=n``,
    ``top_ids``/``top_logprobs`` [.., N, n]. Reordering beams gathers every leaf alike.

    Attributes:
      live: trace of each live beam.
      live_logp: float32[B, K]: sum of each live beam's generated log-probs (-inf: no beam).
      logits: float32[B * K, V]: each live beam's next-token logits.
      cache: the model's cache for B * K rows.
      fin: trace of the finished hypotheses, best first.
      fin_scores: float32[B, K]: their scores (-inf: empty slot).
      fin_logp: float32[B, K]: their summed log-probs.
      fin_lengths: int32[B, K]: their lengths, prompt included.
      done: bool[B]: the prompt's result can no longer change.
    """

    live: dict
    live_logp: jax.Array
    logits: jax.Array
    cache: Any
    fin: dict
    fin_scores: jax.Array
    fin_logp: jax.Array
    fin_lengths: jax.Array
    done: jax.Array


def _length_norm(logp: jax.Array, length: jax.Array, alpha: jax.Array) -> jax.Array:
    return logp / jnp.power(length.astype(jnp.float32), alpha)


def _gather(tree: Any, idx: jax.Array) -> Any:
    """Picks hypotheses ``idx`` (int[B, M]) along axis 1 of every leaf."""
    return jax.tree.map(lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1), tree)


def _merge_finished(state: BeamState, cand: dict, cand_scores, cand_logp, cand_lengths, k: int):
    """Keeps the best ``k`` of the current finished hypotheses and the new candidates."""
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    best_scores, order = lax.top_k(cat(state.fin_scores, cand_scores), k)
    return (
        _gather(jax.tree.map(cat, state.fin, cand), order),
        best_scores,
        _gather(cat(state.fin_logp, cand_logp), order),
        _gather(cat(state.fin_lengths, cand_lengths), order),
    )


def _extend(trace: dict, parent: jax.Array, tok, tok_lp, top, pos, i) -> dict:
    """The parents' traces with the new token written at buffer slot ``pos`` / step ``i``."""
    out = _gather(trace, parent)
    total = out["tokens"].shape[-1]
    out["tokens"] = jnp.where(jnp.arange(total) == pos[:, None, None], tok[..., None], out["tokens"])
    steps = jnp.arange(out["logprobs"].shape[-1]) == i
    out["logprobs"] = jnp.where(steps, tok_lp[..., None], out["logprobs"])
    if top is not None:
        for name, value in zip(("top_ids", "top_logprobs"), top):
            picked = jnp.take_along_axis(value, parent[..., None], axis=1)  # [B, M, n]
            out[name] = jnp.where(steps[:, None], picked[:, :, None, :], out[name])
    return out


def _beam_step(state: BeamState, i, *, model, axes, eos, k, n, alpha, prompt_lengths, num_top):
    b = state.live_logp.shape[0]
    vocab = state.logits.shape[-1]
    logp = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    cand = (state.live_logp[..., None] + logp).reshape(b, k * vocab)
    # The barrier keeps XLA:CPU's fast TopK (see _sampling._candidate_draw).
    vals, flat = lax.optimization_barrier(lax.top_k(cand, 2 * k))  # ties: lowest (beam, token) first
    beam = flat // vocab
    tok = (flat % vocab).astype(jnp.int32)
    tok_lp = vals - jnp.take_along_axis(state.live_logp, beam, axis=1)
    top = lax.optimization_barrier(lax.top_k(logp, num_top)) if num_top else None
    top = None if top is None else (top[1].astype(jnp.int32), top[0])  # (ids, logprobs)
    pos = prompt_lengths + i  # where the new token goes, per prompt
    is_eos = jnp.any(tok[..., None] == eos, axis=-1) & (vals > -jnp.inf)
    extended = _extend(state.live, beam, tok, tok_lp, top, pos, i)  # [B, 2K, ...]

    # Finished candidates: EOS among the first K ranks (as Hugging Face does).
    gen_len = i + 1
    eligible = is_eos & (jnp.arange(2 * k) < k) & ~state.done[:, None]
    cand_scores = jnp.where(eligible, _length_norm(vals, gen_len, alpha), -jnp.inf)
    fin = _merge_finished(state, extended, cand_scores, vals, jnp.broadcast_to(pos[:, None] + 1, vals.shape), k)

    # Live beams: the best K extensions that do not end in EOS.
    live_vals, pick = lax.top_k(jnp.where(is_eos, -jnp.inf, vals), k)
    live = _gather(extended, pick)
    live_beam = jnp.take_along_axis(beam, pick, axis=1)
    rows = (jnp.arange(b)[:, None] * k + live_beam).reshape(-1)
    cache = M.take_rows(state.cache, axes, rows)
    new_tok = jnp.take_along_axis(tok, pick, axis=1).reshape(b * k, 1)

    # Done: k finished and no live beam can beat the worst of them (exact bound).
    best_live = jnp.max(live_vals, axis=1)
    bound_len = jnp.where(alpha > 0, n, gen_len)
    bound = jnp.where(best_live > -jnp.inf, _length_norm(best_live, bound_len, alpha), -jnp.inf)
    full = fin[1][:, -1] > -jnp.inf
    done = state.done | (full & (fin[1][:, -1] >= bound))

    def run_model(c):
        positions = jnp.repeat(pos, k)[:, None]
        logits, c = model.step(new_tok, positions, c)
        return logits[:, -1, :].astype(jnp.float32), c

    skip = jnp.all(done) | (i + 1 >= n)  # nothing left to decide, or no next step
    logits, cache = lax.cond(skip, lambda c: (state.logits, c), run_model, cache)
    new = BeamState(live, live_vals, logits, cache, *fin, done)
    # Prompts already done keep their state (their finished set can no longer change).
    sel = lambda o, nw: jnp.where(state.done.reshape((b,) + (1,) * (nw.ndim - 1)), o, nw)
    keep = ("live", "live_logp", "fin", "fin_scores", "fin_logp", "fin_lengths")
    return new._replace(**{f: jax.tree.map(sel, getattr(state, f), getattr(new, f)) for f in keep}), None


def _finalize(state: BeamState, *, k, r, n, alpha, prompt_lengths, pad_id) -> BeamSearchOutput:
    """Adds the live beams still running (at max length) to the finished set; best r first."""
    b = state.live_logp.shape[0]
    # Prompts that stopped early already hold their result; the others' live beams have
    # reached max_new_tokens and become hypotheses.
    length = prompt_lengths[:, None] + n
    running = ~state.done[:, None] & (state.live_logp > -jnp.inf)
    scores = jnp.where(running, _length_norm(state.live_logp, jnp.int32(n), alpha), -jnp.inf)
    fin, fscores, flogp, flens = _merge_finished(state, state.live, scores, state.live_logp, jnp.broadcast_to(length, (b, k)), k)
    total = fin["tokens"].shape[-1]
    tokens = jnp.where(jnp.arange(total) < flens[..., None], fin["tokens"], pad_id)
    emitted = jnp.arange(n) < (flens - prompt_lengths[:, None])[..., None]
    logprobs = jnp.where(emitted, fin["logprobs"], 0.0)
    top_ids = fin.get("top_ids")
    top_lp = fin.get("top_logprobs")
    if top_ids is not None:
        top_ids = jnp.where(emitted[..., None], top_ids, pad_id)[:, :r]
        top_lp = jnp.where(emitted[..., None], top_lp, 0.0)[:, :r]
    return BeamSearchOutput(tokens[:, :r], flens[:, :r], fscores[:, :r], flogp[:, :r], logprobs[:, :r], top_ids, top_lp)


def beam_search(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    sampling: SamplingParams | None = None,
    eos_id: int | list[int] | None = UNSET,
    num_return_sequences: int = 1,
    prompt_lengths: Any = None,
    pad_id: int = 0,
    top_logprobs: int = 0,
    constraint: Any = None,
) -> BeamSearchOutput:
    """Beam search, compiled once per shape.

    Args:
      model: a KV-cached model (``init_cache(batch_size, max_length)`` and
        ``step(tokens, positions, cache) -> (logits, cache)``; any cache pytree works), or a
        stateless causal ``model(tokens) -> logits`` run on the whole buffer each step.
      prompt: int32[B, P], right-padded when ragged.
      max_new_tokens: N >= 1, static.
      num_beams: K >= 1, static. ``num_beams=1`` is greedy decoding.
      length_penalty: exponent on the generated length in the score (traced).
      sampling: a :class:`jaxdecode.SamplingParams`; beam search reads its ``eos_id`` only
        (it is deterministic: the other fields must stay at their defaults).
      eos_id: one id or a list (shorthand for ``sampling=SamplingParams(eos_id=...)``).
        Default: the model's ``config.eos_ids`` when declared, else none; ``()`` means
        hypotheses only end at max_new_tokens.
      num_return_sequences: R in [1, K], static.
      prompt_lengths: int[B] real prompt lengths (default P).
      pad_id: value in unused slots, a token id in [0, V).
      top_logprobs: n >= 0, static: also return the n most likely tokens and their
        log-probabilities at each step of each hypothesis (as the OpenAI API's
        ``top_logprobs``).
      constraint: not supported (structured output is :func:`jaxdecode.generate`'s); anything
        but None is a ValueError.

    Returns:
      :class:`BeamSearchOutput`, hypotheses best first.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> from jaxdecode import CachedModel
      >>> table = jnp.log(jnp.array([[.1, .6, .3], [.5, .1, .4], [.3, .3, .4]]))
      >>> model = CachedModel(init_cache=lambda b, n: jnp.zeros((b,)),
      ...                     step=lambda t, p, c: (table[t], c))
      >>> out = jaxdecode.beam_search(model, jnp.array([[0]]), 2, num_beams=3)
      >>> out.tokens[0, 0].tolist()
      [0, 1, 0]
    """
    fn = "jaxdecode.beam_search"
    if constraint is not None:
        raise ValueError(f"{fn}: `constraint` is not supported by beam search; use jaxdecode.generate(..., "
                         f"constraint=...) (greedy with temperature=0, or sampled).")
    sp = S.from_keywords(fn, sampling, eos_id=eos_id)
    S.check_supported(fn, sp, ("eos_id",), "by beam search (it is deterministic)")
    n = V.check_count(fn, "max_new_tokens", max_new_tokens, 1)
    k = V.check_count(fn, "num_beams", num_beams, 1)
    r = V.check_count(fn, "num_return_sequences", num_return_sequences, 1)
    V.check_at_most(fn, "num_return_sequences", r, k, "num_beams")
    num_top = V.check_count(fn, "top_logprobs", top_logprobs, 0, "0 means off")
    V.check_knob(fn, "length_penalty", length_penalty, allowed="a finite number")
    prompt = V.check_prompt(fn, prompt)
    b, p = prompt.shape
    prompt_lengths = V.check_prompt_lengths(fn, prompt_lengths, b, p)
    M.model_kind(fn, model)
    V.check_context(fn, p, n, M.context_limit(model), "model.config.max_seq_len")
    cached = M.as_cached(model)
    static, arrays = M.split(cached)
    vocab = M.vocab_size(fn, static, arrays, "cached", b, p, p + n)
    V.check_at_most(fn, "top_logprobs", num_top, vocab, "the vocabulary size")
    V.check_prompt_ids(fn, prompt, prompt_lengths, vocab)
    pad = V.check_token_id(fn, "pad_id", pad_id, vocab)
    eos = S.eos_ids(fn, sp, vocab, M.default_eos_ids(model))
    eos = jnp.full((1,), -1, jnp.int32) if eos is None else eos  # -1 matches no token
    cfg = _BeamConfig(static, n, k, r, num_top)
    return _beam_search_jit(cfg, arrays, prompt, prompt_lengths, eos, jnp.asarray(length_penalty, jnp.float32),
                            jnp.int32(pad))


class _BeamConfig(NamedTuple):
    model: Any  # _model.split static part of the (cached) model
    max_new_tokens: int
    num_beams: int
    num_return: int
    num_top: int


@functools.partial(jax.jit, static_argnums=0)
def _beam_search_jit(cfg: _BeamConfig, arrays, prompt, prompt_lengths, eos, alpha, pad_id):
    model = M.merge(cfg.model, arrays)
    max_new_tokens, num_beams, num_return, num_top = cfg.max_new_tokens, cfg.num_beams, cfg.num_return, cfg.num_top
    b, p = prompt.shape
    k, n = num_beams, max_new_tokens
    total = p + n
    axes = M.cache_batch_axes(model.init_cache, total)

    # One prefill per prompt, then the cache is broadcast to the beams.
    cache = model.init_cache(b, total)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = M.cached_step("jaxdecode.beam_search", model, prompt, positions, cache, "step (prefill)")
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    rows = jnp.repeat(jnp.arange(b), k)
    cache = M.take_rows(cache, axes, rows)
    buf = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(jnp.where(jnp.arange(p) < prompt_lengths[:, None], prompt, pad_id))
    live_logp = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
    trace = {"tokens": jnp.broadcast_to(buf[:, None], (b, k, total)), "logprobs": jnp.zeros((b, k, n), jnp.float32)}
    if num_top:
        num_top = min(num_top, last.shape[-1])
        trace["top_ids"] = jnp.zeros((b, k, n, num_top), jnp.int32)
        trace["top_logprobs"] = jnp.zeros((b, k, n, num_top), jnp.float32)
    state = BeamState(
        live=trace,
        live_logp=live_logp,
        logits=jnp.repeat(last, k, axis=0),
        cache=cache,
        fin=trace,
        fin_scores=jnp.full((b, k), -jnp.inf),
        fin_logp=jnp.full((b, k), -jnp.inf),
        fin_lengths=jnp.zeros((b, k), jnp.int32),
        done=jnp.zeros((b,), bool),
    )
    step = lambda s, i: _beam_step(s, i, model=model, axes=axes, eos=eos, k=k, n=n, alpha=alpha, prompt_lengths=prompt_lengths, num_top=num_top)
    state, _ = lax.scan(step, state, jnp.arange(n))
    return _finalize(state, k=k, r=num_return, n=n, alpha=alpha, prompt_lengths=prompt_lengths, pad_id=pad_id)

