"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them in one pass.

The accept/reject rule (Leviathan et al. 2023; Chen et al. 2023) keeps the target's
distribution exactly: draft token ``d`` drawn from ``q`` is accepted with probability
``min(1, p(d) / q(d))``; at the first rejection the token is drawn from the residual
``max(0, p - q)`` renormalised; when all k are accepted a bonus token is drawn from the
target's next distribution. ``p`` and ``q`` are the *filtered* distributions (temperature,
top-k, top-p, min-p, typical-p applied), so the output is distributed exactly as plain
sampling with the same knobs. Greedy rows accept a draft token iff it is the target's
argmax, so greedy output is identical to plain greedy decoding.

Two proposers:

* :func:`draft_model`: any KV-cached model sharing the tokenizer (e.g. a smaller model, or
  the target's first layers with its head).
* :func:`prompt_lookup`: no second model; proposes the tokens that followed the latest
  earlier occurrence of the context's last n-gram (from ``ngram`` down to 1 token).

Fixed shapes: every round verifies k tokens for every row; each row accepts its own number.
No cache rollback is needed: caches are indexed by position, so a rejected token's entry is
overwritten before any query attends to it (see ``docs/CONTRACTS.md``). Feeding a token
again at the same position rewrites the same entry, which keeps the bookkeeping simple.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _model as M
from . import _sampling
from . import _settings as S
from . import _validate as V
from ._settings import UNSET, SamplingParams


class DraftModel(NamedTuple):
    """Proposer: a KV-cached draft model proposing ``num_tokens`` tokens per round."""

    model: Any
    num_tokens: int


class PromptLookup(NamedTuple):
    """Proposer: continuation of the latest earlier match of the last ``ngram`` tokens."""

    num_tokens: int
    ngram: int


def draft_model(model: Any, num_tokens: int = 4) -> DraftModel:
    """A draft-model proposer (``num_tokens`` = k tokens proposed per round).

    ``model`` is KV-cached or stateless (wrapped for the cached protocol), and must share the
    target's tokenizer."""
    k = V.check_count("jaxdecode.draft_model", "num_tokens", num_tokens, 1)
    M.model_kind("jaxdecode.draft_model", model)
    return DraftModel(model, k)


def prompt_lookup(num_tokens: int = 4, ngram: int = 3) -> PromptLookup:
    """A prompt-lookup proposer (no second model)."""
    k = V.check_count("jaxdecode.prompt_lookup", "num_tokens", num_tokens, 1)
    g = V.check_count("jaxdecode.prompt_lookup", "ngram", ngram, 1)
    return PromptLookup(k, g)


class SpecState(NamedTuple):
    """The while-loop carry of speculative decoding (B rows, L buffer, N new tokens).

    Attributes:
      tokens: int32[B, L]: prompt then accepted tokens (pad elsewhere).
      length: int32[B]: valid tokens per row (the last one is not yet in the target's cache).
      generated: int32[B]: tokens generated so far per row.
      done: bool[B]: row hit EOS or its budget.
      logprobs: float32[B, N]: log p (filtered target distribution) of each emitted token.
      raw_logprobs: float32[B, N]: the target's raw log-softmax of each emitted token.
      cache: the target's cache.
      draft_cache: the draft model's cache (``()`` for prompt lookup).
      rounds: int32[]: verification rounds run.
      proposed: int32[B]: draft tokens proposed to each row while it was running.
      accepted: int32[B]: draft tokens accepted per row.
    """

    tokens: jax.Array
    length: jax.Array
    generated: jax.Array
    done: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    cache: Any
    draft_cache: Any
    rounds: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def _uniforms(keys: jax.Array, rnd: jax.Array, slot: int, count: int) -> jax.Array:
    """float32[B, count] uniforms from each row's own key, for (round, slot)."""

    def one(k):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k, rnd), slot), (count,))

    return jax.vmap(one)(keys)


def _pick(u: jax.Array, p: jax.Array) -> jax.Array:
    """Inverse-CDF draw from probability rows ``p`` with uniforms ``u``."""
    return _sampling._inverse_cdf(u, p)


