"""``SamplingParams``: every sampling knob and penalty in one immutable pytree.

Adding a knob is one field of :class:`SamplingParams`, one entry in ``_CHECKS`` (its eager
check) and one use in the decoder that reads it; the keyword shorthand of ``generate`` &co.
builds the same object through :func:`from_keywords`, so a value is checked by the same code
whichever way it is passed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _stop
from . import _validate as V
from ._processors import SamplingRules
from ._sampling import _KNOB_SPECS, _EXTRA_SPECS, ExtraKnobs, SamplingKnobs, check_extra, make_extra, make_knobs

__all__ = ["SamplingParams", "Resolved", "UNSET", "from_keywords", "resolve", "check_supported"]


class _Unset:
    """Default of the keyword shorthand: tells "not passed" from any value."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()

_CLASS = "jaxdecode.SamplingParams"


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingParams:
    """Every sampling knob and penalty of one decode call, as an immutable pytree.

    Pass it as ``sampling=`` to :func:`jaxdecode.generate`, :func:`jaxdecode.generate_stream`,
    :func:`jaxdecode.speculative_generate` and :func:`jaxdecode.beam_search`; their keyword
    knobs (``temperature=0.7, top_p=0.9, ...``) are shorthand that builds one (passing both
    is an error). Values are checked when the object is built, if concrete (not traced);
    checks that need the model (token ids against the vocabulary, per-row shapes against the
    batch) run when a decoder receives it. The PRNG key is a separate argument.

    Traced and static: every value is traced, so new values never recompile; it is a pytree,
    so it can be passed through ``jax.jit`` / ``jax.vmap``. Static (a change recompiles): the
    shapes (scalar vs per-row array), the number of EOS ids, whether a ``logit_bias`` is set
    (and its keys when a dict), the stop-sequence table's shape (how many sequences and
    how long each is), and likewise whether each list-valued rule is set and its table's shape
    (``dry_sequence_breakers``, ``bad_words``, ``sequence_bias``, ``allowed_token_ids``,
    ``suppress_tokens``, ``begin_suppress_tokens``, ``exponential_decay_length_penalty``).
    The ``stop`` strings are static too (their table's size is bucketed).
    One more static bit: whether any of the traced issue-13 knobs (``top_n_sigma`` to
    ``mirostat_eta``, ``penalty_last_n``, ``dry_multiplier``, ``no_repeat_ngram_size``) is
    away from its default; the first call that sets one compiles the step with their branch
    once, later values (scalar or per row, on or off) reuse it. With all of them at their
    defaults the decode step is exactly the plain one.

    Attributes:
      temperature: >= 0, scalar or per-row [B]; 0 is greedy. Default 1.
      top_k: int >= 0; 0 is off.
      top_p: in (0, 1]; 1 is off.
      min_p: in [0, 1]; 0 is off.
      typical_p: in (0, 1]; 1 is off.
      repetition_penalty: > 0; 1 is off (CTRL / Hugging Face, over prompt and generated tokens).
      presence_penalty: finite; 0 is off (OpenAI / vLLM, over generated tokens).
      frequency_penalty: finite; 0 is off (OpenAI / vLLM).
      logit_bias: ``{token_id: bias}``, or float[V] / float[B, V], added to the logits; None is off.
      eos_id: an id or a list of ids; a row stops after generating one (kept). None (the
        default) means the model's own EOS ids (``model.config.eos_ids``, as Hugging Face's
        generation config), ``()`` turns stopping at EOS off.
      min_new_tokens: int >= 0; EOS ids are banned until a row has generated this many tokens.
      stop_sequences: list of token-id lists; a row stops once its generated tokens end with
        one of them (kept). None is off.
      stop: a string or a list of strings; a row stops once its generated text contains one
        (across token boundaries, matched inside the compiled loop; needs the decoder's
        ``tokenizer=``). None is off.
      top_n_sigma: >= 0; keep logits >= max - n * std of the kept logits (llama.cpp); 0 is off.
      epsilon_cutoff: in [0, 1); drop tokens with probability < epsilon (HF); 0 is off.
      eta_cutoff: in [0, 1); drop tokens with probability < min(eta, sqrt(eta) * exp(-entropy)) (HF); 0 is off.
      min_tokens_to_keep: int >= 1; every truncation keeps at least this many tokens (HF). Default 1.
      xtc_threshold: in [0, 1]; XTC's threshold: tokens with probability >= it are "top choices". Default 0.1.
      xtc_probability: in [0, 1]; chance per step that XTC removes every top choice but the least likely
        (llama.cpp; needs >= 2 top choices); 0 is off.
      dynatemp_range: >= 0; dynamic temperature in [t - range, t + range] by normalised entropy (llama.cpp); 0 is off.
      dynatemp_exponent: >= 0; exponent of the normalised entropy in dynamic temperature. Default 1.
      mirostat_tau: >= 0; mirostat v2 target surprisal in bits (llama.cpp); mu starts at 2 * tau; 0 is off.
      mirostat_eta: >= 0; mirostat v2 learning rate. Default 0.1.
      dry_multiplier: >= 0; DRY penalty multiplier (llama.cpp / text-generation-webui); 0 is off.
      dry_base: >= 1; DRY penalty base: penalty = multiplier * base ** (repeat - allowed_length). Default 1.75.
      dry_allowed_length: int >= 1; repeats shorter than this are not penalised by DRY. Default 2.
      dry_penalty_last_n: int >= 0; DRY looks at the last n tokens; 0 is the whole history.
      dry_sequence_breakers: list of token-id lists that end a DRY match (see
        ``jaxdecode.dry_sequence_breakers``); None is none.
      penalty_last_n: int >= 0; repetition/presence/frequency penalties count only the last n tokens;
        0 is the whole history.
      no_repeat_ngram_size: int >= 0; ban tokens that would repeat an n-gram of the row (HF); 0 is off.
      bad_words: list of token-id lists; ban a sequence's last token when the row ends with the rest (HF / vLLM).
      sequence_bias: ``{(ids...): bias}`` or ``[[ids, bias], ...]``; add bias to a sequence's last token when
        the row ends with the rest (HF).
      allowed_token_ids: list of token ids; every other token is banned (vLLM). None is off.
      exponential_decay_length_penalty: ``(start, factor)``; after ``start`` generated tokens, EOS logits grow
        by ``|logit| * (factor ** (step - start) - 1)`` (HF). None is off.
      suppress_tokens: list of token ids banned at every step (HF). None is off.
      begin_suppress_tokens: list of token ids banned at the first generated step (HF). None is off.

    Example:
      >>> import jaxdecode
      >>> params = jaxdecode.SamplingParams(temperature=0.7, top_p=0.9, stop_sequences=[[13, 13]])
      >>> params.replace(temperature=0.0).temperature
      0.0
      >>> jaxdecode.SamplingParams(top_p=1.5)
      Traceback (most recent call last):
      ...
      ValueError: jaxdecode.SamplingParams: `top_p` got 1.5; allowed: a number in (0, 1] (1 means off).
    """

    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    typical_p: Any = 1.0
    repetition_penalty: Any = 1.0
    presence_penalty: Any = 0.0
    frequency_penalty: Any = 0.0
    logit_bias: Any = None
    eos_id: Any = None
    min_new_tokens: Any = 0
    stop_sequences: Any = None
    stop: Any = None
    top_n_sigma: Any = 0.0
    epsilon_cutoff: Any = 0.0
    eta_cutoff: Any = 0.0
    min_tokens_to_keep: Any = 1
    xtc_threshold: Any = 0.1
    xtc_probability: Any = 0.0
    dynatemp_range: Any = 0.0
    dynatemp_exponent: Any = 1.0
    mirostat_tau: Any = 0.0
    mirostat_eta: Any = 0.1
    dry_multiplier: Any = 0.0
    dry_base: Any = 1.75
    dry_allowed_length: Any = 2
    dry_penalty_last_n: Any = 0
    dry_sequence_breakers: Any = None
    penalty_last_n: Any = 0
    no_repeat_ngram_size: Any = 0
    bad_words: Any = None
    sequence_bias: Any = None
    allowed_token_ids: Any = None
    exponential_decay_length_penalty: Any = None
    suppress_tokens: Any = None
    begin_suppress_tokens: Any = None

    def __post_init__(self) -> None:
        _check_and_normalise(_CLASS, self)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
