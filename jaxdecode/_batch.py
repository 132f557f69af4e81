"""``jaxdecode batch``: an offline batch of requests through the slot engine.

Reads a JSONL file, one request per line, and writes one result per line, in input order:

* a line is a ``/v1/completions`` body (``{"prompt": ..., "max_tokens": ..., ...}``), a
  ``/v1/chat/completions`` body (with ``"messages"``), or an OpenAI batch-API line
  (``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``);
* a result is an OpenAI batch-API output line: ``{"id", "custom_id", "response":
  {"status_code": 200, "body": <the completion>}, "error": null}``, or, for a bad line,
  ``"response": {"status_code": 400, "body": {"error": ...}}`` with ``"error"`` set; the
  other lines still run.

Every prompt goes through the same :class:`~jaxdecode._engine.EngineLoop` as the server (the
slots stay full: a finished request's slot is refilled at the next chunk), with a ``tqdm``
progress bar. Results are written as soon as every earlier line is done, so an interrupted
run leaves a valid prefix; run the same command again to resume after it (a cut-off last
line is dropped and redone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Iterable, Sequence

from ._engine import EngineLoop, Handle
from ._openai import APIError, ChoiceText, Parsed, completion_body, new_id, parse

__all__ = ["run_batch", "main"]


def _resume_point(path: str) -> int:
    """How many complete result lines ``path`` holds; truncates a cut-off last line."""
    if not os.path.exists(path):
        return 0
    good = 0
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good += 1
            keep += len(line)
    if keep != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return good


def _request_of(line: str, index: int) -> tuple[str, str, Any]:
    """(custom_id, kind, body) of one input line; APIError for a line that is not a request."""
    custom_id = f"request-{index}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise APIError(f"line {index + 1} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(f"line {index + 1} must be a JSON object, got {type(obj).__name__}.")
    if "body" in obj and isinstance(obj.get("body"), dict):  # the OpenAI batch-API input format
        custom_id = str(obj.get("custom_id", custom_id))
        url = obj.get("url", "/v1/completions")
        if url not in ("/v1/completions", "/v1/chat/completions"):
            raise APIError(f"line {index + 1}: `url` must be /v1/completions or /v1/chat/completions, got {url!r}.",
                           "url")
        return custom_id, "chat" if url.endswith("chat/completions") else "completion", obj["body"]
    custom_id = str(obj.pop("custom_id", custom_id))
    return custom_id, "chat" if "messages" in obj else "completion", obj


class _Line:
    def __init__(self, index: int, custom_id: str, parsed: Parsed | None = None, error: APIError | None = None):
        self.index, self.custom_id, self.parsed, self.error = index, custom_id, parsed, error
        self.handles: list[Handle] = []
        self.texts: list[list[ChoiceText]] = []
        self.rid, self.created = new_id(parsed.kind if parsed else "completion"), int(time.time())

    def done(self) -> bool:
        return self.error is not None or all(h.done.is_set() for h in self.handles)

    def result(self) -> dict:
        base = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": self.custom_id}
        err = self.error
        if err is None:
            failed = next((h.error for h in self.handles if h.error is not None), None)
            if failed is not None:
                err = APIError(f"the engine failed on this request: {failed}", status=500, type="server_error")
        if err is not None:
            return {**base, "response": {"status_code": err.status, "body": err.body()}, "error": err.body()["error"]}
        p = self.parsed
        choices = [(self.texts[pi][j], h.choices[j], pi) for pi, h in enumerate(self.handles) for j in range(p.n)]
        body = completion_body(p, self.rid, self.created, choices, sum(len(r.prompt) for r in p.requests))
        return {**base, "response": {"status_code": 200, "request_id": self.rid, "body": body}, "error": None}


def run_batch(loop: EngineLoop, tokenizer: Any, model_name: str, lines: Iterable[str], out, *,
              skip: int = 0, total: int | None = None, progress: bool = True) -> dict:
    """Runs JSONL request ``lines`` through ``loop`` and writes result lines to ``out`` (a
    text file) in input order. The first ``skip`` lines are skipped (resume).

    Returns counts: ``{"lines", "ok", "errors", "completion_tokens", "seconds"}``.
    """
    engine = loop.engine
    if engine.tokenizer is None:  # stop strings are matched in the engine's loop, on this vocabulary
        engine.tokenizer = tokenizer
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=skip, unit="req", file=sys.stderr, dynamic_ncols=True)
    pending: list[_Line] = []
    stats = {"lines": 0, "ok": 0, "errors": 0, "completion_tokens": 0}
    t0 = time.perf_counter()

    def flush() -> None:
        while pending and pending[0].done():
            line = pending.pop(0)
            res = line.result()
            out.write(json.dumps(res, ensure_ascii=False) + "\n")
            stats["ok" if res["error"] is None else "errors"] += 1
            if res["error"] is None:
                stats["completion_tokens"] += res["response"]["body"]["usage"]["completion_tokens"]
            if bar is not None:
                bar.update(1)
        out.flush()

    def on_update(entry: _Line, pi: int, handle: Handle, choice: int, new: int) -> None:
        ct = entry.texts[pi][choice]
        ct.update(handle.choices[choice])
        # The engine's loop already ended the row at the stop string; this only guards the
        # text's cut (a no-op for a finished row).
        if ct.stopped:
            handle.stop_choice(choice)

    it = iter(enumerate(lines))
    exhausted = False
    while True:
        # Keep a few requests queued beyond the slots, so a freed slot is refilled at once.
        while not exhausted and len(loop.queue) < engine.slots:
            try:
                index, text = next(it)
            except StopIteration:
                exhausted = True
                break
            if index < skip or not text.strip():
                continue
            stats["lines"] += 1
            try:
                custom_id, kind, body = _request_of(text, index)
            except APIError as e:
                pending.append(_Line(index, f"request-{index}", error=e))
                continue
            entry = _Line(index, custom_id)
            try:
                if isinstance(body, dict) and body.get("stream"):
                    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
                entry.parsed = parse(body, kind, engine, tokenizer, model_name)
                entry.rid = new_id(kind)
                for pi, req in enumerate(entry.parsed.requests):
                    entry.texts.append([ChoiceText(tokenizer, entry.parsed.stop) for _ in range(entry.parsed.n)])
                    upd = (lambda e, i: lambda h, c, n: on_update(e, i, h, c, n))(entry, pi)
                    entry.handles.append(loop.submit(req, upd, force=True))
            except (APIError, ValueError, TypeError) as e:
                for h in entry.handles:  # a line with several prompts fails as a whole
                    h.cancel()
                entry = _Line(index, custom_id, error=e if isinstance(e, APIError) else APIError(str(e)))
            pending.append(entry)
        flush()
        if exhausted and not loop.busy():
            break
        loop.step()
    flush()
    if bar is not None:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def _parser() -> argparse.ArgumentParser:
    from ._server import add_engine_arguments

    p = argparse.ArgumentParser(prog="jaxdecode batch", description="Run a JSONL file of completions / chat requests "
                                "through the slot engine; one result per line, in input order.")
    p.add_argument("--input", required=True, help="requests, one JSON object per line")
    p.add_argument("--output", required=True, help="results, one JSON object per line (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxdecode batch --input requests.jsonl --output results.jsonl [engine flags]``."""
    args = _parser().parse_args(argv)
    from ._server import load_engine

    if not os.path.exists(args.input):
        print(f"jaxdecode: no such input file: {args.input!r}", file=sys.stderr)
        return 2
    if args.overwrite and os.path.exists(args.output):
        os.remove(args.output)
    skip = _resume_point(args.output)
    with open(args.input, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if skip >= len(lines) and skip:
        print(f"jaxdecode: {args.output} already holds all {skip} results", file=sys.stderr)
        return 0
    try:
        engine, tokenizer, name = load_engine(args)
    except (FileNotFoundError, ValueError, ImportError, TypeError) as e:
        print(f"jaxdecode: {e}", file=sys.stderr)
        return 2
    loop = EngineLoop(engine)
    with open(args.output, "a", encoding="utf-8") as out:
        stats = run_batch(loop, tokenizer, name, lines, out, skip=skip, total=len(lines),
                          progress=not args.no_progress)
    rate = stats["completion_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    print(f"[jaxdecode] {stats['lines']} requests ({stats['errors']} failed{', resumed after ' + str(skip) if skip else ''})"
          f" in {stats['seconds']:.2f} s | {stats['completion_tokens']} completion tokens, {rate:.1f} tokens/s "
          f"({engine.slots} slots)", file=sys.stderr)
    return 0
