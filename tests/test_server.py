"""The OpenAI-compatible server (jaxdecode/_server.py, _openai.py) and the batch mode
(_batch.py), on fake models with the tiny GPT-2 fixture's tokenizer (64 tokens: characters,
a few merges, EOS ``<|endoftext|>`` = 1).

* PlusOne: the next token is the current one + 1, so the prompt "a" (ids [32, 6]) continues
  "bcdefgh..." under greedy decoding: texts, stop strings and usage are known exactly.
* the trigram model: real sampling, for seeds, n, logprobs and chat.

Most tests use starlette's TestClient (in-process ASGI); one starts uvicorn on a loopback
port and talks to it with the official ``openai`` client and ``httpx``; one runs
``jaxdecode serve`` as a subprocess and stops it with SIGTERM mid-stream.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

from starlette.testclient import TestClient  # noqa: E402  (the `test` extra installs starlette)

import jaxdecode  # noqa: E402
from jaxdecode._engine import Engine, EngineLoop, Request  # noqa: E402
from jaxdecode._openai import ChoiceText, find_stop, parse  # noqa: E402
from jaxdecode._server import ServingState, build_app  # noqa: E402
from jaxdecode import _batch  # noqa: E402
from jaxdecode.models import Tokenizer  # noqa: E402

from conftest import private_cache_dir  # noqa: E402
from fake_models import PlusOne, trigram_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2_tiny"
TOK = Tokenizer.from_file(FIXTURE)
V = 64
PLUS = PlusOne(V)
TRIGRAM, _ = trigram_model(V, seed=3)
ENGINE_PLUS = Engine(PLUS, slots=4, max_seq_len=128, chunk_size=4, top_logprobs=5, eos_ids=TOK.eos_ids)
ENGINE_TRI = Engine(TRIGRAM, slots=4, max_seq_len=128, chunk_size=4, top_logprobs=5, eos_ids=TOK.eos_ids)
NAME = "tiny"


def _client(engine, **kw) -> TestClient:
    state = ServingState(engine, TOK, NAME, warmup=False, **kw)
    return TestClient(build_app(state))


def _events(text: str) -> list:
    """The JSON events of an SSE body (``[DONE]`` as the string)."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------------------------------
# Completions and chat, non-streaming


