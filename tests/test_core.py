"""The shared decoding core: SamplingParams, the model adapter, the validation layer, the
import graph, shape buckets and context limits, across generate / generate_stream /
beam_search / speculative_generate."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode import _generate as G
from jaxdecode import reference
from fake_models import Bigram, ScaledBigram, cached, greedy_reference, trigram_logits, trigram_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
V6 = 6
TRI, TRI_TABLE = trigram_model(V6, seed=3)
PROMPT6 = np.array([[1, 2, 3], [4, 5, 0]], np.int32)


# ---------------------------------------------------------------------------------------
# SamplingParams


def test_sampling_params_is_an_immutable_checked_pytree():
    sp = jaxdecode.SamplingParams(temperature=0.7, top_k=5, eos_id=[3, 4], stop_sequences=[[1, 2]],
                                  logit_bias={2: -1.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.temperature = 1.0
    assert sp.eos_id == (3, 4) and sp.stop_sequences == ((1, 2),)
    leaves, treedef = jax.tree_util.tree_flatten(sp)
    new_knobs = [0.0, 0.0, 0.0, 1, 0.1, 0.0, 0.0, 1.0, 0.0, 0.1, 0.0, 1.75, 2, 0, 0, 0]  # issue 13's, at defaults
    assert sorted(float(x) for x in leaves) == sorted(
        [0.7, 5, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, -1.5, 3, 4, 0, 1, 2] + new_knobs)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.temperature == 0.7 and back.eos_id == (3, 4) and back.logit_bias == {2: -1.5}
    assert sp.replace(top_k=0).top_k == 0 and sp.top_k == 5
    with pytest.raises(ValueError, match=r"jaxdecode.SamplingParams: `temperature` got -1.0; allowed: a number >= 0"):
        jaxdecode.SamplingParams(temperature=-1.0)
    with pytest.raises(TypeError, match=r"jaxdecode.SamplingParams: `eos_id` must be a token id"):
        jaxdecode.SamplingParams(eos_id=2.5)
    with pytest.raises(ValueError, match=r"`top_p` got 0.0"):
        sp.replace(top_p=0.0)


def test_sampling_equals_keywords_and_both_is_an_error():
    model = cached(Bigram.random(12, seed=5))
    prompt = jnp.array([[1, 2, 3], [4, 5, 0]])
    kw = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3, eos_id=7, stop_sequences=[[3, 3]])
    a = jaxdecode.generate(model, prompt, 6, key=KEY, **kw)
    b = jaxdecode.generate(model, prompt, 6, key=KEY, sampling=jaxdecode.SamplingParams(**kw))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    for fn, call in [
        ("jaxdecode.generate", lambda **k: jaxdecode.generate(model, prompt, 2, key=KEY, **k)),
        ("jaxdecode.generate_stream", lambda **k: jaxdecode.generate_stream(model, prompt, 2, key=KEY, **k)),
        ("jaxdecode.speculative_generate", lambda **k: jaxdecode.speculative_generate(
            model, prompt, 2, key=KEY, proposer=jaxdecode.prompt_lookup(), **k)),
        ("jaxdecode.beam_search", lambda **k: jaxdecode.beam_search(model, prompt, 2, num_beams=2, **k)),
    ]:
        with pytest.raises(ValueError, match=rf"{fn}: got both `sampling=SamplingParams\(...\)` and .*`eos_id`"):
            call(sampling=jaxdecode.SamplingParams(), eos_id=3)
        with pytest.raises(TypeError, match=rf"{fn}: `sampling` must be a jaxdecode.SamplingParams, got dict"):
            call(sampling={"temperature": 0.5})


def test_sampling_params_through_jit_are_traced():
    model = cached(Bigram.random(12, seed=6))
    prompt = jnp.array([[1, 2, 3]])

    @jax.jit
    def run(sp):
        return jaxdecode.generate(model, prompt, 5, key=KEY, sampling=sp).tokens

    sp = jaxdecode.SamplingParams(temperature=0.9, top_k=4, eos_id=(11,))
    np.testing.assert_array_equal(run(sp), jaxdecode.generate(model, prompt, 5, key=KEY, sampling=sp).tokens)
    before = run._cache_size()
    greedy = run(sp.replace(temperature=0.0, top_k=0, eos_id=(10,)))  # new values: no recompile
    assert run._cache_size() == before
    np.testing.assert_array_equal(greedy, jaxdecode.generate(model, prompt, 5, temperature=0.0, eos_id=10).tokens)


def test_unsupported_fields_are_errors_in_beam_and_speculative():
    with pytest.raises(ValueError, match=r"jaxdecode.beam_search: `temperature` is not supported by beam search"):
        jaxdecode.beam_search(TRI, PROMPT6, 2, num_beams=2, sampling=jaxdecode.SamplingParams(temperature=0.5))
    with pytest.raises(ValueError, match=r"`repetition_penalty` is not supported by speculative decoding"):
        jaxdecode.speculative_generate(TRI, PROMPT6, 2, proposer=jaxdecode.prompt_lookup(), key=KEY,
                                       sampling=jaxdecode.SamplingParams(repetition_penalty=1.2))


# ---------------------------------------------------------------------------------------
# One model adapter: a pytree model with an array and a Python float, in every decoder


def test_pytree_model_with_a_python_float_leaf_in_every_decoder():
    model = ScaledBigram(Bigram.random(9, seed=2).table, 1.5)
    prompt = np.array([[1, 2, 3], [4, 0, 0]], np.int32)
    lengths = np.array([3, 1], np.int32)
    want = greedy_reference(model, prompt, lengths, 5)

    out = jaxdecode.generate(model, prompt, 5, temperature=0.0, prompt_lengths=lengths)
    assert [out.tokens[b, : out.lengths[b]].tolist() for b in range(2)] == want

    beam = jaxdecode.beam_search(model, prompt, 5, num_beams=1, prompt_lengths=lengths)
    assert [beam.tokens[b, 0, : beam.lengths[b, 0]].tolist() for b in range(2)] == want

    for proposer in (jaxdecode.prompt_lookup(3, 2), jaxdecode.draft_model(ScaledBigram(model.table, 0.5), 3)):
        spec = jaxdecode.speculative_generate(model, prompt, 5, proposer=proposer, temperature=0.0,
                                              prompt_lengths=lengths)
        assert [spec.tokens[b, : spec.lengths[b]].tolist() for b in range(2)] == want

    # The float is static (by value), the table traced: new params of the same shape reuse the
    # compilation, a new float compiles anew and changes the distribution.
    size = G._generate_jit._cache_size()
    other = ScaledBigram(Bigram.random(9, seed=3).table, 1.5)
    out2 = jaxdecode.generate(other, prompt, 5, temperature=0.0, prompt_lengths=lengths)
    assert G._generate_jit._cache_size() == size
    assert [out2.tokens[b, : out2.lengths[b]].tolist() for b in range(2)] == greedy_reference(other, prompt, lengths, 5)


# ---------------------------------------------------------------------------------------
# One validation layer: the same bad value, the same error from every entry point


def _call(entry: str, prompt=PROMPT6, n=3, **kw):
    if entry == "generate":
        return jaxdecode.generate(TRI, prompt, n, **{"key": KEY, **kw})
    if entry == "generate_stream":
        return jaxdecode.generate_stream(TRI, prompt, n, **{"key": KEY, **kw})
    if entry == "speculative_generate":
        return jaxdecode.speculative_generate(TRI, prompt, n, proposer=jaxdecode.prompt_lookup(2, 2),
                                              **{"key": KEY, **kw})
    assert entry == "beam_search"
    return jaxdecode.beam_search(TRI, prompt, n, num_beams=2, **kw)


ALL = ("generate", "generate_stream", "speculative_generate", "beam_search")
SAMPLERS = ("generate", "generate_stream", "speculative_generate")
BAD = [
    # (entry points, arguments, exception, words the message must contain)
    (ALL, dict(prompt=np.arange(3)), ValueError, ["`prompt` must have shape [batch, prompt_len]", "(3,)"]),
    (ALL, dict(prompt=PROMPT6.astype(np.float32)), TypeError, ["`prompt` must hold integer", "float32"]),
    (ALL, dict(prompt=PROMPT6 + 3), ValueError, ["`prompt` has token id 6", "[0, 6)"]),
    (ALL, dict(n=0), ValueError, ["`max_new_tokens` must be >= 1, got 0"]),
    (ALL, dict(n=2.5), TypeError, ["`max_new_tokens` must be an int, got 2.5"]),
    (ALL, dict(n=True), TypeError, ["`max_new_tokens` must be an int, got True"]),
    (ALL, dict(prompt_lengths=[4, 1]), ValueError, ["`prompt_lengths` must be in [1, 3]", "bad entry 4"]),
    (ALL, dict(prompt_lengths=[3]), ValueError, ["`prompt_lengths` must have shape (2,)", "(1,)"]),
    (ALL, dict(eos_id=99), ValueError, ["`eos_id` got [99]; each id must be in [0, 6)"]),
    (ALL, dict(eos_id=[2, -1]), ValueError, ["`eos_id` got [2, -1]", "[0, 6)", "bad id -1"]),
    (ALL, dict(eos_id=2.0), TypeError, ["`eos_id` must be a token id or a list of token ids, got 2.0"]),
    (ALL, dict(pad_id=99), ValueError, ["`pad_id` must be a token id in [0, 6), got 99"]),
    (ALL, dict(pad_id=-1), ValueError, ["`pad_id` must be a token id in [0, 6), got -1"]),
    (ALL, dict(pad_id=1.5), TypeError, ["`pad_id` must be an int, got 1.5"]),
    (SAMPLERS, dict(key=jax.random.split(KEY, 3)), ValueError, ["`key` must be a single key", "(3,)"]),
    (SAMPLERS, dict(key=3), TypeError, ["`key` must be a JAX PRNG key", "int"]),
    (SAMPLERS, dict(key=None, temperature=0.5), ValueError, ["`key` is None but temperature=0.5 > 0"]),
    (SAMPLERS, dict(temperature=-1.0), ValueError, ["`temperature` got -1.0; allowed: a number >= 0"]),
    (SAMPLERS, dict(top_p=0.0), ValueError, ["`top_p` got 0.0; allowed: a number in (0, 1]"]),
    (SAMPLERS, dict(top_k=1.5), TypeError, ["`top_k` must be an integer, got 1.5"]),
    (SAMPLERS, dict(temperature=np.ones(3)), ValueError, ["`temperature` has shape (3,)", "(2,)"]),
    (("generate", "beam_search"), dict(top_logprobs=1.5), TypeError, ["`top_logprobs` must be an int, got 1.5"]),
    (("generate", "beam_search"), dict(top_logprobs=-1), ValueError, ["`top_logprobs` must be >= 0", "got -1"]),
    (("generate", "beam_search"), dict(top_logprobs=7), ValueError,
     ["`top_logprobs` must be <= the vocabulary size (6), got 7"]),
    (("generate", "generate_stream"), dict(num_samples=0), ValueError, ["`num_samples` must be >= 1, got 0"]),
    (("generate", "generate_stream"), dict(stop_sequences=[[1, 6]]), ValueError,
     ["`stop_sequences[0]` = [1, 6] has ids outside [0, 6)"]),
    (("generate", "generate_stream"), dict(logit_bias={6: 1.0}), ValueError, ["`logit_bias` has token id 6"]),
]


@pytest.mark.parametrize("entries,kwargs,exc,words", BAD, ids=[str(b[1])[:40] for b in BAD])
def test_same_bad_value_same_error_everywhere(entries, kwargs, exc, words):
    messages = {}
    for entry in entries:
        with pytest.raises(exc) as info:
            _call(entry, **kwargs)
        assert type(info.value) is exc
        msg = str(info.value)
        fn = f"jaxdecode.{entry}"
        assert msg.startswith(fn + ": "), msg
        for w in words:
            assert w in msg, f"{entry}: {w!r} not in {msg!r}"
        messages[entry] = msg.replace(fn, "<fn>")
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("value,exc,word", [(0, ValueError, "must be >= 1, got 0"), (2.0, TypeError, "must be an int, got 2.0")])
def test_counts_of_the_proposers_and_beams(value, exc, word):
    msgs = []
    for fn, call in [("jaxdecode.draft_model", lambda: jaxdecode.draft_model(TRI, value)),
                     ("jaxdecode.prompt_lookup", lambda: jaxdecode.prompt_lookup(value))]:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(fn) and f"`num_tokens` {word}" in str(info.value)
        msgs.append(str(info.value).replace(fn, "<fn>"))
    assert msgs[0] == msgs[1]
    with pytest.raises(exc, match=rf"jaxdecode.beam_search: `num_beams` {word}"):
        jaxdecode.beam_search(TRI, PROMPT6, 2, num_beams=value)


# ---------------------------------------------------------------------------------------
# Model-declared context and EOS ids


class Declared:
    """A KV-cached model with a ``config`` declaring its context and EOS ids (as the
    jaxdecode.models classes do): the trigram model underneath."""

    def __init__(self, max_seq_len: int, eos_ids=()):
        self.config = types.SimpleNamespace(max_seq_len=max_seq_len, eos_ids=tuple(eos_ids))

    def init_cache(self, b, s):
        return TRI.init_cache(b, s)

    def step(self, tokens, positions, cache):
        return TRI.step(tokens, positions, cache)


SHORT = Declared(8)


@pytest.mark.parametrize("entry", ALL)
def test_prompt_plus_new_tokens_beyond_the_context_is_an_error(entry):
    def call(n):
        if entry == "beam_search":
            return jaxdecode.beam_search(SHORT, PROMPT6, n, num_beams=2)
        if entry == "speculative_generate":
            return jaxdecode.speculative_generate(SHORT, PROMPT6, n, proposer=jaxdecode.prompt_lookup(), key=KEY)
        return getattr(jaxdecode, entry)(SHORT, PROMPT6, n, key=KEY)

    with pytest.raises(ValueError, match=rf"jaxdecode.{entry}: the prompt length \(3\) \+ `max_new_tokens` \(6\) = 9 "
                                         r"exceeds the model's context of 8 tokens.*at most 5"):
        call(6)
    call(5)  # exactly the context: fine (the cache is clipped to it)


def test_model_declared_eos_ids_are_the_default():
    # Greedy continuation of [1, 2, 3] under the trigram model, then the same with its 2nd
    # generated token declared as EOS.
    plain = jaxdecode.generate(TRI, PROMPT6[:1], 6, temperature=0.0)
    gen = plain.tokens[0, 3:].tolist()
    k = next(i for i in range(1, 6) if gen[i] not in gen[:i])  # a token first seen at step k >= 1
    model = Declared(64, eos_ids=(gen[k],))
    want = [1, 2, 3] + gen[: k + 1] + [0] * (5 - k)
    for out in (jaxdecode.generate(model, PROMPT6[:1], 6, temperature=0.0),
                jaxdecode.speculative_generate(model, PROMPT6[:1], 6, proposer=jaxdecode.prompt_lookup(), temperature=0.0)):
        assert out.tokens[0].tolist() == want
        assert int(out.lengths[0]) == 4 + k
    off = jaxdecode.generate(model, PROMPT6[:1], 6, temperature=0.0, eos_id=())
    assert off.tokens[0, 3:].tolist() == gen
    beam = jaxdecode.beam_search(model, PROMPT6[:1], 6, num_beams=1)
    assert beam.tokens[0, 0].tolist() == want


# ---------------------------------------------------------------------------------------
# Buckets: few compilations, exact results, user shapes


def test_buckets_compile_once_per_bucket_pair():
    model = cached(Bigram.random(10, seed=8))  # built once: a static argument by identity
    rng = np.random.default_rng(0)

    def run(p, n):
        prompt = rng.integers(0, 10, (1, p)).astype(np.int32)
        out = jaxdecode.generate(model, prompt, n, temperature=0.0, eos_id=())
        assert out.tokens.shape == (1, p + n) and out.logprobs.shape == (1, n)  # the user's shapes
        return out

    def compiles(calls):
        before = G._generate_jit._cache_size()
        for p, n in calls:
            run(p, n)
        return G._generate_jit._cache_size() - before

    # 25 prompt lengths in 3..200 at one max_new_tokens: one compile per prompt bucket
    # (8, 16, 32, 64, 128, 256), not per length.
    lengths = sorted(set(np.linspace(3, 200, 25).astype(int).tolist()))
    assert {G.bucket(p, *G.PROMPT_BUCKETS) for p in lengths} == {8, 16, 32, 64, 128, 256}
    assert compiles([(p, 40) for p in lengths]) == 6
    # 25 values of max_new_tokens in 5..300 at one prompt length: step buckets 16, 64, 256, 1024.
    news = sorted(set(np.linspace(5, 300, 25).astype(int).tolist()))
    assert compiles([(7, n) for n in news]) <= 4
    # A mixed stream compiles at most once per new (prompt bucket, step bucket) pair.
    stream = [(int(rng.integers(3, 201)), int(rng.integers(5, 301))) for _ in range(12)]
    pairs = {(G.bucket(p, *G.PROMPT_BUCKETS), G.bucket(n, *G.STEP_BUCKETS)) for p, n in stream}
    assert compiles(stream) <= len(pairs)


@pytest.mark.parametrize("p,n", [(3, 5), (6, 17), (20, 3)])
def test_bucketed_cached_equals_unbucketed_stateless(p, n):
    """The cached path is bucketed, the stateless one is not: same tokens for greedy and seeded
    sampling rows, ragged prompts included."""
    bigram = Bigram.random(11, seed=p + n)
    rng = np.random.default_rng(p)
    prompt = rng.integers(0, 11, (3, p)).astype(np.int32)
    lengths = np.array([p, max(1, p // 2), 1], np.int32)
    kw = dict(key=jax.random.key(p), temperature=np.array([0.0, 1.0, 0.7], np.float32), top_p=0.95,
              prompt_lengths=lengths, eos_id=(), top_logprobs=2)
    a = jaxdecode.generate(bigram, prompt, n, **kw)
    b = jaxdecode.generate(cached(bigram), prompt, n, **kw)
    assert b.tokens.shape == (3, p + n) and b.top_ids.shape == (3, n, 2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    want = greedy_reference(bigram, prompt[:1], lengths[:1], n)[0]
    assert b.tokens[0].tolist() == want


def test_stream_with_buckets_equals_generate():
    model = cached(Bigram.random(10, seed=9))
    prompt = jnp.array([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    kw = dict(key=KEY, temperature=0.9, prompt_lengths=jnp.array([5, 2]), eos_id=())
    full = jaxdecode.generate(model, prompt, 19, **kw)
    chunks = list(jaxdecode.generate_stream(model, prompt, 19, chunk_size=4, **kw))
    assert [c.tokens.shape[1] for c in chunks] == [4, 4, 4, 4, 3]
    toks = np.concatenate([np.asarray(c.tokens) for c in chunks], axis=1)
    np.testing.assert_array_equal(toks[0], full.tokens[0, 5:])
    np.testing.assert_array_equal(toks[1], full.tokens[1, 2:21])


def test_enable_compilation_cache(tmp_path):
    code = ("import jax, jaxdecode; p = jaxdecode.enable_compilation_cache(%r); "
            "print(p, jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)")
    out = subprocess.run([sys.executable, "-c", code % str(tmp_path / "xla")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=_env())
    folder = str(tmp_path / "xla")
    assert out.stdout.split() == [folder, folder, "0.0"]
    assert (tmp_path / "xla").is_dir()


# ---------------------------------------------------------------------------------------
# Import graph, lazy models


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (every import statement, function-local ones
    included), read with ``ast``."""
    files = {_module_name(p): p for p in (ROOT / "jaxdecode").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` imports x (its package is only the parent, imported
                # implicitly); `from .m import x` imports m (and x, when x is a module).
                targets = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in files and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "jaxdecode._model" in graph["jaxdecode._beam"]  # the parser sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The checker itself finds a function-local cycle.
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    # Floors: the bottom imports nothing of the package's decoders; decoders don't import each other.
    for low in ("jaxdecode._validate", "jaxdecode._model", "jaxdecode._compilation", "jaxdecode.reference"):
        assert not graph[low] - {"jaxdecode._validate"}, (low, graph[low])
    assert not graph["jaxdecode._beam"] & {"jaxdecode._speculative", "jaxdecode._generate"}
    assert not graph["jaxdecode._speculative"] & {"jaxdecode._beam", "jaxdecode._generate"}


def test_models_attribute_is_lazy():
    code = ("import sys, jaxdecode; lazy = 'jaxdecode.models' not in sys.modules; "
            "load = jaxdecode.models.load; print(lazy, callable(load), 'models' in dir(jaxdecode))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=_env())
    assert out.stdout.split() == ["True", "True", "True"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        jaxdecode.nope


# ---------------------------------------------------------------------------------------
# Fixes: chain state, top_p / typical_p = 0 inside jit, speculative statistics


def test_chain_rejects_a_mismatched_state():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[1, 2]]), 5)
    proc = jaxdecode.chain(jaxdecode.ban_tokens([0]), jaxdecode.ban_tokens([1]))
    logits = jnp.zeros((1, 5))
    with pytest.raises(ValueError, match=r"jaxdecode.chain: `state` must be the tuple of the 2 processors' states.*tuple of 0"):
        proc.update(logits, (), ctx)
    with pytest.raises(ValueError, match=r"got a dict"):
        proc.update(logits, {}, ctx)
    out, state = proc.update(logits, proc.init(ctx), ctx)
    assert out.tolist() == [[-np.inf, -np.inf, 0.0, 0.0, 0.0]] and state == ((), ())


@pytest.mark.parametrize("knob", ["top_p", "typical_p"])
@pytest.mark.parametrize("value", [0.0, 1e-45])  # 1e-45 is a float32 subnormal (flushed to 0 on CPU)
def test_zero_mass_keeps_the_top_token_inside_jit(knob, value):
    # Row 0: one clear winner; row 1: a tie at the top. Typical-p keeps the most *typical*
    # token(s); for row 1 (two tied tokens with the rest far below) those are the tied pair.
    logits = jnp.array([[0.0, 3.0, 1.0, -1.0], [2.0, 0.5, 2.0, 0.5]], jnp.float32)
    keep = {"top_p": [[1], [0, 2]], "typical_p": None}[knob]
    filt = {"top_p": jaxdecode.top_p_filter, "typical_p": jaxdecode.typical_filter}[knob]
    filtered = jax.jit(filt)(logits, value)
    ref = {"top_p": reference.top_p_filter, "typical_p": reference.typical_filter}[knob](np.asarray(logits), 1e-30)
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), np.isfinite(ref))
    assert np.isfinite(np.asarray(filtered)).sum(axis=1).min() >= 1
    if keep is not None:
        assert [np.flatnonzero(np.isfinite(r)).tolist() for r in np.asarray(filtered)] == keep

    sample = jax.jit(lambda k, l, v: jaxdecode.sample_with_logprobs(k, l, **{knob: v}))
    for seed in range(8):
        ids, lps = sample(jax.random.key(seed), logits, value)
        kept = [np.flatnonzero(np.isfinite(r)).tolist() for r in ref]
        assert all(int(i) in kept[b] for b, i in enumerate(ids))
        probs = reference.softmax(ref)
        np.testing.assert_allclose(np.asarray(lps), np.log(probs[np.arange(2), np.asarray(ids)]), atol=1e-6)
        assert np.all(np.asarray(lps) <= 0)


def test_generate_speculative_returns_the_acceptance_statistics():
    prompt = jnp.array([[1, 2, 3, 1, 2], [4, 5, 4, 5, 0]])
    lengths = jnp.array([5, 4])
    proposer = jaxdecode.prompt_lookup(3, 2)
    via_generate = jaxdecode.generate(TRI, prompt, 8, temperature=0.0, prompt_lengths=lengths, speculative=proposer)
    direct = jaxdecode.speculative_generate(TRI, prompt, 8, proposer=proposer, temperature=0.0, prompt_lengths=lengths)
    assert int(via_generate.rounds) == int(direct.rounds) > 0
    np.testing.assert_array_equal(via_generate.proposed, direct.proposed)
    np.testing.assert_array_equal(via_generate.accepted, direct.accepted)
    # Each round proposes 3 tokens to every running row; rows accept between 0 and all.
    assert np.all(np.asarray(direct.proposed) <= 3 * int(direct.rounds))
    assert np.all(np.asarray(direct.accepted) <= np.asarray(direct.proposed))
    plain = jaxdecode.generate(TRI, prompt, 8, temperature=0.0, prompt_lengths=lengths)
    assert plain.rounds is None
    np.testing.assert_array_equal(via_generate.tokens, plain.tokens)


# ---------------------------------------------------------------------------------------
# Processors see history: the token buffer and the previous token


def test_context_holds_the_token_buffer_and_previous_token():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[1, 2, 3], [4, 0, 0]]), 6, jnp.array([3, 1]),
                                              max_length=6, pad_id=5)
    assert ctx.tokens.tolist() == [[1, 2, 3, 5, 5, 5], [4, 5, 5, 5, 5, 5]]
    assert ctx.lengths.tolist() == [3, 1] and ctx.prev_token.tolist() == [3, 4]
    ctx = ctx.advance(jnp.array([0, 2]), jnp.array([True, False]))
    ctx = ctx.advance(jnp.array([1, 3]))
    assert ctx.tokens.tolist() == [[1, 2, 3, 0, 1, 5], [4, 3, 5, 5, 5, 5]]
    assert ctx.lengths.tolist() == [5, 2] and ctx.step.tolist() == [2, 1] and ctx.prev_token.tolist() == [1, 3]
    assert ctx.generated_mask().astype(int).tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_the_reference(n, np_rng):
    b, total, vocab = 6, 24, 3  # a small vocabulary: many repeated n-grams
    toks = np_rng.integers(0, vocab, (b, total)).astype(np.int32)
    lengths = np.array([total, 9, 5, n - 1 if n > 1 else 1, 1, 2], np.int32)
    logits = np_rng.standard_normal((b, vocab)).astype(np.float32)
    ctx = jaxdecode.DecodeContext.from_prompt(toks, vocab, lengths, max_length=total)
    proc = jaxdecode.no_repeat_ngram(n)
    want = reference.no_repeat_ngram(logits, toks, lengths, n)
    for fn in (proc.update, jax.jit(proc.update)):
        got, _ = fn(jnp.asarray(logits), proc.init(ctx), ctx)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert np.isinf(want).any()  # the case bans something


def test_no_repeat_ngram_reference_by_hand():
    x = np.array([[5, 6, 7, 5, 6]])
    logits = np.zeros((1, 9), np.float32)
    assert np.flatnonzero(np.isinf(reference.no_repeat_ngram(logits, x, [5], 2))).tolist() == [7]  # "6 7" seen
    assert np.flatnonzero(np.isinf(reference.no_repeat_ngram(logits, x, [5], 3))).tolist() == [7]  # "5 6 7" seen
    assert np.flatnonzero(np.isinf(reference.no_repeat_ngram(logits, x, [5], 1))).tolist() == [5, 6, 7]
    assert not np.isinf(reference.no_repeat_ngram(logits, x, [2], 4)).any()  # too short


def test_generate_with_no_repeat_ngram_never_repeats_a_bigram():
    model = cached(Bigram.random(7, seed=11, scale=3.0))
    prompt = jnp.array([[1, 2, 3], [4, 4, 0]])
    out = jaxdecode.generate(model, prompt, 12, key=KEY, temperature=0.8, prompt_lengths=jnp.array([3, 2]),
                             eos_id=(), processors=jaxdecode.no_repeat_ngram(2))
    for b in range(2):
        row = out.tokens[b, : int(out.lengths[b])].tolist()
        grams = [tuple(row[i : i + 2]) for i in range(len(row) - 1)]
        prompt_grams = grams[: 2 - b]
        new = grams[len(prompt_grams):]
        assert len(set(new)) == len(new) and not set(new) & set(prompt_grams), row
