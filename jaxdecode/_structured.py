"""Structured output inside the compiled loop: JSON schema, regex and choice constraints.

A regular constraint is a finite automaton over tokens. :func:`json_schema`, :func:`regex` and
:func:`choice` build it once on the host with ``outlines-core`` (its ``Index``: states, the
allowed tokens of each state and their next states) and compact it into a small table that
lives on the device:

* ``class_of[V]`` int32: tokens whose next-state columns are identical in every state share
  one class (class 0 is the tokens never allowed: special tokens, padding of the vocabulary);
* ``table[S, C]`` int32: the next state after a token of class ``c`` in state ``s``, or -1
  when the token is not allowed;
* ``final[S]`` bool: the accepting states. EOS tokens are one class of their own whose
  column is ``s`` in final states and -1 elsewhere: EOS is allowed only once the text is
  complete (and ends the row).

Inside the decode loop the automaton state is one int32 per row. Each step
``allowed = table[state][class_of] >= 0`` masks the logits (so the constrained distribution
is the model's, renormalised over the allowed tokens, before temperature / top-k / top-p);
after the draw ``state = table[state, class_of[token]]``. No host work per token.

For :func:`jaxdecode.generate` the tables of every row's constraint are stacked and padded to
size buckets (states, classes, constraints), and passed as traced arrays: a new schema of a
similar size reuses the compiled loop. This module is floor 2 (a logits processor on
:class:`jaxdecode.DecodeContext`); it does not import the decoders.

Example:
  >>> import jaxdecode
  >>> tokens = ["<eos>", "a", "b", "ab", "c"]  # token i's text; id 0 is EOS
  >>> c = jaxdecode.regex("a+b", tokens, eos_ids=[0])
  >>> c.num_states, c.accepts([1, 1, 2]), c.accepts([3]), c.accepts([1])
  (3, True, True, False)
"""

from __future__ import annotations

import json
import math
import re
import time
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._compilation import bucket
from ._processors import DecodeContext, LogitsProcessor

__all__ = ["Constraint", "json_schema", "regex", "choice", "ConstraintTables", "stack_constraints"]

INSTALL = "pip install 'jaxdecode[structured]'"

# Size buckets of the device tables: a new constraint whose padded sizes match reuses the
# compiled loop (each dimension at most doubles).
STATE_BUCKETS = (32, 2)
CLASS_BUCKETS = (32, 2)
CONSTRAINT_BUCKETS = (1, 2)


def _outlines(fn: str):
    try:
        import outlines_core
        from outlines_core import json_schema as js
    except ImportError as e:  # pragma: no cover - outlines-core is in the test extra
        raise ImportError(f"{fn} needs the `outlines-core` package: {INSTALL}") from e
    return outlines_core, js


# ---------------------------------------------------------------------------------------
# Tokenizer -> the bytes of every token


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _backend_token_bytes(backend) -> list[bytes | None]:
    """The byte string each id of a ``tokenizers.Tokenizer`` stands for (None: special token)."""
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
    byte_level = decoder == "ByteLevel" or "ByteLevel" in repr(backend.decoder)
    inv = _bytes_to_unicode()
    out: list[bytes | None] = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        tok = backend.id_to_token(i)
        if tok is None or i in special:
            out.append(None)
        elif byte_level and all(ch in inv for ch in tok):
            out.append(bytes(inv[ch] for ch in tok))
        elif not byte_level and _BYTE_TOKEN.match(tok):  # SentencePiece byte fallback
            out.append(bytes([int(_BYTE_TOKEN.match(tok).group(1), 16)]))
        elif not byte_level:
            out.append(tok.replace("\u2581", " ").encode("utf-8"))
        else:  # an added (non-special) token of a byte-level vocabulary: its text as written
            out.append(tok.encode("utf-8"))
    return out


class _Vocab(NamedTuple):
    token_bytes: tuple  # bytes | None per id
    eos_ids: tuple
    outlines: Any  # outlines_core.Vocabulary


_VOCABS: "weakref.WeakKeyDictionary[Any, _Vocab]" = weakref.WeakKeyDictionary()


