"""Structured output (jaxdecode.json_schema / regex / choice) inside the compiled loop.

Fast tests use a small character-level vocabulary (TOKS) and the fake models of
fake_models.py; the table-compaction figures and the token-bytes mapping use the real SmolLM2
tokenizer (built from the GGUF's metadata, no weights); one slow test generates with the
default model.
"""

from __future__ import annotations

import json
import random
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import scipy.stats

import jaxdecode
from jaxdecode import _generate as G
from jaxdecode import _structured as C
from jaxdecode import reference
from fake_models import Bigram, cached

pytest.importorskip("outlines_core")

# Token i's text; id 0 is EOS. Single characters for everything JSON needs, plus a few
# multi-character tokens so token boundaries do not follow characters.
TOKS = (["<eos>", "{", "}", "[", "]", ",", ":", '"', " "] + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz")
        + ["true", "false", "null", "-", ".", '"name"', '"age"', "ab", "on", "er", "\n", '{"', '":', "12", "e", "E", "+"])
V = len(TOKS)
MODEL = Bigram.random(V, seed=1)
CACHED = cached(MODEL)


def text(ids) -> str:
    return "".join(TOKS[int(i)] for i in ids if int(i) != 0)


def generated(out, prompt_lengths, b):
    return [int(t) for t in np.asarray(out.tokens[b, prompt_lengths[b]: out.lengths[b]])]


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}


@pytest.fixture(scope="module")
def person():
    return jaxdecode.json_schema(PERSON, TOKS, eos_ids=[0])


@pytest.fixture(scope="module")
def smollm_tok():
    from jaxdecode.models import Tokenizer, default_model_path, read_gguf_metadata
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(default_model_path()))


# ---------------------------------------------------------------------------------------
# Host side: automaton, tables, schemas


def test_tables_agree_with_outlines_index():
    """Every (state, token) of the compact table equals outlines' own transition (EOS aside)."""
    import outlines_core as oc
    c = jaxdecode.regex(r"(ab|a)+c?[0-9]{1,2}", TOKS, eos_ids=[0])
    voc = C._vocab("t", TOKS, [0])
    idx = oc.Index(c.pattern, voc.outlines)
    # Walk both automata together over every token sequence up to length 4.
    frontier = [(idx.get_initial_state(), 0)]
    for _ in range(4):
        nxt = []
        for so, s in frontier:
            allowed = set(idx.get_allowed_tokens(so)) - {0}
            mine = set(np.flatnonzero(c.allowed(s)).tolist()) - {0}
            assert mine == allowed
            assert bool(c.allowed(s)[0]) == idx.is_final_state(so) == bool(c.final[s])  # EOS iff final
            nxt += [(idx.get_next_state(so, t), c.step(s, t)) for t in sorted(allowed)]
        frontier = nxt[:200]
    assert c.num_classes < V and c.table.dtype == np.int32 and c.class_of.shape == (V,)


def test_regex_choice_and_errors():
    c = jaxdecode.choice(["yes", "no", "maybe"], TOKS + ["yes"], eos_ids=[0])
    assert c.accepts([V]) and c.accepts([TOKS.index("n"), TOKS.index("o"), 0])
    assert not c.accepts([TOKS.index("n")]) and not c.accepts([TOKS.index("y"), TOKS.index("e")])
    with pytest.raises(ValueError, match=r"jaxdecode.regex: `pattern` '\(a' is not a valid"):
        jaxdecode.regex("(a", TOKS, eos_ids=[0])
    with pytest.raises(ValueError, match="jaxdecode.choice: `options` is empty"):
        jaxdecode.choice([], TOKS, eos_ids=[0])
    with pytest.raises(ValueError, match="jaxdecode.choice"):
        jaxdecode.choice(["Q"], TOKS, eos_ids=[0])  # no token spells "Q": unsatisfiable
    with pytest.raises(ValueError, match="declares no EOS"):
        jaxdecode.regex("a", TOKS)
    with pytest.raises(TypeError, match="`tokenizer` must be"):
        jaxdecode.regex("a", 42)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "string", "format": "ipv4"}, "ipv4"),
    ({"allOf": [{"type": "integer"}, {"minimum": 2}]}, "allOf"),
    ({"type": "number", "minimum": 0.5}, "integer-valued bounds"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "empty"),
])
def test_schema_keywords_never_silently_ignored(schema, keyword):
    with pytest.raises(ValueError, match=re.escape(keyword)):
        jaxdecode.json_schema(schema, TOKS, eos_ids=[0])


