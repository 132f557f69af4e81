"""The slot engine (jaxdecode/_engine.py): prefill / insert / decode chunks, per-row settings,
reproducibility under load, compilations, scheduling and faults.

Fake models (tests/fake_models.py) give exact outputs, so the engine is checked token for
token against :func:`jaxdecode.generate` on the same request: row key
``fold_in(jax.random.key(seed), choice)`` there is what the engine uses per choice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode._engine import Engine, EngineLoop, QueueFull, Request, seed_key

from fake_models import PlusOne, trigram_logits, trigram_model

V = 32
TRIGRAM, TABLE = trigram_model(V, seed=0)
W = 64  # max_seq_len of the test engines


def _engine(slots=4, chunk=4, top=3):
    return Engine(TRIGRAM, slots=slots, max_seq_len=W, chunk_size=chunk, top_logprobs=top)


ENGINE4 = _engine()
ENGINE16 = _engine(slots=16)


def _generate(req: Request, choice: int = 0):
    key = jax.random.fold_in(seed_key(req.seed), choice)[None]
    out = jaxdecode.generate(TRIGRAM, jnp.asarray([req.prompt]), req.max_new_tokens, key=key, sampling=req.sampling)
    p = len(req.prompt)
    n = int(out.num_generated[0])
    return out.tokens[0, p:p + n].tolist(), out.raw_logprobs[0, :n].tolist()


REQUESTS = [
    Request([1, 2, 3], 12, jaxdecode.SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.3, eos_id=[5]), seed=3),
    Request([7] * 20, 9, jaxdecode.SamplingParams(temperature=0.0, logit_bias={4: 3.0}, eos_id=()), seed=0),
    Request([4, 9], 15, jaxdecode.SamplingParams(temperature=1.2, top_p=0.8, min_p=0.02, frequency_penalty=0.5,
                                                  presence_penalty=0.3, eos_id=[1, 2], min_new_tokens=6), seed=11),
    Request([30, 31, 0, 1, 2], 10, jaxdecode.SamplingParams(temperature=0.7, stop_sequences=[[3, 4], [9]], eos_id=()),
            seed=2**40 + 5),
    Request([12], 7, jaxdecode.SamplingParams(temperature=1.0, typical_p=0.9, eos_id=()), seed=99),
]


def test_engine_equals_generate_per_request_with_refills():
    # 5 requests on 4 slots: the last one waits for a slot and reuses a freed one.
    loop = EngineLoop(ENGINE4)
    handles = loop.run(REQUESTS)
    for req, h in zip(REQUESTS, handles):
        toks, lps = _generate(req)
        c = h.choices[0]
        assert c.tokens == toks, (req, c.tokens, toks)
        np.testing.assert_allclose(c.logprobs, lps, rtol=0, atol=1e-6)
        want = "stop" if len(toks) < req.max_new_tokens or toks[-1] in (req.sampling.eos_id or ()) else "length"
        assert c.finish_reason == want
    assert handles[1].choices[0].finish_reason == "length" and len(handles[1].choices[0].tokens) == 9
    assert handles[3].choices[0].tokens[-1] == 9 or handles[3].choices[0].tokens[-2:] == [3, 4] or \
        len(handles[3].choices[0].tokens) == 10


def test_seeded_request_alone_equals_among_15_concurrent():
    target = Request([5, 6, 7], 24, jaxdecode.SamplingParams(temperature=1.0, top_p=0.95, eos_id=()), seed=1234)
    loop = EngineLoop(ENGINE16)
    alone = loop.run([target])[0].choices[0]
    rng = np.random.default_rng(0)
    others = [Request(rng.integers(0, V, size=int(rng.integers(1, 40))).tolist(), int(rng.integers(5, 20)),
                      jaxdecode.SamplingParams(temperature=float(rng.uniform(0, 1.5)), top_k=int(rng.integers(0, 8)),
                                               repetition_penalty=float(rng.uniform(1, 1.5)), eos_id=[int(rng.integers(V))]),
                      seed=int(rng.integers(1 << 30)))
              for _ in range(15)]
    # The target lands in slot 9 this time, next to rows at other positions and settings.
    handles = loop.run(others[:9] + [target] + others[9:])
    under = handles[9].choices[0]
    assert under.tokens == alone.tokens and len(alone.tokens) == 24
    assert under.logprobs == alone.logprobs
    assert under.sampled_logprobs == alone.sampled_logprobs
    assert alone.tokens == _generate(target)[0]


def _compile_log() -> list:
    """A list that grows by one entry per XLA backend compilation from now on."""
    compiles: list = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    return compiles


def test_compiles_once_per_bucket_over_a_stream_of_requests():
    engine = _engine(slots=3, chunk=5)
    compiles = _compile_log()
    loop = EngineLoop(engine)
    # Warm up: one request per prompt bucket (16, 32, 64 tokens).
    loop.run([Request([1] * p, 2, jaxdecode.SamplingParams(temperature=0.0), seed=0) for p in (3, 20, 40)])
    before, programs = len(compiles), engine.compiled_count()
    rng = np.random.default_rng(1)
    stream = []
    for i in range(20):
        p = int(rng.integers(1, 50))
        stops = [rng.integers(0, V, size=int(rng.integers(1, 4))).tolist() for _ in range(int(rng.integers(0, 3)))]
        sp = jaxdecode.SamplingParams(
            temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(0, 10)), top_p=float(rng.uniform(0.5, 1)),
            min_p=float(rng.uniform(0, 0.2)), repetition_penalty=float(rng.uniform(0.8, 1.5)),
            frequency_penalty=float(rng.uniform(-1, 1)), logit_bias={int(rng.integers(V)): 2.0} if i % 2 else None,
            eos_id=rng.integers(0, V, size=int(rng.integers(0, 4))).tolist(), min_new_tokens=int(rng.integers(0, 4)),
            stop_sequences=stops or None)
        stream.append(Request(rng.integers(0, V, size=p).tolist(), int(rng.integers(1, W - p)), sp, seed=i,
                              n=int(rng.integers(1, 3)), top_logprobs=int(rng.integers(0, 4))))
    handles = loop.run(stream)
    assert all(c.finish_reason in ("stop", "length") for h in handles for c in h.choices)
    assert len(compiles) == before, f"{len(compiles) - before} new compilations after warm-up"
    # prefill: one program per bucket; insert, decode and release one each.
    assert engine.compiled_count() == programs
    assert loop.stats["prefills"] == 23


def test_n_choices_share_one_prefill_and_use_folded_keys():
    req = Request([3, 1, 4, 1, 5], 10, jaxdecode.SamplingParams(temperature=1.5, eos_id=()), seed=7, n=3)
    loop = EngineLoop(ENGINE4)
    (h,) = loop.run([req])
    assert loop.stats["prefills"] == 1
    got = [c.tokens for c in h.choices]
    assert got == [_generate(req, j)[0] for j in range(3)]
    assert len({tuple(g) for g in got}) == 3  # different keys, different samples


def test_n_larger_than_free_slots_waits_fifo():
    loop = EngineLoop(ENGINE4)
    reqs = [Request([1], 8, jaxdecode.SamplingParams(temperature=0.0, eos_id=()), seed=0, n=3),
            Request([2], 3, jaxdecode.SamplingParams(temperature=0.0, eos_id=()), seed=0, n=4)]
    h1, h2 = loop.run(reqs)
    assert [c.tokens for c in h1.choices] == [_generate(reqs[0])[0]] * 3
    assert [c.tokens for c in h2.choices] == [_generate(reqs[1])[0]] * 4


def test_top_logprobs_are_the_models_raw_top_tokens():
    req = Request([2, 8], 6, jaxdecode.SamplingParams(temperature=0.0, eos_id=()), seed=0, top_logprobs=3)
    (h,) = EngineLoop(ENGINE4).run([req])
    c = h.choices[0]
    seq = list(req.prompt)
    for tok, lp, top in zip(c.tokens, c.logprobs, c.top):
        logits = trigram_logits(TABLE, seq).astype(np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        best = np.argsort(-logp)[:3]
        assert [t for t, _ in top] == best.tolist()
        np.testing.assert_allclose([l for _, l in top], logp[best], atol=1e-5)
        assert tok == best[0]
        np.testing.assert_allclose(lp, logp[tok], atol=1e-5)
        seq.append(tok)


def test_stop_choice_and_cancel_free_slots_at_the_next_chunk():
    loop = EngineLoop(ENGINE4)
    greedy = jaxdecode.SamplingParams(temperature=0.0, eos_id=())

    def stop_after_first_chunk(handle, choice, new):
        handle.stop_choice(choice)

    h_stop = loop.submit(Request([1], 40, greedy, seed=0), on_update=stop_after_first_chunk)
    h_cancel = loop.submit(Request([2], 40, greedy, seed=0))
    loop.step()
    h_cancel.cancel()
    while loop.busy():
        loop.step()
    assert h_stop.done.is_set() and h_cancel.done.is_set()
    assert h_stop.choices[0].finish_reason == "stop" and len(h_stop.choices[0].tokens) == 4
    assert h_cancel.choices[0].finish_reason == "abort" and len(h_cancel.choices[0].tokens) == 4
    assert loop.slot_owner == [None] * 4
    assert loop.stats["chunks"] == 1  # nothing ran after the two were stopped
    # The freed slots are reused and give the same result as a fresh engine would.
    (h,) = loop.run([REQUESTS[0]])
    assert h.choices[0].tokens == _generate(REQUESTS[0])[0]


def test_bad_requests_and_a_full_queue():
    loop = EngineLoop(ENGINE4, max_queue=2)
    with pytest.raises(ValueError, match=r"prefill: the prompt \(60 tokens\) \+ `max_new_tokens` \(10\) = 70 exceeds max_seq_len=64"):
        loop.submit(Request([1] * 60, 10))
    with pytest.raises(ValueError, match="`prompt` has token id 32, outside the vocabulary"):
        loop.submit(Request([1, 32], 4))
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1, got 0"):
        loop.submit(Request([1], 0))
    with pytest.raises(ValueError, match="`n` must be <= the number of slots"):
        loop.submit(Request([1], 4, n=5))
    with pytest.raises(ValueError, match="`top_logprobs` must be <= the engine's top_logprobs"):
        loop.submit(Request([1], 4, top_logprobs=4))
    with pytest.raises(ValueError, match="`eos_id` must be a token id in"):
        loop.submit(Request([1], 4, jaxdecode.SamplingParams(eos_id=[40])))
    with pytest.raises(ValueError, match="`stop_sequences` has 9 sequences"):
        loop.submit(Request([1], 4, jaxdecode.SamplingParams(stop_sequences=[[1]] * 9)))
    loop.submit(Request([1], 4, seed=0))
    loop.submit(Request([1], 4, seed=0))
    with pytest.raises(QueueFull, match="queue is full"):
        loop.submit(Request([1], 4, seed=0))


def test_stateless_model_and_seed_key():
    engine = Engine(PlusOne(10), slots=2, max_seq_len=16, chunk_size=3)
    (h,) = EngineLoop(engine).run([Request([4], 7, jaxdecode.SamplingParams(temperature=0.0, eos_id=[9]))])
    assert h.choices[0].tokens == [5, 6, 7, 8, 9] and h.choices[0].finish_reason == "stop"
    np.testing.assert_array_equal(jax.random.key_data(seed_key(2**40 + 5)), [256, 5])
    np.testing.assert_array_equal(jax.random.key_data(seed_key(-1)), [2**32 - 1, 2**32 - 1])
    with pytest.raises(ValueError, match="`max_seq_len` is None and the model declares no context length"):
        Engine(PlusOne(10))


@pytest.mark.slow
def test_real_model_seeded_request_alone_equals_among_15_concurrent():
    """SmolLM2-135M: the target alone in a 16-slot engine, then in slot 7 among 15 requests
    with 170-token prompts (so the cached attention reads a longer cache prefix: 256 slots
    instead of 128) and other knobs: the same tokens and the same log-probabilities."""
    model, tok = jaxdecode.models.load()
    engine = Engine(model, slots=16, max_seq_len=256, chunk_size=8)
    target = Request(tok.encode("The capital of France is"), 24, jaxdecode.SamplingParams(temperature=0.8, top_p=0.95),
                     seed=42)
    loop = EngineLoop(engine)
    alone = loop.run([target])[0].choices[0]
    long_text = " ".join(f"word{i}" for i in range(60))
    others = [Request(tok.encode(f"{long_text} story {i}"), 20 + i,
                      jaxdecode.SamplingParams(temperature=0.7 + 0.01 * i, top_k=20), seed=i) for i in range(15)]
    assert len(others[0].prompt) > 128
    under = loop.run(others[:7] + [target] + others[7:])[7].choices[0]
    assert len(alone.tokens) == 24
    assert under.tokens == alone.tokens and under.logprobs == alone.logprobs


@pytest.mark.slow
def test_real_model_issue13_knobs_equal_generate():
    """SmolLM2-135M: requests with issue-13 knobs (greedy with n-gram / bad-word / DRY rules;
    seeded with mirostat, XTC and a penalty window) in a 4-slot engine next to a plain one
    give generate's tokens for the same row key."""
    model, tok = jaxdecode.models.load()
    engine = Engine(model, slots=4, max_seq_len=128, chunk_size=8)
    bad = [tok.encode(" Paris", add_bos=False)]
    reqs = [
        Request(tok.encode("The capital of France is"), 20, jaxdecode.SamplingParams(
            temperature=0.0, no_repeat_ngram_size=2, bad_words=bad, dry_multiplier=0.8, eos_id=()), seed=0),
        Request(tok.encode("Once upon a time"), 20, jaxdecode.SamplingParams(
            temperature=0.9, mirostat_tau=4.0, xtc_probability=0.5, xtc_threshold=0.1, penalty_last_n=8,
            repetition_penalty=1.3, eos_id=()), seed=7),
        Request(tok.encode("Hello"), 20, jaxdecode.SamplingParams(temperature=0.7, top_k=20, eos_id=()), seed=3),
    ]
    handles = EngineLoop(engine).run(reqs)
    for req, h in zip(reqs, handles):
        key = jax.random.fold_in(seed_key(req.seed), 0)[None]
        out = jaxdecode.generate(model, jnp.asarray([req.prompt]), req.max_new_tokens, key=key, sampling=req.sampling)
        p = len(req.prompt)
        assert h.choices[0].tokens == out.tokens[0, p:p + req.max_new_tokens].tolist(), req.sampling
    if len(bad[0]) == 1:  # " Paris" is one token in SmolLM2's vocabulary: never generated
        assert bad[0][0] not in handles[0].choices[0].tokens