def test_completion_greedy_text_usage_and_stop_strings():
    with _client(ENGINE_PLUS) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
        assert body["choices"] == [{"index": 0, "text": "bcdef", "logprobs": None, "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
        # The stop string is cut (not included); the tokens up to the one completing it count.
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 20, "temperature": 0, "stop": ["x", "de"]})
        ch = r.json()["choices"][0]
        assert (ch["text"], ch["finish_reason"]) == ("bc", "stop")
        assert r.json()["usage"]["completion_tokens"] == 4  # b c d e
        # EOS (<|endoftext|> = 1 follows <unk> = 0): finishes with "stop", not shown.
        r = c.post("/v1/completions", json={"prompt": [5, 63, 0], "max_tokens": 9, "temperature": 0})
        assert r.json()["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        # ignore_eos (vLLM) runs through it; echo prepends the prompt; a list of prompts.
        r = c.post("/v1/completions", json={"prompt": [[62, 63]], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 4
        r = c.post("/v1/completions", json={"prompt": ["a", "k"], "max_tokens": 3, "temperature": 0, "echo": True})
        assert [ch["text"] for ch in r.json()["choices"]] == ["abcd", "klmn"]
        assert r.json()["usage"]["prompt_tokens"] == 4


def test_seeded_chat_is_reproducible_and_equals_the_engine_alone():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    req = {"model": NAME, "messages": msgs, "max_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": 5,
           "repetition_penalty": 1.1, "min_p": 0.01}
    with _client(ENGINE_TRI) as c:
        a = c.post("/v1/chat/completions", json=req).json()
        b = c.post("/v1/chat/completions", json=dict(req, seed=6)).json()
        again = c.post("/v1/chat/completions", json=req).json()
    assert a["object"] == "chat.completion" and a["choices"][0]["message"]["role"] == "assistant"
    assert a["choices"] == again["choices"]
    assert a["choices"][0]["message"]["content"] != b["choices"][0]["message"]["content"]
    ids = TOK.encode(TOK.apply_chat_template(msgs, add_generation_prompt=True))
    assert a["usage"]["prompt_tokens"] == len(ids)
    sp = jaxdecode.SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.1, min_p=0.01)
    (h,) = EngineLoop(ENGINE_TRI).run([Request(ids, 12, sp, seed=5)])
    ct = ChoiceText(TOK, [])
    ct.update(h.choices[0])
    assert a["choices"][0]["message"]["content"] == ct.text


def test_issue13_fields_in_the_body_are_applied_per_request():
    """vLLM-style extra fields with SamplingParams' names (mirostat, DRY, XTC, bans...) run in
    the engine: the response equals the engine run with the same SamplingParams."""
    body = {"prompt": "the", "max_tokens": 12, "seed": 9, "temperature": 1.0, "mirostat_tau": 3.0,
            "mirostat_eta": 0.2, "dry_multiplier": 0.8, "dry_allowed_length": 1, "xtc_probability": 0.5,
            "xtc_threshold": 0.05, "bad_words": [[10], [11, 12]], "no_repeat_ngram_size": 3,
            "sequence_bias": [[[13], 2.0]], "suppress_tokens": [14], "ignore_eos": True}
    with _client(ENGINE_TRI) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    # vLLM's bad words as strings (each word alone and after a space: one sequence with this
    # prefix-space tokenizer), llama.cpp's DRY breakers as strings: encoded with the tokenizer.
    words = {"prompt": "a", "max_tokens": 5, "temperature": 0, "bad_words": ["ab"], "dry_sequence_breakers": ["\n"]}
    parsed = parse(words, "completion", ENGINE_PLUS, TOK, NAME)
    assert parsed.requests[0].sampling.bad_words == (tuple(TOK.encode("ab", add_bos=False)),) == ((32, 6, 7),)
    assert parsed.requests[0].sampling.dry_sequence_breakers == (tuple(TOK.encode("\n", add_bos=False)),)
    with _client(ENGINE_PLUS) as c:
        plus = c.post("/v1/completions", json=words).json()
    sp = jaxdecode.SamplingParams(temperature=1.0, mirostat_tau=3.0, mirostat_eta=0.2, dry_multiplier=0.8,
                                  dry_allowed_length=1, xtc_probability=0.5, xtc_threshold=0.05,
                                  bad_words=[[10], [11, 12]], no_repeat_ngram_size=3, sequence_bias=[[[13], 2.0]],
                                  suppress_tokens=[14], eos_id=())
    (h,) = EngineLoop(ENGINE_TRI).run([Request(TOK.encode("the"), 12, sp, seed=9)])
    ct = ChoiceText(TOK, [])
    ct.update(h.choices[0])
    assert r.json()["choices"][0]["text"] == ct.text and len(h.choices[0].tokens) == 12
    assert not {10, 14} & set(h.choices[0].tokens)
    assert not plus["choices"][0]["text"].startswith("b")  # PlusOne would continue "a" with "bcdef"


def test_n_choices_logprobs_and_logit_bias():
    with _client(ENGINE_TRI) as c:
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 6, "n": 3, "seed": 1, "logprobs": 2,
                                            "temperature": 1.0})
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
        assert len({ch["text"] for ch in body["choices"]}) > 1
        for ch in body["choices"]:
            lp = ch["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
            assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])
            assert "".join(lp["tokens"]).replace("▁", " ").strip() == ch["text"].strip() or lp["text_offset"][0] == 0
        assert body["usage"]["completion_tokens"] == 18
        # Chat logprobs; the top alternative's logprob is >= the chosen one's.
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                                 "logprobs": True, "top_logprobs": 3, "seed": 2})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == r.json()["usage"]["completion_tokens"]
        for item in content:
            assert len(item["top_logprobs"]) == 3 and item["top_logprobs"][0]["logprob"] >= item["logprob"]
            assert bytes(item["bytes"]).decode() == item["token"]
        # logit_bias +100 on one token makes it the only choice.
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 5, "logit_bias": {"10": 100},
                                            "temperature": 1.0, "seed": 0})
        assert r.json()["choices"][0]["text"] == "eeeee"


# ---------------------------------------------------------------------------------------
# Streaming


