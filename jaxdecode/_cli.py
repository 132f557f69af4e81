"""The ``jaxdecode`` command: generate text from a model, streaming, with timing on stderr.

Examples::

    jaxdecode "every effort moves you"
    echo "Write a haiku about JAX" | jaxdecode --chat --temp 0.7 --seed 1
    jaxdecode "Once upon a time" --num-samples 4 --temp 0.8 --top-p 0.9 --json
    jaxdecode "Q: 2+2?\\nA:" --stop "\\n" --top-logprobs 3 --json
    jaxdecode --chat                  # on a terminal: an interactive chat (/reset, /exit)
    jaxdecode serve --port 8000 --slots 16         # OpenAI-compatible server (jaxdecode._server)
    jaxdecode batch --input requests.jsonl --output results.jsonl   # offline (jaxdecode._batch)

Flags follow llama.cpp's ``llama-cli`` where it has one (``-n``, ``-m``, ``-s``, ``-p``, ``-f``,
``--temp``, ``--top-k``, ``--repeat-penalty``, ``--ignore-eos``, ...). Every field of
:class:`jaxdecode.SamplingParams` is a flag, generated from the dataclass itself (so a new
field gets one with no edit here; its help is the field's docstring line), and its value is
checked by the library's own validation. Greedy decoding (temperature 0) is the default, so
runs are deterministic; ``--temp 0.8`` samples (seeded by ``--seed``, default 0).

Errors a user can make print one line on stderr and exit with code 2 (``--debug`` shows the
traceback); Ctrl-C prints one line and exits 130; a closed pipe (``| head``) exits quietly.
Compiled XLA programs are kept in a persistent cache (``$JAXDECODE_CACHE_DIR`` or
``~/.cache/jaxdecode/xla``), so a second run with the same shapes skips compilation.

Subcommands: :data:`SUBCOMMANDS` maps a first argument (e.g. ``serve``) to its own ``main``;
any other first argument is a prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

def _lazy_main(module: str) -> Callable[[list[str]], int]:
    """``module.main`` imported on use (the server stack is an optional extra)."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(list(argv))

    return run


# name -> main(argv) -> exit code, for `jaxdecode NAME ...`: `serve` (the OpenAI-compatible
# server) and `batch` (offline, `--input F --output G`; `jaxdecode --input F --output G` too).
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": _lazy_main("jaxdecode._server"),
    "batch": _lazy_main("jaxdecode._batch"),
}

# Flag spellings of llama.cpp's llama-cli for SamplingParams fields (the first is shown in the
# help; the API name with dashes is always accepted too). A field not listed gets
# `--api-name-with-dashes`.
LLAMA_FLAGS: dict[str, tuple[str, ...]] = {
    "temperature": ("--temp",),
    "typical_p": ("--typical",),
    "repetition_penalty": ("--repeat-penalty",),
    "top_n_sigma": ("--top-nsigma",),
    "mirostat_tau": ("--mirostat-ent",),
    "mirostat_eta": ("--mirostat-lr",),
    "dry_sequence_breakers": ("--dry-sequence-breaker",),
    "penalty_last_n": ("--repeat-last-n",),
    "repeat_last_n": ("--repeat-last-n",),
}

# What the CLI does differently from the API's defaults: greedy, so a run is reproducible.
CLI_DEFAULTS: dict[str, Any] = {"temperature": 0.0}

_FLAG_PREFIX = "sp_"  # argparse dest of a SamplingParams field

# The interactive chat's KV cache when neither --ctx-size nor a smaller model context says
# otherwise: llama-cli's long-standing default, so a 32k-context model does not allocate a
# 32k-position cache for a short chat.
CHAT_CTX_DEFAULT = 4096


class UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit code 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when it says something (not None / False / unset)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


# ---------------------------------------------------------------------------------------
# Flags generated from SamplingParams