def test_engine_layering():
    """The engine sits beside generate (floor 4: per-step maths and model handling only); the
    front ends (_openai, _server, _batch, _cli) sit on top of it and nothing below imports them."""
    from test_core import import_graph

    graph = import_graph()
    front = {"jaxdecode._server", "jaxdecode._openai", "jaxdecode._batch", "jaxdecode._cli"}
    assert graph["jaxdecode._engine"] <= {"jaxdecode._model", "jaxdecode._validate", "jaxdecode._compilation",
                                          "jaxdecode._processors", "jaxdecode._sampling", "jaxdecode._settings",
                                          "jaxdecode._structured", "jaxdecode._stop"}
    for name, deps in graph.items():
        if name not in front and name not in ("jaxdecode", "jaxdecode.__main__"):
            assert not deps & front, (name, deps & front)


# ---------------------------------------------------------------------------------------
# Structured output per slot

# Token i's text for the trigram model's 32 ids (id 0: EOS), enough for small JSON documents.
JSON_TOKENS = [None, "{", "}", '"', "a", "b", ":", ",", " "] + [str(d) for d in range(10)] + [
    "true", "false", "null", "[", "]", "x", "y", "ab", '"a"', '"b"', "-", ".", "e"]
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
     "required": ["a", "b"]},
    {"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
]
CONSTRAINTS = [jaxdecode.json_schema(s, JSON_TOKENS, eos_ids=[0]) for s in SCHEMAS]