def test_streaming_completion_and_chat_chunks():
    with _client(ENGINE_PLUS) as c:
        full = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "temperature": 0}).json()
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "temperature": 0, "stream": True,
                                            "stream_options": {"include_usage": True}})
        assert r.headers["content-type"].startswith("text/event-stream")
        ev = _events(r.text)
        assert ev[-1] == "[DONE]"
        usage = ev[-2]
        assert usage["choices"] == [] and usage["usage"] == full["usage"]
        chunks = ev[:-2]
        assert all(e["object"] == "text_completion" and e["usage"] is None for e in chunks)
        assert "".join(e["choices"][0]["text"] for e in chunks) == full["choices"][0]["text"] == "bcdefghijk"
        assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == "length"
        assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1]) and len(chunks) >= 3
        # A stop string split across chunks is never streamed.
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 20, "temperature": 0, "stream": True,
                                            "stop": "efg"})
        ev = _events(r.text)
        assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == "bcd" and ev[-2]["choices"][0]["finish_reason"] == "stop"
    # Chat: a role chunk first, content deltas, the finish_reason last; equal to non-streaming.
    req = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 3}
    with _client(ENGINE_TRI) as c:
        full = c.post("/v1/chat/completions", json=req).json()
        ev = _events(c.post("/v1/chat/completions", json=dict(req, stream=True)).text)
    assert ev[-1] == "[DONE]" and "usage" not in ev[0]
    assert all(e["object"] == "chat.completion.chunk" and e["id"].startswith("chatcmpl-") for e in ev[:-1])
    for i in (0, 1):
        mine = [e["choices"][0] for e in ev[:-1] if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(m["delta"].get("content", "") for m in mine) == full["choices"][i]["message"]["content"]
        assert mine[-1]["finish_reason"] == full["choices"][i]["finish_reason"]
        assert all(m["finish_reason"] is None for m in mine[:-1])


# ---------------------------------------------------------------------------------------
# Bad requests, overload, models, health


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", "`max_tokens` must be an integer >= 1"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "`temperature` must be a number >= 0"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "`top_p` must be a number in (0, 1]"),
    ({"prompt": "a", "top_k": -2}, "top_k", "`top_k` must be an integer >= -1"),
    ({"prompt": "a", "n": 9}, "n", "`n` must be <= 4"),
    ({"prompt": "a", "model": "gpt-4"}, "model", "The model `gpt-4` does not exist"),
    ({"prompt": "a" * 130}, "prompt", "maximum context length is 128 tokens"),
    ({"prompt": "a", "max_tokens": 127}, "max_tokens", "you requested 129 tokens (2 in the prompt, 127 in the completion)"),
    ({"prompt": "a", "logit_bias": {"64": 1}}, "logit_bias", "token id 64 is outside the vocabulary"),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "`logprobs` must be an integer in [0, 5]"),
    ({"prompt": "a", "stop": [1]}, "stop", "`stop` must be a string or a list of strings"),
    ({"prompt": "a", "seed": 1.5}, "seed", "`seed` must be an integer"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only be set when `stream` is true"),
    ({"prompt": "a", "response_format": {"type": "xml"}}, "response_format", "must be 'text', 'json_object' or"),
    ({"prompt": "a", "response_format": {"type": "json_schema"}}, "response_format", "`response_format.json_schema`"),
    # The tiny fixture has no "{" token: no JSON object can be written with it.
    ({"prompt": "a", "response_format": {"type": "json_object"}}, "response_format", "cannot build an automaton"),
    ({"prompt": 5}, "prompt", "`prompt` must be a string"),
    ({"prompt": [70]}, "prompt", "token id 70, outside the vocabulary"),
    ({"prompt": "a", "frequency_penalty": 3}, "frequency_penalty", "in [-2, 2]"),
    ({"prompt": "a", "min_tokens": -1}, "min_tokens", "`min_tokens` must be an integer >= 0"),
    # The issue-13 fields: the library's own checks and the engine's table capacities.
    ({"prompt": "a", "mirostat_tau": -1}, "mirostat_tau", "`mirostat_tau` got -1"),
    ({"prompt": "a", "xtc_probability": True}, "xtc_probability", "not a boolean"),
    ({"prompt": "a", "dry_base": 0.5}, "dry_base", "`dry_base` got 0.5; allowed: a number >= 1"),
    ({"prompt": "a", "bad_words": [[70]]}, "bad_words", "`bad_words[0]` must be a token id in [0, 64), got 70"),
    ({"prompt": "a", "bad_words": [[1]] * 17}, "bad_words", "`bad_words` has 17 sequences; this engine allows at most 16"),
    ({"prompt": "a", "suppress_tokens": "x"}, "suppress_tokens", "`suppress_tokens` must be a list of token ids"),
    ({"prompt": "a", "exponential_decay_length_penalty": [3]}, "exponential_decay_length_penalty", "a pair (start, factor)"),
])
def test_bad_completion_requests_get_400_naming_the_field(body, param, message):
    with _client(ENGINE_PLUS) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_bodies_chat_errors_overload_models_and_health():
    with _client(ENGINE_PLUS) as c:
        for raw, message in ((b"{not json", "not valid JSON"), (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
                             (b"[1, 2]", "must be a JSON object")):
            r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        for msgs, message in (([], "non-empty list"), ([{"role": "robot", "content": "x"}], "`messages[0].role`"),
                              ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts")):
            r = c.post("/v1/chat/completions", json={"messages": msgs})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and message in r.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        assert c.get("/v1/models").json()["data"][0] | {"created": 0} == {
            "id": NAME, "object": "model", "created": 0, "owned_by": "jaxdecode", "root": NAME, "max_model_len": 128}
        assert c.get("/health").json() == {"status": "ok", "slots": 4, "busy_slots": 0, "queued": 0, "engine_errors": 0}
        # The engine survives all of it.
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0}).json()["choices"][0]["text"] == "bc"
    with _client(ENGINE_PLUS, max_queue=0) as c:
        r = c.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]


