"""``jaxdecode serve``: an OpenAI-compatible HTTP server on the slot engine (starlette + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat
template), ``GET /v1/models``, ``GET /health``. Streaming is server-sent events in OpenAI's
chunk format (``data: {...}``, ``finish_reason`` on each choice's last chunk,
``stream_options.include_usage``, ``data: [DONE]``).

One background thread runs the :class:`~jaxdecode._engine.EngineLoop`: it admits queued
requests into free slots at chunk boundaries, decodes a chunk for every slot, and hands the
new tokens to each request's callbacks, which detokenize, match stop strings and push text to
the request's asyncio queue (``loop.call_soon_threadsafe``). A client that disconnects
cancels its request, which frees its slots at the next chunk; a full queue is a 503; a bad
request is a 400 with OpenAI's error JSON naming the field; an error inside the engine aborts
the requests in flight (500 / an error event) and the engine starts over with empty slots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import sys
import threading
import time
import traceback
from typing import Any, Sequence

from ._engine import Engine, EngineLoop, QueueFull, Request
from ._openai import APIError, ChoiceText, Parsed, chunk_body, completion_body, models_body, new_id, parse, usage_body
from ._compilation import bucket
from ._engine import PROMPT_BUCKETS
from ._settings import SamplingParams

__all__ = ["ServingState", "build_app", "main", "add_engine_arguments", "load_engine"]

log = logging.getLogger("jaxdecode.serve")


class ServingState:
    """The engine loop, its thread and what the HTTP handlers need (tokenizer, names).

    Args:
      engine: the :class:`~jaxdecode._engine.Engine`.
      tokenizer: a ``jaxdecode.models.Tokenizer``.
      model_name: the name clients pass as ``model`` (and ``/v1/models`` lists).
      max_queue: requests waiting for a slot before the server answers 503.
      warmup: compile every prompt bucket and the decode chunk before ``/health`` says ready.
    """

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, *, max_queue: int = 256,
                 warmup: bool = True, served_names: Sequence[str] = ()):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        if engine.tokenizer is None:  # stop strings are matched in the engine's loop, on this vocabulary
            engine.tokenizer = tokenizer
        self.served_names = tuple(served_names)
        self.loop = EngineLoop(engine, max_queue=max_queue)
        self.warmup = warmup
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="jaxdecode-engine", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the engine thread; requests still queued or running finish with "abort"."""
        self.stopping.set()
        with self.loop.lock:
            self.loop.wakeup.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def warm_up(self) -> None:
        """Compiles the prefill of every prompt bucket, insert, release and the decode chunk."""
        w = self.engine.max_seq_len
        sizes = sorted({min(bucket(p, *PROMPT_BUCKETS), w) for p in
                        [16 * 2 ** k for k in range(20) if 16 * 2 ** k < w] + [w - 1]})
        reqs = [Request([0] * min(b, w - 1), 1, SamplingParams(temperature=0.0), seed=0) for b in sizes]
        t0 = time.perf_counter()
        self.loop.run(reqs)
        self.loop.state = self.engine.release(self.loop.state, 0)
        log.info("warm-up: prompt buckets %s compiled in %.1f s", sizes, time.perf_counter() - t0)

    def _run(self) -> None:
        try:
            if self.warmup:
                self.warm_up()
        except Exception:  # a failed warm-up still serves (compiling on first use)
            log.error("warm-up failed:\n%s", traceback.format_exc())
        self.ready.set()
        while not self.stopping.is_set():
            if not self.loop.wait_for_work(0.1):
                continue
            try:
                self.loop.step()
            except Exception as e:  # nothing crashes the engine: abort what was running, go on
                self.errors += 1
                log.error("engine error, aborting the requests in flight:\n%s", traceback.format_exc())
                self.loop.abort_all(e)
        self.loop.abort_all(RuntimeError("the server is shutting down"))