def _json_of(tokens):
    """The JSON value of a constrained row's tokens (EOS last, excluded)."""
    import json

    assert tokens and tokens[-1] == 0, tokens
    return json.loads("".join(JSON_TOKENS[t] for t in tokens[:-1]))


def _constrained(i: int, seed: int, c: int | None, p: int = 3, temperature: float = 1.0) -> Request:
    sp = jaxdecode.SamplingParams(temperature=temperature, eos_id=[0], top_k=0 if i % 2 else 8)
    prompt = [(7 * i + j) % V for j in range(p)]
    return Request(prompt, W - p - 1, sp, seed=seed, constraint=None if c is None else CONSTRAINTS[c])


def test_constrained_slots_follow_their_own_schema_and_equal_generate():
    import jsonschema

    loop = EngineLoop(ENGINE4)
    reqs = [_constrained(i, seed=i, c=(None if i % 4 == 3 else i % 3)) for i in range(9)]
    handles = loop.run(reqs)
    for req, h in zip(reqs, handles):
        comp = h.choices[0]
        if req.constraint is None:
            continue
        assert comp.finish_reason == "stop", comp  # the bounded schemas end well before the length limit
        jsonschema.validate(_json_of(comp.tokens), SCHEMAS[CONSTRAINTS.index(req.constraint)])
        # The same request through generate(constraint=...), with the engine's row key.
        key = jax.random.fold_in(seed_key(req.seed), 0)[None]
        out = jaxdecode.generate(TRIGRAM, jnp.asarray([req.prompt]), req.max_new_tokens, key=key,
                                 sampling=req.sampling, constraint=req.constraint)
        p, n = len(req.prompt), int(out.num_generated[0])
        assert comp.tokens == out.tokens[0, p:p + n].tolist()
    # The unconstrained rows equal generate without a constraint (the mask did not touch them).
    for req, h in zip(reqs, handles):
        if req.constraint is None:
            assert h.choices[0].tokens == _generate(req)[0]