def _vocab(fn: str, tokenizer: Any, eos_ids: Sequence[int] | None) -> _Vocab:
    """The tokenizer's token bytes and outlines Vocabulary (cached per tokenizer object)."""
    oc, _ = _outlines(fn)
    key = tokenizer if eos_ids is None else None
    if key is not None:
        try:
            hit = _VOCABS.get(key)
        except TypeError:  # not weak-referenceable (a list)
            hit, key = None, None
        if hit is not None:
            return hit
    if isinstance(tokenizer, (list, tuple)):
        toks = [None if t is None else (t if isinstance(t, bytes) else str(t).encode("utf-8")) for t in tokenizer]
        default_eos: tuple = ()
    elif hasattr(tokenizer, "backend") and hasattr(tokenizer.backend, "get_added_tokens_decoder"):
        toks = _backend_token_bytes(tokenizer.backend)  # jaxdecode.models.Tokenizer
        default_eos = tuple(getattr(tokenizer, "eos_ids", ()) or ())
    elif hasattr(tokenizer, "get_added_tokens_decoder") and hasattr(tokenizer, "id_to_token"):
        toks = _backend_token_bytes(tokenizer)  # a tokenizers.Tokenizer
        default_eos = ()
    else:
        raise TypeError(f"{fn}: `tokenizer` must be a jaxdecode.models.Tokenizer, a tokenizers.Tokenizer or a "
                        f"list of token strings/bytes (index = id), got {type(tokenizer).__name__}.")
    eos = tuple(int(e) for e in (default_eos if eos_ids is None else eos_ids))
    if not eos:
        raise ValueError(f"{fn}: the tokenizer declares no EOS id; pass `eos_ids=[...]` (a constrained row ends "
                         f"with EOS once its text is complete).")
    for e in eos:
        if not 0 <= e < len(toks):
            raise ValueError(f"{fn}: `eos_ids` has id {e}, outside the vocabulary [0, {len(toks)}).")
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(toks):
        if b and i not in eos:
            mapping.setdefault(b, []).append(i)
    voc = _Vocab(tuple(None if i in eos else b for i, b in enumerate(toks)), eos, oc.Vocabulary(eos[0], mapping))
    if key is not None:
        _VOCABS[key] = voc
    return voc


# ---------------------------------------------------------------------------------------
# The constraint


