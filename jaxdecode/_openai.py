"""The OpenAI API's request and response formats, on the slot engine (no HTTP here).

Shared by the HTTP server (``jaxdecode serve``, :mod:`jaxdecode._server`) and the offline
batch mode (``jaxdecode batch``, :mod:`jaxdecode._batch`):

* :func:`parse` turns a ``/v1/completions`` or ``/v1/chat/completions`` body into engine
  :class:`~jaxdecode._engine.Request` objects (one per prompt) and the host-side options
  (stop strings, logprobs, streaming); a bad field is an :class:`APIError` naming it, in
  OpenAI's error JSON.
* :class:`ChoiceText` follows one choice's tokens: incremental detokenization, the text cut
  at the first stop string (:func:`find_stop`; the engine's loop already ended the row at the
  token that completed it, from the request's ``stop_table``), log-probabilities, and the
  streamed text deltas.
* :func:`completion_body` / :func:`chunk_body` build the responses and stream chunks.

Where the OpenAI API is silent, this follows vLLM's OpenAI-compatible server (its extra
sampling fields ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, and every other :class:`jaxdecode.SamplingParams` field by its own name,
e.g. ``mirostat_tau``, ``dry_multiplier``, ``bad_words``; unknown fields are ignored).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import threading
import time
import types
import uuid
from typing import Any, Sequence

from . import _structured as C
from ._engine import Completion, Engine, Request
from ._processors import dry_sequence_breakers
from ._settings import EXTENDED_FIELDS, SamplingParams

__all__ = ["APIError", "Parsed", "parse", "ChoiceText", "find_stop", "completion_body", "chunk_body",
           "usage_body", "models_body"]


class APIError(Exception):
    """A request error with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Parsed:
    """A checked completions / chat request.

    Attributes:
      kind: "completion" or "chat".
      model: the model name to answer with.
      requests: one engine request per prompt (each with ``n`` choices).
      prompt_texts: each prompt's text (for ``echo``).
      stop: stop strings (matched on the decoded text; not included in the output).
      stream, include_usage: server-sent events; a last chunk with the usage.
      logprobs: None, or the number of top alternatives to report per token (0: only the
        chosen token's log-probability).
      echo: completions: the prompt text is prepended to each choice's text.
      n: choices per prompt.
    """

    kind: str
    model: str
    requests: list
    prompt_texts: list
    stop: list
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    n: int = 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(body: dict, name: str, default: Any, *, integer: bool = False, low: float | None = None,
            high: float | None = None, low_open: bool = False, allowed: str = "") -> Any:
    """``body[name]`` checked as a number (None / absent: ``default``)."""
    value = body.get(name)
    if value is None:
        return default
    ok = _is_number(value) and (not integer or isinstance(value, int) or float(value).is_integer())
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    what = allowed or ("an integer" if integer else "a number")
    if not ok:
        raise APIError(f"`{name}` must be {what}, got {value!r}.", name)
    if integer:
        value = int(value)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        raise APIError(f"`{name}` must be {what}, got {value!r}.", name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"`{name}` must be a boolean, got {value!r}.", name)
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise APIError(f"`{name}` must be a list of token ids, got {value!r:.80}.", name)
    return list(value)


# Built constraints, per (tokenizer, format): a schema's automaton is built once (json_object's
# takes seconds on a 49k-token vocabulary), then every request with it reuses the tables.
_CONSTRAINTS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_CONSTRAINTS_LOCK = threading.Lock()
_CONSTRAINTS_MAX = 64


def _cached_constraint(tokenizer: Any, kind: str, spec: str, build) -> Any:
    key = (id(tokenizer), kind, spec)
    with _CONSTRAINTS_LOCK:
        hit = _CONSTRAINTS.get(key)
        if hit is not None and hit[0] is tokenizer:
            _CONSTRAINTS.move_to_end(key)
            return hit[1]
    c = build()  # outside the lock: a long build must not hold up other requests' look-ups
    with _CONSTRAINTS_LOCK:
        _CONSTRAINTS[key] = (tokenizer, c)  # the tokenizer is kept so its id is not reused
        while len(_CONSTRAINTS) > _CONSTRAINTS_MAX:
            _CONSTRAINTS.popitem(last=False)
    return c