def _error(e: APIError) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start}).") from None
    except json.JSONDecodeError as e:
        raise APIError(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Job:
    """One HTTP request's engine handles and per-choice texts; callbacks run on the engine
    thread and post events to the request's asyncio queue."""

    def __init__(self, state: ServingState, parsed: Parsed, aloop: asyncio.AbstractEventLoop):
        self.state, self.p, self.aloop = state, parsed, aloop
        self.events: asyncio.Queue = asyncio.Queue()
        self.texts = [[ChoiceText(state.tokenizer, parsed.stop) for _ in range(parsed.n)]
                      for _ in parsed.requests]
        self.sent_entries = [[0] * parsed.n for _ in parsed.requests]
        self.final_sent = [[False] * parsed.n for _ in parsed.requests]
        self.handles: list = []

    def submit(self) -> None:
        try:
            for pi, req in enumerate(self.p.requests):
                self.handles.append(self.state.loop.submit(req, functools.partial(self._on_update, pi),
                                                           functools.partial(self._on_done, pi)))
        except QueueFull as e:
            self.cancel()
            raise APIError(f"The server is overloaded: {e}.", status=503, type="server_overloaded") from None
        except (ValueError, TypeError) as e:
            self.cancel()
            raise APIError(str(e)) from None

    def _post(self, item) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    def _on_update(self, pi: int, handle, choice: int, new: int) -> None:
        ct = self.texts[pi][choice]
        comp = handle.choices[choice]
        piece = ct.update(comp)
        # The engine's loop already ended the row at the stop string; this only guards the
        # text's cut (a no-op for a finished row).
        if ct.stopped:
            handle.stop_choice(choice)
        done = ct.stopped or comp.finish_reason is not None
        self._delta(pi, choice, piece, done)

    def _delta(self, pi: int, choice: int, piece: str, done: bool) -> None:
        if self.final_sent[pi][choice]:
            return
        self.final_sent[pi][choice] = done
        if self.p.stream:
            start, end = self.sent_entries[pi][choice], len(self.texts[pi][choice].entries)
            self.sent_entries[pi][choice] = end
            self._post(("delta", pi, choice, piece, start, end, done))

    def _on_done(self, pi: int, handle) -> None:
        # Choices that finished without a last update (cancelled, aborted by an engine error)
        # still get their final text and finish_reason.
        for j, comp in enumerate(handle.choices):
            if not self.final_sent[pi][j]:
                self._delta(pi, j, self.texts[pi][j].update(comp), True)
        self._post(("done", pi))

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done.is_set():
                h.cancel()

    def error(self) -> BaseException | None:
        return next((h.error for h in self.handles if h.error is not None), None)

    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.p.requests)

    def choices(self):
        n = self.p.n
        return [(self.texts[pi][j], h.choices[j], pi) for pi, h in enumerate(self.handles) for j in range(n)]

    def completion_tokens(self) -> int:
        return sum(ct.num_tokens for row in self.texts for ct in row)