def field_docs(cls: type) -> dict[str, str]:
    """``{field: its docstring line}`` from the ``Attributes:`` section of ``cls``'s docstring
    (continuation lines joined)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    out: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if line and not line[0].isspace():  # the next section
            break
        m = re.match(r"^ {2}(\w+):\s*(.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
    return out


def _unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r``, ``\\`` typed on a command line as the characters (llama-cli's ``-e``)."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _unescape(text)


def _logit_bias_item(text: str) -> tuple[int, float]:
    """llama-cli's ``TOKEN_ID(+/-)BIAS`` (``15043+1``, ``15043-inf``); ``ID=BIAS`` also works."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:=\s*)?([+-]?\s*(?:inf|[0-9.]+(?:e[+-]?\d+)?))\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID(+/-)BIAS such as 15043+1 or 15043-inf, got {text!r}")
    return int(m.group(1)), float(m.group(2).replace(" ", ""))


def _id_list(text: str) -> Any:
    """``13,13`` or ``[13, 13]`` as a list of ints (a token-id sequence)."""
    try:
        value = json.loads(text if text.strip().startswith("[") else f"[{text}]")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 13,13, got {text!r}") from None
    return value


# Fields whose value is not one number: (argparse type, repeatable, how the list becomes the value)
_SPECIAL_VALUES: dict[str, tuple[Callable[[str], Any], bool, Callable[[list], Any]]] = {
    "stop": (_unescape, True, list),
    "logit_bias": (_logit_bias_item, True, dict),
    "stop_sequences": (_id_list, True, list),
    "eos_id": (_id_list, False, lambda v: v),
}