# Host-only fields: pytree aux data (strings cannot be traced; the loop reads a table built
# from them).
_STATIC = ("stop",)
_TRACED = tuple(name for name in FIELDS if name not in _STATIC)


def _flatten(p: SamplingParams):
    return tuple(getattr(p, name) for name in _TRACED), tuple(getattr(p, name) for name in _STATIC)


def _unflatten(aux, children) -> SamplingParams:
    # No checks: JAX unflattens with tracers and placeholder objects.
    obj = object.__new__(SamplingParams)
    for name, value in zip(_TRACED + _STATIC, tuple(children) + tuple(aux)):
        object.__setattr__(obj, name, value)
    return obj


jax.tree_util.register_pytree_node(SamplingParams, _flatten, _unflatten)


# ---------------------------------------------------------------------------------------
# One check per field (concrete values only; vocabulary and batch checks are in resolve)


def _check_finite(fn: str, name: str, value: Any) -> None:
    V.check_knob(fn, name, value, allowed="a finite number (0 means off)")
    if V.is_concrete(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
        raise ValueError(f"{fn}: `{name}` must be finite, got {value!r}; allowed: a finite number (0 means off).")


def _norm_eos(fn: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(V.is_concrete(v) for v in value):
        arr = np.asarray(value) if value else np.zeros((0,), np.int64)
    elif V.is_concrete(value) and not isinstance(value, jax.Array):
        arr = np.asarray(value)
    else:
        return value  # a (traced or device) array: its shape is static, its values traced
    if arr.dtype == object or arr.dtype == bool or arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(f"{fn}: `eos_id` must be a token id or a list of token ids, got {value!r}.")
    return tuple(int(x) for x in arr.reshape(-1))


def _norm_stop(fn: str, value: Any, name: str = "stop_sequences") -> Any:
    if value is None:
        return None
    seqs = list(value) if isinstance(value, (list, tuple)) else None
    if seqs is None or any(np.ndim(s) != 1 for s in seqs):
        raise TypeError(f"{fn}: `{name}` must be a list of token-id lists, e.g. [[13, 13], [50256]]; "
                        f"got {value!r}.")
    out = []
    for j, s in enumerate(seqs):
        if not V.is_concrete(s):
            out.append(s)
            continue
        a = np.asarray(s)
        if a.size == 0:
            raise ValueError(f"{fn}: `{name}[{j}]` is empty; each sequence needs >= 1 token.")
        if a.dtype == bool or a.dtype.kind not in "iu":
            raise TypeError(f"{fn}: `{name}[{j}]` must hold integer token ids, got {s!r}.")
        out.append(tuple(int(x) for x in a))
    return tuple(out) if out else None


def _norm_ids(fn: str, name: str, value: Any) -> Any:
    """A list of token ids as a tuple (None stays None)."""
    if value is None:
        return None
    if not V.is_concrete(value):
        return value
    arr = np.asarray(value)
    if arr.size == 0 and arr.ndim == 1:
        if name == "allowed_token_ids":  # would ban every token
            raise ValueError(f"{fn}: `allowed_token_ids` is empty; it needs >= 1 token id (None is off).")
        return None
    if arr.dtype == object or arr.dtype == bool or arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(f"{fn}: `{name}` must be a list of token ids, got {value!r}.")
    return tuple(int(x) for x in arr.reshape(-1))


def _norm_sequence_bias(fn: str, value: Any) -> Any:
    """``{(ids...): bias}`` or ``[[ids, bias], ...]`` as a tuple of ``(ids tuple, bias)`` pairs."""
    if value is None:
        return None
    items = list(value.items()) if isinstance(value, dict) else None
    if items is None and isinstance(value, (list, tuple)) and all(
            isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
        items = [(x[0], x[1]) for x in value]
    if items is None:
        raise TypeError(f"{fn}: `sequence_bias` must be a dict {{(token ids...): bias}} or a list of "
                        f"[token ids, bias] pairs, got {value!r}.")
    seqs = _norm_stop(fn, [ids if np.ndim(ids) else [ids] for ids, _ in items], "sequence_bias")
    out = []
    for (ids, bias), seq in zip(items, seqs or ()):
        if V.is_concrete(bias) and not np.all(np.isfinite(np.asarray(bias, np.float64))):
            raise ValueError(f"{fn}: `sequence_bias` for {seq} must be finite, got {bias!r}.")
        out.append((seq, bias))
    return tuple(out) if out else None


def _norm_decay(fn: str, value: Any) -> Any:
    name = "exponential_decay_length_penalty"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError(f"{fn}: `{name}` must be a pair (start, factor), e.g. (10, 1.05), got {value!r}.")
    start, factor = value
    V.check_knob(fn, f"{name}[0] (start)", start, low=0, integer=True, allowed="an integer >= 0 (generated tokens)")
    V.check_knob(fn, f"{name}[1] (factor)", factor, low=0.0, low_open=True, allowed="a number > 0 (1 means off)")
    _check_finite(fn, f"{name}[1] (factor)", factor)
    return (start, factor)


def _norm_bias(fn: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        out = {}
        for tok, val in value.items():
            t = V.as_int(fn, "logit_bias key", tok, "a token id")
            if V.is_concrete(val) and np.isnan(np.asarray(val, np.float64)).any():
                raise ValueError(f"{fn}: `logit_bias` contains NaN (token id {t}).")
            out[t] = val
        return out
    if V.is_concrete(value) and not isinstance(value, jax.Array):
        arr = np.asarray(value, np.float32)
        if np.isnan(arr).any():
            raise ValueError(f"{fn}: `logit_bias` contains NaN.")
        return arr
    return value


def _check_and_normalise(fn: str, p: SamplingParams) -> None:
    """Checks every concrete field; normalises ids and sequences to tuples (immutable)."""
    for name in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
        make_knobs_check(fn, name, getattr(p, name))
    V.check_knob(fn, "repetition_penalty", p.repetition_penalty, low=0.0, low_open=True,
                 allowed="a number > 0 (1 means off)")
    _check_finite(fn, "presence_penalty", p.presence_penalty)
    _check_finite(fn, "frequency_penalty", p.frequency_penalty)
    V.check_knob(fn, "min_new_tokens", p.min_new_tokens, low=0, integer=True, allowed="an integer >= 0")
    object.__setattr__(p, "eos_id", _norm_eos(fn, p.eos_id))
    object.__setattr__(p, "stop_sequences", _norm_stop(fn, p.stop_sequences))
    object.__setattr__(p, "logit_bias", _norm_bias(fn, p.logit_bias))
    object.__setattr__(p, "stop", _stop.normalise(fn, p.stop))
    for name in _EXTRA_SPECS:
        check_extra(fn, name, getattr(p, name))
    V.check_knob(fn, "dry_multiplier", p.dry_multiplier, low=0.0, allowed="a number >= 0 (0 means off)")
    _check_finite(fn, "dry_multiplier", p.dry_multiplier)
    V.check_knob(fn, "dry_base", p.dry_base, low=1.0, allowed="a number >= 1")
    _check_finite(fn, "dry_base", p.dry_base)
    V.check_knob(fn, "dry_allowed_length", p.dry_allowed_length, low=1, integer=True, allowed="an integer >= 1")
    for name in ("dry_penalty_last_n", "penalty_last_n"):
        V.check_knob(fn, name, getattr(p, name), low=0, integer=True,
                     allowed="an integer >= 0 (a window of the last n tokens; 0 means the whole history)")
    V.check_knob(fn, "no_repeat_ngram_size", p.no_repeat_ngram_size, low=0, integer=True,
                 allowed="an integer >= 0 (0 means off)")
    for name in ("dry_sequence_breakers", "bad_words"):
        object.__setattr__(p, name, _norm_stop(fn, getattr(p, name), name))
    object.__setattr__(p, "sequence_bias", _norm_sequence_bias(fn, p.sequence_bias))
    for name in ("allowed_token_ids", "suppress_tokens", "begin_suppress_tokens"):
        object.__setattr__(p, name, _norm_ids(fn, name, getattr(p, name)))
    object.__setattr__(p, "exponential_decay_length_penalty", _norm_decay(fn, p.exponential_decay_length_penalty))


def make_knobs_check(fn: str, name: str, value: Any) -> None:
    spec = dict(_KNOB_SPECS[name])
    spec.pop("dtype")
    V.check_knob(fn, name, value, **spec)


def _make(fn: str, values: dict[str, Any]) -> SamplingParams:
    obj = object.__new__(SamplingParams)
    for name in FIELDS:
        object.__setattr__(obj, name, values.get(name, DEFAULTS[name]))
    _check_and_normalise(fn, obj)
    return obj


def from_keywords(fn: str, sampling: Any, **keywords: Any) -> SamplingParams:
    """The call's :class:`SamplingParams`: ``sampling`` itself, or one built from the keyword
    shorthand (checked with ``fn``'s name). Both at once is a ValueError."""
    given = {k: v for k, v in keywords.items() if v is not UNSET}
    if sampling is None:
        return _make(fn, given)
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"{fn}: `sampling` must be a jaxdecode.SamplingParams, got {type(sampling).__name__}.")
    if given:
        names = ", ".join(f"`{k}`" for k in given)
        raise ValueError(f"{fn}: got both `sampling=SamplingParams(...)` and the keyword knob(s) {names}; "
                         f"pass each knob one way: put it in the SamplingParams (sampling.replace(...)).")
    return sampling


def _is_default(name: str, value: Any) -> bool:
    default = DEFAULTS[name]
    if value is default:
        return True
    if default is None or value is None:
        return False
    return bool(V.is_concrete(value) and np.ndim(value) == 0 and value == default)


# The traced knobs of issue 13 that need the step's full branch when not at their default.
_FULL_STEP = tuple(_EXTRA_SPECS) + ("penalty_last_n", "dry_multiplier", "no_repeat_ngram_size")


def uses_traced_rules(p: SamplingParams) -> bool:
    """False when every extended truncation, ``penalty_last_n``, ``dry_multiplier`` and
    ``no_repeat_ngram_size`` is concrete and at its default in every row (static: the decode
    step then leaves them out; their values are traced otherwise, so changing them between
    non-default values never recompiles)."""
    for name in _FULL_STEP:
        value = getattr(p, name)
        if not V.is_concrete(value) or not np.all(np.asarray(value) == DEFAULTS[name]):
            return True
    return False


# The fields added by issue 13 (top_n_sigma ... begin_suppress_tokens): the extended
# truncations, mirostat, DRY, the penalty window and the history rules.
EXTENDED_FIELDS: tuple[str, ...] = FIELDS[FIELDS.index("top_n_sigma"):]


def uses_extended(p: SamplingParams) -> bool:
    """Whether any field of :data:`EXTENDED_FIELDS` is away from its default (the serving
    engine's slot then takes its extended decode branch).

    Example:
      >>> import jaxdecode
      >>> from jaxdecode._settings import uses_extended
      >>> uses_extended(jaxdecode.SamplingParams(top_k=5)), uses_extended(jaxdecode.SamplingParams(bad_words=[[3]]))
      (False, True)
    """
    return any(not _is_default(name, getattr(p, name)) for name in EXTENDED_FIELDS)


def check_supported(fn: str, p: SamplingParams, supported: tuple[str, ...], where: str) -> None:
    """A ValueError for every field not in ``supported`` that is not at its default."""
    for name in FIELDS:
        if name not in supported and not _is_default(name, getattr(p, name)):
            raise ValueError(f"{fn}: `{name}` is not supported {where} (got {getattr(p, name)!r}); "
                             f"leave it at its default {DEFAULTS[name]!r}.")


# ---------------------------------------------------------------------------------------
# Resolution against a model and a batch: the traced arrays the decode loops read


class Resolved(NamedTuple):
    """A :class:`SamplingParams` as arrays for B rows and a vocabulary of V (None: unused)."""

    knobs: SamplingKnobs  # each [B]
    repetition_penalty: jax.Array  # float32[B]
    frequency_penalty: jax.Array  # float32[B]
    presence_penalty: jax.Array  # float32[B]
    logit_bias: Any  # float32[V] or [B, V], or None
    eos_ids: Any  # int32[E], or None
    min_new_tokens: jax.Array  # int32[B]
    stop_seqs: Any  # int32[S, M] right-aligned, or None
    stop_lens: Any  # int32[S], or None
    extra: ExtraKnobs  # each [B]: the extended truncations
    rules: SamplingRules  # the history rules (DRY, penalty window, n-grams, bans, length rules)


def eos_ids(fn: str, p: SamplingParams, vocab: int, model_default: tuple[int, ...]) -> Any:
    """int32[E] EOS ids (``p.eos_id``, or the model's when None), or None when there are none."""
    ids = model_default if p.eos_id is None else p.eos_id
    if isinstance(ids, tuple) and len(ids) == 0:
        return None
    return V.token_ids(fn, "eos_id", ids, vocab)


def _logit_bias(fn: str, bias: Any, b: int, vocab: int) -> Any:
    if bias is None:
        return None
    if isinstance(bias, dict):
        for t in bias:
            if not 0 <= t < vocab:
                raise ValueError(f"{fn}: `logit_bias` has token id {t}, outside [0, {vocab}) (the model's vocabulary).")
        if all(V.is_concrete(v) for v in bias.values()):
            dense = np.zeros((vocab,), np.float32)
            for t, val in bias.items():
                dense[t] = float(val)
            return jnp.asarray(dense)
        ids = jnp.asarray(list(bias), jnp.int32)  # traced values (inside a user's jit)
        vals = jnp.stack([jnp.asarray(v, jnp.float32) for v in bias.values()])
        return jnp.zeros((vocab,), jnp.float32).at[ids].set(vals)
    shape = tuple(np.shape(bias))
    if shape not in ((vocab,), (b, vocab)):
        raise ValueError(f"{fn}: `logit_bias` must be a dict {{token_id: bias}} or an array of shape ({vocab},) or "
                         f"({b}, {vocab}), got shape {shape}.")
    return jnp.asarray(bias, jnp.float32)


def _stop_table(fn: str, seqs: Any, vocab: int, name: str = "stop_sequences"):
    if seqs is None:
        return None, None
    for j, s in enumerate(seqs):
        if V.is_concrete(s):
            a = np.asarray(s)
            if (a < 0).any() or (a >= vocab).any():
                raise ValueError(f"{fn}: `{name}[{j}]` = {a.tolist()} has ids outside [0, {vocab}) "
                                 f"(the model's vocabulary).")
    m = max(len(s) for s in seqs)
    rows = [jnp.concatenate([jnp.zeros((m - len(s),), jnp.int32), jnp.asarray(s, jnp.int32).reshape(-1)])
            for s in seqs]  # right-aligned
    return jnp.stack(rows), jnp.asarray(np.array([len(s) for s in seqs], np.int32))


def _id_mask(fn: str, name: str, ids: Any, vocab: int) -> Any:
    if ids is None:
        return None
    arr = V.token_ids(fn, name, ids, vocab)
    return jnp.zeros((vocab,), bool).at[arr].set(True, mode="drop")


def _rules(fn: str, p: SamplingParams, b: int, vocab: int) -> SamplingRules:
    knob = lambda name, dtype: V.broadcast_knob(fn, name, getattr(p, name), (b,), dtype)
    breakers = _stop_table(fn, p.dry_sequence_breakers, vocab, "dry_sequence_breakers")
    bad = _stop_table(fn, p.bad_words, vocab, "bad_words")
    bias = None
    if p.sequence_bias is not None:
        table, lens = _stop_table(fn, [seq for seq, _ in p.sequence_bias], vocab, "sequence_bias")
        bias = (table, lens, jnp.stack([jnp.asarray(v, jnp.float32) for _, v in p.sequence_bias]))
    decay = None
    if p.exponential_decay_length_penalty is not None:
        start, factor = p.exponential_decay_length_penalty
        decay = (V.broadcast_knob(fn, "exponential_decay_length_penalty[0] (start)", start, (b,), np.int32),
                 V.broadcast_knob(fn, "exponential_decay_length_penalty[1] (factor)", factor, (b,), np.float32))
    return SamplingRules(
        penalty_last_n=knob("penalty_last_n", np.int32),
        dry_multiplier=knob("dry_multiplier", np.float32),
        dry_base=knob("dry_base", np.float32),
        dry_allowed_length=knob("dry_allowed_length", np.int32),
        dry_penalty_last_n=knob("dry_penalty_last_n", np.int32),
        dry_breakers=None if breakers[0] is None else breakers,
        no_repeat_ngram_size=knob("no_repeat_ngram_size", np.int32),
        bad_words=None if bad[0] is None else bad,
        sequence_bias=bias,
        allowed=_id_mask(fn, "allowed_token_ids", p.allowed_token_ids, vocab),
        suppress=_id_mask(fn, "suppress_tokens", p.suppress_tokens, vocab),
        begin_suppress=_id_mask(fn, "begin_suppress_tokens", p.begin_suppress_tokens, vocab),
        decay=decay,
    )


def resolve(fn: str, p: SamplingParams, b: int, vocab: int, model_eos: tuple[int, ...]) -> Resolved:
    """Checks ``p`` against the batch and vocabulary and returns its arrays."""
    knobs = make_knobs(fn, (b,), temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                       typical_p=p.typical_p, checked=True)
    stop_seqs, stop_lens = _stop_table(fn, p.stop_sequences, vocab)
    return Resolved(
        knobs=knobs,
        repetition_penalty=V.broadcast_knob(fn, "repetition_penalty", p.repetition_penalty, (b,), np.float32),
        frequency_penalty=V.broadcast_knob(fn, "frequency_penalty", p.frequency_penalty, (b,), np.float32),
        presence_penalty=V.broadcast_knob(fn, "presence_penalty", p.presence_penalty, (b,), np.float32),
        logit_bias=_logit_bias(fn, p.logit_bias, b, vocab),
        eos_ids=eos_ids(fn, p, vocab, model_eos),
        min_new_tokens=V.broadcast_knob(fn, "min_new_tokens", p.min_new_tokens, (b,), np.int32),
        stop_seqs=stop_seqs,
        stop_lens=stop_lens,
        extra=make_extra(fn, (b,), checked=True, **{name: getattr(p, name) for name in _EXTRA_SPECS}),
        rules=_rules(fn, p, b, vocab),
    )