def test_constrained_seeded_request_alone_equals_among_15_mixed():
    target = _constrained(5, seed=1234, c=0)
    alone = EngineLoop(ENGINE16).run([target])[0].choices[0]
    loop = EngineLoop(ENGINE16)
    # A json_object-sized constraint among the others grows the table capacity (1024 states).
    big = jaxdecode.json_schema({"type": "object"}, JSON_TOKENS, eos_ids=[0])
    others = [_constrained(i, seed=100 + i, c=(None if i % 3 == 0 else i % 3)) for i in range(14)]
    others.append(dataclasses.replace(_constrained(20, seed=7, c=None), constraint=big))
    handles = loop.run(others[:7] + [target] + others[7:])
    assert loop.state.constraint.table.shape[1] == 1024
    under = handles[7].choices[0]
    assert under.tokens == alone.tokens and under.logprobs == alone.logprobs
    assert under.finish_reason == "stop"
    big_row = handles[-1].choices[0]
    if big_row.finish_reason == "stop":  # json_object is unbounded: it may run to the length limit
        assert isinstance(_json_of(big_row.tokens), dict)
    else:  # cut by the length limit: still a valid prefix of an object
        assert big_row.finish_reason == "length"
        state = 0
        for t in big_row.tokens:
            state = big.step(state, t)
            assert state >= 0, big_row.tokens


def test_new_schemas_insert_without_recompiling():
    engine = _engine(slots=3, chunk=5)
    compiles = _compile_log()
    loop = EngineLoop(engine)
    loop.run([_constrained(0, seed=0, c=0), _constrained(1, seed=1, c=None)])  # warm-up: one bucket of tables
    before, programs = len(compiles), engine.compiled_count()
    extra = [jaxdecode.json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                          "maximum": m}}, "required": ["a"]},
                                   JSON_TOKENS, eos_ids=[0]) for m in (5, 42, 99)]
    stream = [dataclasses.replace(_constrained(i, seed=i, c=None), constraint=(CONSTRAINTS + extra + [None])[i % 7])
              for i in range(14)]
    handles = loop.run(stream)
    assert len(compiles) == before, f"{len(compiles) - before} new compilations for new schemas"
    assert engine.compiled_count() == programs
    for req, h in zip(stream, handles):
        if req.constraint is not None:
            assert req.constraint.accepts(h.choices[0].tokens), h.choices[0]


def test_constraint_request_checks():
    with pytest.raises(TypeError, match=r"Engine.prefill: `constraint` must be a jaxdecode.Constraint"):
        ENGINE4.check(Request([1], 2, constraint="{}"))
    with pytest.raises(ValueError, match=r"constraint's EOS ids \[0\] are not all among the row's EOS ids \[5\]"):
        ENGINE4.check(Request([1], 2, jaxdecode.SamplingParams(eos_id=[5]), constraint=CONSTRAINTS[0]))
    wide = jaxdecode.regex("a+", JSON_TOKENS + ["q"] * 8, eos_ids=[0])
    with pytest.raises(ValueError, match=r"vocabulary of 40 tokens, larger than the model's 32"):
        ENGINE4.check(Request([1], 2, jaxdecode.SamplingParams(eos_id=[0]), constraint=wide))


# ---------------------------------------------------------------------------------------
# Stop strings per slot, in the loop