def response_constraint(body: dict, tokenizer: Any) -> Any:
    """``response_format`` (OpenAI) as a :class:`jaxdecode.Constraint`, or None for text.

    * ``{"type": "text"}`` (or absent): no constraint.
    * ``{"type": "json_object"}``: any JSON object (``jaxdecode.json_schema({"type": "object"})``).
    * ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``:
      a document valid under ``schema`` (``jaxdecode.json_schema``; a keyword it would not
      enforce is a 400, never silently ignored).

    The constraint runs inside the engine's decode step (one automaton state per slot).

    Raises:
      APIError: a malformed ``response_format`` or a schema that cannot be enforced (400,
        ``param`` "response_format").
    """
    rf = body.get("response_format")
    if rf is None:
        return None
    name = "response_format"
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError(f"`response_format` must be an object with a `type`, got {rf!r:.80}.", name)
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(f"`response_format.json_schema` must be an object with a `schema`, got {spec!r:.80}.", name)
        schema = spec.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise APIError(f"`response_format.json_schema.schema` must be a JSON schema object, got {schema!r:.80}.",
                           name)
    else:
        raise APIError(f"`response_format.type` must be 'text', 'json_object' or 'json_schema', got {kind!r}.", name)
    text = json.dumps(schema, sort_keys=True)
    try:
        return _cached_constraint(tokenizer, "json_schema", text, lambda: C.json_schema(schema, tokenizer))
    except (ValueError, TypeError) as e:
        raise APIError(f"`response_format`: {e}", name) from None
    except ImportError as e:  # outlines-core missing: the server cannot enforce it
        raise APIError(f"`response_format` {kind!r} needs structured output on the server: {e}", name,
                       status=501, type="not_implemented") from None


def _strings_as_ids(body: dict, name: str, tokenizer: Any, encode) -> Any:
    """``body[name]`` as SamplingParams takes it: token-id lists pass through; a list of strings
    (vLLM's ``bad_words``, llama.cpp's ``dry_sequence_breakers``) is encoded by ``encode``."""
    value = body[name]
    if not (isinstance(value, list) and value and all(isinstance(x, str) for x in value)):
        return value
    if tokenizer is None:
        raise APIError(f"`{name}` as strings needs the server's tokenizer; pass token-id lists.", name)
    if any(not x for x in value):
        raise APIError(f"`{name}` strings must not be empty.", name)
    try:
        return encode(value)
    except (ValueError, TypeError) as e:
        raise APIError(f"`{name}`: {e}", name) from None


def _no_bos(tokenizer: Any) -> Any:
    """``tokenizer`` with ``encode(text)`` never adding BOS (pieces of text, not prompts)."""
    return types.SimpleNamespace(encode=lambda text: list(tokenizer.encode(text, add_bos=False)))


def _bad_word_ids(tokenizer: Any, words: list) -> list:
    """vLLM's bad words: each word's tokens, alone and after a space (a word mid-sentence is
    usually one token with its leading space), without duplicates."""
    out: list = []
    for w in words:
        for text in (w, " " + w.lstrip()):
            ids = _no_bos(tokenizer).encode(text)
            if ids and ids not in out:
                out.append(ids)
    return out