class Constraint:
    """A token-level automaton compacted for the device (built by :func:`json_schema`,
    :func:`regex` or :func:`choice`; pass it as ``generate(..., constraint=c)``).

    Attributes:
      kind: "json_schema", "regex" or "choice".
      pattern: the regular expression the text must fully match.
      class_of: int32[V] numpy array, each token's class (0: never allowed).
      table: int32[S, C] numpy array, the next state (-1: not allowed); state 0 is the start.
      final: bool[S] numpy array, the accepting states.
      eos_ids: the EOS ids (allowed only in final states; the row ends there).
      build_seconds: host time to build the automaton and its tables.
    """

    def __init__(self, kind: str, pattern: str, class_of: np.ndarray, table: np.ndarray, final: np.ndarray,
                 eos_ids: tuple, build_seconds: float):
        self.kind, self.pattern = kind, pattern
        self.class_of, self.table, self.final = class_of, table, final
        self.eos_ids = eos_ids
        self.build_seconds = build_seconds

    @property
    def vocab_size(self) -> int:
        return int(self.class_of.shape[0])

    @property
    def num_states(self) -> int:
        return int(self.table.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.table.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the compact tables (``class_of``, ``table``, ``final``) before padding."""
        return int(self.class_of.nbytes + self.table.nbytes + self.final.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense ``[S, V]`` int16 next-state table the classes replace."""
        return 2 * self.num_states * self.vocab_size

    def __repr__(self) -> str:
        return (f"Constraint({self.kind}, states={self.num_states}, classes={self.num_classes}, "
                f"{self.nbytes / 1024:.1f} KiB vs dense {self.dense_nbytes / 2**20:.1f} MiB)")

    def step(self, state: int, token: int) -> int:
        """The next state after ``token`` in ``state`` (-1: not allowed)."""
        if state < 0 or not 0 <= token < self.vocab_size:
            return -1
        return int(self.table[state, self.class_of[token]])

    def accepts(self, ids: Sequence[int]) -> bool:
        """Whether the token ids (optionally ending with EOS) form a complete match."""
        s = 0
        for t in [int(i) for i in ids]:
            if t in self.eos_ids:
                return bool(self.final[s])
            s = self.step(s, t)
            if s < 0:
                return False
        return bool(self.final[s])

    def allowed(self, state: int) -> np.ndarray:
        """bool[V]: the tokens allowed in ``state``."""
        return self.table[state][self.class_of] >= 0

    def processor(self) -> LogitsProcessor:
        """This constraint as a :class:`jaxdecode.LogitsProcessor` for every row (its tables
        are constants of the compiled program; ``generate(constraint=...)`` passes them as
        traced arrays instead, so prefer that)."""
        tables = stack_constraints("jaxdecode.Constraint.processor", [self], 1, self.vocab_size)
        return LogitsProcessor(
            init=lambda ctx: init_state(ctx),
            update=lambda logits, st, ctx: apply(
                tables._replace(row=jnp.zeros(logits.shape[:1], jnp.int32)), logits, st, ctx))


def _compact(fn: str, kind: str, pattern: str, index, voc: _Vocab, t0: float) -> Constraint:
    """outlines' Index -> live states renumbered from 0, token classes and the class table."""
    transitions = index.get_transitions()
    init = index.get_initial_state()
    finals = set(index.get_final_states())
    eos = set(voc.eos_ids)
    edges = {s: {t: n for t, n in d.items() if t not in eos} for s, d in transitions.items()}
    # Live states: reachable from the start and able to reach a final state.
    order, seen = [init], {init}
    for s in order:
        for n in edges.get(s, {}).values():
            if n not in seen:
                seen.add(n)
                order.append(n)
    rev: dict[int, set] = {}
    for s in order:
        for n in edges.get(s, {}).values():
            rev.setdefault(n, set()).add(s)
    co = [s for s in order if s in finals]
    coset = set(co)
    for s in co:
        for p in rev.get(s, ()):
            if p not in coset:
                coset.add(p)
                co.append(p)
    if init not in coset:
        raise ValueError(f"{fn}: the constraint {pattern[:200]!r} cannot be satisfied with this tokenizer's "
                         f"tokens (no token sequence reaches an accepting state).")
    live = [s for s in order if s in coset]
    sid = {s: i for i, s in enumerate(live)}
    n_states, v = len(live), len(voc.token_bytes)
    eos_arr = np.asarray(sorted(eos), np.int64)
    cols = []  # per state: (token ids, next states)
    for s in live:
        pairs = [(t, sid[n]) for t, n in edges.get(s, {}).items() if n in sid]
        toks = np.fromiter((p[0] for p in pairs), np.int64, len(pairs))
        nxt = np.fromiter((p[1] for p in pairs), np.int64, len(pairs))
        if s in finals:  # EOS: allowed only here, and the row stays accepted
            toks = np.concatenate([toks, eos_arr])
            nxt = np.concatenate([nxt, np.full(eos_arr.shape, sid[s], np.int64)])
        cols.append((toks, nxt))
    # Partition refinement: two tokens share a class iff they have the same next state in
    # every state. Class 0 = tokens never allowed (never refined).
    cls = np.zeros((v,), np.int64)
    next_id = 1
    for toks, nxt in cols:
        if toks.size == 0:
            continue
        uniq, inv = np.unique(cls[toks] * (n_states + 1) + nxt, return_inverse=True)
        cls[toks] = next_id + inv
        next_id += uniq.size
    used, cls = np.unique(cls, return_inverse=True)
    if used[0] != 0:  # every token allowed somewhere: keep class 0 as the empty class
        cls = cls + 1
    n_classes = int(cls.max()) + 1
    reps = np.zeros((n_classes,), np.int64)
    reps[cls[::-1]] = np.arange(v - 1, -1, -1)  # the first token of each class
    table = np.full((n_states, n_classes), -1, np.int32)
    col = np.empty((v,), np.int32)
    for s, (toks, nxt) in enumerate(cols):
        col.fill(-1)
        col[toks] = nxt
        table[s] = col[reps]
    table[:, 0] = -1
    final = np.array([s in finals for s in live], bool)
    return Constraint(kind, pattern, cls.astype(np.int32), table, final, voc.eos_ids, time.perf_counter() - t0)


def _build(fn: str, kind: str, pattern: str, tokenizer: Any, eos_ids) -> Constraint:
    oc, _ = _outlines(fn)
    t0 = time.perf_counter()
    voc = _vocab(fn, tokenizer, eos_ids)
    try:
        index = oc.Index(pattern, voc.outlines)
    except Exception as e:  # outlines reports regex syntax errors and unsupported features
        raise ValueError(f"{fn}: cannot build an automaton for the pattern {pattern[:200]!r}: {e}") from e
    return _compact(fn, kind, pattern, index, voc, t0)


def regex(pattern: str, tokenizer: Any, *, eos_ids: Sequence[int] | None = None) -> Constraint:
    """A constraint: the generated text must fully match the regular expression ``pattern``.

    Args:
      pattern: a regular expression (outlines-core / Rust ``regex-automata`` syntax, no
        look-around or back-references), matched against the whole generated text.
      tokenizer: a ``jaxdecode.models.Tokenizer`` (as returned by ``jaxdecode.models.load``),
        a ``tokenizers.Tokenizer``, or a list of each token id's text (str or bytes; None for
        a token never generated).
      eos_ids: the EOS ids (default: the tokenizer's ``eos_ids``).

    Returns:
      A :class:`Constraint`.

    Raises:
      ValueError: an invalid pattern (the message names it), or one no token sequence can match.
      ImportError: outlines-core is missing (``pip install 'jaxdecode[structured]'``).

    Example:
      >>> import jaxdecode
      >>> c = jaxdecode.regex(r"[0-9]{2}", ["<eos>", "1", "2", "12", "x"], eos_ids=[0])
      >>> c.accepts([3, 0]), c.accepts([1, 2]), c.accepts([1, 4])
      (True, True, False)
    """
    fn = "jaxdecode.regex"
    if not isinstance(pattern, str):
        raise TypeError(f"{fn}: `pattern` must be a str, got {type(pattern).__name__}.")
    try:
        re.compile(pattern)
    except re.error as e:
        # Python's parser catches most syntax errors with a clearer message than Rust's.
        if not _rust_only_syntax(pattern):
            raise ValueError(f"{fn}: `pattern` {pattern!r} is not a valid regular expression: {e}.") from e
    return _build(fn, "regex", pattern, tokenizer, eos_ids)


def _rust_only_syntax(pattern: str) -> bool:
    return r"\p{" in pattern or r"\P{" in pattern or "[[:" in pattern


def choice(options: Sequence[str], tokenizer: Any, *, eos_ids: Sequence[int] | None = None) -> Constraint:
    """A constraint: the generated text must be exactly one of ``options``.

    Args:
      options: a non-empty list of distinct strings.
      tokenizer, eos_ids: as :func:`regex`.

    Example:
      >>> import jaxdecode
      >>> c = jaxdecode.choice(["yes", "no"], ["<eos>", "y", "es", "yes", "no", "n", "o"], eos_ids=[0])
      >>> c.accepts([3]), c.accepts([1, 2, 0]), c.accepts([5]), c.accepts([5, 6])
      (True, True, False, True)
    """
    fn = "jaxdecode.choice"
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise TypeError(f"{fn}: `options` must be a list of strings, got {type(options).__name__}.")
    if not options:
        raise ValueError(f"{fn}: `options` is empty; allowed: a non-empty list of strings.")
    for i, o in enumerate(options):
        if not isinstance(o, str) or not o:
            raise ValueError(f"{fn}: `options[{i}]` is {o!r}; allowed: a non-empty string.")
    pattern = "(" + "|".join(re.escape(o) for o in dict.fromkeys(options)) + ")"
    return _build(fn, "choice", pattern, tokenizer, eos_ids)


# ---------------------------------------------------------------------------------------
# JSON schema: keyword check and numeric ranges


# Keywords outlines-core 0.2.14 turns into the regex (and what it ignores harmlessly:
# annotations). Anything else is rejected: a keyword must never be silently dropped.
_ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
             "minLength", "maxLength", "pattern", "format", "minDigits", "maxDigits"}