def _flags_for(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    flags = list(LLAMA_FLAGS.get(name, ()))
    return flags + ([dashed] if dashed not in flags else [])


def sampling_flags() -> dict[str, list[str]]:
    """``{field: [flag, aliases...]}`` for every :class:`jaxdecode.SamplingParams` field."""
    from ._settings import SamplingParams

    return {f.name: _flags_for(f.name) for f in dataclasses.fields(SamplingParams)}


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    from ._settings import SamplingParams

    docs = field_docs(SamplingParams)
    group = parser.add_argument_group("sampling (every jaxdecode.SamplingParams field; checked by the library)")
    for f in dataclasses.fields(SamplingParams):
        default = CLI_DEFAULTS.get(f.name, f.default)
        shown = "" if default is None else f" (default: {default!r}{', the API: ' + repr(f.default) if f.name in CLI_DEFAULTS else ''})"
        help_text = (docs.get(f.name, f.name).replace("``", "") + shown).replace("%", "%%")
        kw: dict[str, Any] = dict(dest=_FLAG_PREFIX + f.name, default=argparse.SUPPRESS, help=help_text)
        if f.name in _SPECIAL_VALUES:
            typ, repeat, _ = _SPECIAL_VALUES[f.name]
            kw.update(type=typ, action="append" if repeat else "store")
            kw["metavar"] = {"logit_bias": "ID(+/-)BIAS", "stop": "TEXT", "stop_sequences": "ID,ID,..",
                             "eos_id": "ID,.."}.get(f.name, "VALUE")
        elif isinstance(f.default, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        elif isinstance(f.default, int):
            kw.update(type=int, metavar="N")
        elif isinstance(f.default, float):
            kw.update(type=float, metavar="X")
        elif isinstance(f.default, (tuple, list)):  # e.g. a list of strings: one flag per item
            kw.update(type=_unescape, action="append", metavar="TEXT")
        else:
            kw.update(type=_json_or_text, metavar="VALUE")
        group.add_argument(*_flags_for(f.name), **kw)


def sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields given on the command line (unchecked; see :func:`build_sampling`)."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith(_FLAG_PREFIX):
            name = key[len(_FLAG_PREFIX):]
            if name in _SPECIAL_VALUES:
                value = _SPECIAL_VALUES[name][2](value)
            out[name] = value
    return out


def build_sampling(values: dict[str, Any]):
    """``SamplingParams(**values)``; the library's ValueError/TypeError becomes a UsageError
    naming the flag."""
    import jaxdecode

    try:
        return jaxdecode.SamplingParams(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(_name_flag(str(e))) from None


def _name_flag(message: str) -> str:
    """Prefixes a library message about field `x` with x's flag."""
    m = re.search(r"`(\w+)", message)
    flags = sampling_flags()
    if m and m.group(1) in flags:
        return f"{flags[m.group(1)][0]}: {message}"
    return message


# ---------------------------------------------------------------------------------------
# The parser


def _version() -> str:
    from importlib import metadata

    from . import __version__

    try:
        jax_version = metadata.version("jax")
    except metadata.PackageNotFoundError:  # pragma: no cover
        jax_version = "?"
    return f"jaxdecode {__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxdecode`` parser, in groups (a front end adds its own group the same way)."""
    p = _Parser(
        prog="jaxdecode",
        description="Generate text with a language model in JAX (default: SmolLM2-135M-Instruct). "
                    "Flags follow llama.cpp's llama-cli where it has one.",
        formatter_class=_Formatter,
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or -p / -f; read from stdin when omitted)")
    p.add_argument("-p", "--prompt", dest="prompt_flag", default=None, metavar="TEXT", help="the prompt, as a flag")
    p.add_argument("-f", "--file", default=None, metavar="PATH", help="read the prompt from a file")
    p.add_argument("--version", action="version", version=_version())

    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None, metavar="PATH",
                   help="a model name (smollm2-135m, gemma-3-270m), a .gguf file or a Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weights: float32, bfloat16, or int8 (int8 weights and activations, int32 dots; Llama)")

    g = p.add_argument_group("decoding")
    g.add_argument("-n", "--n-predict", "--max-new-tokens", dest="max_new_tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per sample")
    g.add_argument("-s", "--seed", type=int, default=0, help="PRNG seed for sampling")
    g.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples of the prompt, decoded in one batch (one prefill)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS tokens")
    g.add_argument("--keep-stop", action="store_true", help="keep the --stop string that ended the text in the output")
    g.add_argument("--beams", type=int, default=0, metavar="N",
                   help="beam search with N beams (deterministic; prints the best, or --num-samples best)")
    g.add_argument("--speculative", default=None, metavar="MODE",
                   help="speculative decoding: 'prompt-lookup' (n-gram lookup in the prompt) or 'draft:N' "
                        "(a draft model made of the model's first N layers)")
    g.add_argument("--draft-max", type=int, default=4, metavar="K", help="tokens proposed per speculative round")
    g.add_argument("--chunk-size", type=int, default=8, metavar="N", help="tokens per streamed chunk")

    _add_sampling_flags(p)

    g = p.add_argument_group("chat")
    g.add_argument("--chat", "-cnv", "--conversation", dest="chat", action="store_true",
                   help="wrap the prompt in the model's chat template; with no prompt on a terminal, "
                        "an interactive chat")
    g.add_argument("-i", "--interactive", action="store_true",
                   help="the interactive chat even when stdin is not a terminal (implies --chat)")
    g.add_argument("--system", "-sys", "--system-prompt", dest="system", default=None, metavar="TEXT",
                   help="system message (needs --chat)")
    g.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=None, metavar="N",
                   help=f"interactive chat: positions of the KV cache kept between turns (prompt + answers; "
                        f"default: the model's context, at most {CHAT_CTX_DEFAULT})")

    _add_structured_flags(p)

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="with --json: the N most likely tokens and their log-probabilities at each step")
    g.add_argument("-q", "--quiet", action="store_true", help="no status line, progress bar or timing line")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Rules between flags (values are the library's business)."""
    if args.interactive:
        args.chat = True
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat (it is the chat template's system message)")
    if args.top_logprobs and not args.json:
        raise UsageError("--top-logprobs is shown in --json output; add --json")
    given = [x for x in (args.prompt, args.prompt_flag, args.file) if x is not None]
    if len(given) > 1:
        raise UsageError("give the prompt once: as an argument, with -p, or with -f")
    if args.beams and args.speculative:
        raise UsageError("--beams and --speculative are different decoders; pick one")
    if args.speculative is not None and not re.fullmatch(r"prompt-lookup|draft:\d+", args.speculative):
        raise UsageError(f"--speculative must be 'prompt-lookup' or 'draft:N' (N layers), got {args.speculative!r}")
    if args.interactive and args.json:
        raise UsageError("--interactive streams a conversation; it has no --json output")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                             ("--chunk-size", args.chunk_size, 1), ("--beams", args.beams, 0),
                             ("--top-logprobs", args.top_logprobs, 0), ("--draft-max", args.draft_max, 1)):
        if value < low:  # the library would say the same, naming its argument
            raise UsageError(f"{flag} must be >= {low}, got {value}")


# ---------------------------------------------------------------------------------------
# Terminal output


_ACTIVE: list = []  # the run's Status, for the Ctrl-C handler


class Status:
    """A one-line status on a terminal (stderr), rewritten in place and cleared before text."""

    def __init__(self, stream, enabled: bool):
        self.stream = stream
        self.enabled = enabled
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A tqdm bar over decode steps on a terminal (a no-op elsewhere)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: the status line says the same, less finely
                return
            self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        """Writes ``text`` to stdout above the bar."""
        if self.bar is None:
            _write(text)
        else:
            self.bar.write(text, file=sys.stdout, end="")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class _Run:
    """What one generation produced (per sample) and how long it took."""

    completions: list[dict]
    first_s: float | None  # to the first chunk (compile + prefill + the first chunk's steps)
    total_s: float
    first_tokens: int  # tokens (all samples) in the first chunk
    tokens: int


def _finish_reason(tokens: list[int], eos: set, stop_hit: int, stops: Sequence[str], n: int) -> tuple[str, Any]:
    if stop_hit >= 0:
        return "stop", stops[stop_hit]
    if tokens and tokens[-1] in eos:
        return "stop", tokens[-1]
    return ("stop" if len(tokens) < n else "length"), None  # earlier: a stop sequence


# -- structured output (jaxdecode.json_schema / regex / choice) -------------------------


def _add_structured_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output").add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                   help="constrain the output to JSON valid under this schema (a file, or the schema's JSON text)")
    g.add_argument("--regex", default=None, help="constrain the output to a full match of this regular expression")
    g.add_argument("--choice", default=None, metavar="A,B,C", help="constrain the output to one of these comma-separated strings")


def _constraint(args: argparse.Namespace, tokenizer):
    """The constraint the flags ask for (None without one); raises ValueError / ImportError."""
    import os

    import jaxdecode

    if args.json_schema is not None:
        source = args.json_schema
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        return jaxdecode.json_schema(source, tokenizer)
    if args.regex is not None:
        return jaxdecode.regex(args.regex, tokenizer)
    if args.choice is not None:
        return jaxdecode.choice([c for c in args.choice.split(",") if c], tokenizer)
    return None


def _eos_set(model, tok, sampling) -> set:
    """The EOS ids the run stops at (``sampling.eos_id``; see :func:`_default_eos`)."""
    if sampling.eos_id is None:
        return set(getattr(getattr(model, "config", None), "eos_ids", None) or ())
    return set(sampling.eos_id) if isinstance(sampling.eos_id, tuple) else {int(sampling.eos_id)}


def _default_eos(model, tok) -> tuple[int, ...]:
    """The model's EOS ids and the tokenizer's (a checkpoint may declare them in either)."""
    ids = tuple(getattr(getattr(model, "config", None), "eos_ids", None) or ()) + tuple(tok.eos_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _stream(model, tok, ids, args, sampling, status: Status, *, live: bool, echo: str = "") -> _Run:
    """Decodes with generate_stream: live text for one sample, or each sample as its row ends."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdecode
    from jaxdecode import _stop

    n, ns = args.max_new_tokens, args.num_samples
    stops = sampling.stop or ()
    eos = _eos_set(model, tok, sampling)
    stream = jaxdecode.generate_stream(model, jnp.asarray([ids], jnp.int32), n, chunk_size=args.chunk_size,
                                       key=jax.random.key(args.seed), sampling=sampling, num_samples=ns,
                                       tokenizer=tok if stops else None, constraint=args.constraint)
    decoders = [tok.incremental_decoder(skip_special_tokens=True) for _ in range(ns)]
    stoppers = [_stop.TextStopper(stops, keep=args.keep_stop) for _ in range(ns)]
    generated: list[list[int]] = [[] for _ in range(ns)]
    logprobs: list[list[float]] = [[] for _ in range(ns)]
    finished = [False] * ns
    reported = [False] * ns
    progress = _Progress(n, status.enabled and not live and not args.json, f"{ns} samples")
    status.show(f"compiling for batch {ns}, {n} tokens (cached for the next run)...")
    t0 = time.perf_counter()
    first_s, first_tokens = None, 0
    completions: list[dict | None] = [None] * ns
    for chunk in stream:
        toks, lps, done, count = jax.device_get((chunk.tokens, chunk.logprobs, chunk.done, chunk.num_generated))
        fired = None if chunk.stop_index is None else np.asarray(chunk.stop_index)
        if first_s is None:
            first_s = time.perf_counter() - t0
            status.clear()
            if live and echo:
                _write(echo)
        for i in range(ns):
            new = int(count[i]) - len(generated[i])
            generated[i] += [int(t) for t in toks[i, :new]]
            logprobs[i] += [float(x) for x in lps[i, :new]]
            finished[i] = bool(done[i])
        if first_tokens == 0:
            first_tokens = sum(len(g) for g in generated)
        progress.update(toks.shape[1])
        for i in range(ns):
            if reported[i]:
                continue
            piece = decoders[i](generated[i])
            last = finished[i] or len(generated[i]) >= n
            hit = -1 if fired is None else int(fired[i])
            piece = stoppers[i].finish(piece + decoders[i].flush(), hit) if last else stoppers[i].push(piece)
            if live:
                _write(piece)
            if last:
                reported[i] = True
                reason, what = _finish_reason(generated[i], eos, hit, stops, n)
                completions[i] = {"text": stoppers[i].text, "tokens": generated[i], "logprobs": logprobs[i],
                                  "finish_reason": reason, "stop": what}
                if not live and not args.json:  # each sample as soon as its row ends
                    progress.write(f"--- sample {i} ---\n{echo}{stoppers[i].text}\n")
    progress.close()
    status.clear()
    if live:
        _write("\n")
    total_s = time.perf_counter() - t0
    return _Run([c for c in completions if c is not None], first_s, total_s, first_tokens,
                sum(len(g) for g in generated))


def _one_shot(model, tok, ids, args, sampling, explicit: dict, status: Status) -> tuple[_Run, Any]:
    """Beam search, speculative decoding or --top-logprobs: one call, the texts at the end."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdecode
    from jaxdecode import _stop

    n = args.max_new_tokens
    prompt = jnp.asarray([ids], jnp.int32)
    stops = sampling.stop or ()
    status.show(f"compiling and decoding (batch {args.num_samples}, {n} tokens; no streaming in this mode)...")
    t0 = time.perf_counter()
    top = None
    if args.beams:
        params = build_sampling(explicit | {"eos_id": sampling.eos_id})
        out = jaxdecode.beam_search(model, prompt, n, num_beams=args.beams, sampling=params,
                                    num_return_sequences=args.num_samples, top_logprobs=args.top_logprobs)
        out = jax.device_get(out)
        rows = [(np.asarray(out.tokens[0, r]), int(out.lengths[0, r]), np.asarray(out.logprobs[0, r]))
                for r in range(out.tokens.shape[1])]
        eos = _eos_set(model, tok, params)
        completions = []
        for r, (row, length, lp) in enumerate(rows):
            gen = row[len(ids): length].tolist()
            reason, what = _finish_reason(gen, eos, -1, (), n)
            body = gen[:-1] if what is not None else gen
            completions.append({"text": tok.decode(body, skip_special_tokens=True), "tokens": gen,
                                "logprobs": [float(x) for x in lp[: len(gen)]], "finish_reason": reason,
                                "stop": what, "score": float(out.scores[0, r])})
        if out.top_ids is not None:
            top = [(out.top_ids[0, r], out.top_logprobs[0, r]) for r in range(len(rows))]
    else:
        spec = None
        if args.speculative == "prompt-lookup":
            spec = jaxdecode.prompt_lookup(num_tokens=args.draft_max)
        elif args.speculative:
            from jaxdecode import models

            spec = jaxdecode.draft_model(models.first_layers(model, int(args.speculative.split(":")[1])),
                                         num_tokens=args.draft_max)
        out = jaxdecode.generate(model, prompt, n, key=jax.random.key(args.seed), sampling=sampling,
                                 num_samples=args.num_samples, top_logprobs=args.top_logprobs, speculative=spec,
                                 tokenizer=tok if stops else None, constraint=args.constraint)
        out = jax.device_get(out)
        texts = jaxdecode.completions(out, tok, stop=stops, max_new_tokens=n, keep_stop=args.keep_stop,
                                      eos_ids=sorted(_eos_set(model, tok, sampling)))
        completions = [{"text": c.text, "tokens": c.tokens, "logprobs": [float(x) for x in out.logprobs[i, : len(c.tokens)]],
                        "finish_reason": c.finish_reason, "stop": c.stop} for i, c in enumerate(texts)]
        if out.top_ids is not None:
            top = [(out.top_ids[i], out.top_logprobs[i]) for i in range(len(texts))]
        if spec is not None:
            for i, c in enumerate(completions):
                c["accepted"], c["proposed"] = int(out.accepted[i]), int(out.proposed[i])
    if top is not None:
        for c, (tids, tlps) in zip(completions, top):
            c["top_logprobs"] = [[{"id": int(t), "token": tok.decode([int(t)]), "logprob": float(lp)}
                                  for t, lp in zip(tids[j], tlps[j])] for j in range(len(c["tokens"]))]
    status.clear()
    total_s = time.perf_counter() - t0
    count = sum(len(c["tokens"]) for c in completions)
    return _Run(completions, None, total_s, count, count), out


def _timing_line(load_s: float, run: _Run, args, batch: int) -> str:
    parts = [f"load {load_s:.2f} s"]
    if run.first_s is not None:
        parts.append(f"first token {run.first_s:.2f} s (with its {args.chunk_size}-step chunk; compile + prefill)")
    parts.append(f"{run.tokens} tokens in {run.total_s:.2f} s")
    rest_tokens, rest_s = run.tokens - run.first_tokens, run.total_s - (run.first_s or 0.0)
    if run.first_s is not None and rest_tokens > 0 and rest_s > 0:
        parts.append(f"{rest_tokens / rest_s:.1f} tokens/s after the first chunk")
    elif run.total_s > 0:
        parts.append(f"{run.tokens / run.total_s:.1f} tokens/s overall (first chunk included)")
    return "[jaxdecode] " + " | ".join(parts) + f" (batch {batch})"


def _timing_json(load_s: float, run: _Run) -> dict:
    rest_tokens, rest_s = run.tokens - run.first_tokens, run.total_s - (run.first_s or 0.0)
    rate = rest_tokens / rest_s if run.first_s is not None and rest_tokens > 0 and rest_s > 0 else None
    return {"load_s": round(load_s, 3), "first_token_s": None if run.first_s is None else round(run.first_s, 3),
            "total_s": round(run.total_s, 3), "generated_tokens": run.tokens,
            "tokens_per_s_after_first_chunk": None if rate is None else round(rate, 2),
            "tokens_per_s_overall": round(run.tokens / run.total_s, 2) if run.total_s > 0 else None}


def _read_prompt(args) -> str | None:
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"-f {args.file}: {e.strerror or e}") from None
    if args.prompt_flag is not None:
        return _unescape(args.prompt_flag)
    if args.prompt is not None:
        return args.prompt
    if args.interactive or sys.stdin is None or _isatty(sys.stdin):
        return None  # (the chat reads stdin line by line)
    return sys.stdin.read().rstrip("\n")


class _ChatSession:
    """The interactive chat on a one-slot :class:`jaxdecode._engine.Engine` kept between
    turns: each turn prefills only the prompt tokens the slot's KV cache lacks (the longest
    common prefix with what it holds is reused, as llama.cpp's server's ``cache_prompt``), then
    streams the answer chunk by chunk.

    Args:
      model, tok: the model and its tokenizer.
      args: the parsed flags (``ctx_size``, ``chunk_size``, ``max_new_tokens``, ``seed``,
        ``keep_stop``, ``constraint``).
      sampling: the checked :class:`jaxdecode.SamplingParams` (its ``eos_id`` set).
    """

    def __init__(self, model, tok, args, sampling):
        from jaxdecode import _model
        from jaxdecode._engine import Engine

        limit = _model.context_limit(model)
        ctx = args.ctx_size if args.ctx_size is not None else min(limit or CHAT_CTX_DEFAULT, CHAT_CTX_DEFAULT)
        stops = sampling.stop_sequences or ()
        try:
            self.engine = Engine(model, slots=1, max_seq_len=ctx, chunk_size=args.chunk_size, top_logprobs=0,
                                 max_eos_ids=max(8, len(sampling.eos_id or ())),
                                 max_stop_sequences=max(8, len(stops)),
                                 max_stop_len=max([16] + [len(x) for x in stops]), tokenizer=tok)
        except ValueError as e:  # --ctx-size beyond the model's context, or below 2
            raise UsageError(f"--ctx-size: {e}") from None
        self.model, self.tok, self.args, self.sampling = model, tok, args, sampling
        self.state = self.engine.init_state()
        self.turns = 0

    def reset(self) -> None:
        """Forgets the slot's cache (``/reset``)."""
        self.state = self.engine.init_state()

    def recover(self) -> None:
        """After Ctrl-C: the slot keeps what it holds (a partial answer, which the next turn's
        common prefix excludes where it differs from the history), unless the interrupt came
        between a call that donates the state and its return: then the buffers are gone and
        the slot starts empty."""
        import jax

        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.state)):
            self.reset()

    def answer(self, ids: list[int], status: Status) -> tuple[_Run, int]:
        """One streamed answer to the prompt ``ids``: (the run, prompt tokens reused)."""
        import jax

        from jaxdecode import _stop
        from jaxdecode._engine import RUNNING, Request

        args, engine, n = self.args, self.engine, self.args.max_new_tokens
        stops = self.sampling.stop or ()
        request = Request(ids, n, self.sampling, seed=args.seed, constraint=args.constraint)
        status.show(f"compiling for batch 1, {n} tokens (cached for the next run)..." if not self.turns
                    else "prefilling...")
        self.turns += 1
        decoder = self.tok.incremental_decoder(skip_special_tokens=True)
        stopper = _stop.TextStopper(stops, keep=args.keep_stop)
        t0 = time.perf_counter()
        prefix = engine.prefill(request, reuse=(self.state, 0))
        self.state = engine.insert(prefix, self.state, 0)
        generated: list[int] = []
        logprobs: list[float] = []
        first_s, first_tokens, done = None, 0, False
        while not done:
            self.state, out = engine.decode(self.state)
            toks, valid, lps, reason = jax.device_get((out.tokens[0], out.valid[0], out.raw_logprobs[0], out.reason[0]))
            if first_s is None:
                first_s = time.perf_counter() - t0
                status.clear()
            generated += [int(t) for t in toks[valid]]
            logprobs += [float(x) for x in lps[valid]]
            if not first_tokens:
                first_tokens = len(generated)
            done = int(reason) != RUNNING or len(generated) >= n
            piece = decoder(generated)
            if not done:
                piece = stopper.push(piece)
                if stopper.stopped >= 0:  # the text shows a stop string the loop has not ended on
                    self.state = engine.release(self.state, 0)
                    done = True
            if done:
                piece = stopper.finish(piece + decoder.flush())
            _write(piece)
        _write("\n")
        reason, what = _finish_reason(generated, _eos_set(self.model, self.tok, self.sampling), stopper.stopped,
                                      stops, n)
        completion = {"text": stopper.text, "tokens": generated, "logprobs": logprobs, "finish_reason": reason,
                      "stop": what}
        return _Run([completion], first_s, time.perf_counter() - t0, first_tokens, len(generated)), prefix.reused