def test_find_stop_and_choice_text_hold_back():
    assert find_stop("hello world", ["wor", "lo"]) == 3 and find_stop("abc", ["x"]) == -1
    assert find_stop("abcabc", ["abc"], start=1) == 3


# ---------------------------------------------------------------------------------------
# A live uvicorn server: the openai client, httpx streaming, a client that disconnects


def _slow_model():
    """PlusOne with a 20 ms host sleep per call: long enough streams to disconnect from."""

    def sleepy(x):
        time.sleep(0.02)
        return x

    def model(tokens):
        tokens = jax.pure_callback(sleepy, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype), tokens)
        return PLUS(tokens)

    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server():
    import uvicorn

    engine = Engine(_slow_model(), slots=4, max_seq_len=128, chunk_size=4, top_logprobs=5, eos_ids=TOK.eos_ids)
    state = ServingState(engine, TOK, NAME, warmup=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(30)


def test_openai_client_against_a_live_server(live_server):
    import openai

    url, _ = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt="a", max_tokens=6, temperature=0, stop=["g"])
    assert out.choices[0].text == "bcdef" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 2
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    pieces, reasons, usage = [], [], None
    for ev in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             temperature=0, seed=1, stream=True,
                                             stream_options={"include_usage": True}):
        if ev.choices:
            pieces.append(ev.choices[0].delta.content or "")
            reasons.append(ev.choices[0].finish_reason)
        else:
            usage = ev.usage
    assert "".join(pieces) == chat.choices[0].message.content and reasons[-1] == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="a", max_tokens=-3)
    assert e.value.body["param"] == "max_tokens"