def _sampling(body: dict, engine: Engine, tokenizer: Any = None) -> SamplingParams:
    """Every sampling field (OpenAI's, vLLM's extras, and SamplingParams' own names)."""
    vocab = engine.vocab
    top_k = _number(body, "top_k", 0, integer=True, low=-1, allowed="an integer >= -1 (-1 or 0 means off)")
    values = dict(
        temperature=_number(body, "temperature", 1.0, low=0.0, allowed="a number >= 0 (0 is greedy)"),
        top_p=_number(body, "top_p", 1.0, low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1]"),
        top_k=max(top_k, 0),
        min_p=_number(body, "min_p", 0.0, low=0.0, high=1.0, allowed="a number in [0, 1]"),
        typical_p=_number(body, "typical_p", 1.0, low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1]"),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, low_open=True, allowed="a number > 0"),
        presence_penalty=_number(body, "presence_penalty", 0.0, low=-2.0, high=2.0, allowed="a number in [-2, 2]"),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0, allowed="a number in [-2, 2]"),
    )
    min_tokens = _number(body, "min_tokens", 0, integer=True, low=0, allowed="an integer >= 0")
    values["min_new_tokens"] = _number(body, "min_new_tokens", min_tokens, integer=True, low=0,
                                       allowed="an integer >= 0")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise APIError(f"`logit_bias` must be an object mapping token ids to biases, got {bias!r:.80}.", "logit_bias")
        dense = {}
        for k, v in bias.items():
            try:
                t = int(k)
            except (TypeError, ValueError):
                raise APIError(f"`logit_bias` key {k!r} is not a token id.", "logit_bias") from None
            if not 0 <= t < vocab:
                raise APIError(f"`logit_bias` token id {t} is outside the vocabulary [0, {vocab}).", "logit_bias")
            if not _is_number(v) or not -100 <= v <= 100:
                raise APIError(f"`logit_bias` value for token {t} must be a number in [-100, 100], got {v!r}.",
                               "logit_bias")
            dense[t] = float(v)
        values["logit_bias"] = dense or None
    eos: list[int] | None = None
    if body.get("eos_id") is not None:
        e = body["eos_id"]
        eos = [e] if isinstance(e, int) and not isinstance(e, bool) else _int_list(e, "eos_id")
    elif _bool(body, "ignore_eos"):
        eos = []
    stop_ids = _int_list(body["stop_token_ids"], "stop_token_ids") if body.get("stop_token_ids") is not None else []
    if stop_ids:
        eos = list(dict.fromkeys((list(engine.eos_ids) if eos is None else eos) + stop_ids))
    for name, ids in (("eos_id", eos or []), ("stop_token_ids", stop_ids)):
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(f"`{name}` has token id {t}, outside the vocabulary [0, {vocab}).", name)
    if eos is not None:
        if len(eos) > engine.max_eos_ids:
            raise APIError(f"at most {engine.max_eos_ids} EOS / stop token ids, got {len(eos)}.", "stop_token_ids")
        values["eos_id"] = tuple(eos)
    seqs = body.get("stop_sequences")
    if seqs is not None:
        if not isinstance(seqs, list) or not seqs:
            raise APIError("`stop_sequences` must be a non-empty list of token-id lists.", "stop_sequences")
        seqs = [_int_list(s, "stop_sequences") for s in seqs]
        if len(seqs) > engine.max_stop_sequences or any(not s or len(s) > engine.max_stop_len for s in seqs):
            raise APIError(f"`stop_sequences`: at most {engine.max_stop_sequences} sequences of 1 to "
                           f"{engine.max_stop_len} tokens.", "stop_sequences")
        if any(not 0 <= t < vocab for s in seqs for t in s):
            raise APIError(f"`stop_sequences` has a token id outside the vocabulary [0, {vocab}).", "stop_sequences")
        values["stop_sequences"] = seqs
    for name in EXTENDED_FIELDS:  # the issue-13 knobs by their SamplingParams names (JSON values)
        if body.get(name) is None:
            continue
        if isinstance(body[name], bool):
            raise APIError(f"`{name}` must be a number or a list, not a boolean; got {body[name]!r}.", name)
        values[name] = body[name]
    if body.get("bad_words") is not None:
        values["bad_words"] = _strings_as_ids(body, "bad_words", tokenizer, lambda w: _bad_word_ids(tokenizer, w))
    if body.get("dry_sequence_breakers") is not None:
        values["dry_sequence_breakers"] = _strings_as_ids(body, "dry_sequence_breakers", tokenizer,
                                                          lambda w: dry_sequence_breakers(_no_bos(tokenizer), w))
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:  # the library's own check, naming the field
        raise APIError(str(e), _field_named(str(e), values)) from None