def test_numeric_range_patterns_are_exact():
    """minimum / maximum / exclusive bounds (dropped by outlines-core) rewritten into patterns:
    a random sweep of ranges against every integer and some decimals in [-200, 200]."""
    rng = random.Random(0)
    cands_int = [str(i) for i in range(-200, 201)]
    cands_num = cands_int + [f"{i}.{f}" for i in range(-150, 151) for f in ("0", "5", "00", "25")]
    for _ in range(150):
        typ = rng.choice(["integer", "number"])
        node = {"type": typ}
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if rng.random() < 0.4:
                node[k] = rng.randint(-130, 130) if typ == "number" or rng.random() < 0.7 else rng.uniform(-130, 130)
        try:
            rx = C._range_pattern("t", "#", typ, node)
        except ValueError as e:
            assert "empty" in str(e)
            continue

        def ok(x):
            return (x >= node.get("minimum", -np.inf) and x <= node.get("maximum", np.inf)
                    and x > node.get("exclusiveMinimum", -np.inf) and x < node.get("exclusiveMaximum", np.inf))
        for s in (cands_int if typ == "integer" else cands_num):
            if s != "-0":
                assert (re.fullmatch(rx, s) is not None) == ok(float(s)), (node, s, rx)
    # Draft-4 boolean exclusiveMinimum.
    rx = C._range_pattern("t", "#", "integer", {"type": "integer", "minimum": 3, "exclusiveMinimum": True})
    assert not re.fullmatch(rx, "3") and re.fullmatch(rx, "4")