# Token i's text for the 32 ids: single letters and a few multi-letter pieces.
STOP_TOKENS = [""] + [chr(ord("a") + i) for i in range(26)] + ["ab", "cd", "xyz", "ba", "\n\n"]


def test_stop_strings_end_rows_in_the_loop_and_equal_generate():
    engine = Engine(TRIGRAM, slots=4, max_seq_len=W, chunk_size=4, top_logprobs=3, tokenizer=STOP_TOKENS)
    reqs = []
    for i, stops in enumerate([["ab"], ["c", "zz"], ["\n\n", "q"], None, ["dab", "ba"], ["xyz"]]):
        sp = jaxdecode.SamplingParams(temperature=1.3, eos_id=(), stop=stops)
        reqs.append(Request([3, 1 + i], 40, sp, seed=50 + i))
    loop = EngineLoop(engine)
    handles = loop.run(reqs)
    for req, h in zip(reqs, handles):
        comp = h.choices[0]
        key = jax.random.fold_in(seed_key(req.seed), 0)[None]
        stops = req.sampling.stop
        out = jaxdecode.generate(TRIGRAM, jnp.asarray([req.prompt]), req.max_new_tokens, key=key,
                                 sampling=req.sampling, tokenizer=STOP_TOKENS if stops else None)
        n = int(out.num_generated[0])
        assert comp.tokens == out.tokens[0, 2:2 + n].tolist()  # ends at the completing token, not the chunk's end
        if stops is not None and comp.finish_reason == "stop":
            text = "".join(STOP_TOKENS[t] for t in comp.tokens)
            before = "".join(STOP_TOKENS[t] for t in comp.tokens[:-1])
            # The last token completed a stop string: it is in the text, and was not before it.
            assert any(s in text for s in stops) and not any(s in before for s in stops), (text, stops)
    assert any(h.choices[0].finish_reason == "stop" for h in handles[:3])


def test_new_stop_lists_insert_without_recompiling():
    engine = Engine(TRIGRAM, slots=2, max_seq_len=W, chunk_size=3, top_logprobs=3, tokenizer=STOP_TOKENS)
    compiles = _compile_log()
    loop = EngineLoop(engine)
    sp = jaxdecode.SamplingParams(temperature=1.0, eos_id=())
    loop.run([Request([1], 5, sp.replace(stop=["ab"]), seed=0)])
    before, programs = len(compiles), engine.compiled_count()
    lists = [["a"], ["xyz", "q"], ["hello", "wor", "ld"], ["\n\n"], ["ba", "cd", "e", "ff"]]
    handles = loop.run([Request([2 + i], 20, sp.replace(stop=s), seed=i) for i, s in enumerate(lists)])
    assert len(compiles) == before and engine.compiled_count() == programs
    assert all(c.finish_reason in ("stop", "length") for h in handles for c in h.choices)


# ---------------------------------------------------------------------------------------
# Prefill continuing a slot's cache (prefill(request, reuse=(state, slot)))


def _prefix_sum_model(vocab: int, seed: int = 3):
    """A causal fake whose logits at position t depend on every token 0..t: ``table[sum(tokens[:t+1]) % V]``
    (so a stale or corrupted cache slot, slot 0 included, changes the answer), KV-cached through
    :func:`fake_models.cached`. Its step logs each call's positions (on the host, per run), so a
    test sees which positions a prefill computed."""
    from fake_models import cached

    table = jnp.asarray(np.random.RandomState(seed).randn(vocab, vocab) * 3.0, jnp.float32)
    inner = cached(lambda t: table[jnp.cumsum(t, axis=1) % vocab])
    log: list = []

    def step(tokens, positions, cache):
        jax.debug.callback(lambda p: log.append(np.asarray(p).copy()), positions)
        return inner.step(tokens, positions, cache)

    return jaxdecode.CachedModel(inner.init_cache, step), log


SUM_MODEL, SUM_LOG = _prefix_sum_model(V)
GREEDY = jaxdecode.SamplingParams(temperature=0.0, eos_id=())


def _answer(engine, state, slot, prompt, n, reuse):
    """One greedy turn in ``slot``: (state, generated tokens, prefix)."""
    prefix = engine.prefill(Request(prompt, n, GREEDY, seed=0), reuse=(state, slot) if reuse else None)
    state = engine.insert(prefix, state, slot)
    got = []
    while True:
        state, out = engine.decode(state)
        got += out.tokens[slot][out.valid[slot]].tolist()
        if int(out.reason[slot]) != 0:
            return state, got, prefix