def _field_named(message: str, fields: Any) -> str | None:
    """The first of ``fields`` a library error message names (```bad_words[0]``` names bad_words)."""
    for name in re.findall(r"`(\w+)", message):
        if name in fields:
            return name
    return None


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(f"`stop` must be a string or a list of strings, got {stop!r:.80}.", "stop")
    if any(s == "" for s in stop):
        raise APIError("`stop` strings must not be empty.", "stop")
    return list(dict.fromkeys(stop))


def _message_text(m: Any, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(f"`messages[{i}]` must be an object with a `role` and `content`, got {m!r:.80}.", "messages")
    role = m["role"]
    if role not in ("system", "user", "assistant", "developer", "tool"):
        raise APIError(f"`messages[{i}].role` must be system, user, assistant, developer or tool, got {role!r}.",
                       "messages")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"`messages[{i}].content`: only text parts ({{'type': 'text', 'text': ...}}) are "
                               f"supported, got {part!r:.80}.", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise APIError(f"`messages[{i}].content` must be a string or a list of text parts, got {content!r:.80}.",
                       "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse(body: Any, kind: str, engine: Engine, tokenizer: Any, model_name: str,
          served_names: Sequence[str] = ()) -> Parsed:
    """Checks a request body and turns it into engine requests.

    Args:
      body: the decoded JSON body.
      kind: "completion" (``/v1/completions``) or "chat" (``/v1/chat/completions``).
      engine: the :class:`~jaxdecode._engine.Engine` (limits: context, slots, top_logprobs).
      tokenizer: a ``jaxdecode.models.Tokenizer`` (encode, decode, chat template).
      model_name: the served model's name; ``served_names``: other accepted names.

    Raises:
      APIError: a 400 naming the bad field.
    """
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model")
    if model is not None and model != model_name and model not in served_names:
        raise APIError(f"The model `{model}` does not exist; this server serves `{model_name}`.", "model",
                       code="model_not_found")
    if body.get("suffix") is not None:
        raise APIError("`suffix` is not supported.", "suffix")
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        raise APIError("`tools` (function calling) is not supported by this server.", "tools")
    constraint = response_constraint(body, tokenizer)
    n = _number(body, "n", 1, integer=True, low=1, allowed="an integer >= 1")
    if n > engine.slots:
        raise APIError(f"`n` must be <= {engine.slots} (the server's slots), got {n}.", "n")
    best_of = _number(body, "best_of", n, integer=True, low=1, allowed="an integer >= 1")
    if best_of != n:
        raise APIError("`best_of` other than `n` is not supported.", "best_of")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise APIError("`stream_options` can only be set when `stream` is true.", "stream_options")
        if not isinstance(opts, dict):
            raise APIError("`stream_options` must be an object.", "stream_options")
        include_usage = _bool(opts, "include_usage")
    echo = False
    if kind == "chat":
        logprobs = None
        if _bool(body, "logprobs"):
            logprobs = _number(body, "top_logprobs", 0, integer=True, low=0, high=engine.top_logprobs,
                               allowed=f"an integer in [0, {engine.top_logprobs}]")
        elif body.get("top_logprobs") is not None:
            raise APIError("`top_logprobs` needs `logprobs` set to true.", "top_logprobs")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError("`messages` must be a non-empty list of messages.", "messages")
        messages = [_message_text(m, i) for i, m in enumerate(msgs)]
        add_gen = _bool(body, "add_generation_prompt", True)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_gen)
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise APIError(f"the chat template rejected `messages`: {e}", "messages") from None
        prompts = [(text, tokenizer.encode(text))]
        prompt_param = "messages"
    else:
        logprobs = _number(body, "logprobs", None, integer=True, low=0, high=engine.top_logprobs,
                           allowed=f"an integer in [0, {engine.top_logprobs}]")
        echo = _bool(body, "echo")
        if echo and logprobs is not None:
            raise APIError("`echo` together with `logprobs` is not supported (no prompt log-probabilities).", "echo")
        prompts = _prompts(body.get("prompt"), tokenizer)
        prompt_param = "prompt"
    for text, ids in prompts:
        if not ids:
            raise APIError(f"the `{prompt_param}` encodes to no tokens.", prompt_param)
        bad = [t for t in ids if not 0 <= t < engine.vocab]
        if bad:
            raise APIError(f"`{prompt_param}` has token id {bad[0]}, outside the vocabulary [0, {engine.vocab}).",
                           prompt_param)
    ctx = engine.max_seq_len
    longest = max(len(ids) for _, ids in prompts)
    if longest >= ctx:
        raise APIError(f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} has "
                       f"{longest} tokens, which leaves no room for the completion.", prompt_param)
    mt_name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        mt_name = "max_completion_tokens"
    max_tokens = _number(body, mt_name, None, integer=True, low=1, allowed="an integer >= 1")
    if max_tokens is None:
        max_tokens = 16 if kind == "completion" else ctx - longest
    if longest + max_tokens > ctx:
        raise APIError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{longest + max_tokens} tokens ({longest} in the {prompt_param}, {max_tokens} in the "
                       f"completion). Please reduce the length of the {prompt_param} or completion.", mt_name)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(f"`seed` must be an integer, got {seed!r}.", "seed")
    sampling = _sampling(body, engine, tokenizer)
    if constraint is not None:
        eos = set(engine.eos_ids if sampling.eos_id is None else sampling.eos_id)
        if not set(constraint.eos_ids) <= eos:
            raise APIError(f"`response_format` needs the tokenizer's EOS ids {sorted(constraint.eos_ids)} to end a "
                           f"row once its JSON is complete; this request's EOS ids are {sorted(eos)} (drop "
                           f"`ignore_eos` / `eos_id`).", "response_format")
    stops = _stop_strings(body)
    if stops:  # matched in the engine's loop: the row ends at the token completing a stop string
        sampling = sampling.replace(stop=tuple(stops))
        try:
            engine.stop_table(stops)  # built (and cached) here, off the engine thread
        except (ValueError, TypeError) as e:
            raise APIError(f"`stop`: {e}", "stop") from None
    requests = [Request(ids, max_tokens, sampling, seed=seed, n=n, top_logprobs=logprobs or 0, constraint=constraint)
                for _, ids in prompts]
    try:  # the engine's own limits on the per-slot tables (bad_words entries, ...), naming the field
        engine.row_settings(dataclasses.replace(requests[0], seed=0))
    except (ValueError, TypeError) as e:
        raise APIError(str(e), _field_named(str(e), body)) from None
    return Parsed(kind, model_name if model is None else model, requests, [t for t, _ in prompts],
                  stops, stream, include_usage, logprobs, echo, n)