def _rep(knobs: _sampling.SamplingKnobs, times: int) -> _sampling.SamplingKnobs:
    return _sampling.SamplingKnobs(*(jnp.repeat(x, times) for x in knobs))


def _propose_lookup(tokens, length, k: int, ngram: int):
    """Latest earlier match of the last n-gram (longest n first); its continuation, k tokens."""
    b, total = tokens.shape
    pos = jnp.arange(total)
    proposal = jnp.broadcast_to(jnp.take_along_axis(tokens, (length - 1)[:, None], axis=1), (b, k))
    found = jnp.zeros((b,), bool)
    for g in range(ngram, 0, -1):
        tail = jnp.take_along_axis(tokens, jnp.clip(length[:, None] - g + jnp.arange(g), 0, total - 1), axis=1)
        match = jnp.ones((b, total), bool)
        for t in range(g):
            shifted = jnp.roll(tokens, -t, axis=1)
            match &= shifted == tail[:, t : t + 1]
        # The match must end before the suffix itself, and the suffix must exist.
        match &= (pos[None, :] + g < length[:, None]) & (length[:, None] >= g)
        start = jnp.max(jnp.where(match, pos[None, :], -1), axis=1)
        ok = (start >= 0) & ~found
        idx = jnp.clip(start[:, None] + g + jnp.arange(k), 0, length[:, None] - 1)
        cont = jnp.take_along_axis(tokens, idx, axis=1)
        proposal = jnp.where(ok[:, None], cont, proposal)
        found |= ok
    return proposal