def test_reused_prefill_equals_a_fresh_one_over_a_three_turn_chat_and_runs_only_new_tokens():
    engine = Engine(SUM_MODEL, slots=2, max_seq_len=W, chunk_size=4)
    reused_state, fresh_state = engine.init_state(), engine.init_state()
    history, turns = [], []
    # Token 0 (5) is not the pad id: a clobbered cache slot 0 would show.
    for turn, (user, n) in enumerate([([5, 9, 2, 7, 1], 6), ([3, 3, 8], 5), ([11, 4], 7)]):
        if turn == 0:
            prompt = list(user)
        elif turn == 1:  # the whole history as generated, then the new message
            prompt = history + user
        else:  # a re-tokenized answer differs from the generated ids after 2 tokens
            prompt = history[: len(history) - len(turns[-1]) + 2] + [(history[-3] + 1) % V] + user
        SUM_LOG.clear()
        reused_state, got, prefix = _answer(engine, reused_state, 0, prompt, n, reuse=True)
        prefill_log = SUM_LOG[0]
        fresh_state, want, fresh = _answer(engine, fresh_state, 0, prompt, n, reuse=False)
        assert got == want == _greedy_sum(prompt, n), turn
        np.testing.assert_array_equal(prefix.logits, fresh.logits)
        if turn == 0:
            assert prefix.reused == 0
        else:
            # The cache holds the last history minus its final token (generated, never fed).
            expect = len(history) - 1 if turn == 1 else len(history) - len(turns[-1]) + 2
            assert prefix.reused == expect and prefix.prompt_len == len(prompt)
            real = prefill_log[0][prefill_log[0] < len(prompt)]
            assert real.tolist() == [0] + list(range(expect, len(prompt)))  # token 0 + the new ones only
            assert prefill_log.shape[1] == 16  # one length bucket
        history = prompt + got
        turns.append(got)
        # Another request decodes in slot 1 while slot 0 idles (its step parks writes in slot 0).
        reused_state = _answer(engine, reused_state, 1, [2, 2, 2], 9, reuse=False)[0]


def _greedy_sum(prompt, n):
    """NumPy greedy decoding of the prefix-sum model (its table rebuilt from the same seed)."""
    table = np.random.RandomState(3).randn(V, V).astype(np.float32) * np.float32(3.0)
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(table[sum(seq) % V])))
    return seq[len(prompt):]


def test_reuse_falls_back_to_a_fresh_prefill_and_checks_its_arguments():
    engine = Engine(SUM_MODEL, slots=2, max_seq_len=W, chunk_size=4)
    state = engine.init_state()
    assert engine.reusable_tokens(state, 0, [5, 9, 2]) == 0  # an empty slot
    state, got, _ = _answer(engine, state, 0, [5, 9, 2], 4, reuse=False)
    assert engine.reusable_tokens(state, 0, [5, 9, 2] + got) == 6  # the last generated token is not cached
    assert engine.reusable_tokens(state, 0, [5, 9, 2]) == 2  # the last prompt token always runs
    assert engine.reusable_tokens(state, 0, [6, 9, 2, 1]) == 0
    prefix = engine.prefill(Request([5, 1, 1, 1], 3, GREEDY, seed=0), reuse=(state, 0))
    assert prefix.reused == 0  # 1 common token: a fresh prefill
    with pytest.raises(TypeError, match="`reuse` must be a \\(DecodeState, slot\\) pair"):
        engine.prefill(Request([5, 9], 3, GREEDY), reuse=state)
    with pytest.raises(ValueError, match="`slot` must be in \\[0, 2\\), got 2"):
        engine.prefill(Request([5, 9], 3, GREEDY), reuse=(state, 2))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):  # the request is checked as always
        engine.prefill(Request([5, 9] * 40, 3, GREEDY), reuse=(state, 0))


def test_reused_prefill_on_a_decoder_matches_a_fresh_one():
    """A tiny random Llama (real KV cache, RoPE, sliding and global layers): after a reused
    prefill the next-token logits and the greedy continuation match a fresh prefill."""
    from jaxdecode.models import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=W, sliding_window=8,
                        layer_types=("sliding", "full"))
    model = Decoder.init(jax.random.key(1), cfg)
    engine = Engine(model, slots=2, max_seq_len=W, chunk_size=8)
    state = engine.init_state()
    first = [3, 14, 15, 9, 2, 6, 5, 3, 5]
    state, got, _ = _answer(engine, state, 0, first, 10, reuse=False)
    state = _answer(engine, state, 1, [1, 2, 3], 12, reuse=False)[0]  # slot 0 idles meanwhile
    prompt = first + got + [7, 7, 1]
    state_fresh = engine.init_state()
    state, again, prefix = _answer(engine, state, 0, prompt, 12, reuse=True)
    _, want, fresh = _answer(engine, state_fresh, 0, prompt, 12, reuse=False)
    assert prefix.reused == len(first) + len(got) - 1
    np.testing.assert_allclose(prefix.logits, fresh.logits, rtol=0, atol=1e-4)
    assert again == want


@pytest.mark.slow
def test_real_model_three_turn_chat_reusing_the_cache_equals_fresh_prefills():
    """SmolLM2-135M: a 3-turn chat (history re-tokenized through the chat template each turn),
    one engine reusing slot 0's cache, another prefilling the whole conversation: the same
    greedy answers, and turns 2 and 3 reuse all but the new message."""
    model, tok = jaxdecode.models.load("smollm2-135m")
    engine = Engine(model, slots=1, max_seq_len=512, chunk_size=8)
    sp = jaxdecode.SamplingParams(temperature=0.0, eos_id=tok.eos_ids)
    reuse_state, fresh_state = engine.init_state(), engine.init_state()
    history = []
    for turn, message in enumerate(["What is the capital of France?", "And of Italy?", "Name a river there."]):
        history.append({"role": "user", "content": message})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        answers = []
        for state, reuse in ((reuse_state, True), (fresh_state, False)):
            prefix = engine.prefill(Request(ids, 24, sp, seed=0), reuse=(state, 0) if reuse else None)
            state = engine.insert(prefix, state, 0)
            got = []
            while True:
                state, out = engine.decode(state)
                got += out.tokens[0][out.valid[0]].tolist()
                if int(out.reason[0]) != 0:
                    break
            answers.append((got, prefix))
            if reuse:
                reuse_state = state
            else:
                fresh_state = state
        (got, prefix), (want, fresh) = answers
        assert got == want, (turn, tok.decode(got), tok.decode(want))
        np.testing.assert_allclose(prefix.logits, fresh.logits, rtol=0, atol=2e-3)
        if turn:
            new = len(ids) - prefix.reused
            assert prefix.reused > 0.6 * len(ids) and new <= len(tok.encode(message)) + 12, (prefix.reused, len(ids))
        history.append({"role": "assistant", "content": tok.decode(got, skip_special_tokens=True)})