def test_table_compaction_on_smollm2(smollm_tok):
    """The issue's example-like schema (6 fields: an enum, an array, a nested object, a pattern,
    a bounded integer) on SmolLM2's 49,152 tokens: the class table is tiny next to the dense one."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"}},
        "required": ["name", "age", "role", "tags", "address", "active"]}
    c = jaxdecode.json_schema(schema, smollm_tok)
    assert c.vocab_size == 49152 and c.eos_ids == (2, 0)
    assert 150 < c.num_states < 2000 and 30 < c.num_classes < 1000
    assert c.nbytes < 2**20 < c.dense_nbytes / 10
    print(f"\n{c!r}, built in {c.build_seconds:.2f} s")
    # Every special token (EOS aside) is never allowed; EOS only in final states.
    assert (c.class_of[[1, 3, 4, 16]] == 0).all() and c.class_of[2] == c.class_of[0] != 0
    assert not c.allowed(0)[2]


def test_token_bytes_of_byte_level_bpe(smollm_tok):
    """The bytes given to outlines for each token decode to what the tokenizer decodes."""
    toks = C._backend_token_bytes(smollm_tok.backend)
    assert toks[0] is None and toks[2] is None  # special tokens
    ids = smollm_tok.encode('{"name": "Zoë", "n": 12} naïve café')
    assert b"".join(toks[i] for i in ids).decode("utf-8") == '{"name": "Zoë", "n": 12} naïve café'
    for i in range(17, 49152, 97):
        b = toks[i]
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert smollm_tok.decode([i]) == s, i


def test_sentencepiece_token_bytes():
    from jaxdecode.models import Tokenizer
    from test_tokenizer import _spm_metadata
    sp = Tokenizer.from_gguf_metadata(_spm_metadata())
    toks = C._backend_token_bytes(sp.backend)
    assert toks[3 + 0xC3] == b"\xc3" and toks[sp.token_to_id("\u2581hello")] == b" hello"
    c = jaxdecode.regex(" hello( world)?", sp)
    assert c.accepts([sp.token_to_id("\u2581hello"), sp.token_to_id("\u2581world"), 2])


# ---------------------------------------------------------------------------------------
# In the loop


def test_json_outputs_validate_sampled_and_greedy(person):
    prompt = np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 9]], np.int32)
    lengths = np.array([3, 1, 2, 3])
    for kw in (dict(key=jax.random.key(0)), dict(temperature=0.0), dict(key=jax.random.key(3), temperature=1.5,
                                                                         top_k=8, repetition_penalty=1.3)):
        out = jaxdecode.generate(CACHED, prompt, 40, eos_id=0, constraint=person, prompt_lengths=lengths, **kw)
        assert out.complete.shape == (4,)
        for b in range(4):
            ids = generated(out, lengths, b)
            assert bool(out.complete[b]) == person.accepts(ids)
            if ids and ids[-1] == 0:
                assert out.complete[b]
            if out.complete[b]:
                jsonschema.validate(json.loads(text(ids)), PERSON)
        assert np.asarray(out.complete).sum() >= 3


def test_greedy_equals_host_reference(person):
    """Greedy constrained decoding = argmax over the allowed tokens, state by state (NumPy)."""
    prompt = np.array([[5]], np.int32)
    out = jaxdecode.generate(MODEL, prompt, 30, temperature=0.0, eos_id=0, constraint=person)
    table = np.asarray(MODEL.table)
    seq, s = [5], 0
    for _ in range(30):
        logits = np.where(person.allowed(s), table[seq[-1]], -np.inf)
        t = int(reference.greedy(logits[None])[0])
        seq.append(t)
        if t == 0:
            break
        s = person.step(s, t)
    assert np.asarray(out.tokens[0, : len(seq)]).tolist() == seq


def test_constrained_distribution_chi_square():
    """The first two tokens' joint distribution is the model's, renormalised over the allowed
    tokens (then temperature / top-k) at each state: chi-square against the NumPy reference."""
    c = jaxdecode.regex(r"(a|b|ab|on)(c|d|e|er)[0-9]", TOKS, eos_ids=[0])
    rows, first, knobs = 12000, 3, dict(temperature=1.2, top_k=3)
    out = jaxdecode.generate(MODEL, np.full((1, 1), first, np.int32), 2, key=jax.random.key(7), eos_id=0,
                             constraint=c, num_samples=rows, **knobs)
    table = np.asarray(MODEL.table, np.float64)
    p1 = reference.sample_probs(np.where(c.allowed(0), table[first], -np.inf)[None], **knobs)[0]
    joint = {}
    for t1 in np.flatnonzero(p1):
        s1 = c.step(0, int(t1))
        p2 = reference.sample_probs(np.where(c.allowed(s1), table[t1], -np.inf)[None], **knobs)[0]
        for t2 in np.flatnonzero(p2):
            joint[(int(t1), int(t2))] = p1[t1] * p2[t2]
    pairs = [tuple(r) for r in np.asarray(out.tokens[:, 1:3]).tolist()]
    assert set(pairs) <= set(joint)
    keys = sorted(joint)
    obs = np.array([pairs.count(k) for k in keys])
    exp = rows * np.array([joint[k] for k in keys])
    assert scipy.stats.chisquare(obs, exp).pvalue > 1e-3
    # Each token's log-probability is the one of the constrained distribution it came from.
    t1 = np.asarray(out.tokens[:, 1])
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(p1[t1]), rtol=1e-4, atol=1e-5)


def test_per_row_mixed_constraints_and_ragged_prompts(person):
    digits = jaxdecode.regex(r"[0-9]{3}-[a-z]{2}", TOKS, eos_ids=[0])
    prompt = np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0]], np.int32)
    lengths = np.array([3, 1, 2])
    key = jax.random.key(11)
    out = jaxdecode.generate(CACHED, prompt, 24, key=key, eos_id=0, prompt_lengths=lengths,
                             constraint=[person, None, digits])
    free = jaxdecode.generate(CACHED, prompt, 24, key=key, eos_id=0, prompt_lengths=lengths)
    # The unconstrained row is exactly what it is without constraints (its own key, knobs).
    np.testing.assert_array_equal(out.tokens[1], free.tokens[1])
    assert bool(out.complete[1])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text(generated(out, lengths, 2)))
    assert generated(out, lengths, 2)[-1] == 0
    if out.complete[0]:
        jsonschema.validate(json.loads(text(generated(out, lengths, 0))), PERSON)


def test_max_new_tokens_cut_reports_incomplete(person):
    out = jaxdecode.generate(CACHED, np.array([[1]], np.int32), 3, temperature=0.0, eos_id=0, constraint=person)
    assert out.num_generated.tolist() == [3] and out.complete.tolist() == [False]


def test_stream_num_samples_penalties_match_generate(person):
    prompt = np.array([[1, 2], [3, 0]], np.int32)
    kw = dict(key=jax.random.key(5), eos_id=0, prompt_lengths=np.array([2, 1]), constraint=[person, None],
              num_samples=2, presence_penalty=0.5, frequency_penalty=0.2, top_p=0.9)
    out = jaxdecode.generate(CACHED, prompt, 20, **kw)
    chunks = list(jaxdecode.generate_stream(CACHED, prompt, 20, chunk_size=6, **kw))
    toks = np.concatenate([np.asarray(ch.tokens) for ch in chunks], axis=1)
    for b in range(4):
        start = [2, 2, 1, 1][b]
        n = int(out.num_generated[b])
        np.testing.assert_array_equal(toks[b, :n], out.tokens[b, start: start + n])
    np.testing.assert_array_equal(chunks[-1].complete, out.complete)
    assert out.complete[2] and out.complete[3]  # unconstrained samples


def test_compiles_once_for_similar_schemas():
    schemas = [
        {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"type": "boolean"}},
         "required": ["a", "b"]},
        {"type": "object", "properties": {"x": {"type": "string", "maxLength": 4}, "y": {"type": "null"}},
         "required": ["x", "y"]},
        {"type": "object", "properties": {"n": {"enum": ["on", "off"]}, "k": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9}}, "required": ["n", "k"]},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    ]
    cs = [jaxdecode.json_schema(s, TOKS, eos_ids=[0], whitespace_pattern="") for s in schemas]
    assert len({(C.bucket(c.num_states, *C.STATE_BUCKETS), C.bucket(c.num_classes, *C.CLASS_BUCKETS))
                for c in cs}) == 1, [repr(c) for c in cs]
    prompt = np.array([[1, 2], [3, 4]], np.int32)
    before = None
    for c, s in zip(cs, schemas):
        out = jaxdecode.generate(CACHED, prompt, 16, key=jax.random.key(1), eos_id=0, constraint=[c, c])
        if before is None:
            before = G._generate_jit._cache_size()
        for b in range(2):
            if out.complete[b]:
                jsonschema.validate(json.loads(text(generated(out, [2, 2], b))), s)
    assert G._generate_jit._cache_size() == before


def test_processor_form_and_unsupported_decoders(person):
    out = jaxdecode.generate(MODEL, np.array([[5]], np.int32), 30, temperature=0.0, eos_id=0,
                             processors=person.processor())
    ref = jaxdecode.generate(MODEL, np.array([[5]], np.int32), 30, temperature=0.0, eos_id=0, constraint=person)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    with pytest.raises(ValueError, match="`constraint` is not supported with `speculative`"):
        jaxdecode.generate(CACHED, np.array([[1]], np.int32), 4, constraint=person,
                           speculative=jaxdecode.prompt_lookup(2, 2), temperature=0.0)
    with pytest.raises(ValueError, match="jaxdecode.beam_search: `constraint` is not supported"):
        jaxdecode.beam_search(CACHED, np.array([[1]], np.int32), 4, num_beams=2, constraint=person)
    with pytest.raises(ValueError, match=r"EOS ids \[0\] are not all among"):
        jaxdecode.generate(CACHED, np.array([[1]], np.int32), 4, temperature=0.0, eos_id=5, constraint=person)
    with pytest.raises(ValueError, match="one per prompt row"):
        jaxdecode.generate(CACHED, np.array([[1]], np.int32), 4, temperature=0.0, eos_id=0, constraint=[person] * 2)
    with pytest.raises(TypeError, match="must be a Constraint"):
        jaxdecode.generate(CACHED, np.array([[1]], np.int32), 4, temperature=0.0, eos_id=0, constraint="x")


# ---------------------------------------------------------------------------------------
# The default model: a dozen schemas, one call, one row each

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"type": "object",
     "properties": {"code": {"type": "string", "pattern": "[A-Z]{2}"}}, "required": ["code"]}},
     "required": ["city", "country"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
     "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}}, "required": ["ok", "note"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {"type": "object", "properties": {"id": {"type": "integer", "exclusiveMinimum": 0}, "tag": {"type": "string",
     "maxLength": 8}}, "required": ["id"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 4},
    {"enum": ["positive", "negative", "neutral"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"first": {"type": "string",
     "maxLength": 10}, "last": {"type": "string", "maxLength": 10}}, "required": ["first", "last"]}},
     "required": ["user"]},
    {"type": "object", "properties": {"temp": {"type": "number", "minimum": -50, "maximum": 60},
     "unit": {"enum": ["C", "F"]}}, "required": ["temp", "unit"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "[0-9]{5}"}, "valid": {"type": "boolean"},
     "extra": {"anyOf": [{"type": "integer", "maximum": 99}, {"type": "null"}]}}, "required": ["zip", "valid"]},
]


@pytest.mark.slow
def test_default_model_dozen_schemas_one_call():
    model, tok = jaxdecode.models.load()
    cs = [jaxdecode.json_schema(s, tok) for s in SCHEMAS]
    prompts = [tok.encode(tok.apply_chat_template(f"Give an example JSON value for this schema: {json.dumps(s)}"))
               for s in SCHEMAS]
    p = max(len(x) for x in prompts)
    prompt = np.array([x + [0] * (p - len(x)) for x in prompts], np.int32)
    lengths = np.array([len(x) for x in prompts])
    out = jaxdecode.generate(model, prompt, 64, temperature=0.0, prompt_lengths=lengths, constraint=cs)
    done = 0
    for b, s in enumerate(SCHEMAS):
        ids = generated(out, lengths, b)
        assert bool(out.complete[b]) == (ids[-1] in tok.eos_ids or cs[b].accepts(ids))
        if out.complete[b]:
            done += 1
            jsonschema.validate(json.loads(tok.decode([i for i in ids if i not in tok.eos_ids])), s)
    assert done >= 9, done


def test_model_without_eos_stops_at_the_constraints_eos(person):
    """A model that declares no EOS ids (the fake models) stops at the constraint's EOS."""
    out = jaxdecode.generate(MODEL, np.array([[5]], np.int32), 40, temperature=0.0, constraint=person)
    ids = generated(out, [1], 0)
    assert ids[-1] == 0 and out.complete.tolist() == [True]
    jsonschema.validate(json.loads(text(ids)), PERSON)


@pytest.mark.slow
def test_cli_choice_json_schema_and_errors(capsys, tmp_path, monkeypatch):
    from jaxdecode import _cli
    monkeypatch.setenv("JAXDECODE_CACHE_DIR", str(tmp_path / "xla"))
    code = _cli.main(["Is the sky blue? Answer yes or no.", "--chat", "--choice", "yes,no", "--max-new-tokens", "4",
                      "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["completions"][0]["text"] in ("yes", "no")
    assert data["completions"][0]["finish_reason"] == "stop"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    code = _cli.main(["Alice is 31.", "--chat", "--json-schema", str(schema), "--max-new-tokens", "32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["completions"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(data["completions"][0]["text"]), PERSON)
    assert _cli.main(["x", "--regex", "(a"]) == 2
    assert "`pattern` '(a' is not a valid regular expression" in capsys.readouterr().err
    assert _cli.main(["x", "--regex", "a", "--choice", "a,b"]) == 2  # one constraint at a time
    assert "not allowed with argument" in capsys.readouterr().err