def _prompts(prompt: Any, tokenizer: Any) -> list[tuple[str, list[int]]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of lists."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=getattr(tokenizer, "add_bos_token", False))

    if isinstance(prompt, str):
        return [(prompt, enc(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, enc(p)) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [(tokenizer.decode(prompt), list(prompt))]
        if all(isinstance(p, list) for p in prompt):
            return [(tokenizer.decode(p), _int_list(p, "prompt")) for p in prompt]
    raise APIError("`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists.",
                   "prompt")


# ---------------------------------------------------------------------------------------
# Following a choice's text


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """The index in ``text`` where the earliest stop string begins (searching from
    ``start``), or -1: where the host cuts the text. (The row itself is stopped inside the
    engine's decode step, at the token that completes the stop string.)"""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


class ChoiceText:
    """One choice's output as text: detokenized incrementally, cut at the first stop string.

    Call :meth:`update` with the engine's :class:`~jaxdecode._engine.Completion` after each
    chunk; it consumes the new tokens one by one (so a stop string is attributed to the token
    that completed it, and ``num_tokens`` counts the tokens up to there) and returns the new
    text that is safe to stream: text that could still be the start of a stop string is
    held back until it is decided.

    Attributes:
      text: the text so far (stop string excluded).
      num_tokens: tokens consumed (the usage's completion tokens).
      stopped: a stop string was found (the caller stops the engine's row).
      entries: per-token (token id, logprob, top list) of the consumed tokens.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.num_tokens = 0
        self.stopped = False
        self.offsets: list[int] = []  # text offset of each consumed token
        self.entries: list[tuple[int, float, list]] = []

    def update(self, comp: Completion) -> str:
        """Consumes ``comp``'s new tokens; returns the new streamable text ("" if none)."""
        while not self.stopped and self.num_tokens < len(comp.tokens):
            k = self.num_tokens
            tok = comp.tokens[k]
            self.offsets.append(len(self.text))
            self.ids.append(tok)
            piece = self.decoder(self.ids)
            self.num_tokens += 1
            self.entries.append((tok, comp.logprobs[k], comp.top[k] if k < len(comp.top) else []))
            if piece:
                start = max(len(self.text) - self.hold, 0)
                self.text += piece
                if self.stops:
                    i = find_stop(self.text, self.stops, start)
                    if i != -1:
                        self.text = self.text[:i]
                        self.stopped = True
        finished = self.stopped or comp.finish_reason is not None
        if finished and not self.stopped and self.num_tokens == len(comp.tokens):
            tail = self.decoder.flush()
            if tail:
                start = max(len(self.text) - self.hold, 0)
                self.text += tail
                i = find_stop(self.text, self.stops, start) if self.stops else -1
                if i != -1:
                    self.text, self.stopped = self.text[:i], True
        end = len(self.text) if finished else max(len(self.text) - self.hold, self.sent)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def finish_reason(self, comp: Completion) -> str:
        if self.stopped:
            return "stop"
        return comp.finish_reason or "stop"

    def token_str(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def logprobs_completion(self, start: int = 0, end: int | None = None, offset0: int = 0) -> dict:
        """The completions API's ``logprobs`` object for entries ``start:end``."""
        ents = self.entries[start:end]
        return {
            "tokens": [self.token_str(t) for t, _, _ in ents],
            "token_logprobs": [lp for _, lp, _ in ents],
            "top_logprobs": [{self.token_str(a): b for a, b in top} for _, _, top in ents],
            "text_offset": [offset0 + o for o in self.offsets[start:start + len(ents)]],
        }

    def logprobs_chat(self, start: int = 0, end: int | None = None) -> dict:
        """The chat API's ``logprobs`` object (``content``: one entry per token)."""
        def item(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(item(t, lp), top_logprobs=[item(a, b) for a, b in top])
                            for t, lp, top in self.entries[start:end]]}


# ---------------------------------------------------------------------------------------
# Response bodies


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(p: Parsed, rid: str, created: int, choices: list[tuple[ChoiceText, Completion, int]],
                    prompt_tokens: int) -> dict:
    """The non-streaming response. ``choices``: (text, engine completion, prompt index) in
    choice order."""
    out = []
    for i, (ct, comp, pi) in enumerate(choices):
        reason = ct.finish_reason(comp)
        if p.kind == "chat":
            out.append({"index": i, "message": {"role": "assistant", "content": ct.text},
                        "logprobs": ct.logprobs_chat() if p.logprobs is not None else None,
                        "finish_reason": reason})
        else:
            prefix = p.prompt_texts[pi] if p.echo else ""
            out.append({"index": i, "text": prefix + ct.text,
                        "logprobs": ct.logprobs_completion(offset0=len(prefix)) if p.logprobs is not None else None,
                        "finish_reason": reason})
    completion_tokens = sum(ct.num_tokens for ct, _, _ in choices)
    return {"id": rid, "object": "chat.completion" if p.kind == "chat" else "text_completion", "created": created,
            "model": p.model, "choices": out, "usage": usage_body(prompt_tokens, completion_tokens)}


def chunk_body(p: Parsed, rid: str, created: int, index: int, *, text: str | None = None, role: bool = False,
               logprobs: Any = None, finish_reason: str | None = None) -> dict:
    """One server-sent event's JSON (a streamed chunk of one choice)."""
    if p.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [choice]}
    if p.include_usage:
        body["usage"] = None
    return body


def models_body(name: str, max_len: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "jaxdecode", "root": name, "max_model_len": max_len}]}