def _chat_engine_refusal(args) -> str | None:
    """Why the chat cannot run on the engine (None: it can). The engine applies every
    SamplingParams field; it draws one sample per slot."""
    if args.num_samples != 1:
        return "--num-samples"
    return None


def _chat(model, tok, args, sampling, status: Status) -> int:
    """The interactive chat: history in the chat template, one streamed answer per turn, the
    KV cache kept between turns (:class:`_ChatSession`)."""
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    tty = _isatty(sys.stdin)
    # A chat asking for several samples per turn re-prefills the whole conversation each turn
    # through generate_stream, as before the engine chat.
    session = None if _chat_engine_refusal(args) else _ChatSession(model, tok, args, sampling)
    print("jaxdecode chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            if session is not None:
                session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        reused = None
        try:
            if session is not None:
                run, reused = session.answer(ids, status)
            else:
                run = _stream(model, tok, ids, args, sampling, status, live=True)
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the session (as llama-cli)
            status.clear()
            _write("\n")
            print("(answer interrupted)", file=sys.stderr)
            history.pop()  # the partial answer is dropped; the cache's common prefix follows
            if session is not None:
                session.recover()
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context
            status.clear()
            history.pop()
            hint = "; --ctx-size sets the context" if session is not None and "max_seq_len" in str(e) else ""
            print(f"jaxdecode: {e} (/reset starts over{hint})", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": run.completions[0]["text"]})
        if not args.quiet:
            line = _timing_line(0.0, run, args, 1).replace("load 0.00 s | ", "")
            if reused is not None:  # what the cache saved, as llama.cpp's server reports it
                line = line.replace("[jaxdecode] ", f"[jaxdecode] prefill {len(ids) - reused} new tokens "
                                                    f"({reused} reused) | ", 1)
            print(line, file=sys.stderr)
    return 0


def _generate_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args)
    explicit = sampling_values(args)
    values = {**CLI_DEFAULTS, **explicit}
    if args.ignore_eos:
        if "eos_id" in values:
            raise UsageError("--ignore-eos and --eos-id contradict each other")
        values["eos_id"] = ()
    sampling = build_sampling(values)  # checked here, before the model loads
    if explicit.get("stop") and (args.beams or args.speculative):
        raise UsageError("--stop works with plain decoding only (not --beams or --speculative)")
    structured = args.json_schema is not None or args.regex is not None or args.choice is not None
    if structured and (args.beams or args.speculative):
        raise UsageError("--json-schema / --regex / --choice work with plain decoding only (not --beams or --speculative)")

    prompt = _read_prompt(args)
    interactive = args.chat and (args.interactive or (prompt is None and _isatty(sys.stdin)))
    if prompt is None and not interactive:
        raise UsageError("give a prompt as an argument, with -p or -f, or on stdin (or --chat on a terminal)")
    if not interactive and not prompt:
        raise UsageError("the prompt is empty")
    if args.ctx_size is not None and not interactive:
        raise UsageError("--ctx-size sizes the interactive chat's KV cache (--chat with no prompt on a terminal, or -i)")

    status = Status(sys.stderr, _isatty(sys.stderr) and not args.quiet)
    _ACTIVE.append(status)
    import jaxdecode

    jaxdecode.enable_compilation_cache()  # $JAXDECODE_CACHE_DIR or ~/.cache/jaxdecode/xla
    from jaxdecode import models

    status.show(f"loading {args.model or 'SmolLM2-135M-Instruct'} ({args.dtype})...")
    t0 = time.perf_counter()
    try:
        model, tok = models.load(args.model, dtype=args.dtype)
    finally:
        status.clear()
    load_s = time.perf_counter() - t0
    if tok is None:
        raise UsageError(f"{args.model}: the model has no tokenizer (tokenizer.json missing)")
    args.constraint = _constraint(args, tok)

    if sampling.eos_id is None:
        sampling = sampling.replace(eos_id=_default_eos(model, tok))
    if interactive:
        return _chat(model, tok, args, sampling, status)
    text = prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       system=args.system)
    ids = tok.encode(text)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    batch = args.num_samples
    if args.beams or args.speculative or args.top_logprobs:
        run, _ = _one_shot(model, tok, ids, args, sampling, explicit, status)
        if not args.json:
            for i, c in enumerate(run.completions):
                head = f"--- {'beam' if args.beams else 'sample'} {i} ---\n" if len(run.completions) > 1 else ""
                _write(f"{head}{text if not args.chat else prompt + chr(10)}{c['text']}\n")
    else:
        live = not args.json and batch == 1
        run = _stream(model, tok, ids, args, sampling, status, live=live,
                      echo=text if not args.chat else prompt + "\n")
    if args.json:
        out = {"prompt": text, "prompt_tokens": ids, "completions": run.completions, "timing": _timing_json(load_s, run)}
        _write(json.dumps(out, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(_timing_line(load_s, run, args, batch), file=sys.stderr)
    return 0


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: returns the exit code (0 ok, 2 user error, 130 Ctrl-C, 141 closed pipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if any(a == "--input" or a.startswith("--input=") for a in argv):
        return SUBCOMMANDS["batch"](argv)
    debug = "--debug" in argv
    _ACTIVE.clear()
    try:
        return _generate_main(argv)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"jaxdecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _ACTIVE and _ACTIVE[-1].shown:
            _ACTIVE[-1].clear()
        else:  # end the line of streamed text first
            sys.stderr.write("\n")
        print("jaxdecode: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as e:
        if debug:
            raise
        print(f"jaxdecode: error: {_name_flag(str(e))}", file=sys.stderr)  # the library's check of a value or file
        return 2
    except Exception as e:  # a bug: say so in one line, the traceback with --debug
        if debug:
            raise
        print(f"jaxdecode: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