def test_disconnected_stream_frees_its_slot(live_server):
    import httpx

    url, state = live_server
    chunks_before = state.loop.stats["chunks"]
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions",
                           json={"prompt": "a", "max_tokens": 120, "temperature": 0, "stream": True,
                                 "ignore_eos": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        # Closed after the first event: the slot is freed at a chunk boundary, long before
        # the 30 chunks that 120 tokens would take.
        for _ in range(100):
            if all(o is None for o in state.loop.slot_owner):
                break
            time.sleep(0.05)
        assert all(o is None for o in state.loop.slot_owner)
        assert state.loop.stats["chunks"] - chunks_before < 25
        r = client.get(url + "/health")
        assert r.json()["busy_slots"] == 0 and r.json()["engine_errors"] == 0


# ---------------------------------------------------------------------------------------
# Offline batch mode


def test_batch_mode_survives_bad_lines_keeps_order_and_resumes(tmp_path):
    lines = [
        json.dumps({"prompt": "a", "max_tokens": 4, "temperature": 0}),
        "{broken",
        json.dumps({"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "temperature": 0}}),
        json.dumps({"prompt": "k", "max_tokens": 0}),
        json.dumps({"prompt": "k", "max_tokens": 3, "temperature": 0, "n": 2}),
    ]
    out = io.StringIO()
    stats = _batch.run_batch(EngineLoop(ENGINE_PLUS), TOK, NAME, lines, out, progress=False)
    res = [json.loads(l) for l in out.getvalue().splitlines()]
    assert stats["lines"] == 5 and stats["errors"] == 2 and stats["ok"] == 3
    assert [r["custom_id"] for r in res] == ["request-0", "request-1", "chat-1", "request-3", "request-4"]
    assert res[0]["response"]["body"]["choices"][0]["text"] == "bcde"
    assert res[1]["response"]["status_code"] == 400 and "not valid JSON" in res[1]["error"]["message"]
    assert res[2]["response"]["body"]["object"] == "chat.completion"
    assert res[3]["error"]["param"] == "max_tokens"
    assert [c["text"] for c in res[4]["response"]["body"]["choices"]] == ["lmn", "lmn"]
    # Resume: a file cut after two results and half a line redoes only the rest.
    path = tmp_path / "out.jsonl"
    kept = out.getvalue().splitlines(keepends=True)
    path.write_text("".join(kept[:2]) + kept[2][:10])
    assert _batch._resume_point(str(path)) == 2 and path.read_text() == "".join(kept[:2])
    with open(path, "a") as f:
        _batch.run_batch(EngineLoop(ENGINE_PLUS), TOK, NAME, lines, f, skip=2, progress=False)
    again = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["custom_id"] for r in again] == [r["custom_id"] for r in res]
    assert [r["response"]["body"].get("choices") for r in again] == [r["response"]["body"].get("choices") for r in res]


def test_cli_batch_and_serve_with_sigterm(tmp_path):
    """`jaxdecode --input/--output` on the tiny GPT-2 checkpoint, then `jaxdecode serve`: a
    streamed request in flight when SIGTERM arrives still ends cleanly, and the process exits."""
    import httpx

    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXDECODE_CACHE_DIR=private_cache_dir(tmp_path))
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 5, "temperature": 0}) for p in ("the", "a b")) + "\n")
    run = subprocess.run([sys.executable, "-m", "jaxdecode", "--input", str(inp), "--output", str(outp), "--model",
                          str(FIXTURE), "--slots", "2", "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    res = [json.loads(l) for l in outp.read_text().splitlines()]
    assert len(res) == 2 and all(r["response"]["status_code"] == 200 for r in res)
    assert "2 requests (0 failed)" in run.stderr
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxdecode", "serve", "--model", str(FIXTURE), "--port", str(port),
                             "--slots", "2", "--no-warmup", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(timeout=60) as client:
            r = client.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == res[0]["response"]["body"]["choices"][0]["text"]
            with client.stream("POST", url + "/v1/completions", json={"prompt": "the", "max_tokens": 20, "stream": True,
                                                                      "ignore_eos": True, "seed": 0}) as s:
                it = s.iter_lines()
                assert next(it).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                rest = [l for l in it if l]
            assert rest[-1] == "data: [DONE]"
        # uvicorn shuts down gracefully, then re-raises the signal it caught (its convention,
        # so process managers see it): exit status -SIGTERM, and nothing on stderr.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------
# response_format: structured output per request, inside the engine's decode step


def _byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer of 257 ids (EOS 0, then one token per byte, no merges): every
    JSON text can be written, unlike with the tiny fixture."""
    import tokenizers
    from tokenizers import decoders, models as tok_models, pre_tokenizers

    from jaxdecode._structured import _bytes_to_unicode

    inv = _bytes_to_unicode()
    vocab = {"<|endoftext|>": 0, **{ch: 1 + inv[ch] for ch in inv}}
    bpe = tokenizers.Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>"])
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return Tokenizer(bpe, eos_ids=[0], chat_template=template)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"]}
PAIR = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 2}


@pytest.mark.slow  # ~15 s: json_object's automaton (1623 states) and a live server
def test_response_format_json_schema_and_json_object_under_concurrent_load():
    """A live server on a random bigram model over the byte tokenizer: json_schema and
    json_object responses parse and validate (jsonschema), mixed with plain ones in flight
    together; a seeded constrained request is identical alone and among the others; new
    schemas after the first insert compile nothing."""
    import concurrent.futures

    import jsonschema
    import openai
    import uvicorn
    from fake_models import Bigram, cached

    tok = _byte_tokenizer()
    engine = Engine(cached(Bigram.random(tok.vocab_size, seed=5, scale=2.0)), slots=4, max_seq_len=160,
                    chunk_size=8, top_logprobs=2, eos_ids=tok.eos_ids)
    state = ServingState(engine, tok, NAME, warmup=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    fmt = lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}

    def chat(i, response_format=None, seed=None):
        return client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"person {i}"}], max_tokens=120, temperature=1.0,
            seed=seed if seed is not None else i, response_format=response_format)

    try:
        target = dict(i=99, response_format=fmt(PERSON), seed=4242)
        alone = chat(**target).choices[0]
        assert alone.finish_reason == "stop"
        jsonschema.validate(json.loads(alone.message.content), PERSON)
        chat(0, {"type": "json_object"})  # builds json_object's automaton and grows the tables once
        compiled = engine.compiled_count()
        jobs = [dict(i=i, response_format=[fmt(PERSON), fmt(PAIR), {"type": "json_object"}, None][i % 4])
                for i in range(11)]
        jobs.insert(5, target)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda kw: chat(**kw).choices[0], jobs))
        assert engine.compiled_count() == compiled
        for kw, out in zip(jobs, outs):
            rf = kw["response_format"]
            if rf is None:
                continue
            if rf["type"] == "json_object":
                if out.finish_reason == "stop":  # an unbounded object may hit max_tokens
                    assert isinstance(json.loads(out.message.content), dict)
                continue
            assert out.finish_reason == "stop", out
            jsonschema.validate(json.loads(out.message.content), rf["json_schema"]["schema"])
        assert outs[5].message.content == alone.message.content
        # Completions, streamed: the concatenated deltas are a valid document.
        text = "".join(ev.choices[0].text for ev in client.completions.create(
            model=NAME, prompt="{", max_tokens=60, seed=3, stream=True, extra_body={"response_format": fmt(PAIR)})
            if ev.choices)
        jsonschema.validate(json.loads(text), PAIR)
        with pytest.raises(openai.BadRequestError) as e:  # a keyword that would not be enforced
            client.completions.create(model=NAME, prompt="a", max_tokens=5, extra_body={"response_format": fmt(
                {"type": "string", "pattern": "a+", "contentEncoding": "base64"})})
        assert e.value.body["param"] == "response_format" and "contentEncoding" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:  # EOS must end a constrained row
            client.completions.create(model=NAME, prompt="a", max_tokens=5,
                                      extra_body={"ignore_eos": True, "response_format": {"type": "json_object"}})
        assert e.value.body["param"] == "response_format"
    finally:
        server.should_exit = True
        thread.join(30)


def test_stop_strings_end_the_row_inside_the_chunk():
    """The stop string "d" completes at the 3rd token of "bcdefgh...": the engine's loop ends
    the row there (3 tokens generated, not the chunk's 8; one chunk for the request), and the
    text is cut before it."""
    engine = Engine(PLUS, slots=2, max_seq_len=128, chunk_size=8, top_logprobs=2, eos_ids=TOK.eos_ids)
    state = ServingState(engine, TOK, NAME, warmup=False)
    with TestClient(build_app(state)) as c:
        chunks = state.loop.stats["chunks"]
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 40, "temperature": 0, "stop": ["zz", "d"]})
        body = r.json()
        assert body["choices"][0]["text"] == "bc" and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 3
        assert state.loop.stats["chunks"] - chunks == 1 and state.loop.stats["tokens"] == 3
        # A stop string spanning tokens ("ef" = "e" + "f") and a second list: no recompilation.
        programs = engine.compiled_count()
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 40, "temperature": 0, "stop": "ef"})
        assert r.json()["choices"][0]["text"] == "bcd" and r.json()["choices"][0]["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] == 5 and state.loop.stats["tokens"] == 8
        assert engine.compiled_count() == programs
