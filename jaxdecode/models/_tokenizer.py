"""Tokenizer: a thin wrapper around a Hugging Face ``tokenizers.Tokenizer``.

Built either from a GGUF file's own metadata (``tokenizer.ggml.*``: byte-level BPE vocabularies,
``model == "gpt2"``, and SentencePiece-style vocabularies, ``model == "llama"``) or from a
``tokenizer.json`` (Hugging Face folders). Adds chat templating (the model's Jinja template, or a
ChatML fallback) and incremental decoding for streaming.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Tokenizer", "IncrementalDecoder", "CHATML_TEMPLATE", "GEMMA_TEMPLATE"]

# ChatML, used when the model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (its instruction-tuned models' template, system text folded into the first
# user turn), used when a vocabulary with <start_of_turn> ships no template (the base GGUFs).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (sys if loop.first else '') + message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Pre-tokenizer regexes, by the name llama.cpp's converter stores in ``tokenizer.ggml.pre``.
_GPT2_PRE = {"gpt-2", "gpt2", "default", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
             "jina-v1-en", "jina-v2-code", "olmo", "mpt", "poro-chat", "viking", "roberta-bpe",
             "bloom", "gpt3-finnish"}
# GPT-2's regex after splitting every digit into its own piece (StarCoder-family vocabularies,
# SmolLM/SmolLM2): the HF tokenizer.json is Sequence[Digits(individual_digits), ByteLevel].
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_PRE = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "dbrx": _LLAMA3_REGEX,
              "smaug-bpe": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn/document in common vocabularies; added to ``eos_ids`` when they
# are control tokens of the vocabulary (so plain completion also stops at a document end).
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
               "</s>", "<|end|>", "<end_of_turn>")


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:  # pragma: no cover - dependency is in the "models" extra
        raise ImportError("jaxdecode.models needs the `tokenizers` package: "
                          "pip install 'jaxdecode[models]'") from e
    return tokenizers


class Tokenizer:
    """Text <-> token ids.

    Attributes: ``bos_id`` (int or None), ``eos_ids`` (tuple of ints: generation stops at any),
    ``add_bos_token`` (whether the model expects BOS before a prompt; ``encode`` adds it then), ``chat_template`` (Jinja source or None), ``vocab_size``, and ``backend`` (the
    ``tokenizers.Tokenizer``).
    """

    def __init__(self, backend, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, add_bos_token: bool = False):
        self.backend = backend
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self._compiled_template = None

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text, like ``<|im_start|>``, map
        to their ids). BOS is prepended when ``add_bos`` (default: the model's
        ``add_bos_token``, as Hugging Face tokenizers do; Gemma needs it) and the text does not
        already start with it (chat templates often write it)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (bytes that do not form complete UTF-8 characters decode to U+FFFD)."""
        return self.backend.decode([int(i) for i in _flat_ids(ids)],
                                   skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id decodes to, for every id in ``[0, vocab_size)``.

        Byte-level BPE pieces map back through GPT-2's byte alphabet; SentencePiece pieces turn
        ``\u2581`` into a space and ``<0xNN>`` into the byte NN. Special (control) tokens map
        to ``b""``, as ``decode(..., skip_special_tokens=True)`` drops them. Used to match stop
        strings inside the compiled decode loop (``jaxdecode.generate(..., stop=...)``).
        Computed once per tokenizer.

        Example:
          >>> from jaxdecode import models
          >>> _, tok = models.load()
          >>> [tok.token_bytes()[i] for i in tok.encode("Hi there")]
          [b'Hi', b' there']
        """
        if getattr(self, "_token_bytes", None) is None:
            self._token_bytes = _vocab_bytes(self.backend, self.vocab_size)
        return self._token_bytes

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})")

    # ------------------------------------------------------------------ streaming
    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh ``IncrementalDecoder``: call it with all ids so far, get the new text."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True,
                            system: str | None = None, **kwargs) -> str:
        """Renders a conversation to the prompt text the model was trained on.

        ``messages``: a list of ``{"role": ..., "content": ...}`` dicts, or a plain string (one
        user message). ``system`` (optional) prepends a system message. Uses the model's own
        Jinja template when it has one, else ChatML. Extra keyword arguments are passed to the
        template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        else:
            messages = [dict(m) for m in messages]
            for m in messages:
                if "role" not in m or "content" not in m:
                    raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        template = self._template()
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos or "", eos_token=eos or "", **kwargs)

    def _template(self):
        if self._compiled_template is None:
            try:
                import jinja2
                import jinja2.ext
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as e:  # pragma: no cover
                raise ImportError("chat templates need jinja2: pip install jinja2") from e

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            fallback = GEMMA_TEMPLATE if self.backend.token_to_id("<start_of_turn>") is not None else CHATML_TEMPLATE
            self._compiled_template = env.from_string(self.chat_template or fallback)
        return self._compiled_template

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_file(cls, path, *, bos_id: int | None = None, eos_ids: Iterable[int] | None = None,
                  chat_template: str | None = None, add_bos_token: bool | None = None
                  ) -> "Tokenizer":
        """Loads a Hugging Face ``tokenizer.json``. Settings not given are read from a
        ``tokenizer_config.json`` / ``generation_config.json`` next to it when present
        (bos/eos tokens, ``add_bos_token``, ``chat_template``)."""
        tk = _require_tokenizers()
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            backend = tk.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from e
        folder = os.path.dirname(os.path.abspath(path))
        conf = _read_json(os.path.join(folder, "tokenizer_config.json"))
        gen = _read_json(os.path.join(folder, "generation_config.json"))

        def tok_id(entry):
            if isinstance(entry, Mapping):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        if bos_id is None:
            bos_id = tok_id(conf.get("bos_token"))
            if bos_id is None and isinstance(gen.get("bos_token_id"), int):
                bos_id = gen["bos_token_id"]
        if eos_ids is None:
            found = []
            e = tok_id(conf.get("eos_token"))
            if e is not None:
                found.append(e)
            g = gen.get("eos_token_id")
            found += [g] if isinstance(g, int) else list(g or [])
            eos_ids = found
        if chat_template is None:
            ct = conf.get("chat_template")
            if isinstance(ct, list):  # [{"name": "default", "template": ...}, ...]
                named = {d.get("name"): d.get("template") for d in ct if isinstance(d, Mapping)}
                ct = named.get("default") or next(iter(named.values()), None)
            if ct is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
                with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
                    ct = f.read()
            chat_template = ct
        if add_bos_token is None:
            add_bos_token = bool(conf.get("add_bos_token", False))
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template,
                   add_bos_token=add_bos_token)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, source: str = "GGUF file"
                           ) -> "Tokenizer":
        """Builds the tokenizer stored in a GGUF file's metadata (``tokenizer.ggml.*`` keys,
        values already decoded to Python objects)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise ValueError(f"{source}: no tokenizer in the metadata "
                             "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        types = meta.get("tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{len(tokens)} tokens")
        if model == "gpt2":
            backend = _byte_level_bpe(tokens, types, meta.get("tokenizer.ggml.merges") or [],
                                      meta.get("tokenizer.ggml.pre"), source)
            add_bos_default = False
        elif model == "llama":
            prefix = meta.get("tokenizer.ggml.add_space_prefix")
            backend = _sentencepiece_bpe(tokens, types, meta.get("tokenizer.ggml.scores"), source,
                                         add_space_prefix=True if prefix is None else bool(prefix))
            add_bos_default = True
        else:
            raise ValueError(f"{source}: unsupported tokenizer model {model!r} "
                             "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")

        def opt_id(key):
            v = meta.get(key)
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos_id = opt_id("tokenizer.ggml.bos_token_id")
        eos = [opt_id(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id")]
        eos = [e for e in eos if e is not None]
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == _TT_CONTROL and t in _END_TOKENS and i not in eos:
                eos.append(i)
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(backend, bos_id=bos_id, eos_ids=eos,
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_token=add_bos_default if add_bos is None else bool(add_bos))


class IncrementalDecoder:
    """Streaming detokenization: ``dec(all_ids_so_far) -> new text`` (possibly "").

    Text is released only once it is stable: a trailing incomplete UTF-8 sequence (which decodes
    to U+FFFD) is held back until the tokens completing it arrive. Decoding re-reads only a
    short window of recent ids (the prefix/read offsets scheme), so the cost per call does not
    grow with the length of the text. ``flush()`` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self):
        self._prefix = 0  # ids[_prefix:_read] decode to text already released
        self._read = 0
        self._ids: list[int] = []

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def __call__(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in _flat_ids(ids)]
        if len(ids) < self._read or ids[:self._read] != self._ids[:self._read]:
            raise ValueError("IncrementalDecoder: ids must extend the ids of the previous call "
                             "(call reset() to start over)")
        self._ids = ids
        prefix_text = self._decode(ids[self._prefix:self._read])
        new_text = self._decode(ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(ids)
            return delta
        return ""

    def flush(self) -> str:
        """The text not yet released (e.g. an incomplete character at the end of generation)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


# ---------------------------------------------------------------------- helpers
def _flat_ids(ids):
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return list(ids)



def _decoder_types(node) -> set:
    """Every decoder type named in a tokenizer.json ``decoder`` entry (Sequences included)."""
    if not isinstance(node, Mapping):
        return set()
    found = {node.get("type")}
    for child in node.get("decoders") or ():
        found |= _decoder_types(child)
    return found


def _vocab_bytes(backend, size: int) -> list[bytes]:
    decoder = json.loads(backend.to_str()).get("decoder")
    byte_level = "ByteLevel" in _decoder_types(decoder)
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    if byte_level:  # GPT-2's bytes_to_unicode, inverted
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        chars, n = list(keep), 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + n)
                n += 1
        to_byte = {chr(c): b for b, c in zip(keep, chars)}
    out = []
    for i in range(size):
        piece = backend.id_to_token(i)
        if piece is None or i in special:
            out.append(b"")
        elif byte_level and all(ch in to_byte for ch in piece):
            out.append(bytes(to_byte[ch] for ch in piece))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
            out.append(bytes([int(piece[3:5], 16)]))
        else:  # SentencePiece pieces, or added (user-defined) tokens written as text
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(tokens, types):
    """AddedTokens for control (special) and user-defined (plain) tokens of a GGUF vocabulary."""
    tk = _require_tokenizers()
    special, user = [], []
    for t, ty in zip(tokens, types):
        if ty == _TT_CONTROL and t:
            special.append(tk.AddedToken(t, special=True, normalized=False))
        elif ty == _TT_USER_DEFINED and t:
            user.append(tk.AddedToken(t, special=False, normalized=False))
    return special, user


def _byte_level_bpe(tokens, types, merges, pre, source):
    tk = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, Regex

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: malformed BPE merge {m!r}")
        pairs.append((parts[0], parts[1]))
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    backend = tk.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _REGEX_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre is not None and pre not in _GPT2_PRE:
            warnings.warn(f"{source}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; using "
                          "GPT-2's split, tokenization may differ from the reference",
                          stacklevel=3)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    special, user = _special_tokens(tokens, types)
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    return backend


def _sentencepiece_bpe(tokens, types, scores, source, add_space_prefix=True):
    """A llama-style SentencePiece BPE vocabulary as a ``tokenizers`` BPE with byte fallback
    (merge priority from the token scores, as Hugging Face's converter does). Gemma's
    vocabularies set ``add_space_prefix`` false: no "▁" before the text (and none
    stripped when decoding)."""
    tk = _require_tokenizers()
    from tokenizers import decoders, models, normalizers

    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((t for t, ty in zip(tokens, types) if ty == _TT_UNKNOWN), None)
    # Every pair (a, b) with a, b, a+b all in the (normal) vocabulary is a merge; rank by the
    # merged piece's score (higher first), then by the pieces' ids.
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
              if ty in (_TT_NORMAL, _TT_USER_DEFINED)}
    merges = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                merges.append((-float(scores[pid]), normal[a], normal[b], a, b))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                     fuse_unk=True, byte_fallback=True)
    backend = tk.Tokenizer(bpe)
    prefix = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()] + strip)
    special, user = _special_tokens(tokens, types)
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    return backend