def build_app(state: ServingState):
    """The starlette application (its lifespan starts and stops the engine thread)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def serve(request, kind: str):
        try:
            body = await _read_json(request)
            # In a worker thread: a new response_format schema builds its automaton on the host
            # (seconds for json_object on a large vocabulary) without stalling other streams.
            parsed = await asyncio.to_thread(parse, body, kind, state.engine, state.tokenizer, state.model_name,
                                             state.served_names)
            if not state.ready.is_set():
                raise APIError("The server is warming up (compiling); retry in a few seconds.", status=503,
                               type="server_not_ready")
            job = _Job(state, parsed, asyncio.get_running_loop())
            job.submit()
        except APIError as e:
            return _error(e)
        rid, created = new_id(kind), int(time.time())
        if parsed.stream:
            return StreamingResponse(_stream(job, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        remaining = len(job.handles)
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if item[0] == "done":
                    remaining -= 1
        finally:
            job.cancel()  # a no-op when every handle is done
        err = job.error()
        if err is not None:
            return _error(APIError(f"the engine failed on this request: {err}", status=500, type="server_error"))
        return JSONResponse(completion_body(parsed, rid, created, job.choices(), job.prompt_tokens()))

    async def completions(request):
        return await serve(request, "completion")

    async def chat(request):
        return await serve(request, "chat")

    async def models(request):
        return JSONResponse(models_body(state.model_name, state.engine.max_seq_len))

    async def health(request):
        if not state.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503)
        loop = state.loop
        busy = sum(o is not None for o in loop.slot_owner)
        return JSONResponse({"status": "ok", "slots": state.engine.slots, "busy_slots": busy,
                             "queued": len(loop.queue), "engine_errors": state.errors})

    async def on_error(request, exc):
        log.error("unhandled error:\n%s", traceback.format_exc())
        return _error(APIError(f"internal error: {exc}", status=500, type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: on_error})


async def _stream(job: _Job, rid: str, created: int):
    p = job.p
    n = p.n
    try:
        for idx in range(len(p.requests) * n):
            if p.kind == "chat":  # vLLM and OpenAI open each choice with its role
                yield _sse(chunk_body(p, rid, created, idx, text="", role=True))
            elif p.echo:
                yield _sse(chunk_body(p, rid, created, idx, text=p.prompt_texts[idx // n]))
        remaining = len(job.handles)
        while remaining:
            item = await job.events.get()
            if item[0] == "done":
                remaining -= 1
                err = job.handles[item[1]].error
                if err is not None:
                    yield _sse(APIError(f"the engine failed on this request: {err}", status=500,
                                        type="server_error").body())
                continue
            _, pi, j, piece, start, end, done = item
            ct, comp = job.texts[pi][j], job.handles[pi].choices[j]
            lp = None
            if p.logprobs is not None and end > start:
                lp = ct.logprobs_chat(start, end) if p.kind == "chat" else ct.logprobs_completion(start, end)
            if done:
                text = piece if piece or p.kind == "completion" else None  # chat: an empty delta {}
                yield _sse(chunk_body(p, rid, created, pi * n + j, text=text, logprobs=lp,
                                      finish_reason=ct.finish_reason(comp)))
            elif piece or lp is not None:
                yield _sse(chunk_body(p, rid, created, pi * n + j, text=piece, logprobs=lp))
        if p.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
                        "created": created, "model": p.model, "choices": [],
                        "usage": usage_body(job.prompt_tokens(), job.completion_tokens())})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that went away frees its slots at the next chunk


# ---------------------------------------------------------------------------------------
# Command line


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model and engine flags shared by ``serve`` and ``batch``."""
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face checkpoint folder (default: the "
                                                 "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"], help="weights (default float32)")
    p.add_argument("--slots", type=int, default=8, help="decode slots: requests decoded together (default 8)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per slot, prompt + completion (default: the model's context, at most 2048)")
    p.add_argument("--chunk-size", type=int, default=8, help="decode steps between refills (default 8)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: from --model)")


def load_engine(args: argparse.Namespace):
    """``(engine, tokenizer, model_name)`` from the shared flags; errors exit with a message."""
    import os

    import jaxdecode
    from jaxdecode import models

    jaxdecode.enable_compilation_cache()
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise SystemExit("jaxdecode: the model has no tokenizer (tokenizer.json missing)")
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    max_len = args.max_seq_len or (min(limit, 2048) if limit else 2048)
    from ._model import default_eos_ids

    eos = default_eos_ids(model) or tuple(tokenizer.eos_ids)  # vLLM: the tokenizer's EOS as fallback
    engine = Engine(model, slots=args.slots, max_seq_len=max_len, chunk_size=args.chunk_size, eos_ids=eos,
                    tokenizer=tokenizer)
    name = args.served_model_name
    if name is None:
        name = "SmolLM2-135M-Instruct" if args.model is None else os.path.basename(os.path.normpath(args.model))
    return engine, tokenizer, name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxdecode serve", description="An OpenAI-compatible server (continuous "
                                "batching on a slot engine): /v1/completions, /v1/chat/completions, /v1/models, /health.")
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503 (default 256)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxdecode serve [flags]``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        print("jaxdecode serve needs starlette and uvicorn: pip install 'jaxdecode[serve]'", file=sys.stderr)
        return 2
    try:
        engine, tokenizer, name = load_engine(args)
    except (FileNotFoundError, ValueError, ImportError, TypeError) as e:
        print(f"jaxdecode: {e}", file=sys.stderr)
        return 2
    state = ServingState(engine, tokenizer, name, max_queue=args.max_queue, warmup=not args.no_warmup)
    import uvicorn

    log.info("serving %s on http://%s:%d (%d slots, %d tokens per slot)", name, args.host, args.port, engine.slots,
             engine.max_seq_len)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests finish for
    # --shutdown-timeout seconds, cancels the rest (their slots are freed), then the
    # lifespan stops the engine thread.
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