_NUMERIC = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly"}
_FORMATS = {"date-time", "date", "time", "uuid", "uri", "email"}


def _check_keywords(fn: str, node: Any, path: str, ranges: list) -> Any:
    """A copy of the schema with numeric ranges replaced by placeholders (filled with a range
    regex after outlines built the rest); a keyword not enforced is a ValueError."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        raise ValueError(f"{fn}: the schema at {path} must be an object, got {node!r}.")
    bad = sorted(set(node) - _ENFORCED - _NUMERIC - _ANNOTATIONS)
    if bad:
        raise ValueError(f"{fn}: the schema keyword {bad[0]!r} at {path} is not supported (it would be ignored); "
                         f"supported: {', '.join(sorted(_ENFORCED | _NUMERIC))}.")
    if "format" in node and node["format"] not in _FORMATS:
        raise ValueError(f"{fn}: the string format {node['format']!r} at {path} is not supported; "
                         f"supported: {', '.join(sorted(_FORMATS))}.")
    if "allOf" in node and len(node["allOf"]) > 1:
        raise ValueError(f"{fn}: `allOf` with {len(node['allOf'])} schemas at {path} is not supported "
                         f"(intersections are not enforced); use a single schema.")
    out = dict(node)
    for k in ("properties", "$defs", "definitions"):
        if isinstance(node.get(k), dict):
            out[k] = {name: _check_keywords(fn, sub, f"{path}/{k}/{name}", ranges) for name, sub in node[k].items()}
    for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(k), list):
            out[k] = [_check_keywords(fn, sub, f"{path}/{k}/{i}", ranges) for i, sub in enumerate(node[k])]
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            out[k] = _check_keywords(fn, node[k], f"{path}/{k}", ranges)
        elif isinstance(node.get(k), list):
            out[k] = [_check_keywords(fn, sub, f"{path}/{k}/{i}", ranges) for i, sub in enumerate(node[k])]
    if _NUMERIC & set(node):
        typ = node.get("type")
        if typ not in ("integer", "number") or set(node) & {"enum", "const", "minDigits", "maxDigits"}:
            raise ValueError(f"{fn}: numeric bounds at {path} need `\"type\": \"integer\"` or `\"number\"` alone "
                             f"(got type {typ!r}).")
        placeholder = f"JXDRANGE{len(ranges)}Q"
        ranges.append((placeholder, _range_pattern(fn, path, typ, node)))
        keep = {k: v for k, v in node.items() if k in _ANNOTATIONS}
        return {**keep, "const": placeholder}
    return out


def _bound(fn: str, path: str, node: dict, typ: str, side: str):
    """(value, inclusive) for one side of a numeric range, or (None, True)."""
    plain, excl = ("minimum", "exclusiveMinimum") if side == "lo" else ("maximum", "exclusiveMaximum")
    cands = []
    for key, inclusive in ((plain, True), (excl, False)):
        v = node.get(key)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{fn}: `{key}` at {path} must be a finite number, got {v!r}.")
        cands.append((v, inclusive))
    if isinstance(node.get(excl), bool) and node[excl] and node.get(plain) is not None:  # draft 4
        cands = [(node[plain], False)]
    if not cands:
        return None, True
    # The tighter bound wins (for equal values the exclusive one).
    pick = (max if side == "lo" else min)(cands, key=lambda c: (c[0], (not c[1]) if side == "lo" else c[1]))
    v, inclusive = pick
    if typ == "integer":
        if side == "lo":
            v = math.ceil(v) if inclusive else math.floor(v) + 1
        else:
            v = math.floor(v) if inclusive else math.ceil(v) - 1
        return int(v), True
    if not float(v).is_integer():
        raise ValueError(f"{fn}: `{'minimum' if side == 'lo' else 'maximum'}`-type bound {v!r} at {path}: "
                         f"only integer-valued bounds are enforced for `number`; use an integer bound.")
    return int(v), inclusive


def _range_pattern(fn: str, path: str, typ: str, node: dict) -> str:
    lo, lo_in = _bound(fn, path, node, typ, "lo")
    hi, hi_in = _bound(fn, path, node, typ, "hi")
    parts = []
    # Non-negative values x in [max(lo, 0), hi]: magnitudes as they are.
    if hi is None or hi > 0 or (hi == 0 and hi_in):
        c, c_in = (lo, lo_in) if lo is not None and lo >= 0 else (0, True)
        parts += [_magnitude(typ, c, c_in, hi, hi_in)]
    # Negative values x in [lo, min(hi, 0)): "-" then a magnitude in (max(-hi, 0), -lo].
    if lo is None or lo < 0:
        c, c_in = (-hi, hi_in) if hi is not None and hi < 0 else (0, False)
        d, d_in = (None, True) if lo is None else (-lo, lo_in)
        parts += ["-" + p for p in [_magnitude(typ, c, c_in, d, d_in)] if p]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"{fn}: the numeric range at {path} is empty (minimum {lo}, maximum {hi}).")
    return "(" + "|".join(parts) + ")"


def _magnitude(typ: str, c: int, c_in: bool, d: int | None, d_in: bool) -> str:
    """A regex for JSON magnitudes (no sign) in the interval from c to d (None: unbounded)."""
    frac, zeros, nonzero = r"(\.[0-9]+)?", r"(\.0+)?", r"\.[0-9]*[1-9][0-9]*"
    if typ == "integer":
        lo = c if c_in else c + 1
        hi = None if d is None else (d if d_in else d - 1)
        if hi is not None and lo > hi:
            return ""
        return "(" + _int_range(lo, hi) + ")"
    if d is not None and c > d:
        return ""
    alts = []
    if d is not None and c == d:
        return f"{c}{zeros}" if c_in and d_in else ""
    alts.append(f"{c}{frac}" if c_in else f"{c}{nonzero}")  # integer part c
    inner = _int_range(c + 1, None if d is None else d - 1) if d is None or c + 1 <= d - 1 else ""
    if inner:
        alts.append(f"({inner}){frac}")
    if d is not None and d_in:
        alts.append(f"{d}{zeros}")
    return "(" + "|".join(alts) + ")"


def _int_range(lo: int, hi: int | None) -> str:
    """A regex for the decimal integers in [lo, hi] (lo >= 0; hi None: unbounded), JSON style
    (no leading zeros)."""
    parts = []
    top = len(str(hi)) if hi is not None else len(str(lo))
    for k in range(len(str(lo)), top + 1):
        a = max(lo, 0 if k == 1 else 10 ** (k - 1))
        b = 10 ** k - 1 if hi is None else min(hi, 10 ** k - 1)
        if a <= b:
            parts += _same_length(str(a), str(b))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{top},}}")
    return "|".join(parts)


def _same_length(x: str, y: str) -> list[str]:
    if x == y:
        return [x]
    if set(x) == {"0"} and set(y) == {"9"} and len(x) > 1:
        return [f"[0-9]{{{len(x)}}}"]
    if len(x) == 1:
        return [f"[{x}-{y}]"]
    if x[0] == y[0]:
        return [x[0] + p for p in _same_length(x[1:], y[1:])]
    n = len(x) - 1
    out = [x[0] + p for p in _same_length(x[1:], "9" * n)]
    if int(x[0]) + 1 <= int(y[0]) - 1:
        out.append(f"[{int(x[0]) + 1}-{int(y[0]) - 1}][0-9]{{{n}}}")
    out += [y[0] + p for p in _same_length("0" * n, y[1:])]
    return out


def json_schema(schema: Any, tokenizer: Any, *, eos_ids: Sequence[int] | None = None,
                whitespace_pattern: str | None = None, max_recursion_depth: int = 3) -> Constraint:
    """A constraint: the generated text must be a JSON document valid under ``schema``.

    Built with outlines-core's schema-to-regex translation (object properties in the order of
    ``properties``; ``$ref`` recursion unrolled to ``max_recursion_depth``), plus numeric
    ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` rewritten into patterns
    (outlines-core drops them; for ``number``, integer-valued bounds only, and bounded
    numbers are written without an exponent). A keyword that would not be enforced is a
    ValueError, never silently ignored (annotations such as ``title`` are fine).

    Args:
      schema: a dict or a JSON string.
      tokenizer, eos_ids: as :func:`regex`.
      whitespace_pattern: the regex of the whitespace allowed between tokens (outlines-core's
        default: an optional single space).
      max_recursion_depth: how deep recursive ``$ref``s are unrolled.

    Example:
      >>> import jaxdecode
      >>> toks = ["<eos>", "{", "}", '"a"', ":", "1", "2", "0", "true"]
      >>> c = jaxdecode.json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1,
      ...     "maximum": 12}}, "required": ["a"]}, toks, eos_ids=[0], whitespace_pattern="")
      >>> c.accepts([1, 3, 4, 5, 6, 2]), c.accepts([1, 3, 4, 5, 7, 2]), c.accepts([1, 3, 4, 6, 7, 2])
      (True, True, False)
    """
    fn = "jaxdecode.json_schema"
    _, js = _outlines(fn)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{fn}: `schema` is not valid JSON: {e}.") from e
    if not isinstance(schema, (dict, bool)):
        raise TypeError(f"{fn}: `schema` must be a dict or a JSON string, got {type(schema).__name__}.")
    ranges: list = []
    rewritten = _check_keywords(fn, schema, "#", ranges)
    text = json.dumps(rewritten)
    for placeholder, _ in ranges:
        if text.count(placeholder) != 1:
            raise ValueError(f"{fn}: internal placeholder {placeholder} clashes with the schema's text.")
    try:
        pattern = js.build_regex_from_schema(text, whitespace_pattern, max_recursion_depth)
    except Exception as e:
        raise ValueError(f"{fn}: unsupported or invalid schema: {e}") from e
    for placeholder, rx in ranges:
        pattern = pattern.replace(f'"{placeholder}"', rx)
    if "JXDRANGE" in pattern:
        raise ValueError(f"{fn}: a numeric range could not be placed in the schema's pattern.")
    return _build(fn, "json_schema", pattern, tokenizer, eos_ids)


# ---------------------------------------------------------------------------------------
# The device side


class ConstraintTables(NamedTuple):
    """Every row's constraint, stacked and padded for one compiled loop (K constraints).

    Attributes:
      class_of: int32[K, V]; table: int32[K, S, C]; final: bool[K, S];
      row: int32[B], each row's constraint (-1: unconstrained).
    """

    class_of: jax.Array
    table: jax.Array
    final: jax.Array
    row: jax.Array


def stack_constraints(fn: str, constraint: Any, batch: int, vocab: int, repeat: int = 1) -> ConstraintTables | None:
    """Per-row constraints (one :class:`Constraint` for every row, or a list with one entry
    (or None) per prompt row, each repeated ``repeat`` times) as padded device tables."""
    if constraint is None:
        return None
    if isinstance(constraint, Constraint):
        per_row = [constraint] * batch
    elif isinstance(constraint, Sequence) and not isinstance(constraint, str):
        per_row = list(constraint)
        if len(per_row) != batch:
            raise ValueError(f"{fn}: `constraint` has {len(per_row)} entries; expected one per prompt row ({batch}).")
    else:
        raise TypeError(f"{fn}: `constraint` must be a Constraint (jaxdecode.json_schema / regex / choice), a list "
                        f"of them (None for an unconstrained row) or None, got {type(constraint).__name__}.")
    distinct: list[Constraint] = []
    row = []
    for i, c in enumerate(per_row):
        if c is None:
            row.append(-1)
            continue
        if not isinstance(c, Constraint):
            raise TypeError(f"{fn}: `constraint[{i}]` must be a Constraint or None, got {type(c).__name__}.")
        if c.vocab_size > vocab:
            raise ValueError(f"{fn}: `constraint[{i}]` was built for a vocabulary of {c.vocab_size} tokens, larger "
                             f"than the model's {vocab}.")
        k = next((j for j, d in enumerate(distinct) if d is c), None)
        if k is None:
            distinct.append(c)
            k = len(distinct) - 1
        row.append(k)
    if not distinct:
        return None
    k_b = bucket(len(distinct), *CONSTRAINT_BUCKETS)
    s_b = bucket(max(c.num_states for c in distinct), *STATE_BUCKETS)
    c_b = bucket(max(c.num_classes for c in distinct), *CLASS_BUCKETS)
    class_of = np.zeros((k_b, vocab), np.int32)  # class 0: never allowed (the model's extra ids too)
    table = np.full((k_b, s_b, c_b), -1, np.int32)
    final = np.zeros((k_b, s_b), bool)
    for j, c in enumerate(distinct):
        class_of[j, : c.vocab_size] = c.class_of
        table[j, : c.num_states, : c.num_classes] = c.table
        final[j, : c.num_states] = c.final
    rows = np.repeat(np.asarray(row, np.int32), repeat)
    return ConstraintTables(jnp.asarray(class_of), jnp.asarray(table), jnp.asarray(final), jnp.asarray(rows))


def eos_ids_of(constraint: Any) -> set:
    """The EOS ids every constraint in ``constraint`` relies on."""
    cs = [constraint] if isinstance(constraint, Constraint) else list(constraint or [])
    cs = [c for c in cs if isinstance(c, Constraint)]
    return {e for c in cs for e in c.eos_ids}


class ConstraintState(NamedTuple):
    """The automaton's loop state: ``state`` int32[B] (after ``consumed`` generated tokens,
    int32[B])."""

    state: jax.Array
    consumed: jax.Array


def init_state(ctx: DecodeContext) -> ConstraintState:
    b = ctx.step.shape[0]
    return ConstraintState(jnp.zeros((b,), jnp.int32), ctx.step.astype(jnp.int32))


def advance(tables: ConstraintTables, st: ConstraintState, ctx: DecodeContext) -> ConstraintState:
    """Feeds each row's newest generated token (``ctx.prev_token``) to its automaton once:
    rows that generated a token since the state was last updated move, others stay."""
    k = jnp.maximum(tables.row, 0)
    cls = tables.class_of[k, ctx.prev_token]
    nxt = tables.table[k, jnp.maximum(st.state, 0), cls]
    moved = (ctx.step > st.consumed) & (tables.row >= 0)
    return ConstraintState(jnp.where(moved, jnp.where(st.state < 0, -1, nxt), st.state),
                           jnp.maximum(st.consumed, ctx.step))


def apply(tables: ConstraintTables, logits: jax.Array, st: ConstraintState, ctx: DecodeContext):
    """One step: advance the automaton by the previous token, then mask the logits to the
    tokens allowed next (-inf elsewhere). Returns (logits, state)."""
    st = advance(tables, st, ctx)
    k = jnp.maximum(tables.row, 0)
    row_table = tables.table[k, jnp.maximum(st.state, 0)]  # [B, C]
    # Class ids are < C by construction: skipping the bounds handling halves the gather's cost.
    allowed = jnp.take_along_axis(row_table, tables.class_of[k], axis=1, mode="promise_in_bounds") >= 0  # [B, V]
    allowed &= (st.state >= 0)[:, None]
    allowed |= (tables.row < 0)[:, None]
    return jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf), st


def complete(tables: ConstraintTables, st: ConstraintState, ctx: DecodeContext) -> jax.Array:
    """bool[B]: the row's generated text is a complete match (always True unconstrained)."""
    st = advance(tables, st, ctx)
    k = jnp.maximum(tables.row, 0)
    ok = (st.state >= 0) & tables.final[k, jnp.maximum(st.state, 0)]
    return ok | (tables.row < 0)