# ---------------------------------------------------------------------------------------
# The issue-13 knobs per slot: the same tokens as generate, reproducible, one compilation

# Every issue-13 knob family, a few per request (each request is also run through generate).
HEAVY = {
    "truncations": jaxdecode.SamplingParams(temperature=1.1, top_n_sigma=1.5, epsilon_cutoff=0.01, min_tokens_to_keep=3,
                                            top_k=2, dynatemp_range=0.4, dynatemp_exponent=1.5, eos_id=()),
    "eta_xtc": jaxdecode.SamplingParams(temperature=1.0, eta_cutoff=0.02, xtc_probability=0.7, xtc_threshold=0.05,
                                        eos_id=()),
    "mirostat_dry": jaxdecode.SamplingParams(temperature=1.0, mirostat_tau=3.0, mirostat_eta=0.2, dry_multiplier=0.8,
                                             dry_base=1.5, dry_allowed_length=1, dry_penalty_last_n=20,
                                             dry_sequence_breakers=[[5], [6, 7]], eos_id=()),
    "penalty_window": jaxdecode.SamplingParams(temperature=0.8, repetition_penalty=1.6, frequency_penalty=0.7,
                                               presence_penalty=0.2, penalty_last_n=4, eos_id=()),
    "bans": jaxdecode.SamplingParams(temperature=1.3, no_repeat_ngram_size=2, bad_words=[[1, 2], [3], [4, 5, 6]],
                                     suppress_tokens=[8, 9], begin_suppress_tokens=[10, 11, 12], eos_id=()),
    "allowed_bias_decay": jaxdecode.SamplingParams(
        temperature=1.0, allowed_token_ids=[0, 2, 3, 5, 7, 11, 13, 17, 19, 23], sequence_bias=[[[2, 3], 4.0], [[7], -3.0]],
        exponential_decay_length_penalty=(3, 1.6), eos_id=[5]),
    "greedy_rules": jaxdecode.SamplingParams(temperature=0.0, no_repeat_ngram_size=1, dry_multiplier=2.0,
                                             bad_words=[[4]], eos_id=()),
}


def test_every_knob_family_equals_generate_among_plain_rows():
    reqs = []
    for i, (name, sp) in enumerate(HEAVY.items()):
        reqs.append(Request([3 + i, 1, 4 + i], 20, sp, seed=100 + i, n=2 if name == "mirostat_dry" else 1))
        reqs.append(REQUESTS[i % len(REQUESTS)])  # a plain row beside it
    handles = EngineLoop(ENGINE4).run(reqs)
    for req, h in zip(reqs, handles):
        for j, c in enumerate(h.choices):
            toks, lps = _generate(req, j)
            assert c.tokens == toks, (req.sampling, c.tokens, toks)
            np.testing.assert_allclose(c.logprobs, lps, rtol=0, atol=1e-6)
    got = {name: handles[2 * i].choices for i, name in enumerate(HEAVY)}
    # The rules did act (their semantics are tested against generate's references elsewhere).
    bans = got["bans"][0].tokens
    assert not {3, 8, 9} & set(bans) and bans[0] not in (10, 11, 12)
    seq = list(reqs[8].prompt) + bans
    bigrams = list(zip(seq, seq[1:]))
    assert len(set(bigrams)) == len(bigrams)  # no_repeat_ngram_size=2
    p = len(reqs[8].prompt)
    assert (1, 2) not in bigrams[p - 1:]  # the bad words [1, 2] and [4, 5, 6], from the first generated token
    assert (4, 5, 6) not in list(zip(seq, seq[1:], seq[2:]))[p - 2:]
    assert set(got["allowed_bias_decay"][0].tokens) <= {0, 2, 3, 5, 7, 11, 13, 17, 19, 23}
    greedy = got["greedy_rules"][0].tokens
    assert len(set(greedy)) == len(greedy) and 4 not in greedy  # no_repeat_ngram_size=1: no token twice
    assert got["mirostat_dry"][0].tokens != got["mirostat_dry"][1].tokens  # two choices, two keys