def _spec_round(state: SpecState, *, model, proposer, keys, knobs, eos, n, pad_id):
    b, total = state.tokens.shape
    k = proposer.num_tokens
    vocab_knobs = knobs
    rnd = state.rounds
    last = jnp.take_along_axis(state.tokens, (state.length - 1)[:, None], axis=1)[:, 0]

    # 1. Proposal: k tokens and the draft's distribution q for each ([B, k, V] or one-hot).
    if isinstance(proposer, DraftModel):
        draft = proposer.model
        prev = jnp.take_along_axis(state.tokens, jnp.maximum(state.length - 2, 0)[:, None], axis=1)[:, 0]
        toks = jnp.stack([prev, last], axis=1)
        positions = jnp.stack([jnp.maximum(state.length - 2, 0), state.length - 1], axis=1)
        logits, dcache = draft.step(toks, positions, state.draft_cache)
        qs, ds = [], []
        for j in range(k):
            q = _sampling.probs(logits[:, -1, :], vocab_knobs)
            d = _pick(_uniforms(keys, rnd, 1000 + j, 1)[:, 0], q)
            qs.append(q)
            ds.append(d)
            if j + 1 < k:
                logits, dcache = draft.step(d[:, None], (state.length + j)[:, None], dcache)
        proposal = jnp.stack(ds, axis=1)
        q_all = jnp.stack(qs, axis=1)
        vocab = q_all.shape[-1]
    else:
        dcache = state.draft_cache
        proposal = _propose_lookup(state.tokens, state.length, k, proposer.ngram)
        q_all = None

    # 2. Verify: the target sees [last, d_1..d_k] at positions length-1 .. length+k-1.
    verify = jnp.concatenate([last[:, None], proposal], axis=1)
    positions = (state.length - 1)[:, None] + jnp.arange(k + 1)
    logits, cache = model.step(verify, positions, state.cache)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    p_all = _sampling.probs(logits.reshape(b * (k + 1), vocab), _rep(knobs, k + 1)).reshape(b, k + 1, vocab)
    if q_all is None:
        q_all = jax.nn.one_hot(proposal, vocab, dtype=jnp.float32)

    # 3. Accept/reject, per row.
    p_d = jnp.take_along_axis(p_all[:, :k], proposal[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q_all, proposal[..., None], axis=-1)[..., 0]
    r = _uniforms(keys, rnd, 0, k)
    ok = r * q_d < p_d  # r < p/q without dividing; q_d > 0 for a drawn token
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading run
    a_idx = jnp.minimum(accepted, k - 1)
    p_a = jnp.take_along_axis(p_all, accepted[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q_all, a_idx[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where((accepted < k)[:, None] & (jnp.sum(residual, -1, keepdims=True) > 0), residual, p_a)
    extra = _pick(_uniforms(keys, rnd, 1, 1)[:, 0], residual)

    # 4. Emit proposal[:accepted] then `extra`, stopping at EOS and at the budget.
    j = jnp.arange(k + 1)
    new = jnp.where(j[None, :] < accepted[:, None], jnp.concatenate([proposal, proposal[:, :1]], axis=1), extra[:, None])
    count = accepted + 1
    is_eos = jnp.any(new[..., None] == eos, axis=-1) & (j[None, :] < count[:, None])
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
    count = jnp.minimum(jnp.minimum(count, first_eos), n - state.generated)
    count = jnp.where(state.done, 0, count)
    emit = j[None, :] < count[:, None]

    rows = jnp.arange(b)[:, None]
    slots = jnp.where(emit, state.length[:, None] + j, total)  # out of range -> dropped
    tokens = state.tokens.at[rows, slots].set(new, mode="drop")
    lp_p = jnp.log(jnp.take_along_axis(p_all, new[..., None], axis=-1)[..., 0])
    raw = jax.nn.log_softmax(logits, axis=-1)
    lp_raw = jnp.take_along_axis(raw, new[..., None], axis=-1)[..., 0]
    out_slots = jnp.where(emit, state.generated[:, None] + j, n)
    logprobs = state.logprobs.at[rows, out_slots].set(lp_p, mode="drop")
    raw_logprobs = state.raw_logprobs.at[rows, out_slots].set(lp_raw, mode="drop")

    generated = state.generated + count
    hit_eos = jnp.any(is_eos & (j[None, :] < count[:, None]), axis=1)
    running = ~state.done
    return SpecState(
        tokens=tokens,
        length=state.length + count,
        generated=generated,
        done=state.done | hit_eos | (generated >= n),
        logprobs=logprobs,
        raw_logprobs=raw_logprobs,
        cache=cache,
        draft_cache=dcache,
        rounds=rnd + 1,
        proposed=state.proposed + jnp.where(running, k, 0),
        accepted=state.accepted + jnp.where(running, jnp.minimum(accepted, count), 0),
    )


def run_speculative(model, proposer, prompt, prompt_lengths, keys, knobs, eos, pad_id, *, max_new_tokens: int,
                    cache_len: int, draft_cache_len: int):
    """Traced body: prefill target (and draft), then verification rounds until every row is done.

    Returns the final :class:`SpecState`; the buffer has ``k + 1`` slack slots past P + N.
    """
    b, p = prompt.shape
    n = max_new_tokens
    k = proposer.num_tokens
    total = p + n + k + 1
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    cache = model.init_cache(b, cache_len)
    _, cache = M.cached_step("jaxdecode.speculative_generate", model, prompt, positions, cache, "step (prefill)")
    if isinstance(proposer, DraftModel):
        dcache = proposer.model.init_cache(b, draft_cache_len)
        _, dcache = M.cached_step("jaxdecode.speculative_generate", proposer.model, prompt, positions, dcache,
                                  "draft step (prefill)")
    else:
        dcache = ()
    valid = jnp.arange(p)[None, :] < prompt_lengths[:, None]
    tokens = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(jnp.where(valid, prompt, pad_id))
    state = SpecState(
        tokens=tokens,
        length=prompt_lengths,
        generated=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        logprobs=jnp.zeros((b, n), jnp.float32),
        raw_logprobs=jnp.zeros((b, n), jnp.float32),
        cache=cache,
        draft_cache=dcache,
        rounds=jnp.int32(0),
        proposed=jnp.zeros((b,), jnp.int32),
        accepted=jnp.zeros((b,), jnp.int32),
    )
    body = lambda s: _spec_round(s, model=model, proposer=proposer, keys=keys, knobs=knobs, eos=eos, n=n, pad_id=pad_id)
    return lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


class SpeculativeOutput(NamedTuple):
    """Output of :func:`speculative_generate` (same layout as ``generate``'s, plus statistics).

    Attributes:
      tokens: int32[B, P + N]: prompt, generated tokens, then ``pad_id``.
      lengths: int32[B]: valid tokens per row, prompt included.
      logprobs: float32[B, N]: log-probability of each token under the target's filtered
        distribution (0 after a row ends).
      raw_logprobs: float32[B, N]: the target's raw log-softmax of each token.
      num_generated: int32[B].
      rounds: int32[]: verification rounds (target forward passes after the prefill).
      proposed: int32[B]: draft tokens proposed per row.
      accepted: int32[B]: draft tokens accepted per row (acceptance rate = accepted / proposed).
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    num_generated: jax.Array
    rounds: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def speculative_generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    proposer: DraftModel | PromptLookup,
    key: jax.Array | None = None,
    sampling: SamplingParams | None = None,
    temperature: Any = UNSET,
    top_k: Any = UNSET,
    top_p: Any = UNSET,
    min_p: Any = UNSET,
    typical_p: Any = UNSET,
    eos_id: Any = UNSET,
    prompt_lengths: Any = None,
    pad_id: int = 0,
    _fn: str = "jaxdecode.speculative_generate",
) -> SpeculativeOutput:
    """Generates with speculative decoding; the output distribution equals plain sampling's.

    Args:
      model: the target: a KV-cached model (``init_cache``/``step``), or a stateless causal
        ``model(tokens) -> logits`` (run on the whole buffer each round).
      prompt: int32[B, P], right-padded when ragged.
      max_new_tokens: N >= 1 (static).
      proposer: :func:`draft_model` or :func:`prompt_lookup` (static).
      key: PRNG key, one or one per row ([B]); required unless temperature is 0 everywhere.
      sampling: a :class:`jaxdecode.SamplingParams`; of its fields temperature, top_k, top_p,
        min_p, typical_p and eos_id are supported (the others must stay at their defaults).
        The keywords below are shorthand that builds one (not together with ``sampling``).
      temperature, top_k, top_p, min_p, typical_p: as :func:`jaxdecode.sample`, per row.
      eos_id: one id or a list; a row stops after its first EOS (kept). Default: the model's
        ``config.eos_ids`` when declared; ``()`` is off.
      prompt_lengths: int[B] real prompt lengths (default P).
      pad_id: value of unused slots, a token id in [0, V).

    Returns:
      :class:`SpeculativeOutput`.

    Example:
      >>> import jax.numpy as jnp, jaxdecode
      >>> table = jnp.log(jnp.full((5, 5), 0.01) + jnp.eye(5, k=1) + jnp.eye(5, k=-4))
      >>> model = jaxdecode.CachedModel(init_cache=lambda b, n: jnp.zeros((b,)),
      ...                               step=lambda t, p, c: (table[t], c))
      >>> out = jaxdecode.speculative_generate(model, jnp.array([[0, 1, 2, 3, 4, 0]]), 6,
      ...     proposer=jaxdecode.prompt_lookup(num_tokens=4, ngram=2), temperature=0.0)
      >>> out.tokens[0, 6:].tolist(), int(out.rounds)
      ([1, 2, 3, 4, 0, 1], 2)
    """
    fn = _fn
    sp = S.from_keywords(fn, sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         typical_p=typical_p, eos_id=eos_id)
    S.check_supported(fn, sp, ("temperature", "top_k", "top_p", "min_p", "typical_p", "eos_id"),
                      "by speculative decoding")
    n = V.check_count(fn, "max_new_tokens", max_new_tokens, 1)
    if not isinstance(proposer, (DraftModel, PromptLookup)):
        raise TypeError(f"{fn}: `proposer` must come from jaxdecode.draft_model(...) or "
                        f"jaxdecode.prompt_lookup(...), got {type(proposer).__name__}.")
    prompt = V.check_prompt(fn, prompt)
    b, p = prompt.shape
    prompt_lengths = V.check_prompt_lengths(fn, prompt_lengths, b, p)
    kind = M.model_kind(fn, model)
    k = proposer.num_tokens
    total = p + n + k + 1  # the buffer's k + 1 slack slots: a round may overshoot N
    V.check_context(fn, p, n, M.context_limit(model), "model.config.max_seq_len")
    target = M.as_cached(model)
    static, arrays = M.split(target)
    vocab = M.vocab_size(fn, static, arrays, "cached", b, p, _cache_len(target, total))
    draft_static, draft_arrays = None, ()
    if isinstance(proposer, DraftModel):
        V.check_context(fn, p, n, M.context_limit(proposer.model), "the draft model's config.max_seq_len")
        draft = M.as_cached(proposer.model)
        draft_static, draft_arrays = M.split(draft)
        draft_vocab = M.vocab_size(fn, draft_static, draft_arrays, "cached", b, p, _cache_len(draft, total))
        if draft_vocab != vocab:
            raise ValueError(
                f"{fn}: the draft model's vocabulary size ({draft_vocab}) differs from the target's ({vocab}); "
                f"the draft must share the target's tokenizer."
            )
    V.check_prompt_ids(fn, prompt, prompt_lengths, vocab)
    pad = V.check_token_id(fn, "pad_id", pad_id, vocab)
    knobs = S.resolve(fn, sp, b, vocab, M.default_eos_ids(model)).knobs
    eos = S.eos_ids(fn, sp, vocab, M.default_eos_ids(model))
    eos = jnp.full((1,), -1, jnp.int32) if eos is None else eos  # -1 matches no token
    keys = V.row_keys(fn, key, sp.temperature, b)
    cfg = _SpecConfig(static, draft_static, proposer._replace(model=None) if isinstance(proposer, DraftModel) else proposer,
                      n, _cache_len(target, total), _cache_len(draft, total) if draft_static else 0, kind)
    return _spec_jit(cfg, arrays, draft_arrays, prompt, prompt_lengths, keys, knobs, eos, jnp.int32(pad))


def _cache_len(model: Any, total: int) -> int:
    """Cache slots for a buffer of ``total`` (prompt + N + slack), clipped to the model's context:
    positions past it are only ever written by rejected or over-budget tokens (dropped)."""
    limit = M.context_limit(model)
    return total if limit is None else min(total, limit)


class _SpecConfig(NamedTuple):
    target: Any  # _model.split static part of the (cached) target
    draft: Any  # same for the draft model, or None for prompt lookup
    proposer: Any  # DraftModel(model=None, num_tokens) or PromptLookup
    max_new: int
    cache_len: int
    draft_cache_len: int
    kind: str


@functools.partial(jax.jit, static_argnums=0)
def _spec_jit(cfg: _SpecConfig, arrays, draft_arrays, prompt, prompt_lengths, keys, knobs, eos, pad_id):
    n = cfg.max_new
    model = M.merge(cfg.target, arrays)
    proposer = cfg.proposer
    if cfg.draft is not None:
        proposer = proposer._replace(model=M.merge(cfg.draft, draft_arrays))
    b, p = prompt.shape
    s = run_speculative(model, proposer, prompt, prompt_lengths, keys, knobs, eos, pad_id, max_new_tokens=n,
                        cache_len=cfg.cache_len, draft_cache_len=cfg.draft_cache_len)
    tokens = s.tokens[:, : p + n]
    tokens = jnp.where(jnp.arange(p + n)[None, :] < s.length[:, None], tokens, pad_id)
    emitted = jnp.arange(n)[None, :] < s.generated[:, None]
    return SpeculativeOutput(
        tokens=tokens,
        lengths=s.length,
        logprobs=jnp.where(emitted, s.logprobs, 0.0),
        raw_logprobs=jnp.where(emitted, s.raw_logprobs, 0.0),
        num_generated=s.generated,
        rounds=s.rounds,
        proposed=s.proposed,
        accepted=s.accepted,
    )