def test_heavy_seeded_request_alone_equals_among_15_concurrent():
    """Mirostat + DRY + XTC in one request among plain ones (and a plain one among heavy
    ones): each gets the same tokens alone as under load, whichever branch the step took."""
    heavy = Request([5, 6, 7], 24, jaxdecode.SamplingParams(
        temperature=1.0, mirostat_tau=2.5, dry_multiplier=0.8, dry_allowed_length=1, xtc_probability=0.6,
        xtc_threshold=0.05, bad_words=[[2, 3]], eos_id=()), seed=77)
    plain = Request([9, 9], 24, jaxdecode.SamplingParams(temperature=1.0, top_p=0.95, eos_id=()), seed=1234)
    fresh = _engine(slots=16)
    plain_alone = EngineLoop(fresh).run([plain])[0].choices[0]  # the plain decode program
    heavy_alone = EngineLoop(fresh).run([heavy])[0].choices[0]
    rng = np.random.default_rng(5)
    others = []
    for i in range(14):
        sp = jaxdecode.SamplingParams(temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.integers(0, 8)),
                                      eos_id=[int(rng.integers(V))])
        if i % 3 == 0:  # some neighbours use issue-13 knobs too, with other values
            sp = sp.replace(mirostat_tau=float(rng.uniform(1, 4)), dry_multiplier=0.5, no_repeat_ngram_size=3,
                            suppress_tokens=[int(rng.integers(V))])
        others.append(Request(rng.integers(0, V, size=int(rng.integers(1, 30))).tolist(), int(rng.integers(5, 20)), sp,
                              seed=int(rng.integers(1 << 30))))
    handles = EngineLoop(fresh).run(others[:5] + [heavy] + others[5:11] + [plain] + others[11:])
    for h, alone in ((handles[5], heavy_alone), (handles[12], plain_alone)):
        under = h.choices[0]
        assert under.tokens == alone.tokens and len(alone.tokens) == 24
        assert under.logprobs == alone.logprobs and under.sampled_logprobs == alone.sampled_logprobs
    assert heavy_alone.tokens == _generate(heavy)[0] and plain_alone.tokens == _generate(plain)[0]


def test_issue13_knobs_cost_one_compilation_for_the_engines_life():
    engine = _engine(slots=3, chunk=5)
    compiles = _compile_log()
    loop = EngineLoop(engine)
    loop.run([Request([1] * p, 2, jaxdecode.SamplingParams(temperature=0.0), seed=0) for p in (3, 20, 40)])
    before, programs = len(compiles), engine.compiled_count()
    rng = np.random.default_rng(2)
    stream = []
    for i in range(12):
        seqs = lambda k: [rng.integers(0, V, size=int(rng.integers(1, 4))).tolist() for _ in range(k)]
        sp = jaxdecode.SamplingParams(
            temperature=float(rng.uniform(0, 1.5)), top_n_sigma=float(rng.choice([0, 1.0])),
            xtc_probability=float(rng.uniform(0, 1)), mirostat_tau=float(rng.choice([0, 3.0])),
            dry_multiplier=float(rng.choice([0, 0.8])), dry_sequence_breakers=seqs(int(rng.integers(0, 3))) or None,
            penalty_last_n=int(rng.integers(0, 8)), no_repeat_ngram_size=int(rng.integers(0, 3)),
            bad_words=seqs(int(rng.integers(0, 4))) or None, sequence_bias=[[s, 1.5] for s in seqs(int(rng.integers(0, 3)))] or None,
            allowed_token_ids=rng.integers(0, V, size=12).tolist() if i % 4 == 1 else None,
            suppress_tokens=[int(rng.integers(V))] if i % 2 else None,
            begin_suppress_tokens=[int(rng.integers(V))] if i % 3 else None,
            exponential_decay_length_penalty=(int(rng.integers(0, 5)), 1.2) if i % 5 == 0 else None)
        stream.append(Request(rng.integers(0, V, size=int(rng.integers(1, 40))).tolist(), int(rng.integers(1, 20)), sp,
                              seed=i, n=int(rng.integers(1, 3))))
    handles = loop.run(stream)
    assert all(c.finish_reason in ("stop", "length") for h in handles for c in h.choices)
    assert len(compiles) == before + 1, f"{len(compiles) - before} new compilations (want 1: the extended decode)"
    assert engine.compiled_count() == programs + 1
    # Plain requests after it run the plain program again: still nothing new.
    loop.run([Request([2, 3], 6, jaxdecode.SamplingParams(temperature=0.5), seed=1)])
    assert len(compiles) == before + 1


def test_issue13_capacities_and_values_are_checked_naming_the_field():
    engine = Engine(TRIGRAM, slots=2, max_seq_len=W, max_bad_words=2, max_sequence_bias=1, max_dry_breakers=1,
                    max_word_len=3)
    cases = [
        (dict(bad_words=[[1], [2], [3]]), r"`bad_words` has 3 sequences; this engine allows at most 2 \(Engine\(max_bad_words"),
        (dict(bad_words=[[1, 2, 3, 4]]), r"`bad_words\[0\]` has 4 tokens; this engine allows at most 3 \(Engine\(max_word_len"),
        (dict(sequence_bias=[[[1], 1.0], [[2], 1.0]]), r"`sequence_bias` has 2 sequences; this engine allows at most 1"),
        (dict(dry_sequence_breakers=[[1], [2]]), r"`dry_sequence_breakers` has 2 sequences"),
        (dict(bad_words=[[40]]), r"`bad_words\[0\]` must be a token id in \[0, 32\)"),
        (dict(suppress_tokens=[32]), r"`suppress_tokens` must be a token id in \[0, 32\)"),
        (dict(allowed_token_ids=[1, 99]), r"`allowed_token_ids` must be a token id in \[0, 32\)"),
        (dict(mirostat_tau=np.array([1.0, 2.0])), r"`mirostat_tau` must be a scalar per request"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.prefill(Request([1, 2], 3, jaxdecode.SamplingParams(**fields), seed=0))
    with pytest.raises(ValueError, match=r"`max_bad_words` must be >= 1"):
        Engine(TRIGRAM, slots=2, max_seq_len=W, max_bad_words=0)
